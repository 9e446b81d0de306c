"""Replayable pruning plans: `slim --save-plan`, `onnxprune apply-plan`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune.calibration import CalibrationSet
from onnxprune.cli import main
from onnxprune.errors import ConfigError
from onnxprune.plan import Plan, apply_plan
from onnxprune.sample_models.generate import GENERATED

QUIET = dict(progress=lambda *a: None)


def _digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def _retrained(model: onnx.ModelProto, seed: int = 1) -> onnx.ModelProto:
    """The same architecture with other weights (as next week's training run would give)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for init in out.graph.initializer:
        arr = onnx.numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 1:
            noisy = (arr * rng.uniform(0.5, 1.5, arr.shape)).astype(np.float32)
            if init.name.endswith(("running_var", ".var")) or "var" in init.name:
                noisy = np.abs(noisy) + 1e-3
            init.CopyFrom(onnx.numpy_helper.from_array(noisy, init.name))
    return out


def _widths(model: onnx.ModelProto) -> dict[str, int]:
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return {n.name: weights[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in weights}


@pytest.mark.parametrize("name", ["mobilefacenet", "scrfd", "se-block"])
def test_data_free_plan_reapplied_to_the_same_model_gives_the_same_bytes(name: str) -> None:
    model = GENERATED[name]()
    result = onnxprune.slim(model, 0.5, **QUIET)
    replayed = apply_plan(model, Plan.load_text(result.plan.to_json()), **QUIET)
    assert _digest(replayed.model) == _digest(result.model)


def test_plan_applies_to_retrained_weights_of_the_same_architecture(tmp_path: Path) -> None:
    model = GENERATED["mobilefacenet"]()
    result = onnxprune.slim(model, 0.4, round_to=4, **QUIET)
    retrained = _retrained(model)
    replayed = apply_plan(retrained, result.plan, **QUIET)
    assert _widths(replayed.model) == _widths(result.model)
    onnx.checker.check_model(replayed.model)
    x = np.random.default_rng(0).standard_normal((2, 3, 112, 112)).astype(np.float32)
    out = ort.InferenceSession(replayed.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {
        replayed.model.graph.input[0].name: x})
    assert np.isfinite(out[0]).all()
    assert replayed.params_after == onnxprune.slim(model, 0.4, round_to=4, **QUIET).report.params_after


def test_staged_and_calibrated_plans_replay_with_a_refit() -> None:
    model = GENERATED["mobilefacenet"]()
    x = np.random.default_rng(0).standard_normal((24, 3, 112, 112)).astype(np.float32)
    calib = CalibrationSet(model.graph.input[0].name, [x])
    result = onnxprune.slim(model, 0.5, stages=2, round_to=4, calibration=calib, task="embedding", **QUIET)
    replayed = apply_plan(_retrained(model, 2), result.plan, calibration=calib, task="embedding", **QUIET)
    assert _widths(replayed.model) == _widths(result.model)
    assert replayed.refitted > 0 and replayed.fidelity is not None
    assert replayed.fidelity.headline()[0] == "embedding cosine"


def test_plan_for_another_graph_is_refused(tmp_path: Path, capsys) -> None:
    plan = onnxprune.slim(GENERATED["mobilefacenet"](), 0.5, **QUIET).plan
    with pytest.raises(ConfigError, match="another graph"):
        apply_plan(GENERATED["iresnet"](), plan, **QUIET)
    renamed = GENERATED["mobilefacenet"]()
    for node in renamed.graph.node:
        node.input[:] = ["data" if i == "input" else i for i in node.input]
    renamed.graph.input[0].name = "data"
    with pytest.raises(ConfigError, match="another graph .its inputs"):  # other input names: said as such
        apply_plan(renamed, plan, **QUIET)
    src, path = tmp_path / "other.onnx", tmp_path / "plan.json"
    onnx.save(GENERATED["iresnet"](), str(src))
    plan.save(path)
    assert main(["apply-plan", str(src), str(path), "-o", str(tmp_path / "out.onnx"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxprune: error: the plan was made for another graph")
    assert not (tmp_path / "out.onnx").exists()


def test_cli_round_trip(tmp_path: Path) -> None:
    src, plan, first, second = (tmp_path / n for n in ("m.onnx", "plan.json", "a.onnx", "b.onnx"))
    onnx.save(GENERATED["scrfd"](), str(src))
    assert main(["slim", str(src), "--ratio", "0.5", "--save-plan", str(plan), "-o", str(first), "-q"]) == 0
    data = json.loads(plan.read_text())
    assert data["format"] == "onnxprune-plan" and data["kept"]
    report = tmp_path / "r.json"
    assert main(["apply-plan", str(src), str(plan), "-o", str(second), "--json", str(report), "-q"]) == 0
    assert first.read_bytes() == second.read_bytes()
    assert json.loads(report.read_text())["kind"] == "apply-plan"


@pytest.mark.parametrize("text,message", [
    ("not json", "not JSON"), ('{"format": "x"}', "not a pruning plan"),
    ('{"format": "onnxprune-plan", "version": 9}', "version 9"),
    ('{"format": "onnxprune-plan", "version": 1, "kept": {}}', "malformed"),
])
def test_bad_plans_are_refused_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Plan.load(path)
