"""A model's graph without the bytes of its large weights: what shape inference and inspection read.

Why: ONNX shape inference, interface checks and parameter counts never look inside a Conv or
Gemm weight, yet serialising a 260 MB model for them costs a full copy each time, and a model
above 2 GB cannot be serialised at all. A skeleton keeps every node, every small tensor (shape
constants, Slice bounds, Resize scales: data propagation reads those) and, for each large
weight, its name, type and dims, marked as external data at a location that does not exist, so
nothing can mistake it for real values.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

# Tensors up to this size keep their values (data propagation may read them); larger float ones are elided.
SMALL_TENSOR_BYTES = 4096
ELIDED_LOCATION = "__onnxprune_elided_weights__"

_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def skeleton(model: onnx.ModelProto | ir.Model) -> onnx.ModelProto:
    """A ModelProto of ``model`` whose large floating-point initializers carry no data."""
    if isinstance(model, ir.Model):
        return _skeleton_ir(model)
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    for t in model.graph.initializer:
        out.graph.initializer.append(_elided(t) if _large(t) else t)
    return out


def _copy_fields(src, dst, skip: str) -> None:
    for fd, val in src.ListFields():
        if fd.name == skip:
            continue
        target = getattr(dst, fd.name)
        if hasattr(val, "extend") and hasattr(target, "extend"):
            target.extend(val)
        elif hasattr(target, "CopyFrom"):
            target.CopyFrom(val)
        else:
            setattr(dst, fd.name, val)


def _nbytes(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return next((int(e.value) for e in t.external_data if e.key == "length"), SMALL_TENSOR_BYTES + 1)
    return t.ByteSize()


def _large(t: onnx.TensorProto) -> bool:
    return t.data_type in _FLOATS and _nbytes(t) > SMALL_TENSOR_BYTES


def _elided(t: onnx.TensorProto) -> onnx.TensorProto:
    e = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, data_location=onnx.TensorProto.EXTERNAL)
    e.external_data.add(key="location", value=ELIDED_LOCATION)
    return e


def _skeleton_ir(model: ir.Model) -> onnx.ModelProto:
    """Serialise a clone (tensors shared, not copied) whose large weights are lazy placeholders."""
    clone = model.clone()
    for value in clone.graph.initializers.values():
        t = value.const_value
        if t is None or not t.dtype.is_floating_point() or t.nbytes <= SMALL_TENSOR_BYTES:
            continue
        value.const_value = ir.ExternalTensor(ELIDED_LOCATION, 0, t.nbytes, t.dtype, shape=t.shape, name=value.name)
    return ir.to_proto(clone)


def is_elided(t: onnx.TensorProto) -> bool:
    """True for a placeholder written by :func:`skeleton` (no values behind it)."""
    return t.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == ELIDED_LOCATION for e in t.external_data)
