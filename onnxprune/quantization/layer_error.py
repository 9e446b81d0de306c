"""Per-layer quantisation error: where the int8 model departs from the float one, and which layer adds it.

The activations are collected and matched by ONNX Runtime's own debugging tool
(``onnxruntime.quantization.qdq_loss_debug``): both models are augmented to expose every float
tensor, run with graph optimisation off on a few calibration samples, and each quantized
activation is compared (a) before vs after its own QuantizeLinear/DequantizeLinear pair (the
rounding and clipping of that tensor alone) and (b) against the float model's tensor of the same
name (the error accumulated up to there). Weights are compared float vs dequantized.

A layer's *added* error is the relative noise power (1 / SQNR, linear) of its output minus the
worst of its inputs: large when this layer, rather than those before it, loses precision. It is
what ``--max-drop`` ranks layers by, and what the summary lists.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import onnx

from ..graph.runtime import pieces

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FOLDED_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu")  # ORT drops these into the preceding QDQ pair


@dataclass
class LayerError:
    """Quantisation error at one quantized activation, attributed to the layer that produces it."""

    tensor: str
    node: str  # the layer: the producing node, or the Conv/Gemm before a folded activation
    op_type: str
    sqnr_db: float  # float model vs int8 model at this tensor (error accumulated so far)
    qdq_sqnr_db: float  # this tensor's own quantize-dequantize only (rounding + clipping)
    added: float  # relative noise power added by this layer (output minus worst input)
    weight_sqnr_db: float | None = None

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _noise(sqnr_db: float) -> float:
    return 10 ** (-sqnr_db / 10) if math.isfinite(sqnr_db) else 0.0


def _sqnr(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    a = np.concatenate([np.ravel(x) for x in ref]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in got]).astype(np.float64)
    noise = float(((a - b) ** 2).sum())
    signal = float((a * a).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


def layer_errors(float_model: onnx.ModelProto, quantized: onnx.ModelProto, input_name: str,
                 batches: Sequence[np.ndarray], samples: int = 4) -> list[LayerError]:
    """One row per quantized activation of ``quantized``, in graph order, on ``samples`` calibration samples.

    ``float_model`` must be the model ``quantized`` was made from (same tensor names: the
    pre-processed model handed to ORT's quantizer).
    """
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, create_activation_matching,
                                                         create_weight_matching,
                                                         modify_model_output_intermediate_tensors)
    data = np.concatenate(list(batches))[:samples].astype(np.float32)
    feeds = [{input_name: x} for x in pieces(float_model, [data], input_name)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: os.path.join(tmp, f"{k}.onnx") for k in ("float", "qdq", "float_aug", "qdq_aug")}
        onnx.save(float_model, paths["float"])
        onnx.save(quantized, paths["qdq"])
        modify_model_output_intermediate_tensors(paths["float"], paths["float_aug"])
        modify_model_output_intermediate_tensors(paths["qdq"], paths["qdq_aug"])
        float_acts = collect_activations(paths["float_aug"], iter(feeds))
        qdq_acts = collect_activations(paths["qdq_aug"], iter(feeds))
        weights = create_weight_matching(paths["float"], paths["qdq"])
    matching = create_activation_matching(qdq_acts, float_acts)
    weight_sqnr = {name: _sqnr([m["float"]], [m["dequantized"]]) for name, m in weights.items()}
    return _table(float_model, matching, weight_sqnr)


def _folded(node: onnx.NodeProto | None, model: onnx.ModelProto):
    """The activation ORT removed in front of a QDQ pair, as a numpy function (its input is what ORT quantizes)."""
    if node is None or node.op_type not in ("Relu", "Clip"):
        return None
    if node.op_type == "Relu":
        return lambda x: np.maximum(x, 0)
    inits = {i.name: i for i in model.graph.initializer}  # only the two bounds are converted
    attrs = {a.name: a.f for a in node.attribute}

    def bound(k: int, attr: str, default: float):
        name = node.input[k] if len(node.input) > k else ""
        return onnx.numpy_helper.to_array(inits[name]) if name in inits else attrs.get(attr, default)
    lo, hi = bound(1, "min", -np.inf), bound(2, "max", np.inf)
    return lambda x: np.clip(x, lo, hi)


def _table(model: onnx.ModelProto, matching: dict, weight_sqnr: dict[str, float]) -> list[LayerError]:
    producer = {o: n for n in model.graph.node for o in n.output}
    measured = {}
    for t, m in matching.items():
        pre = m["pre_qdq"]
        act = _folded(producer.get(t), model)
        if act is not None and any(a.shape == b.shape and not np.array_equal(a, b) for a, b in zip(pre, m["post_qdq"])):
            pre = [act(a) for a in pre]  # ORT quantized the activation's input: the activation is not noise
        measured[t] = (_sqnr(m["float"], m["post_qdq"]) if "float" in m else math.nan, _sqnr(pre, m["post_qdq"]))

    def owner(t: str) -> onnx.NodeProto | None:
        """The layer a quantized tensor belongs to: its producer, or the layer before a folded activation."""
        node = producer.get(t)
        while node is not None and node.op_type in FOLDED_ACTIVATIONS and node.input[0] in producer \
                and node.input[0] not in measured:
            node = producer[node.input[0]]
        return node

    def input_noise(node: onnx.NodeProto, seen: set[str]) -> float:
        """Worst relative noise among the nearest measured tensors feeding ``node``."""
        worst = 0.0
        for i in node.input:
            if not i or i in seen:
                continue
            seen.add(i)
            if i in measured:
                worst = max(worst, _noise(measured[i][0]))
            elif i in producer:
                worst = max(worst, input_noise(producer[i], seen))
        return worst

    order = {o: k for k, n in enumerate(model.graph.node) for o in n.output}
    rows = []
    for t in sorted(measured, key=lambda t: order.get(t, -1)):
        node = owner(t)
        sqnr, qdq = measured[t]
        if node is None:  # a graph input: only its own quantizer
            rows.append(LayerError(t, t, "input", sqnr, qdq, _noise(sqnr)))
            continue
        added = _noise(sqnr) - input_noise(node, set())
        op = node.op_type + ("+" + producer[t].op_type if producer[t] is not node else "")
        w = node.input[1] if node.op_type in WEIGHTED_OPS and len(node.input) > 1 else None
        rows.append(LayerError(t, node.name or t, op, sqnr, qdq, added, weight_sqnr.get(w) if w else None))
    return rows


def worst_layers(rows: Sequence[LayerError], n: int = 5) -> list[LayerError]:
    """The ``n`` layers that add the most error, worst first."""
    return sorted((r for r in rows if r.added > 0), key=lambda r: -r.added)[:n]
