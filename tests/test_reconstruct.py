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


def _chain(wa: np.ndarray, wb: np.ndarray, wc: np.ndarray) -> ir.Model:
    """x -> conv a (3x3) -> Relu -> conv b (1x1) -> Relu -> conv c (1x1) -> y."""
    nodes = [helper.make_node("Conv", ["x", "wa"], ["ya"], name="a", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["ya"], ["ra"], name="ra"),
             helper.make_node("Conv", ["ra", "wb"], ["yb"], name="b", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["yb"], ["rb"], name="rb"),
             helper.make_node("Conv", ["rb", "wc"], ["y"], name="c", kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [numpy_helper.from_array(w, n) for w, n in ((wa, "wa"), (wb, "wb"), (wc, "wc"))])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def test_downstream_refit_also_fits_the_later_layers_and_lowers_the_output_error() -> None:
    # Channels 4 and 5 of conv a are removed. Conv b lost inputs and is refitted either way; conv c
    # lost nothing but reads what b now computes: only the downstream refit fits it, and being the
    # output layer, its least-squares fit can only lower the output error on the calibration data.
    from onnxprune.graph.runtime import session

    rng = np.random.default_rng(0)
    wa, wb, wc = (rng.standard_normal(s).astype(np.float32) for s in ((6, 3, 3, 3), (6, 6, 1, 1), (4, 6, 1, 1)))
    original, pruned = _chain(wa, wb, wc), _chain(wa[:4], wb[:, :4], wc)
    batches = [rng.standard_normal((4, 3, 8, 8)).astype(np.float32) for _ in range(3)]
    want = [session(ir.to_proto(original)).run(None, {"x": x})[0] for x in batches]

    def refit(downstream: bool) -> tuple[ir.Model, list[str], float]:
        model, record = rc.reconstruct(original, pruned, None, set(), "x", batches, downstream=downstream)
        sess = session(ir.to_proto(model))
        err = sum(float(((sess.run(None, {"x": x})[0] - y) ** 2).sum()) for x, y in zip(batches, want))
        return model, [f.node for f in record.layers], err

    consumers, fitted_consumers, err_consumers = refit(False)
    downstream, fitted_downstream, err_downstream = refit(True)
    assert fitted_consumers == ["b"] and fitted_downstream == ["b", "c"]
    assert err_downstream < err_consumers
    for model in (consumers, downstream):  # conv a reads the graph input, the original's: never refitted
        np.testing.assert_array_equal(model.graph.initializers["wa"].const_value.numpy(), wa[:4])
    np.testing.assert_array_equal(consumers.graph.initializers["wc"].const_value.numpy(), wc)


def test_drifted_values_are_those_computed_from_a_layer_that_lost_channels() -> None:
    rng = np.random.default_rng(1)
    wa, wb, wc = (rng.standard_normal(s).astype(np.float32) for s in ((6, 3, 3, 3), (6, 6, 1, 1), (4, 6, 1, 1)))
    original = _chain(wa, wb, wc)
    assert rc._drifted(original, _chain(wa, wb, wc), ()) == set()
    assert rc._drifted(original, _chain(wa, wb, wc), ("rb",)) == {"rb", "y"}
    assert rc._drifted(original, _chain(wa, wb[:4], wc[:, :4]), ()) == {"yb", "rb", "y"}
