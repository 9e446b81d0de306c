"""The latency cost model (onnxprune/budget/latency.py): cache keys, the disk cache, layer specs,
the one-layer models it times, and predictions. Nothing here is timed: measurements are injected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.budget import latency as L
from onnxprune.budget.latency import (LatencyModel, LatencyTable, LatencyTarget, LayerSpec, cache_key, layer_model,
                                      layer_specs, layer_widths)
from onnxprune.errors import ConfigError
from onnxprune.sample_models import generate

CONV3 = LayerSpec("Conv", (16, 16), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
DW = LayerSpec("Conv", (16, 16), 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), depthwise=True, activation="LeakyRelu",
               activation_args=(0.1,))


def fake_measure(calls: list | None = None):
    """A deterministic 'measurement': proportional to the weight size, + 1 (never timed)."""
    def measure(model: onnx.ModelProto, target: LatencyTarget) -> float:
        if calls is not None:
            calls.append(model)
        weights = [t for t in model.graph.initializer if t.name in ("w", "w_q")]
        return 1.0 + 1e-3 * float(np.prod(weights[0].dims))
    return measure


# ----------------------------------------------------------------------------------------------- target
def test_target_validates_threads_and_providers():
    assert LatencyTarget().providers == ("CPUExecutionProvider",)
    assert LatencyTarget(["CPUExecutionProvider"], 2).providers == ("CPUExecutionProvider",)  # lists become tuples
    for threads in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="threads"):
            LatencyTarget(threads=threads)
    with pytest.raises(ConfigError, match="NoSuchExecutionProvider is not available"):
        LatencyTarget(("NoSuchExecutionProvider",))
    with pytest.raises(ConfigError):
        LatencyTarget(())


# ----------------------------------------------------------------------------------------------- cache keys
def test_cache_key_changes_with_target_ort_and_cpu_only(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["FakeExecutionProvider", "CPUExecutionProvider"])
    base = cache_key(CONV3, 8, 16, LatencyTarget())
    assert base == cache_key(LayerSpec("Conv", (16, 16), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), 8, 16,
                             LatencyTarget(("CPUExecutionProvider",), 1, False))  # equal values, equal key
    json.loads(base)  # a plain JSON string: stable across processes
    others = {
        cache_key(CONV3, 8, 16, LatencyTarget(("FakeExecutionProvider",))),
        cache_key(CONV3, 8, 16, LatencyTarget(threads=2)),
        cache_key(CONV3, 8, 16, LatencyTarget(int8=True)),
        cache_key(CONV3, 8, 15, LatencyTarget()),
        cache_key(CONV3, 7, 16, LatencyTarget()),
        cache_key(DW, 8, 16, LatencyTarget()),
    }
    monkeypatch.setattr(L, "ort_version", lambda: "0.0.1")
    others.add(cache_key(CONV3, 8, 16, LatencyTarget()))
    monkeypatch.undo()
    monkeypatch.setattr(L, "cpu_model", lambda: "Some Other CPU")
    others.add(cache_key(CONV3, 8, 16, LatencyTarget()))
    assert len(others) == 8 and base not in others
    monkeypatch.undo()
    assert cache_key(CONV3, 8, 16, LatencyTarget()) == base


def test_cpu_model_is_read():
    assert isinstance(L.cpu_model(), str) and L.cpu_model()


# ----------------------------------------------------------------------------------------------- the table
def test_measure_called_once_per_distinct_key(tmp_path):
    calls: list = []
    table = LatencyTable(cache=None, measure=fake_measure(calls))
    first = table.ms(CONV3, 8, 16)
    assert table.ms(CONV3, 8, 16) == first and len(calls) == 1
    table.prefetch([(CONV3, 8, 16), (CONV3, 16, 16), (CONV3, 16, 16), (DW, 8, 8)], progress=lambda *a, **k: None)
    assert len(calls) == 3 and table.measured == 3
    table.ms(DW, 8, 8)
    assert len(calls) == 3


def test_repeats_keep_the_least(tmp_path):
    values = iter([5.0, 3.0, 4.0, 9.0, 2.0, 7.0])
    table = LatencyTable(cache=None, measure=lambda m, t: next(values), repeats=2)
    assert table.ms(CONV3, 8, 8) == 3.0
    table.prefetch([(CONV3, 8, 16), (CONV3, 16, 16)])  # pass 1: 4, 9; pass 2: 2, 7
    assert (table.ms(CONV3, 8, 16), table.ms(CONV3, 16, 16)) == (2.0, 7.0)
    with pytest.raises(ConfigError):
        LatencyTable(cache=None, repeats=0, measure=fake_measure())


def test_values_are_read_back_from_disk(tmp_path):
    path = tmp_path / "sub" / "latency.json"
    table = LatencyTable(cache=path, measure=fake_measure())
    value = table.ms(CONV3, 8, 16)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))  # atomic: no temporary file left
    calls: list = []
    again = LatencyTable(cache=path, measure=fake_measure(calls))
    assert again.ms(CONV3, 8, 16) == value and not calls
    assert (CONV3, 8, 16) in again and (CONV3, 8, 17) not in again


def test_other_process_entries_are_merged_keeping_the_least(tmp_path):
    path = tmp_path / "latency.json"
    a = LatencyTable(cache=path, measure=lambda m, t: 5.0)
    b = LatencyTable(cache=path, measure=lambda m, t: 3.0)
    a.ms(CONV3, 8, 16)
    b.ms(CONV3, 8, 16)
    a.ms(CONV3, 16, 16)  # a's write must keep b's smaller value, not its own memo
    fresh = LatencyTable(cache=path, measure=fake_measure())
    assert fresh.ms(CONV3, 8, 16) == 3.0 and fresh.ms(CONV3, 16, 16) == 5.0


@pytest.mark.parametrize("content", ["{not json", '{"format": "onnxprune-latency", "version": 0, "entries": {"k": 1}}',
                                     '["a list"]', '{"format": "other", "version": 1, "entries": {}}', "\x00\xff"])
def test_stale_or_corrupt_cache_is_ignored(tmp_path, content, capsys):
    path = tmp_path / "latency.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content)
    calls: list = []
    table = LatencyTable(cache=path, measure=fake_measure(calls))
    table.ms(CONV3, 8, 16)
    assert len(calls) == 1
    assert json.loads(path.read_text())["version"] == L.CACHE_VERSION  # replaced by a valid file
    assert "Traceback" not in capsys.readouterr().err


def test_unwritable_cache_is_not_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    table = LatencyTable(cache=blocker / "latency.json", measure=fake_measure())  # parent is a file
    assert table.ms(CONV3, 8, 16) > 0


def test_default_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path))
    assert L.default_cache_path() == tmp_path / "latency-v1.json"
    assert LatencyTable(measure=fake_measure()).path == tmp_path / "latency-v1.json"
    monkeypatch.delenv("ONNXPRUNE_CACHE_DIR")
    assert L.default_cache_path() == Path.home() / ".cache" / "onnxprune" / "latency-v1.json"


def test_int8_table_times_slow_int8_layers_in_float():
    calls: list = []
    table = LatencyTable(LatencyTarget(int8=True), cache=None, measure=fake_measure(calls))
    table.ms(DW, 8, 8)  # depthwise with < 16 channels: onnxprune.quantize keeps it float
    table.ms(DW, 32, 32)
    ops = [{n.op_type for n in m.graph.node} for m in calls]
    assert "DequantizeLinear" not in ops[0] and "DequantizeLinear" in ops[1]


# ----------------------------------------------------------------------------------------------- layer specs
def _small_model() -> onnx.ModelProto:
    """conv(3->8)+Relu, depthwise(8)+LeakyRelu 0.2, group-2 conv(8->16)+BN+Clip, 1x1 conv read twice, Gemm."""
    rng = np.random.default_rng(0)
    w = lambda name, *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    inits = [w("w1", 8, 3, 3, 3), w("w2", 8, 1, 3, 3), w("w3", 16, 4, 3, 3), w("w4", 16, 16, 1, 1), w("fc", 10, 16),
             w("bn_s", 16), w("bn_b", 16), w("bn_m", 16), numpy_helper.from_array(np.ones(16, np.float32), "bn_v"),
             numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="stem", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["a1"], name="stem_relu"),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], name="dw", kernel_shape=[3, 3], pads=[1] * 4, group=8),
        helper.make_node("LeakyRelu", ["c2"], ["a2"], name="dw_act", alpha=0.2),
        helper.make_node("Conv", ["a2", "w3"], ["c3"], name="grouped", kernel_shape=[3, 3], pads=[1] * 4, group=2),
        helper.make_node("BatchNormalization", ["c3", "bn_s", "bn_b", "bn_m", "bn_v"], ["b3"], name="bn"),
        helper.make_node("Clip", ["b3", "lo", "hi"], ["a3"], name="clip"),
        helper.make_node("Conv", ["a3", "w4"], ["c4"], name="pw", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c4"], ["a4"], name="pw_relu"),
        helper.make_node("Add", ["c4", "a4"], ["s4"], name="add"),  # c4 is read twice: no fused activation
        helper.make_node("GlobalAveragePool", ["s4"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    graph = helper.make_graph(nodes, "small", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_layer_specs_of_a_small_model():
    model = _small_model()
    for form in (model, ir.from_proto(model)):
        layers = layer_specs(form, {"x": (1, 3, 32, 48)})
        assert list(layers) == ["stem", "dw", "grouped", "pw", "fc"]
        stem, dw, grouped, pw, fc = layers.values()
        assert (stem.c_in, stem.c_out, stem.spec.spatial, stem.spec.strides) == (3, 8, (32, 48), (2, 2))
        assert (stem.spec.activation, stem.spec.depthwise, stem.spec.output_spatial()) == ("Relu", False, (16, 24))
        assert (dw.c_in, dw.c_out, dw.spec.depthwise, dw.spec.spatial) == (8, 8, True, (16, 24))
        assert (dw.spec.activation, dw.spec.activation_args) == ("LeakyRelu", (0.2,))
        assert (grouped.c_in, grouped.c_out, grouped.spec.group, grouped.spec.depthwise) == (8, 16, 2, False)
        assert (grouped.spec.activation, grouped.spec.activation_args) == ("Clip", (0.0, 6.0))  # through the BN
        assert (pw.c_in, pw.c_out, pw.spec.activation) == (16, 16, None)
        assert (fc.spec.op_type, fc.c_in, fc.c_out, fc.spec.batch, fc.spec.activation) == ("Gemm", 16, 10, 1, None)
    assert layer_widths(model) == {n: (l.c_in, l.c_out) for n, l in layers.items()}
    assert {l.spec.dtype for l in layers.values()} == {"float32"}


def test_layer_specs_find_every_conv_of_a_generated_model():
    model = generate.mobilefacenet()
    layers = layer_specs(model, {"input": (1, 3, 112, 112)})
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert {n.name for n in convs} <= set(layers)
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in convs:
        w = weights[node.input[1]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        layer = layers[node.name]
        assert (layer.c_in, layer.c_out) == (w[1] * group, w[0])
        assert layer.spec.depthwise == (group > 1 and w[1] == 1)
    assert any(l.spec.depthwise for l in layers.values()) and layers["linear"].spec.op_type == "Gemm"
    assert {l.spec.activation for l in layers.values()} >= {"PRelu"}  # through the BatchNormalization


def test_aliases_attribute_ort_node_names():
    _, aliases = L._layers(_small_model(), {"x": (1, 3, 32, 32)})
    assert L.attribute("a1_nchwc_kernel_time", aliases) == "stem"
    assert L.attribute("grouped_token_12", aliases) == "grouped"
    assert L.attribute("a3_QuantizeLinear/strip3", aliases) == "grouped"
    assert L.attribute("b3_DequantizeLinear", aliases) == "grouped"
    assert L.attribute("ReorderOutput_token_4", aliases) is None and L.attribute("add", aliases) is None


# ----------------------------------------------------------------------------------------------- one-layer models
SPECS = [
    (CONV3, 16, 32), (CONV3, 13, 7), (DW, 24, 24),
    (LayerSpec("Conv", (12, 12), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), group=4, activation="Clip",
               activation_args=(0.0, 6.0)), 16, 32),
    (LayerSpec("Conv", (12, 12), 2, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), activation="PRelu"), 8, 16),
    (LayerSpec("Conv", (12, 12), 1, (3, 3), (2, 2), (0, 0, 0, 0), (1, 1), auto_pad="SAME_UPPER",
               activation="HardSigmoid", activation_args=(0.2, 0.5)), 8, 16),
    (LayerSpec("Gemm", (), 1, activation="Relu"), 64, 10), (LayerSpec("MatMul", (), 49, activation="Sigmoid"), 32, 48),
    (LayerSpec("Conv", (12, 12), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), activation="Relu", dtype="float16"), 8, 8),
]


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("spec,c_in,c_out", SPECS)
def test_one_layer_models_check_and_run(spec, c_in, c_out, int8, tmp_path):
    model = layer_model(spec, c_in, c_out, int8=int8)
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    dtype = np.float32 if int8 else spec.dtype  # int8 forms start from float32
    x = np.random.default_rng(0).standard_normal([spec.batch, c_in, *spec.spatial]).astype(dtype)
    (y,) = sess.run(None, {"x": x})
    assert y.shape == (spec.batch, c_out, *spec.output_spatial())
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    if int8:
        assert ops & {"QLinearConv", "QGemm", "QLinearMatMul"}, ops  # ORT runs the layer in int8
    else:
        assert not any(op.startswith("QLinear") for op in ops)


def test_one_layer_model_refuses_impossible_widths():
    with pytest.raises(ValueError):
        layer_model(DW, 8, 12)
    with pytest.raises(ValueError):
        layer_model(SPECS[3][0], 18, 32)  # 18 input channels in 4 groups
    with pytest.raises(ValueError):
        layer_model(CONV3, 0, 8)


def test_kernel_times_count_compute_kernels_per_run():
    def node(ts, dur, op):
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}
    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
              node(1, 10, "ReorderInput"), node(12, 50, "Conv"), node(63, 20, "PRelu"),
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 50}, node(201, 30, "Relu"),
              {"cat": "Session", "name": "model_run", "ts": 300, "dur": 40}, node(301, 5, "Transpose")]
    assert L.kernel_ms_per_run(events) == [(0.05, 0.1), (0.03, 0.05), (0.04, 0.04)]


# ----------------------------------------------------------------------------------------------- predictions
@pytest.fixture
def cost_model(monkeypatch):
    """A LatencyModel of the small model with faked whole-model timing and profile (nothing timed)."""
    monkeypatch.setattr(L, "measure_whole", lambda *a, **k: (20.0, 20.0))
    monkeypatch.setattr(L, "context_shares", lambda *a, **k: {"stem": (0.2, 0.0), "dw": (0.1, 0.1),
                                                               "grouped": (0.3, 0.0), "pw": (0.1, 0.0)})
    table = LatencyTable(cache=None, measure=fake_measure())
    return LatencyModel(_small_model(), {"x": (1, 3, 32, 32)}, table, progress=lambda *a, **k: None)


def test_predict_of_original_widths_is_base(cost_model):
    assert cost_model.predict({}) == cost_model.base_ms == 20.0
    assert cost_model.predict(cost_model.widths) == cost_model.base_ms
    assert cost_model.speedup(cost_model.widths) == 1.0
    assert cost_model.compute_ms["fc"] == cost_model.table_ms["fc"]  # not in the profile: the table's time
    assert cost_model.remainder_ms == pytest.approx(20.0 * 0.2 - cost_model.table_ms["fc"])


def test_predict_is_monotone_as_a_layer_narrows(cost_model):
    previous = cost_model.base_ms
    for c_out in (14, 12, 8, 4, 2):
        widths = {"grouped": (8, c_out), "pw": (c_out, 16)}
        predicted = cost_model.predict(widths)
        assert predicted < previous
        previous = predicted
    assert cost_model.speedup({"dw": (4, 4)}) > 1.0


def test_saving_is_consistent_with_predict(cost_model):
    old, new = (8, 16), (8, 10)
    step = cost_model.saving("grouped", old, new)
    assert step > 0 and cost_model.saving("grouped", new, old) == pytest.approx(-step)
    assert cost_model.predict({"grouped": new}) == pytest.approx(cost_model.base_ms - step)
    assert cost_model.saving("grouped", old, old) == 0.0
    with pytest.raises(KeyError, match="not a Conv"):
        cost_model.predict({"add": (1, 1)})
