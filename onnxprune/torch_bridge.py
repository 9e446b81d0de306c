"""A small ONNX -> PyTorch interpreter, so gradient criteria and distillation can train an ONNX graph.

Why not a converter (onnx2torch and the like): we never need a torch *architecture*, only the ONNX
graph evaluated with autograd, its float initializers as trainable parameters, and the trained
values written back into the *same* graph (:func:`write_back`). Interpreting node by node keeps
the graph structure untouched, needs no code generation and covers what face models use.

* every float initializer is an ``nn.Parameter`` (``module.params[module.param_key[name]]``),
  integer initializers and Constant node values are buffers;
* :meth:`OnnxModule.forward` runs the nodes in topological order and returns the graph outputs as
  a tuple; :meth:`OnnxModule.run` can also hand back chosen intermediate tensors (still attached to
  the autograd graph) for activation-based criteria;
* shape arithmetic (Shape, Gather, Slice, Concat of int64 tensors...) runs eagerly in torch, so
  computed Reshape shapes and Resize sizes work at any input size;
* the module follows ``.double()``: float constants, Cast-to-float and ConstantOfShape use the
  parameters' float dtype, so float64 gradient checks are possible.

This module imports torch at top level; import it lazily from code that must work without torch.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from .graph.names import unique_name
from .graph.runtime import fixed_batch

__all__ = ["OnnxModule", "to_torch", "write_back", "SUPPORTED_OPS"]

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}

_OPS: dict[str, Callable[..., Any]] = {}


def _op(*names: str):
    def register(fn):
        for n in names:
            _OPS[n] = fn
        return fn
    return register


def _proto(model: onnx.ModelProto | ir.Model) -> onnx.ModelProto:
    return ir.to_proto(model) if isinstance(model, ir.Model) else model


def _sanitize(name: str, taken: set[str]) -> str:
    key = re.sub(r"\W", "_", name) or "_"
    if key[0].isdigit():
        key = "_" + key
    return unique_name(key, taken)


def _topological(nodes: Sequence[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's order; ONNX requires sorted graphs but we do not rely on it."""
    ready = set(available) | {""}
    pending = list(nodes)
    order: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in ready})
            raise ValueError(f"graph is not a DAG or reads undefined tensors: {missing[:5]}")
        pending = rest
    return order


class _Node:
    """A node with its attributes decoded once."""

    __slots__ = ("op", "name", "inputs", "outputs", "attrs", "index")

    def __init__(self, node: onnx.NodeProto, index: int) -> None:
        self.op = node.op_type
        self.name = node.name
        self.inputs = list(node.input)
        self.outputs = list(node.output)
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.index = index
        for k, v in list(self.attrs.items()):
            if isinstance(v, bytes):
                self.attrs[k] = v.decode()


