"""Range calibrators behind one interface, ORT's own calibrators as adapters, and quantize comparing them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune import int8
from onnxprune.calibration import CalibrationSet
from onnxprune.cli import main
from onnxprune.compress import QuantizeOptions as CompressQuantizeOptions
from onnxprune.errors import ConfigError
from onnxprune.int8 import QuantizeOptions, quantize
from onnxprune.quantization import CALIBRATORS, THRESHOLDS, pre_process, quantize_qdq, to_opset13
from onnxprune.quantization import calibrators as C
from onnxprune.quantization import ranges as R
from onnxprune.quantization.qdq import _quiet_root_logger, _Reader

from .pattern_models import PATTERNS

SCHEMA = json.loads((Path(onnxprune.__file__).parent / "schemas" / "report.schema.json").read_text())
QUIET = lambda *a, **k: None  # noqa: E731


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def _digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


# ------------------------------------------------------------------------------------------ the interface
def test_registry_is_the_cli_names_and_every_calibrator_is_named_after_its_key() -> None:
    assert THRESHOLDS == tuple(CALIBRATORS) == ("mse", "minmax", "percentile", "ort-minmax", "ort-percentile",
                                                "ort-entropy", "trained")
    for name in THRESHOLDS:
        cal = C.make_calibrator(name, per_channel=False, exclude_nodes=("a",))
        assert cal.name == name and callable(cal.ranges)
    # each takes only the settings it uses
    assert C.make_calibrator("trained", per_channel=False, exclude_nodes=("a",)) == C.Trained(False, ("a",))
    assert C.make_calibrator("ort-entropy", per_channel=False, exclude_nodes=("a",)) == C.OrtCalibrator("entropy", ("a",))
    assert C.make_calibrator("mse", per_channel=False) == C.Mse()
    with pytest.raises(ConfigError, match="--thresholds"):
        C.make_calibrator("kl")
    with pytest.raises(ConfigError):
        C.OrtCalibrator("distribution")


def test_statistics_passes_run_once_and_calibrators_agree_with_the_range_functions(monkeypatch) -> None:
    pre = pre_process(PATTERNS["chain"](0))
    runs = []
    real = R.stream
    monkeypatch.setattr(R, "stream", lambda *a, **k: (runs.append(1), real(*a, **k)))
    stats = R.ActivationStats(pre, "x", [_x(8), _x(8, 1)])
    minmax = C.MinMax().ranges(stats)
    mse, pct = C.Mse().ranges(stats), C.Percentile().ranges(stats)
    assert len(runs) == 2  # one min/max pass, one histogram pass, shared by the three
    hists = stats.histograms()
    assert set(minmax) == set(mse) == set(pct) == set(stats.names)
    for n, h in hists.items():
        assert mse[n] == R.mse_range(h) and pct[n] == R.percentile_range(h)
        lo, hi = minmax[n]
        assert lo - 1e-6 <= mse[n][0] <= 0 <= mse[n][1] <= max(hi, 0) + 1e-6


def test_inf_activations_keep_their_minmax_so_they_stay_float() -> None:
    stats = R.ActivationStats(onnx.ModelProto(), "x", [])
    stats._names = ["a", "b"]
    stats._minmax = {"a": (-1.0, 2.0), "b": (0.0, float("inf"))}
    stats._hists = {"a": R.TensorHistogram(-1.0, 2.0, np.ones(16))}
    got = C.Mse().ranges(stats)
    assert got["b"] == (0.0, float("inf")) and got["a"][0] < 0 < got["a"][1]


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
@pytest.mark.parametrize("pattern", ["chain", "leaky_clip", "softmax_channel"])
def test_ort_calibrator_through_overrides_is_byte_identical_to_quantize_static(pattern: str, method: str,
                                                                             tmp_path: Path) -> None:
    """Fed through TensorQuantOverrides like ours, ORT's ranges give the very model quantize_static writes."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    pre = pre_process(to_opset13(PATTERNS[pattern](0)))
    name = pre.graph.input[0].name
    batches = [_x(8), _x(8, 1)]
    onnx.save(pre, str(tmp_path / "f.onnx"))
    with _quiet_root_logger():
        quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), _Reader(name, batches),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=methods[method],
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    ranges = C.OrtCalibrator(method).ranges(R.ActivationStats(pre, name, batches))
    ours, record = quantize_qdq(pre, name, batches, thresholds=f"ort-{method}", ranges=ranges)
    assert record.ranges and _digest(ours) == _digest(onnx.load(str(tmp_path / "q.onnx")))
    assert list(ranges) == sorted(ranges)  # not ORT's set order, which changes with the hash seed


