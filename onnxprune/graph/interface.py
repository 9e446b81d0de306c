"""The contract of every rewrite: the graph's inputs and outputs stay exactly as the user's model declared them."""

from __future__ import annotations

from typing import Iterable

import onnx
import onnx_ir as ir

from .skeleton import skeleton


def restore_interface(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Re-infer intermediate shapes and restore the original interface declarations verbatim."""
    del model.graph.value_info[:]
    try:  # on a skeleton: inference never reads the weights, and copying them would cost the model's size
        model.graph.value_info.extend(onnx.shape_inference.infer_shapes(skeleton(model)).graph.value_info)
    except Exception:
        pass  # shapes of intermediates are optional; the checker and ORT decide validity
    inits = {i.name for i in original.graph.initializer}
    by_name = {vi.name: vi for vi in original.graph.input if vi.name not in inits}
    for vi in model.graph.input:
        if vi.name in by_name:
            vi.CopyFrom(by_name[vi.name])
    outs = {vi.name: vi for vi in original.graph.output}
    for vi in model.graph.output:
        if vi.name in outs:
            vi.CopyFrom(outs[vi.name])
    return model


def exposing(model: onnx.ModelProto | ir.Model, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (to read intermediate activations)."""
    if isinstance(model, ir.Model):
        out = ir.to_proto(model)  # already a fresh proto: no second copy of the weights
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    inputs = {i.name: i for i in out.graph.input}
    for name in names:
        if name not in existing:
            # A graph input keeps its declaration: an untyped twin would wipe its type once the model
            # goes through onnx-ir (runtime.session does that for models above 64 MiB).
            info = onnx.ValueInfoProto()
            info.CopyFrom(inputs[name] if name in inputs else onnx.helper.make_empty_tensor_value_info(name))
            out.graph.output.append(info)
            existing.add(name)
    return out
