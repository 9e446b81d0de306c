"""Every verb on every zoo graph: a valid drop-in model, or one clear line and exit status 2.

The verbs run through the CLI in process (what users meet): a success must pass the checker,
run in ONNX Runtime at another batch (and image size when dynamic), keep the interface, and
for ``slim`` equal the masked original (the removal oracle); a refusal must be a single
``onnxprune: error:`` line naming the reason, with nothing written.
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import OnnxPruneError
from onnxprune.graph.metrics import count_params
from onnxprune.int8 import quantize
from onnxprune.calibration import CalibrationSet
from onnxprune.verify import interface

from .oracle import analysed, check_removal, random_selection, run
from .zoo import ENTRIES, OK, Entry, ExportFailed, start_torch_exports, stop_torch_exports

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces112"


class Zoo:
    """Builds each entry once per session, on first use, into one temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[str, Path] = {}

    def path(self, entry: Entry) -> Path:
        if entry.missing():
            pytest.skip(f"{entry.name} needs {', '.join(entry.missing())}")
        if entry.name not in self.paths:
            directory = self.root / entry.name
            directory.mkdir(exist_ok=True)
            try:
                self.paths[entry.name] = entry.build(directory)
            except ExportFailed as exc:  # the new exporter failing is outside our control: say why
                if entry.name != "torch-dynamo":
                    raise
                pytest.skip(f"dynamo export failed: {exc}")
        return self.paths[entry.name]


@pytest.fixture(scope="module")
def _frozen():
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _young_collections(_frozen):
    """The pipeline runs gc.collect() between stages (peak RSS on big models). In a test process full
    of imported modules each full collection costs ~0.1-0.5 s, most of this file's time on tiny models.
    Freezing what survives before each test keeps collections to that test's objects (until the module
    ends, when everything is unfrozen): the verbs run exactly as for users, only faster."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zoo]:
    root = tmp_path_factory.mktemp("zoo")
    start_torch_exports(root)  # in the background, while the hand-built entries are tested
    yield Zoo(root)
    stop_torch_exports(root)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _dtype(model: onnx.ModelProto) -> type:
    return onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)


def _feeds(model: onnx.ModelProto, entry: Entry, batch: int = 3) -> dict[str, np.ndarray]:
    """A feed at another batch and, where the model allows it, another image size than the analysis shape."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [batch] + [d.dim_value if d.HasField("dim_value") else s + 16
                       for d, s in zip(dims[1:], entry.input_shape[1:])]
    return {entry.input_name: np.random.default_rng(7).standard_normal(shape).astype(_dtype(model))}


def _calibration(model: onnx.ModelProto, entry: Entry, directory: Path) -> list[str]:
    """Real face crops for NCHW RGB inputs when ../shared has them, random arrays otherwise."""
    if FACES.is_dir() and entry.input_shape[1] == 3 and _dtype(model) == np.float32:
        h, w = entry.input_shape[2:]
        return ["--calib", str(FACES), "--preset", "arcface", "--size", f"{h}x{w}", "--calib-count", "8"]
    npy = directory / "calib.npy"
    np.save(npy, np.random.default_rng(0).standard_normal((8, *entry.input_shape[1:])).astype(_dtype(model)))
    return ["--calib", str(npy)]


def _check_valid(original: onnx.ModelProto, path: Path, entry: Entry
                 ) -> tuple[onnx.ModelProto, list[np.ndarray], list[np.ndarray]]:
    """The output is a drop-in replacement: checker, interface (dynamic dims kept), ORT at another shape.

    Returns the output model, and the original's and its outputs on ``_feeds``."""
    out = onnx.load(str(path))
    onnx.checker.check_model(out, full_check=True)
    assert interface(out) == interface(original)
    feeds = _feeds(original, entry)
    want, got = run(original, feeds), run(out, feeds)
    assert [w.shape for w in want] == [g.shape for g in got]
    assert [w.dtype for w in want] == [g.dtype for g in got]
    assert all(np.isfinite(g).all() for g in got)
    return out, want, got


def _min_cosine(want: list[np.ndarray], got: list[np.ndarray]) -> float:
    cos = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)
           for a, b in ((w.ravel().astype(np.float64), g.ravel().astype(np.float64)) for w, g in zip(want, got))]
    return min(cos)


def _subgraphs(model: onnx.ModelProto) -> list[tuple[str, str, list[str]]]:
    """(op, attribute, op types inside) of every control-flow body (Constants may become initializers)."""
    return sorted((n.op_type, a.name, sorted(m.op_type for m in a.g.node if m.op_type != "Constant"))
                  for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)