# ---------------------------------------------------------------------------------- quantize compares them
def test_quantize_keeps_the_best_calibrator_and_reports_each_score() -> None:
    model = PATTERNS["se"](0)
    data = CalibrationSet("x", [_x(40)])
    result = quantize(model, data, compare_ort=True, progress=QUIET)
    comp = result.report.calibrators
    assert [c.calibrator for c in comp.candidates] == ["mse", "ort-minmax", "ort-percentile", "ort-entropy"]
    assert comp.requested == "mse" and comp.held_out == 10 and comp.metric == "mean output cosine"
    best = comp.candidates[0]
    for c in comp.candidates[1:]:  # better by a margin on the headline, or on a tie there on the cosine
        tie = abs(c.score - best.score) <= int8.ORT_WIN_MARGIN
        if (c.cosine > best.cosine + int8.ORT_WIN_MARGIN) if tie else (c.score > best.score + int8.ORT_WIN_MARGIN):
            best = c
    assert comp.winner == best.calibrator and result.report.thresholds == comp.winner
    headline = float(np.mean([o["cosine"] for o in result.report.fidelity["outputs"]]))
    assert headline == best.score == best.cosine
    assert best.score >= max(c.score for c in comp.candidates) - int8.ORT_WIN_MARGIN
    assert result.report.layer_errors and comp.seconds > 0
    data_dict = json.loads(json.dumps(result.report.to_dict()))
    import jsonschema
    jsonschema.validate(data_dict, SCHEMA)
    assert data_dict["calibrators"]["winner"] == comp.winner
    assert "calibrators on 10 held-out" in result.report.summary()


def test_ort_ranges_replace_ours_when_ours_are_worse(monkeypatch) -> None:
    model = PATTERNS["chain"](1)
    data = CalibrationSet("x", [_x(40)])
    real = C.Mse.ranges
    monkeypatch.setattr(C.Mse, "ranges", lambda self, stats: {n: (lo * 0.05, hi * 0.05)
                                                               for n, (lo, hi) in real(self, stats).items()})
    result = quantize(model, data, compare_ort=True, progress=QUIET)
    comp = result.report.calibrators
    assert comp.winner.startswith("ort-") and result.report.thresholds == comp.winner
    assert comp.candidates[0].score < max(c.score for c in comp.candidates[1:])
    assert result.report.layer_errors  # measured on the model kept
    plain = quantize(model, data, compare_ort=False, progress=QUIET)
    assert plain.report.calibrators is None and plain.report.thresholds == "mse"
    cos = lambda r: r.report.fidelity["outputs"][0]["cosine"]  # noqa: E731
    assert cos(result) > cos(plain)


def test_automatic_comparison_needs_enough_held_out_samples_and_a_small_model(monkeypatch) -> None:
    model = PATTERNS["chain"](0)
    few = quantize(model, CalibrationSet("x", [_x(16)]), progress=QUIET)  # 4 held out
    off = quantize(model, CalibrationSet("x", [_x(16)]), compare_ort=False, progress=QUIET)
    assert few.report.calibrators is None and any("not compared: 4 held-out" in n for n in few.report.notes)
    assert _digest(few.model) == _digest(off.model)
    assert not any("not compared" in n for n in off.report.notes)
    assert quantize(model, CalibrationSet("x", [_x(40)]), progress=QUIET).report.calibrators is not None
    monkeypatch.setattr(int8, "ORT_COMPARE_MAX_MACS", 0)
    big = quantize(model, CalibrationSet("x", [_x(40)]), progress=QUIET)
    assert big.report.calibrators is None and any("GMAC" in n for n in big.report.notes)
    forced = quantize(model, CalibrationSet("x", [_x(40)]), compare_ort=True, progress=QUIET)
    assert forced.report.calibrators is not None


