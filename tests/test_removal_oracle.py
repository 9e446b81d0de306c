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
@pytest.mark.parametrize("seed", [0, 1])
def test_pattern_removal_equals_mask(name: str, seed: int) -> None:
    proto = PATTERNS[name](seed)
    feeds = example_input(proto, seed=seed)
    model, analysis = analysed(proto, feeds)
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


@pytest.mark.parametrize("name", ["per_channel_mul_add", "leaky_clip", "instance_norm"])
def test_inexact_folds_match_away_from_borders(name: str) -> None:
    """A masked channel's nonzero constant feeding a padded conv is folded into its bias: exact inside."""
    proto = PATTERNS[name](0)
    feeds = example_input(proto, spatial=24)
    model, analysis = analysed(proto, feeds)
    inexact = [u for u in analysis.prunable_units if u in analysis.inexact]
    assert inexact, "pattern should have channels with constant-carrying removals"
    from onnxprune.passes import mask_channels, remove_channels
    import onnx_ir as ir
    pruned, record = remove_channels(model, analysis, inexact)
    assert record.inexact_folds > 0
    want = run(mask_channels(model, analysis, inexact), feeds)[0]
    got = run(ir.to_proto(pruned), feeds)[0]
    border = 3  # receptive-field growth of the padded convs in these patterns
    inner = (slice(None), slice(None), slice(border, -border), slice(border, -border))
    assert close([want[inner]], [got[inner]]) < 1e-5
    assert np.abs(want - got).max() > 1e-4  # and the border really differs: the fold is an approximation


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
    model, analysis = analysed(proto, feeds)
    # Removing nothing reproduces the original (canonicalisation only folds BN: float rounding).
    assert close(run(proto, feeds), check_and_run_empty(proto, feeds, model, analysis)) < 1e-5
    removed = random_selection(analysis, np.random.default_rng(seed), p)
    check_removal(proto, feeds, removed, model, analysis)


def check_and_run_empty(proto, feeds, model, analysis):
    pruned = check_removal(proto, feeds, [], model, analysis)
    return run(pruned, feeds)
