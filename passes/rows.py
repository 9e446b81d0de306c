"""Rows of a layer's input as a least-squares refit reads them (shared by ``reconstruct`` and ``sparsify``).

A Conv's output at one position is its flattened weight times the input patch under the kernel
there; a Gemm/MatMul's is its weight times one row of its input. :func:`input_rows` gathers those
patches or rows, and :func:`up_to` cuts a model down to the part that computes one tensor, so the
rows are read from a pruned model without running the rest of it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass


def input_rows(node: ir.Node, x: np.ndarray, idx: np.ndarray | None, out_hw: tuple[int, int]) -> np.ndarray:
    """``node``'s input rows, in the layout of its flattened weight, float64.

    For a Conv: the input patches (padding included) at the sampled output positions ``idx`` of an
    ``out_hw`` output, [batch * len(idx), C * kh * kw]. For a Gemm/MatMul: every row of ``x``.
    """
    x = np.asarray(x, np.float64)
    if node.op_type != "Conv":
        return x.reshape(-1, x.shape[-1])
    w = node.inputs[1].const_value.shape.numpy()
    kh, kw = w[2], w[3]
    sh, sw = (node.attributes.get_ints("strides", None) or (1, 1))
    dh, dw = (node.attributes.get_ints("dilations", None) or (1, 1))
    pads = list(node.attributes.get_ints("pads", None) or (0, 0, 0, 0))
    auto = node.attributes.get_string("auto_pad", "NOTSET")
    hout, wout = out_hw
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        th = max((hout - 1) * sh + (kh - 1) * dh + 1 - x.shape[2], 0)
        tw = max((wout - 1) * sw + (kw - 1) * dw + 1 - x.shape[3], 0)
        top, left = (th // 2, tw // 2) if auto == "SAME_UPPER" else (th - th // 2, tw - tw // 2)
        pads = [top, left, th - top, tw - left]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oy, ox = np.divmod(idx, wout)
    cols = [xp[:, :, oy * sh + ky * dh, ox * sw + kx * dw] for ky in range(kh) for kx in range(kw)]
    X = np.stack(cols, axis=-1)  # [B, C, P, kh*kw]
    return X.transpose(0, 2, 1, 3).reshape(x.shape[0] * len(idx), -1)


def up_to(model: ir.Model, name: str) -> onnx.ModelProto:
    """``model`` cut down to the nodes (and weights) that compute ``name``, its only output."""
    cut = model.clone()  # tensors shared, not copied
    value = next(v for v in [*cut.graph.inputs, *(o for n in cut.graph for o in n.outputs)] if v.name == name)
    cut.graph.outputs.clear()
    cut.graph.outputs.append(value)
    RemoveUnusedNodesPass()(cut)  # also follows what If/Loop bodies read from the outer graph
    return ir.to_proto(cut)
