"""Concrete shapes for analysis, without fixing them in the output model.

Detectors take any image size; the analysis still needs numbers (to map a Flatten back to
channels, to count MACs). We pick a representative shape per input, infer every tensor's shape
for it on a private copy, and leave the model's symbolic dims alone.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import shape_inference

from ..errors import ConfigError
from .skeleton import is_elided, skeleton

Shape = tuple[int, ...]

# A free spatial dim of an image input defaults to the usual detector resolution.
DEFAULT_SPATIAL = 640


def parse_input_shape(spec: str) -> tuple[str, Shape]:
    """Parse ``name=1x3x640x640`` (also ``name=1,3,640,640``)."""
    m = re.fullmatch(r"\s*([^=]+)=\s*(\d+(?:\s*[x,]\s*\d+)*)\s*", spec)
    if not m:
        raise ConfigError(f"bad --input-shape {spec!r}: expected NAME=1x3x640x640")
    dims = tuple(int(d) for d in re.split(r"\s*[x,]\s*", m.group(2)))
    if any(d <= 0 for d in dims):
        raise ConfigError(f"bad --input-shape {spec!r}: dims must be positive")
    return m.group(1).strip(), dims


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not also initializers (old exports list weights there)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def representative_shapes(model: onnx.ModelProto, overrides: Mapping[str, Shape] | None = None) -> dict[str, Shape]:
    """A concrete shape for every real input: overrides first, then the declared dims, then defaults."""
    overrides = dict(overrides or {})
    result: dict[str, Shape] = {}
    inputs = graph_inputs(model)
    names = {i.name for i in inputs}
    unknown = set(overrides) - names
    if unknown:
        raise ConfigError(f"--input-shape names unknown input(s) {sorted(unknown)}; model inputs: {sorted(names)}")
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in overrides:
            shape = overrides[inp.name]
            if len(dims) and len(shape) != len(dims):
                raise ConfigError(f"--input-shape {inp.name} has rank {len(shape)}, the model expects rank {len(dims)}")
            for i, (d, s) in enumerate(zip(dims, shape)):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != s:
                    raise ConfigError(f"--input-shape {inp.name}: dim {i} is fixed to {d.dim_value} in the model, got {s}")
            result[inp.name] = tuple(shape)
            continue
        shape = []
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            elif i == 0:
                shape.append(1)
            else:
                shape.append(DEFAULT_SPATIAL)
        result[inp.name] = tuple(shape)
    return result


def _fix_inputs(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> onnx.ModelProto:
    """A skeleton of ``model`` (large weights elided) with concrete input dims and no stale value_info."""
    return _concrete_inputs(skeleton(model), shapes)


def _concrete_inputs(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> onnx.ModelProto:
    """``model`` (edited in place) with concrete input dims and no stale value_info."""
    del model.graph.value_info[:]
    for inp in model.graph.input:
        if inp.name in shapes:
            tt = inp.type.tensor_type
            tt.shape.Clear()
            for d in shapes[inp.name]:
                tt.shape.dim.add().dim_value = d
    return model


def infer_concrete_shapes(model: onnx.ModelProto | ir.Model, input_shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """Shape of every tensor for the given input shapes (ONNX inference, ORT run for what it leaves open).

    Inference runs on a skeleton (large weights elided), so it costs the graph, not the weights;
    only the ORT fallback, for shapes inference leaves open, needs the real weights.
    """
    fixed = _fix_inputs(model, input_shapes)
    try:
        inferred = shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:  # inference is best effort; ORT below fills the gaps
        inferred = fixed
    shapes: dict[str, Shape] = {}
    elem_types: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        tt = vi.type.tensor_type
        elem_types[vi.name] = tt.elem_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shapes[vi.name] = tuple(d.dim_value for d in tt.shape.dim)
    for init in fixed.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    missing = [o for n in fixed.graph.node for o in n.output if o and o not in shapes]
    if missing:
        if isinstance(model, ir.Model):
            runnable = ir.to_proto(model)  # already a fresh proto: edit it in place
        else:
            runnable = onnx.ModelProto()
            runnable.CopyFrom(model)
        _zero_elided(runnable)  # a skeleton: shapes do not depend on weight values
        _concrete_inputs(runnable, input_shapes)
        shapes.update(_shapes_by_running(runnable, missing, elem_types, input_shapes))
    return shapes


def _zero_elided(model: onnx.ModelProto) -> None:
    """Replace a skeleton's elided weights by ConstantOfShape zeros (ORT allocates them only while probing)."""
    elided = [t for t in model.graph.initializer if is_elided(t)]
    if not elided:
        return
    keep = [t for t in model.graph.initializer if not is_elided(t)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    makers = []
    for t in elided:
        dims = onnx.numpy_helper.from_array(np.asarray(t.dims, np.int64), f"{t.name}__dims")
        model.graph.initializer.append(dims)
        zero = onnx.helper.make_tensor("value", t.data_type, [1], [0])
        makers.append(onnx.helper.make_node("ConstantOfShape", [dims.name], [t.name], value=zero))
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(makers + rest)


def _shapes_by_running(model: onnx.ModelProto, names: list[str], elem_types: Mapping[str, int],
                       input_shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    from .interface import exposing
    from .runtime import session
    probe = exposing(model, names)
    try:
        sess = session(probe, optimize=False)
    except Exception:
        return {}
    feeds = random_inputs(sess, input_shapes, np.random.default_rng(0))
    outs = sess.run(None, feeds)
    return {o.name: tuple(np.asarray(v).shape) for o, v in zip(sess.get_outputs(), outs) if o.name in set(names)}


_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8, "tensor(bool)": np.bool_,
}


def random_inputs(session: ort.InferenceSession, input_shapes: Mapping[str, Shape],
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random feeds for a session, one per input, in the given shapes."""
    feeds = {}
    for inp in session.get_inputs():
        dtype = _ORT_TO_NUMPY.get(inp.type, np.float32)
        shape = input_shapes.get(inp.name) or tuple(d if isinstance(d, int) else 1 for d in inp.shape)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds
