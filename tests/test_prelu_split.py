"""PReLU rewrites for int8 (passes/prelu_split.py): exact in float, every pattern, and through quantize."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxprune
from onnxprune.calibration import CalibrationSet
from onnxprune.errors import ConfigError
from onnxprune.int8 import quantize
from onnxprune.passes import PreluSplit, prelu_split
from onnxprune.quantization import prelu as prelu_choice
from onnxprune.sample_models.generate import iresnet, mobilefacenet
from onnxprune.verify import interface

from .oracle import run
from .pattern_models import GraphBuilder

MODES = {"default": {}, "max only": {"absorb": frozenset()}, "absorb only": {"elementwise": False}}
READERS = ["conv", "conv1x1", "depthwise", "grouped", "add", "output", "sigmoid", "concat"]
SLOPES = ["mixed", "below_one", "above_one", "zero", "one", "uniform"]


def _slope(draw: st.DrawFn, g: GraphBuilder, c: int, image: bool) -> np.ndarray:
    kind = draw(st.sampled_from(SLOPES))
    a = {"mixed": g.rng.uniform(-3, 3, c), "below_one": g.rng.uniform(-1, 1, c), "above_one": g.rng.uniform(1, 4, c),
         "zero": np.zeros(c), "one": np.ones(c), "uniform": np.full(c, 0.3)}[kind].astype(np.float32)
    if kind == "uniform" and draw(st.booleans()):
        return a[:1]  # one slope for every channel
    if not image:
        return a
    return a.reshape(draw(st.sampled_from([(c, 1, 1), (1, c, 1, 1)])))


def _producer(draw: st.DrawFn, g: GraphBuilder, x: str, c: int) -> str:
    kind = draw(st.sampled_from(["conv", "depthwise", "grouped", "add"]))
    bias = draw(st.booleans())
    if kind == "conv":
        return g.conv(x, 4, c, k=draw(st.sampled_from([1, 3])), bias=bias)
    t = g.conv(x, 4, c, k=1)
    if kind == "depthwise":
        return g.conv(t, c, c, group=c, bias=bias)
    if kind == "grouped":
        return g.conv(t, c, c, group=2, bias=bias)
    return g.op("Add", t, g.conv(x, 4, c, k=1))  # not a layer the pass can change


def _reader(g: GraphBuilder, kind: str, p: str, c: int, x: str) -> str:
    if kind == "conv":
        return g.conv(p, c, 5)
    if kind == "conv1x1":
        return g.conv(p, c, 3, k=1, bias=False)
    if kind == "depthwise":
        return g.conv(p, c, c, group=c)
    if kind == "grouped":
        return g.conv(p, c, 4, group=2)
    if kind == "add":
        return g.op("Add", p, g.conv(x, 4, c, k=1))  # a residual
    if kind == "sigmoid":
        return g.op("Sigmoid", p)  # an op the pass knows nothing about
    if kind == "concat":
        return g.op("Concat", p, x, axis=1)
    return p  # the PRelu output itself is a graph output


@st.composite
def prelu_graphs(draw: st.DrawFn) -> onnx.ModelProto:
    """A PRelu after a conv/depthwise/grouped conv/Add or a Gemm, read by 1-3 layers of any kind."""
    g = GraphBuilder(draw(st.integers(0, 2**16)), "prelu_graph")
    x = g.input("x", ["N", 4, 8, 8])
    c = draw(st.sampled_from([2, 4, 6]))
    if draw(st.integers(0, 4)) == 0:  # fully connected: Gemm -> PRelu -> Gemm / MatMul
        h = g.gemm(g.op("Flatten", g.gap(x), axis=1), 4, c)
        p = g.op("PRelu", h, g.const(_slope(draw, g, c, image=False), "slope"))
        outs = [g.gemm(p, c, 3), g.op("MatMul", p, g.const(g.randn([c, 2]), "W"))][:draw(st.integers(1, 2))]
        return g.build(outs)
    p = g.op("PRelu", _producer(draw, g, x, c), g.const(_slope(draw, g, c, image=True), "slope"))
    kinds = draw(st.lists(st.sampled_from(READERS), min_size=1, max_size=3, unique=True))
    return g.build([_reader(g, k, p, c, x) for k in kinds])


def _feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((2, 4, 8, 8)).astype(np.float32)}


def _assert_same(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    onnx.checker.check_model(rewritten, full_check=True)
    assert interface(rewritten) == interface(original)
    feeds = _feeds(original)
    for want, got in zip(run(original, feeds), run(rewritten, feeds)):
        assert want.shape == got.shape
        assert float(np.abs(want - got).max()) <= 1e-5 * max(1.0, float(np.abs(want).max()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prelu_graphs(), st.sampled_from(sorted(MODES)))
def test_rewrite_is_exact_in_float(model: onnx.ModelProto, mode: str) -> None:
    new, record = prelu_split(model, **MODES[mode])
    _assert_same(model, new)
    prelus = {n.name for n in model.graph.node if n.op_type == "PRelu"}
    assert {n for n, _ in record.rewritten} | {n for n, _ in record.left} == prelus
    assert sum(n.op_type == "PRelu" for n in new.graph.node) == len(record.left)
    if mode != "absorb only":
        assert not record.left  # max handles every constant slope
    if mode == "max only":
        assert "absorb" not in {p for _, p in record.rewritten}


def _net(slope: np.ndarray, reader: str = "conv") -> onnx.ModelProto:
    """conv(4->6) -> PRelu(slope) -> reader, plus a second PRelu after a depthwise conv."""
    g = GraphBuilder(7, "net")
    x = g.input("x", ["N", 4, 8, 8])
    p = g.op("PRelu", g.conv(x, 4, 6), g.const(slope.astype(np.float32), "slope"))
    slope = np.linspace(-1.5, 0.8, 6, dtype=np.float32).reshape(6, 1, 1)
    q = g.op("PRelu", g.conv(g.conv(x, 4, 6, k=1), 6, 6, group=6), g.const(slope))
    return g.build([_reader(g, reader, p, 6, x), g.conv(q, 6, 2, k=1)])


MIXED = np.array([-2.0, -0.3, 0.0, 0.25, 1.0, 3.5]).reshape(6, 1, 1)


def test_patterns_by_reader_and_slope() -> None:
    model = _net(MIXED)
    new, record = prelu_split(model)
    _assert_same(model, new)
    first, second = (n.name for n in model.graph.node if n.op_type == "PRelu")
    assert record.rewritten == ((first, "absorb"), (second, "absorb"))  # dense readers; depthwise producer: 2 convs
    assert not any(n.op_type in ("PRelu", "Mul", "Max") for n in new.graph.node)
    ops = [n.op_type for n in new.graph.node]
    assert ops.count("Relu") == 3 and ops.count("Concat") == 1
    for reader, pattern in (("depthwise", "max"), ("add", "max"), ("output", "max"), ("sigmoid", "max")):
        m = _net(MIXED, reader)
        new, record = prelu_split(m)
        _assert_same(m, new)
        assert record.rewritten[0][1] == pattern, reader
    for slope, pattern in ((np.zeros((6, 1, 1)), "relu"), (np.ones((1, 6, 1, 1)), "identity"),
                           (np.array([0.2]), "leaky")):
        m = _net(slope)
        new, record = prelu_split(m)
        _assert_same(m, new)
        assert record.rewritten[0][1] == pattern


def test_mixed_slopes_fold_their_signs_into_the_neighbours() -> None:
    m = _net(MIXED, "depthwise")
    new, record = prelu_split(m, absorb=frozenset())
    _assert_same(m, new)
    assert [op for op in (n.op_type for n in new.graph.node) if op in ("Mul", "Max", "Min")] == ["Mul", "Max"] * 2
    assert len(record.elementwise) == 4  # the two Mul and two Max, no sign Mul
    m = _net(MIXED, "add")  # a residual Add cannot take the sign: one Mul by -1/1 after the Max
    new, record = prelu_split(m, absorb=frozenset())
    _assert_same(m, new)
    assert len(record.elementwise) == 5 and any(n.endswith(".sign_out") for n in record.elementwise)


def test_only_and_unknown_readers() -> None:
    model = _net(MIXED, "sigmoid")
    first, second = (n.name for n in model.graph.node if n.op_type == "PRelu")
    new, record = prelu_split(model, frozenset({second}))
    assert record.rewritten == ((second, "absorb"),) and not record.left
    assert [n.name for n in new.graph.node if n.op_type == "PRelu"] == [first]
    new, record = prelu_split(model, elementwise=False)
    _assert_same(model, new)
    assert dict(record.left)[first].startswith("read by Sigmoid")
    assert [n.name for n in new.graph.node if n.op_type == "PRelu"] == [first]


def test_ir_model_in_ir_model_out_and_the_input_is_untouched() -> None:
    model = ir.from_proto(_net(MIXED))
    before = ir.to_proto(model).SerializeToString()
    result = PreluSplit()(model)
    assert result.modified and result.model is not model
    assert result.record.by_pattern() == {"absorb": [n for n, _ in result.record.rewritten]}
    new, record = prelu_split(model)
    assert isinstance(new, ir.Model) and record == result.record
    assert ir.to_proto(model).SerializeToString() == before


def test_non_constant_slope_is_left() -> None:
    g = GraphBuilder(3, "dynamic_slope")
    x = g.input("x", ["N", 4, 8, 8])
    s = g.input("s", [4, 1, 1])
    model = g.build([g.conv(g.op("PRelu", g.conv(x, 4, 4), s), 4, 2)])
    new, record = prelu_split(model)
    assert not record.rewritten and record.left[0][1] == "slope is not a constant"
    assert new.graph.node[1].op_type == "PRelu"


# ------------------------------------------------------------------------------------------- quantize
def _calib(model: onnx.ModelProto, n: int = 8) -> CalibrationSet:
    x = np.random.default_rng(0).uniform(-1, 1, (n, 3, 112, 112)).astype(np.float32)
    return CalibrationSet(model.graph.input[0].name, [x], [], None, [])


@pytest.mark.parametrize("build", [mobilefacenet, lambda: iresnet(blocks=(1, 1, 1, 1))], ids=["mfn", "iresnet"])
def test_quantize_split_is_valid_int8_and_as_faithful_as_keep(build) -> None:
    model = build()
    calib = _calib(model)
    split = quantize(model, calib, prelu="split", tile=False, thresholds="minmax")
    onnx.checker.check_model(split.model)
    assert interface(split.model) == interface(model)
    assert "PRelu" not in split.report.kernels and split.report.kernels.get("QLinearConv", 0) > 0
    rewritten = split.report.prelu["rewritten"]
    assert len(rewritten) == sum(n.op_type == "PRelu" for n in model.graph.node)
    assert {p for _, p in rewritten} == {"absorb", "max"}  # dense readers absorb, depthwise/BN/Add readers max
    assert "PRelu rewritten exactly for int8 (--prelu split)" in split.report.summary()
    cos = lambda r: r.report.fidelity["outputs"][0]["cosine"]  # noqa: E731
    if build is mobilefacenet:  # the other one only for the patterns: both take about as long as keep
        keep = quantize(model, calib, prelu="keep", tile=False, thresholds="minmax")
        assert keep.report.kernels.get("PRelu", 0) > 0
        assert cos(split) > cos(keep) - 0.02
    assert cos(split) > 0.9


def test_quantize_auto_times_absorb_against_max(monkeypatch) -> None:
    monkeypatch.setattr(prelu_choice, "TIMING_BUDGET_S", 0.05)
    model = _net(MIXED)
    calib = CalibrationSet("x", [np.random.default_rng(1).standard_normal((16, 4, 8, 8)).astype(np.float32)], [],
                           None, [])
    result = quantize(model, calib, prelu="auto", tile=False)
    report = result.report.to_dict()["prelu"]
    assert set(report["timings_ms"]) == {"max", "absorb"} and len(report["rewritten"]) == 2
    assert {p for _, p in report["rewritten"]} in ({"absorb"}, {"max"})  # one choice for the whole model
    assert "(int8 timed: max " in result.report.summary()
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(onnxprune.__file__).parent / "schemas" / "report.schema.json").read_text())
    quantize_schema = next(s for s in schema["oneOf"] if s["properties"]["kind"] == {"const": "quantize"})
    jsonschema.validate(json.loads(json.dumps(report)), quantize_schema["properties"]["prelu"])
    with pytest.raises(ConfigError, match="--prelu must be one of auto, split, keep"):
        quantize(model, calib, prelu="fast")


def test_new_names_do_not_collide_and_unnamed_nodes_are_named() -> None:
    h = onnx.helper
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w1", rng.standard_normal((2, 2))), ("w2", rng.standard_normal((3, 2))), ("slope", np.array([-0.5, 2.0])))]
    nodes = [h.make_node("Gemm", ["x", "w1"], ["h"], transB=1), h.make_node("PRelu", ["h", "slope"], ["p"]),
             h.make_node("Gemm", ["p", "w2"], ["z"], transB=1), h.make_node("Identity", ["x"], ["p.split"])]
    vi = lambda n, c: h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, c])  # noqa: E731
    graph = h.make_graph(nodes, "g", [vi("x", 2)], [vi("z", 3), vi("p.split", 2)], initializer=inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    new, record = prelu_split(model)  # the Relu output would be "p.split"
    assert record.rewritten == (("PRelu_1", "absorb"),)
    _assert_same_on(model, new, {"x": rng.standard_normal((1, 2)).astype(np.float32)})


def _assert_same_on(model: onnx.ModelProto, new: onnx.ModelProto, feeds: dict) -> None:
    onnx.checker.check_model(new, full_check=True)
    assert interface(new) == interface(model)
    for want, got in zip(run(model, feeds), run(new, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_relu_first_then_the_exact_rewrite_for_the_rest() -> None:
    g = GraphBuilder(5, "relu_then_prelu")
    x = g.input("x", ["N", 4, 8, 8])
    near = g.op("PRelu", g.conv(x, 4, 6), g.const(np.linspace(0.0, 0.02, 6, dtype=np.float32).reshape(6, 1, 1)))
    far = g.op("PRelu", g.conv(near, 6, 6), g.const(MIXED.astype(np.float32)))
    model = g.build([g.conv(far, 6, 3)])
    calib = CalibrationSet("x", [np.random.default_rng(2).standard_normal((16, 4, 8, 8)).astype(np.float32)], [],
                           None, [])
    result = quantize(model, calib, relu=True, prelu="split", tile=False, float_slow_layers=False)
    first, second = (n.name for n in model.graph.node if n.op_type == "PRelu")
    assert result.report.relu_replaced == [first]  # nearly ReLU on the data: made ReLU (lossy, refitted)
    assert result.report.prelu["rewritten"] == [[second, "absorb"]]  # the other one: exact
    assert "PRelu" not in result.report.kernels
