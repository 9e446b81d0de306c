"""Budget allocation: rounding, minimum widths, and exact parameter accounting."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxprune.allocation import ParamCounter, allocate, allowed_sizes
from onnxprune.graph.metrics import count_params
from onnxprune.passes import remove_channels
from onnxprune.sample_models import GENERATED, NOMINAL_INPUT

from .oracle import analysed


def test_allowed_sizes() -> None:
    assert allowed_sizes(64, 0, 16, 0.1) == [48, 32, 16]
    assert allowed_sizes(10, 0, 16, 0.1) == []  # narrower than the rounding: cannot shrink
    assert allowed_sizes(80, 0, 8, 0.1) == [72, 64, 56, 48, 40, 32, 24, 16, 8]
    assert allowed_sizes(20, 0, 1, 0.5) == list(range(19, 9, -1))
    assert allowed_sizes(64, 40, 16, 0.1) == [48]  # blocked units stay


@pytest.fixture(scope="module")
def mobilefacenet():
    proto = GENERATED["mobilefacenet"]()
    feeds = {proto.graph.input[0].name: np.zeros(NOMINAL_INPUT["mobilefacenet"], np.float32)}
    return analysed(proto, feeds)


def test_param_counter_matches_the_rewritten_model(mobilefacenet) -> None:
    model, analysis = mobilefacenet
    rng = np.random.default_rng(0)
    removed = [u for u in analysis.prunable_units if rng.random() < 0.5]
    counter = ParamCounter(analysis)
    gain = counter.gain(removed)
    pruned, _ = remove_channels(model, analysis, removed)
    before = count_params(ir.to_proto(model))
    assert before - count_params(ir.to_proto(pruned)) == gain


@pytest.mark.parametrize("round_to", [1, 8, 16])
def test_allocation_hits_target_with_rounded_widths(mobilefacenet, round_to: int) -> None:
    model, analysis = mobilefacenet
    scores = {u: float(i % 7) for i, u in enumerate(analysis.units)}
    total = analysis.total_params()
    alloc = allocate(analysis, scores, int(0.5 * total), round_to=round_to, tolerance=int(0.01 * total))
    assert abs(alloc.params_removed - 0.5 * total) <= 0.01 * total
    pruned, record = remove_channels(model, analysis, alloc.removed)
    for change in record.layers:
        if change.after != change.before:
            assert change.after % round_to == 0, change
            assert change.after >= 0.1 * change.before


def test_within_each_group_the_lowest_scores_go(mobilefacenet) -> None:
    _, analysis = mobilefacenet
    rng = np.random.default_rng(1)
    scores = {u: float(rng.random()) for u in analysis.units}
    total = analysis.total_params()
    alloc = allocate(analysis, scores, int(0.4 * total), round_to=4, tolerance=int(0.01 * total))
    assert alloc.removed
    for g in analysis.groups:
        gone = [u for u in g.units if u in alloc.removed]
        kept = [u for u in g.units if u not in alloc.removed and analysis.units[u].prunable]
        if gone and kept:
            assert max(scores[u] for u in gone) <= min(scores[u] for u in kept)
