"""What a user meets in the first hour: where outputs go, what the summary names, the bench memory
column, the --report line, and the Python API for calibrated slim/quantize."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune.bench import bench
from onnxprune.cli import main
from onnxprune.sample_models import GENERATED


def _save(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.onnx"
    onnx.save(GENERATED[name](), str(path))
    return path


def _npy(tmp_path: Path, n: int = 8) -> Path:
    """Calibration samples in se-block's input format (N x 3 x 32 x 32 float32)."""
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(0).standard_normal((n, 3, 32, 32)).astype(np.float32))
    return path


def _ort_runs(model: onnx.ModelProto) -> None:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, 32, 32), np.float32)})
    assert all(np.isfinite(o).all() for o in outs)


# a. sample:NAME writes into the working directory, not the hidden cache
def test_sample_input_default_output_goes_to_the_working_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("ONNXPRUNE_CACHE", str(cache))
    monkeypatch.chdir(work)
    assert main(["slim", "sample:se-block", "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    written = work / "se-block.slim.onnx"
    assert written.is_file() and not (cache / "se-block.slim.onnx").exists()
    onnx.checker.check_model(onnx.load(str(written)))
    assert f"-> {written}" in out.splitlines()[0]  # the summary says where it went


def test_path_input_default_output_stays_next_to_the_input(tmp_path: Path, monkeypatch, capsys) -> None:
    model = _save(tmp_path, "se-block")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("ONNXPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(work)
    assert main(["slim", str(model), "--ratio", "0.5", "-q"]) == 0
    assert (tmp_path / "se-block.slim.onnx").is_file() and not list(work.iterdir())


# b. slim --int8 names the real input model, not <in-memory model>
def test_slim_int8_summary_names_the_input_model(tmp_path: Path, capsys) -> None:
    model, npy, report = _save(tmp_path, "se-block"), _npy(tmp_path), tmp_path / "r.json"
    assert main(["slim", str(model), "--ratio", "0.5", "--int8", "--calib", str(npy), "--allocation", "uniform",
                 "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "in-memory" not in out
    assert out.count(f"model: {model} -> {tmp_path / 'se-block.slim.int8.onnx'}") == 2, out
    data = json.loads(report.read_text())
    assert data["slim"]["model"] == data["quantize"]["model"] == str(model)


# c. bench's memory column is never a misleading 0.0
def test_bench_memory_is_positive_for_every_model_even_after_earlier_sessions(tmp_path: Path) -> None:
    models = [str(_save(tmp_path, "se-block")), str(_save(tmp_path, "grouped-conv"))]
    quiet = lambda *a, **k: None  # noqa: E731
    bench(models, threads=(1, 2), runs=2, warmup=0, progress=quiet)  # memory freed by these sessions stays in the heap
    report = bench(models, threads=(1, 2), runs=2, warmup=0, progress=quiet)
    assert len(report.rows) == 4
    assert all(r.peak_mem_mb > 0 for r in report.rows), [(r.model, r.threads, r.peak_mem_mb) for r in report.rows]
    assert " 0.0 " not in report.summary()


# d. --report says on stderr what it wrote
def test_report_dir_prints_the_page_it_wrote(tmp_path: Path, capsys) -> None:
    model, pages = _save(tmp_path, "se-block"), tmp_path / "pages"
    assert main(["bench", str(model), "--runs", "2", "--warmup", "0", "--report", str(pages)]) == 0
    err = capsys.readouterr().err
    assert f"onnxprune: wrote {pages / 'report.html'}" in err.splitlines()
    assert (pages / "report.html").is_file()
    assert main(["bench", str(model), "--runs", "2", "--warmup", "0", "--report", str(pages), "-q"]) == 0
    assert "wrote" not in capsys.readouterr().err


def test_report_dir_without_matplotlib_is_one_error_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # matplotlib is a dependency; a broken install is an error
    model, pages = _save(tmp_path, "se-block"), tmp_path / "pages"
    assert main(["bench", str(model), "--runs", "2", "--warmup", "0", "--report", str(pages)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxprune: error: ") and "matplotlib" in err[0], err
    assert not (pages / "report.html").exists()


# e. the Python API runs a calibrated slim and quantize from the top-level package
def test_python_api_calibrated_slim_then_quantize(tmp_path: Path) -> None:
    for name in ("quantize", "load_calibration", "Preprocess", "PRESETS", "CalibrationSet", "QuantizeResult"):
        assert hasattr(onnxprune, name) and name in onnxprune.__all__, name
    assert isinstance(onnxprune.PRESETS["retinaface"], onnxprune.Preprocess)
    model = _save(tmp_path, "se-block")
    calibration = onnxprune.load_calibration(_npy(tmp_path, 16), onnx.load(str(model)))
    slim = onnxprune.slim(str(model), 0.5, calibration=calibration, allocation="uniform")
    onnx.checker.check_model(slim.model)
    _ort_runs(slim.model)
    q = onnxprune.quantize(slim.model, calibration)
    onnx.checker.check_model(q.model)
    _ort_runs(q.model)
    assert q.report.kernels and slim.report.calibration
    q.save(tmp_path / "out.int8.onnx")
    onnx.checker.check_model(str(tmp_path / "out.int8.onnx"))


def test_summary_piped_into_a_reader_that_leaves_early_is_no_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys
    from onnxprune.sample_models import GENERATED
    model = tmp_path / "m.onnx"
    onnx.save(GENERATED["retinaface"](), model)
    proc = subprocess.Popen([sys.executable, "-m", "onnxprune", "slim", str(model), "--ratio", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head -1` after its line: the reader is gone before the summary is written
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and "Traceback" not in err, err
    assert (tmp_path / "m.slim.onnx").is_file()
