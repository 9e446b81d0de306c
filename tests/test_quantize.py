"""int8 QDQ quantization: validity, interface, int8 kernels, and ranges that beat min/max."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.calibration import CalibrationSet
from onnxprune.cli import main
from onnxprune.int8 import quantize
from onnxprune.quantization import ranges as R
from onnxprune.verify import interface

from .oracle import run
from .pattern_models import PATTERNS


def _data(model: onnx.ModelProto, n: int = 24, seed: int = 0) -> CalibrationSet:
    x = np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)
    return CalibrationSet(model.graph.input[0].name, [x], [], None, [])


@pytest.mark.parametrize("name", ["chain", "residual_add", "se", "flatten_gemm", "concat"])
def test_quantized_model_is_valid_int8_and_close(name: str) -> None:
    model = PATTERNS[name](0)
    result = quantize(model, _data(model))
    q = result.model
    onnx.checker.check_model(q)
    assert interface(q) == interface(model)
    assert sum(result.report.kernels.get(k, 0) for k in ("QLinearConv", "QLinearMatMul", "QGemm")) > 0
    assert result.report.fidelity["outputs"][0]["cosine"] > 0.95
    x = _data(model, 4, seed=9).batches[0]
    assert [a.shape for a in run(model, {"x": x})] == [b.shape for b in run(q, {"x": x})]


def test_mse_range_beats_minmax_on_heavy_tails() -> None:
    values = np.random.default_rng(0).laplace(size=200_000)  # long tails stretch min/max
    h = R.histogram_pass(lambda consume: consume({"t": values}), {"t": (values.min(), values.max())})["t"]
    lo, hi = R.mse_range(h)
    assert R.quant_error(h, lo, hi) < 0.8 * R.quant_error(h, h.lo, h.hi)
    assert h.lo < lo < 0 < hi < h.hi


def test_mse_never_worse_than_minmax_per_tensor() -> None:
    rng = np.random.default_rng(1)
    for values in (rng.exponential(size=5000), rng.standard_normal(5000) * 3 + 1, np.abs(rng.standard_normal(5000))):
        h = R.histogram_pass(lambda consume: consume({"t": values}), {"t": (values.min(), values.max())})["t"]
        assert R.quant_error(h, *R.mse_range(h)) <= R.quant_error(h, min(h.lo, 0), max(h.hi, 0)) + 1e-12


def test_already_quantized_model_is_refused() -> None:
    model = PATTERNS["chain"](0)
    q = quantize(model, _data(model)).model
    with pytest.raises(onnxprune.ConfigError, match="already quantized"):
        quantize(q, _data(model))


def test_old_opset_is_converted() -> None:
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    q = quantize(model, _data(model)).model
    assert max(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= 13


def test_cli_quantize_and_slim_int8(tmp_path: Path) -> None:
    model = PATTERNS["residual_add"](0)
    path, npy = tmp_path / "m.onnx", tmp_path / "c.npy"
    onnx.save(model, str(path))
    np.save(npy, _data(model).batches[0])
    assert main(["quantize", str(path), "--calib", str(npy), "-q", "--json", str(tmp_path / "q.json")]) == 0
    assert (tmp_path / "m.int8.onnx").exists()
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["kind"] == "quantize"
    import jsonschema
    jsonschema.validate(report, json.loads((Path(onnxprune.__file__).parent / "schemas" / "report.schema.json")
                                           .read_text()))
    rows = report["layer_errors"]
    assert rows and all(r["sqnr_db"] is None or r["sqnr_db"] > 10 for r in rows)
    int8_convs = {n.name for n in model.graph.node if n.op_type == "Conv"} - set(report["excluded"])
    assert int8_convs and int8_convs <= {r["node"] for r in rows if r["op_type"].startswith("Conv")}
    assert main(["slim", str(path), "--ratio", "0.25", "--round-to", "1", "--int8", "--calib", str(npy), "-q",
                 "--max-drop", "0", "--task", "outputs", "--json", str(tmp_path / "s.json")]) == 0
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["kind"] == "slim+int8" and abs(report["slim"]["achieved_ratio"] - 0.25) <= 0.01
    assert any(n.startswith("--max-drop 0.0: drop") for n in report["quantize"]["notes"])  # slim --int8 passes it on
    jsonschema.validate(report, json.loads((Path(onnxprune.__file__).parent / "schemas" / "report.schema.json")
                                           .read_text()))
    final = onnx.load(str(tmp_path / "m.slim.int8.onnx"))
    onnx.checker.check_model(final)
    # End-to-end fidelity is against the original fp32 model, on the held-out samples.
    from onnxprune.calibration import load_calibration
    from onnxprune.calibration.split import CalibrationSplit
    from onnxprune.graph.shapes import representative_shapes
    held = CalibrationSplit.split(load_calibration(npy, model), 0.25, representative_shapes(model)).held
    a, b = run(model, {"x": held})[0].ravel(), run(final, {"x": held})[0].ravel()
    assert report["fidelity"]["n_inputs"] == len(held) == report["slim"]["calibration"]["held_out"]
    assert report["fidelity"]["outputs"][0]["cosine"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b),
                                                                      abs=1e-5)
    assert main(["quantize", str(path), "-q"]) == 2  # no --calib


def test_wrong_calibration_shape_is_a_clear_error(tmp_path: Path, capsys) -> None:
    model = PATTERNS["chain"](0)
    path, npy = tmp_path / "m.onnx", tmp_path / "c.npy"
    onnx.save(model, str(path))
    np.save(npy, np.zeros((4, 5, 16, 16), np.float32))
    assert main(["quantize", str(path), "--calib", str(npy)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err
    assert not (tmp_path / "m.int8.onnx").exists()


def test_equalization_preserves_function_and_balances_ranges() -> None:
    import onnx_ir as ir
    from onnxprune.passes import equalize
    from onnxprune.pipeline import prepare
    from onnxprune.sample_models import GENERATED, NOMINAL_INPUT
    model = GENERATED["mobilefacenet"]()
    prep = prepare(model, simplify=False)
    eq, record = equalize(prep.model)
    assert record.pairs
    x = np.random.default_rng(0).standard_normal(NOMINAL_INPUT["mobilefacenet"]).astype(np.float32)
    a, b = run(model, {"input": x})[0], run(ir.to_proto(eq), {"input": x})[0]
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())

    def spread(m) -> float:  # how unequal per-channel weight ranges are, worst layer
        worst = 0.0
        for name, v in m.graph.initializers.items():
            w = v.const_value.numpy()
            if w.ndim == 4:
                r = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
                worst = max(worst, float(r.max() / max(r.min(), 1e-12)))
        return worst

    assert spread(eq) < spread(prep.model)


def test_max_drop_keeps_the_most_harmful_layers_in_float() -> None:
    model = PATTERNS["chain"](1)
    data = _data(model)
    plain = quantize(model, data)
    strict = quantize(model, data, max_drop=0.0, max_float_layers=2)
    kept = [e for e in strict.report.excluded if e not in plain.report.excluded]  # beyond the speed rule's
    assert kept and len(kept) <= 2
    assert any("--max-drop" in n for n in strict.report.notes)
    cos = lambda r: r.report.fidelity["outputs"][0]["cosine"]  # noqa: E731
    assert cos(strict) >= cos(plain) - 1e-6


def test_layer_errors_match_ort_debugging_and_find_a_broken_layer() -> None:
    """The table reproduces qdq_loss_debug's SQNR, and the layer given a bad range is the one blamed."""
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio as ort_sqnr
    from onnxprune.calibration.activations import stream
    from onnxprune.int8 import most_harmful_layer
    from onnxprune.quantization import pre_process, quantize_qdq
    from onnxprune.quantization.layer_error import layer_errors, worst_layers
    from onnxprune.quantization.qdq import compute_ranges
    model = PATTERNS["chain"](0)
    x = _data(model).batches[0]
    pre = pre_process(model)
    ranges = compute_ranges(pre, "x", [x], "mse")
    conv2 = next(n for n in pre.graph.node if n.op_type == "Conv" and n.name != "Conv_1")
    relu2 = next(n for n in pre.graph.node if n.input[0] == conv2.output[0])
    lo, hi = ranges[relu2.output[0]]
    bad = dict(ranges, **{relu2.output[0]: (lo, hi * 0.2)})  # clips 80% of the range of the 2nd layer
    q, _ = quantize_qdq(pre, "x", [x], ranges=bad)
    rows = layer_errors(pre, q, "x", [x], samples=4)
    by_tensor = {r.tensor: r for r in rows}
    got: dict = {}
    stream(pre, [relu2.output[0]], "x", [x[:4]], got.update)
    want = dict(got)
    stream(q, [relu2.output[0]], "x", [x[:4]], got.update)
    assert abs(by_tensor[relu2.output[0]].sqnr_db - ort_sqnr(want[relu2.output[0]], got[relu2.output[0]])) < 0.05
    assert worst_layers(rows, 1)[0].node == conv2.name
    assert by_tensor[relu2.output[0]].sqnr_db < 15 < min(r.sqnr_db for r in rows if r.node != conv2.name)
    assert most_harmful_layer(pre, rows) == conv2.name
    assert most_harmful_layer(pre, rows, skip=[conv2.name]) != conv2.name


