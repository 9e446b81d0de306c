"""Small deterministic ONNX models, one per channel-coupling pattern the pruner must handle.

Every model is float32, opset 17, ir_version 8, with a symbolic batch dim ``"N"``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
Dim = int | str


class GraphBuilder:
    """Tiny ``onnx.helper`` wrapper with unique names and seeded random parameters."""

    def __init__(self, seed: int, name: str = "graph") -> None:
        self.rng = np.random.default_rng(seed)
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self._count: Counter[str] = Counter()

    # -- naming / constants ------------------------------------------------
    def _uid(self, prefix: str) -> str:
        self._count[prefix] += 1
        return f"{prefix}_{self._count[prefix]}"

    def const(self, arr: np.ndarray, prefix: str = "const") -> str:
        """Add ``arr`` as an initializer and return its name."""
        name = self._uid(f"init_{prefix}")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def i64(self, values: Sequence[int], prefix: str = "shape") -> str:
        return self.const(np.asarray(values, dtype=np.int64), prefix)

    def randn(self, shape: Sequence[int], scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
        return (self.rng.standard_normal(tuple(shape)) * scale + shift).astype(np.float32)

    def bias(self, c: int, scale: float = 0.2, shift: float = 0.0) -> np.ndarray:
        """Random bias bounded away from zero."""
        b = self.randn([c], scale, shift)
        return np.where(np.abs(b) < 1e-3, np.float32(0.05), b).astype(np.float32)

    def input(self, name: str, shape: Sequence[Dim]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    # -- nodes -----------------------------------------------------------------
    def nodes_out(self, op: str, inputs: Sequence[str], n_out: int, domain: str = "", **attrs: object) -> list[str]:
        name = self._uid(op)
        outs = [f"{name}_out{i}" for i in range(n_out)] if n_out > 1 else [f"{name}_out"]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs

    def op(self, op: str, *inputs: str, **attrs: object) -> str:
        return self.nodes_out(op, inputs, 1, **attrs)[0]

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, pads: Sequence[int] | None = None,
             group: int = 1, bias: bool = True, weight: str | None = None, bias_shift: float = 0.0) -> str:
        """Conv with random (or given) weight; default padding keeps spatial size for odd ``k``."""
        pads = list(pads) if pads is not None else [k // 2] * 4
        fan_in = cin // group * k * k
        w = weight or self.const(self.randn([cout, cin // group, k, k], 1.0 / np.sqrt(fan_in)), "W")
        ins = [x, w] + ([self.const(self.bias(cout, shift=bias_shift), "B")] if bias else [])
        return self.op("Conv", *ins, kernel_shape=[k, k], strides=[stride, stride], pads=pads, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        p = [r.uniform(0.5, 1.5, c), r.normal(0, 0.2, c), r.normal(0, 0.2, c), r.uniform(0.5, 1.5, c)]
        names = [self.const(a.astype(np.float32), n) for a, n in zip(p, ["gamma", "beta", "mean", "var"])]
        return self.op("BatchNormalization", x, *names, epsilon=1e-5)

    def act(self, x: str, kind: str = "Relu", c: int = 0) -> str:
        """Activation by name; ``PRelu`` needs the channel count ``c``."""
        if kind == "PRelu":
            return self.op("PRelu", x, self.const(self.rng.uniform(0.05, 0.3, (c, 1, 1)).astype(np.float32), "slope"))
        if kind == "LeakyRelu":
            return self.op("LeakyRelu", x, alpha=0.1)
        return self.op(kind, x)

    def cbr(self, x: str, cin: int, cout: int, **kw: object) -> str:
        """Conv -> BN -> Relu."""
        return self.act(self.bn(self.conv(x, cin, cout, **kw), cout))  # type: ignore[arg-type]

    def gemm(self, x: str, fin: int, fout: int) -> str:
        w = self.const(self.randn([fout, fin], 1.0 / np.sqrt(fin)), "W")
        return self.op("Gemm", x, w, self.const(self.bias(fout), "B"), transB=1)

    def gap(self, x: str) -> str:
        return self.op("GlobalAveragePool", x)

    def build(self, outputs: Sequence[str]) -> onnx.ModelProto:
        """Assemble the model; output shapes are filled in by strict shape inference."""
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, outs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  ir_version=IR_VERSION, producer_name="onnxprune-tests")
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        model.graph.ClearField("output")
        model.graph.output.extend(inferred.graph.output)
        for o in model.graph.output:  # drop inference-invented names like "unk__3"
            for d in o.type.tensor_type.shape.dim:
                if d.dim_param.startswith("unk__"):
                    d.ClearField("dim_param")
        return model


def _x(g: GraphBuilder, c: int = 3) -> str:
    return g.input("x", ["N", c, 16, 16])


# -- pattern builders ------------------------------------------------------------
def chain(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "chain")
    y = g.cbr(_x(g), 3, 8)
    return g.build([g.act(g.conv(y, 8, 16))])


def residual_add(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "residual_add")
    x = _x(g)
    s = g.op("Add", g.conv(x, 3, 12), g.conv(x, 3, 12, k=1))
    return g.build([g.conv(g.act(s), 12, 8)])


def residual_chain(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "residual_chain")
    p1 = g.conv(_x(g), 3, 16)
    s1 = g.op("Add", p1, g.conv(g.act(p1), 16, 16))
    s2 = g.op("Add", s1, g.conv(g.act(s1), 16, 16))
    return g.build([g.conv(g.act(s2), 16, 8)])


def concat(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "concat")
    x = _x(g)
    ic = g.op("Concat", x, g.act(g.conv(x, 3, 6)), axis=1)  # 9 channels: 3 unprunable + 6
    b1, b2 = g.act(g.conv(ic, 9, 8)), g.act(g.conv(ic, 9, 12, k=1))
    return g.build([g.conv(g.op("Concat", b1, b2, axis=1), 20, 16)])


def split(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "split")
    y = g.act(g.conv(_x(g), 3, 16))
    a, b = g.nodes_out("Split", [y, g.i64([6, 10], "split")], 2, axis=1)
    c = g.op("Concat", g.act(g.conv(a, 6, 8)), g.act(g.conv(b, 10, 12)), axis=1)
    return g.build([g.conv(c, 20, 8)])


def slice_(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "slice")
    y = g.act(g.conv(_x(g), 3, 16))
    s = g.op("Slice", y, g.i64([2], "starts"), g.i64([10], "ends"), g.i64([1], "axes"), g.i64([1], "steps"))
    return g.build([g.conv(s, 8, 8)])


def depthwise(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "depthwise")
    y = g.cbr(_x(g), 3, 12)
    y = g.act(g.bn(g.conv(y, 12, 12, group=12), 12))
    return g.build([g.conv(y, 12, 8, k=1)])


def depthwise_multiplier(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "depthwise_multiplier")
    y = g.act(g.conv(_x(g), 3, 8))
    y = g.act(g.conv(y, 8, 16, group=8))
    return g.build([g.conv(y, 16, 8, k=1)])


def grouped(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "grouped")
    y = g.act(g.conv(_x(g), 3, 16))
    y = g.act(g.conv(y, 16, 16, group=4))
    return g.build([g.conv(y, 16, 8)])


def se(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "se")
    f = g.act(g.conv(_x(g), 3, 16))
    r = g.act(g.conv(g.gap(f), 16, 4, k=1))
    e = g.op("Sigmoid", g.conv(r, 4, 16, k=1))
    return g.build([g.conv(g.op("Mul", f, e), 16, 8)])


def prelu(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "prelu")
    y = g.act(g.conv(_x(g), 3, 12), "PRelu", 12)
    return g.build([g.conv(y, 12, 8)])


def per_channel_mul_add(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "per_channel_mul_add")
    y = g.conv(_x(g), 3, 12)
    y = g.op("Mul", y, g.const(g.randn([1, 12, 1, 1], 0.3, 1.0), "scale"))
    y = g.act(g.op("Add", y, g.const(g.randn([1, 12, 1, 1], 0.3), "shift")))
    return g.build([g.conv(y, 12, 8)])


def flatten_gemm(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "flatten_gemm")
    y = g.act(g.conv(_x(g), 3, 8, stride=2))  # [N,8,8,8]
    h = g.act(g.gemm(g.op("Flatten", y, axis=1), 8 * 8 * 8, 16))
    return g.build([g.gemm(h, 16, 10)])


def reshape_gemm(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "reshape_gemm")
    y = g.gap(g.act(g.conv(_x(g), 3, 16)))
    y = g.op("Reshape", y, g.i64([-1, 16]))
    return g.build([g.bn(g.gemm(y, 16, 12), 12)])


def matmul_head(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "matmul_head")
    y = g.op("Flatten", g.gap(g.act(g.conv(_x(g), 3, 16))), axis=1)
    y = g.op("MatMul", y, g.const(g.randn([16, 10], 0.25), "W"))
    return g.build([g.op("Add", y, g.const(g.bias(10), "B"))])


def nhwc_transpose(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "nhwc_transpose")
    x = g.input("x", ["N", 16, 16, 3])
    y = g.conv(g.op("Transpose", x, perm=[0, 3, 1, 2]), 3, 12)
    t = g.op("Transpose", y, perm=[0, 2, 3, 1])  # NHWC, channels last
    t = g.act(g.op("Add", t, g.const(g.bias(12), "nhwc_bias")))
    seq = g.op("Reshape", t, g.i64([0, -1, 12]))  # [N, HW, C] conv-free head
    back = g.op("Transpose", t, perm=[0, 3, 1, 2])
    return g.build([seq, g.conv(back, 12, 8)])


def resize_add(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "resize_add")
    c1 = g.act(g.conv(_x(g), 3, 8))
    lat = g.conv(c1, 8, 12, k=1)
    top = g.conv(g.act(g.conv(c1, 8, 16, stride=2)), 16, 12, k=1)
    up = g.op("Resize", top, "", g.const(np.array([1, 1, 2, 2], np.float32), "scales"), mode="nearest")
    return g.build([g.conv(g.op("Add", up, lat), 12, 8)])


def pad_conv(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "pad_conv")
    y = g.act(g.conv(_x(g), 3, 8))
    p = g.op("Pad", y, g.i64([0, 0, 1, 2, 0, 0, 1, 0], "pads"), mode="constant")
    return g.build([g.conv(p, 8, 8, pads=[0, 0, 0, 0])])


def pool(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "pool")
    y = g.op("MaxPool", g.act(g.conv(_x(g), 3, 8)), kernel_shape=[2, 2], strides=[2, 2])
    y = g.op("AveragePool", g.act(g.conv(y, 8, 12)), kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = g.op("GlobalMaxPool", g.act(g.conv(y, 12, 16)))
    return g.build([g.conv(y, 16, 10, k=1)])


def conv_transpose(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "conv_transpose")
    y = g.act(g.conv(_x(g), 3, 8, stride=2))
    w = g.const(g.randn([8, 12, 2, 2], 0.5), "W")
    y = g.act(g.op("ConvTranspose", y, w, g.const(g.bias(12), "B"), kernel_shape=[2, 2], strides=[2, 2]))
    return g.build([g.conv(y, 12, 8)])


def sigmoid_gate(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "sigmoid_gate")
    x = _x(g)
    y = g.op("Mul", g.op("Sigmoid", g.conv(x, 3, 12)), g.conv(x, 3, 12, k=1))
    return g.build([g.conv(y, 12, 8)])


def multi_output(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "multi_output")
    f = g.act(g.conv(_x(g), 3, 12))
    return g.build([g.conv(f, 12, 8), g.gemm(g.op("Flatten", g.gap(f), axis=1), 12, 10)])


def bias_after_dead(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "bias_after_dead")
    y = g.act(g.conv(_x(g), 3, 12, bias_shift=2.0))
    return g.build([g.conv(y, 12, 8, pads=[0, 0, 0, 0])])


def leaky_clip(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "leaky_clip")
    y = g.act(g.conv(_x(g), 3, 8), "LeakyRelu")
    lo, hi = g.const(np.array(0.0, np.float32), "min"), g.const(np.array(6.0, np.float32), "max")
    y = g.op("Clip", g.conv(y, 8, 12), lo, hi)
    y = g.op("HardSigmoid", g.conv(y, 12, 12), alpha=0.2, beta=0.5)
    y = g.op("Tanh", g.conv(y, 12, 8))
    return g.build([g.conv(y, 8, 8)])


def instance_norm(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "instance_norm")
    y = g.conv(_x(g), 3, 12)
    s, b = g.const(g.randn([12], 0.2, 1.0), "in_scale"), g.const(g.bias(12), "in_bias")
    y = g.act(g.op("InstanceNormalization", y, s, b, epsilon=1e-5))
    return g.build([g.conv(y, 12, 8)])


def reduce_channel(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "reduce_channel")
    f = g.act(g.conv(_x(g), 3, 12))
    m = g.op("ReduceMean", f, axes=[1], keepdims=1)  # [N,1,H,W]
    return g.build([g.conv(g.op("Mul", f, m), 12, 8)])


def softmax_channel(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "softmax_channel")
    y = g.op("Softmax", g.conv(_x(g), 3, 12), axis=1)
    return g.build([g.conv(y, 12, 8)])


def unknown_op(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "unknown_op")
    y = g.op("LpNormalization", g.conv(_x(g), 3, 8), axis=1, p=2)
    y = g.op("DepthToSpace", g.conv(y, 8, 8), blocksize=2)  # [N,2,32,32]
    return g.build([g.conv(y, 2, 8)])


def shared_weight(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "shared_weight")
    s = g.act(g.conv(_x(g), 3, 8))
    w = g.const(g.randn([12, 8, 3, 3], 1.0 / np.sqrt(72)), "W_shared")
    a = g.conv(s, 8, 12, weight=w)
    b = g.conv(g.act(g.conv(s, 8, 8)), 8, 12, weight=w)
    return g.build([g.conv(g.act(g.op("Add", a, b)), 12, 8)])


def conv_no_bias(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "conv_no_bias")
    y = g.act(g.bn(g.conv(_x(g), 3, 12, bias=False), 12))
    y = g.op("Add", y, g.act(g.conv(y, 12, 12, bias=False)))
    return g.build([g.conv(y, 12, 8, bias=False)])


def dynamic_spatial(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed, "dynamic_spatial")
    x = g.input("x", ["N", 3, "H", "W"])
    c1 = g.act(g.conv(x, 3, 8))
    lat = g.conv(c1, 8, 12, k=1)
    top = g.conv(g.act(g.conv(c1, 8, 16, stride=2)), 16, 12, k=1)
    nc = g.op("Slice", g.op("Shape", top), g.i64([0], "starts"), g.i64([2], "ends"))
    hw = g.op("Slice", g.op("Shape", lat), g.i64([2], "starts"), g.i64([4], "ends"))
    sizes = g.op("Concat", nc, hw, axis=0)
    up = g.op("Resize", top, "", "", sizes, mode="nearest")
    return g.build([g.conv(g.act(g.op("Add", up, lat)), 12, 8)])


PATTERNS: dict[str, Callable[[int], onnx.ModelProto]] = {
    "chain": chain,
    "residual_add": residual_add,
    "residual_chain": residual_chain,
    "concat": concat,
    "split": split,
    "slice": slice_,
    "depthwise": depthwise,
    "depthwise_multiplier": depthwise_multiplier,
    "grouped": grouped,
    "se": se,
    "prelu": prelu,
    "per_channel_mul_add": per_channel_mul_add,
    "flatten_gemm": flatten_gemm,
    "reshape_gemm": reshape_gemm,
    "matmul_head": matmul_head,
    "nhwc_transpose": nhwc_transpose,
    "resize_add": resize_add,
    "pad_conv": pad_conv,
    "pool": pool,
    "conv_transpose": conv_transpose,
    "sigmoid_gate": sigmoid_gate,
    "multi_output": multi_output,
    "bias_after_dead": bias_after_dead,
    "leaky_clip": leaky_clip,
    "instance_norm": instance_norm,
    "reduce_channel": reduce_channel,
    "softmax_channel": softmax_channel,
    "unknown_op": unknown_op,
    "shared_weight": shared_weight,
    "conv_no_bias": conv_no_bias,
    "dynamic_spatial": dynamic_spatial,
}


def example_input(model: onnx.ModelProto, seed: int = 0,
                  spatial: int | tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Random float32 feed: symbolic batch -> 2, other symbolic dims -> 16 or ``spatial``."""
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in model.graph.initializer}
    spat = [16, 16] if spatial is None else ([spatial] * 2 if isinstance(spatial, int) else list(spatial))
    feed: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        shape, k = [], 0
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif i == 0:
                shape.append(2)
            else:
                shape.append(spat[min(k, len(spat) - 1)])
                k += 1
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feed[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feed
