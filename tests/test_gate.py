"""Early exit on static frames: the gated model is the original detector whenever its head runs, the gate
opens on motion and stays shut on noise, state survives a save/restore, and bad input fails in one line.

Small generated detectors (random weights, 128x128 input) on procedural 96x128 frames keep this fast.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from onnxprune.calibration import Preprocess
from onnxprune.cli import main
from onnxprune.graph.runtime import session
from onnxprune.passes.gate import RAN_HEAD, SCORE, gate_score, pool_cells
from onnxprune.sample_models import GENERATED
from onnxprune.video import Detector, GatedDetector, GateOptions, GateState, gate, sequence
from onnxprune.video.calibrate import _prefix_model
from onnxprune.video.runtime import prepare
from onnxprune.video.synthetic import LEVELS, MARKER, perturb

SIZE = (128, 128)
FRAME = (96, 128)


def _fixed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The generated detector with its input fixed to 1x3x128x128 (so the preset takes the model's size)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, (1, 3, *SIZE)):
        d.Clear()
        d.dim_value = v
    return model


def _scene(seed: int) -> np.ndarray:
    """A still scene: smooth colour fields plus fine texture (uint8 96x128x3)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(40, 220, (6, 8, 3), dtype=np.uint8)).resize(FRAME[::-1], Image.BICUBIC)
    fine = rng.normal(0, 12, (*FRAME, 3))
    return np.clip(np.asarray(coarse, np.float32) + fine, 0, 255).astype(np.uint8)


