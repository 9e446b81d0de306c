"""Physically pruned models equal the original with the same channels masked, on every pattern."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxprune.graph.metrics import count_params
from onnxprune.sample_models import GENERATED, NOMINAL_INPUT

from .graph_strategies import random_conv_model
from .oracle import analysed, check_removal, close, random_selection, run
from .pattern_models import PATTERNS, example_input

# Patterns whose channels must all stay: pruning there would change semantics or the interface.
UNPRUNABLE = {"reduce_channel", "softmax_channel", "unknown_op", "nhwc_transpose"}


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("seed,keep_bias", [(0, True), (1, True), (2, False)])
def test_pattern_removal_equals_mask(name: str, seed: int, keep_bias: bool) -> None:
    """Both semantics: removed channels output their bias (folded forward), or zero."""
    proto = PATTERNS[name](seed)
    feeds = example_input(proto, seed=seed)
    model, analysis = analysed(proto, feeds, keep_bias=keep_bias)
    if name in UNPRUNABLE:
        assert not analysis.prunable_units
        return
    assert analysis.prunable_units, f"{name}: nothing prunable"
    rng = np.random.default_rng(seed)
    for p in (0.3, 0.7):
        removed = random_selection(analysis, rng, p)
        pruned = check_removal(proto, feeds, removed, model, analysis)
        if removed:
            assert count_params(pruned) < count_params(onnx.load_from_string(proto.SerializeToString()))


APPROXIMATE = ["chain", "depthwise", "grouped", "se", "prelu", "per_channel_mul_add", "leaky_clip",
               "instance_norm", "resize_add", "pool", "shared_weight"]


@pytest.mark.parametrize("name", APPROXIMATE)
def test_constant_folds_behind_padding_match_away_from_borders(name: str) -> None:
    """A removed channel's constant reaching a padded conv is folded into its bias: exact inside the image."""
    proto = PATTERNS[name](0)
    feeds = example_input(proto, spatial=48)
    model, analysis = analysed(proto, feeds)
    inexact = [u for u in analysis.prunable_units if u in analysis.inexact]
    assert inexact, "pattern should have channels whose removal is approximate at borders"
    for g in analysis.groups:  # every layer keeps a channel
        if set(g.units) <= set(inexact):
            inexact.remove(g.units[0])
    from onnxprune.passes import mask_channels, remove_channels
    import onnx_ir as ir
    pruned, _ = remove_channels(model, analysis, inexact)
    want = run(mask_channels(model, analysis, inexact), feeds)
    got = run(ir.to_proto(pruned), feeds)
    for w, g in zip(want, got):
        if w.ndim == 4 and w.shape[2] > 16:
            border = 8  # the receptive field of the padded layers in these patterns
            inner = (slice(None), slice(None), slice(border, -border), slice(border, -border))
            assert close([w[inner]], [g[inner]]) < 1e-5
        assert np.isfinite(g).all()


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_architecture_removal_equals_mask(name: str) -> None:
    proto = GENERATED[name]()
    shape = NOMINAL_INPUT[name]
    feeds = {proto.graph.input[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    model, analysis = analysed(proto, feeds)
    removed = random_selection(analysis, np.random.default_rng(3), 0.4)
    assert removed
    check_removal(proto, feeds, removed, model, analysis)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(proto=random_conv_model(), seed=st.integers(0, 2**16), p=st.floats(0.0, 0.9))
def test_random_graphs_removal_equals_mask(proto: onnx.ModelProto, seed: int, p: float) -> None:
    feeds = example_input(proto, seed=seed)
    model, analysis = analysed(proto, feeds, keep_bias=seed % 2 == 0)
    # Removing nothing reproduces the original (canonicalisation only folds BN: float rounding).
    assert close(run(proto, feeds), check_and_run_empty(proto, feeds, model, analysis)) < 1e-5
    removed = random_selection(analysis, np.random.default_rng(seed), p)
    check_removal(proto, feeds, removed, model, analysis)


def check_and_run_empty(proto, feeds, model, analysis):
    pruned = check_removal(proto, feeds, [], model, analysis)
    return run(pruned, feeds)
