"""Report records are typed (frozen dataclasses) and serialise, through one helper, to the JSON they
always had: the same keys in the same order, the same values, valid against the schema."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.calibration import CalibrationSet
from onnxprune.check import LatencyReport, check
from onnxprune.fidelity import FidelityReport, OutputFidelity
from onnxprune.report import CalibrationReport, SensitivityReport, _finite, record_dict

from .test_reports import SCHEMA, calib, model  # noqa: F401 - the same se-block model and noise samples

# The keys these records had as dicts, in order (the JSON written before they were typed).
CALIBRATION_KEYS = ["samples", "fit", "held_out", "files", "preprocess", "notes"]
SENSITIVITY_KEYS = ["group", "layers", "fractions", "distortion", "channels_before", "channels_after"]
LATENCY_KEYS = ["provider", "threads", "runs", "input_shapes", "median_ms", "p90_ms", "speedup_iqr"]
CHECK_KEYS = ["schema", "kind", "passed", "exit_code", "original", "candidate", "criteria", "notes", "fidelity",
              "latency"]


def _json(data: dict) -> dict:
    return json.loads(json.dumps(_finite(data)))


def test_record_dict_is_asdict_with_numpy_as_python() -> None:
    @dataclasses.dataclass
    class Inner:
        a: float
        b: tuple[int, int]

    @dataclasses.dataclass
    class Outer:
        inner: Inner
        rows: list[Inner]
        named: dict[str, Inner]
        none: None = None

    plain = Outer(Inner(0.5, (1, 2)), [Inner(1.5, (3, 4))], {"k": Inner(2.5, (5, 6))})
    assert record_dict(plain) == dataclasses.asdict(plain)
    assert record_dict([plain.inner]) == [{"a": 0.5, "b": (1, 2)}]
    assert isinstance(record_dict(plain)["inner"]["b"], tuple)  # as asdict: tuples stay tuples
    numpy = Outer(Inner(np.float32(0.5), (np.int64(1), 2)), [], {"k": Inner(np.float64(2.5), np.array([5, 6]))})
    converted = record_dict(numpy)
    assert json.dumps(converted) == '{"inner": {"a": 0.5, "b": [1, 2]}, "rows": [], "named": {"k": {"a": 2.5, ' \
                                    '"b": [5, 6]}}, "none": null}'
    assert type(converted["inner"]["a"]) is float and type(converted["inner"]["b"][0]) is int
    assert record_dict(None) is None


def test_a_nested_record_serialises_by_its_own_to_dict() -> None:
    @dataclasses.dataclass
    class Own:
        hidden: int

        def to_dict(self) -> dict:
            return {"shown": self.hidden}

    @dataclasses.dataclass
    class Holder:
        own: Own
        many: list[Own]

    assert record_dict(Holder(Own(1), [Own(2)])) == {"own": {"shown": 1}, "many": [{"shown": 2}]}
    assert record_dict(Own(3)) == {"hidden": 3}  # the record itself: its fields (what its to_dict builds on)


def test_records_are_frozen() -> None:
    record = CalibrationReport(4, 3, 1, [], "array, used as is")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.fit = 2  # type: ignore[misc]
    assert list(record.to_dict()) == CALIBRATION_KEYS


def test_slim_report_records_serialise_as_before(model: onnx.ModelProto, calib: CalibrationSet) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    report = onnxprune.slim(model, 0.5, calibration=calib, round_to=4, workers=1).report
    assert isinstance(report.calibration, CalibrationReport) and isinstance(report.fidelity, FidelityReport)
    assert report.sensitivity and all(isinstance(s, SensitivityReport) for s in report.sensitivity)
    data = report.to_dict()
    assert data["calibration"] == {"samples": 12, "fit": 9, "held_out": 3, "files": [],
                                   "preprocess": "array, used as is", "notes": []}
    assert list(data["calibration"]) == CALIBRATION_KEYS
    assert all(list(row) == SENSITIVITY_KEYS for row in data["sensitivity"])
    first = report.sensitivity[0]
    assert data["sensitivity"][0] == {"group": first.group, "layers": first.layers, "fractions": first.fractions,
                                      "distortion": first.distortion, "channels_before": first.channels_before,
                                      "channels_after": first.channels_after}
    assert data["fidelity"] == report.fidelity.to_dict()  # as when the report stored that dict
    assert list(data["fidelity"]) == list(report.fidelity.to_dict())
    assert report.summary().count("calibration: 9 samples to fit, 3 held out") == 1
    jsonschema.validate(_json(data), SCHEMA)


def test_check_report_records_serialise_as_before(model: onnx.ModelProto, calib: CalibrationSet) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    report = check(model, model, calibration=calib, min_fidelity=0.5, min_speedup=0.1, runs=3, warmup=0)
    assert isinstance(report.fidelity, FidelityReport) and isinstance(report.latency, LatencyReport)
    data = report.to_dict()
    assert list(data) == CHECK_KEYS and list(data["latency"]) == LATENCY_KEYS
    assert data["fidelity"] == report.fidelity.to_dict() and list(data["fidelity"]) == list(report.fidelity.to_dict())
    latency = data["latency"]
    assert latency["provider"] == "CPUExecutionProvider" and latency["threads"] == 1 and latency["runs"] == 3
    assert latency["input_shapes"] == {"input": [1, 3, 32, 32]}
    assert len(latency["median_ms"]) == len(latency["p90_ms"]) == len(latency["speedup_iqr"]) == 2
    jsonschema.validate(_json(data), SCHEMA)
    bare = check(model, model).to_dict()  # no calibration, no timing
    assert bare["fidelity"] is None and bare["latency"] is None
    jsonschema.validate(_json(bare), SCHEMA)


def test_infinite_sqnr_is_written_as_a_string() -> None:
    fidelity = FidelityReport(n_inputs=1, outputs=[OutputFidelity("y", 1.0, float("inf"))])
    written = _json({"fidelity": record_dict(fidelity)})
    assert written["fidelity"]["outputs"][0]["sqnr_db"] == "inf"
