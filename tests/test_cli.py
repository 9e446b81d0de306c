"""The command line as a user and a CI pipeline meet it: outputs, reports, one-line errors, nothing lost."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from onnxprune.cli import main
from onnxprune.sample_models import GENERATED

from .pattern_models import PATTERNS


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "mfn.onnx"
    onnx.save(GENERATED["mobilefacenet"](), str(path))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_slim_writes_default_output_report_and_summary(model_path: Path, tmp_path: Path, capsys) -> None:
    before = _digest(model_path)
    report = tmp_path / "report.json"
    assert main(["slim", str(model_path), "--ratio", "0.5", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "params" in out and "MACs" in out and "->" in out
    slim = tmp_path / "mfn.slim.onnx"
    onnx.checker.check_model(onnx.load(str(slim)))
    data = json.loads(report.read_text())
    assert data["kind"] == "slim" and abs(data["achieved_ratio"] - 0.5) <= 0.01
    assert data["output"] == str(slim) and data["layers"]
    assert _digest(model_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_analyze_lists_groups_and_reasons(tmp_path: Path, capsys) -> None:
    path = tmp_path / "r.onnx"
    onnx.save(PATTERNS["reduce_channel"](0), str(path))
    assert main(["analyze", str(path)]) == 0
    out = capsys.readouterr().out
    assert "reduces over channels" in out and "prunable" in out


def _error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("onnxprune: error:"), err
    return err


def test_bad_inputs_give_one_line_errors(model_path: Path, tmp_path: Path, capsys) -> None:
    before = _digest(model_path)
    (tmp_path / "corrupt.onnx").write_bytes(model_path.read_bytes()[:1000])
    (tmp_path / "text.onnx").write_text("hello, not a model")
    assert "not found" in _error(["slim", str(tmp_path / "missing.onnx"), "--ratio", "0.5"], capsys)
    assert "not a valid ONNX model" in _error(["slim", str(tmp_path / "corrupt.onnx"), "--ratio", "0.5"], capsys)
    assert "not a valid ONNX model" in _error(["slim", str(tmp_path / "text.onnx"), "--ratio", "0.5"], capsys)
    assert "[0, 1)" in _error(["slim", str(model_path), "--ratio", "1.2"], capsys)
    assert "[0, 1)" in _error(["slim", str(model_path), "--ratio", "-0.1"], capsys)
    assert "unknown criterion" in _error(["slim", str(model_path), "--ratio", "0.5", "--criterion", "magic"], capsys)
    assert "refusing to overwrite" in _error(["slim", str(model_path), "--ratio", "0.5", "-o", str(model_path)], capsys)
    assert "does not exist" in _error(["slim", str(model_path), "--ratio", "0.5", "-o", str(tmp_path / "no" / "x.onnx")], capsys)
    assert "--input-shape" in _error(["slim", str(model_path), "--ratio", "0.5", "--input-shape", "bogus"], capsys)
    assert "unknown input" in _error(["slim", str(model_path), "--ratio", "0.5", "--input-shape", "zz=1x3x4x4"], capsys)
    assert _digest(model_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(model_path: Path, tmp_path: Path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    assert "not writable" in _error(["slim", str(model_path), "--ratio", "0.5", "-o", str(ro / "x.onnx")], capsys)


def test_unwritable_output_is_reported_even_as_root(model_path: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a directory should be
    assert _error(["slim", str(model_path), "--ratio", "0.5", "-o", str(blocker / "x.onnx")], capsys)


def test_no_prunable_channel(tmp_path: Path, capsys) -> None:
    path = tmp_path / "r.onnx"
    onnx.save(PATTERNS["softmax_channel"](0), str(path))
    assert "no prunable channel" in _error(["slim", str(path), "--ratio", "0.5"], capsys)
    assert not (tmp_path / "r.slim.onnx").exists()


def test_exclude_matching_nothing_warns(model_path: Path, tmp_path: Path, capsys) -> None:
    assert main(["slim", str(model_path), "--ratio", "0.3", "--exclude", "nothing-here", "-o", str(tmp_path / "o.onnx")]) == 0
    assert "matched no node" in capsys.readouterr().out


def test_console_script_help() -> None:
    out = subprocess.run([sys.executable, "-m", "onnxprune", "slim", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--ratio", "--criterion", "--exclude", "--round-to", "--input-shape", "--json"):
        assert flag in out.stdout


def test_check_and_bench_commands(model_path: Path, tmp_path: Path, capsys) -> None:
    import numpy as np
    x = np.random.default_rng(0).standard_normal((8, 3, 112, 112)).astype(np.float32)
    npy = tmp_path / "c.npy"
    np.save(npy, x)
    junit = tmp_path / "j.xml"
    assert main(["check", str(model_path), str(model_path), "--calib", str(npy), "--min-fidelity", "0.99",
                 "--runs", "5", "--junit", str(junit), "-q"]) == 0
    import xml.etree.ElementTree as ET
    names = {c.get("name") for c in ET.parse(junit).getroot().iter("testcase")}
    assert {"validity", "fidelity"} <= names
    broken = tmp_path / "broken.onnx"
    assert main(["slim", str(model_path), "--ratio", "0.9", "--round-to", "1", "--min-keep", "0", "-o", str(broken), "-q"]) == 0
    assert main(["check", str(model_path), str(broken), "--calib", str(npy), "--min-fidelity", "0.99", "--runs", "5", "-q"]) == 1
    assert main(["check", str(model_path), str(tmp_path / "missing.onnx"), "-q"]) == 2
    assert main(["bench", str(model_path), str(model_path), "--runs", "5", "--warmup", "1"]) == 0
    assert "vs first" in capsys.readouterr().out


def test_json_reports_validate_against_the_schema(model_path: Path, tmp_path: Path) -> None:
    import jsonschema
    import numpy as np
    schema = json.loads((Path(__file__).resolve().parents[1] / "onnxprune" / "schemas" / "report.schema.json").read_text())
    npy = tmp_path / "c.npy"
    np.save(npy, np.random.default_rng(0).standard_normal((8, 3, 112, 112)).astype(np.float32))
    runs = {
        "slim": ["slim", str(model_path), "--ratio", "0.3", "-o", str(tmp_path / "a.onnx")],
        "calibrated": ["slim", str(model_path), "--ratio", "0.3", "--calib", str(npy), "-o", str(tmp_path / "b.onnx")],
        "quantize": ["quantize", str(model_path), "--calib", str(npy), "-o", str(tmp_path / "c.onnx")],
        "analysis": ["analyze", str(model_path)],
    }
    for name, argv in runs.items():
        out = tmp_path / f"{name}.json"
        assert main(argv + ["-q", "--json", str(out)]) == 0
        jsonschema.validate(json.loads(out.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"schema": 1, "kind": "slim"}, schema)


def test_html_report_is_self_contained(model_path: Path, tmp_path: Path) -> None:
    from html.parser import HTMLParser
    import numpy as np
    npy = tmp_path / "c.npy"
    np.save(npy, np.random.default_rng(0).standard_normal((8, 3, 112, 112)).astype(np.float32))
    assert main(["slim", str(model_path), "--ratio", "0.3", "--calib", str(npy), "--report", str(tmp_path / "rep"),
                 "-o", str(tmp_path / "o.onnx"), "-q"]) == 0
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "Channels kept per layer" in page and "Sensitivity scan" in page and page.count("<svg") >= 2
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # no external assets

    class Tags(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.open: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag not in ("meta", "rect", "line", "image", "br"):
                self.open.append(tag)

        def handle_endtag(self, tag):
            if tag in ("rect", "line", "image"):
                return
            assert self.open and self.open[-1] == tag, (tag, self.open[-3:])
            self.open.pop()

    parser = Tags()
    parser.feed(page)
    assert not parser.open
