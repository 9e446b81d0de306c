"""Channel grouping: which channels are coupled, and which must stay."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.channels.op_rules import map_reshape

from .oracle import analysed
from .pattern_models import PATTERNS, example_input


def _analyse(name: str, exclude=()):
    proto = PATTERNS[name](0)
    return analysed(proto, example_input(proto), exclude)[1]


def _group_of(analysis, layer_substring: str):
    return [g for g in analysis.groups if any(layer_substring in l for l in g.layers)]


def test_residual_add_couples_both_producers() -> None:
    a = _analyse("residual_add")
    coupled = [g for g in a.groups if len(g.layers) == 2]
    assert len(coupled) == 1 and coupled[0].size == 12


def test_shared_weight_couples_its_readers() -> None:
    a = _analyse("shared_weight")
    assert any(len(g.layers) == 2 for g in a.groups)


def test_graph_outputs_and_channel_reductions_block() -> None:
    for name, reason in [("reduce_channel", "reduces over channels"), ("softmax_channel", "normalises over channels"),
                         ("unknown_op", "unsupported op")]:
        a = _analyse(name)
        reasons = [r for g in a.groups for r in g.reasons]
        assert any(reason in r for r in reasons), (name, reasons)
        assert not a.prunable_units


def test_concat_with_graph_input_keeps_input_channels() -> None:
    a = _analyse("concat")
    assert a.prunable_units  # the conv branches stay prunable although the input channels do not


def test_exclude_keeps_matched_layers_intact() -> None:
    a = _analyse("chain")
    layers = [l for g in a.groups if any(a.units[u].prunable for u in g.units) for l in g.layers]
    assert layers
    b = _analyse("chain", exclude=[layers[0]])
    assert all(not b.units[u].prunable for g in b.groups if layers[0] in g.layers for u in g.units)
    c = _analyse("chain", exclude=["no-such-layer-*"])
    assert c.unmatched_excludes == ["no-such-layer-*"]


@pytest.mark.parametrize("in_shape,out_shape,axis,expect_axis,expect", [
    ((1, 3, 2, 2), (1, 12), 1, 1, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]),  # Flatten NCHW: runs per channel
    ((1, 2, 2, 3), (1, 12), 3, 1, [0, 1, 2] * 4),  # Flatten NHWC: channels cycle
    ((1, 3, 1, 1), (1, 3), 1, 1, [0, 1, 2]),  # Squeeze
    ((1, 3), (1, 3, 1, 1), 1, 1, [0, 1, 2]),  # Unsqueeze
    ((1, 12), (1, 3, 2, 2), 1, None, None),  # splitting a flat axis of channel runs: not tracked here
])
def test_map_reshape(in_shape, out_shape, axis, expect_axis, expect) -> None:
    n = in_shape[axis]
    got = map_reshape(in_shape, out_shape, axis, np.arange(n), np.zeros(n))
    if expect is None:
        assert got is None or len(got[1]) == out_shape[got[0]]
        return
    assert got is not None and got[0] == expect_axis
    assert got[1].tolist() == expect


def test_channel_split_across_axes_is_refused() -> None:
    # [1, 6] -> [1, 2, 3]: a channel axis of 6 cut into 2x3 cannot be followed.
    assert map_reshape((1, 6), (1, 2, 3), 1, np.arange(6), np.zeros(6)) is None
