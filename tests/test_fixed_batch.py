"""Models exported with the batch dim fixed to 1 (official SCRFD/RetinaFace ONNX files) through every verb.

Every stage that runs a model (calibration batches, sensitivity scan, refit, saliency, trained
thresholds, layer error, row-tiling check, fidelity, bench, check) must feed it one sample at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.cli import main
from onnxprune.sample_models.generate import retinaface

BIG = 320  # input 1.2 MB, above the row-tiling cache budget: the int8 stem runs in strips
SMALL = 64  # every other stage: the same code paths, a fraction of the time
SAMPLES = 16


def _fixed_detector(size: int, flat: bool, batch: int = 1) -> onnx.ModelProto:
    """RetinaFace-mnet as official exports ship it: input.1 fixed [1,3,size,size], numeric output names with
    static shapes; ``flat``: each output [A,C], the batch folded into the rows (insightface's SCRFD export)."""
    model = retinaface()
    g = model.graph
    if flat:
        for t in g.initializer:
            if t.name.endswith(".shape") and "Head." in t.name:
                k = int(onnx.numpy_helper.to_array(t)[-1])
                t.CopyFrom(onnx.numpy_helper.from_array(np.array([-1, k], np.int64), t.name))
        for node in g.node:
            if node.name in ("loc.concat", "conf.concat", "landmarks.concat"):
                node.attribute[0].i = 0
        for o in g.output:
            o.type.tensor_type.shape.dim.pop(0)
    dims = g.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, (batch, 3, size, size)):
        d.Clear()
        d.dim_value = v
    x = np.zeros((batch, 3, size, size), np.float32)
    outs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    renames = {o.name: str(443 + i) for i, o in enumerate(g.output)}
    renames["input"] = "input.1"
    for node in g.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    g.input[0].name = "input.1"
    for o, y in zip(g.output, outs):
        o.name = renames[o.name]
        for d, v in zip(o.type.tensor_type.shape.dim, y.shape):
            d.Clear()
            d.dim_value = v
    onnx.checker.check_model(model, full_check=True)
    return model


def _io(model: onnx.ModelProto) -> tuple[list, list]:
    dims = lambda v: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return [(i.name, dims(i)) for i in model.graph.input], [(o.name, dims(o)) for o in model.graph.output]