class OnnxModule(torch.nn.Module):
    """An ONNX graph evaluated by torch, float initializers as parameters.

    ``param_key`` maps initializer names to keys of :attr:`params`; ``input_names`` and
    ``output_names`` are the graph interface. ``forward(*inputs)`` returns a tuple of outputs.
    """

    def __init__(self, model: onnx.ModelProto | ir.Model) -> None:
        super().__init__()
        proto = _proto(model)
        graph = proto.graph
        for n in graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
                raise NotImplementedError(f"torch bridge: op {n.op_type} with a subgraph is not supported")
            if n.domain not in ("", "ai.onnx"):
                raise NotImplementedError(f"torch bridge: op {n.domain}.{n.op_type} is not supported")
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.params = torch.nn.ParameterDict()
        self.param_key: dict[str, str] = {}
        self._buffer_key: dict[str, str] = {}
        taken: set[str] = set()
        init_names = set()
        for init in graph.initializer:
            init_names.add(init.name)
            arr = numpy_helper.to_array(init)
            if init.data_type in _FLOAT_TYPES:
                key = _sanitize(init.name, taken)
                self.params[key] = torch.nn.Parameter(torch.tensor(np.array(arr, dtype=arr.dtype)))
                self.param_key[init.name] = key
            else:
                key = _sanitize("buf_" + init.name, taken)
                self.register_buffer(key, _int_tensor(arr))
                self._buffer_key[init.name] = key
        self.input_names = [i.name for i in graph.input if i.name not in init_names]
        self.output_names = [o.name for o in graph.output]
        # Batch fixed to 1 (official detector exports): run() feeds such a graph one sample at a time,
        # as ORT must be fed (graph/runtime.py ``pieces``); its Reshapes may bake the 1 in.
        self.one_by_one = bool(self.input_names) and fixed_batch(proto, self.input_names[0])
        order = _topological(list(graph.node), set(init_names) | set(self.input_names))
        self.nodes = [_Node(n, i) for i, n in enumerate(order)]
        for n in self.nodes:
            if n.op not in _OPS:
                raise NotImplementedError(f"torch bridge: unsupported op {n.op} (node {n.name or '<unnamed>'})")
            if n.op == "Constant":  # decoded once; float values follow .double()
                key = _sanitize("const_" + n.outputs[0], taken)
                self.register_buffer(key, _constant_value(n.attrs))
                self._buffer_key[n.outputs[0]] = key
        # Last use of every tensor, so intermediates are released as soon as possible.
        self._last_use: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for name in n.inputs:
                self._last_use[name] = i
        for name in self.output_names:
            self._last_use[name] = len(self.nodes)

    # ---------------------------------------------------------------------------------------- running
    @property
    def float_dtype(self) -> torch.dtype:
        for p in self.params.values():
            if p.dtype.is_floating_point:
                return p.dtype
        return torch.float32

    def named_initializers(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        """(ONNX initializer name, parameter) pairs."""
        for name, key in self.param_key.items():
            yield name, self.params[key]

    def forward(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        outputs, _ = self.run(*inputs)
        return outputs

    def run(self, *inputs: Any, capture: Iterable[str] = (),
            transform: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
            ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """Outputs, plus the intermediate tensors named in ``capture`` (kept in the autograd graph).

        ``transform`` rewrites named tensors as they are produced, graph inputs included (e.g. fake
        quantization of activations while thresholds are trained: ORT quantizes the input too).

        A graph whose batch is fixed to 1 runs a batch sample by sample; outputs and captured tensors
        are concatenated along axis 0 (as ``run_all`` does for ORT), so gradients flow as for a batch.
        """
        transform, capture = transform or {}, list(capture)
        if len(inputs) == 1 and isinstance(inputs[0], dict):
            feeds = inputs[0]
        else:
            if len(inputs) != len(self.input_names):
                raise ValueError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
            feeds = dict(zip(self.input_names, inputs))
        first = feeds.get(self.input_names[0]) if self.input_names else None
        n = len(first) if self.one_by_one and first is not None and getattr(first, "ndim", 0) else 1
        if n > 1:
            runs = [self._run({k: v[i:i + 1] if len(v) == n else v for k, v in feeds.items()}, capture, transform)
                    for i in range(n)]
            cat = lambda ts: torch.cat(ts) if ts[0].dim() else ts[0]  # noqa: E731  (0-d: no batch axis)
            outputs = tuple(cat([r[0][k] for r in runs]) for k in range(len(self.output_names)))
            return outputs, {name: cat([r[1][name] for r in runs]) for name in runs[0][1]}
        return self._run(feeds, capture, transform)

    def _run(self, feeds: Mapping[str, Any], capture: Iterable[str],
             transform: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]
             ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        fdt = self.float_dtype
        env: dict[str, Any] = {}
        for name in self.input_names:
            x = feeds[name]
            x = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
            env[name] = x.to(fdt) if x.dtype.is_floating_point else x
            if name in transform:
                env[name] = transform[name](env[name])
        for name, key in self.param_key.items():
            env[name] = self.params[key]
        for name, key in self._buffer_key.items():
            env[name] = getattr(self, key)
        capture = set(capture)
        captured: dict[str, torch.Tensor] = {}
        protected = set(self.input_names) | set(self.param_key) | set(self._buffer_key) | capture
        ctx = _Ctx(self.opset, fdt)
        for i, n in enumerate(self.nodes):
            if n.op == "Constant":
                continue  # its value is a buffer, already in env
            args = [env[name] if name else None for name in n.inputs]
            try:
                result = _OPS[n.op](ctx, n, *args)
            except NotImplementedError:
                raise
            except Exception as exc:
                raise RuntimeError(f"torch bridge: {n.op} node {n.name or n.outputs[0]} failed: {exc}") from exc
            if not isinstance(result, (tuple, list)):
                result = (result,)
            for name, value in zip(n.outputs, result):
                if name:
                    if name in transform:
                        value = transform[name](value)
                    env[name] = value
                    if name in capture:
                        captured[name] = value
            for name in n.inputs:  # free what no later node reads
                if name and self._last_use.get(name) == i and name not in protected:
                    env.pop(name, None)
        return tuple(env[name] for name in self.output_names), captured


def _int_tensor(arr: np.ndarray) -> torch.Tensor:
    arr = np.array(arr)
    if arr.dtype == np.uint64 or arr.dtype == np.uint32 or arr.dtype == np.uint16:
        arr = arr.astype(np.int64)
    return torch.from_numpy(arr.copy())


def _constant_value(attrs: dict[str, Any]) -> torch.Tensor:
    if "value" in attrs:
        return _int_tensor(numpy_helper.to_array(attrs["value"]))
    if "value_float" in attrs:
        return torch.tensor(attrs["value_float"], dtype=torch.float32)
    if "value_floats" in attrs:
        return torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)
    if "value_int" in attrs:
        return torch.tensor(attrs["value_int"], dtype=torch.int64)
    if "value_ints" in attrs:
        return torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)
    raise NotImplementedError(f"torch bridge: op Constant with attributes {sorted(attrs)}")


class _Ctx:
    __slots__ = ("opset", "fdt")

    def __init__(self, opset: int, fdt: torch.dtype) -> None:
        self.opset = opset
        self.fdt = fdt


def _ints(t: Any) -> list[int]:
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def _floats(t: Any) -> list[float]:
    if isinstance(t, torch.Tensor):
        return [float(v) for v in t.detach().reshape(-1).tolist()]
    return [float(v) for v in t]


# ------------------------------------------------------------------------------------------ convolution
def _same_pads(in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
               mode: str) -> list[int]:
    begins, ends = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else large)
        ends.append(large if mode == "SAME_UPPER" else small)
    return begins + ends