def _face(size: int = 40) -> np.ndarray:
    """A face-like patch: a skin-toned disc with dark eyes and mouth."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.empty((size, size, 3), np.float32)
    img[...] = (205, 160, 130)
    for cx, cy, r in ((0.33, 0.4, 0.08), (0.67, 0.4, 0.08)):
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (40, 30, 30)
    img[(np.abs(yy - 0.72) < 0.04) & (np.abs(xx - 0.5) < 0.2)] = (120, 40, 40)
    return img.astype(np.uint8)


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("calib")
    for i in range(6):
        Image.fromarray(_scene(i)).save(folder / f"scene_{i}.png")
    return folder


@pytest.fixture(scope="module", params=["retinaface", "scrfd"])
def gated(request, tmp_path_factory, frames_dir: Path) -> tuple[Path, Path]:
    """(original, gated) paths of a small generated detector, gated through the API."""
    folder = tmp_path_factory.mktemp(request.param)
    original = folder / "det.onnx"
    onnx.save(_fixed(GENERATED[request.param]()), str(original))
    result = gate(original, frames_dir, options=GateOptions(count=6))
    out = folder / "det.gated.onnx"
    result.save(out)
    return original, out


@pytest.fixture(scope="module")
def clip() -> list:
    """40 frames, 80% static: a face enters, moves, stands, leaves (medium noise)."""
    seq = sequence(_scene(11), _face(), frames=40, static=0.8, face_size=32, level=LEVELS["medium"], seed=3)
    return [seq.frame(i) for i in range(len(seq))], seq.moving


def test_gated_model_is_the_original_whenever_the_head_runs(gated, clip) -> None:
    original, path = gated
    frames, moving = clip
    det = GatedDetector(path)
    ref = Detector(original, preprocess=det.preprocess, heads=det.info.heads)
    ran, previous = [], None
    for frame in frames:
        r, want = det.process(frame), ref.process(frame)
        raw, _ = ref.raw(frame)
        ran.append(r.ran_head)
        if r.ran_head:  # bit-exact: raw outputs and decoded detections
            assert all(np.array_equal(det.state.last[n], w) for n, w in zip(ref.names, raw))
            assert np.array_equal(r.detections, want.detections)
        else:
            assert np.array_equal(r.detections, previous)
        previous = r.detections
    assert ran[0] and any(ran) and not all(ran)


def test_gate_opens_on_a_moving_object_and_stays_shut_on_noise(gated, clip) -> None:
    _, path = gated
    frames, moving = clip
    det = GatedDetector(path)
    results = [det.process(f) for f in frames]
    ran = [r.ran_head for r in results]
    assert all(r for r, m in zip(ran, moving) if m), "a frame with a moving face skipped the head"
    assert sum(r and not m for r, m in zip(ran, moving)) == 1  # only the first frame among the static ones
    assert sum(not r for r in ran) / len(ran) >= 0.6

    det.reset()
    rng = np.random.default_rng(5)
    still = _scene(11)
    noisy = [det.process(perturb(still, LEVELS["high"], rng)) for _ in range(25)]
    assert noisy[0].ran_head and not any(r.ran_head for r in noisy[1:])
    assert max(r.score for r in noisy[1:]) < det.info.threshold < min(r.score for r, m in zip(results, moving) if m)


def test_state_round_trips_through_a_file(gated, clip, tmp_path: Path) -> None:
    _, path = gated
    frames, _ = clip
    straight = GatedDetector(path)
    whole = [straight.process(f) for f in frames]
    first = GatedDetector(path)
    head = [first.process(f) for f in frames[:17]]
    first.state.save(tmp_path / "state.npz")
    second = GatedDetector(path)
    second.state = GateState.load(tmp_path / "state.npz")
    resumed = head + [second.process(f) for f in frames[17:]]
    for a, b in zip(whole, resumed):
        assert a.ran_head == b.ran_head and a.score == b.score and np.array_equal(a.detections, b.detections)


def test_gated_model_passes_the_checker_and_its_score_is_the_calibrated_statistic(gated, frames_dir: Path) -> None:
    _, path = gated
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    det = GatedDetector(path)
    a, b = _scene(21), _scene(21).copy()
    b[30:70, 40:80] = _face()[:40, :40]
    det.process(a)
    background = det.state.background[0]
    score = det.process(b).score
    prefix = session(_prefix_model(onnx.load(str(path.with_name("det.onnx"))), det.info.split))
    x, _ = prepare(b, det.preprocess)
    pool = det.info.background_shape
    feats = prefix.run(None, {prefix.get_inputs()[0].name: x})[0]
    k = feats.shape[2] // pool[2]
    weights = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "gate.weights"))
    want = gate_score(pool_cells(feats, k), background.astype(np.float64), weights.reshape(-1))
    assert score == pytest.approx(want, rel=1e-4)
    assert {o.name for o in model.graph.output} >= {RAN_HEAD, SCORE}


def test_preprocessing_fast_path_is_preprocess_apply() -> None:
    pre = Preprocess(size=SIZE, mean=(104.0, 117.0, 123.0), channel_order="bgr", resize="letterbox")
    for shape in ((96, 128, 3), (128, 128, 3), (60, 90, 3)):
        frame = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        fast, where = prepare(frame, pre)
        assert np.array_equal(fast[0], pre.apply(Image.fromarray(frame), SIZE))
        assert where.to_frame(np.array([[0, 0, SIZE[1], SIZE[0], 1.0]]))[0, 2:4].tolist() == [shape[1], shape[0]]


def test_cli_gate_then_video_reports_synthetic_frames(tmp_path: Path, frames_dir: Path, capsys) -> None:
    original = tmp_path / "det.onnx"
    onnx.save(_fixed(GENERATED["retinaface"]()), str(original))
    gated_path = tmp_path / "det.gated.onnx"
    assert main(["gate", str(original), "--calib", str(frames_dir), "--calib-count", "6", "-o", str(gated_path)]) == 0
    assert "split:" in capsys.readouterr().out
    seq = sequence(_scene(11), _face(), frames=20, static=0.8, face_size=32, level=LEVELS["low"], seed=1)
    seq.write(tmp_path / "seq")
    out = tmp_path / "video.json"
    assert main(["video", str(gated_path), str(tmp_path / "seq"), "--baseline", str(original), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SYNTHETIC" in text
    data = json.loads(out.read_text())
    assert len(data["frames"]) == 20 and data["summary"]["synthetic"] is True
    assert {"file", "ran_head", "detections", "ms", "baseline_detections", "baseline_ms"} <= set(data["frames"][0])
    assert {"mean_ms", "baseline_mean_ms", "skipped"} <= set(data["summary"])
    assert "missed" in data["frames"][0] and data["summary"]["missed_faces"] >= 0  # random weights: boxes are noise
    (tmp_path / "seq" / MARKER).unlink()  # the same frames, no longer marked: reported as given
    assert main(["video", str(gated_path), str(tmp_path / "seq"), "--json", str(out), "-q"]) == 0
    assert json.loads(out.read_text())["summary"]["synthetic"] is False


def _error(argv: list[str], capsys, *never: Path) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("onnxprune: error:"), err
    assert not any(p.exists() for p in never)
    return err


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, frames_dir: Path, capsys) -> None:
    det = tmp_path / "det.onnx"
    onnx.save(_fixed(GENERATED["retinaface"]()), str(det))
    recognizer = tmp_path / "mfn.onnx"
    onnx.save(GENERATED["mobilefacenet"](), str(recognizer))
    empty = tmp_path / "empty"
    empty.mkdir()
    out, js = tmp_path / "out.onnx", tmp_path / "out.json"
    assert "not a face detector" in _error(["gate", str(recognizer), "--calib", str(frames_dir), "-o", str(out)],
                                           capsys, out)
    assert "no images" in _error(["gate", str(det), "--calib", str(empty), "-o", str(out)], capsys, out)
    assert "unknown --at tensor 'nope'" in _error(["gate", str(det), "--calib", str(frames_dir), "--at", "nope",
                                                   "-o", str(out)], capsys, out)
    assert "not a gated model" in _error(["video", str(det), str(frames_dir), "--json", str(js)], capsys, js)
    assert "no frames" in _error(["video", str(det), str(empty), "--json", str(js)], capsys, js)
    if importlib.util.find_spec("cv2") is None and importlib.util.find_spec("imageio") is None:
        clip = tmp_path / "door.mp4"
        clip.write_bytes(b"not really a video")
        assert "needs OpenCV" in _error(["video", str(det), str(clip), "--json", str(js)], capsys, js)
