"""How each ONNX op moves, couples, creates or blocks channels: one rule per op family.

A rule reads the channel maps of its inputs from the tracer and writes those of its outputs. It
also records what removal must rewrite (weight slices, bias folds, attribute edits) and tracks the
*constant* a channel takes when its unit is masked at the source, because that constant must be
folded into the next layer's bias rather than dropped. Ops without a rule block every channel
they touch: an op we do not understand never yields an invalid graph, only unprunable channels.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx_ir as ir

from .model import AxisEdit, BiasFold, ChannelMap, GroupEdit
from .tracer import Tracer

Rule = Callable[[ir.Node, Tracer], None]
RULES: dict[str, Rule] = {}


def rule(*op_types: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in op_types:
            RULES[op] = fn
        return fn
    return register


def apply(node: ir.Node, t: Tracer) -> None:
    """Run the rule for ``node``; unknown ops and custom domains block their inputs' channels."""
    fn = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    for v in captured_values(node):  # If/Loop/Scan bodies read outer tensors without listing them as inputs
        m = t.map(v)
        if m is not None:
            t.block(m.elems, f"read inside a subgraph of {node.op_type} {node.name}")
    if fn is None:
        t.block_inputs(node, f"unsupported op {node.op_type} ({node.name})")
        return
    fn(node, t)


def captured_values(node: ir.Node) -> list[ir.Value]:
    """Outer-scope values that the subgraphs of ``node`` (recursively) read."""
    found: list[ir.Value] = []
    stack = [g for a in node.attributes.values() if a.type == ir.AttributeType.GRAPH for g in [a.as_graph()]]
    stack += [g for a in node.attributes.values() if a.type == ir.AttributeType.GRAPHS for g in a.as_graphs()]
    for graph in stack:
        for inner in ir.traversal.RecursiveGraphIterator(graph):
            found += [v for v in inner.inputs if v is not None and v.graph is not graph and v.graph is not inner.graph]
    return found


# -- small helpers -------------------------------------------------------------------------------

