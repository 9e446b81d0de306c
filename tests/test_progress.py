"""Progress bars on a terminal only, one callback for every long step, and --verbose logs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import onnxprune
from onnxprune.bench import bench
from onnxprune.calibration import Preprocess, CalibrationSet, load_calibration
from onnxprune.cli import main
from onnxprune.progress import ConsoleProgress, configure_logging
from onnxprune.sample_models import GENERATED


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None, int | None]] = []

    def __call__(self, message: str, done: int | None = None, total: int | None = None) -> None:
        self.calls.append((message, done, total))

    def steps(self, prefix: str) -> list[tuple[int, int]]:
        return [(d, t) for m, d, t in self.calls if m.startswith(prefix) and t is not None]


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return GENERATED["se-block"]()


def test_bars_only_on_a_terminal() -> None:
    tty, pipe = _Tty(), io.StringIO()
    for stream in (tty, pipe):
        p = ConsoleProgress(True, stream=stream)
        p("preparing")
        for i in range(1, 4):
            p("scanning", i, 3)
        p.done()
    assert pipe.getvalue() == ""
    out = tty.getvalue()
    assert "preparing..." in out and "scanning" in out and "3/3" in out and "100%" in out
    quiet = _Tty()
    p = ConsoleProgress(False, stream=quiet)  # --quiet
    p("scanning", 1, 3)
    assert quiet.getvalue() == ""


def test_bench_reports_every_round(model: onnx.ModelProto) -> None:
    rec = _Recorder()
    bench([model], threads=(1, 2), runs=4, warmup=2, progress=rec)
    steps = rec.steps("timing CPUExecutionProvider")
    assert steps == [(i, 6) for i in range(1, 7)] * 2
    assert {m for m, _, t in rec.calls if t} == {"timing CPUExecutionProvider, 1 thread, input=1x3x32x32",
                                                 "timing CPUExecutionProvider, 2 threads, input=1x3x32x32"}


def test_calibration_loading_and_sensitivity_scan_report_steps(model: onnx.ModelProto, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    rec = _Recorder()
    data = load_calibration(tmp_path, model, count=4, preprocess=Preprocess(std=(255.0,) * 3), progress=rec)
    assert len(data) == 4 and rec.steps("loading calibration images") == [(i, 4) for i in range(1, 5)]
    rec = _Recorder()
    onnxprune.slim(model, 0.3, calibration=CalibrationSet("input", [data.samples()], [], None, []), round_to=4,
                   workers=1, progress=rec)
    scan = rec.steps("sensitivity scan")
    assert scan and scan[-1][0] == scan[-1][1] and [d for d, _ in scan] == list(range(1, len(scan) + 1))
    assert any(m.startswith("verifying") for m, _, _ in rec.calls)


def test_training_steps_report_progress(model: onnx.ModelProto) -> None:
    pytest.importorskip("torch")
    from onnxprune.quantization.trained import train_ranges
    x = np.random.default_rng(0).standard_normal((10, 3, 32, 32)).astype(np.float32)
    rec = _Recorder()
    onnxprune.slim(model, 0.3, calibration=CalibrationSet("input", [x], [], None, []), round_to=4, finetune_steps=3,
                   allocation="uniform", progress=rec)
    assert rec.steps("distilling") == [(1, 3), (2, 3), (3, 3)]
    rec = _Recorder()
    train_ranges(model, "input", [x], steps=3, progress=rec)
    assert rec.steps("training activation thresholds") == [(1, 3), (2, 3), (3, 3)]


def test_verbose_logs_steps_to_stderr(model: onnx.ModelProto, tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    try:
        assert main(["analyze", str(path), "-q"]) == 0
        assert capsys.readouterr().err == ""
        assert main(["analyze", str(path), "-q", "-v"]) == 0
        err = capsys.readouterr().err.splitlines()
        assert "onnxprune: INFO: simplifying with onnxsim" in err and not any("DEBUG" in l for l in err)
        assert main(["bench", str(path), "--runs", "2", "--warmup", "0", "-q", "-vv"]) == 0
        err = capsys.readouterr().err.splitlines()
        assert "onnxprune: DEBUG: timing CPUExecutionProvider, 1 thread, input=1x3x32x32: 2/2" in err, err
    finally:
        configure_logging(0)
