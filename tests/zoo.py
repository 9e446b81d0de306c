"""A zoo of small face-model-shaped graphs, as different exporters write them.

Users bring graphs from the old TorchScript exporter at any opset, the dynamo exporter, keras2onnx
(NHWC with Transpose pairs), hand-written MatMul+Add heads, fp16 exports, already-quantized
models, model-local functions, If/Loop control flow and models stored with external data. Each entry builds one of
them into a directory and says what every verb must do with it: succeed with a valid model, or
refuse with a one-line reason (a regex on that line). tests/test_zoo.py checks the promise.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.pattern_models import GraphBuilder

OK = "ok"
VERBS = ("analyze", "slim", "quantize")


@dataclass(frozen=True)
class Entry:
    """One zoo model: how to build it and what each verb must do with it."""

    name: str
    build: Callable[[Path], Path]  # writes the model into a directory and returns its path
    input_shape: tuple[int, ...]  # analysis and calibration shape (batch 1)
    expect: dict[str, str] = field(default_factory=lambda: dict.fromkeys(VERBS, OK))  # verb -> OK or refusal regex
    needs: tuple[str, ...] = ()  # importable modules the builder needs (skipped without them)
    oracle: bool = True  # the mask oracle applies (float32 model, prunable channels)
    blocked: str = ""  # a reason analyze must give for some unprunable group (regex)
    input_name: str = "input"

    def missing(self) -> list[str]:
        return [m for m in self.needs if importlib.util.find_spec(m) is None]


def _save(model: onnx.ModelProto, directory: Path, name: str) -> Path:
    onnx.checker.check_model(model, full_check=True)
    path = directory / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


# -- the face-shaped trunk most hand-built entries share -------------------------------------------------

def _cbp(g: GraphBuilder, x: str, cin: int, cout: int, bias: bool = True, **kw) -> str:
    """Conv -> BN -> PRelu, the block of MobileFaceNet and RetinaFace-mnet."""
    return g.act(g.bn(g.conv(x, cin, cout, bias=bias, **kw), cout), "PRelu", cout)


def _se(g: GraphBuilder, x: str, c: int) -> str:
    z = g.act(g.conv(g.gap(x), c, c // 4, k=1))
    return g.op("Mul", x, g.op("Sigmoid", g.conv(z, c // 4, c, k=1)))


def _head(g: GraphBuilder, f: str, c: int, anchors: int = 2) -> list[str]:
    """RetinaFace-style head: 1x1 convs, NHWC permute, reshape to [N, A, k], softmax on scores."""
    cls = g.op("Transpose", g.conv(f, c, 2 * anchors, k=1), perm=[0, 2, 3, 1])
    box = g.op("Transpose", g.conv(f, c, 4 * anchors, k=1), perm=[0, 2, 3, 1])
    scores = g.op("Softmax", g.op("Reshape", cls, g.i64([0, -1, 2])), axis=-1)
    return [scores, g.op("Reshape", box, g.i64([0, -1, 4]))]


def _trunk(g: GraphBuilder, x: str) -> tuple[str, int]:
    """stem (s2) -> depthwise -> pointwise -> residual block with SE: [N, 32, H/2, W/2]."""
    y = _cbp(g, x, 3, 16, stride=2)
    y = _cbp(g, y, 16, 16, group=16)
    y = g.bn(g.conv(y, 16, 32, k=1, bias=False), 32)
    r = g.bn(g.conv(_cbp(g, y, 32, 32), 32, 32), 32)
    return g.op("Add", y, _se(g, r, 32)), 32


def face_detector(seed: int = 0) -> onnx.ModelProto:
    """The base hand-built detector: trunk and a two-output head (scores, boxes)."""
    g = GraphBuilder(seed, "face_detector")
    f, c = _trunk(g, g.input("input", ["N", 3, 32, 32]))
    return g.build(_head(g, f, c))


# -- graph rewrites that imitate exporters ------------------------------------------------------------------

def weights_as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer becomes a Constant node (older TF and Caffe converters)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
              for t in out.graph.initializer]
    out.graph.ClearField("initializer")
    return _prepend(out, consts)


def _prepend(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """``nodes`` before the graph's own (they produce what the graph reads: topological order holds)."""
    rest = list(model.graph.node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes + rest)
    return model


