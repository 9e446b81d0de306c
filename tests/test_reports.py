"""Reports people read: PNG charts, report.html in a real browser, bench/check JSON against the schema,
progress bars and --verbose logs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import onnxprune
from onnxprune import html_report, plots
from onnxprune.bench import netscore
from onnxprune.calibration import CalibrationSet
from onnxprune.check import check
from onnxprune.cli import main
from onnxprune.html_report import detection_overlay, write_files, write_report
from onnxprune.sample_models import GENERATED

SCHEMA = json.loads((Path(onnxprune.__file__).parent / "schemas" / "report.schema.json").read_text())
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return GENERATED["se-block"]()


@pytest.fixture(scope="module")
def calib() -> CalibrationSet:
    x = np.random.default_rng(0).standard_normal((12, 3, 32, 32)).astype(np.float32)
    return CalibrationSet("input", [x], [], None, [])


@pytest.fixture(scope="module")
def slimmed(model: onnx.ModelProto, calib: CalibrationSet):
    return onnxprune.slim(model, 0.5, calibration=calib, round_to=4, workers=1)


@pytest.fixture(scope="module")
def files(model: onnx.ModelProto, slimmed, calib: CalibrationSet, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    onnx.save(model, str(d / "m.onnx"))
    slimmed.save(d / "s.onnx")
    np.save(d / "c.npy", calib.samples())
    return {"model": d / "m.onnx", "slim": d / "s.onnx", "calib": d / "c.npy"}


def _picture(path: Path) -> np.ndarray:
    img = Image.open(path)
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))


def _blank(rgb: np.ndarray) -> bool:
    """A page or chart with (almost) nothing drawn: nearly all one colour, or few colours."""
    flat = rgb.reshape(-1, 3)
    background = np.all(flat == np.median(flat, axis=0), axis=1).mean()
    return background > 0.995 or len(np.unique(flat, axis=0)) < 16


def _has_colour(rgb: np.ndarray, hex_colour: str, tol: int = 30, min_pixels: int = 50) -> bool:
    target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb.astype(int) - target).max(axis=-1) <= tol).sum()) >= min_pixels


# ----------------------------------------------------------------------------------- charts: SVG and PNG
def _charts_in(page: Path) -> list[str]:
    """The PNG named by each chart inlined in report.html, in page order."""
    html = page.read_text(encoding="utf-8")
    figures = re.findall(r'<figure class="chart" id="chart-(\w+)" data-png="(\w+\.png)"><svg ', html)
    assert all(f"{name}.png" == png for name, png in figures), figures
    assert html.count('<figure class="chart"') == len(figures)
    return [png for _, png in figures]


def test_slim_report_charts(slimmed, tmp_path: Path) -> None:
    page, written = write_files(slimmed.report, tmp_path)
    assert [p.name for p in written] == ["channels.png", "sensitivity.png"]
    for p in written:
        rgb = _picture(p)
        assert rgb.shape[0] > 200 and rgb.shape[1] > 400 and not _blank(rgb)
    # the "after" bars are drawn in the first palette colour, the "before" bars in light blue
    channels = _picture(tmp_path / "channels.png")
    assert _has_colour(channels, plots.PALETTE[0]) and _has_colour(channels, "#c6dbef")
    # each chart once in the page, as inline SVG, and once beside it, as a PNG of the same figure
    assert _charts_in(page) == [p.name for p in written]
    html = page.read_text(encoding="utf-8")
    assert "<?xml" not in html and "<!DOCTYPE svg" not in html
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no asset, no metadata URL
    assert html.count("<svg") == 2 and f'fill: {plots.PALETTE[0]}' in html  # the same bars, drawn by matplotlib
    ids = re.findall(r' id="([^"]+)"', html)
    assert len(ids) == len(set(ids)), "two inline charts share an id"


def test_every_chart_is_drawn_once_for_the_page_and_its_png(slimmed, tmp_path: Path, monkeypatch) -> None:
    drawn: list[str] = []
    for name in ("channel_bars", "sensitivity_curves"):
        def counted(*args, _draw=getattr(plots, name), _name=name, **kwargs):
            drawn.append(_name)
            return _draw(*args, **kwargs)
        monkeypatch.setattr(plots, name, counted)
    page, pngs = html_report.write_files(slimmed.report, tmp_path)  # what the CLI does
    assert sorted(drawn) == ["channel_bars", "sensitivity_curves"]
    assert _charts_in(page) == [p.name for p in pngs]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["channels.png", "report.html", "sensitivity.png"]


def test_report_renders_byte_identical_twice(slimmed, tmp_path: Path) -> None:
    photo = np.random.default_rng(0).uniform(0, 255, (48, 64, 3))
    preview = detection_overlay(photo, np.array([[5, 5, 40, 40, 0.9]]), np.array([[8, 6, 44, 42, 0.8]]))
    data = slimmed.report.to_dict()
    a, b = html_report.render(data, preview), html_report.render(data, preview)  # two drawings, no cache
    assert a.html == b.html and a.pngs == b.pngs
    assert sorted(a.pngs) == ["channels.png", "detections.png", "sensitivity.png"]
    assert "<dc:date>" not in a.html and "Matplotlib v" not in a.html  # no date, no library version
    assert not any(b"Software" in png or b"matplotlib" in png.lower() for png in a.pngs.values())
    first = write_report(slimmed.report, tmp_path / "a", preview)
    second = write_report(slimmed.report, tmp_path / "b", preview)
    for name in ("report.html", "channels.png", "sensitivity.png", "detections.png"):
        assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes(), name


def test_detection_chart_draws_both_models_boxes(tmp_path: Path) -> None:
    photo = np.full((120, 160, 3), 128.0)  # grey, so box colours stand out (one black and one white pixel
    photo[0, 0], photo[0, 1] = 0, 255       # keep the chart's min-max normalisation from stretching it)
    ref = np.array([[20, 20, 70, 90, 0.9]])
    got = np.array([[80, 30, 140, 100, 0.8]])
    preview = detection_overlay(photo, ref, got)
    assert preview.startswith("<svg") and preview.count("<rect") == 2  # the page's overlay, not a chart
    (only,) = html_report.write_files({"kind": "photo"}, tmp_path, preview)[1]  # a section without charts
    rgb = _picture(only)
    assert only.name == "detections.png" and _has_colour(rgb, "#2ca02c") and _has_colour(rgb, "#d62728")
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert preview in page and _charts_in(tmp_path / "report.html") == []
    no_boxes = plots.save_png(plots.detections(photo, ref, np.zeros((0, 5))), tmp_path / "none.png")
    assert not _has_colour(_picture(no_boxes), "#d62728", min_pixels=400)  # only the legend's red line


def test_sweep_charts_and_frontier(tmp_path: Path) -> None:
    rows = [{"model": "/m/a.onnx", "ratio": r, "achieved_ratio": r, "criterion": "l1", "int8": False, "status": "ok",
             "fidelity": f, "latency_ratio": lat, "pareto": p}
            for r, f, lat, p in ((0.3, 0.99, 0.8, True), (0.5, 0.95, 0.6, True), (0.69, 0.80, 0.65, False))]
    rows.append({"model": "/m/a.onnx", "ratio": 0.9, "criterion": "l1", "status": "failed", "fidelity": None})
    sweep = {"kind": "sweep", "rows": rows, "executor": "local", "workers": 1, "outdir": "sweep"}
    written = html_report.write_files(sweep, tmp_path)[1]
    assert [p.name for p in written] == ["fidelity_vs_ratio.png", "frontier.png"]
    assert not any(_blank(_picture(p)) for p in written)
    assert _charts_in(tmp_path / "report.html") == [p.name for p in written]
    frontier = plots.save_png(plots.fidelity_latency_frontier(
        [{"label": "a", "fidelity": 0.9, "latency_ratio": 0.5, "pareto": True},
         {"label": "b", "fidelity": None, "latency_ratio": 0.4, "pareto": False}]), tmp_path / "f.png")
    assert _has_colour(_picture(frontier), plots.PALETTE[3], min_pixels=20)  # the Pareto point


def test_charts_are_byte_identical_for_the_same_data(slimmed, tmp_path: Path) -> None:
    layers = slimmed.report.to_dict()["layers"]
    a = plots.save_png(plots.channel_bars(layers), tmp_path / "a.png")
    b = plots.save_png(plots.channel_bars(layers), tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()
    assert plots.svg_text(plots.channel_bars(layers)) == plots.svg_text(plots.channel_bars(layers))


def test_without_matplotlib_the_report_is_one_error_line(files, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    rep = tmp_path / "rep"
    assert main(["bench", str(files["model"]), str(files["slim"]), "--runs", "3", "--warmup", "0",
                 "--report", str(rep)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxprune: error: the report's charts need matplotlib"), err
    assert not rep.exists() or not any(rep.iterdir())


# --------------------------------------------------------------------------------------- bench/check JSON
def test_bench_json_with_accuracy_validates_and_scores(files, tmp_path: Path, capsys) -> None:
    import jsonschema
    out, rep = tmp_path / "b.json", tmp_path / "rep"
    assert main(["bench", str(files["model"]), str(files["slim"]), "--threads", "1,2", "--runs", "4", "--warmup", "1",
                 "--accuracy", "1.0,0.9", "--json", str(out), "--report", str(rep), "-q"]) == 0
    data = json.loads(out.read_text())
    jsonschema.validate(data, SCHEMA)
    rows = data["rows"]
    assert [(r["threads"], Path(r["model"]).name) for r in rows] == [(1, "m.onnx"), (1, "s.onnx"), (2, "m.onnx"),
                                                                     (2, "s.onnx")]
    for r in rows:
        acc = 1.0 if r["model"].endswith("m.onnx") else 0.9
        assert r["netscore"] == pytest.approx(netscore(acc, r["params"], r["macs"]))
        assert r["min_ms"] <= r["median_ms"] <= r["p90_ms"] and r["peak_mem_mb"] >= 0
        assert r["file_bytes"] > 0 and r["float_nodes"] > 0 and r["int8_nodes"] == 0
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["file_bytes"] < rows[0]["file_bytes"]
    assert sorted(p.name for p in rep.iterdir()) == ["latency.png", "report.html"]
    assert _charts_in(rep / "report.html") == ["latency.png"]
    for bad in ("0.9,0.8,0.7", "1.5", "x"):
        assert main(["bench", str(files["model"]), str(files["slim"]), "--accuracy", bad, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("onnxprune: error:") and "accuracy" in err, err


def test_netscore_formula() -> None:
    # Ω = 20·log10(a^2 / (sqrt(p) · sqrt(m))), p and m in millions
    assert netscore(1.0, 1_000_000, 1_000_000) == pytest.approx(0.0)
    assert netscore(0.5, 1_000_000, 1_000_000) == pytest.approx(40 * np.log10(0.5))
    assert netscore(1.0, 100_000_000, 1_000_000) == pytest.approx(-20.0)
    assert netscore(1.0, 0, 1) is None


def test_check_json_validates_and_carries_latency(files, tmp_path: Path) -> None:
    import jsonschema
    out, rep = tmp_path / "c.json", tmp_path / "rep"
    code = main(["check", str(files["model"]), str(files["slim"]), "--calib", str(files["calib"]), "--min-speedup", "0.2",
                 "--max-size-ratio", "1.0", "--runs", "5", "--json", str(out), "--report", str(rep), "-q"])
    data = json.loads(out.read_text())
    jsonschema.validate(data, SCHEMA)
    assert code == data["exit_code"] == 0 and data["kind"] == "check"
    lat = data["latency"]
    assert lat["threads"] == 1 and len(lat["median_ms"]) == 2 and all(m > 0 for m in lat["median_ms"])
    assert lat["input_shapes"] == {"input": [1, 3, 32, 32]}
    assert _charts_in(rep / "report.html") == ["latency.png"] and (rep / "latency.png").exists()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**data, "exit_code": 2}, SCHEMA)  # 2 is a usage error: no report is written


# ---------------------------------------------------------------------------------------- headless Chromium
def _render(page: Path, tmp: Path) -> tuple[np.ndarray, list[str]]:
    """Screenshot and console messages of ``page`` in headless Chromium (offline, fresh profile)."""
    shot = tmp / f"{page.stem}-{page.parent.name}.png"
    profile = tmp / f"profile-{page.parent.name}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
           "--window-size=1200,2000", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "LANG": "C.UTF-8"})
    assert shot.exists(), proc.stderr[-2000:]
    console = [l for l in proc.stderr.splitlines() if ":CONSOLE" in l or "Uncaught" in l]
    return np.asarray(Image.open(shot).convert("RGB")), console


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package `chromium`)")
def test_html_reports_render_in_headless_chromium(slimmed, model, calib, tmp_path: Path) -> None:
    # the oracle first: a page with a script error and nothing drawn is caught on both counts
    bad = tmp_path / "bad" / "report.html"
    bad.parent.mkdir()
    bad.write_text("<!doctype html><html><body><script>console.error('x'); missing();</script></body></html>")
    shot, console = _render(bad, tmp_path)
    assert _blank(shot) and any("missing" in l for l in console), console

    photo = np.random.default_rng(0).uniform(0, 255, (64, 96, 3))
    preview = detection_overlay(photo, np.array([[5, 5, 40, 50, 0.9]]), np.array([[8, 6, 44, 52, 0.8]]))
    pages = {"slim": write_report(slimmed.report, tmp_path / "slim", preview),
             "check": write_report(check(model, slimmed.model, calibration=calib, min_speedup=0.1, runs=3),
                                   tmp_path / "check")}
    for name, page in pages.items():
        html = page.read_text(encoding="utf-8")
        assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
        shot, console = _render(page, tmp_path)
        assert console == [], (name, console)
        assert not _blank(shot), name
        assert (shot < 128).all(axis=-1).mean() > 0.002, name  # dark text and bars are on the page
