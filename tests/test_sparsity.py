"""`slim --sparsity`: the sparse half of double pruning.

Oracles: zeros counted on the output's own weights equal round(S × N); `--sparsity 0` writes the same
bytes as no flag; the zeros stored as ONNX sparse initializers load in ONNX Runtime with bit-identical
outputs; the refit beats plain zeroing on inputs it never saw; int8 keeps every zero; bad values are
one-line errors that write nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune.bench import bench, netscore
from onnxprune.calibration import load_calibration
from onnxprune.cli import main
from onnxprune.graph.io import stored_size, with_sparse_initializers
from onnxprune.graph.metrics import count_macs, count_nonzero_params, count_params, weight_zeros
from onnxprune.graph.shapes import infer_concrete_shapes
from onnxprune.passes.sparsify import BAND
from onnxprune.sample_models import GENERATED
from onnxprune.sensitivity import distortion

from .oracle import run

WEIGHTED = ("Conv", "Gemm", "MatMul")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sparsity")
    onnx.save(GENERATED["se-block"](), str(d / "m.onnx"))
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.standard_normal((32, 3, 32, 32)).astype(np.float32))
    np.save(d / "unseen.npy", rng.standard_normal((16, 3, 32, 32)).astype(np.float32))
    return {"dir": d, "model": d / "m.onnx", "calib": d / "calib.npy", "unseen": d / "unseen.npy"}


def _layer_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each Conv/Gemm/MatMul's constant weight, read straight from the protobuf (not via onnxprune)."""
    inits = {t.name: t for t in model.graph.initializer}
    return {n.name: onnx.numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
            if n.op_type in WEIGHTED and n.input[1] in inits}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_data_free_zero_count_is_the_requested_share(files, sparsity: float) -> None:
    result = onnxprune.slim(str(files["model"]), 0.3, round_to=4, sparsity=sparsity)
    weights = _layer_weights(result.model)
    total = sum(w.size for w in weights.values())
    zeros = sum(w.size - np.count_nonzero(w) for w in weights.values())
    assert zeros == round(sparsity * total)
    report = result.report.sparsity
    assert (report.zeros, report.weights, report.split, report.refit) == (zeros, total, "uniform", False)
    assert report.density == pytest.approx(1 - zeros / total)
    for name, w in weights.items():  # without data: the same share in every layer (largest remainder)
        assert abs((w.size - np.count_nonzero(w)) - sparsity * w.size) < 1, name
    assert count_params(result.model) == result.report.params_after  # zeros are still parameters...
    assert report.nonzero_params == count_nonzero_params(result.model) < count_params(result.model)  # ...not nonzero ones


def test_calibrated_split_stays_exact_and_in_band(files) -> None:
    calib = load_calibration(str(files["calib"]), onnx.load(str(files["model"])))
    result = onnxprune.slim(str(files["model"]), 0.3, round_to=4, calibration=calib, sparsity=0.5, workers=1)
    weights = _layer_weights(result.model)
    total = sum(w.size for w in weights.values())
    zeros = {n: w.size - np.count_nonzero(w) for n, w in weights.items()}
    assert sum(zeros.values()) == round(0.5 * total)
    report = result.report.sparsity
    assert (report.split, report.refit, report.zeros) == ("sensitivity", True, sum(zeros.values()))
    for name, w in weights.items():
        assert 0.5 - BAND - 1 / w.size <= zeros[name] / w.size <= 0.5 + BAND + 1 / w.size, name
    # NetScore counts the nonzero parameters and the dense MACs, with the held-out fidelity
    shapes = infer_concrete_shapes(result.model, {"input": (1, 3, 32, 32)})
    accuracy = result.fidelity.headline()[1]
    assert report.netscore == pytest.approx(netscore(accuracy, count_nonzero_params(result.model),
                                                     count_macs(result.model, shapes)))
    assert report.dense_gzip_bytes > report.gzip_bytes and report.file_bytes == report.dense_file_bytes
    assert (report.file_bytes, report.gzip_bytes) == stored_size(result.model)


def test_sparsity_zero_writes_the_same_bytes(files) -> None:
    d = files["dir"]
    for extra in ([], ["--calib", str(files["calib"])]):
        base = ["slim", str(files["model"]), "--ratio", "0.3", "--round-to", "4", "-q", *extra]
        assert main(base + ["-o", str(d / "a.onnx")]) == 0
        assert main(base + ["--sparsity", "0", "-o", str(d / "b.onnx")]) == 0
        assert _digest(d / "a.onnx") == _digest(d / "b.onnx")


def test_same_bytes_in_one_process_or_two(files) -> None:
    """The scan's jobs give the same model whether they run here or in a worker pool."""
    d = files["dir"]
    base = ["slim", str(files["model"]), "--ratio", "0.3", "--round-to", "4", "--calib", str(files["calib"]),
            "--sparsity", "0.5", "-q"]
    assert main(base + ["--workers", "1", "-o", str(d / "w1.onnx")]) == 0
    assert main(base + ["--workers", "2", "-o", str(d / "w2.onnx")]) == 0
    assert _digest(d / "w1.onnx") == _digest(d / "w2.onnx")