def weights_through_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every weight reaches its Conv through an Identity (RetinaFace's ``onnx::Conv_*`` inputs)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name for t in out.graph.initializer if t.data_type == TensorProto.FLOAT}
    idents, k = [], 0
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            if name in inits and node.op_type in ("Conv", "BatchNormalization", "PRelu"):
                k += 1
                alias = f"onnx::{node.op_type}_{k}"
                idents.append(helper.make_node("Identity", [name], [alias], name=f"Identity_{k}"))
                node.input[i] = alias
    return _prepend(out, idents)


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """All float32 tensors, inputs and outputs as float16 (a ``model.half()`` export)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            half = numpy_helper.to_array(t).astype(np.float16)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(half, t.name))
    for vi in list(out.graph.input) + list(out.graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    out.graph.ClearField("value_info")
    return out


def ort_quantized(model: onnx.ModelProto, directory: Path, fmt: str) -> onnx.ModelProto:
    """The model as ONNX Runtime's static quantizer writes it (QDQ or QOperator)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.items = iter([{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.items, None)

    src, dst = directory / f"float_{fmt}.onnx", directory / f"q_{fmt}.onnx"
    onnx.save(model, str(src))
    quantize_static(str(src), str(dst), Reader(), quant_format=getattr(QuantFormat, fmt),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return onnx.load(str(dst))


# -- hand-built entries with their own structure ---------------------------------------------------------

def keras_nhwc(seed: int = 0) -> onnx.ModelProto:
    """MTCNN RNet as keras2onnx writes it: NHWC input, Transpose pairs around every conv, NHWC PRelu,
    an NHWC Flatten into MatMul+Add dense layers, softmax scores and box regression."""
    g = GraphBuilder(seed, "keras_rnet")
    x = g.input("input", ["N", 24, 24, 3])

    def conv_prelu(t: str, cin: int, cout: int, k: int) -> str:
        y = g.op("Transpose", g.conv(g.op("Transpose", t, perm=[0, 3, 1, 2]), cin, cout, k=k, pads=[0] * 4),
                 perm=[0, 2, 3, 1])
        return g.op("PRelu", y, g.const(g.rng.uniform(0.05, 0.3, cout).astype(np.float32), "alpha"))

    def pool(t: str, k: int, s: int) -> str:
        p = g.op("MaxPool", g.op("Transpose", t, perm=[0, 3, 1, 2]), kernel_shape=[k, k], strides=[s, s])
        return g.op("Transpose", p, perm=[0, 2, 3, 1])

    y = pool(conv_prelu(x, 3, 28, 3), 3, 2)  # 22 -> 10
    y = pool(conv_prelu(y, 28, 48, 3), 3, 2)  # 8 -> 3
    y = conv_prelu(y, 48, 64, 2)  # 2x2x64, NHWC
    y = g.op("Flatten", y, axis=1)

    def dense(t: str, fin: int, fout: int) -> str:
        w = g.const(g.randn([fin, fout], 1.0 / np.sqrt(fin)), "dense_W")
        return g.op("Add", g.op("MatMul", t, w), g.const(g.bias(fout), "dense_b"))

    h = dense(y, 2 * 2 * 64, 128)
    h = g.op("PRelu", h, g.const(g.rng.uniform(0.05, 0.3, 128).astype(np.float32), "alpha"))
    return g.build([g.op("Softmax", dense(h, 128, 2), axis=-1), dense(h, 128, 4)])


def matmul_recognizer(seed: int = 0) -> onnx.ModelProto:
    """A MobileFaceNet-like recognizer whose dense layers are MatMul + Add instead of Gemm."""
    g = GraphBuilder(seed, "matmul_recognizer")
    f, c = _trunk(g, g.input("input", ["N", 3, 32, 32]))
    y = g.op("Flatten", g.gap(f), axis=1)
    h = g.op("MatMul", y, g.const(g.randn([c, 64], 1.0 / np.sqrt(c)), "fc1_W"))
    h = g.act(g.op("Add", h, g.const(g.bias(64), "fc1_b")), "Relu")
    e = g.op("Add", g.op("MatMul", h, g.const(g.randn([64, 32], 0.125), "fc2_W")), g.const(g.bias(32), "fc2_b"))
    return g.build([e])


def conv_without_bias(seed: int = 0) -> onnx.ModelProto:
    """Bias-free convs everywhere: before BN (folded) and before a bare activation (nothing to fold into)."""
    g = GraphBuilder(seed, "conv_no_bias")
    x = g.input("input", ["N", 3, 32, 32])
    y = g.act(g.bn(g.conv(x, 3, 16, stride=2, bias=False), 16), "PRelu", 16)
    y = g.act(g.conv(y, 16, 16, group=16, bias=False), "Relu")
    y = g.act(g.conv(y, 16, 32, k=1, bias=False), "PRelu", 32)
    y = g.op("Add", y, g.conv(g.act(g.conv(y, 32, 32, bias=False)), 32, 32, bias=False))
    return g.build(_head(g, y, 32))


def bn_not_folded(seed: int = 0) -> onnx.ModelProto:
    """BatchNormalization that no Conv can absorb: after an activation, after a residual Add, before a conv."""
    g = GraphBuilder(seed, "bn_unfolded")
    x = g.input("input", ["N", 3, 32, 32])
    y = g.bn(g.act(g.conv(x, 3, 16, stride=2), "PRelu", 16), 16)  # conv -> prelu -> BN
    z = g.act(g.conv(y, 16, 16), "Relu")
    y = g.bn(g.op("Add", y, z), 16)  # BN after the residual add
    y = g.act(g.conv(y, 16, 32, k=1), "PRelu", 32)
    return g.build(_head(g, y, 32))


def shared_weights(seed: int = 0) -> onnx.ModelProto:
    """One initializer read by two Convs (a weight-tied pyramid: the same 3x3 conv at two scales)."""
    g = GraphBuilder(seed, "shared_weights")
    x = g.input("input", ["N", 3, 32, 32])
    y = _cbp(g, x, 3, 16, stride=2)
    w = g.const(g.randn([24, 16, 3, 3], 1.0 / np.sqrt(144)), "W_shared")
    b = g.const(g.bias(24), "B_shared")
    p1 = g.act(g.op("Conv", y, w, b, kernel_shape=[3, 3], pads=[1] * 4), "Relu")
    p2 = g.act(g.op("Conv", g.op("MaxPool", y, kernel_shape=[2, 2], strides=[2, 2]), w, b,
                    kernel_shape=[3, 3], pads=[1] * 4), "Relu")
    up = g.op("Resize", p2, "", g.const(np.array([1, 1, 2, 2], np.float32), "scales"), mode="nearest")
    return g.build(_head(g, g.op("Add", p1, up), 24))


def if_subgraph(seed: int = 0) -> onnx.ModelProto:
    """An If whose branches read a feature map of the outer graph (captured, not an input of the node)."""
    g = GraphBuilder(seed, "if_subgraph")
    x = g.input("input", ["N", 3, 32, 32])
    y = _cbp(g, x, 3, 16, stride=2)
    f = _cbp(g, y, 16, 24)  # read by both branches
    cond = g.op("Greater", g.op("ReduceMax", x, keepdims=0), g.const(np.array(0.0, np.float32), "zero"))
    then_g = helper.make_graph([helper.make_node("Relu", [f], ["then_out"], name="then_relu")], "then_branch", [],
                               [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Sigmoid", [f], ["else_out"], name="else_sigmoid")], "else_branch",
                               [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)])
    branch = g.op("If", cond, then_branch=then_g, else_branch=else_g)
    z = _cbp(g, branch, 24, 32)  # pruned around the If
    return g.build(_head(g, z, 32))


def loop_subgraph(seed: int = 0) -> onnx.ModelProto:
    """A Loop refining a feature map once or twice; its body reads a second, captured feature map."""
    g = GraphBuilder(seed, "loop_subgraph")
    x = g.input("input", ["N", 3, 32, 32])
    y = _cbp(g, x, 3, 16, stride=2)
    a = _cbp(g, y, 16, 24)  # loop-carried
    skip = g.conv(y, 16, 24, k=1)  # captured by the body
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", skip], ["s"], name="body_add"),
         helper.make_node("Constant", [], ["half"], name="body_half", value=half),
         helper.make_node("Mul", ["s", "half"], ["v_out"], name="body_mul"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    # A trip count known only at run time (1 or 2), so no simplifier can unroll the loop away.
    positive = g.op("Greater", g.op("ReduceMax", x, keepdims=0), g.const(np.array(0.0, np.float32), "zero"))
    trips = g.op("Add", g.op("Cast", positive, to=TensorProto.INT64), g.const(np.array(1, np.int64), "one"))
    looped = g.op("Loop", trips, "", a, body=body)
    z = _cbp(g, looped, 24, 32)
    return g.build(_head(g, z, 32))


def local_functions(seed: int = 0) -> onnx.ModelProto:
    """Blocks called as model-local ONNX functions (what exporters emit for modules kept whole)."""
    g = GraphBuilder(seed, "local_functions")
    x = g.input("input", ["N", 3, 32, 32])
    block = helper.make_function(
        "face.blocks", "ConvPRelu", ["x", "w", "b", "slope"], ["y"],
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("PRelu", ["c", "slope"], ["y"], name="prelu")],
        opset_imports=[helper.make_opsetid("", 17)])

    def call(t: str, cin: int, cout: int) -> str:
        w = g.const(g.randn([cout, cin, 3, 3], 1.0 / np.sqrt(cin * 9)), "fn_W")
        slope = g.const(g.rng.uniform(0.05, 0.3, (cout, 1, 1)).astype(np.float32), "fn_slope")
        return g.nodes_out("ConvPRelu", [t, w, g.const(g.bias(cout), "fn_B"), slope], 1, domain="face.blocks")[0]

    y = _cbp(g, x, 3, 16, stride=2)
    y = _cbp(g, call(y, 16, 24), 24, 24)  # a plain block after the function: prunable
    outs = _head(g, call(y, 24, 32), 32)
    graph = helper.make_graph(g.nodes, g.name, g.inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], g.inits)
    model = helper.make_model(graph, functions=[block], ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("face.blocks", 1)])
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.ClearField("output")
    model.graph.output.extend(inferred.graph.output)
    return model