def test_layers_slow_in_int8_stay_float() -> None:
    """The 3-channel stem conv and depthwise convs under 16 channels (with their activation) stay float."""
    from onnxprune.quantization.latency import slow_int8_layers
    model = PATTERNS["depthwise"](0)  # stem 3->12 (+BN+act), depthwise 12, pointwise 12->8
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    act_of = {n.input[0]: n.name for n in model.graph.node if n.op_type in ("Relu", "LeakyRelu")}
    slow = slow_int8_layers(PATTERNS["depthwise"](0))
    assert convs[0].name in slow and convs[1].name in slow and convs[2].name not in slow
    chain = PATTERNS["chain"](0)  # stem 3->8, then 8->16 (not depthwise): only the stem
    assert slow_int8_layers(chain) == [chain.graph.node[0].name]
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.zeros((16, 3, 3, 3), np.float32), "w")
    wide_stem = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="stem16")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 6, 6])], [w]))
    assert slow_int8_layers(wide_stem) == []  # 16 output channels fill the int8 vectors: stays int8
    result = quantize(model, _data(model))
    assert convs[0].name in result.report.excluded and any("CPU speed" in n for n in result.report.notes)
    assert result.report.kernels.get("QLinearConv", 0) >= 1  # the pointwise conv is still int8
    off = quantize(model, _data(model), float_slow_layers=False)
    assert not off.report.excluded and off.report.kernels["QLinearConv"] > result.report.kernels["QLinearConv"]
    assert set(act_of.values()) <= set(result.report.excluded)  # BN folded: the activations follow their conv


