"""The removal oracle: physically pruning units must equal masking them at their source."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxprune.channels.analysis import ChannelAnalysis, analyze_channels
from onnxprune.passes import mask_channels, remove_channels
from onnxprune.graph.interface import restore_interface
from onnxprune.pipeline import prepare
from onnxprune.verify import interface


def run(model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def analysed(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], exclude=(),
             keep_bias: bool = True) -> tuple[ir.Model, ChannelAnalysis]:
    prep = prepare(proto, input_shapes={k: v.shape for k, v in feeds.items()}, simplify=False)
    return prep.model, analyze_channels(prep.model, prep.shapes, exclude, keep_bias=keep_bias)


def random_selection(analysis: ChannelAnalysis, rng: np.random.Generator, p: float, exact_only: bool = True) -> list[int]:
    units = [u for u in analysis.prunable_units if not (exact_only and u in analysis.inexact)]
    chosen = {u for u in units if rng.random() < p}
    for g in analysis.groups:  # every layer keeps at least one channel
        if set(g.units) <= chosen:
            chosen.discard(g.units[0])
    return sorted(chosen)


def close(a: list[np.ndarray], b: list[np.ndarray], tol: float = 1e-5) -> float:
    """Largest error, relative to the scale of each output (1e-5 of float32 activations)."""
    worst = 0.0
    for x, y in zip(a, b):
        assert x.shape == y.shape
        scale = max(1.0, float(np.abs(x).max()))
        worst = max(worst, float(np.abs(x - y).max()) / scale)
    return worst


def check_removal(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], removed: list[int],
                  model: ir.Model, analysis: ChannelAnalysis) -> onnx.ModelProto:
    """Remove ``removed``; assert validity, unchanged interface and equality with the mask."""
    pruned_ir, record = remove_channels(model, analysis, removed)
    pruned = restore_interface(ir.to_proto(pruned_ir), proto)
    onnx.checker.check_model(pruned, full_check=True)
    assert interface(pruned) == interface(proto)
    masked = run(mask_channels(model, analysis, removed), feeds)
    got = run(pruned, feeds)
    err = close(masked, got)
    assert err < 1e-5, f"pruned model differs from masked model by {err:.3g} (removed {len(removed)} units)"
    return pruned
