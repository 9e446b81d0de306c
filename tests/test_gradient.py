"""The ONNX -> torch interpreter, gradient criteria (SNIP, Taylor, SynFlow) and distillation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

import onnxprune  # noqa: E402
from onnxprune.calibration import CalibrationSet  # noqa: E402
from onnxprune.finetune import DistillOptions, distill  # noqa: E402
from onnxprune.sample_models import GENERATED, load_sample  # noqa: E402
from onnxprune.saliency import gradient  # noqa: E402
from onnxprune.saliency.criteria import CRITERIA, ScoreContext  # noqa: E402
from onnxprune.torch_bridge import to_torch, write_back  # noqa: E402
from onnxprune.verify import interface  # noqa: E402

from .oracle import run  # noqa: E402
from .pattern_models import PATTERNS, example_input  # noqa: E402
from .test_calibrated import _chain, _first_group, _plant, _setup  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
PADDLE = SHARED / "models" / "mobilefacenet_paddle.onnx"


def _assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tol: float = 1e-4) -> None:
    module = to_torch(model)
    ref = run(model, feeds)
    with torch.no_grad():
        got = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        g = g.numpy()
        assert g.shape == r.shape and g.dtype == r.dtype
        scale = max(float(np.abs(r).max()), 1e-6) if r.size else 1.0
        err = float(np.abs(r.astype(np.float64) - g).max()) / scale if r.size else 0.0
        assert err <= tol, f"torch differs from onnxruntime by {err:.3g} (relative)"


# ---------------------------------------------------------------------------------- interpreter
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_interpreter_matches_onnxruntime_on_patterns(name: str) -> None:
    model = PATTERNS[name](0)
    try:
        to_torch(model)
    except NotImplementedError as exc:
        assert "op" in str(exc)
        pytest.skip(str(exc))
    _assert_matches_ort(model, example_input(model))


@pytest.mark.parametrize("name,hw", [("mobilefacenet", 112), ("iresnet", 112), ("retinaface", 64), ("scrfd", 96)])
def test_interpreter_matches_onnxruntime_on_generated(name: str, hw: int) -> None:
    model = GENERATED[name]()
    x = np.random.default_rng(0).standard_normal((2, 3, hw, hw)).astype(np.float32)
    _assert_matches_ort(model, {model.graph.input[0].name: x})


def test_interpreter_matches_onnxruntime_on_real_retinaface() -> None:
    try:
        model = load_sample("retinaface-mnet025")
    except Exception as exc:  # offline and not cached
        pytest.skip(f"retinaface-mnet025 unavailable: {exc}")
    x = np.random.default_rng(1).standard_normal((2, 3, 96, 128)).astype(np.float32)
    _assert_matches_ort(model, {model.graph.input[0].name: x})


@pytest.mark.skipif(not PADDLE.exists(), reason="../shared not available")
def test_interpreter_matches_onnxruntime_on_paddle_mobilefacenet() -> None:
    model = onnx.load(str(PADDLE))
    x = np.random.default_rng(2).standard_normal((2, 3, 112, 112)).astype(np.float32)
    _assert_matches_ort(model, {"x": x})


def _single(op: str, inputs: list[np.ndarray | None], attrs: dict | None = None, opset: int = 17, n_out: int = 1,
            out_type: int = TensorProto.FLOAT, const_from: int = 1) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One node: inputs[0:const_from] are graph inputs, the rest initializers (None: omitted)."""
    names, feeds, inits, vis = [], {}, [], []
    for i, arr in enumerate(inputs):
        if arr is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if i < const_from:
            feeds[name] = arr
            vis.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape))
        else:
            inits.append(numpy_helper.from_array(arr, name))
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, name="n", **(attrs or {}))
    graph = helper.make_graph([node], "g", vis, [helper.make_tensor_value_info(o, out_type, None) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return model, feeds


_R = np.random.default_rng(3)


def _f(*shape: int) -> np.ndarray:
    return _R.standard_normal(shape).astype(np.float32)


def _i(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


SINGLE_OPS = {
    "conv_asym_pads": ("Conv", [_f(2, 3, 9, 8), _f(4, 3, 3, 3), _f(4)], {"pads": [0, 1, 2, 1], "strides": [2, 1]}),
    "conv_same_upper": ("Conv", [_f(1, 4, 9, 10), _f(6, 2, 3, 3)], {"auto_pad": "SAME_UPPER", "strides": [2, 2],
                                                                    "group": 2}),
    "conv_dilated": ("Conv", [_f(1, 2, 11, 11), _f(3, 2, 3, 3)], {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    "conv_transpose": ("ConvTranspose", [_f(1, 4, 5, 6), _f(4, 3, 3, 3), _f(3)],
                       {"strides": [2, 2], "pads": [1, 0, 1, 1], "output_padding": [1, 1]}),
    "conv_transpose_shape": ("ConvTranspose", [_f(1, 2, 4, 4), _f(2, 2, 4, 4)],
                             {"strides": [2, 2], "output_shape": [9, 8]}),
    "gemm_trans_alpha": ("Gemm", [_f(5, 3), _f(4, 5), _f(1, 4)], {"transA": 1, "transB": 1, "alpha": 0.5,
                                                                   "beta": 2.0}),
    "avgpool_exclude_pad": ("AveragePool", [_f(1, 2, 7, 7)], {"kernel_shape": [3, 3], "strides": [2, 2],
                                                               "pads": [1, 0, 1, 2]}),
    "avgpool_include_pad": ("AveragePool", [_f(1, 2, 7, 7)], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                                               "count_include_pad": 1}),
    "maxpool_ceil": ("MaxPool", [_f(1, 2, 8, 8)], {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    "maxpool_asym": ("MaxPool", [_f(1, 2, 8, 8)], {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1]}),
    "resize_linear_half_pixel": ("Resize", [_f(1, 2, 5, 7), None, np.array([1, 1, 1.6, 0.5], np.float32)],
                                 {"mode": "linear"}),
    "resize_linear_align": ("Resize", [_f(1, 2, 5, 7), None, None, _i(1, 2, 9, 4)],
                            {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
    "resize_nearest_sizes": ("Resize", [_f(1, 2, 5, 7), None, None, _i(1, 2, 8, 3)], {"mode": "nearest"}),
    "resize_nearest_asym_ceil": ("Resize", [_f(1, 2, 4, 4), None, np.array([1, 1, 2, 3], np.float32)],
                                 {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "ceil"}),
    "pad_reflect": ("Pad", [_f(1, 2, 5, 5), _i(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "reflect"}),
    "pad_edge": ("Pad", [_f(1, 2, 5, 5), _i(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "edge"}),
    "pad_constant": ("Pad", [_f(1, 2, 5, 5), _i(0, 1, 1, 0, 0, 0, -1, 2), np.array(0.5, np.float32)], {}),
    "split_sizes": ("Split", [_f(2, 7, 3), _i(2, 5)], {"axis": 1}, 17, 2),
    "split_num_outputs": ("Split", [_f(2, 7, 3)], {"axis": 1, "num_outputs": 3}, 18, 3),
    "slice_neg_step": ("Slice", [_f(3, 8, 5), _i(-1, 6), _i(-100, 1), _i(0, 1), _i(-1, -2)], {}),
    "squeeze_input": ("Squeeze", [_f(1, 3, 1, 4), _i(0, -2)], {}),
    "unsqueeze_input": ("Unsqueeze", [_f(3, 4), _i(0, -1)], {}),
    "gather_negative": ("Gather", [_f(4, 5, 3), _i(-1, 0, 2)], {"axis": 1}),
    "softmax_opset11": ("Softmax", [_f(2, 3, 4)], {"axis": 1}, 11),
    "upsample_opset9": ("Upsample", [_f(1, 2, 3, 3), np.array([1, 1, 2, 2], np.float32)], {"mode": "nearest"}, 9),
    "reduce_mean_opset18": ("ReduceMean", [_f(2, 3, 4, 5), _i(2, 3)], {"keepdims": 0}, 18),
    "reduce_sum": ("ReduceSum", [_f(2, 3, 4), _i(1)], {}),
    "clip_inputs": ("Clip", [_f(3, 4), np.array(-0.5, np.float32), np.array(0.3, np.float32)], {}),
    "prelu_broadcast": ("PRelu", [_f(2, 3, 4), np.abs(_f(4))], {}),
    "hardswish": ("HardSwish", [_f(3, 5) * 4], {}),
    "erf": ("Erf", [_f(3, 5)], {}),
    "pow": ("Pow", [np.abs(_f(3, 5)), np.array(1.5, np.float32)], {}),
    "instance_norm": ("InstanceNormalization", [_f(2, 3, 4, 4), _f(3), _f(3)], {"epsilon": 1e-3}),
    "flatten_axis2": ("Flatten", [_f(2, 3, 4, 5)], {"axis": 2}),
}


@pytest.mark.parametrize("case", sorted(SINGLE_OPS))
def test_single_ops_match_onnxruntime(case: str) -> None:
    spec = SINGLE_OPS[case]
    op, inputs, attrs = spec[:3]
    opset = spec[3] if len(spec) > 3 else 17
    n_out = spec[4] if len(spec) > 4 else 1
    model, feeds = _single(op, inputs, attrs, opset, n_out)
    _assert_matches_ort(model, feeds, tol=1e-5)


def test_unknown_op_is_reported() -> None:
    with pytest.raises(NotImplementedError, match="op DepthToSpace"):
        to_torch(PATTERNS["unknown_op"](0))


def test_write_back_keeps_graph_and_carries_new_values() -> None:
    model = GENERATED["mobilefacenet"]()
    module = to_torch(ir.from_proto(model))
    assert all(k.isidentifier() for k in module.params)
    with torch.no_grad():
        for p in module.params.values():
            p.mul_(1.1)
    new = write_back(module, ir.from_proto(model))
    assert isinstance(new, ir.Model)
    proto = ir.to_proto(new)
    assert [n.op_type for n in proto.graph.node] == [n.op_type for n in model.graph.node]
    assert interface(proto) == interface(model)
    x = np.random.default_rng(4).standard_normal((2, 3, 112, 112)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x))[0].numpy()
    got = run(proto, {"input": x})[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


# ------------------------------------------------------------------------------- gradient criteria
@pytest.mark.parametrize("criterion", ["snip", "taylor", "synflow"])
def test_gradient_criteria_rank_planted_dead_last_and_dominant_first(criterion: str) -> None:
    model, x = _chain()
    model = _plant(model, model.graph.node[0].name, dead=2, dominant=5)
    prep, analysis, moments, arrays = _setup(model, x)
    group = _first_group(analysis)
    ctx = ScoreContext(analysis, arrays, prep.bn_gamma, {}, moments, prep.model, [x[:16], x[16:]], "x")
    scores = CRITERIA[criterion](ctx)
    assert set(scores) == set(analysis.units)
    assert all(np.isfinite(v) and v >= 0 for v in scores.values())
    ranked = sorted(group.units, key=lambda u: scores[u])
    assert ranked[0] == group.units[2]
    assert ranked[-1] == group.units[5]


def test_snip_saliency_matches_finite_difference() -> None:
    """|w · dL/dw| from autograd equals |w · (L(w+h) - L(w-h)) / 2h| (float64), L the projected loss."""
    model = PATTERNS["chain"](5)
    module = to_torch(model).double()
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8))
    seed = 7
    saliency, _ = gradient.weight_saliency(module, "x", [x], k=1, seed=seed)
    with torch.no_grad():
        outputs = module(torch.from_numpy(x))
    v = gradient.draw_projections(outputs, torch.Generator().manual_seed(seed))
    name = model.graph.node[0].input[1]
    w = dict(module.named_initializers())[name]
    idx = np.unravel_index(int(np.argmax(saliency[name])), saliency[name].shape)
    h = 1e-6
    with torch.no_grad():
        w0 = float(w[idx])
        losses = []
        for d in (h, -h):
            w[idx] = w0 + d
            losses.append(float(gradient.projected_loss(module(torch.from_numpy(x)), v)))
        w[idx] = w0
    fd = abs(w0 * (losses[0] - losses[1]) / (2 * h))
    assert saliency[name][idx] > 0
    assert abs(saliency[name][idx] - fd) <= 1e-3 * fd, (saliency[name][idx], fd)


def test_slim_with_snip_end_to_end() -> None:
    model, x = _chain(6)
    result = onnxprune.slim(model, 0.3, calibration=CalibrationSet("x", [x], [], None, []), criterion="snip")
    assert result.report.criterion == "snip"
    assert result.report.fidelity is not None
    assert interface(result.model) == interface(model)


def test_synflow_is_data_free() -> None:
    result = onnxprune.slim(PATTERNS["chain"](7), 0.3, criterion="synflow")
    assert result.report.criterion == "synflow" and result.report.achieved_ratio > 0


@pytest.mark.parametrize("criterion", ["snip", "taylor", "synflow"])
def test_gradient_criteria_without_torch_raise_config_error(criterion: str, monkeypatch) -> None:
    model, x = _chain()
    prep, analysis, moments, arrays = _setup(model, x)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    ctx = ScoreContext(analysis, arrays, prep.bn_gamma, {}, moments, prep.model, [x], "x")
    with pytest.raises(onnxprune.ConfigError, match=f"criterion {criterion} needs PyTorch: pip install"):
        CRITERIA[criterion](ctx)


def test_distill_without_torch_raises_config_error(monkeypatch) -> None:
    model, x = _chain()
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(onnxprune.ConfigError, match="needs PyTorch"):
        distill(model, model, "x", [x], DistillOptions(steps=1))


# ---------------------------------------------------------------------------------- distillation
def test_distill_reduces_loss_and_keeps_the_graph() -> None:
    model, x = _chain(8)
    pruned = onnxprune.slim(model, 0.5, calibration=CalibrationSet("x", [x], [], None, []), round_to=1).model
    out, record = distill(model, pruned, "x", [x[:16], x[16:]], DistillOptions(steps=60, lr=1e-3))
    assert isinstance(out, ir.Model)
    assert record.final_loss < record.initial_loss, record
    proto = ir.to_proto(out)
    onnx.checker.check_model(proto)
    assert interface(proto) == interface(model)
    assert [n.op_type for n in proto.graph.node] == [n.op_type for n in pruned.graph.node]
    assert {i.name: tuple(i.dims) for i in proto.graph.initializer} == \
        {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    ref = run(model, {"x": x})[0]
    before, after = run(pruned, {"x": x})[0], run(proto, {"x": x})[0]
    assert np.mean((after - ref) ** 2) < np.mean((before - ref) ** 2)


def test_distill_keeps_the_starting_weights_when_held_out_loss_only_rises() -> None:
    """Keep-best: a learning rate that wrecks the model leaves it as it came (step 0 is the best)."""
    model, x = _chain(8)
    pruned = ir.from_proto(onnxprune.slim(model, 0.5, calibration=CalibrationSet("x", [x], [], None, []),
                                          round_to=1).model)
    out, record = distill(model, pruned, "x", [x[:24]], DistillOptions(steps=20, lr=50.0, eval_every=5), held=x[24:])
    assert record.best_step == 0 and not record.improved(), record
    assert record.held_out_best == record.held_out_initial
    got = {n: v.const_value.numpy() for n, v in out.graph.initializers.items()}
    for n, v in pruned.graph.initializers.items():
        assert np.array_equal(got[n], v.const_value.numpy()), n


def test_slim_distils_on_the_feature_maps_of_the_prepared_original() -> None:
    """Through slim: the Conv outputs both graphs have are matched on their kept channels, the held-out
    samples pick the weights, and the held-out fidelity is no worse than the refit alone."""
    model, x = _chain(8)
    data = CalibrationSet("x", [x], [], None, [])
    refit = onnxprune.slim(model, 0.5, calibration=data, round_to=1)
    tuned = onnxprune.slim(model, 0.5, calibration=data, round_to=1, finetune_steps=40)
    f = tuned.report.finetune
    assert f.feature_maps >= 2 and f.held_out_initial is not None and f.steps == 40
    assert f.held_out_best <= f.held_out_initial
    assert tuned.fidelity.headline()[1] >= refit.fidelity.headline()[1] - 1e-6
    assert "feature maps matched" in tuned.report.summary()
