"""Preprocessing chosen from the model, refused when it cannot be, and calibration images checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from onnxprune import cli
from onnxprune.calibration import PRESETS, load_calibration
from onnxprune.calibration.presets import infer_preset
from onnxprune.errors import ConfigError
from onnxprune.sample_models import GENERATED


def _photos(directory: Path, n: int = 6, size: tuple[int, int] = (96, 128), gray: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        if i < gray:
            pixels[...] = pixels[..., :1]
        Image.fromarray(pixels).save(directory / f"{i}.png")
    return directory


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("name, preset", [("retinaface", "retinaface"), ("retinaface-r50", "retinaface"),
                                          ("scrfd", "scrfd"), ("mobilefacenet", "arcface"), ("iresnet", "arcface"),
                                          ("se-block", None), ("grouped-conv", None)])
def test_preset_inferred_from_heads_and_layout(name: str, preset: str | None) -> None:
    got = infer_preset(GENERATED[name]())
    assert (got.name if got else None) == preset


def test_preset_from_metadata_wins() -> None:
    model = GENERATED["se-block"]()
    onnx.helper.set_model_props(model, {"onnxprune.preset": "ultraface"})
    assert infer_preset(model).name == "ultraface"


def test_no_preset_on_unknown_layout_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    model = _save(GENERATED["se-block"](), tmp_path / "m.onnx")
    photos = _photos(tmp_path / "photos")
    assert cli.main(["slim", str(model), "--ratio", "0.3", "--calib", str(photos)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxprune: error: cannot tell how input") and "--preset help" in err and "\n" not in err
    assert not (tmp_path / "m.slim.onnx").exists()


def test_inferred_preset_is_said_and_used(tmp_path: Path, capsys) -> None:
    model = GENERATED["scrfd"]()
    photos = _photos(tmp_path / "photos", n=2, size=(200, 240))
    data = load_calibration(photos, model)
    explicit = load_calibration(photos, model, preset="scrfd")
    assert np.array_equal(data.samples(), explicit.samples())  # the SCRFD normalisation, not RetinaFace's
    assert data.notes == [infer_preset(model).note()] and "preset scrfd inferred" in data.notes[0]


def test_preset_help_lists_every_preset(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["quantize", "--preset", "help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in PRESETS)


def test_tiny_image_refused_and_gray_images_flagged(tmp_path: Path, capsys) -> None:
    model = _save(GENERATED["mobilefacenet"](), tmp_path / "m.onnx")
    tiny = tmp_path / "tiny"
    _photos(tiny, n=3)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tiny / "4x4.png")
    assert cli.main(["quantize", str(model), "--calib", str(tiny)]) == 2
    err = capsys.readouterr().err.strip()
    assert "4x4 pixels, too small" in err and "\n" not in err and not (tmp_path / "m.int8.onnx").exists()
    data = load_calibration(_photos(tmp_path / "gray", n=5, gray=2), GENERATED["mobilefacenet"]())
    assert any(n.startswith("2 of 5 calibration images are grayscale") for n in data.notes)
    small = load_calibration(_photos(tmp_path / "small", n=2, size=(20, 20)), GENERATED["mobilefacenet"]())
    assert any("enlarged more than 4x to 112x112" in n for n in small.notes)


def test_task_checked_before_any_work(tmp_path: Path, capsys, monkeypatch) -> None:
    model = _save(GENERATED["se-block"](), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32))

    def never(*args, **kwargs):
        raise AssertionError("slim ran although the task cannot be measured")

    monkeypatch.setattr(cli, "compress", never)  # the chain every verb runs
    assert cli.main(["slim", str(model), "--ratio", "0.3", "--calib", str(tmp_path / "x.npy"),
                     "--task", "detection"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no detector heads recognised" in err and "\n" not in err


def test_too_few_images_flag_the_fidelity(tmp_path: Path, capsys) -> None:
    model = _save(GENERATED["mobilefacenet"](), tmp_path / "m.onnx")
    photos = _photos(tmp_path / "photos", n=3)
    assert cli.main(["quantize", str(model), "--calib", str(photos), "--no-tile"]) == 0
    out = capsys.readouterr().out
    assert "fidelity on 3 images (task embedding)" in out
    assert "caution: measured on the 3 calibration images themselves" in out


def test_data_free_slim_gives_a_verdict_and_points_to_calib(tmp_path: Path, capsys) -> None:
    model = _save(GENERATED["retinaface"](), tmp_path / "m.onnx")
    assert cli.main(["slim", str(model), "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("output change on a random input"))
    assert any(v in line for v in ("(small:", "(moderate:", "(large:")) and "--calib IMAGES" in out


def test_unknown_preset_is_a_usage_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["quantize", "m.onnx", "--preset", "nope"])
    assert exit_.value.code == 2 and "unknown preset 'nope'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown preset"):
        load_calibration(_photos(tmp_path, n=1), GENERATED["mobilefacenet"](), preset="nope")


def test_unexpected_failure_is_one_line_not_a_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    model = _save(GENERATED["se-block"](), tmp_path / "m.onnx")

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(cli, "analyze", broken)
    assert cli.main(["analyze", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxprune: error: unexpected RuntimeError: kernel exploded (") and "\n" not in err
    with pytest.raises(RuntimeError):  # -v shows the traceback for a bug report
        cli.main(["analyze", str(model), "-v"])


def test_a_preset_contradicting_the_model_is_flagged(tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", n=1, size=(200, 240))
    wrong = load_calibration(photos, GENERATED["scrfd"](), preset="retinaface")
    assert any(n.startswith("--preset retinaface given, but the model looks like scrfd") for n in wrong.notes)
    assert not load_calibration(photos, GENERATED["scrfd"](), preset="scrfd").notes
    assert not load_calibration(photos, GENERATED["mobilefacenet"](), preset="mobilefacenet").notes  # = arcface
