"""Calibration-aware pruning: activation saliency, mean compensation, refitting, sensitivity, fidelity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxprune
from onnxprune.calibration import CalibrationSet, load_calibration
from onnxprune.calibration.activations import consumer_moments
from onnxprune.channels.analysis import analyze_channels
from onnxprune.cli import main
from onnxprune.passes import remove_channels
from onnxprune.passes.reconstruct import reconstruct
from onnxprune.pipeline import prepare
from onnxprune.saliency.criteria import CRITERIA, ScoreContext
from onnxprune.sensitivity import distortion, scan

from .oracle import run
from .pattern_models import PATTERNS

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _chain(seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    model = PATTERNS["chain"](seed)
    x = np.random.default_rng(seed).standard_normal((32, 3, 16, 16)).astype(np.float32)
    return model, x


def _setup(model: onnx.ModelProto, x: np.ndarray):
    prep = prepare(model, input_shapes={"x": (1, 3, 16, 16)}, simplify=False)
    analysis = analyze_channels(prep.model, prep.shapes)
    moments = consumer_moments(prep.model, analysis, "x", [x])
    arrays = {n: v.const_value.numpy() for n, v in prep.model.graph.initializers.items()}
    return prep, analysis, moments, arrays


def _first_group(analysis):
    return next(g for g in analysis.groups if all(analysis.units[u].prunable for u in g.units))


def _plant(model: onnx.ModelProto, conv: str, dead: int, dominant: int) -> onnx.ModelProto:
    """Zero one output channel of ``conv`` and scale another up, in the raw model."""
    node = next(n for n in model.graph.node if n.name == conv)
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    w = onnx.numpy_helper.to_array(init).copy()
    w[dead] = 0
    w[dominant] *= 20
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    return model


@pytest.mark.parametrize("criterion", ["activation", "perturbation", "l1", "l2"])
def test_criteria_rank_planted_dead_last_and_dominant_first(criterion: str) -> None:
    model, x = _chain()
    first_conv = model.graph.node[0].name
    model = _plant(model, first_conv, dead=2, dominant=5)
    prep, analysis, moments, arrays = _setup(model, x)
    group = _first_group(analysis)
    scores = CRITERIA[criterion](ScoreContext(analysis, arrays, prep.bn_gamma, {}, moments, prep.model, [x], "x"))
    ranked = sorted(group.units, key=lambda u: scores[u])
    assert ranked[0] == group.units[2]
    assert ranked[-1] == group.units[5]


def test_activation_needs_calibration() -> None:
    with pytest.raises(onnxprune.ConfigError, match="calibration"):
        onnxprune.slim(PATTERNS["chain"](0), 0.3, criterion="activation")


def test_mean_compensation_and_refit_reduce_error() -> None:
    """Removal with calibration means beats masked constants; refitting beats both (on the fit data)."""
    model, x = _chain(1)
    prep, analysis, moments, arrays = _setup(model, x)
    scores = CRITERIA["activation"](ScoreContext(analysis, arrays, prep.bn_gamma, {}, moments))
    group = _first_group(analysis)
    removed = sorted(group.units, key=lambda u: scores[u])[: len(group.units) // 2]
    ref = run(prep.model, {"x": x})
    plain, _ = remove_channels(prep.model, analysis, removed)
    means = {k: moments.mean(k) for k in moments.axes}
    compensated, _ = remove_channels(prep.model, analysis, removed, input_means=means)
    refit, record = reconstruct(prep.model, compensated, analysis, set(removed), "x", [x])
    errors = [distortion(ref, run(m, {"x": x})) for m in (plain, compensated, refit)]
    assert errors[1] <= errors[0] + 1e-9
    assert errors[2] < errors[1]
    assert record.layers and all(f.error_after < f.error_before for f in record.layers)


def test_sensitivity_scan_is_monotone_and_finds_the_sensitive_group() -> None:
    model, x = _chain(2)
    prep, analysis, moments, arrays = _setup(model, x)
    scores = CRITERIA["l2"](ScoreContext(analysis, arrays, prep.bn_gamma, {}, moments))
    curves = scan(prep.model, analysis, scores, "x", [x[:8]], workers=2)
    assert curves
    for c in curves.values():
        assert c.fractions[0] == 0 and c.distortion[0] == 0
        assert all(b >= a for a, b in zip(c.distortion, c.distortion[1:]))
        assert c.at(1.0) >= c.distortion[-1]


def test_ratio_zero_with_calibration_keeps_outputs() -> None:
    model, x = _chain(3)
    data = CalibrationSet("x", [x], [], None, [])
    result = onnxprune.slim(model, 0.0, calibration=data)
    assert np.allclose(run(model, {"x": x})[0], run(result.model, {"x": x})[0], atol=1e-4)
    assert result.report.fidelity is not None


def test_calibration_options_without_calib_are_rejected(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(PATTERNS["chain"](0), str(path))
    assert main(["slim", str(path), "--ratio", "0.3", "--preset", "arcface"]) == 2
    assert "only applies with --calib" in capsys.readouterr().err


def test_calibrated_slim_from_npy(tmp_path: Path) -> None:
    model, x = _chain(4)
    path, npy, report = tmp_path / "m.onnx", tmp_path / "c.npy", tmp_path / "r.json"
    onnx.save(model, str(path))
    np.save(npy, x)
    assert main(["slim", str(path), "--ratio", "0.3", "--calib", str(npy), "--round-to", "1", "-q",
                 "--json", str(report)]) == 0
    import json
    data = json.loads(report.read_text())
    assert data["calibration"]["held_out"] == 8 and data["allocation"] == "sensitivity"
    assert data["fidelity"]["outputs"][0]["cosine"] > 0.5


@pytest.mark.skipif(not (SHARED / "models" / "mobilefacenet_paddle.onnx").exists(), reason="../shared not available")
def test_trained_recognizer_keeps_embeddings_with_calibration() -> None:
    """The trained MobileFaceNet at 30%: calibration-aware pruning keeps embeddings far closer than weights alone."""
    model = onnx.load(str(SHARED / "models" / "mobilefacenet_paddle.onnx"))
    data = load_calibration(SHARED / "data" / "faces112", model, preset="arcface")
    calibrated = onnxprune.slim(model, 0.3, calibration=data)
    held = calibrated.report.fidelity.embedding["mean_cosine"]
    weights_only = onnxprune.slim(model, 0.3)
    x = data.samples()
    a, b = run(model, {"x": x})[0], run(weights_only.model, {"x": x})[0]
    naive = float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))
    assert abs(calibrated.report.achieved_ratio - 0.3) <= 0.01
    assert held > 0.8 and held > naive + 0.3, (held, naive)


def test_identities_folder_errors(tmp_path: Path) -> None:
    from onnxprune.calibration import load_identities
    model = PATTERNS["chain"](0)
    data = CalibrationSet("x", [np.zeros((2, 3, 16, 16), np.float32)], [], None, [])
    with pytest.raises(onnxprune.ConfigError, match="does not exist"):
        load_identities(tmp_path / "nope", model, data)
    (tmp_path / "only_one").mkdir()
    with pytest.raises(onnxprune.ConfigError, match="subfolders per person"):
        load_identities(tmp_path, model, data)


@pytest.mark.skipif(not (SHARED / "models" / "mobilefacenet_paddle.onnx").exists(), reason="../shared not available")
def test_verification_on_identity_folders(tmp_path: Path) -> None:
    import shutil
    from onnxprune.calibration import load_identities
    crops = SHARED / "data" / "faces112"
    for person, stems in {"biden": ["biden_0", "biden2_0"], "obama": ["obama_0", "obama2_0"], "kit": ["john1_0", "john2_0"]}.items():
        (tmp_path / person).mkdir()
        for stem in stems:
            shutil.copy(crops / f"{stem}.png", tmp_path / person)
    model = onnx.load(str(SHARED / "models" / "mobilefacenet_paddle.onnx"))
    data = load_calibration(crops, model, preset="arcface", count=16)
    ids = load_identities(tmp_path, model, data)
    assert len(ids[1]) == 6
    report = onnxprune.slim(model, 0.3, calibration=data, identities=ids).report.fidelity
    assert report.verification_ref["auc"] == 1.0
    assert 0.0 <= report.verification_got["auc"] <= 1.0
    v = report.verification  # both models on 3 same-person and 12 different-person pairs
    assert (v.reference.genuine, v.reference.impostor) == (3, 12)
    assert v.candidate.auc == report.verification_got["auc"]
    assert sorted(d.identity for d in v.drift) == ["biden", "kit", "obama"]
    assert [d.mean_cosine for d in v.drift] == sorted(d.mean_cosine for d in v.drift)
    assert "accuracy at the original's threshold" in report.summary()


@pytest.mark.skipif(not (SHARED / "models" / "mobilefacenet_paddle.onnx").exists(), reason="../shared not available")
def test_max_drop_keeps_the_recognizer_head_float_and_tries_absorbed_prelu() -> None:
    """--max-drop on the trained MobileFaceNet: first the global depthwise conv and the conv feeding it
    float (an island: either alone leaves the embedding far off); when float layers stop paying, the
    PReLUs absorbed into doubled convs are tried; the embedding holds on 10 crops calibration never saw."""
    model = onnx.load(str(SHARED / "models" / "mobilefacenet_paddle.onnx"))
    data = load_calibration(SHARED / "data" / "faces112", model, preset="arcface")
    x = data.samples()
    order = np.random.default_rng(123).permutation(len(x))
    unseen, calib = x[order[:10]], CalibrationSet(data.name, [x[order[10:]]], [], None, [])
    result = onnxprune.quantize(model, calib, max_drop=0.005, max_float_layers=4, compare_ort=False, tile=False)
    report = result.report
    assert report.excluded[:2] == ["Conv.48", "Conv.47"] and len(report.excluded) <= 5, report.excluded
    tried = next(n for n in report.notes if "PRelu as absorb" in n)
    absorbed = any(p == "absorb" for _, p in report.prelu["rewritten"])
    assert absorbed == tried.endswith("absorb kept")
    a, b = run(model, {data.name: unseen})[0], run(result.model, {data.name: unseen})[0]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() >= 0.985, cos