# -- PyTorch exports -------------------------------------------------------------------------------------------

def torch_detector():
    """A tiny RetinaFace-shaped detector in PyTorch: conv-bn-prelu, depthwise, residual + SE, two-level head."""
    import torch
    from torch import nn

    class CBP(nn.Sequential):
        def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
            super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout),
                             nn.PReLU(cout))

    class SE(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.dw = CBP(3, 16, stride=2), CBP(16, 16, groups=16)
            self.pw = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))
            self.res = nn.Sequential(CBP(32, 32), nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32))
            self.se, self.down = SE(32), CBP(32, 48, stride=2)
            self.cls = nn.ModuleList([nn.Conv2d(32, 4, 1), nn.Conv2d(48, 4, 1)])
            self.box = nn.ModuleList([nn.Conv2d(32, 8, 1), nn.Conv2d(48, 8, 1)])

        def forward(self, x):
            x = self.pw(self.dw(self.stem(x)))
            f1 = x + self.se(self.res(x))
            f2 = self.down(f1)
            n = x.shape[0]
            cls = torch.cat([c(f).permute(0, 2, 3, 1).reshape(n, -1, 2) for c, f in zip(self.cls, (f1, f2))], 1)
            box = torch.cat([b(f).permute(0, 2, 3, 1).reshape(n, -1, 4) for b, f in zip(self.box, (f1, f2))], 1)
            return torch.softmax(cls, -1), box

    torch.manual_seed(0)
    model = Detector().eval()
    with torch.no_grad():  # trained-looking BN statistics, so folding and pruning have something to do
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


