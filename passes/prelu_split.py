"""Exact rewrites of PRelu into ops that ONNX Runtime runs fast, in int8 above all.

ORT has no int8 PReLU kernel, and its float PRelu is slow: on a [1,128,56,56] tensor, 1 thread,
ORT 1.32 takes 2.0 ms where Mul+Max takes 0.12-0.16 ms. In a QDQ model each PRelu runs in float
between DequantizeLinear and QuantizeLinear (MobileFaceNet: 75% of the int8 time). Two exact
rewrites, chosen per node (``PreluSplitRecord.rewritten`` says which):

``absorb``: with a per-channel slope ``a``, ``PReLU(y) = ReLU(y) - a * ReLU(-y)``. The layer producing
``y`` emits ``[y; -y]`` (weights ``[W; -W]``, bias ``[b; -b]``) followed by a ReLU that ORT fuses, and
every reader absorbs the rest: weights ``[V, -a V]``. A grouped or depthwise producer becomes two
convs (``W`` and ``-W``), two ReLUs and a Concat: one conv with 2 outputs per group would leave ORT's
depthwise kernel for its generic grouped path, 30-75x slower in int8. For the same reason the readers
must be dense (Conv with group 1, Gemm, MatMul): a depthwise reader would need 2 inputs per group.
No activation pass at all, but both layers do twice the multiply-adds.

``max``: ``PReLU(y) = Max(y, a * y)`` where ``a <= 1``, ``Min(y, a * y)`` where ``a >= 1``. With both
kinds of channel (trained slopes run from -25 to 21 in MobileFaceNet), the channels with ``a > 1`` are
negated before (in the producer's weights) and after (in the readers' weights; a Mul by -1/1 where
they cannot take it): ``-Max(-y, -a y) = Min(y, a y)``. The Mul and Max nodes are listed in
``PreluSplitRecord.elementwise``: int8 keeps them in float (``onnxprune/quantization/prelu.py``).

``relu``, ``identity``, ``leaky``: a slope of 0 everywhere, 1 everywhere, or one value everywhere.

All are exact for any slope, negative included (float rounding only). A slope that is not a
constant float leaves the node as it is, with the reason in ``PreluSplitRecord.left``; so does a
node that cannot be absorbed when ``elementwise=False``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import onnx
import onnx_ir as ir

from ..graph.names import unique_name

LINEAR = ("Conv", "Gemm", "MatMul")  # producers whose output channels can be negated or doubled in the weights
STANDARD = ("", "ai.onnx")
_NAMES = "prelu_split.value_names"  # graph.meta key: value names in use while the pass runs
ModelT = TypeVar("ModelT", onnx.ModelProto, ir.Model)


@dataclass(frozen=True)
class PreluSplitRecord:
    rewritten: tuple[tuple[str, str], ...] = ()  # (PRelu node, pattern): absorb, max, relu, identity, leaky
    left: tuple[tuple[str, str], ...] = ()  # (PRelu node, why it was left as it is)
    # The Mul/Max/Min nodes ``max`` wrote. Keep them in float under int8: a QLinearMul quantizes the
    # slopes per tensor (MobileFaceNet's -25..21 in steps of 0.18: embedding cosine 0.66 instead of 0.88).
    elementwise: tuple[str, ...] = ()

    def by_pattern(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for node, pattern in self.rewritten:
            out.setdefault(pattern, []).append(node)
        return out


@dataclass
class PreluSplitResult(ir.passes.PassResult):
    record: PreluSplitRecord = field(default_factory=PreluSplitRecord)


@dataclass
class _Plan:
    prelu: ir.Node
    pattern: str
    slope: np.ndarray  # as stored in the model
    channels: np.ndarray | None = None  # the slope per output channel of ``producer`` (None: not per channel)
    producer: ir.Node | None = None  # a Conv/Gemm/MatMul with constant weights whose output only the PRelu reads


class PreluSplit(ir.passes.FunctionalPass):
    """Rewrite PRelu nodes exactly (see the module doc); the input model is not modified.

    ``only``: PRelu node names to rewrite (None: every one). ``absorb``: those allowed the ``absorb``
    pattern (None: every one whose readers can take it). ``elementwise=False`` leaves the nodes
    that cannot be absorbed instead of writing them as ``max``.
    """

    def __init__(self, only: frozenset[str] | None = None, *, absorb: frozenset[str] | None = None,
                 elementwise: bool = True) -> None:
        super().__init__()
        self.only = None if only is None else frozenset(only)
        self.absorb = None if absorb is None else frozenset(absorb)
        self.elementwise = elementwise

    def call(self, model: ir.Model) -> PreluSplitResult:
        model = model.clone()  # nodes and values copied; tensors shared (replaced here, never edited)
        done, left, elementwise = [], [], []
        for index, node in enumerate(list(model.graph)):
            if node.op_type != "PRelu" or node.domain not in STANDARD:
                continue
            node.name = node.name or f"PRelu_{index}"  # new nodes are named after it
            if self.only is not None and node.name not in self.only:
                continue
            absorb = self.absorb is None or node.name in self.absorb
            plan = _plan(node, absorb, self.elementwise)
            if isinstance(plan, str):
                left.append((node.name, plan))
                continue
            elementwise += _APPLY[plan.pattern](model.graph, plan) or []
            done.append((node.name, plan.pattern))
        model.graph.meta.pop(_NAMES, None)
        record = PreluSplitRecord(tuple(done), tuple(left), tuple(elementwise))
        return PreluSplitResult(model, bool(done), record)


def prelu_split(model: ModelT, only: frozenset[str] | None = None, *, absorb: frozenset[str] | None = None,
                elementwise: bool = True) -> tuple[ModelT, PreluSplitRecord]:
    """``model`` (ModelProto or ir.Model: the same type back) with its PRelu nodes rewritten (:class:`PreluSplit`)."""
    graph = ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model
    result = PreluSplit(only, absorb=absorb, elementwise=elementwise)(graph)
    out = ir.to_proto(result.model) if isinstance(model, onnx.ModelProto) else result.model
    return out, result.record


# ------------------------------------------------------------------------------------------- planning
def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _plan(prelu: ir.Node, absorb: bool, elementwise: bool) -> _Plan | str:
    """What to do with ``prelu``, or why it is left."""
    x = prelu.inputs[0]
    slope = _const(prelu.inputs[1]) if len(prelu.inputs) > 1 else None
    if x is None or slope is None or slope.size == 0:
        return "slope is not a constant"
    if slope.dtype.kind != "f" or not np.all(np.isfinite(slope)):
        return "slope is not a finite float"
    if np.all(slope == slope.flat[0]):
        value = float(slope.flat[0])
        return _Plan(prelu, {0.0: "relu", 1.0: "identity"}.get(value, "leaky"), slope)
    producer = _own_producer(x)
    channels = _per_channel(slope, producer) if producer is not None else None
    plan = _Plan(prelu, "max", slope, channels, producer)
    why = _why_not_absorbed(prelu, channels)
    if absorb and why is None:
        plan.pattern = "absorb"
        return plan
    return plan if elementwise else why or "not chosen for absorb"


def _own_producer(x: ir.Value) -> ir.Node | None:
    """The Conv/Gemm/MatMul making ``x`` if its weights are constant and only the PRelu reads ``x``."""
    node = x.producer()
    if node is None or node.op_type not in LINEAR or node.domain not in STANDARD:
        return None
    if len(x.uses()) != 1 or x.is_graph_output() or _channels(node) is None:
        return None
    return node


def _channels(node: ir.Node) -> int | None:
    """Output channels of a Conv/Gemm/MatMul whose weights (and bias) are constant; None otherwise."""
    w = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if w is None or (bias is not None and _const(bias) is None) or w.dtype.kind != "f":
        return None
    if node.op_type == "Conv":
        return w.shape[0] if w.ndim >= 3 else None
    if node.op_type == "MatMul":
        return w.shape[1] if w.ndim == 2 else None
    if w.ndim != 2:
        return None
    channels = w.shape[0] if node.attributes.get_int("transB", 0) else w.shape[1]
    if bias is not None and _const(bias).shape not in ((), (1,), (channels,), (1, channels)):
        return None  # a bias per row of the batch
    return channels


def _per_channel(slope: np.ndarray, producer: ir.Node) -> np.ndarray | None:
    """The slope as one value per output channel of ``producer``, if it varies along that axis only."""
    channels = _channels(producer)
    if producer.op_type == "Conv":
        rank, axis = producer.inputs[1].const_value.shape.rank(), 1
    elif producer.op_type == "Gemm":
        rank, axis = 2, 1
    else:  # MatMul: channels on the last axis, whatever the rank
        rank = max(slope.ndim, 1)
        axis = rank - 1
    if slope.ndim > rank:
        return None
    s = slope.reshape((1,) * (rank - slope.ndim) + slope.shape)
    if any(d != 1 for i, d in enumerate(s.shape) if i != axis) or s.shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(s.reshape(-1), (channels,)).astype(np.float64)


def _why_not_absorbed(prelu: ir.Node, channels: np.ndarray | None) -> str | None:
    out = prelu.outputs[0]
    if channels is None:
        return "no Conv/Gemm/MatMul of its own (constant weights, read only by it) makes its input"
    if out.is_graph_output():
        return "its output is a graph output"
    producer = prelu.inputs[0].producer()
    for use in out.uses():
        if not _dense_reader(use.node, out, producer):
            return f"read by {use.node.op_type} {use.node.name!r}, which cannot absorb it (dense Conv/Gemm/MatMul only)"
    return None


def _dense_reader(reader: ir.Node, value: ir.Value, producer: ir.Node) -> bool:
    """``reader`` is a dense Conv/Gemm/MatMul with constant weights reading ``value`` as its data input only."""
    if reader.domain not in STANDARD or reader.op_type not in LINEAR or reader.inputs[0] is not value:
        return False
    if any(i is value for i in reader.inputs[1:]) or _const(reader.inputs[1]) is None:
        return False
    w = _const(reader.inputs[1])
    if reader.op_type == "Conv":
        return producer.op_type == "Conv" and w.ndim >= 3 and reader.attributes.get_int("group", 1) == 1
    if reader.op_type == "Gemm" and reader.attributes.get_int("transA", 0):
        return False
    return producer.op_type != "Conv" and w.ndim == 2  # a Gemm/MatMul output has its channels last


# ------------------------------------------------------------------------------------------- graph helpers
def _initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name = _fresh(graph, base)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name),
                     shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(value)
    return value


def _set_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, suffix: str) -> None:
    """Point input ``index`` of ``node`` at a new initializer ``array``; drop the old one if now unread."""
    old = node.inputs[index]
    new = _initializer(graph, f"{old.name or node.name}.{suffix}", array.astype(old.const_value.numpy().dtype))
    node.replace_input_with(index, new)
    _drop_if_unused(graph, old)


def _drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    if value is not None and not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
        graph.initializers.pop(value.name)


def _out_axis(node: ir.Node) -> int:
    """Axis of the weight tensor that indexes output channels."""
    if node.op_type == "Conv" or (node.op_type == "Gemm" and node.attributes.get_int("transB", 0)):
        return 0
    return 1


def _in_scale(reader: ir.Node, per_channel: np.ndarray) -> np.ndarray:
    """``per_channel`` (one value per input channel of ``reader``) shaped to multiply its weights."""
    w = reader.inputs[1].const_value
    shape = tuple(w.shape)
    if reader.op_type == "Conv":
        groups = reader.attributes.get_int("group", 1)
        per_in, per_out = shape[1], shape[0] // groups
        channel = (np.arange(shape[0]) // per_out)[:, None] * per_in + np.arange(per_in)[None, :]
        return per_channel[channel].reshape(shape[:2] + (1,) * (len(shape) - 2))
    in_axis = 1 - _out_axis(reader) if reader.op_type == "Gemm" else 0
    return per_channel.reshape((-1, 1) if in_axis == 0 else (1, -1))


def _new_value(graph: ir.Graph, node: ir.Node, name: str, like: ir.Value, shape: ir.Shape | None = None) -> ir.Value:
    """``node``'s output, named ``name`` (made unique), typed and shaped like ``like`` (or ``shape``)."""
    out = node.outputs[0]
    out.name, out.type, out.shape = _fresh(graph, name), like.type, shape if shape is not None else like.shape
    return out


