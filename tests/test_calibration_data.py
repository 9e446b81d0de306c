"""Calibration loading: images become exactly the tensor the model expects, or a one-line ConfigError says why not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnxprune.calibration import PRESETS, CalibrationSet, Preprocess, load_calibration, parse_floats, parse_size
from onnxprune.errors import ConfigError

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"


def _model(dims: list[int | str], elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A one-node model (Relu) whose only job is to declare an input shape and run in ORT."""
    x = helper.make_tensor_value_info("x", elem, dims)
    y = helper.make_tensor_value_info("y", elem, None)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _img(path: Path, w: int, h: int, colour: tuple[int, int, int] = (200, 100, 50)) -> Path:
    Image.new("RGB", (w, h), colour).save(path)
    return path


def test_retinaface_letterbox_geometry_and_zero_padding(tmp_path: Path) -> None:
    _img(tmp_path / "wide.png", 200, 100, (10, 20, 30))  # 2:1 -> 640x320 content, rows 320.. padded
    cs = load_calibration(tmp_path / "wide.png", _model(["N", 3, "H", "W"]), preset="retinaface")
    (x,) = cs.batches
    assert x.shape == (1, 3, 640, 640) and x.dtype == np.float32 and cs.name == "x" and not cs.notes
    # BGR minus (104, 117, 123): content pixel (R10, G20, B30) -> (30-104, 20-117, 10-123).
    np.testing.assert_allclose(x[0, :, 100, 100], [30 - 104, 20 - 117, 10 - 123])
    assert np.all(x[0, :, 320:, :] == 0) and np.all(x[0, :, :319, :] != 0)

    _img(tmp_path / "tall.png", 50, 100)  # 1:2 -> 320 wide content, columns 320.. padded
    x = load_calibration(tmp_path / "tall.png", _model([1, 3, 64, 64]), preprocess=Preprocess(
        size=(64, 64), mean=(1.0, 2.0, 3.0), resize="letterbox")).batches[0]
    assert np.all(x[0, :, :, 32:] == 0) and np.all(x[0, :, :, :31] != 0)


def test_arcface_normalisation_at_a_pixel_and_nhwc(tmp_path: Path) -> None:
    _img(tmp_path / "a.png", 150, 130, (255, 0, 128))
    x = load_calibration(tmp_path / "a.png", _model(["N", 3, 112, 112]), preset="arcface").batches[0]
    np.testing.assert_allclose(x[0, :, 56, 56], [(255 - 127.5) / 128, -127.5 / 128, 0.5 / 128], rtol=1e-6)
    nhwc = Preprocess(size=(112, 112), mean=(127.5,) * 3, std=(128.0,) * 3, layout="nhwc")
    y = load_calibration(tmp_path / "a.png", _model(["N", 112, 112, 3]), preprocess=nhwc).batches[0]
    assert y.shape == (1, 112, 112, 3)
    np.testing.assert_allclose(y[0], x[0].transpose(1, 2, 0))


def test_mtcnn_normalises_and_feeds_width_by_height(tmp_path: Path) -> None:
    _img(tmp_path / "a.png", 40, 30)
    x = load_calibration(tmp_path / "a.png", _model(["N", 24, 24, 3]), preset="mtcnn").batches[0]
    assert x.shape == (1, 24, 24, 3)
    np.testing.assert_allclose(x[0, 3, 7], [(200 - 127.5) / 128, (100 - 127.5) / 128, (50 - 127.5) / 128], rtol=1e-6)
    ramp = np.tile(np.arange(0, 240, 10, dtype=np.uint8)[:, None, None], (1, 24, 3))  # brighter downwards
    t = PRESETS["mtcnn"].apply(Image.fromarray(ramp), (24, 24))
    assert np.all(np.diff(t[:, 0, 0]) == 0) and np.all(np.diff(t[0, :, 0]) > 0)  # [W, H, C]: axis 1 is height


def test_npy_and_npz_used_as_is(tmp_path: Path) -> None:
    model = _model(["N", 3, 8, 8])
    arr = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    cs = load_calibration(tmp_path / "a.npy", model, count=4)
    assert len(cs) == 4 and cs.preprocess is None and np.array_equal(cs.batches[0], arr[:4])
    np.savez(tmp_path / "one.npz", whatever=arr)
    np.savez(tmp_path / "two.npz", x=arr, other=arr[:1])
    assert np.array_equal(load_calibration(tmp_path / "one.npz", model).batches[0], arr)
    assert np.array_equal(load_calibration(tmp_path / "two.npz", model).batches[0], arr)
    np.savez(tmp_path / "bad.npz", a=arr, b=arr)
    with pytest.raises(ConfigError, match="name one after the model input 'x'"):
        load_calibration(tmp_path / "bad.npz", model)
    np.save(tmp_path / "f64.npy", arr.astype(np.float64))
    with pytest.raises(ConfigError, match="expects float32"):
        load_calibration(tmp_path / "f64.npy", model)
    with pytest.raises(ConfigError, match=r"expects \[N, 8, 8, 3\], a.npy gives \[5, 3, 8, 8\]; save the array"):
        load_calibration(tmp_path / "a.npy", _model(["N", 8, 8, 3]))


