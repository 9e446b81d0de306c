"""Learnt weight rounding (AdaRound): ORT's own quantizer reproduces our int8 weights bit for bit, each
layer keeps the learnt rounding only where it lowers its held-out output error, and runs are deterministic."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import numpy_helper

torch = pytest.importorskip("torch")

from onnxprune.calibration import CalibrationSet  # noqa: E402
from onnxprune.int8 import quantize  # noqa: E402
from onnxprune.quantization import quantize_qdq  # noqa: E402
from onnxprune.quantization.rounding import QMAX, on_grid, ort_scales, round_weights, weight_axis  # noqa: E402

from .oracle import run  # noqa: E402
from .pattern_models import GraphBuilder  # noqa: E402


def _net(seed: int = 0) -> onnx.ModelProto:
    """Conv, depthwise conv, grouped conv, asymmetrically padded conv, then Gemm with and without transB."""
    g = GraphBuilder(seed, "rounding")
    x = g.input("x", [1, 4, 10, 10])
    h = g.act(g.conv(x, 4, 16))
    h = g.act(g.conv(h, 16, 16, group=16))
    h = g.act(g.conv(h, 16, 16, k=1, group=2))
    h = g.act(g.conv(h, 16, 16, k=2, pads=[0, 0, 1, 1]))  # asymmetric padding
    h = g.op("Flatten", g.gap(h))
    h = g.act(g.gemm(h, 16, 12))
    w = g.const(g.randn([12, 5], 1 / np.sqrt(12)), "W")
    return g.build([g.op("Gemm", h, w, g.const(g.bias(5), "B"))])


def _batches(n: int = 20, seed: int = 0) -> list[np.ndarray]:
    return [np.random.default_rng(seed).standard_normal((n, 4, 10, 10)).astype(np.float32)]


def _ort_int8(q: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{float weight name: (ORT's int8 values, ORT's scales)} of a QDQ model."""
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    return {n.removesuffix("_quantized"): (v, inits[n.removesuffix("_quantized") + "_scale"])
            for n, v in inits.items() if n.endswith("_quantized") and v.dtype == np.int8}


@pytest.mark.parametrize("per_channel", [True, False])
def test_ort_quantizes_the_rounded_weights_back_bit_for_bit(per_channel: bool) -> None:
    model, batches = _net(), _batches()
    rounded, record = round_weights(model, "x", batches, per_channel=per_channel)
    assert record.rounded  # some layer learnt a better rounding, or the test shows nothing
    qdq, _ = quantize_qdq(rounded, "x", batches, thresholds="minmax", per_channel=per_channel)
    ours = {t.name: numpy_helper.to_array(t) for t in rounded.graph.initializer}
    layers = {n.input[1]: n for n in rounded.graph.node if n.op_type in ("Conv", "Gemm")}
    stored = _ort_int8(qdq)
    assert set(layers) <= set(stored)
    for weight, node in layers.items():
        q8, scale = stored[weight]
        shape = [1] * q8.ndim
        if scale.ndim:
            shape[weight_axis(node)] = -1  # the last Gemm reads B untransposed: per column
        dequantized = (q8.astype(np.float32) * scale.reshape(shape)).astype(np.float32)
        if node.name in record.rounded:  # ORT's int8 times ORT's scale is our float weight, to the bit
            assert np.array_equal(dequantized, ours[weight]), node.name
        else:  # left to ORT's nearest rounding: untouched
            assert np.array_equal(ours[weight], numpy_helper.to_array(
                next(t for t in model.graph.initializer if t.name == weight)))


def test_learnt_rounding_differs_from_nearest_and_is_deterministic() -> None:
    model, batches = _net(1), _batches(seed=1)
    a, record = round_weights(model, "x", batches)
    b, _ = round_weights(model, "x", batches)
    assert a.SerializeToString() == b.SerializeToString()
    assert record.error_learnt < record.error_nearest
    assert not [why for _, why in record.left if "not handled" in why]  # every layer form is fitted
    assert {n for n, _ in record.left} | set(record.rounded) == {n.name for n in model.graph.node
                                                                if n.op_type in ("Conv", "Gemm")}
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    moved = 0  # weights rounded the other way than nearest
    for node in (n for n in model.graph.node if n.name in record.rounded):
        w, s = before[node.input[1]], ort_scales(before[node.input[1]], weight_axis(node), True)
        moved += int(np.sum(np.round(after[node.input[1]] / s) != np.round(w / s)))
    assert moved > 0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([1e-6, 1e-2, 1.0, 300.0]), st.booleans())