def test_sparse_initializers_load_in_ort_with_the_same_outputs(files) -> None:
    dense = onnxprune.slim(str(files["model"]), 0.3, round_to=4, sparsity=0.6).model
    sparse = with_sparse_initializers(dense)
    assert len(sparse.graph.sparse_initializer) == len(_layer_weights(dense))  # every zeroed weight, nothing else
    onnx.checker.check_model(sparse)
    x = {"input": np.load(files["unseen"])}
    for a, b in zip(run(dense, x), run(sparse, x)):
        assert np.array_equal(a, b)  # ORT densifies them at load: bit-identical outputs
    assert count_params(sparse) == count_params(dense)
    assert count_nonzero_params(sparse) == count_nonzero_params(dense)
    assert weight_zeros(sparse) == weight_zeros(dense)


def test_refit_lowers_the_error_on_unseen_inputs(files) -> None:
    """No channel pruning (ratio 0): the sparse refit alone against plain magnitude zeroing."""
    original = onnx.load(str(files["model"]))
    calib = load_calibration(str(files["calib"]), original)
    refit = onnxprune.slim(original, 0.0, calibration=calib, sparsity=0.5, workers=1)
    plain = onnxprune.slim(original, 0.0, calibration=calib, sparsity=0.5, recover=False, workers=1)
    assert weight_zeros(refit.model)[0] == weight_zeros(plain.model)[0] == round(0.5 * weight_zeros(original)[1])
    x = {"input": np.load(files["unseen"])}
    ref = run(original, x)
    err_refit, err_plain = distortion(ref, run(refit.model, x)), distortion(ref, run(plain.model, x))
    assert err_refit < 0.5 * err_plain, (err_refit, err_plain)
    layers = refit.report.sparsity.layers
    assert all(l.error_refit is not None and l.error_refit < l.error_zeroed for l in layers)


def test_int8_keeps_every_zero(files) -> None:
    d = files["dir"]
    base = ["slim", str(files["model"]), "--ratio", "0.3", "--round-to", "4", "--calib", str(files["calib"]),
            "--sparsity", "0.5", "-q"]
    assert main(base + ["-o", str(d / "f.onnx"), "--json", str(d / "f.json")]) == 0
    assert main(base + ["--int8", "-o", str(d / "q.onnx"), "--json", str(d / "q.json")]) == 0
    float_w = _layer_weights(onnx.load(str(d / "f.onnx")))
    q = onnx.load(str(d / "q.onnx"))
    inits = {t.name: t for t in q.graph.initializer}
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    checked = 0
    for node in q.graph.node:
        if node.name in float_w and node.op_type in WEIGHTED and node.input[1] in dq:
            qdq = dq[node.input[1]]
            w = onnx.numpy_helper.to_array(inits[qdq.input[0]])
            zp = onnx.numpy_helper.to_array(inits[qdq.input[2]]) if len(qdq.input) > 2 else 0
            assert np.all(zp == 0) and w.dtype == np.int8  # symmetric: 0 dequantises to exactly 0
            assert np.all(w[float_w[node.name] == 0] == 0), node.name
            checked += 1
    assert checked >= 4
    report = json.loads((d / "q.json").read_text())
    float_zeros = sum(w.size - np.count_nonzero(w) for w in float_w.values())
    assert report["sparsity"]["float_zeros"] == float_zeros <= report["sparsity"]["zeros"]
    assert report["slim"]["sparsity"]["zeros"] == float_zeros
    import jsonschema
    schema = json.loads((Path(onnxprune.__file__).parent / "schemas" / "report.schema.json").read_text())
    jsonschema.validate(report, schema)
    jsonschema.validate(json.loads((d / "f.json").read_text()), schema)


def test_bench_netscore_counts_nonzero_parameters(files) -> None:
    sparse = onnxprune.slim(str(files["model"]), 0.3, round_to=4, sparsity=0.5).model
    row = bench([sparse], runs=2, warmup=0, accuracy={0: 0.9}).rows[0]
    assert row.params == count_params(sparse)  # the table still shows every parameter
    assert row.netscore == pytest.approx(netscore(0.9, count_nonzero_params(sparse), row.macs))


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan"])
def test_bad_sparsity_is_a_one_line_error_and_writes_nothing(files, value: str, capsys) -> None:
    out = files["dir"] / f"bad{value}.onnx"
    code = main(["slim", str(files["model"]), "--ratio", "0.3", "--sparsity", value, "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("onnxprune: error: --sparsity"), err
    assert not out.exists()
    with pytest.raises(onnxprune.ConfigError, match="--sparsity"):
        onnxprune.slim(str(files["model"]), 0.3, sparsity=float(value))


def test_sparsity_with_relu_is_refused(files, capsys) -> None:
    out = files["dir"] / "relu.onnx"
    code = main(["slim", str(files["model"]), "--ratio", "0.3", "--sparsity", "0.5", "--int8", "--relu",
                 "--calib", str(files["calib"]), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--relu" in err, err
    assert not out.exists()
