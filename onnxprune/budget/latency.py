"""A measured latency cost model: what each Conv/Gemm/MatMul costs at a given (c_in, c_out) width.

Why measured and not MACs: ONNX Runtime's CPU kernels are not proportional to MACs. Its NCHWc
convolutions (ORT 1.32, AVX-512 here) take a dense conv's input channels only up to 16 or in
multiples of 4, a depthwise conv's channels only in multiples of 4; off those a conv falls back to
plain NCHW kernels: a depthwise 3x3 on 30 channels at 80x80 took 1.2 ms where 32 channels took
0.05 ms (see also ``benchmarks/channel_rounding.py``).
In int8, a depthwise conv on 62 channels took 3x the time of 64, and layers under 16 channels are
left in float (``onnxprune/quantization/latency.py``). So, as in NetAdapt and HALP, each layer is
timed alone at the widths the allocator asks about, once, and the times are kept in a lookup table
(:class:`LatencyTable`: memoised, cached on disk per execution provider, threads, int8, ONNX
Runtime version and CPU model).

What is timed (:func:`measure_layer`): a one-layer model (the layer and the activation it feeds
alone; int8: the QDQ form ORT's quantizer writes, which ORT turns into QLinearConv/QGemm/
QLinearMatMul) on the target, ORT_ENABLE_ALL, ORT's profiler on: the time of the layer's compute
kernel (the conv or matrix product, with any activation ORT fused into it), median over runs, the
least of two measurements taken apart in time.

:class:`LatencyModel` turns the table into a whole-model prediction. The original is measured once
whole, and ORT's profile of it says what each layer takes in place (with the real graph's data:
ORT's PRelu, for one, runs 10x slower on inputs of random sign than of one sign). A narrower layer
then takes its in-place compute time scaled by the table's ratio new/original, plus its other
kernels (unfused activation, int8 (de)quantization) scaled by the share of channels kept; what no
layer accounts for (Add, Concat, Resize, heads, reorders) shrinks with the share of activations kept.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ..bench import interleaved_times
from ..errors import ConfigError
from ..graph.io import ModelLike, load_proto
from ..graph import runtime
from ..graph.shapes import Shape, infer_concrete_shapes, random_inputs
from ..graph.skeleton import skeleton
from ..progress import Progress, log_progress
from ..quantization import latency as int8_rules

logger = logging.getLogger("onnxprune")

CACHE_FORMAT = "onnxprune-latency"
CACHE_VERSION = 1  # of the file format
MEASURE_VERSION = 3  # of what measure_layer times: part of every key, bump it when that changes
LAYER_OPS = ("Conv", "Gemm", "MatMul")
# Unary ops built into a one-layer model after its layer when the layer feeds one alone, so that ORT fuses
# into the conv what it fuses in the model (and picks the same kernels).
ACTIVATIONS = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "Tanh", "PRelu", "HardSwish", "Elu")
# The kernels of a layer that the table times: the conv or matrix product as ORT runs it, activations it fused
# included. The layer's other kernels in a model (an activation ORT does not fuse, int8 (de)quantization
# around a float one, PRelu rewrites) are elementwise on its output: LatencyModel scales their measured
# in-place time with c_out instead.
COMPUTE_OPS = frozenset({"Conv", "FusedConv", "NhwcConv", "NhwcFusedConv", "QLinearConv", "ConvInteger", "Gemm",
                         "FusedGemm", "QGemm", "MatMul", "FusedMatMul", "QLinearMatMul", "MatMulInteger",
                         "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
# Kernels no layer pays inside a chain (layout changes, float<->int8 at a one-layer model's edges): not counted
# when a provider reports no COMPUTE_OPS kernel and the rest is taken instead.
BOUNDARY_OPS = frozenset({"ReorderInput", "ReorderOutput", "QuantizeLinear", "DequantizeLinear", "Transpose"})
OPSET = 17


# ----------------------------------------------------------------------------------------------- target
@dataclass(frozen=True)
class LatencyTarget:
    """Where latency is measured: ORT execution providers (in order), intra-op threads, int8 or float."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 1
    int8: bool = False

    def __post_init__(self) -> None:
        providers = (self.providers,) if isinstance(self.providers, str) else tuple(self.providers)
        object.__setattr__(self, "providers", providers)
        if not providers:
            raise ConfigError("a latency target needs at least one execution provider")
        available = ort.get_available_providers()
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise ConfigError(f"execution provider {unknown[0]} is not available in this onnxruntime build; "
                              f"available: {', '.join(available)}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"latency threads must be an integer >= 1, got {self.threads!r}")
        object.__setattr__(self, "int8", bool(self.int8))

    def session(self, model: onnx.ModelProto, *, profile_dir: str | None = None) -> ort.InferenceSession:
        """A session on this target (ORT_ENABLE_ALL; CPU appended as fallback), optionally profiling;
        idle workers do not spin between runs: they would steal the cores being measured."""
        return runtime.session(model, self.threads, providers=self.providers, spinning=False,
                               profile_prefix=os.path.join(profile_dir, "layer") if profile_dir is not None else None,
                               big_by_path=False)


# ----------------------------------------------------------------------------------------------- layer specs
@dataclass(frozen=True)
class LayerSpec:
    """Everything a layer's latency depends on except its two widths (c_in, c_out).

    Conv: ``batch`` is N and ``spatial`` the input's (H, W); Gemm/MatMul: ``batch`` is the number of
    rows the weight multiplies (product of the input's leading dims) and ``spatial`` is empty.
    ``depthwise``: group == c_in (c_out == c_in, or a multiple of it); otherwise ``group`` is fixed.
    ``activation`` is the op the layer's output feeds alone (timed with it), ``activation_args``
    its float attributes (LeakyRelu/Elu alpha, HardSigmoid alpha and beta, Clip min and max).
    """

    op_type: str
    spatial: tuple[int, ...] = ()
    batch: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    group: int = 1
    depthwise: bool = False
    activation: str | None = None
    activation_args: tuple[float, ...] = ()
    dtype: str = "float32"

    def groups(self, c_in: int) -> int:
        """The conv's group attribute at input width ``c_in``."""
        return c_in if self.depthwise else self.group

    def output_spatial(self) -> tuple[int, ...]:
        """Conv output spatial dims (explicit pads, or SAME_* auto_pad); () for Gemm/MatMul."""
        if self.op_type != "Conv":
            return ()
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            return tuple(math.ceil(h / s) for h, s in zip(self.spatial, self.strides))
        n = len(self.spatial)
        pads = self.pads if self.auto_pad == "NOTSET" else (0,) * 2 * n
        return tuple((h + pads[i] + pads[i + n] - self.dilations[i] * (self.kernel[i] - 1) - 1) // self.strides[i] + 1
                     for i, h in enumerate(self.spatial))


@dataclass(frozen=True)
class LayerWidths:
    """A layer of a model: its spec and its current widths."""

    spec: LayerSpec
    c_in: int
    c_out: int


def layer_specs(model: onnx.ModelProto | ir.Model, input_shapes: Mapping[str, Shape]) -> dict[str, LayerWidths]:
    """Every Conv/Gemm/MatMul with a constant weight, by node name (output name if unnamed), at
    the concrete ``input_shapes``. Reads a skeleton: the weights' values are never copied."""
    return _layers(skeleton(model), input_shapes)[0]


def _layers(proto: onnx.ModelProto, input_shapes: Mapping[str, Shape]
            ) -> tuple[dict[str, LayerWidths], dict[str, str]]:
    """(:func:`layer_specs`, aliases): every node and tensor name of a layer's conv, the BatchNormalization
    ORT folds into it and its activation, mapped to the layer (how ORT's profile is attributed)."""
    shapes = infer_concrete_shapes(proto, input_shapes)
    consts = _constant_dims(proto)
    dtypes = _constant_dtypes(proto)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in proto.graph.output}
    values = _constant_values(proto)
    found: dict[str, LayerWidths] = {}
    aliases: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2 or node.input[1] not in consts:
            continue
        layer = _layer(node, consts[node.input[1]], shapes.get(node.input[0]))
        if layer is None:
            continue
        chain = _followers(node, consumers, outputs)
        act, args = _activation(chain[-1], values) if len(chain) > 1 else (None, ())
        spec = LayerSpec(**{**asdict(layer.spec), "activation": act, "activation_args": args,
                            "dtype": dtypes.get(node.input[1], "float32")})
        name = node.name or node.output[0]
        found[name] = LayerWidths(spec, layer.c_in, layer.c_out)
        for n in chain:
            aliases.update({n.name: name, n.output[0]: name} if n.name else {n.output[0]: name})
    return found, aliases


