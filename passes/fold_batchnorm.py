"""Fold inference-mode BatchNormalization into the Conv that feeds it.

Folding shrinks the graph the analysis walks and is what ONNX Runtime would do anyway, but it
erases γ, the network-slimming saliency. So γ of every folded BN is returned in the record,
keyed by the Conv node that absorbed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from .checks import CheckedPass


@dataclass(frozen=True)
class FoldRecord:
    folded: list[tuple[str, str]] = field(default_factory=list)  # (conv node, bn node)
    gamma: dict[str, np.ndarray] = field(default_factory=dict)  # conv node name -> BN γ per output channel


@dataclass
class FoldResult(ir.passes.PassResult):
    record: FoldRecord = field(default_factory=FoldRecord)


class FoldBatchNorm(CheckedPass, ir.passes.FunctionalPass):
    """Merge every foldable Conv→BatchNormalization pair; the input model is not modified."""

    def call(self, model: ir.Model) -> FoldResult:
        model = model.clone()  # nodes and values copied; tensors shared (passes replace them, never edit them)
        record = FoldRecord()  # its list and dict are filled here, then never again
        graph = model.graph
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
                continue
            conv = _foldable_conv(bn)
            if conv is None:
                continue
            gamma = _fold(graph, conv, bn)
            record.folded.append((conv.name or "", bn.name or ""))
            record.gamma[conv.name or ""] = gamma.astype(np.float32)
        if record.folded:
            model = RemoveUnusedNodesPass()(model).model  # drops the replaced weights and BN statistics
        return FoldResult(model, bool(record.folded), record)


def fold_batchnorm(model: ir.Model) -> tuple[ir.Model, FoldRecord]:
    """Return a copy of ``model`` with every foldable Conv→BatchNormalization pair merged (:class:`FoldBatchNorm`)."""
    result = FoldBatchNorm()(model)
    return result.model, result.record


def _fold(graph: ir.Graph, conv: ir.Node, bn: ir.Node) -> np.ndarray:
    """Fold ``bn`` into ``conv`` (new weight and bias initializers, ``bn`` removed); γ, in float64."""
    w = conv.inputs[1].const_value.numpy().astype(np.float64)
    b = conv.inputs[2].const_value.numpy().astype(np.float64) if _has(conv, 2) else np.zeros(w.shape[0])
    gamma, beta, mean, var = (bn.inputs[i].const_value.numpy().astype(np.float64) for i in range(1, 5))
    eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
    scale = gamma / np.sqrt(var + eps)
    dtype = conv.inputs[1].const_value.numpy().dtype
    new_w = (w * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(dtype)
    new_b = ((b - mean) * scale + beta).astype(dtype)
    w_val = _initializer(graph, f"{conv.name}.weight_bnfold", new_w)
    b_val = _initializer(graph, f"{conv.name}.bias_bnfold", new_b)
    old_weights = [conv.inputs[1], conv.inputs[2] if _has(conv, 2) else None]
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    conv.replace_input_with(1, w_val)
    conv.replace_input_with(2, b_val)
    for v in old_weights:  # unmap what was read: on a big model, mapped and folded weights would double RSS
        if v is not None and isinstance(v.const_value, ir.ExternalTensor):
            v.const_value.release()  # safe: an external tensor maps its file again if read again
    conv_out, bn_out = conv.outputs[0], bn.outputs[0]
    name = bn_out.name
    bn_out.replace_all_uses_with(conv_out, replace_graph_outputs=True)
    graph.remove(bn, safe=True)
    conv_out.name = name
    return gamma


def _has(node: ir.Node, i: int) -> bool:
    return len(node.inputs) > i and node.inputs[i] is not None


def _foldable_conv(bn: ir.Node) -> ir.Node | None:
    """The Conv feeding ``bn`` if folding is exact and touches nothing else; otherwise None."""
    if len(bn.outputs) > 1 and any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
        return None  # training-mode outputs in use
    if "training_mode" in bn.attributes and bn.attributes["training_mode"].as_int():
        return None
    if any(not _has(bn, i) or bn.inputs[i].const_value is None for i in range(1, 5)):
        return None
    x = bn.inputs[0]
    conv = x.producer()
    if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
        return None
    if len(x.uses()) != 1 or x.is_graph_output():
        return None
    if conv.inputs[1] is None or conv.inputs[1].const_value is None:
        return None
    if _has(conv, 2) and conv.inputs[2].const_value is None:
        return None
    if conv.inputs[1].const_value.shape[0] != bn.inputs[1].const_value.shape[0]:
        return None
    return conv


def _initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name, k = base, 1
    while name in graph.initializers:
        name, k = f"{base}_{k}", k + 1
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name),
                     shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(value)
    return value
