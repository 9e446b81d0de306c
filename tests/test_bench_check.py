"""bench and check: fair timing, per-shape rows, skipped providers, and the CI gate's verdicts and reports."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.bench import bench, netscore
from onnxprune.calibration import CalibrationSet
from onnxprune.check import check
from onnxprune.errors import ConfigError

from .pattern_models import PATTERNS


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return PATTERNS["chain"](0)


@pytest.fixture(scope="module")
def calib() -> CalibrationSet:
    samples = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    return CalibrationSet("x", [samples], [], None, [])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def test_bench_against_a_copy_is_even_and_float(model: onnx.ModelProto) -> None:
    report = bench([model, _copy(model)], runs=30, warmup=3, accuracy={0: 0.9})
    first, second = report.rows
    assert first.ratio_median == pytest.approx(1.0) and 0.5 <= second.ratio_median <= 2.0
    assert second.ratio_iqr is not None and second.ratio_iqr >= 0
    assert all(r.int8_nodes == 0 and r.float_nodes == 2 for r in report.rows)
    assert first.params == second.params > 0 and first.macs > 0 and first.file_bytes == model.ByteSize()
    assert first.min_ms <= first.median_ms <= first.p90_ms and first.throughput > 0
    assert first.netscore == pytest.approx(netscore(0.9, first.params, first.macs)) and second.netscore is None
    assert report.to_dict()["kind"] == "bench" and "vs first" in report.summary()


def test_resolution_sweep_gives_one_row_per_model_and_shape() -> None:
    detector = PATTERNS["chain"](0)
    for d in detector.graph.input[0].type.tensor_type.shape.dim[2:]:  # make H, W free, as a detector's are
        d.dim_param = "S"
    shapes = [{"x": (1, 3, 16, 16)}, {"x": (1, 3, 32, 32)}]
    report = bench([detector], input_shapes=shapes, runs=5, warmup=1)
    assert [r.input_shapes["x"] for r in report.rows] == [[1, 3, 16, 16], [1, 3, 32, 32]]
    assert report.rows[1].macs == 4 * report.rows[0].macs
    assert report.rows[0].ratio_median is None  # one model: nothing to compare
    summary = report.summary()
    assert "1x3x16x16" in summary and "1x3x32x32" in summary


def test_missing_provider_is_a_note_not_an_error(model: onnx.ModelProto) -> None:
    report = bench([model], providers=("NoSuchExecutionProvider", "CPUExecutionProvider"), runs=3, warmup=0)
    assert len(report.rows) == 1 and report.rows[0].provider == "CPUExecutionProvider"
    assert any("NoSuchExecutionProvider" in n for n in report.notes)
    with pytest.raises(ConfigError):
        bench([model], providers=("NoSuchExecutionProvider",))


def test_check_passes_a_model_against_itself(model: onnx.ModelProto, calib: CalibrationSet) -> None:
    report = check(model, _copy(model), calibration=calib, min_fidelity=0.99, max_drop=0.01, min_speedup=0.5,
                   max_size_ratio=1.0, runs=20)
    assert report.exit_code == 0, report.summary()
    assert [c.name for c in report.criteria] == ["validity", "fidelity", "fidelity_drop", "speedup", "size_ratio"]
    assert report.criteria[1].value == pytest.approx(1.0) and "8 calibration inputs" in report.criteria[1].detail


def test_check_fails_a_broken_candidate_with_reports(model: onnx.ModelProto, calib: CalibrationSet) -> None:
    broken = onnxprune.slim(model, 0.9, round_to=1, min_keep=0.0).model  # weight criterion, no calibration
    report = check(model, broken, calibration=calib, min_fidelity=0.99, max_size_ratio=1.0)
    assert report.exit_code == 1
    failed = {c.name for c in report.criteria if not c.passed}
    assert failed == {"fidelity"}
    suite = ET.fromstring(report.to_junit_xml())
    assert suite.tag == "testsuite" and suite.get("name") == "onnxprune-check"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {c.name for c in report.criteria}
    assert cases["fidelity"].find("failure") is not None and cases["validity"].find("failure") is None
    md = report.to_markdown()
    assert "| criterion | value | threshold | detail |" in md and "❌ | fidelity" in md and "✅ | validity" in md


def test_renamed_output_fails_validity(model: onnx.ModelProto, calib: CalibrationSet) -> None:
    renamed = _copy(model)
    old = renamed.graph.output[0].name
    renamed.graph.output[0].name = "renamed"
    for node in renamed.graph.node:
        node.output[:] = ["renamed" if o == old else o for o in node.output]
    report = check(model, renamed, calibration=calib, min_fidelity=0.5)
    validity = report.criteria[0]
    assert report.exit_code == 1 and validity.name == "validity" and not validity.passed
    assert "renamed" in validity.detail


def test_fixing_a_symbolic_dim_fails_validity(model: onnx.ModelProto) -> None:
    fixed = _copy(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    report = check(model, fixed)
    assert report.exit_code == 1 and "symbolic" in report.criteria[0].detail


def test_bad_options_raise_config_errors(model: onnx.ModelProto, calib: CalibrationSet) -> None:
    with pytest.raises(ConfigError, match="calibration"):
        check(model, model, min_fidelity=0.9)
    with pytest.raises(ConfigError, match="--min-fidelity"):
        check(model, model, calibration=calib, min_fidelity=1.5)
    with pytest.raises(ConfigError, match="--task"):
        check(model, model, calibration=calib, task="detection")