def _check_refused(code: int, err: str, pattern: str, output: Path | None) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("onnxprune: error:"), err
    assert re.search(pattern, err), err
    if output is not None:
        assert not output.exists()
        assert not [p for p in output.parent.iterdir() if p.name.endswith(".tmp")]


def _shape_arg(entry: Entry) -> list[str]:
    return ["--input-shape", f"{entry.input_name}=" + "x".join(map(str, entry.input_shape))]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_analyze(entry: Entry, zoo: Zoo, capsys, tmp_path: Path) -> None:
    path = zoo.path(entry)
    report = tmp_path / "analysis.json"
    code, out, err = _cli(["analyze", str(path), "--json", str(report)] + _shape_arg(entry), capsys)
    if entry.expect["analyze"] != OK:
        _check_refused(code, err, entry.expect["analyze"], None)
        return
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["groups"] and "channel groups" in out
    if entry.blocked:
        assert any(re.search(entry.blocked, r) for g in data["groups"] if not g["prunable"] for r in g["reasons"])
    assert (data["prunable_channels"] > 0) == (entry.expect["slim"] == OK)  # analyze and slim agree


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_slim(entry: Entry, zoo: Zoo, capsys, tmp_path: Path) -> None:
    path = zoo.path(entry)
    original = onnx.load(str(path))
    output, report = tmp_path / "out.slim.onnx", tmp_path / "slim.json"
    code, _, err = _cli(["slim", str(path), "--ratio", "0.5", "-q", "-o", str(output), "--json", str(report)]
                        + _shape_arg(entry), capsys)
    if entry.expect["slim"] != OK:
        _check_refused(code, err, entry.expect["slim"], output)
        with pytest.raises(OnnxPruneError, match=entry.expect["slim"]):
            onnxprune.slim(str(path), 0.5)
        return
    assert code == 0, err
    out, _, _ = _check_valid(original, output, entry)
    assert count_params(out) < count_params(original)
    assert _subgraphs(out) == _subgraphs(original)  # If/Loop bodies are left as they were
    assert json.loads(report.read_text())["achieved_ratio"] > 0.3
    # An fp16 model stays fp16 (no float32 weights from folding), a float32 one float32.
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    assert {t.data_type for t in out.graph.initializer} & floats == {original.graph.input[0].type.tensor_type.elem_type}


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_quantize(entry: Entry, zoo: Zoo, capsys, tmp_path: Path) -> None:
    path = zoo.path(entry)
    original = onnx.load(str(path))
    output = tmp_path / "out.int8.onnx"
    calib = _calibration(original, entry, tmp_path)
    code, _, err = _cli(["quantize", str(path), "-q", "-o", str(output)] + calib, capsys)
    if entry.expect["quantize"] != OK:
        _check_refused(code, err, entry.expect["quantize"], output)
        x = np.zeros((2, *entry.input_shape[1:]), _dtype(original))
        with pytest.raises(OnnxPruneError, match=entry.expect["quantize"]):
            quantize(str(path), CalibrationSet(entry.input_name, [x]))
        return
    assert code == 0, err
    out, want, got = _check_valid(original, output, entry)
    assert {n.op_type for n in out.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert _min_cosine(want, got) > 0.9
    if not {"LeakyRelu", "PRelu"} & {n.op_type for n in original.graph.node}:
        return
    # --relu rewrites activations and refits layers: still a valid drop-in replacement, still close.
    code, _, err = _cli(["quantize", str(path), "-q", "--relu", "-o", str(output)] + calib, capsys)
    assert code == 0, err
    _, want, got = _check_valid(original, output, entry)
    assert _min_cosine(want, got) > 0.8


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.oracle], ids=lambda e: e.name)
def test_removal_equals_mask(entry: Entry, zoo: Zoo) -> None:
    """Physically removing random prunable units equals zeroing them at their source."""
    proto = onnx.load(str(zoo.path(entry)))
    feeds = _feeds(proto, entry, batch=2)
    model, analysis = analysed(proto, {k: np.zeros(entry.input_shape, v.dtype) for k, v in feeds.items()})
    assert analysis.prunable_units
    for seed in (0, 1):
        removed = random_selection(analysis, np.random.default_rng(seed), 0.5)
        assert removed
        check_removal(proto, feeds, removed, model, analysis)
