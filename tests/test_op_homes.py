"""One home per op: every op the channel analysis prunes through also runs in the torch bridge (so the
gradient criteria, distillation and trained thresholds work wherever l2 does), checked against ONNX
Runtime, or is listed here as an explicit exception with its reason."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxprune.channels.op_rules import RULES

torch = pytest.importorskip("torch")
from onnxprune import torch_bridge  # noqa: E402
from onnxprune.torch_bridge import to_torch  # noqa: E402

from .oracle import run  # noqa: E402

EXCEPTIONS: dict[str, str] = {}  # op -> why the bridge does not run it

# a one-node model per op: (inputs beyond x as initializers, attributes, opset)
_AXES = {"axes": [1]}
CASES: dict[str, tuple[dict[str, np.ndarray], dict, int]] = {
    "Celu": ({}, {"alpha": 0.7}, 17), "Selu": ({}, {}, 17), "Gelu": ({}, {"approximate": "tanh"}, 20),
    "Mish": ({}, {}, 18), "Softsign": ({}, {}, 17), "ThresholdedRelu": ({}, {"alpha": 0.3}, 17),
    "Hardmax": ({}, {"axis": 1}, 17), "GlobalLpPool": ({}, {"p": 3}, 17),
    "LpPool": ({}, {"kernel_shape": [2, 2], "p": 2}, 17),
    "ReduceL1": ({}, _AXES, 17), "ReduceL2": ({}, _AXES, 17), "ReduceSumSquare": ({}, _AXES, 17),
    "ReduceLogSum": ({}, _AXES, 17), "ReduceLogSumExp": ({}, _AXES, 17), "ReduceProd": ({}, _AXES, 17),
}


def _bridge_ops() -> set[str]:
    return set(torch_bridge._OPS)


def test_every_op_with_a_coupling_rule_runs_in_the_torch_bridge() -> None:
    missing = sorted(set(RULES) - _bridge_ops() - set(EXCEPTIONS))
    assert not missing, f"ops pruned through but not run by the torch bridge: {missing}"


@pytest.mark.parametrize("op", sorted(CASES))
def test_op_matches_onnxruntime(op: str) -> None:
    inits, attrs, opset = CASES[op]
    x = np.random.default_rng(0).uniform(0.1, 2.0, (2, 4, 6, 6)).astype(np.float32)  # > 0: Log-based reduces
    x[0, 0] -= 1.0  # and some negatives for the activations
    if op == "ReduceLogSum":
        x = np.abs(x) + 0.1
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    ref = run(model, {"x": x})[0]
    with torch.no_grad():
        got = to_torch(model)(torch.from_numpy(x))[0].numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
