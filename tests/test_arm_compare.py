"""The verdicts of benchmarks/arm_emulation/compare.py (the ARM-vs-x86 check), on synthetic outputs.

The emulated run itself is a benchmark (minutes under qemu); this pins the tolerance logic it reports with.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "arm_emulation" / "compare.py"
_spec = importlib.util.spec_from_file_location("arm_compare", _PATH)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

STEP = 0.01


def _work(tmp_path: Path, outputs: dict[str, dict[str, np.ndarray]]) -> Path:
    """A work dir with an fp32 classifier, its int8 version, and the given per-tag outputs of both."""
    models = [
        {"name": "m fp32", "file": "m.onnx", "kind": "fp32", "task": "classification", "inputs": {},
         "output_steps": {}, "fp32_of": None},
        {"name": "m int8", "file": "m.int8.onnx", "kind": "int8", "task": "classification", "inputs": {},
         "output_steps": {"y": STEP}, "fp32_of": "m fp32"},
    ]
    (tmp_path / "manifest.json").write_text(json.dumps({"models": models}))
    for tag, per_model in outputs.items():
        d = tmp_path / "outputs" / tag
        d.mkdir(parents=True)
        (d / "info.json").write_text(json.dumps({"machine": tag, "onnxruntime": "x", "provider": "CPU"}))
        for name, y in per_model.items():
            np.savez(d / (compare._slug(name) + ".npz"), y=y)
    return tmp_path


def _verdicts(work: Path, tag: str = "arm") -> dict[str, str]:
    return {e["name"]: compare._compare_model(work, e, "x86", tag)[0]
            for e in json.loads((work / "manifest.json").read_text())["models"]}


@pytest.fixture
def base() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    fp32 = rng.normal(size=(4, 81)).astype(np.float32)
    fp32[np.arange(4), np.arange(4)] += 10.0  # clear top-1 classes
    int8 = (np.round(fp32 / STEP) * STEP + rng.normal(0, 3 * STEP, size=fp32.shape)).astype(np.float32)
    return fp32, int8


def test_within_tolerance_is_ok(tmp_path: Path, base) -> None:
    fp32, int8 = base
    work = _work(tmp_path, {"x86": {"m fp32": fp32, "m int8": int8},
                            "arm": {"m fp32": fp32 * (1 + 1e-6), "m int8": int8 + 2 * STEP}})
    assert _verdicts(work) == {"m fp32": "ok", "m int8": "ok"}
    assert compare.diff(work, "x86", ["arm"]) == 0


def test_fp32_beyond_1e4_relative_fails(tmp_path: Path, base) -> None:
    fp32, int8 = base
    arm = fp32.copy()
    arm[0, 5] += 1e-3 * np.abs(fp32).max()
    work = _work(tmp_path, {"x86": {"m fp32": fp32, "m int8": int8}, "arm": {"m fp32": arm, "m int8": int8}})
    assert _verdicts(work)["m fp32"] == "FAIL"
    assert compare.diff(work, "x86", ["arm"]) == 1


def test_int8_drift_with_same_accuracy_vs_fp32_is_drift(tmp_path: Path, base) -> None:
    fp32, int8 = base
    # another draw of the same quantisation noise: many steps from x86's int8, as far from fp32 as it is
    arm = (np.round(fp32 / STEP) * STEP + np.random.default_rng(1).normal(0, 3 * STEP, fp32.shape)).astype(np.float32)
    work = _work(tmp_path, {"x86": {"m fp32": fp32, "m int8": int8}, "arm": {"m fp32": fp32, "m int8": arm}})
    assert _verdicts(work)["m int8"] == "drift"
    assert compare.diff(work, "x86", ["arm"]) == 0


def test_int8_worse_than_x86_fails(tmp_path: Path, base) -> None:
    fp32, int8 = base
    arm = int8.copy()
    arm[:, :40] = 0.0  # half the logits gone: far from fp32, top-1 may survive but cosine does not
    work = _work(tmp_path, {"x86": {"m fp32": fp32, "m int8": int8}, "arm": {"m fp32": fp32, "m int8": arm}})
    assert _verdicts(work)["m int8"] == "FAIL"
    assert compare.diff(work, "x86", ["arm"]) == 1
