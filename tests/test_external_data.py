"""Big-model mechanisms on small models: external data, lazy weights, atomic saves, skeleton shapes.

The 65M-parameter and >2 GB runs are in benchmarks/slim_scale.py; these check the mechanisms
they rely on, in seconds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune import pipeline
from onnxprune.cli import main
from onnxprune.errors import ModelLoadError, OnnxPruneError
from onnxprune.graph import io as graph_io
from onnxprune.graph.io import ModelSource, load_ir, save_atomic
from onnxprune.graph.metrics import count_params
from onnxprune.graph.shapes import infer_concrete_shapes
from onnxprune.graph.skeleton import is_elided, skeleton
from onnxprune.sample_models.generate import iresnet, iresnet100, retinaface
from onnxprune.saliency import criteria
from onnxprune.verify import interface

FEED = {"input": np.random.default_rng(0).standard_normal((2, 3, 112, 112)).astype(np.float32)}


def _save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or path.name + ".data", size_threshold=0)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(model: onnx.ModelProto | Path) -> np.ndarray:
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, FEED)[0]


def _data_files(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


@pytest.fixture
def external_model(tmp_path: Path) -> Path:
    return _save_external(iresnet(), tmp_path / "rec.onnx")


def test_slim_of_external_model_writes_complete_external_output(external_model: Path, tmp_path: Path) -> None:
    data_before = _digest(tmp_path / "rec.onnx.data")
    result = onnxprune.slim(external_model, 0.5)
    assert result.external_data
    out = result.save(tmp_path / "rec.slim.onnx", protect=[external_model])
    assert _data_files(out) == {"rec.slim.onnx.data"}  # its own data file, not the input's
    onnx.checker.check_model(str(out), full_check=True)  # by path: every external tensor is read and checked
    loaded = onnx.load(str(out))  # all weights present: the data file is complete
    assert count_params(loaded) == result.report.params_after
    assert interface(loaded) == interface(onnx.load(str(external_model), load_external_data=False))
    np.testing.assert_allclose(_run(out), _run(result.model), rtol=1e-5, atol=1e-6)
    # Same pruning as from the in-memory model, and the input's weights are untouched.
    same = onnxprune.slim(iresnet(), 0.5).model
    np.testing.assert_allclose(_run(out), _run(same), rtol=1e-5, atol=1e-6)
    assert _digest(tmp_path / "rec.onnx.data") == data_before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_output_never_overwrites_the_inputs_data_file(tmp_path: Path, capsys) -> None:
    # The input keeps its weights in a file named like the output's data file would be.
    model = _save_external(iresnet(), tmp_path / "in.onnx", location="out.onnx.data")
    before = _digest(tmp_path / "out.onnx.data")
    assert main(["slim", str(model), "--ratio", "0.5", "-o", str(tmp_path / "out.onnx"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxprune: error: refusing to overwrite") and "\n" not in err
    assert _digest(tmp_path / "out.onnx.data") == before
    assert not (tmp_path / "out.onnx").exists()


def test_failed_save_leaves_no_half_written_output(external_model: Path, tmp_path: Path, monkeypatch) -> None:
    result = onnxprune.slim(external_model, 0.5)
    out = tmp_path / "prev.onnx"
    result.save(out)  # an earlier output, which a failed save must leave as it was
    prev = {p.name: _digest(p) for p in (out, tmp_path / "prev.onnx.data")}

    def crash(model, path, **kwargs):  # write part of the files, then fail like a full disk
        Path(path).write_bytes(b"partial")
        (Path(path).parent / kwargs["external_data"]).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(graph_io.ir, "save", crash)
    with pytest.raises(OnnxPruneError, match="No space left"):
        result.save(out)
    with pytest.raises(OnnxPruneError, match="No space left"):
        result.save(tmp_path / "new.onnx")
    assert {p.name: _digest(p) for p in (out, tmp_path / "prev.onnx.data")} == prev
    assert not (tmp_path / "new.onnx").exists() and not (tmp_path / "new.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev.onnx", "prev.onnx.data", "rec.onnx", "rec.onnx.data"]


def test_weights_are_memory_mapped_lazily(external_model: Path) -> None:
    model = load_ir(external_model)
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert tensors and all(isinstance(t, ir.ExternalTensor) for t in tensors)
    assert all(t.raw is None for t in tensors)  # nothing mapped until read
    ref = {t.name: onnx.numpy_helper.to_array(t) for t in iresnet().graph.initializer}
    w = model.graph.initializers["fc.weight"].const_value
    np.testing.assert_array_equal(w.numpy(), ref["fc.weight"])
    source = ModelSource(external_model)
    assert source.external and source.weight_bytes == sum(a.nbytes for a in ref.values())


def test_missing_or_truncated_external_data_is_one_clear_error(external_model: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "rec.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="truncated"):
        onnxprune.analyze(external_model)
    data.unlink()
    assert main(["analyze", str(external_model)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxprune: error:") and "rec.onnx.data is missing" in err and "\n" not in err


def test_skeleton_gives_the_same_shapes_without_the_weights() -> None:
    model = retinaface()  # Shape-derived Resize sizes: data propagation must still work
    sk = skeleton(model)
    assert sk.ByteSize() < model.ByteSize() // 10
    assert any(is_elided(t) for t in sk.graph.initializer)
    assert count_params(sk) == count_params(model)
    shapes = {"input": (1, 3, 128, 96)}
    assert infer_concrete_shapes(sk, shapes) == infer_concrete_shapes(model, shapes)
    assert infer_concrete_shapes(ir.from_proto(model), shapes) == infer_concrete_shapes(model, shapes)
    assert skeleton(ir.from_proto(model)).ByteSize() < model.ByteSize() // 10


def test_onnxsim_is_skipped_above_the_size_limit_with_a_note(external_model: Path, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "ONNXSIM_MAX_BYTES", 1024)
    result = onnxprune.slim(external_model, 0.5)
    assert any(w.startswith("onnxsim skipped") for w in result.report.warnings)
    assert abs(result.report.achieved_ratio - 0.5) <= 0.01


@pytest.mark.parametrize("axis,order", [(0, 1.0), (1, 2.0), (2, 2.0)])
def test_blockwise_position_sums_match_the_direct_formula(axis: int, order: float, monkeypatch) -> None:
    monkeypatch.setattr(criteria, "_BLOCK_ELEMS", 7)  # many blocks, ragged last one
    w = np.random.default_rng(1).standard_normal((5, 6, 4)).astype(np.float32)
    direct = (np.abs(np.moveaxis(w.astype(np.float64), axis, 0)) ** order).reshape(w.shape[axis], -1).sum(axis=1)
    np.testing.assert_allclose(criteria.position_sums(w, axis, order), direct, rtol=1e-12)


def test_inline_model_above_the_protobuf_limit_is_saved_with_external_data(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(graph_io, "_EXTERNAL_DATA_THRESHOLD", 1000)
    model = iresnet()
    out = save_atomic(model, tmp_path / "m.onnx")
    assert _data_files(out) == {"m.onnx.data"}
    assert model.graph.initializer[0].HasField("raw_data")  # the caller's model is not modified by saving
    np.testing.assert_allclose(_run(out), _run(model), rtol=1e-5, atol=1e-6)


def test_iresnet100_ladder_scales_as_width_squared() -> None:
    small = iresnet100(0.125)
    onnx.checker.check_model(small)
    assert 0.9e6 < count_params(small) < 1.2e6
    assert sum(n.op_type == "Conv" for n in small.graph.node) == 1 + 2 * 49 + 4  # stem, 49 blocks, 4 downsamples