# name -> (opset, dynamo exporter, blocks exported as ONNX functions)
TORCH_EXPORTS = {"torch-op9": (9, False, False), "torch-op11": (11, False, False),
                 "torch-op13": (13, False, False), "torch-op17": (17, False, False),
                 "torch-functions": (17, False, True), "torch-dynamo": (21, True, False)}


class ExportFailed(RuntimeError):
    """The exporter itself failed (recorded with its reason; outside onnxprune's control)."""


def export_torch(name: str, directory: Path) -> None:
    """Export one TORCH_EXPORTS entry to ``directory/<name>.onnx``; on failure write ``<name>.error``."""
    import warnings

    import torch
    opset, dynamo, functions = TORCH_EXPORTS[name]
    kwargs: dict = {"input_names": ["input"], "output_names": ["scores", "boxes"]}
    model, x = torch_detector(), torch.randn(1, 3, 64, 64)
    if functions:  # conv-bn-prelu and SE blocks become model-local functions
        kwargs["export_modules_as_functions"] = {type(model.stem), type(model.se)}
    path = directory / f"{name}.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:  # writes its weights as external data beside the model, as users get it
                dims = {0: torch.export.Dim("N", max=64), 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
                torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=opset, verbose=False,
                                  dynamic_shapes={"x": dims}, **kwargs)
            else:  # the TorchScript exporter as older tutorials call it (weights listed as inputs before opset 11)
                dyn = {"input": {0: "N", 2: "H", 3: "W"}, "scores": {0: "N", 1: "A"}, "boxes": {0: "N", 1: "A"}}
                torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, dynamic_axes=dyn,
                                  keep_initializers_as_inputs=opset < 11, **kwargs)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        (directory / f"{name}.error").write_text(f"{type(exc).__name__}: {text[0][:300] if text else ''}")


_EXPORTING: dict[Path, subprocess.Popen] = {}


