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
    assert result.report.kernels.get("QLinearConv", 0) + result.report.kernels.get("QLinearMatMul", 0) > 0
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
    assert json.loads((tmp_path / "q.json").read_text())["kind"] == "quantize"
    assert main(["slim", str(path), "--ratio", "0.25", "--round-to", "1", "--int8", "--calib", str(npy), "-q",
                 "--json", str(tmp_path / "s.json")]) == 0
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["kind"] == "slim+int8" and abs(report["slim"]["achieved_ratio"] - 0.25) <= 0.01
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.slim.int8.onnx")))
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
    assert strict.report.excluded and len(strict.report.excluded) <= 2
    assert any("--max-drop" in n for n in strict.report.notes)
    cos = lambda r: r.report.fidelity["outputs"][0]["cosine"]  # noqa: E731
    assert cos(strict) >= cos(plain) - 1e-6