def test_on_grid_is_a_fixed_point_of_orts_weight_quantization(seed: int, magnitude: float, per_channel: bool) -> None:
    """Any up/down choice placed on the grid comes back from ORT's own quantize_data unchanged."""
    from onnxruntime.quantization.quant_utils import quantize_data
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((5, 3, 2, 2)) * magnitude).astype(np.float32)
    w[rng.integers(5)] = 0.0  # an all-zero channel: ORT's scale falls back to 1
    s = ort_scales(w, 0, per_channel)
    scaled = w / s
    nearest = np.clip(np.round(scaled), -QMAX, QMAX)
    largest = (np.abs(nearest) >= QMAX) | (w == 0)  # each channel's largest (and zeros) stay: they set the scale
    q = np.where(largest, nearest, np.floor(scaled) + rng.integers(0, 2, w.shape)).astype(np.float32)
    placed = on_grid(q, w, 0, per_channel)
    chunks = [placed[i] for i in range(5)] if per_channel else [placed]
    got = [quantize_data(c.ravel(), onnx.TensorProto.INT8, True) for c in chunks]
    back = np.concatenate([g[2].astype(np.float32).ravel() for g in got])
    assert np.array_equal(back, q.ravel())
    assert np.array_equal(np.concatenate([(g[2] * np.float32(g[1])).astype(np.float32).ravel() for g in got]),
                          placed.ravel())


def test_quantize_adaround_is_judged_held_out_and_valid() -> None:
    model = _net(2)
    x = _batches(32, seed=2)[0]
    calib = CalibrationSet("x", [x], [], None, [])
    plain = quantize(model, calib, tile=False, compare_ort=False)
    learnt = quantize(model, calib, tile=False, compare_ort=False, adaround=True)
    note = next(n for n in learnt.report.notes if "AdaRound" in n)
    kept = note.endswith(", kept")
    score = lambda r: r.report.fidelity["outputs"][0]["cosine"]  # noqa: E731
    assert (score(learnt) > score(plain)) == kept and (score(learnt) == score(plain)) == (not kept)
    onnx.checker.check_model(learnt.model)
    assert run(learnt.model, {"x": x[:1]})[0].shape == run(model, {"x": x[:1]})[0].shape


def test_layers_are_fitted_on_the_function_onnx_runtime_computes() -> None:
    """The torch form of each Conv/Gemm (padding, groups, transB) reproduces ORT's output of that node."""
    from onnxprune.quantization.rounding import _inputs, _Layer
    model, batches = _net(3), _batches(6, seed=3)
    weights = {t.name: t for t in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type in ("Conv", "Gemm")):
        x = _inputs(model, node.input[0], "x", batches)
        want = _inputs(model, node.output[0], "x", batches)
        layer = _Layer.make(node, weights)
        got = layer(torch.from_numpy(x), torch.from_numpy(numpy_helper.to_array(weights[node.input[1]]).copy())).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=node.name)


def test_cli_adaround_and_max_float_layers(tmp_path, capsys) -> None:
    import json
    from onnxprune.cli import main
    path, npy, report = tmp_path / "m.onnx", tmp_path / "c.npy", tmp_path / "r.json"
    onnx.save(_net(4), str(path))
    np.save(npy, _batches(32, seed=4)[0])
    assert main(["quantize", str(path), "--calib", str(npy), "--max-float-layers", "2", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["onnxprune: error: --max-float-layers only applies with --max-drop"]
    assert not (tmp_path / "m.int8.onnx").exists()
    assert main(["quantize", str(path), "--calib", str(npy), "--adaround", "--max-drop", "0", "--max-float-layers", "1",
                 "--task", "outputs", "--no-tile", "-q", "--json", str(report)]) == 0
    notes = json.loads(report.read_text())["notes"]
    assert any("AdaRound" in n for n in notes)
    assert any(n.startswith("--max-drop 0.0: ") and "1 layer(s) kept in float" in n for n in notes), notes
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.int8.onnx")))


def test_a_layer_whose_bias_is_computed_is_left_at_nearest() -> None:
    """A bias made by another node is not a function of the weight alone: the layer is not fitted."""
    model = _net(5)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    model.graph.node.insert(0, onnx.helper.make_node("Identity", [conv.input[2]], ["computed_bias"], name="copy"))
    conv.input[2] = "computed_bias"
    rounded, record = round_weights(model, "x", _batches(seed=5))
    assert dict(record.left)[conv.name] == "layer form not handled (attributes)"
    before = next(t for t in model.graph.initializer if t.name == conv.input[1])
    assert next(t for t in rounded.graph.initializer if t.name == conv.input[1]) == before
