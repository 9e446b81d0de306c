"""Checks every output model must pass before it is written: the contract of the tool.

A rewritten model must pass ``onnx.checker``, run in ONNX Runtime, and keep the original graph
inputs and outputs (names, element types, shapes including symbolic dims). The same run also
measures how far the outputs moved, a cheap first signal of what pruning did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx

from .errors import VerificationError
from .graph.runtime import session
from .graph.shapes import Shape, graph_inputs, random_inputs
from .memory import release_memory


@dataclass
class Verification:
    checker: bool
    ran: bool
    interface_kept: bool
    output_rel_error: dict[str, float]  # ||y' - y|| / ||y|| on a random input at the analysis shape


def _signature(vi: onnx.ValueInfoProto) -> tuple:
    tt = vi.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim) \
        if tt.HasField("shape") else None
    return vi.name, tt.elem_type, dims


def interface(model: onnx.ModelProto) -> tuple[list[tuple], list[tuple]]:
    return [_signature(i) for i in graph_inputs(model)], [_signature(o) for o in model.graph.output]


def verify(original: onnx.ModelProto | str | os.PathLike, rewritten: onnx.ModelProto,
           input_shapes: Mapping[str, Shape], seed: int = 0) -> Verification:
    """Raise VerificationError unless ``rewritten`` is a valid drop-in replacement for ``original``.

    ``original`` may be a path (ORT then reads its external data itself). Its reference run is
    unoptimised and done before the output's session exists: on a big model, an optimised
    session costs several times the weights, and two at once would double that.
    """
    try:
        onnx.checker.check_model(rewritten)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"output model fails onnx.checker: {str(exc).splitlines()[0][:200]}") from None
    release_memory()  # the checker's serialised copy
    reference = original if isinstance(original, onnx.ModelProto) else onnx.load(str(original), load_external_data=False)
    if interface(reference) != interface(rewritten):
        raise VerificationError("output model changed the graph inputs or outputs (names, types or shapes)")
    ref_sess = session(original, threads=1, optimize=False)
    outputs = [o.name for o in ref_sess.get_outputs()]
    feeds = random_inputs(ref_sess, input_shapes, np.random.default_rng(seed))
    ref = ref_sess.run(None, feeds)
    del ref_sess
    release_memory()
    try:
        new_sess = session(rewritten, threads=1)
    except Exception as exc:  # ORT raises several unrelated types
        raise VerificationError(f"ONNX Runtime cannot load the output model: {str(exc).splitlines()[0][:200]}") from None
    try:
        out = new_sess.run(None, feeds)
    except Exception as exc:
        raise VerificationError(f"ONNX Runtime cannot run the output model: {str(exc).splitlines()[0][:200]}") from None
    errors = {}
    for o, a, b in zip(outputs, ref, out):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise VerificationError(f"output {o} has shape {b.shape}, the original {a.shape}")
        errors[o] = float(np.linalg.norm(b - a) / (np.linalg.norm(a) or 1.0))
    return Verification(True, True, True, errors)
