"""The "unseen" face models build, pass the checker, run in ONNX Runtime and declare the interface they claim."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.sample_models import SampleUnavailable

from .unseen_models import UNSEEN, UnseenModel, example_inputs

# Detectors whose face scores were tuned: (output names, how to get a face probability from each)
_SCORES = {
    "ultraface-rfb320": lambda o: [o["scores"][..., 1]],
    "yunet-2023mar": lambda o: [np.sqrt(o[f"cls_{s}"] * o[f"obj_{s}"]) for s in (8, 16, 32)],
    "retinaface-nhwc-bgr": lambda o: [o["444"][..., 1]],
    "scrfd-official-batched": lambda o: [o[n] for n in ("448", "471", "494")],
    "scrfd-official-flat": lambda o: [o[n] for n in ("448", "471", "494")],
}


class _Built:
    """Each model built once per module, on first use; torch-needing ones skip without torch or offline."""

    def __init__(self, root: Path) -> None:
        self.root, self.paths = root, {}

    def __call__(self, entry: UnseenModel) -> Path:
        if entry.name not in self.paths:
            if entry.needs_torch and importlib.util.find_spec("torch") is None:
                pytest.skip(f"{entry.name} needs torch")
            try:
                self.paths[entry.name] = entry.build(self.root / entry.name)
            except SampleUnavailable as exc:
                pytest.skip(str(exc))
        return self.paths[entry.name]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> _Built:
    return _Built(tmp_path_factory.mktemp("unseen"))


def _dims(vi: onnx.ValueInfoProto) -> tuple:
    return tuple(d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim)


@pytest.mark.parametrize("name", list(UNSEEN))
def test_builds_valid_runnable_declared(name: str, built: _Built) -> None:
    entry = UNSEEN[name]
    assert entry.task in {"detection", "embedding", "classification", "outputs"}
    path = built(entry)
    assert path.is_file() and path.suffix == ".onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    assert tuple((i.name, _dims(i)) for i in model.graph.input if i.name not in inits) == entry.inputs
    assert tuple((o.name, _dims(o)) for o in model.graph.output) == entry.outputs

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (iname, ishape), = entry.inputs
    batch = 2 if ishape[0] == "N" else 1
    feeds = example_inputs(name, count=batch, size=(64, 80))
    x = np.concatenate(feeds)
    outs = sess.run(None, {iname: x})
    for (oname, oshape), got in zip(entry.outputs, outs):
        assert got.dtype == np.float32 and np.isfinite(got).all(), oname
        assert len(got.shape) == len(oshape), (oname, got.shape, oshape)
        for want, have in zip(oshape, got.shape):
            if want == "N":
                assert have == batch, (oname, got.shape)
            elif isinstance(want, int):
                assert have == want, (oname, got.shape, oshape)
    if name == "facenet-mtcnn-pnet":  # 64x80 -> conv 62x78 -> ceil pool 31x39 -> 29x37 -> 27x35
        assert outs[0].shape == (2, 4, 27, 35)


@pytest.mark.parametrize("name", list(_SCORES))
def test_face_scores_plausible_and_input_dependent(name: str, built: _Built) -> None:
    """A few percent of anchors above 0.5 on held-out natural-looking images, varying with the image."""
    path = built(UNSEEN[name])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    per_image = []
    for x in example_inputs(name, count=3, seed=1):
        scores = _SCORES[name](dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x}))))
        per_image.append(np.concatenate([s.ravel() for s in scores]))
    rates = [(s > 0.5).mean() for s in per_image]
    assert all(0.003 < r < 0.15 for r in rates), rates
    assert np.abs(per_image[0] - per_image[1]).mean() > 1e-3  # the image reaches the head


@pytest.mark.parametrize("name", ["3ddfa-mb05", "yunet-2023mar"])
def test_generated_bytes_deterministic(name: str, tmp_path: Path) -> None:
    entry = UNSEEN[name]
    a, b = entry.build(tmp_path / "a"), entry.build(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()


def test_3ddfa_regression_depends_on_input(built: _Built) -> None:
    path = built(UNSEEN["3ddfa-mb05"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    a, b = (sess.run(None, {"input": x})[0] for x in example_inputs("3ddfa-mb05", count=2))
    assert a.shape == (1, 62) and np.abs(a - b).mean() > 1e-2