def width_axes(op_type: str, trans_b: bool = False) -> tuple[int, int]:
    """(input axis, output axis) of a Conv/Gemm/MatMul weight: the layer's input width is the input
    axis's size (times a Conv's ``group``), its output width the output axis's size."""
    return (1, 0) if op_type == "Conv" or (op_type == "Gemm" and trans_b) else (0, 1)


def _widths(op_type: str, w: Sequence[int], attrs: Mapping) -> tuple[int, int]:
    i, o = width_axes(op_type, bool(attrs.get("transB", 0)))
    return w[i] * (int(attrs.get("group", 1)) if op_type == "Conv" else 1), w[o]


def layer_widths(model: onnx.ModelProto | ir.Model) -> dict[str, tuple[int, int]]:
    """(c_in, c_out) of every Conv/Gemm/MatMul with a constant weight, read from the weights alone.

    Names as in :func:`layer_specs`; that is how a pruned model (``slim`` keeps node names) is
    matched to its original's :class:`LatencyModel`.
    """
    proto = skeleton(model)
    consts = _constant_dims(proto)
    widths: dict[str, tuple[int, int]] = {}
    for node in proto.graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2 or node.input[1] not in consts:
            continue
        w = consts[node.input[1]]
        if len(w) >= 3 if node.op_type == "Conv" else len(w) == 2:
            widths[node.name or node.output[0]] = _widths(node.op_type, w, _attrs(node))
    return widths