def _files(root: Path, size: int, flat: bool) -> dict[str, Path]:
    model = root / f"retinaface{size}.onnx"
    onnx.save(_fixed_detector(size, flat), str(model))
    # smooth, image-like samples: blocky noise upsampled, so activations are not pure noise
    coarse = np.random.default_rng(0).normal(0, 1, (SAMPLES, 3, size // 16, size // 16)).astype(np.float32)
    calib = root / f"calib{size}.npy"
    np.save(calib, np.repeat(np.repeat(coarse, 16, axis=2), 16, axis=3))
    return {"model": model, "calib": calib, "root": root}


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict[str, Path]:
    return _files(tmp_path_factory.mktemp("fixed_batch"), BIG, flat=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return _files(tmp_path_factory.mktemp("fixed_batch"), SMALL, flat=True)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Torch's spinning intra-op threads slow ~50x when the shared cores are busy; one thread is steady."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _calib(files) -> list[str]:
    return ["--calib", str(files["calib"]), "--calib-count", str(SAMPLES), "--task", "outputs", "-q"]


def _valid(files, out: Path) -> None:
    """Passes the checker, runs in ORT on a [1,...] input, same input/output names and shapes."""
    original, got = onnx.load(str(files["model"])), onnx.load(str(out))
    onnx.checker.check_model(got)
    assert _io(got) == _io(original)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ys = sess.run(None, {"input.1": np.load(files["calib"])[:1]})
    assert [list(y.shape) for y in ys] == [d for _, d in _io(original)[1]]
    assert all(np.isfinite(y).all() for y in ys)


def _run(argv: list[str], capsys) -> None:
    code = main(argv)
    assert code == 0, capsys.readouterr().err


def test_quantize_tiled(big, capsys) -> None:
    out, rep = big["root"] / "q.onnx", big["root"] / "q.json"
    _run(["quantize", str(big["model"]), "-o", str(out), "--json", str(rep), *_calib(big)], capsys)
    _valid(big, out)
    report = json.loads(rep.read_text())
    assert report["tiled"] and report["tiled"]["strips"] > 1, report["notes"]


@pytest.fixture(scope="module")
def slim_int8(files) -> Path:
    """slim (perturbation scores, sensitivity scan, refit, held-out fidelity), then int8 (ranges, layer error)."""
    out, rep = files["root"] / "slim.int8.onnx", files["root"] / "slim.json"
    assert main(["slim", str(files["model"]), "--ratio", "0.5", "--criterion", "perturbation", "--int8", "-o",
                 str(out), "--json", str(rep), *_calib(files)]) == 0
    return out


def test_slim_int8(files, slim_int8) -> None:
    _valid(files, slim_int8)
    report = json.loads((files["root"] / "slim.json").read_text())
    slim = report["slim"]
    assert slim["criterion"] == "perturbation" and slim["refits"] and slim["sensitivity"], slim
    assert report["fidelity"] and report["quantize"]["layer_errors"], report


def test_bench_and_check(files, slim_int8, capsys) -> None:
    _run(["bench", str(files["model"]), str(slim_int8), "--runs", "2", "--warmup", "1", "-q"], capsys)
    rep = files["root"] / "check.json"
    _run(["check", str(files["model"]), str(slim_int8), "--min-speedup", "0", "--runs", "2", "--json", str(rep),
          *_calib(files)], capsys)
    data = json.loads(rep.read_text())
    assert data["passed"] and data["fidelity"], data


def test_slim_gradient_criterion_and_distillation(files, capsys) -> None:
    pytest.importorskip("torch")
    out, rep = files["root"] / "slim.taylor.onnx", files["root"] / "taylor.json"
    _run(["slim", str(files["model"]), "--ratio", "0.5", "--criterion", "taylor", "--finetune-steps", "2", "-o",
          str(out), "--json", str(rep), *_calib(files)], capsys)
    _valid(files, out)
    assert json.loads(rep.read_text())["finetune"]["steps"] == 2


def test_quantize_trained_relu_max_drop(files, capsys, monkeypatch) -> None:
    """Trained thresholds (the QDQ simulation in torch), --relu (activation gaps, refit), --max-drop (layer error)."""
    pytest.importorskip("torch")
    from onnxprune.quantization import trained
    train = trained.train_ranges
    monkeypatch.setattr(trained, "train_ranges", lambda *a, **k: train(*a, **{**k, "steps": 5}))
    out, rep = files["root"] / "qt.onnx", files["root"] / "qt.json"
    _run(["quantize", str(files["model"]), "-o", str(out), "--json", str(rep), "--thresholds", "trained", "--relu",
          "--max-drop", "0", "--no-tile", *_calib(files)], capsys)
    _valid(files, out)
    report = json.loads(rep.read_text())
    assert report["relu_replaced"] and report["layer_errors"] and report["thresholds"] == "trained", report
    assert any("trained thresholds" in n for n in report["notes"]), report["notes"]


def test_batch_fixed_above_one_is_refused(files) -> None:
    """One ConfigError before any work (library entry points: the CLI prints it as one line, exit 2)."""
    from onnxprune.calibration import load_calibration
    from onnxprune.check import check
    from onnxprune.errors import ConfigError
    from onnxprune.int8 import quantize
    from onnxprune.pipeline import slim

    model = _fixed_detector(SMALL, flat=False, batch=2)
    data = load_calibration(files["calib"], model, count=SAMPLES)
    for run in (lambda: quantize(model, data), lambda: slim(model, 0.5, calibration=data),
                lambda: check(model, model, calibration=data)):
        with pytest.raises(ConfigError, match="batch dimension fixed to 2"):
            run()
