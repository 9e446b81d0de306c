"""Model size and compute: parameters and multiply-accumulates for a given input shape."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Collection, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from .shapes import Shape, infer_concrete_shapes

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class ModelCost:
    params: int
    macs: int


def count_params(model: onnx.ModelProto) -> int:
    """Floating-point weights: initializers (sparse ones at their dense size) and Constant nodes (shape
    constants and indices excluded)."""
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in _FLOAT_TYPES)
    total += sum(int(np.prod(t.dims)) for t in model.graph.sparse_initializer if t.values.data_type in _FLOAT_TYPES)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in _FLOAT_TYPES:
                    total += int(np.prod(a.t.dims))
    return total


def count_nonzero_params(model: onnx.ModelProto) -> int:
    """The parameters :func:`count_params` counts that are not exactly zero (NetScore's p for a sparse model).

    Reads every weight: on a model whose weights are external and not loaded, use :func:`count_params`.
    """
    total = sum(int(np.count_nonzero(numpy_helper.to_array(t))) for t in model.graph.initializer
                if t.data_type in _FLOAT_TYPES)
    total += sum(int(np.count_nonzero(numpy_helper.to_array(t.values))) for t in model.graph.sparse_initializer
                 if t.values.data_type in _FLOAT_TYPES)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in _FLOAT_TYPES:
                    total += int(np.count_nonzero(numpy_helper.to_array(a.t)))
    return total


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def weight_zeros(model: onnx.ModelProto, nodes: Collection[str] | None = None) -> tuple[int, int]:
    """(zeros, weights) of the constant weights of Conv/ConvTranspose/Gemm/MatMul nodes (only ``nodes`` when given).

    A weight counts whether it is a float initializer, a sparse initializer, or an int8/uint8
    initializer behind a DequantizeLinear (QDQ models; zero where it equals its zero point, which
    dequantises to exactly 0). Each weight tensor is counted once however many nodes read it.
    """
    inits = {t.name: t for t in model.graph.initializer}
    sparse = {t.values.name: t for t in model.graph.sparse_initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    zeros = total = 0
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or (nodes is not None and _untiled(node.name) not in nodes):
            continue
        name = node.input[1]
        if name in seen:
            continue
        seen.add(name)
        if name in inits and inits[name].data_type in _FLOAT_TYPES:
            w = numpy_helper.to_array(inits[name])
            zeros, total = zeros + int(w.size - np.count_nonzero(w)), total + int(w.size)
        elif name in sparse:
            n = int(np.prod(sparse[name].dims))
            zeros, total = zeros + n - int(np.count_nonzero(numpy_helper.to_array(sparse[name].values))), total + n
        elif name in dq and dq[name].input[0] in inits:
            q = numpy_helper.to_array(inits[dq[name].input[0]]).astype(np.int64)
            zp = _zero_point(dq[name], q, inits)
            zeros, total = zeros + int(np.count_nonzero(q == zp)), total + int(q.size)
    return zeros, total


def _untiled(name: str) -> str:
    """A node's name before int8 row tiling copied it into strips (``passes/tile_rows.py``: ``NAME/strip3``)."""
    return re.sub(r"/strip\d+$", "", name)


def _zero_point(dq: onnx.NodeProto, q: np.ndarray, inits: Mapping[str, onnx.TensorProto]) -> np.ndarray | int:
    """DequantizeLinear's zero point broadcast against ``q`` (0 when absent)."""
    if len(dq.input) < 3 or not dq.input[2] or dq.input[2] not in inits:
        return 0
    zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int64)
    if zp.ndim == 0 or zp.size == 1:
        return int(zp.reshape(-1)[0])
    axis = _attr(dq, "axis", 1) % q.ndim
    shape = [1] * q.ndim
    shape[axis] = zp.size
    return zp.reshape(shape)


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
