"""The unseen-model harness: every verb through the CLI on face models the project was not developed
against (real facenet-pytorch MTCNN weights; official-export layouts of SCRFD, UltraFace, YuNet, an NHWC
RetinaFace, a 3DDFA regressor), with calibration photos and no --preset."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from onnxprune.sample_models import SampleUnavailable

from .unseen_harness import run_verbs
from .unseen_models import UNSEEN

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
# fidelity task each family is measured with: MTCNN heads are compared output by output (no decoder)
EXPECTED_TASK = {"mtcnn": "outputs", "3ddfa": "outputs"}
# models whose every channel is legitimately unprunable with the ops they use (see the outcome's reason)
MAY_BE_UNPRUNABLE: set[str] = set()


@pytest.mark.parametrize("name", list(UNSEEN))
def test_every_verb_on_an_unseen_model(name: str, tmp_path: Path) -> None:
    if not PHOTOS.is_dir():
        pytest.skip("needs ../shared/data/faces")
    entry = UNSEEN[name]
    if entry.needs_torch and importlib.util.find_spec("torch") is None:
        pytest.skip(f"{name} is exported with torch")
    try:
        model = entry.build(tmp_path / "model")
    except SampleUnavailable as exc:
        pytest.skip(str(exc))
    task = EXPECTED_TASK.get(entry.family, entry.task)
    outcomes = run_verbs(model, PHOTOS, tmp_path / "work", task)
    allowed = {"ok", "unprunable"} if name in MAY_BE_UNPRUNABLE else {"ok"}
    bad = {v: o for v, o in outcomes.items() if o.status not in (allowed if v == "slim" else {"ok"})}
    assert not bad, "\n".join(f"{v}: {o.status}: {o.detail}" for v, o in outcomes.items())