def _layer(node: onnx.NodeProto, w: tuple[int, ...], x: Shape | None) -> LayerWidths | None:
    """The layer's spec (without activation) and widths; None for shapes this model does not cover."""
    attrs = _attrs(node)
    if x is None:
        return None
    if node.op_type == "Conv":
        if len(w) < 3 or len(x) != len(w):
            return None
        n = len(w) - 2
        group = int(attrs.get("group", 1))
        c_in, c_out = _widths("Conv", w, attrs)
        depthwise = group > 1 and w[1] == 1 and group == c_in
        spec = LayerSpec("Conv", tuple(x[2:]), x[0], tuple(attrs.get("kernel_shape", w[2:])),
                         tuple(attrs.get("strides", (1,) * n)), tuple(attrs.get("pads", (0,) * 2 * n)),
                         tuple(attrs.get("dilations", (1,) * n)), _text(attrs.get("auto_pad", "NOTSET")),
                         1 if depthwise else group, depthwise)
        return LayerWidths(spec, c_in, c_out)
    if len(w) != 2:
        return None
    if node.op_type == "Gemm":
        rows = x[1] if attrs.get("transA", 0) else x[0]
        return LayerWidths(LayerSpec("Gemm", (), rows), *_widths("Gemm", w, attrs))
    return LayerWidths(LayerSpec("MatMul", (), int(np.prod(x[:-1], dtype=np.int64)) if len(x) > 1 else 1),
                       *_widths("MatMul", w, attrs))


def _followers(node: onnx.NodeProto, consumers: Mapping[str, list[onnx.NodeProto]],
               outputs: set[str]) -> list[onnx.NodeProto]:
    """The layer node, then a BatchNormalization it feeds alone (ORT folds it) and the activation
    the result feeds alone, each when there is one."""
    chain = [node]
    after = consumers.get(node.output[0], [])
    if (node.op_type == "Conv" and len(after) == 1 and after[0].op_type == "BatchNormalization"
            and node.output[0] not in outputs):
        chain.append(after[0])
        after = consumers.get(after[0].output[0], [])
    if len(after) == 1 and chain[-1].output[0] not in outputs and after[0].op_type in ACTIVATIONS:
        chain.append(after[0])
    return chain


def _activation(act: onnx.NodeProto, values: Mapping[str, np.ndarray] | None = None
                ) -> tuple[str | None, tuple[float, ...]]:
    """(op type, float attributes) of an activation node (see :class:`LayerSpec`), at float32 precision."""
    if act.op_type not in ACTIVATIONS:
        return None, ()
    attrs = _attrs(act)
    args: tuple = ()
    if act.op_type in ("LeakyRelu", "Elu"):
        args = (attrs.get("alpha", 0.01 if act.op_type == "LeakyRelu" else 1.0),)
    elif act.op_type == "HardSigmoid":
        args = (attrs.get("alpha", 0.2), attrs.get("beta", 0.5))
    elif act.op_type == "Clip":
        values = values or {}
        bounds = [values.get(i) for i in act.input[1:3]] if len(act.input) > 1 else [attrs.get("min"), attrs.get("max")]
        bounds += [None] * (2 - len(bounds))
        args = tuple(float(np.asarray(b).reshape(-1)[0]) if b is not None else d
                     for b, d in zip(bounds, (-3.4e38, 3.4e38)))
    return act.op_type, tuple(float(f"{float(a):.7g}") for a in args)  # 0.2 stays 0.2, not 0.20000000298