def _fresh(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_2``... if a value of the graph already has that name."""
    taken = graph.meta.get(_NAMES)
    if taken is None:
        taken = {v.name for n in graph for v in (*n.inputs, *n.outputs) if v is not None}
        taken |= set(graph.initializers) | {v.name for v in graph.inputs}
        graph.meta[_NAMES] = taken
    return unique_name(base, taken)


def _rewire(graph: ir.Graph, prelu: ir.Node, new: ir.Value) -> None:
    """``new`` takes over every use of the PRelu output (graph outputs included) and its name; PRelu removed."""
    old = prelu.outputs[0]
    name, shape, type_ = old.name, old.shape, old.type
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    _remove(graph, prelu)
    new.name, new.shape, new.type = name, shape, type_


def _remove(graph: ir.Graph, prelu: ir.Node) -> None:
    slope = prelu.inputs[1]
    graph.remove(prelu, safe=True)
    _drop_if_unused(graph, slope)


# ------------------------------------------------------------------------------------------- absorb
def _apply_absorb(graph: ir.Graph, plan: _Plan) -> None:
    producer, prelu = plan.producer, plan.prelu
    dense = producer.op_type != "Conv" or producer.attributes.get_int("group", 1) == 1
    rectified = _double_dense(graph, plan) if dense else _double_grouped(graph, plan)
    out = prelu.outputs[0]
    for use in list(out.uses()):
        reader = use.node
        v = reader.inputs[1].const_value.numpy().astype(np.float64)
        axis = 1 if reader.op_type == "Conv" else (1 - _out_axis(reader) if reader.op_type == "Gemm" else 0)
        _set_input(graph, reader, 1, np.concatenate([v, -_in_scale(reader, plan.channels) * v], axis=axis),
                   "prelu_split")
        reader.replace_input_with(0, rectified)
    _remove(graph, prelu)


def _doubled_shape(value: ir.Value, axis: int) -> ir.Shape | None:
    if value.shape is None:
        return None
    dims = list(value.shape)
    dims[axis] = 2 * dims[axis] if isinstance(dims[axis], int) else None
    return ir.Shape(dims)


def _double_dense(graph: ir.Graph, plan: _Plan) -> ir.Value:
    """One producer emitting ``[y; -y]``, then a Relu (fused by ORT); returns the Relu output."""
    producer = plan.producer
    axis = _out_axis(producer)
    w = producer.inputs[1].const_value.numpy()
    _set_input(graph, producer, 1, np.concatenate([w, -w], axis=axis), "prelu_split")
    if len(producer.inputs) > 2 and producer.inputs[2] is not None:
        b = np.broadcast_to(producer.inputs[2].const_value.numpy().reshape(-1), (w.shape[axis],))
        _set_input(graph, producer, 2, np.concatenate([b, -b]), "prelu_split")
    y = producer.outputs[0]
    y.shape = _doubled_shape(y, 1 if producer.op_type != "MatMul" else len(y.shape or [0, 0]) - 1)
    relu = ir.node("Relu", [y], name=plan.prelu.name)
    graph.insert_before(plan.prelu, relu)
    return _new_value(graph, relu, f"{plan.prelu.outputs[0].name}.split", y)


def _double_grouped(graph: ir.Graph, plan: _Plan) -> ir.Value:
    """A grouped/depthwise Conv kept, a negated copy beside it, a Relu after each, then Concat."""
    producer, name = plan.producer, plan.prelu.name
    y = producer.outputs[0]
    inputs = [producer.inputs[0]] + [_initializer(graph, f"{v.name or producer.name}.neg", -v.const_value.numpy())
                                     for v in producer.inputs[1:] if v is not None]
    twin = ir.node("Conv", inputs, {a.name: a for a in producer.attributes.values()}, name=f"{producer.name}.neg")
    _new_value(graph, twin, f"{y.name}.neg", y)
    relus = [ir.node("Relu", [v], name=f"{name}.{part}") for v, part in ((y, "pos"), (twin.outputs[0], "neg"))]
    for relu in relus:
        _new_value(graph, relu, f"{relu.inputs[0].name}.relu", y)
    concat = ir.node("Concat", [r.outputs[0] for r in relus], {"axis": 1}, name=name)
    graph.insert_before(plan.prelu, [twin, *relus, concat])
    return _new_value(graph, concat, f"{plan.prelu.outputs[0].name}.split", y, _doubled_shape(y, 1))


# ------------------------------------------------------------------------------------------- max / min
def _apply_max(graph: ir.Graph, plan: _Plan) -> list[str]:
    """Max(y, a y) (a <= 1), Min(y, a y) (a >= 1); with both kinds, sign-flipped channels (module doc)."""
    prelu, slope = plan.prelu, plan.slope
    flip = slope > 1  # channels computed as -Max(-y, -a y) = Min(y, a y)
    mixed = bool(flip.any() and not flip.all())
    made: list[str] = []
    x = _negate_in_producer(graph, plan, made) if mixed else prelu.inputs[0]
    mul = ir.node("Mul", [x, prelu.inputs[1]], name=f"{prelu.name}.mul")
    top = ir.node("Min" if flip.all() else "Max", [x, mul.outputs[0]], name=prelu.name)
    _new_value(graph, mul, f"{prelu.outputs[0].name}.scaled", x)
    _new_value(graph, top, f"{prelu.outputs[0].name}.signed", prelu.outputs[0])
    graph.insert_before(prelu, [mul, top])
    _rewire(graph, prelu, _negate_in_readers(graph, plan, top, made) if mixed else top.outputs[0])
    return [mul.name, top.name] + made


def _signs(plan: _Plan) -> np.ndarray:
    """-1 where the slope exceeds 1, else 1: per channel if known, else shaped like the slope."""
    return np.where((plan.channels if plan.channels is not None else plan.slope) > 1, -1.0, 1.0)


def _negate_in_producer(graph: ir.Graph, plan: _Plan, made: list[str]) -> ir.Value:
    """``sign * x``: in the producer's weights where it has its own, else a Mul."""
    x = plan.prelu.inputs[0]
    if plan.channels is None:
        return _sign_mul(graph, plan, x, f"{x.name}.signed", made, before=True)
    producer, s = plan.producer, _signs(plan)
    axis = _out_axis(producer)
    w = producer.inputs[1].const_value.numpy()
    _set_input(graph, producer, 1, w * s.reshape([-1 if i == axis else 1 for i in range(w.ndim)]), "prelu_sign")
    if len(producer.inputs) > 2 and producer.inputs[2] is not None:
        b = np.broadcast_to(producer.inputs[2].const_value.numpy().reshape(-1), s.shape)
        _set_input(graph, producer, 2, b * s, "prelu_sign")
    return x


def _negate_in_readers(graph: ir.Graph, plan: _Plan, top: ir.Node, made: list[str]) -> ir.Value:
    """The PRelu's value from ``top`` (``sign * PReLU``): the readers' weights take the sign, else a Mul."""
    out, m = plan.prelu.outputs[0], top.outputs[0]
    producer = plan.prelu.inputs[0].producer()
    foldable = plan.channels is not None and not out.is_graph_output() and all(
        _folds_sign(u.node, out, producer) for u in out.uses())
    if not foldable:
        return _sign_mul(graph, plan, m, out.name, made, before=False)
    for use in list(out.uses()):
        reader = use.node
        v = reader.inputs[1].const_value.numpy()
        _set_input(graph, reader, 1, v * _in_scale(reader, _signs(plan)), "prelu_sign")
        reader.replace_input_with(0, m)
    return m


def _folds_sign(reader: ir.Node, value: ir.Value, producer: ir.Node) -> bool:
    """A Conv (any group) / Gemm / MatMul reading ``value`` as data only, with constant weights."""
    if reader.op_type == "Conv" and reader.domain in STANDARD and reader.inputs[0] is value:
        w = _const(reader.inputs[1])
        return w is not None and w.ndim >= 3 and producer.op_type == "Conv" and all(
            i is not value for i in reader.inputs[1:])
    return _dense_reader(reader, value, producer)


def _sign_mul(graph: ir.Graph, plan: _Plan, x: ir.Value, name: str, made: list[str], before: bool) -> ir.Value:
    prelu = plan.prelu
    sign = np.where(plan.slope > 1, -1.0, 1.0).astype(plan.slope.dtype)  # shaped like the slope: same broadcast
    mul = ir.node("Mul", [x, _initializer(graph, f"{prelu.name}.sign", sign)],
                  name=f"{prelu.name}.sign_{'in' if before else 'out'}")
    graph.insert_before(prelu, mul) if before else graph.insert_after(prelu, mul)
    made.append(mul.name)
    return _new_value(graph, mul, name, x)


# ------------------------------------------------------------------------------------------- trivial
def _apply_relu(graph: ir.Graph, plan: _Plan) -> None:
    _replace_op(graph, plan, "Relu", {})


def _apply_leaky(graph: ir.Graph, plan: _Plan) -> None:
    _replace_op(graph, plan, "LeakyRelu", {"alpha": float(plan.slope.flat[0])})


def _apply_identity(graph: ir.Graph, plan: _Plan) -> None:
    x, out = plan.prelu.inputs[0], plan.prelu.outputs[0]
    if out.is_graph_output() or x.is_graph_input() or x.is_graph_output():
        _replace_op(graph, plan, "Identity", {})  # the output keeps its own name
        return
    out.replace_all_uses_with(x)
    _remove(graph, plan.prelu)


def _replace_op(graph: ir.Graph, plan: _Plan, op_type: str, attributes: dict) -> None:
    node = ir.node(op_type, [plan.prelu.inputs[0]], attributes, name=plan.prelu.name)
    graph.insert_before(plan.prelu, node)
    _rewire(graph, plan.prelu, node.outputs[0])


_APPLY = {"absorb": _apply_absorb, "max": _apply_max, "relu": _apply_relu, "identity": _apply_identity,
          "leaky": _apply_leaky}