def test_an_ort_calibrator_asked_for_is_compared_with_the_other_two() -> None:
    result = quantize(PATTERNS["chain"](0), CalibrationSet("x", [_x(40)]), thresholds="ort-percentile",
                      compare_ort=True, progress=QUIET)
    comp = result.report.calibrators
    assert [c.calibrator for c in comp.candidates] == ["ort-percentile", "ort-minmax", "ort-entropy"]
    assert comp.requested == "ort-percentile"


# ---------------------------------------------------------------------------------------------- options
def test_options_object_and_keywords() -> None:
    assert CompressQuantizeOptions is QuantizeOptions  # one definition, the API's
    opts = QuantizeOptions(exclude=["a"])  # type: ignore[arg-type]
    assert opts.exclude == ("a",) and opts.compare_ort is None
    with pytest.raises(ConfigError, match="--thresholds"):
        QuantizeOptions(thresholds="kl")
    with pytest.raises(ConfigError, match="--max-drop"):
        QuantizeOptions(max_drop=1.5)
    with pytest.raises(ConfigError, match="--max-float-layers must be at least 1"):
        QuantizeOptions(max_drop=0.01, max_float_layers=0)
    model = PATTERNS["chain"](0)
    data = CalibrationSet("x", [_x(16)])
    a = quantize(model, data, QuantizeOptions(thresholds="minmax", tile=False), progress=QUIET)
    b = quantize(model, data, thresholds="minmax", tile=False, progress=QUIET)
    c = quantize(model, data, QuantizeOptions(thresholds="mse"), thresholds="minmax", tile=False, progress=QUIET)
    assert _digest(a.model) == _digest(b.model) == _digest(c.model) and a.report.thresholds == "minmax"
    with pytest.raises(TypeError):
        quantize(model, data, equalize_ranges=False)


# ------------------------------------------------------------------------------------- CLI and determinism
RUN = """
import sys
from onnxprune.cli import main
d = sys.argv[1]
assert main(["quantize", d + "/m.onnx", "--calib", d + "/c.npy", "--ort-compare", "on", "--seed", "3",
             "-o", sys.argv[2], "--json", sys.argv[3], "-q"]) == 0
"""


def test_cli_comparison_is_byte_identical_across_processes_and_its_report_validates(tmp_path: Path) -> None:
    import jsonschema
    from onnxprune.sample_models import GENERATED
    onnx.save(GENERATED["se-block"](), str(tmp_path / "m.onnx"))
    np.save(tmp_path / "c.npy", np.random.default_rng(0).standard_normal((40, 3, 32, 32)).astype(np.float32))
    digests, reports = [], []
    for run, seed in enumerate(("1", "2")):
        out, rep = tmp_path / f"q{run}.onnx", tmp_path / f"q{run}.json"
        proc = subprocess.run([sys.executable, "-c", RUN, str(tmp_path), str(out), str(rep)],
                              env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
        reports.append(json.loads(rep.read_text()))
    assert digests[0] == digests[1]
    for data in reports:
        jsonschema.validate(data, SCHEMA)
        assert len(data["calibrators"]["candidates"]) == 4
    assert reports[0]["calibrators"]["winner"] == reports[1]["calibrators"]["winner"]


def test_cli_ort_compare_off(tmp_path: Path) -> None:
    model = PATTERNS["chain"](0)
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.save(tmp_path / "c.npy", _x(40))
    assert main(["quantize", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npy"), "--ort-compare", "off",
                 "-o", str(tmp_path / "q.onnx"), "--json", str(tmp_path / "q.json"), "-q"]) == 0
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["calibrators"] is None and data["thresholds"] == "mse"