def _constant_dims(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Dims of initializers and Constant outputs (a skeleton keeps dims of elided weights)."""
    dims = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output:
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                dims[n.output[0]] = tuple(value.dims)
    return dims


def _constant_dtypes(proto: onnx.ModelProto) -> dict[str, str]:
    """Numpy dtype names of float initializers and Constant outputs (a layer runs in its weight's type)."""
    tensors = [(t.name, t) for t in proto.graph.initializer]
    tensors += [(n.output[0], a.t) for n in proto.graph.node if n.op_type == "Constant" and n.output
                for a in n.attribute if a.name == "value"]
    return {name: np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name for name, t in tensors
            if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)}


def _constant_values(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Values of small constants (Clip bounds); elided weights are skipped."""
    values = {}
    for t in proto.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL and int(np.prod(t.dims, dtype=np.int64)) <= 16:
            values[t.name] = numpy_helper.to_array(t)
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output:
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None and int(np.prod(value.dims, dtype=np.int64)) <= 16:
                values[n.output[0]] = numpy_helper.to_array(value)
    return values


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------------------------- one-layer models
def layer_model(spec: LayerSpec, c_in: int, c_out: int, *, int8: bool = False, seed: int = 0) -> onnx.ModelProto:
    """The model timed for one table entry: the layer at (c_in, c_out) with random weights and its
    activation; ``int8``: the QDQ form ORT's quantizer writes (int8 symmetric per-channel weights,
    uint8 activations, Relu/Clip folded into the output range) for ORT to fuse into int8 kernels,
    from float32 whatever ``spec.dtype`` (int8 quantization starts from float32 models)."""
    _check_widths(spec, c_in, c_out)
    b = _Builder(np.random.default_rng(seed), int8)
    x_shape = [spec.batch, c_in, *spec.spatial]
    cur = b.quantized("x") if int8 else "x"
    if spec.op_type == "Conv":
        cur = b.conv(spec, cur, c_in, c_out)
    elif spec.op_type == "Gemm":
        cur = b.dense("Gemm", cur, c_in, c_out)
    elif spec.op_type == "MatMul":
        cur = b.dense("MatMul", cur, c_in, c_out)
    else:
        raise ValueError(f"no one-layer model for op {spec.op_type}")
    cur = b.activation(spec, cur, c_out)
    b.nodes.append(helper.make_node("Identity", [cur], ["y"], name="output"))
    elem = TensorProto.FLOAT
    graph = helper.make_graph(b.nodes, "layer", [helper.make_tensor_value_info("x", elem, x_shape)],
                              [helper.make_tensor_value_info("y", elem, [spec.batch, c_out, *spec.output_spatial()])],
                              b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxprune-latency")
    model.ir_version = 8
    return model if int8 or spec.dtype == "float32" else _cast_floats(model, np.dtype(spec.dtype))


def _check_widths(spec: LayerSpec, c_in: int, c_out: int) -> None:
    if c_in < 1 or c_out < 1:
        raise ValueError(f"widths must be positive, got ({c_in}, {c_out})")
    if spec.op_type == "Conv" and spec.depthwise and c_out % c_in:
        raise ValueError(f"a depthwise conv's c_out must be a multiple of c_in, got ({c_in}, {c_out})")
    if spec.op_type == "Conv" and not spec.depthwise and (c_in % spec.group or c_out % spec.group):
        raise ValueError(f"widths ({c_in}, {c_out}) are not divisible by the conv's {spec.group} groups")


class _Builder:
    """Nodes and initializers of a one-layer model; int8 adds the QDQ pairs ORT's quantizer would."""

    X_SCALE, X_ZERO = 0.05, 128  # uint8 activations, asymmetric: what ORT's x86 int8 kernels fuse

    def __init__(self, rng: np.random.Generator, int8: bool) -> None:
        self.rng, self.int8 = rng, int8
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def quantized(self, name: str) -> str:
        """``name`` through QuantizeLinear -> DequantizeLinear (uint8, per tensor)."""
        s = self.const(f"{name}_scale", np.float32(self.X_SCALE))
        z = self.const(f"{name}_zero", np.uint8(self.X_ZERO))
        self.nodes.append(helper.make_node("QuantizeLinear", [name, s, z], [f"{name}_q"], name=f"{name}_Q"))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", s, z], [f"{name}_dq"], name=f"{name}_DQ"))
        return f"{name}_dq"

    def weight(self, w: np.ndarray, axis: int) -> tuple[str, np.ndarray | None]:
        """The weight as given (float) or as int8 symmetric per-channel along ``axis`` through DequantizeLinear."""
        if not self.int8:
            return self.const("w", w.astype(np.float32)), None
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        scale = (np.abs(w).max(axis=reduce) / 127.0 + 1e-8).astype(np.float32)
        q = np.clip(np.round(w / np.expand_dims(scale, reduce)), -127, 127).astype(np.int8)
        self.const("w_q", q), self.const("w_scale", scale), self.const("w_zero", np.zeros(scale.shape, np.int8))
        self.nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="w_DQ",
                                           axis=axis))
        return "w", scale

    def bias(self, c_out: int, w_scale: np.ndarray | None) -> str:
        """Float bias, or int32 at scale x_scale * w_scale through DequantizeLinear (as the quantizer writes)."""
        b = (self.rng.standard_normal(c_out) * 0.1).astype(np.float32)
        if w_scale is None:
            return self.const("b", b)
        scale = (w_scale * self.X_SCALE).astype(np.float32)
        self.const("b_q", np.round(b / scale).astype(np.int32)), self.const("b_scale", scale)
        self.const("b_zero", np.zeros(c_out, np.int32))
        self.nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zero"], ["b"], name="b_DQ",
                                           axis=0))
        return "b"

    def conv(self, spec: LayerSpec, x: str, c_in: int, c_out: int) -> str:
        groups = spec.groups(c_in)
        fan_in = c_in // groups * int(np.prod(spec.kernel, dtype=np.int64))
        w = self.rng.standard_normal((c_out, c_in // groups, *spec.kernel)) * math.sqrt(2.0 / max(fan_in, 1))
        w_name, w_scale = self.weight(w, 0)
        attrs = dict(kernel_shape=list(spec.kernel), strides=list(spec.strides), dilations=list(spec.dilations),
                     group=groups)
        if spec.auto_pad == "NOTSET":
            attrs["pads"] = list(spec.pads)
        else:
            attrs["auto_pad"] = spec.auto_pad
        bias = self.bias(c_out, w_scale)
        self.nodes.append(helper.make_node("Conv", [x, w_name, bias], ["conv"], name="layer", **attrs))
        return self.quantized("conv") if self.int8 else "conv"

    def dense(self, op: str, x: str, c_in: int, c_out: int) -> str:
        """Gemm (weight [c_out, c_in], transB) or MatMul (weight [c_in, c_out]) on [rows, c_in]."""
        w = self.rng.standard_normal((c_out, c_in) if op == "Gemm" else (c_in, c_out)) * math.sqrt(2.0 / c_in)
        w_name, w_scale = self.weight(w, 0 if op == "Gemm" else 1)
        if op == "Gemm":
            node = helper.make_node("Gemm", [x, w_name, self.bias(c_out, w_scale)], ["dense"], name="layer", transB=1)
        else:
            node = helper.make_node("MatMul", [x, w_name], ["dense"], name="layer")
        self.nodes.append(node)
        return self.quantized("dense") if self.int8 else "dense"

    def activation(self, spec: LayerSpec, x: str, c_out: int) -> str:
        act, args = spec.activation, spec.activation_args
        if act is None or (self.int8 and act in ("Relu", "Clip")):  # the quantizer folds these into the range
            return x
        inputs, attrs = [x], {}
        if act == "PRelu":
            shape = (c_out, *(1,) * len(spec.spatial)) if spec.op_type == "Conv" else (c_out,)
            inputs.append(self.const("slope", np.full(shape, 0.1, np.float32)))
        elif act == "Clip":
            inputs += [self.const("clip_min", np.float32(args[0])), self.const("clip_max", np.float32(args[1]))]
        elif act in ("LeakyRelu", "Elu"):
            attrs["alpha"] = args[0]
        elif act == "HardSigmoid":
            attrs.update(alpha=args[0], beta=args[1])
        self.nodes.append(helper.make_node(act, inputs, ["act"], name="activation", **attrs))
        return self.quantized("act") if self.int8 and act in _int8_activations() else "act"


@lru_cache(maxsize=1)
def _int8_activations() -> frozenset[str]:
    """Activations ORT's quantizer wraps in QDQ (so ORT runs them as QLinear* ops); others stay float."""
    try:
        from onnxruntime.quantization.registry import QLinearOpsRegistry
        return frozenset(QLinearOpsRegistry) & frozenset(ACTIVATIONS)
    except ImportError:  # pragma: no cover - the quantization tools ship with onnxruntime
        return frozenset({"LeakyRelu", "Sigmoid"})


def _cast_floats(model: onnx.ModelProto, dtype: np.dtype) -> onnx.ModelProto:
    """The float32 model with float initializers and the input/output in ``dtype`` (fp16 layers)."""
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    for i, t in enumerate(model.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.elem_type = elem
    return model


def runs_float_in_int8(spec: LayerSpec, c_in: int, c_out: int) -> bool:
    """Whether ``onnxprune.quantize`` keeps this layer float (its rule in ``quantization/latency.py``):
    a depthwise conv, or a stem conv on <= 4 image channels, with fewer than 16 outputs."""
    if spec.op_type != "Conv" or c_out >= int8_rules.MIN_CHANNELS:
        return False
    return spec.depthwise or (spec.group == 1 and c_in <= int8_rules.MAX_STEM_CHANNELS)


# ----------------------------------------------------------------------------------------------- measuring
def measure_layer(model: onnx.ModelProto, target: LatencyTarget, *, warmup: int = 2, min_runs: int = 5,
                  max_runs: int = 25, budget_s: float = 0.03, seed: int = 0) -> float:
    """Milliseconds the layer's compute kernels (``COMPUTE_OPS``) take per run on ``target``, median over runs.

    ORT's profiler gives the kernels' time in each run. With one thread ORT runs them on the calling
    thread, and a run whose wall time exceeds that thread's CPU time was preempted: such runs are
    left out (where in the run the preemption fell is unknown), and if all were, the least kernel
    time is taken (on this 2-core machine under load, a 4.2 ms conv took 12-20 ms of wall time and
    4.8-5.0 ms of CPU time). Runs stop at ``max_runs`` or once ``budget_s`` has passed after ``min_runs``.
    """
    sess = target.session(model, profile_dir=_profile_dir())
    feeds = random_inputs(sess, {}, np.random.default_rng(seed))
    for _ in range(warmup):
        sess.run(None, feeds)
    cpu = _cpu_times(sess, feeds, min_runs, max_runs, budget_s)
    profiled = kernel_ms_per_run(_read_profile(sess))[warmup:]
    if not profiled:
        return statistics.median(cpu)
    if target.threads > 1 or len(profiled) != len(cpu):
        return statistics.median(k for k, _ in profiled)
    whole = [k for (k, run), c in zip(profiled, cpu) if run <= 1.05 * c + 0.01]  # +10 us: timer granularity
    return statistics.median(whole) if whole else min(k for k, _ in profiled)


@lru_cache(maxsize=1)
def _profile_dir() -> str:
    """One folder for this process's ORT profiles (each read and deleted at once), removed at exit."""
    path = tempfile.mkdtemp(prefix="onnxprune-latency-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _read_profile(sess: ort.InferenceSession) -> list[dict]:
    """End the session's profiling and return its events (the file is deleted)."""
    path = sess.end_profiling()
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    finally:
        os.unlink(path)


def _cpu_times(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray], min_runs: int, max_runs: int,
               budget_s: float) -> list[float]:
    """Per-run CPU time (ms) of the calling thread, runs capped by count and elapsed time."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        begin = time.thread_time()
        sess.run(None, feeds)
        times.append((time.thread_time() - begin) * 1000.0)
    return times


def kernel_ms_per_run(events: Sequence[Mapping]) -> list[tuple[float, float]]:
    """Per ``model_run`` of an ORT profile: (ms of its ``COMPUTE_OPS`` kernels, run ms). A run without
    such a kernel (another provider's fused op names) counts every kernel not in ``BOUNDARY_OPS``,
    and failing that its whole duration."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    compute, other = [0.0] * len(runs), [0.0] * len(runs)
    starts = [r[0] for r in runs]
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if not (0 <= i < len(runs) and e["ts"] <= runs[i][1]):
            continue
        op = e.get("args", {}).get("op_name")
        if op in COMPUTE_OPS:
            compute[i] += e["dur"]
        elif op not in BOUNDARY_OPS:
            other[i] += e["dur"]
    return [((c or o or end - begin) / 1000.0, (end - begin) / 1000.0)
            for c, o, (begin, end) in zip(compute, other, runs)]


# ----------------------------------------------------------------------------------------------- the table
def ort_version() -> str:
    return ort.__version__


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    return _read_cpu_model()


@lru_cache(maxsize=1)
def _read_cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cache_key(spec: LayerSpec, c_in: int, c_out: int, target: LatencyTarget) -> str:
    """A stable string for one table entry: spec, widths, target, ONNX Runtime version, CPU model and
    the version of what is measured."""
    return json.dumps({"spec": asdict(spec), "widths": [int(c_in), int(c_out)], "providers": list(target.providers),
                       "threads": target.threads, "int8": target.int8, "ort": ort_version(), "cpu": cpu_model(),
                       "measure": MEASURE_VERSION}, sort_keys=True, separators=(",", ":"))


def default_cache_path() -> Path:
    """``$ONNXPRUNE_CACHE_DIR/latency-v1.json``, or ``~/.cache/onnxprune/latency-v1.json``."""
    env = os.environ.get("ONNXPRUNE_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "onnxprune") / f"latency-v{CACHE_VERSION}.json"


class _DefaultCache:
    def __repr__(self) -> str:
        return "DEFAULT_CACHE"


DEFAULT_CACHE = _DefaultCache()  # LatencyTable(cache=...) default: default_cache_path()
Measure = Callable[[onnx.ModelProto, LatencyTarget], float]


class LatencyTable:
    """Milliseconds of one layer at given widths on a target (:func:`measure_layer`), memoised and
    kept in a JSON file shared by processes (``cache=None``: memory only).

    Each entry is the least of ``repeats`` measurements (default 2; 1 with an injected ``measure``):
    on a shared machine an entry timed while a neighbour loaded the cores (cold caches, a busy
    sibling hyperthread) came out up to 2x slower than the same entry timed seconds later, and such
    noise only ever adds time. :meth:`prefetch` spreads the repeats over separate passes of its list. With an int8
    target, layers ``onnxprune.quantize`` keeps in float (:func:`runs_float_in_int8`) are timed in float.
    """

    def __init__(self, target: LatencyTarget | None = None, *, cache: Path | str | None | _DefaultCache = DEFAULT_CACHE,
                 measure: Measure | None = None, repeats: int | None = None) -> None:
        self.target = target or LatencyTarget()
        self.path = default_cache_path() if isinstance(cache, _DefaultCache) else (Path(cache) if cache else None)
        self._measure = measure or measure_layer
        self.repeats = (1 if measure is not None else 2) if repeats is None else repeats
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ConfigError(f"latency table repeats must be >= 1, got {self.repeats}")
        self._memo: dict[str, float] = _read_cache(self.path) if self.path else {}
        self._new: dict[str, float] = {}
        self.measured = 0  # entries this table timed (not found in memory or on disk)

    def key(self, spec: LayerSpec, c_in: int, c_out: int) -> str:
        return cache_key(spec, c_in, c_out, self.target)

    def ms(self, spec: LayerSpec, c_in: int, c_out: int) -> float:
        """The layer's time at (c_in, c_out), measured on first use."""
        key = self.key(spec, c_in, c_out)
        if key not in self._memo:
            self._memo[key] = self._new[key] = min(self._time(spec, c_in, c_out) for _ in range(self.repeats))
            self.measured += 1
            self.flush()
        return self._memo[key]

    def __contains__(self, item: tuple[LayerSpec, int, int]) -> bool:
        return self.key(*item) in self._memo

    def prefetch(self, items: Iterable[tuple[LayerSpec, int, int]], progress: Progress | None = None) -> int:
        """Measure every (spec, c_in, c_out) not known yet, in ``repeats`` passes over the list, reporting
        progress; returns how many entries were timed."""
        say = progress or log_progress
        todo = {self.key(s, a, b): (s, int(a), int(b)) for s, a, b in items}
        todo = {k: v for k, v in todo.items() if k not in self._memo}
        best: dict[str, float] = {}
        steps, done = len(todo) * self.repeats, 0
        for _ in range(self.repeats):  # each pass is stored: an interrupted prefetch keeps what it measured
            for key, item in todo.items():
                say("measuring layer latencies", done, steps)
                best[key] = min(best.get(key, math.inf), self._time(*item))
                done += 1
            for key, value in best.items():
                self._memo[key] = self._new[key] = value
            self.flush()
        self.measured += len(todo)
        if todo:
            say("measuring layer latencies", steps, steps)
        return len(todo)

    def flush(self) -> None:
        """Write entries measured since the last flush (merged with what other processes wrote)."""
        if self.path is None or not self._new:
            self._new.clear()
            return
        entries = _read_cache(self.path)
        for key, value in self._new.items():  # the least of what every process measured: noise only adds
            entries[key] = min(value, entries.get(key, math.inf))
        if _write_cache(self.path, entries):
            self._new.clear()

    def _time(self, spec: LayerSpec, c_in: int, c_out: int) -> float:
        int8 = self.target.int8 and not runs_float_in_int8(spec, c_in, c_out)
        return float(self._measure(layer_model(spec, c_in, c_out, int8=int8), self.target))


def _read_cache(path: Path) -> dict[str, float]:
    """Entries of a cache file; a missing, corrupt or other-version file reads as empty."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
        logger.debug("latency cache %s ignored: not a version %d latency cache", path, CACHE_VERSION)
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return {}
    return {k: float(v) for k, v in entries.items()
            if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _write_cache(path: Path, entries: Mapping[str, float]) -> bool:
    """Atomic write (temporary file beside it, then rename); False, logged, if the folder is not writable."""
    data = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": dict(sorted(entries.items()))}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
        return True
    except OSError as exc:
        logger.info("latency cache %s not written: %s", path, exc.strerror or exc)
        return False
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------------- whole model
class LatencyModel:
    """Whole-model latency (ms) on the table's target as a function of layer widths.

    ``base_ms`` is the model measured whole on the target (int8 target: its int8 form, made by
    ``onnxprune.quantize`` on random calibration unless ``int8_model`` is given), interleaved with
    the float ``reference`` the speed-up is relative to (default: the model itself), whose median is
    ``reference_ms``. ORT's profile of the whole model then says how much of ``base_ms`` each layer
    takes in place, with the data and caches of the real graph: its compute kernel (``compute_ms``)
    and its other kernels (``other_ms``: an activation ORT does not fuse, int8 (de)quantization, PRelu
    rewrites). At new widths the compute part scales by the table's ratio new/original (which knows
    that a width off the vector multiple can be slower than a wider one), the other part by the
    share of output channels kept. The rest (``remainder_ms``: Add, Concat, Resize, layout reorders,
    heads) shrinks by ``remainder_share`` of the share of layer outputs (channels x positions) removed.
    """

    def __init__(self, model: ModelLike, input_shapes: Mapping[str, Shape], table: LatencyTable, *,
                 reference: ModelLike | None = None, int8_model: ModelLike | None = None, runs: int = 20,
                 warmup: int = 3, remainder_share: float = 0.5, progress: Progress | None = None) -> None:
        self.table, self.target = table, table.target
        self.input_shapes = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
        proto = load_proto(model)
        self.layers, aliases = _layers(skeleton(proto), self.input_shapes)
        table.prefetch([(l.spec, l.c_in, l.c_out) for l in self.layers.values()], progress)
        self.table_ms = {n: table.ms(l.spec, l.c_in, l.c_out) for n, l in self.layers.items()}
        timed = proto
        if self.target.int8:
            timed = load_proto(int8_model) if int8_model is not None else int8_form(proto, self.input_shapes, progress)
        ref = load_proto(reference) if reference is not None else (proto if self.target.int8 else None)
        self.base_ms, self.reference_ms = measure_whole(timed, ref, self.input_shapes, self.target, runs, warmup,
                                                         progress)
        shares = context_shares(timed, aliases, self.input_shapes, self.target)
        compute = {n: shares.get(n, (0.0, 0.0))[0] * self.base_ms for n in self.layers}
        self.compute_ms = {n: v or self.table_ms[n] for n, v in compute.items()}  # not found: the table's time
        self.other_ms = {n: shares.get(n, (0.0, 0.0))[1] * self.base_ms for n in self.layers}
        in_layers = sum(self.compute_ms.values()) + sum(self.other_ms.values())
        self.remainder_ms = max(0.0, self.base_ms - in_layers)
        self.remainder_share = float(remainder_share)
        self._positions = {n: _positions(l.spec) for n, l in self.layers.items()}
        self._volume = sum(l.c_out * self._positions[n] for n, l in self.layers.items()) or 1

    @property
    def widths(self) -> dict[str, tuple[int, int]]:
        """The original (c_in, c_out) of every layer."""
        return {n: (l.c_in, l.c_out) for n, l in self.layers.items()}

    def layer_ms(self, node: str, widths: tuple[int, int] | None = None) -> float:
        """Predicted ms of ``node`` in the model at ``widths`` (default: its original widths)."""
        layer = self._layer(node)
        if widths is None or tuple(widths) == (layer.c_in, layer.c_out):
            return self.compute_ms[node] + self.other_ms[node]
        return (self.compute_ms[node] * self._ratio(node, self.table.ms(layer.spec, *widths))
                + self.other_ms[node] * widths[1] / layer.c_out)

    def saving(self, node: str, old: tuple[int, int], new: tuple[int, int]) -> float:
        """Milliseconds saved by taking ``node`` from ``old`` to ``new`` widths (negative: slower)."""
        old, new = (int(old[0]), int(old[1])), (int(new[0]), int(new[1]))
        if old == new:
            return 0.0
        layer = self._layer(node)
        table_saved = self.table.ms(layer.spec, *old) - self.table.ms(layer.spec, *new)
        compute = self.compute_ms[node] * self._ratio(node, table_saved)
        other = self.other_ms[node] * (old[1] - new[1]) / layer.c_out
        removed = (old[1] - new[1]) * self._positions[node] / self._volume
        return compute + other + self.remainder_ms * self.remainder_share * removed

    def predict(self, widths: Mapping[str, tuple[int, int]]) -> float:
        """Predicted whole-model ms with ``widths`` (node -> (c_in, c_out)); absent nodes keep theirs."""
        total = self.base_ms
        for node, new in widths.items():
            layer = self._layer(node)
            total -= self.saving(node, (layer.c_in, layer.c_out), new)
        return total

    def speedup(self, widths: Mapping[str, tuple[int, int]]) -> float:
        """Predicted ``reference_ms / predict(widths)``."""
        return self.reference_ms / self.predict(widths)

    def _ratio(self, node: str, table_value: float) -> float:
        """A table time of ``node`` relative to its table time at the original widths."""
        return table_value / self.table_ms[node] if self.table_ms[node] > 0 else 1.0

    def _layer(self, node: str) -> LayerWidths:
        try:
            return self.layers[node]
        except KeyError:
            raise KeyError(f"{node!r} is not a Conv/Gemm/MatMul with a constant weight of this model") from None


_DECORATION = re.compile(r"(_kernel_time|_nchwc|_token_\d+|/strip\d+|_QuantizeLinear_Output|_QuantizeLinear|"
                         r"_DequantizeLinear)$")


def attribute(node_name: str, aliases: Mapping[str, str]) -> str | None:
    """The layer a node of ORT's optimised graph (or its profile event) comes from, by the original
    node or tensor name ORT derives its names from (``conv1.bn_nchwc``, ``.../Conv_token_35``,
    ``..._QuantizeLinear/strip4``); None for nodes of no layer (reorders, Add, Concat...)."""
    name = node_name
    while True:
        if name in aliases:
            return aliases[name]
        match = _DECORATION.search(name)
        if match is None or match.start() == 0:
            return None
        name = name[:match.start()]


def context_shares(model: onnx.ModelProto, aliases: Mapping[str, str], input_shapes: Mapping[str, Shape],
                   target: LatencyTarget, runs: int = 10, warmup: int = 2) -> dict[str, tuple[float, float]]:
    """Shares of the model's kernel time each layer takes in place, (its ``COMPUTE_OPS`` kernels, its
    other kernels), for the layers :func:`attribute` finds, from ORT's profile: each kernel at its
    least time over ``runs`` runs
    (a neighbour's load only adds time, and on a loaded machine nearly every run had some kernel
    preempted, so per-run shares all came out low)."""
    sess = target.session(model, profile_dir=_profile_dir())
    feeds = random_inputs(sess, input_shapes, np.random.default_rng(0))
    for _ in range(warmup + runs):
        sess.run(None, feeds)
    events = _read_profile(sess)
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    since = starts[warmup] if len(starts) > warmup else math.inf
    least: dict[str, float] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["ts"] >= since and str(e.get("name", "")).endswith("_kernel_time"):
            least[e["name"]] = min(least.get(e["name"], math.inf), float(e["dur"]))
            ops[e["name"]] = e.get("args", {}).get("op_name", "")
    total = sum(least.values())
    shares: dict[str, tuple[float, float]] = {}
    for name, dur in least.items():
        layer = attribute(name, aliases)
        if layer is not None:
            compute, other = shares.get(layer, (0.0, 0.0))
            is_compute = ops[name] in COMPUTE_OPS
            shares[layer] = (compute + dur / total * is_compute, other + dur / total * (not is_compute))
    return shares


def _positions(spec: LayerSpec) -> int:
    """Output positions per channel: N x output spatial for a conv, rows for Gemm/MatMul."""
    return spec.batch * int(np.prod(spec.output_spatial(), dtype=np.int64))


def measure_whole(timed: onnx.ModelProto, reference: onnx.ModelProto | None, input_shapes: Mapping[str, Shape],
                   target: LatencyTarget, runs: int, warmup: int, progress: Progress | None) -> tuple[float, float]:
    """(timed model's ms, reference's ms; the timed model's again without a reference): medians of
    interleaved runs on the same inputs, in the calling thread's CPU time with one thread (as the
    table is), else wall time."""
    sessions = [target.session(timed)] + ([target.session(reference)] if reference is not None else [])
    feeds = random_inputs(sessions[0], input_shapes, np.random.default_rng(0))
    if target.threads > 1:
        times = interleaved_times(sessions, feeds, runs, warmup, progress=progress or log_progress)
    else:
        times = interleaved_times(sessions, feeds, runs, warmup, progress=progress or log_progress,
                                  what="timing the whole model", clock=time.thread_time)
    base = float(np.median(times[:, 0]))
    return base, float(np.median(times[:, 1])) if reference is not None else base


def int8_form(model: onnx.ModelProto, input_shapes: Mapping[str, Shape], progress: Progress | None = None,
              samples: int = 4, relu: bool = False) -> onnx.ModelProto:
    """The model as ``onnxprune.quantize`` makes it int8 (same layers kept float, same row tiling),
    calibrated on random inputs: latency does not depend on the ranges."""
    from ..calibration import CalibrationSet  # noqa: PLC0415 - the calibration package imports the pipeline
    from ..int8 import quantize  # noqa: PLC0415
    name, shape = next(iter(input_shapes.items()))
    batch = np.random.default_rng(0).standard_normal((samples, *shape[1:])).astype(np.float32)
    return quantize(model, CalibrationSet(name, [batch]), thresholds="minmax", task="outputs", relu=relu,
                    progress=progress).model