def start_torch_exports(root: Path) -> None:
    """Begin all torch exports in a child process (the test process never imports torch for them, and
    an exporter crash cannot take the session down); entries built from ``root`` wait for it."""
    if root in _EXPORTING or importlib.util.find_spec("torch") is None:
        return
    tmp = root / "torch-exports.partial"
    tmp.mkdir(exist_ok=True)
    wanted = [n for n in TORCH_EXPORTS if n != "torch-dynamo" or importlib.util.find_spec("onnxscript")]
    _EXPORTING[root] = subprocess.Popen([sys.executable, "-m", "tests.zoo", str(tmp), *wanted],
                                        cwd=Path(__file__).resolve().parents[1],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_torch_exports(root: Path) -> None:
    """End an export nobody waited for (a run that selected no torch entry)."""
    proc = _EXPORTING.pop(root, None)
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def _torch_entry(name: str) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        root = directory.parent
        shared = root / "torch-exports"
        if not shared.is_dir():
            start_torch_exports(root)
            proc = _EXPORTING.pop(root)
            _, err = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"torch export process failed: {err.decode(errors='replace')[-2000:]}")
            (root / "torch-exports.partial").rename(shared)
        error = shared / f"{name}.error"
        if error.exists():
            raise ExportFailed(error.read_text())
        return shared / f"{name}.onnx"
    return build


# -- the zoo -------------------------------------------------------------------------------------------------------

def _built(fn: Callable[[], onnx.ModelProto], name: str) -> Callable[[Path], Path]:
    return lambda d: _save(fn(), d, name)


def _external(directory: Path) -> Path:
    """The base detector with its weights in ``<name>.onnx.data`` beside it (onnx.save's default threshold:
    tensors under 1 KB stay inline, as ONNX Runtime needs for shape tensors it reads while loading)."""
    path = directory / "external_data.onnx"
    onnx.save(face_detector(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="external_data.onnx.data")
    return path


QUANTIZED = r"already quantized .*; quantize its float original"
PRUNE_QUANTIZED = r"already quantized .*; prune its float original"
DET = (1, 3, 32, 32)
TORCH = ("torch",)

ENTRIES: list[Entry] = [
    Entry("keras-nhwc", _built(keras_nhwc, "keras_nhwc"), (1, 24, 24, 3),
          blocked=r"Softmax \S+ normalises over channels"),
    Entry("matmul-add", _built(matmul_recognizer, "matmul_add"), DET),
    Entry("conv-no-bias", _built(conv_without_bias, "conv_no_bias"), DET),
    Entry("bn-not-folded", _built(bn_not_folded, "bn_not_folded"), DET),
    Entry("shared-weights", _built(shared_weights, "shared_weights"), DET, blocked=r"cannot absorb"),
    Entry("constant-nodes", _built(lambda: weights_as_constants(face_detector()), "constant_nodes"), DET),
    Entry("identity-weights", _built(lambda: weights_through_identity(face_detector()), "identity_weights"), DET),
    Entry("fp16", _built(lambda: to_float16(face_detector()), "fp16"), DET,
          expect={"analyze": OK, "slim": OK, "quantize": r"float16"}, oracle=False),
    Entry("qdq", lambda d: _save(ort_quantized(face_detector(), d, "QDQ"), d, "qdq"), DET,
          expect={"analyze": PRUNE_QUANTIZED, "slim": PRUNE_QUANTIZED, "quantize": QUANTIZED}, oracle=False),
    Entry("qoperator", lambda d: _save(ort_quantized(face_detector(), d, "QOperator"), d, "qoperator"), DET,
          expect={"analyze": PRUNE_QUANTIZED, "slim": PRUNE_QUANTIZED, "quantize": QUANTIZED}, oracle=False),
    Entry("if-subgraph", _built(if_subgraph, "if_subgraph"), DET, blocked=r"read inside a subgraph of If"),
    Entry("loop-subgraph", _built(loop_subgraph, "loop_subgraph"), DET, blocked=r"read inside a subgraph of Loop"),
    Entry("external-data", _external, DET),
    Entry("local-functions", _built(local_functions, "local_functions"), DET),
    # Last, so the child process exporting them runs while the entries above are tested.
    *[Entry(n, _torch_entry(n), (1, 3, 64, 64), needs=TORCH) for n in TORCH_EXPORTS if n != "torch-dynamo"],
    Entry("torch-dynamo", _torch_entry("torch-dynamo"), (1, 3, 64, 64), needs=("torch", "onnxscript")),
]


if __name__ == "__main__":  # python -m tests.zoo DIR NAME...: the torch exports, in their own process
    for entry_name in sys.argv[2:]:
        export_torch(entry_name, Path(sys.argv[1]))
