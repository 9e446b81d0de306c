"""Model size and compute: parameters and multiply-accumulates for a given input shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx

from .shapes import Shape, infer_concrete_shapes

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class ModelCost:
    params: int
    macs: int


def count_params(model: onnx.ModelProto) -> int:
    """Floating-point weights: initializers and Constant nodes (shape constants and indices excluded)."""
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in _FLOAT_TYPES)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in _FLOAT_TYPES:
                    total += int(np.prod(a.t.dims))
    return total


def count_macs(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> int:
    """MACs of Conv, ConvTranspose, Gemm and MatMul for the concrete ``shapes`` (other ops are cheap)."""
    total = 0
    for node in model.graph.node:
        try:
            if node.op_type == "Conv":
                w, y = shapes[node.input[1]], shapes[node.output[0]]
                total += int(np.prod(y)) * int(np.prod(w[1:]))
            elif node.op_type == "ConvTranspose":
                x, w = shapes[node.input[0]], shapes[node.input[1]]
                total += int(np.prod(x)) * int(np.prod(w[1:]))
            elif node.op_type in ("Gemm", "MatMul"):
                a, y = shapes[node.input[0]], shapes[node.output[0]]
                k = a[0] if (node.op_type == "Gemm" and _attr(node, "transA", 0)) else a[-1]
                total += int(np.prod(y)) * int(k)
        except KeyError:
            continue
    return total


def model_cost(model: onnx.ModelProto, input_shapes: Mapping[str, Shape]) -> ModelCost:
    shapes = infer_concrete_shapes(model, input_shapes)
    return ModelCost(params=count_params(model), macs=count_macs(model, shapes))


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
