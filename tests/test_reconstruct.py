"""The least-squares refit samples the right rows: input patches that make the sampled outputs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.passes import reconstruct as rc
from onnxprune.passes.rows import input_rows


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 1]),
    dict(kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 2, 2, 2]),
    dict(kernel_shape=[3, 2], strides=[2, 1], auto_pad="SAME_UPPER"),
    dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER"),
    dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="VALID"),
    dict(kernel_shape=[1, 1]),
])
def test_refit_rows_are_the_patches_that_make_the_sampled_outputs(attrs: dict) -> None:
    # The refit samples output positions from the original and input patches from the pruned model:
    # on an unchanged conv, patches @ weights + bias must give back exactly the sampled outputs.
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((5, 4, *attrs["kernel_shape"])).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 15, 13])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    t = rc._Target("conv", "conv", "x", "y", np.ones(5, bool), "w", "b")
    feeds = [rng.standard_normal((2, 4, 15, 13)).astype(np.float32)]
    (idx, hw, Y), = rc._original_rows(model, [t], "x", feeds, per_image=40, seed=0)["conv"]
    X = input_rows(next(iter(model.graph)), feeds[0], idx, hw)
    np.testing.assert_allclose(X @ w.reshape(5, -1).T.astype(np.float64) + b, Y, rtol=1e-4, atol=1e-4)