def test_feeding_layers_walk_back_through_activations_and_stop_at_joins() -> None:
    """The island of a layer: the weighted layers whose output reaches it through activations only."""
    from onnxprune.quantization.islands import feeding_layers, islands
    h, rng = onnx.helper, np.random.default_rng(0)
    w = lambda n, *s: onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)  # noqa: E731
    nodes = [h.make_node("Conv", ["x", "w0"], ["a"], name="stem"),
             h.make_node("Conv", ["a", "w1"], ["b"], name="pw"),
             h.make_node("Mul", ["b", "slope"], ["bs"], name="prelu.mul"), h.make_node("Max", ["b", "bs"], ["p"],
                                                                                       name="prelu"),
             h.make_node("Conv", ["p", "w2"], ["c"], name="dw", group=4),
             h.make_node("Add", ["c", "a"], ["s"], name="add"),
             h.make_node("Relu", ["s"], ["r"], name="relu"), h.make_node("Conv", ["r", "w3"], ["y"], name="head")]
    inits = [w("w0", 4, 3, 1, 1), w("w1", 4, 4, 1, 1), w("w2", 4, 1, 3, 3), w("w3", 2, 4, 1, 1), w("slope", 4, 1, 1)]
    vi = lambda n, c: h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, c, 8, 8])  # noqa: E731
    model = h.make_model(h.make_graph(nodes, "g", [vi("x", 3)], [vi("y", 2)], initializer=inits))
    assert feeding_layers(model, "dw") == ["pw"]  # through the PRelu rewrite's Mul/Max
    assert feeding_layers(model, "pw") == ["stem"]
    assert feeding_layers(model, "head") == []  # an Add joins two streams: no island through it
    assert feeding_layers(model, "stem") == [] and feeding_layers(model, "nope") == []
    assert islands(model, "dw") == [["dw"], ["dw", "pw"], ["dw", "pw", "stem"]]  # two levels back
    assert islands(model, "dw", depth=1) == [["dw"], ["dw", "pw"]] and islands(model, "head") == [["head"]]
