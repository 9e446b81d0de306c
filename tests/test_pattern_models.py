"""Sanity tests for the pattern fixtures and the random-graph strategy."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings

from tests.graph_strategies import random_conv_model
from tests.pattern_models import PATTERNS, example_input


def _run(model: onnx.ModelProto, spatial: int | None = None) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, example_input(model, seed=0, spatial=spatial))


def _check_common(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8 and [o.version for o in model.opset_import if o.domain == ""] == [17]
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_model(name: str) -> None:
    model = PATTERNS[name](0)
    _check_common(model)
    outs = _run(model, spatial=13 if name == "dynamic_spatial" else None)
    assert len(outs) == len(model.graph.output)
    assert all(o.dtype == np.float32 and np.isfinite(o).all() for o in outs)
    assert PATTERNS[name](0).SerializeToString() == model.SerializeToString()
    assert PATTERNS[name](1).SerializeToString() != model.SerializeToString()


def test_example_input_shapes() -> None:
    feed = example_input(PATTERNS["dynamic_spatial"](0), spatial=(12, 20))
    assert feed["x"].shape == (2, 3, 12, 20) and feed["x"].dtype == np.float32
    assert example_input(PATTERNS["nhwc_transpose"](0))["x"].shape == (2, 16, 16, 3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_conv_model())
def test_random_conv_model(model: onnx.ModelProto) -> None:
    _check_common(model)
    assert len(model.graph.node) < 30
    outs = _run(model)
    assert 1 <= len(outs) <= 2 and all(np.isfinite(o).all() for o in outs)
