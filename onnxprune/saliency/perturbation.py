"""Perturbation saliency: the output distortion when one channel is replaced by its mean, measured.

Optimal-Brain-Damage by experiment rather than by a Taylor expansion: no gradients, ONNX Runtime
only. To avoid one session per channel, each group gets one rewritten graph whose producer
outputs are blended with their calibration means through two extra inputs (keep, fill); the
calibration samples are replicated once per channel in a chunk, each replica masking a different
channel, so a single run measures a whole chunk of channels.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from ..graph.runtime import check_batch, fixed_batch, run_rows, session
from ..graph.interface import exposing
from ..errors import ConfigError
from ..sensitivity import distortion
from .criteria import ScoreContext, register_criterion

SAMPLES = 4  # calibration samples per measurement
CHUNK = 16  # channels measured per run


def _masked_graph(model: onnx.ModelProto, tensors: list[tuple[str, int]]) -> onnx.ModelProto:
    """Copy of ``model`` where each (tensor, rank) is replaced by tensor*keep_i + fill_i (extra inputs)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for i, (name, rank) in enumerate(tensors):
        raw = f"{name}__raw"
        for node in g.node:
            node.output[:] = [raw if o == name else o for o in node.output]
        shape = ["B", "C"] + [1] * (rank - 2)
        g.input.append(helper.make_tensor_value_info(f"keep_{i}", onnx.TensorProto.FLOAT, shape))
        g.input.append(helper.make_tensor_value_info(f"fill_{i}", onnx.TensorProto.FLOAT, shape))
        g.node.append(helper.make_node("Mul", [raw, f"keep_{i}"], [f"{name}__kept"], name=f"perturb_mul_{i}"))
        g.node.append(helper.make_node("Add", [f"{name}__kept", f"fill_{i}"], [name], name=f"perturb_add_{i}"))
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(out)


@register_criterion("perturbation", "measured output distortion when the channel is replaced by its mean "
                    "(ONNX Runtime only; needs --calib)", needs_calibration=True)
def perturbation(ctx: ScoreContext) -> dict[int, float]:
    if ctx.batches is None or ctx.model is None:
        raise ConfigError("criterion perturbation needs calibration data (--calib)")
    a = ctx.analysis
    proto = ir.to_proto(ctx.model)
    x = np.concatenate(ctx.batches)[:SAMPLES]
    check_batch(proto, ctx.input_name)
    one = fixed_batch(proto, ctx.input_name)  # batch fixed to 1: every run below goes sample by sample
    producers: dict[str, str] = {n.name: n.outputs[0].name for n in ctx.model.graph}
    ref_sess = session(exposing(proto, list({producers[s.node] for s in a.slots if s.role == "out"})))
    names = [o.name for o in ref_sess.get_outputs()]
    run = dict(zip(names, run_rows(ref_sess, {ctx.input_name: x}, one)))
    reference = [run[o.name] for o in proto.graph.output]
    scores: dict[int, float] = defaultdict(float)
    for group in a.groups:
        units = [u for u in group.units if a.units[u].prunable]
        if not units:
            continue
        slots = [s for s in a.slots if s.role == "out" and s.node in group.layers]
        tensors = []
        for s in slots:
            t = producers[s.node]
            if t not in [name for name, _ in tensors]:
                tensors.append((t, run[t].ndim))
        graph = _masked_graph(proto, tensors)
        sess = session(graph)
        means = {t: run[t].mean(axis=tuple(i for i in range(run[t].ndim) if i != 1)) for t, _ in tensors}
        roots = {producers[s.node]: a.root[s.elems] for s in slots}
        for start in range(0, len(units), CHUNK):
            chunk = units[start:start + CHUNK]
            feeds = {ctx.input_name: np.tile(x, (len(chunk),) + (1,) * (x.ndim - 1))}
            for i, (t, rank) in enumerate(tensors):
                c = len(means[t])
                keep = np.ones((len(chunk), SAMPLES, c), np.float32)
                for r, u in enumerate(chunk):
                    keep[r, :, roots[t] == u] = 0.0
                fill = (1.0 - keep) * means[t][None, None, :]
                shape = (len(chunk) * SAMPLES, c) + (1,) * (rank - 2)
                feeds[f"keep_{i}"] = keep.reshape(shape)
                feeds[f"fill_{i}"] = fill.reshape(shape).astype(np.float32)
            got = run_rows(sess, feeds, one)
            for r, u in enumerate(chunk):  # replica r masked unit u on its SAMPLES copies
                # equal shares of the rows: SAMPLES each, or SAMPLES x A where the batch is folded into rows
                scores[u] = distortion(reference, [g[r * (len(g) // len(chunk)):(r + 1) * (len(g) // len(chunk))]
                                                   for g in got])
    return {u: scores.get(u, 0.0) for u in a.units}