def _pads(n: _Node, x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    nd = len(kernel)
    auto = n.attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(list(x.shape[2:]), kernel, strides, dilations, auto)
    if auto == "VALID":
        return [0] * (2 * nd)
    return list(n.attrs.get("pads", [0] * (2 * nd)))


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] (spatial axes) -> F.pad order (last axis first)."""
    nd = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(nd)):
        out += [pads[i], pads[i + nd]]
    return out


def _sym(pads: Sequence[int]) -> list[int] | None:
    nd = len(pads) // 2
    return list(pads[:nd]) if list(pads[:nd]) == list(pads[nd:]) else None


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv_geometry(n: _Node, w) -> tuple[int, list[int], list[int], list[int]]:
    """Spatial rank, kernel, strides and dilations of a Conv/ConvTranspose node (ONNX defaults)."""
    nd = w.dim() - 2
    return (nd, list(n.attrs.get("kernel_shape", w.shape[2:])), list(n.attrs.get("strides", [1] * nd)),
            list(n.attrs.get("dilations", [1] * nd)))


@_op("Conv")
def _conv(c: _Ctx, n: _Node, x, w, b=None):
    nd, kernel, strides, dil = _conv_geometry(n, w)
    pads = _pads(n, x, kernel, strides, dil)
    sym = _sym(pads)
    if sym is None:
        x = F.pad(x, _torch_pad(pads))
        sym = [0] * nd
    return _CONV[nd](x, w, b, strides, sym, dil, int(n.attrs.get("group", 1)))


@_op("ConvTranspose")
def _conv_transpose(c: _Ctx, n: _Node, x, w, b=None):
    nd, kernel, strides, dil = _conv_geometry(n, w)
    out_pad = list(n.attrs.get("output_padding", [0] * nd))
    group = int(n.attrs.get("group", 1))
    y = _CONVT[nd](x, w, None, strides, 0, 0, group, dil)
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(x.shape[2:], strides, kernel, dil)]
    auto = n.attrs.get("auto_pad", "NOTSET")
    if "output_shape" in n.attrs:
        target = list(n.attrs["output_shape"])[-nd:]
        begins, ends = [], []
        for f, op, t in zip(full, out_pad, target):
            total = f + op - t
            if auto == "SAME_UPPER":
                begins.append(total // 2); ends.append(total - total // 2)
            else:
                begins.append(total - total // 2); ends.append(total // 2)
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i, s, f, op in zip(x.shape[2:], strides, full, out_pad):
            total = max(0, f + op - i * s)
            if auto == "SAME_UPPER":
                begins.append(total // 2); ends.append(total - total // 2)
            else:
                begins.append(total - total // 2); ends.append(total // 2)
    else:
        pads = list(n.attrs.get("pads", [0] * (2 * nd))) if auto != "VALID" else [0] * (2 * nd)
        begins, ends = pads[:nd], pads[nd:]
    # Crop (negative F.pad) the padding away and extend by output_padding.
    y = F.pad(y, _torch_pad([-b_ for b_ in begins] + [op - e for op, e in zip(out_pad, ends)]))
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * nd)
    return y


# ------------------------------------------------------------------------------------------------ linear
@_op("Gemm")
def _gemm(c: _Ctx, n: _Node, a, b, cc=None):
    if n.attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if n.attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = a @ b
    alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if cc is not None:
        y = y + (cc * beta if beta != 1.0 else cc)
    return y


@_op("MatMul")
def _matmul(c: _Ctx, n: _Node, a, b):
    return torch.matmul(a, b)


# -------------------------------------------------------------------------------------------- elementwise
def _int_div(a, b):
    if a.dtype.is_floating_point or b.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _int_div, "Pow": torch.pow,
           "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
           "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or}


@_op(*_BINARY)
def _binary(c: _Ctx, n: _Node, a, b):
    if n.op == "Pow" and not b.dtype.is_floating_point and a.dtype.is_floating_point:
        b = b.to(a.dtype)
    return _BINARY[n.op](a, b)


_UNARY = {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Sqrt": torch.sqrt,
          "Neg": torch.neg, "Erf": torch.erf, "Floor": torch.floor, "Ceil": torch.ceil, "Abs": torch.abs,
          "Log": torch.log, "Reciprocal": torch.reciprocal, "Not": torch.logical_not, "Sign": torch.sign,
          "Softplus": F.softplus, "Round": torch.round}


@_op(*_UNARY)
def _unary(c: _Ctx, n: _Node, x):
    return _UNARY[n.op](x)


@_op("Sum", "Max", "Min", "Mean")
def _variadic(c: _Ctx, n: _Node, *xs):
    out = xs[0]
    for x in xs[1:]:
        out = {"Sum": torch.add, "Mean": torch.add, "Max": torch.maximum, "Min": torch.minimum}[n.op](out, x)
    return out / len(xs) if n.op == "Mean" else out


@_op("Where")
def _where(c: _Ctx, n: _Node, cond, a, b):
    return torch.where(cond.bool(), a, b)


@_op("PRelu")
def _prelu(c: _Ctx, n: _Node, x, slope):
    if slope.numel() == 1:
        return F.prelu(x, slope.reshape(1))
    if x.dim() >= 2 and slope.dim() < x.dim() and slope.numel() == x.shape[1]:
        aligned = [1] * (x.dim() - slope.dim()) + list(slope.shape)
        if aligned[1] == x.shape[1]:  # per-channel slope: the fast kernel
            return F.prelu(x, slope.reshape(-1))
    return torch.where(x >= 0, x, x * slope)  # general ONNX (numpy) broadcasting


@_op("LeakyRelu")
def _leaky(c: _Ctx, n: _Node, x):
    return F.leaky_relu(x, float(n.attrs.get("alpha", 0.01)))


@_op("Elu")
def _elu(c: _Ctx, n: _Node, x):
    return F.elu(x, float(n.attrs.get("alpha", 1.0)))


@_op("Celu")
def _celu(c: _Ctx, n: _Node, x):
    return F.celu(x, float(n.attrs.get("alpha", 1.0)))


@_op("Selu")
def _selu(c: _Ctx, n: _Node, x):
    alpha = float(n.attrs.get("alpha", 1.67326319217681884765625))
    gamma = float(n.attrs.get("gamma", 1.05070102214813232421875))
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@_op("Gelu")
def _gelu(c: _Ctx, n: _Node, x):
    approximate = n.attrs.get("approximate", "none")
    return F.gelu(x, approximate=approximate.decode() if isinstance(approximate, bytes) else approximate)


@_op("Mish")
def _mish(c: _Ctx, n: _Node, x):
    return F.mish(x)


@_op("Softsign")
def _softsign(c: _Ctx, n: _Node, x):
    return F.softsign(x)


@_op("ThresholdedRelu")
def _thresholded_relu(c: _Ctx, n: _Node, x):
    return torch.where(x > float(n.attrs.get("alpha", 1.0)), x, torch.zeros_like(x))


@_op("Hardmax")
def _hardmax(c: _Ctx, n: _Node, x):
    axis = int(n.attrs.get("axis", -1 if c.opset >= 13 else 1))
    if c.opset < 13:  # coerced to 2-D around axis, like Softmax before opset 13
        flat = x.reshape(int(np.prod(x.shape[:axis % x.dim()], dtype=np.int64)), -1)
        return _hardmax_last(flat).reshape(x.shape)
    return _hardmax_last(x.movedim(axis, -1)).movedim(-1, axis)


def _hardmax_last(x):
    return F.one_hot(x.argmax(-1), x.shape[-1]).to(x.dtype)  # first maximum wins, as in ONNX


@_op("Clip")
def _clip(c: _Ctx, n: _Node, x, lo=None, hi=None):
    if c.opset < 11:
        lo = n.attrs.get("min", None)
        hi = n.attrs.get("max", None)
    if isinstance(lo, torch.Tensor):
        lo = lo.reshape(()).to(x.dtype)
    if isinstance(hi, torch.Tensor):
        hi = hi.reshape(()).to(x.dtype)
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


@_op("HardSigmoid")
def _hard_sigmoid(c: _Ctx, n: _Node, x):
    alpha, beta = float(n.attrs.get("alpha", 0.2)), float(n.attrs.get("beta", 0.5))
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


@_op("HardSwish")
def _hard_swish(c: _Ctx, n: _Node, x):
    return x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


@_op("Softmax", "LogSoftmax")
def _softmax(c: _Ctx, n: _Node, x):
    fn = torch.softmax if n.op == "Softmax" else torch.log_softmax
    if c.opset >= 13:
        return fn(x, int(n.attrs.get("axis", -1)))
    axis = int(n.attrs.get("axis", 1)) % max(x.dim(), 1)
    shape = x.shape
    flat = x.reshape(int(np.prod(shape[:axis], dtype=np.int64)), -1)
    return fn(flat, 1).reshape(shape)


# ------------------------------------------------------------------------------------------ normalisation
@_op("BatchNormalization")
def _batchnorm(c: _Ctx, n: _Node, x, scale, bias, mean, var):
    eps = float(n.attrs.get("epsilon", 1e-5))
    if not (mean.requires_grad or var.requires_grad):
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
    # F.batch_norm cannot differentiate its running statistics: use the equivalent affine map.
    shape = [1, -1] + [1] * (x.dim() - 2)
    a = torch.rsqrt(var + eps) * scale
    return torch.addcmul((bias - mean * a).reshape(shape), x, a.reshape(shape))


@_op("InstanceNormalization")
def _instancenorm(c: _Ctx, n: _Node, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=float(n.attrs.get("epsilon", 1e-5)))


# ------------------------------------------------------------------------------------------------ pooling
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@_op("MaxPool")
def _maxpool(c: _Ctx, n: _Node, x):
    kernel = list(n.attrs["kernel_shape"])
    nd = len(kernel)
    strides = list(n.attrs.get("strides", [1] * nd))
    dil = list(n.attrs.get("dilations", [1] * nd))
    pads = _pads(n, x, kernel, strides, dil)
    ceil = bool(n.attrs.get("ceil_mode", 0))
    sym = _sym(pads)
    if sym is None or any(2 * p > k for p, k in zip(sym, kernel)):
        x = F.pad(x, _torch_pad(pads), value=-math.inf)
        sym = [0] * nd
    return _MAXPOOL[nd](x, kernel, strides, sym, dil, ceil_mode=ceil)


@_op("AveragePool")
def _avgpool(c: _Ctx, n: _Node, x):
    kernel = list(n.attrs["kernel_shape"])
    nd = len(kernel)
    strides = list(n.attrs.get("strides", [1] * nd))
    pads = _pads(n, x, kernel, strides, [1] * nd)
    ceil = bool(n.attrs.get("ceil_mode", 0))
    include = bool(n.attrs.get("count_include_pad", 0))
    if not any(pads):
        return _AVGPOOL[nd](x, kernel, strides, 0, ceil, True)
    sym = _sym(pads)
    if include and sym is not None and all(2 * p <= k for p, k in zip(sym, kernel)):
        return _AVGPOOL[nd](x, kernel, strides, sym, ceil, True)
    xp = F.pad(x, _torch_pad(pads))
    if include:
        return _AVGPOOL[nd](xp, kernel, strides, 0, ceil, True)
    ones = F.pad(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype), _torch_pad(pads))
    # Window sum / count of real values, as ORT computes it (int8 simulation hits exact .5 ties);
    # avg_pool1d has no divisor_override.
    divisor = (1,) if nd > 1 else ()
    return (_AVGPOOL[nd](xp, kernel, strides, 0, ceil, True, *divisor)
            / _AVGPOOL[nd](ones, kernel, strides, 0, ceil, True, *divisor))


@_op("GlobalAveragePool")
def _gap(c: _Ctx, n: _Node, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _gmp(c: _Ctx, n: _Node, x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("LpNormalization")
def _lp_norm(c: _Ctx, n: _Node, x):
    p, axis = int(n.attrs.get("p", 2)), int(n.attrs.get("axis", -1))
    return x / torch.linalg.vector_norm(x, ord=p, dim=axis, keepdim=True)


@_op("GlobalLpPool")
def _glp(c: _Ctx, n: _Node, x):
    p = float(n.attrs.get("p", 2))
    return x.abs().pow(p).sum(dim=tuple(range(2, x.dim())), keepdim=True).pow(1.0 / p)


@_op("LpPool")
def _lp_pool(c: _Ctx, n: _Node, x):
    nd = x.dim() - 2
    if nd not in (1, 2) or n.attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") \
            or any(n.attrs.get("pads", [0] * 2 * nd)) or any(d != 1 for d in n.attrs.get("dilations", [1] * nd)) \
            or n.attrs.get("ceil_mode", 0):
        raise NotImplementedError("LpPool with padding, dilation or ceil_mode")
    kernel, p = list(n.attrs["kernel_shape"]), float(n.attrs.get("p", 2))
    pool = F.lp_pool1d if nd == 1 else F.lp_pool2d
    return pool(x.abs(), p, kernel, list(n.attrs.get("strides", [1] * nd)))  # ONNX strides default to 1


# ------------------------------------------------------------------------------------------- shape ops
@_op("Flatten")
def _flatten(c: _Ctx, n: _Node, x):
    axis = int(n.attrs.get("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    lead = int(np.prod(x.shape[:axis], dtype=np.int64))
    return x.reshape(lead, -1)


@_op("Reshape")
def _reshape(c: _Ctx, n: _Node, x, shape=None):
    dims = _ints(shape) if shape is not None else list(n.attrs["shape"])
    if not n.attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@_op("Transpose")
def _transpose(c: _Ctx, n: _Node, x):
    perm = n.attrs.get("perm")
    return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


@_op("Concat")
def _concat(c: _Ctx, n: _Node, *xs):
    xs = [x for x in xs if x is not None]
    dtype = xs[0].dtype
    return torch.cat([x.to(dtype) for x in xs], dim=int(n.attrs["axis"]))


@_op("Split")
def _split(c: _Ctx, n: _Node, x, split=None):
    axis = int(n.attrs.get("axis", 0))
    size = x.shape[axis]
    k = len(n.outputs)
    if split is not None:
        sizes = _ints(split)
    elif "split" in n.attrs:
        sizes = list(n.attrs["split"])
    else:
        k = int(n.attrs.get("num_outputs", k))
        chunk = -(-size // k)
        sizes = [chunk] * (size // chunk) + ([size % chunk] if size % chunk else [])
    return tuple(torch.split(x, sizes, dim=axis))


@_op("Slice")
def _slice(c: _Ctx, n: _Node, x, starts=None, ends=None, axes=None, steps=None):
    if c.opset < 10:
        starts, ends, axes = n.attrs["starts"], n.attrs["ends"], n.attrs.get("axes")
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = a + x.dim() if a < 0 else a
        rng = range(*slice(s, e, st).indices(x.shape[a]))
        if st > 0:
            x = x.narrow(a, rng.start, len(rng)) if st == 1 else x.index_select(a, torch.arange(rng.start, rng.stop, st))
        else:
            x = x.index_select(a, torch.tensor(list(rng), dtype=torch.int64))
    return x


@_op("Squeeze")
def _squeeze(c: _Ctx, n: _Node, x, axes=None):
    axes = _ints(axes) if axes is not None else list(n.attrs.get("axes", []))
    if not axes:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    axes = sorted((a + x.dim()) % x.dim() for a in axes)
    for a in reversed(axes):
        x = x.squeeze(a)
    return x


@_op("Unsqueeze")
def _unsqueeze(c: _Ctx, n: _Node, x, axes=None):
    axes = _ints(axes) if axes is not None else list(n.attrs["axes"])
    rank = x.dim() + len(axes)
    for a in sorted((a + rank) % rank for a in axes):
        x = x.unsqueeze(a)
    return x


@_op("Shape")
def _shape(c: _Ctx, n: _Node, x):
    dims = list(x.shape)
    start, end = int(n.attrs.get("start", 0)), n.attrs.get("end")
    dims = dims[start:] if end is None else dims[start:int(end)]
    return torch.tensor(dims, dtype=torch.int64)


@_op("Size")
def _size(c: _Ctx, n: _Node, x):
    return torch.tensor(x.numel(), dtype=torch.int64)


@_op("Gather")
def _gather(c: _Ctx, n: _Node, data, idx):
    axis = int(n.attrs.get("axis", 0))
    axis = axis + data.dim() if axis < 0 else axis
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))


@_op("Cast")
def _cast(c: _Ctx, n: _Node, x):
    to = int(n.attrs["to"])
    if to in _FLOAT_TYPES:
        return x.to(c.fdt)
    if to not in _TORCH_DTYPES:
        raise NotImplementedError(f"torch bridge: op Cast to type {to}")
    return x.to(_TORCH_DTYPES[to])


@_op("Constant")
def _constant(c: _Ctx, n: _Node):  # values are registered as buffers and read from env
    raise AssertionError("Constant nodes are pre-evaluated")


@_op("ConstantOfShape")
def _constant_of_shape(c: _Ctx, n: _Node, shape):
    value = n.attrs.get("value")
    if value is None:
        v = torch.zeros((), dtype=c.fdt)
    else:
        v = _int_tensor(numpy_helper.to_array(value)).reshape(())
        if v.dtype.is_floating_point:
            v = v.to(c.fdt)
    return v.expand(_ints(shape)).clone()


@_op("Identity")
def _identity(c: _Ctx, n: _Node, x):
    return x


@_op("Dropout")
def _dropout(c: _Ctx, n: _Node, x, *rest):
    return (x, torch.ones_like(x, dtype=torch.bool)) if len(n.outputs) > 1 else x


@_op("Expand")
def _expand(c: _Ctx, n: _Node, x, shape):
    dims = _ints(shape)
    return x * torch.ones(dims, dtype=x.dtype) if x.dtype.is_floating_point else x.expand(
        torch.broadcast_shapes(tuple(x.shape), tuple(dims))).clone()


@_op("Tile")
def _tile(c: _Ctx, n: _Node, x, repeats):
    return x.repeat(*_ints(repeats))


_REDUCE = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin,
           "ReduceProd": None,
           "ReduceL1": lambda x, dim, keepdim: x.abs().sum(dim=dim, keepdim=keepdim),
           "ReduceL2": lambda x, dim, keepdim: torch.sqrt((x * x).sum(dim=dim, keepdim=keepdim)),
           "ReduceSumSquare": lambda x, dim, keepdim: (x * x).sum(dim=dim, keepdim=keepdim),
           "ReduceLogSum": lambda x, dim, keepdim: torch.log(x.sum(dim=dim, keepdim=keepdim)),
           "ReduceLogSumExp": torch.logsumexp}


def _reduce_prod(x, dim, keepdim):
    for d in sorted(dim, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keepdim)
    return x


_REDUCE["ReduceProd"] = _reduce_prod


@_op(*_REDUCE)
def _reduce(c: _Ctx, n: _Node, x, axes=None):
    axes_from_input = n.op == "ReduceSum" and c.opset >= 13 or c.opset >= 18
    axes = (_ints(axes) if axes is not None else []) if axes_from_input else list(n.attrs.get("axes", []))
    keep = bool(n.attrs.get("keepdims", 1))
    if not axes:
        if n.attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    axes = tuple(sorted(a % x.dim() for a in axes))
    return _REDUCE[n.op](x, dim=axes, keepdim=keep)


@_op("Pad")
def _pad(c: _Ctx, n: _Node, x, pads=None, value=None, axes=None):
    if c.opset < 11:
        pads, value = list(n.attrs["pads"]), float(n.attrs.get("value", 0.0))
    else:
        pads = _ints(pads)
        value = float(value.reshape(-1)[0]) if value is not None and value.numel() else 0.0
    rank = x.dim()
    if axes is not None:
        ax = [(a + rank) % rank for a in _ints(axes)]
        full = [0] * (2 * rank)
        for i, a in enumerate(ax):
            full[a], full[a + rank] = pads[i], pads[i + len(ax)]
        pads = full
    mode = n.attrs.get("mode", "constant")
    tp = _torch_pad(pads)
    if mode == "constant":
        return F.pad(x, tp, value=value)
    while tp and tp[-1] == 0 and tp[-2] == 0:  # reflect/replicate pad trailing dims only
        tp = tp[:-2]
    if not tp:
        return x
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    k = len(tp) // 2
    lead = x.shape[: rank - k]
    y = x.reshape((1, -1) + tuple(x.shape[rank - k:]))  # batch-and-channel form F.pad expects
    y = F.pad(y, tp, mode=torch_mode)
    return y.reshape(tuple(lead) + tuple(y.shape[2:]))


# -------------------------------------------------------------------------------------------------- Resize
def _source_coords(out: int, size: int, scale: float, mode: str) -> torch.Tensor:
    x = torch.arange(out, dtype=torch.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "align_corners":
        return x * (size - 1) / (out - 1) if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adj = out / (scale * size)
        center = size / 2 * (1 - adj)
        return center + (x + 0.5) / scale - 0.5
    raise NotImplementedError(f"torch bridge: op Resize with coordinate_transformation_mode {mode}")


def _nearest(coords: torch.Tensor, mode: str, size: int) -> torch.Tensor:
    if mode == "round_prefer_floor":
        idx = torch.where(coords - torch.floor(coords) == 0.5, torch.floor(coords), torch.round(coords))
    elif mode == "round_prefer_ceil":
        idx = torch.where(coords - torch.floor(coords) == 0.5, torch.ceil(coords), torch.round(coords))
    elif mode == "floor":
        idx = torch.floor(coords)
    elif mode == "ceil":
        idx = torch.ceil(coords)
    else:
        raise NotImplementedError(f"torch bridge: op Resize with nearest_mode {mode}")
    return idx.clamp(0, size - 1).to(torch.int64)


def _resize(x: torch.Tensor, scales: list[float] | None, sizes: list[int] | None, mode: str, coord: str,
            nearest_mode: str) -> torch.Tensor:
    if sizes is not None:
        out_sizes = list(sizes)
        scales = [o / i for o, i in zip(out_sizes, x.shape)]
    else:
        assert scales is not None
        out_sizes = [int(math.floor(i * s)) for i, s in zip(x.shape, scales)]
    for axis, (size, out, scale) in enumerate(zip(x.shape, out_sizes, scales)):
        if out == size and scale == 1.0:
            continue
        coords = _source_coords(out, size, scale, coord)
        if mode == "nearest":
            x = x.index_select(axis, _nearest(coords, nearest_mode, size))
        elif mode == "linear":
            coords = coords.clamp(0, size - 1)
            lo = torch.floor(coords).to(torch.int64)
            hi = (lo + 1).clamp(max=size - 1)
            w = (coords - lo.to(torch.float64)).to(x.dtype)
            shape = [1] * x.dim()
            shape[axis] = out
            w = w.reshape(shape)
            x = x.index_select(axis, lo) * (1 - w) + x.index_select(axis, hi) * w
        else:
            raise NotImplementedError(f"torch bridge: op Resize with mode {mode}")
    return x


@_op("Resize")
def _resize_op(c: _Ctx, n: _Node, x, roi=None, scales=None, sizes=None):
    mode = n.attrs.get("mode", "nearest")
    if c.opset < 11:  # Resize-10: (X, scales), asymmetric coordinates
        return _resize(x, _floats(roi), None, mode, "asymmetric", "floor")
    if "axes" in n.attrs or n.attrs.get("antialias", 0):
        raise NotImplementedError("torch bridge: op Resize with axes/antialias")
    coord = n.attrs.get("coordinate_transformation_mode", "half_pixel")
    if coord == "tf_crop_and_resize":
        raise NotImplementedError("torch bridge: op Resize with tf_crop_and_resize")
    nearest_mode = n.attrs.get("nearest_mode", "round_prefer_floor")
    s = _floats(scales) if scales is not None and scales.numel() else None
    z = _ints(sizes) if sizes is not None and sizes.numel() else None
    return _resize(x, s, z, mode, coord, nearest_mode)


@_op("Upsample")
def _upsample(c: _Ctx, n: _Node, x, scales=None):
    s = _floats(scales) if scales is not None else list(n.attrs["scales"])
    mode = n.attrs.get("mode", "nearest")
    mode = "linear" if mode in ("bilinear", "linear") else mode
    return _resize(x, s, None, mode, "asymmetric", "floor")


SUPPORTED_OPS = frozenset(_OPS)


# -------------------------------------------------------------------------------------------- public API
def to_torch(model: onnx.ModelProto | ir.Model) -> OnnxModule:
    """An :class:`OnnxModule` evaluating ``model`` (raises NotImplementedError on an unsupported op)."""
    return OnnxModule(model)


def write_back(module: OnnxModule, model: ir.Model | onnx.ModelProto) -> ir.Model | onnx.ModelProto:
    """A copy of ``model`` whose float initializers hold the module's current parameter values.

    The graph (nodes, names, interface) is unchanged; values keep their original dtype and shape.
    Returns the same type it was given (onnx_ir.Model or ModelProto).
    """
    as_proto = isinstance(model, onnx.ModelProto)
    out = ir.from_proto(model) if as_proto else model.clone()
    values = {name: p.detach().cpu().numpy() for name, p in module.named_initializers()}
    for name, value in out.graph.initializers.items():
        if name not in values or value.const_value is None:
            continue
        old = value.const_value
        new = values[name].astype(old.dtype.numpy(), copy=False).reshape(tuple(old.shape.numpy()))
        value.const_value = ir.tensor(np.ascontiguousarray(new), name=name)
    return ir.to_proto(out) if as_proto else out