def test_seeded_selection_is_deterministic_and_split_disjoint(tmp_path: Path) -> None:
    for i in range(10):
        (tmp_path / f"d{i % 3}").mkdir(exist_ok=True)
        _img(tmp_path / f"d{i % 3}" / f"{i}.jpg", 20 + i, 30 + 2 * i, (i * 20, 0, 0))
    (tmp_path / "notes.txt").write_text("not an image")
    model = _model(["N", 3, 16, 16])
    with pytest.raises(ConfigError, match=r"cannot tell how input 'x' \[N, 3, 16, 16\].*--preset help") as err:
        load_calibration(tmp_path, model, count=6, seed=1)  # no face-model layout: refused, never guessed
    assert "\n" not in str(err.value)
    pre = Preprocess(mean=(127.5,) * 3, std=(128.0,) * 3)
    a = load_calibration(tmp_path, model, count=6, seed=1, preprocess=pre)
    b = load_calibration(tmp_path, model, count=6, seed=1, preprocess=pre)
    c = load_calibration(tmp_path, model, count=6, seed=2, preprocess=pre)
    assert a.files == b.files and np.array_equal(a.batches[0], b.batches[0]) and a.files != c.files
    assert len(a) == 6 and len(set(a.files)) == 6
    calib, hold = a.split(0.5, seed=3)
    assert len(calib) == len(hold) == 3 and not set(calib.files) & set(hold.files)
    assert [f.shape[0] for f in a.iter_batches(4)] == [4, 2]
    assert len(load_calibration(tmp_path, model, count=100, preprocess=pre).files) == 10


def test_mismatches_are_one_line_config_errors(tmp_path: Path) -> None:
    _img(tmp_path / "a.png", 30, 30)
    cases = [
        (_model(["N", 1, 112, 112]), "arcface", "1 channels"),
        (_model(["N", 112, 112, 3]), "arcface", "--layout nhwc"),
        (_model(["N", 3, 64, 64]), "arcface", "expects [N, 3, 64, 64], preprocessing gives 112x112"),
        (_model(["N", 3, "H", "W"]), "age-gender", "--size"),
        (_model(["N", 3, 112, 112], TensorProto.FLOAT16), "arcface", "expects float16"),
        (_model(["N", 3, 112, 112]), "nope", "unknown preset 'nope'"),
    ]
    for model, preset, text in cases:
        with pytest.raises(ConfigError) as err:
            load_calibration(tmp_path / "a.png", model, preset=preset)
        assert text in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match="--preset"):
        load_calibration(tmp_path / "a.png", _model(["N", 3, 64, 64]), preset="arcface")


def test_bad_paths_counts_and_text(tmp_path: Path) -> None:
    model = _model(["N", 3, 16, 16])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        load_calibration(tmp_path / "empty", model)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ConfigError, match="cannot read image"):
        load_calibration(tmp_path / "broken.jpg", model, preprocess=Preprocess())
    with pytest.raises(ConfigError, match="does not exist"):
        load_calibration(tmp_path / "missing", model)
    with pytest.raises(ConfigError, match="count must be positive"):
        load_calibration(tmp_path, model, count=0)
    assert parse_size("640x480") == (640, 480) and parse_floats("104, 117,123") == (104.0, 117.0, 123.0)
    for bad in ("640", "0x5", "ax3"):
        with pytest.raises(ConfigError, match="HxW"):
            parse_size(bad)
    for bad in ("1,2", "1,b,3"):
        with pytest.raises(ConfigError, match="bad number list"):
            parse_floats(bad)
    with pytest.raises(ConfigError, match="std must not contain 0"):
        Preprocess(std=(1.0, 0.0, 1.0))
    with pytest.raises(ConfigError, match="layout must be one of"):
        Preprocess(layout="chw")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least 2"):
        CalibrationSet("x", [np.zeros((1, 3))]).split()


def test_real_faces_with_retinaface_preset_run_in_ort() -> None:
    if not FACES.is_dir():
        pytest.skip(f"face photos not available at {FACES}")
    model = _model(["N", 3, "H", "W"])
    cs = load_calibration(FACES, model, count=4, seed=0, preset="retinaface")
    assert len(cs) == 4 and cs.batches[0].shape == (4, 3, 640, 640) and cs.preprocess.size == (640, 640)
    assert all(Path(f).is_relative_to(FACES) for f in cs.files)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in cs.iter_batches(2):
        (y,) = sess.run(None, {"x": batch})
        assert y.shape == batch.shape and np.isfinite(y).all()