def _inp(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _padded(node: ir.Node) -> bool:
    auto = node.attributes.get_string("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return True
    return any(p != 0 for p in node.attributes.get_ints("pads", ()) or ())


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _nonconst(c: np.ndarray) -> np.ndarray:
    return np.isnan(c)


def _consume(t: Tracer, node: ir.Node, m, weight: ir.Value, in_axis: int, kind: str, exact: bool,
             can_fold: bool, bias: ir.Value | None = None) -> None:
    """Record that ``node`` reads channels ``m`` through ``weight``'s ``in_axis``.

    Masked channels that are not zero must have their constant folded into ``node``'s bias;
    channels that are not even constant (or that cannot be folded) are blocked.
    """
    t.slot(node, weight, in_axis, m.elems, "in")
    c = m.const
    if can_fold:  # where calibration means, rather than masked constants, may be folded
        t.consumers.append(BiasFold(node.name, kind, weight.name, in_axis, m.elems, np.arange(len(c)), c,
                                    bias.name if bias is not None else None, exact, node.inputs[0].name))  # type: ignore[arg-type]
    bad = _nonconst(c)
    if bad.any():
        t.block(m.elems[bad], f"channel is not constant when masked, read by {node.name}")
    nz = ~bad & (c != 0)
    if not nz.any():
        return
    if not can_fold:
        t.block(m.elems[nz], f"masked channel carries a constant that {node.op_type} {node.name} cannot absorb")
        return
    t.fold(BiasFold(node.name, kind, weight.name, in_axis, m.elems[nz], np.flatnonzero(nz), c[nz],
                    bias.name if bias is not None else None, exact))  # type: ignore[arg-type]


def _source_const(t: Tracer, bias: ir.Value | None, n: int) -> np.ndarray:
    """What a removed channel of a weighted layer outputs: its bias (weights gone), or 0 in zero mode."""
    if bias is None or not t.keep_bias:
        return np.zeros(n)
    return np.broadcast_to(t.const(bias).astype(np.float64).reshape(-1), (n,)).copy()


def _bias_foldable(node: ir.Node, bias: ir.Value | None) -> bool:
    # A shared bias would receive another layer's fold; a runtime bias cannot be rewritten.
    return bias is None or (bias.const_value is not None and len(bias.uses()) == 1)


# -- layers that create channels -----------------------------------------------------------------

@rule("Conv")
def conv(node: ir.Node, t: Tracer) -> None:
    x, w, b = _inp(node, 0), _inp(node, 1), _inp(node, 2)
    W = t.const(w)
    m = t.map(x)
    if W is None or (b is not None and b.const_value is None):
        t.block_inputs(node, f"Conv {node.name} has runtime weights")
        return
    if m is not None and m.axis != 1:
        t.block(m.elems, f"channel axis {m.axis} reaches Conv {node.name} as its channel axis")
        m = None
    g = node.attributes.get_int("group", 1)
    if g > 1 and W.shape[1] == 1:  # depthwise (with optional channel multiplier): channels pass through
        _depthwise_conv(node, t, m, w, b, W, g)
    elif g == 1:
        _dense_conv(node, t, m, w, b, W.shape[0])
    else:
        _grouped_conv(node, t, m, x, w, b, W, g)


def _depthwise_conv(node: ir.Node, t: Tracer, m: ChannelMap | None, w: ir.Value, b: ir.Value | None,
                    W: np.ndarray, g: int) -> None:
    cout = W.shape[0]
    mult = cout // g
    if m is None:
        return  # depthwise over the graph input: its channels are the input's, never pruned
    elems = np.repeat(m.elems, mult)
    t.slot(node, w, 0, elems, "param")
    if b is not None:
        t.slot(node, b, 0, elems, "param")
    t.group_edits.append(GroupEdit(node.name, m.elems, g))
    cin = np.repeat(m.const, mult)
    bias = t.const(b).astype(np.float64) if b is not None else np.zeros(cout)
    ksum = W.reshape(cout, -1).sum(axis=1).astype(np.float64)
    const = np.where(cin == 0, bias, cin * ksum + bias)
    if _padded(node):  # a constant plane convolved with zero padding differs at the borders
        t.approximate(elems[~np.isnan(cin) & (cin != 0)])
    t.set_map(node, node.outputs[0], 1, elems, const)


def _dense_conv(node: ir.Node, t: Tracer, m: ChannelMap | None, w: ir.Value, b: ir.Value | None, cout: int) -> None:
    elems = t.fresh(cout)
    t.slot(node, w, 0, elems, "out")
    if b is not None:
        t.slot(node, b, 0, elems, "bias")
    if m is not None:
        _consume(t, node, m, w, 1, "conv", exact=not _padded(node), can_fold=_bias_foldable(node, b), bias=b)
    t.set_map(node, node.outputs[0], 1, elems, _source_const(t, b, cout))


def _grouped_conv(node: ir.Node, t: Tracer, m: ChannelMap | None, x: ir.Value, w: ir.Value, b: ir.Value | None,
                  W: np.ndarray, g: int) -> None:
    """Prune the same index in every group, so the group count stays valid."""
    cout, cin_g = W.shape[0], W.shape[1]
    elems = np.tile(t.fresh(cout // g), g)
    t.slot(node, w, 0, elems, "out")
    if b is not None:
        t.slot(node, b, 0, elems, "bias")
    if m is not None:
        per_group = m.elems.reshape(g, cin_g)
        for k in range(1, g):
            t.union(per_group[0], per_group[k])
        t.slot(node, w, 1, per_group[0], "in")
        c = m.const
        if np.isnan(c).any():
            t.block(m.elems[np.isnan(c)], f"channel is not constant when masked, read by {node.name}")
        nz = ~np.isnan(c) & (c != 0)
        exact = not _padded(node)
        if _bias_foldable(node, b):
            t.consumers.append(BiasFold(node.name, "grouped", w.name, 1, m.elems, np.arange(len(c)), c,
                                        b.name if b is not None else None, exact, x.name))
        if nz.any():
            if _bias_foldable(node, b):
                t.fold(BiasFold(node.name, "grouped", w.name, 1, m.elems[nz], np.flatnonzero(nz), c[nz],
                                b.name if b is not None else None, exact=exact))
            else:
                t.block(m.elems[nz], f"masked channel carries a constant that {node.name} cannot absorb")
    t.set_map(node, node.outputs[0], 1, elems, _source_const(t, b, cout))


@rule("ConvTranspose")
def conv_transpose(node: ir.Node, t: Tracer) -> None:
    w, b = _inp(node, 1), _inp(node, 2)
    W = t.const(w)
    m = t.map(_inp(node, 0))
    g = node.attributes.get_int("group", 1)
    if W is None or g != 1 or (b is not None and b.const_value is None):
        t.block_inputs(node, f"ConvTranspose {node.name} with runtime weights or groups")
        return
    cout = W.shape[1]
    elems = t.fresh(cout)
    t.slot(node, w, 1, elems, "out")
    if b is not None:
        t.slot(node, b, 0, elems, "bias")
    if m is not None:
        if m.axis != 1:
            t.block(m.elems, f"channel axis {m.axis} reaches ConvTranspose {node.name}")
        else:
            # Output pixels see a varying number of kernel taps: a constant input is never foldable.
            _consume(t, node, m, w, 0, "conv", exact=False, can_fold=False)
    t.set_map(node, node.outputs[0], 1, elems, _source_const(t, b, cout))


@rule("Gemm")
def gemm(node: ir.Node, t: Tracer) -> None:
    a, w, c = _inp(node, 0), _inp(node, 1), _inp(node, 2)
    W = t.const(w)
    m = t.map(a)
    trans_a, trans_b = node.attributes.get_int("transA", 0), node.attributes.get_int("transB", 0)
    if W is None or trans_a or (c is not None and c.const_value is None):
        t.block_inputs(node, f"Gemm {node.name} with runtime weights or transA")
        return
    n_out = W.shape[0] if trans_b else W.shape[1]
    out_axis, in_axis = (0, 1) if trans_b else (1, 0)
    elems = t.fresh(n_out)
    t.slot(node, w, out_axis, elems, "out")
    const = np.zeros(n_out)
    if c is not None:
        C = t.const(c)
        beta = node.attributes.get_float("beta", 1.0)
        if C.size == n_out and C.shape[-1] == n_out:
            t.slot(node, c, C.ndim - 1, elems, "bias")
            if t.keep_bias:
                const = C.reshape(-1).astype(np.float64) * beta
        elif C.size == 1:
            const = np.full(n_out, float(C.reshape(-1)[0]) * beta)
        else:
            t.block(elems, f"Gemm {node.name} has a per-row bias")
    if m is not None:
        if m.axis != 1:
            t.block(m.elems, f"channel axis {m.axis} reaches Gemm {node.name} on its batch axis")
        else:
            alpha, beta = node.attributes.get_float("alpha", 1.0), node.attributes.get_float("beta", 1.0)
            simple = alpha == 1.0 and beta == 1.0 and (c is None or t.const(c).size == n_out)
            _consume(t, node, m, w, in_axis, "gemm", exact=True, can_fold=simple and _bias_foldable(node, c), bias=c)
    t.set_map(node, node.outputs[0], 1, elems, const)


@rule("MatMul")
def matmul(node: ir.Node, t: Tracer) -> None:
    a, w = _inp(node, 0), _inp(node, 1)
    W = t.const(w)
    m = t.map(a)
    a_shape = t.shape(a)
    if W is None or W.ndim != 2 or a_shape is None or t.map(w) is not None:
        t.block_inputs(node, f"MatMul {node.name} without a constant 2-D right operand")
        return
    elems = t.fresh(W.shape[1])
    t.slot(node, w, 1, elems, "out")
    if m is not None:
        if m.axis != len(a_shape) - 1:
            t.block(m.elems, f"channel axis reaches MatMul {node.name} outside its contraction axis")
        else:
            bias = _matmul_bias(node, W.shape[1])
            _consume(t, node, m, w, 0, "gemm", exact=True, can_fold=bias is not None, bias=bias)
    out_shape = t.shape(node.outputs[0])
    rank = len(out_shape) if out_shape else max(len(a_shape), 2)
    t.set_map(node, node.outputs[0], rank - 1, elems, np.zeros(W.shape[1]))


def _matmul_bias(node: ir.Node, n_out: int) -> ir.Value | None:
    """The constant of an ``Add`` that is this MatMul's only consumer: its bias, as exporters write it."""
    out = node.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output() or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    if other is None or other.const_value is None or other.const_value.size != n_out or len(other.uses()) != 1:
        return None
    return other


def _is_bias_add(node: ir.Node, t: Tracer, tracked: ir.Value, const: ir.Value, size: int) -> bool:
    """Add(source output, per-channel constant) right after a Conv/Gemm/MatMul: the source's bias."""
    producer = tracked.producer()
    return (node.op_type == "Add" and producer is not None and producer.op_type in ("MatMul", "Conv", "Gemm")
            and len(tracked.uses()) == 1 and not tracked.is_graph_output() and len(const.uses()) == 1
            and const.const_value.size == size and t.map(tracked) is not None
            and bool((t.map(tracked).const == 0).all()))


# -- per-channel layers ----------------------------------------------------------------------------

@rule("BatchNormalization")
def batchnorm(node: ir.Node, t: Tracer) -> None:
    m = t.map(_inp(node, 0))
    if m is None:
        return
    params = [t.const(_inp(node, i)) for i in range(1, 5)]
    if m.axis != 1 or any(p is None for p in params) or any(o.uses() for o in node.outputs[1:]):
        t.block(m.elems, f"BatchNormalization {node.name} is not a plain inference BN on axis 1")
        return
    for i in range(1, 5):
        t.slot(node, node.inputs[i], 0, m.elems, "param")
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = node.attributes.get_float("epsilon", 1e-5)
    const = (m.const - mean) / np.sqrt(var + eps) * gamma + beta
    t.set_map(node, node.outputs[0], 1, m.elems, const)


@rule("InstanceNormalization")
def instancenorm(node: ir.Node, t: Tracer) -> None:
    m = t.map(_inp(node, 0))
    if m is None:
        return
    scale, bias = t.const(_inp(node, 1)), t.const(_inp(node, 2))
    if m.axis != 1 or scale is None or bias is None:
        t.block(m.elems, f"InstanceNormalization {node.name} with runtime parameters")
        return
    t.slot(node, node.inputs[1], 0, m.elems, "param")
    t.slot(node, node.inputs[2], 0, m.elems, "param")
    const = np.where(np.isnan(m.const), np.nan, bias.astype(np.float64))  # a constant plane normalises to 0
    t.set_map(node, node.outputs[0], 1, m.elems, const)


# -- elementwise ops -------------------------------------------------------------------------------

def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[float])(x) if x.size else x


def _attr(node: ir.Node, name: str, default: float) -> float:
    return node.attributes.get_float(name, default)


_UNARY: dict[str, Callable[[np.ndarray, ir.Node], np.ndarray]] = {
    "Relu": lambda c, n: np.maximum(c, 0),
    "LeakyRelu": lambda c, n: np.where(c < 0, c * _attr(n, "alpha", 0.01), c),
    "Sigmoid": lambda c, n: 1 / (1 + np.exp(-c)),
    "HardSigmoid": lambda c, n: np.clip(_attr(n, "alpha", 0.2) * c + _attr(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda c, n: c * np.clip(c / 6 + 0.5, 0, 1),
    "Tanh": lambda c, n: np.tanh(c),
    "Elu": lambda c, n: np.where(c < 0, _attr(n, "alpha", 1.0) * (np.exp(c) - 1), c),
    "Selu": lambda c, n: _attr(n, "gamma", 1.0507) * np.where(c < 0, _attr(n, "alpha", 1.67326) * (np.exp(c) - 1), c),
    "Celu": lambda c, n: np.maximum(c, 0) + np.minimum(0, _attr(n, "alpha", 1.0) * (np.exp(c / _attr(n, "alpha", 1.0)) - 1)),
    "Softplus": lambda c, n: np.log1p(np.exp(c)),
    "Softsign": lambda c, n: c / (1 + np.abs(c)),
    "Mish": lambda c, n: c * np.tanh(np.log1p(np.exp(c))),
    "Gelu": lambda c, n: 0.5 * c * (1 + _erf(c / math.sqrt(2))),
    "Erf": lambda c, n: _erf(c),
    "Exp": lambda c, n: np.exp(c),
    "Neg": lambda c, n: -c,
    "Abs": lambda c, n: np.abs(c),
    "Sqrt": lambda c, n: np.sqrt(np.where(c < 0, np.nan, c)),
    "Floor": lambda c, n: np.floor(c),
    "Ceil": lambda c, n: np.ceil(c),
    "Round": lambda c, n: np.round(c),
    "Sign": lambda c, n: np.sign(c),
    "ThresholdedRelu": lambda c, n: np.where(c > _attr(n, "alpha", 1.0), c, 0),
    "Identity": lambda c, n: c,
    "Dropout": lambda c, n: c,
    "Cast": lambda c, n: c,
}


@rule(*_UNARY)
def unary(node: ir.Node, t: Tracer) -> None:
    m = t.map(_inp(node, 0))
    if m is None:
        return
    with np.errstate(all="ignore"):
        const = _UNARY[node.op_type](m.const, node)
    t.set_map(node, node.outputs[0], m.axis, m.elems, np.where(np.isfinite(const), const, np.nan))


@rule("Clip")
def clip(node: ir.Node, t: Tracer) -> None:
    m = t.map(_inp(node, 0))
    if m is None:
        return
    lo, hi = _inp(node, 1), _inp(node, 2)
    if (lo is not None and lo.const_value is None) or (hi is not None and hi.const_value is None):
        const = np.where(m.const == 0, np.nan, np.nan)
    else:
        lo_v = float(t.const(lo)) if lo is not None else node.attributes.get_float("min", -np.inf)
        hi_v = float(t.const(hi)) if hi is not None else node.attributes.get_float("max", np.inf)
        const = np.clip(m.const, lo_v, hi_v)
    t.set_map(node, node.outputs[0], m.axis, m.elems, const)


def _mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # 0 times an unknown runtime value is still 0: this keeps masked channels constant through gates.
    return np.where((a == 0) | (b == 0), 0.0, a * b)


def _prelu(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.where(x == 0, 0.0, np.where(x < 0, x * s, x))


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(a == 0, np.where(b == 0, np.nan, 0.0), a / b)


_BINARY: dict[str, Callable[..., np.ndarray]] = {
    "Add": lambda *xs: sum(xs[1:], xs[0]),
    "Sum": lambda *xs: sum(xs[1:], xs[0]),
    "Sub": lambda a, b: a - b,
    "Mul": _mul,
    "Div": _div,
    "PRelu": _prelu,
    "Max": lambda *xs: np.maximum.reduce(xs),
    "Min": lambda *xs: np.minimum.reduce(xs),
    "Mean": lambda *xs: sum(xs[1:], xs[0]) / len(xs),
    "Pow": lambda a, b: np.power(a, b),
}


@rule(*_BINARY)
def elementwise(node: ir.Node, t: Tracer) -> None:
    """Broadcasting ops: tracked inputs on the same aligned axis are coupled position by position."""
    inputs = [v for v in node.inputs if v is not None]
    maps = [t.map(v) for v in inputs]
    if not any(maps):
        return
    out_shape = t.shape(node.outputs[0])
    shapes = [t.shape(v) for v in inputs]
    if out_shape is None or any(s is None for s in shapes):
        t.block_inputs(node, f"unknown shapes at {node.op_type} {node.name}")
        return
    rank = len(out_shape)
    axes = {m.axis + rank - len(s) for m, s in zip(maps, shapes) if m is not None}
    tracked = [m for m in maps if m is not None]
    size = out_shape[axes.pop()] if len(axes) == 1 else -1
    if size < 0 or any(len(m.elems) != size for m in tracked):
        t.block_inputs(node, f"inputs of {node.op_type} {node.name} carry channels on different axes")
        return
    axis = tracked[0].axis + rank - len(shapes[maps.index(tracked[0])])
    elems = tracked[0].elems
    values = []
    for v, m, s in zip(inputs, maps, shapes):
        in_axis = axis - (rank - len(s))
        if m is not None:
            t.union(elems, m.elems)
            values.append(m.const)
            continue
        dim = s[in_axis] if 0 <= in_axis < len(s) else 1
        arr = t.const(v)
        if arr is None:  # a runtime tensor without channels of its own
            if dim != 1:
                t.block(elems, f"{node.op_type} {node.name} mixes channels with untracked tensor {v.name}")
                return
            values.append(np.full(size, np.nan))
            continue
        arr = arr.astype(np.float64)
        if dim == size and size != 1 and _is_bias_add(node, t, inputs[1 - inputs.index(v)] if len(inputs) == 2 else v, v, size):
            t.slot(node, v, in_axis, elems, "bias")  # the source's bias, written as a separate Add
            if not t.keep_bias:
                values.append(np.zeros(size))
                continue
        if dim == size and size != 1:
            t.slot(node, v, in_axis, elems, "param")
            per_pos = np.moveaxis(arr, in_axis, 0).reshape(size, -1)
        else:
            per_pos = np.broadcast_to(arr.reshape(1, -1), (size, arr.size))
        varies = (per_pos != per_pos[:, :1]).any(axis=1)  # not constant over the other axes
        values.append(np.where(varies, np.nan, per_pos[:, 0]))
    with np.errstate(all="ignore"):
        const = np.asarray(_BINARY[node.op_type](*values), dtype=np.float64)
    const = np.where(np.isfinite(const), const, np.nan)
    t.set_map(node, node.outputs[0], axis, elems, const)


# -- spatial ops that keep the channel axis ----------------------------------------------------------

def _passthrough(node: ir.Node, t: Tracer, const_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    m = t.map(_inp(node, 0))
    if m is None:
        return
    if m.axis != 1:
        t.block(m.elems, f"{node.op_type} {node.name} expects channels on axis 1")
        return
    const = const_fn(m.const) if const_fn else m.const
    t.set_map(node, node.outputs[0], 1, m.elems, const)


@rule("MaxPool", "GlobalMaxPool", "GlobalAveragePool")
def pool(node: ir.Node, t: Tracer) -> None:
    _passthrough(node, t)


@rule("AveragePool", "LpPool", "GlobalLpPool")
def avg_pool(node: ir.Node, t: Tracer) -> None:
    border = node.op_type != "GlobalLpPool" and _padded(node) and (
        node.op_type == "LpPool" or node.attributes.get_int("count_include_pad", 0))
    lp = node.op_type in ("LpPool", "GlobalLpPool")
    if lp:
        _passthrough(node, t, lambda c: np.where(c == 0, 0.0, np.nan))
        return
    _passthrough(node, t)
    m = t.map(_inp(node, 0))
    if border and m is not None:
        t.approximate(m.elems[m.const != 0])  # padded zeros pull border averages toward 0


@rule("Pad")
def pad(node: ir.Node, t: Tracer) -> None:
    m = t.map(_inp(node, 0))
    if m is None:
        return
    pads = t.const(_inp(node, 1)) if len(node.inputs) > 1 else np.array(node.attributes.get_ints("pads", ()))
    axes = t.const(_inp(node, 3))
    shape = t.shape(node.inputs[0])
    if pads is None or shape is None or (_inp(node, 3) is not None and axes is None):
        t.block(m.elems, f"Pad {node.name} has runtime pads")
        return
    rank = len(shape)
    axes = [_norm_axis(int(a), rank) for a in axes] if axes is not None else list(range(rank))
    pads = np.asarray(pads).reshape(2, -1)
    if m.axis in axes and pads[:, axes.index(m.axis)].any():
        t.block(m.elems, f"Pad {node.name} pads the channel axis")
        return
    mode = node.attributes.get_string("mode", "constant")
    value = t.const(_inp(node, 2))
    value = float(value.reshape(-1)[0]) if value is not None and value.size else node.attributes.get_float("value", 0.0)
    const = m.const
    if mode == "constant" and pads.any():
        t.approximate(m.elems[~np.isnan(const) & (const != value)])  # the padded border holds ``value``
    t.set_map(node, node.outputs[0], m.axis, m.elems, const)


@rule("Resize", "Upsample")
def resize(node: ir.Node, t: Tracer) -> None:
    m = t.map(_inp(node, 0))
    if m is None:
        return
    if node.op_type == "Upsample":
        scales = t.const(_inp(node, 1)) if len(node.inputs) > 1 else np.array(node.attributes.get_floats("scales", ()))
        sizes_v = None
    else:
        scales_v = _inp(node, 2)
        sizes_v = _inp(node, 3)
        scales = t.const(scales_v) if scales_v is not None and scales_v.name else None
        if scales is not None and scales.size == 0:
            scales = None
    if node.attributes.get_ints("axes", None) is not None:
        t.block(m.elems, f"Resize {node.name} with axes attribute")
        return
    if scales is not None and m.axis < scales.size and scales[m.axis] != 1:
        t.block(m.elems, f"Resize {node.name} scales the channel axis")
        return
    if sizes_v is not None and sizes_v.name:
        sizes = t.const(sizes_v)
        if sizes is not None:
            if len(sizes_v.uses()) != 1:
                t.block(m.elems, f"Resize {node.name} shares its sizes tensor")
                return
            t.axis_edits.append(AxisEdit(node.name, "resize", m.axis, [m.elems]))
        # Runtime sizes come from Shape ops of the pruned graph, so they follow the new widths.
    t.set_map(node, node.outputs[0], m.axis, m.elems, m.const)


# -- layout ops ------------------------------------------------------------------------------------

@rule("Transpose")
def transpose(node: ir.Node, t: Tracer) -> None:
    m = t.map(_inp(node, 0))
    if m is None:
        return
    shape = t.shape(node.inputs[0])
    perm = node.attributes.get_ints("perm", None)
    perm = list(perm) if perm is not None else list(reversed(range(len(shape or ()))))
    if m.axis not in perm:
        t.block(m.elems, f"Transpose {node.name} has no perm for the channel axis")
        return
    t.set_map(node, node.outputs[0], perm.index(m.axis), m.elems, m.const)


def map_reshape(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int,
                elems: np.ndarray, const: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
    """Follow a channel axis through a reshape of concrete shapes, or None if channels get split.

    In row-major order the channel axis spans a range of strides; the output axis whose stride
    range contains it carries the channels, each position repeating (Flatten of NCHW) or cycling
    through (Flatten of NHWC) the channel elements.
    """
    n = len(elems)
    inner_in = int(np.prod(in_shape[axis + 1:], dtype=np.int64))
    for b in range(len(out_shape)):
        inner_out = int(np.prod(out_shape[b + 1:], dtype=np.int64))
        outer_out = inner_out * out_shape[b]
        if out_shape[b] == 1 and n != 1:
            continue
        if inner_in % inner_out == 0 and outer_out % (inner_in * n) == 0:
            pos = (np.arange(out_shape[b], dtype=np.int64) * inner_out // inner_in) % n
            return b, elems[pos], const[pos]
    return None


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(node: ir.Node, t: Tracer) -> None:
    m = t.map(_inp(node, 0))
    if m is None:
        return
    in_shape, out_shape = t.shape(node.inputs[0]), t.shape(node.outputs[0])
    mapped = map_reshape(in_shape, out_shape, m.axis, m.elems, m.const) if in_shape and out_shape else None
    if mapped is None:
        t.block(m.elems, f"{node.op_type} {node.name} splits the channel axis")
        return
    axis, elems, const = mapped
    if node.op_type == "Reshape":
        spec_v = node.inputs[1]
        spec = t.const(spec_v)
        if spec is None:
            t.block(m.elems, f"Reshape {node.name} takes its shape at runtime")
            return
        if spec[axis] > 0 or (spec[axis] == 0 and axis != m.axis):
            if spec[axis] == 0 or len(spec_v.uses()) != 1:
                t.block(m.elems, f"Reshape {node.name} fixes the channel count in a shared or copied dim")
                return
            t.axis_edits.append(AxisEdit(node.name, "reshape", axis, [elems]))
    t.set_map(node, node.outputs[0], axis, elems, const)


@rule("Concat")
def concat(node: ir.Node, t: Tracer) -> None:
    inputs = list(node.inputs)
    maps = [t.map(v) for v in inputs]
    if not any(maps):
        return
    out_shape = t.shape(node.outputs[0])
    if out_shape is None:
        t.block_inputs(node, f"unknown shape at Concat {node.name}")
        return
    axis = _norm_axis(node.attributes.get_int("axis", 0), len(out_shape))
    tracked_axes = {m.axis for m in maps if m is not None}
    if tracked_axes != {axis}:
        if len(tracked_axes) == 1 and all(m is not None for m in maps):
            elems = maps[0].elems  # concatenated along another axis: channels of all inputs coincide
            for mm in maps[1:]:
                t.union(elems, mm.elems)
            const = np.where(np.all([mm.const == maps[0].const for mm in maps], axis=0), maps[0].const, np.nan)
            t.set_map(node, node.outputs[0], tracked_axes.pop(), elems, const)
        else:
            t.block_inputs(node, f"Concat {node.name} joins tensors whose channels do not line up")
        return
    parts_e, parts_c = [], []
    for v, mm in zip(inputs, maps):
        if mm is not None:
            parts_e.append(mm.elems)
            parts_c.append(mm.const)
            continue
        n = t.shape(v)[axis]
        fresh = t.fresh(n)
        t.block(fresh, f"Concat {node.name} input {v.name} has no prunable channels")
        parts_e.append(fresh)
        parts_c.append(np.full(n, np.nan))
    t.set_map(node, node.outputs[0], axis, np.concatenate(parts_e), np.concatenate(parts_c))


@rule("Split")
def split(node: ir.Node, t: Tracer) -> None:
    m = t.map(_inp(node, 0))
    if m is None:
        return
    shape = t.shape(node.inputs[0])
    axis = _norm_axis(node.attributes.get_int("axis", 0), len(shape))
    if axis != m.axis:
        for o in node.outputs:
            t.set_map(node, o, m.axis, m.elems, m.const)
        return
    sizes = [t.shape(o)[axis] if t.shape(o) else None for o in node.outputs]
    sizes_v = _inp(node, 1)
    if None in sizes or (sizes_v is not None and (sizes_v.const_value is None or len(sizes_v.uses()) != 1)):
        t.block(m.elems, f"Split {node.name} with runtime or shared sizes")
        return
    bounds = np.cumsum([0] + sizes)
    chunks = [m.elems[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
    t.axis_edits.append(AxisEdit(node.name, "split", axis, chunks))
    for i, o in enumerate(node.outputs):
        t.set_map(node, o, axis, chunks[i], m.const[bounds[i]:bounds[i + 1]])


@rule("Slice")
def slice_(node: ir.Node, t: Tracer) -> None:
    m = t.map(_inp(node, 0))
    if m is None:
        return
    shape = t.shape(node.inputs[0])
    vals = [t.const(_inp(node, i)) for i in range(1, 5)]
    if len(node.inputs) < 2:  # opset < 10: attributes
        vals = [np.array(node.attributes.get_ints(k, ())) if node.attributes.get_ints(k, None) is not None else None
                for k in ("starts", "ends", "axes")] + [None]
    starts, ends, axes, steps = vals
    if starts is None or ends is None or (axes is None and len(node.inputs) > 3 and _inp(node, 3) is not None):
        t.block(m.elems, f"Slice {node.name} with runtime bounds")
        return
    axes = [_norm_axis(int(a), len(shape)) for a in (axes if axes is not None else range(len(starts)))]
    if m.axis not in axes:
        t.set_map(node, node.outputs[0], m.axis, m.elems, m.const)
        return
    i = axes.index(m.axis)
    step = int(steps[i]) if steps is not None else 1
    if step != 1 or any(len(v.uses()) != 1 for v in node.inputs[1:] if v is not None and v.name):
        t.block(m.elems, f"Slice {node.name} strides over or shares its channel bounds")
        return
    n = len(m.elems)
    start, end, _ = slice(int(starts[i]), int(ends[i])).indices(n)
    end = max(end, start)
    t.axis_edits.append(AxisEdit(node.name, "slice", m.axis, [m.elems], start, end))
    t.set_map(node, node.outputs[0], m.axis, m.elems[start:end], m.const[start:end])


# -- ops that reduce, normalise across, or only read shapes ---------------------------------------------

@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
      "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum")
def reduce(node: ir.Node, t: Tracer) -> None:
    m = t.map(_inp(node, 0))
    if m is None:
        return
    shape = t.shape(node.inputs[0])
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = t.const(node.inputs[1])
        if axes is None:
            t.block(m.elems, f"{node.op_type} {node.name} with runtime axes")
            return
    axes = sorted(_norm_axis(int(a), len(shape)) for a in axes) if axes is not None and len(axes) else None
    if axes is None:
        if node.attributes.get_int("noop_with_empty_axes", 0):
            t.set_map(node, node.outputs[0], m.axis, m.elems, m.const)
            return
        axes = list(range(len(shape)))
    if m.axis in axes:
        t.block(m.elems, f"{node.op_type} {node.name} reduces over channels")
        return
    keep = node.attributes.get_int("keepdims", 1)
    axis = m.axis if keep else m.axis - sum(a < m.axis for a in axes)
    keeps_value = node.op_type in ("ReduceMean", "ReduceMax", "ReduceMin")
    const = m.const if keeps_value else np.where(m.const == 0, 0.0, np.nan)
    t.set_map(node, node.outputs[0], axis, m.elems, const)


@rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(node: ir.Node, t: Tracer) -> None:
    m = t.map(_inp(node, 0))
    if m is None:
        return
    shape = t.shape(node.inputs[0])
    axis = _norm_axis(node.attributes.get_int("axis", -1 if t.opset >= 13 else 1), len(shape))
    if m.axis == axis or (t.opset < 13 and m.axis >= axis):
        t.block(m.elems, f"{node.op_type} {node.name} normalises over channels")
        return
    t.set_map(node, node.outputs[0], m.axis, m.elems, np.full(len(m.elems), np.nan))


@rule("Shape", "Size")
def shape_only(node: ir.Node, t: Tracer) -> None:
    """Reads only the shape; downstream shape arithmetic sees the pruned widths at runtime."""
