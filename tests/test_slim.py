"""`slim` end to end on generated architectures and the real trained models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.graph.metrics import count_params
from onnxprune.sample_models import FETCHED, GENERATED, NOMINAL_INPUT, SampleUnavailable, load_sample
from onnxprune.verify import interface

from .oracle import close, run

DETECTORS = {"retinaface", "retinaface-r50", "scrfd", "retinaface-mnet025"}


def _load(name: str) -> onnx.ModelProto:
    try:
        return load_sample(name)
    except SampleUnavailable as exc:
        pytest.skip(f"real model {name} unavailable (offline?): {exc}")


def _feed(model: onnx.ModelProto, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {model.graph.input[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def _input_shape(name: str, model: onnx.ModelProto) -> tuple[int, ...]:
    if name in NOMINAL_INPUT:
        return NOMINAL_INPUT[name]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.dim_value > 0 else (1 if i == 0 else 48) for i, d in enumerate(dims))


@pytest.mark.parametrize("name", sorted(set(GENERATED) - {"nhwc-block"}) + sorted(FETCHED))
def test_slim_069_hits_target_and_keeps_interface(name: str) -> None:
    model = _load(name)
    result = onnxprune.slim(model, 0.69)
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    assert interface(pruned) == interface(model)  # names, types and (symbolic) shapes
    achieved = 1 - count_params(pruned) / count_params(model)
    assert abs(achieved - 0.69) <= 0.01, f"{name}: removed {achieved:.3f}"
    assert abs(result.report.achieved_ratio - achieved) < 1e-9
    assert result.report.macs_after < result.report.macs_before
    shape = _input_shape(name, model)
    outs = run(pruned, _feed(model, shape))
    assert all(np.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("name", ["retinaface", "retinaface-mnet025"])
def test_pruned_detector_keeps_dynamic_input_size(name: str) -> None:
    model = _load(name)
    pruned = onnxprune.slim(model, 0.5, input_shapes={model.graph.input[0].name: (1, 3, 320, 320)}).model
    dims = pruned.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim[2:]]
    for hw in [(320, 320), (480, 640), (640, 640)]:
        a, b = run(model, _feed(model, (1, 3, *hw))), run(pruned, _feed(model, (1, 3, *hw)))
        assert [x.shape for x in a] == [y.shape for y in b]


@pytest.mark.parametrize("name", ["mobilefacenet", "retinaface", "mtcnn-onet", "age-v1"])
def test_ratio_zero_reproduces_the_model(name: str) -> None:
    model = _load(name)
    result = onnxprune.slim(model, 0.0)
    feeds = _feed(model, _input_shape(name, model))
    assert close(run(model, feeds), run(result.model, feeds)) < 1e-4
    assert result.report.params_after <= result.report.params_before


def test_exclude_keeps_ssh_modules_intact() -> None:
    model = _load("retinaface")
    result = onnxprune.slim(model, 0.5, exclude=["*ssh*"])
    ssh = [l for l in result.report.layers if "ssh" in l.node]
    assert ssh and all(l.before == l.after for l in ssh)
    assert abs(result.report.achieved_ratio - 0.5) <= 0.01


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "double"])
def test_every_criterion_prunes_a_recognizer(criterion: str) -> None:
    model = GENERATED["mobilefacenet"]()
    result = onnxprune.slim(model, 0.4, criterion=criterion)
    assert abs(result.report.achieved_ratio - 0.4) <= 0.01


def test_bn_criterion_removes_small_gamma_channels() -> None:
    """Network slimming: channels whose BN γ is tiny matter least, and the bn criterion finds them."""
    from .oracle import analysed
    from onnxprune.pipeline import prepare
    from onnxprune.channels.analysis import analyze_channels
    from onnxprune.saliency.criteria import ScoreContext, CRITERIA
    model = GENERATED["mobilefacenet"]()
    prep = prepare(model, simplify=False)
    analysis = analyze_channels(prep.model, prep.shapes)
    arrays = {n: v.const_value.numpy() for n, v in prep.model.graph.initializers.items()}
    scores = CRITERIA["bn"](ScoreContext(analysis, arrays, prep.bn_gamma, {}))
    conv, gamma = next((c, g) for c, g in prep.bn_gamma.items() if any(c in grp.layers and len(grp.layers) == 1 for grp in analysis.groups))
    slot = next(s for s in analysis.slots if s.node == conv and s.role == "out")
    units = analysis.root[slot.elems]
    assert np.allclose([scores[int(u)] for u in units], np.abs(gamma))


def test_same_inputs_give_byte_identical_models() -> None:
    """Release pipelines cache on hashes: the same model, options and seed must give the same bytes."""
    from onnxprune.calibration import CalibrationSet
    from onnxprune.int8 import quantize
    model = GENERATED["se-block"]()
    x = np.random.default_rng(0).standard_normal((12, 3, 32, 32)).astype(np.float32)
    data = CalibrationSet("input", [x], [], None, [])
    for make in (lambda: onnxprune.slim(model, 0.5).model,
                 lambda: onnxprune.slim(model, 0.5, calibration=data).model,
                 lambda: quantize(model, data).model):
        assert make().SerializeToString() == make().SerializeToString()


@pytest.mark.parametrize("name", ["retinaface-mnet025", "scrfd"])
def test_skeleton_shapes_and_reported_macs_match_the_full_model(name: str) -> None:
    """Shapes that only a run can give (RetinaFace's FPN resizes to runtime sizes) must not go missing
    when inference reads a weightless skeleton: the MACs in the report depend on them."""
    from onnxprune.graph.metrics import count_macs
    from onnxprune.graph.shapes import infer_concrete_shapes
    from onnxprune.graph.skeleton import skeleton
    model = _load(name)
    shapes_in = {"input": (1, 3, 320, 320)}
    full = infer_concrete_shapes(model, shapes_in)
    assert infer_concrete_shapes(skeleton(model), shapes_in) == full
    result = onnxprune.slim(model, 0.5, input_shapes=shapes_in)
    report, pruned = result.report, result.model
    assert report.macs_before == count_macs(model, full)
    assert report.macs_after == count_macs(pruned, infer_concrete_shapes(pruned, shapes_in)) < report.macs_before
