"""The contract of every rewrite: the graph's inputs and outputs stay exactly as the user's model declared them."""

from __future__ import annotations

import onnx


def restore_interface(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Re-infer intermediate shapes and restore the original interface declarations verbatim."""
    del model.graph.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model)
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
