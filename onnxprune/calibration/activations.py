"""Run a model on calibration batches and hand intermediate tensors to a consumer, batch by batch.

Intermediate tensors are exposed as extra graph outputs of a private copy. Only one batch of them
is alive at a time, so memory is bounded by the batch size, not by the calibration set.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir

from ..channels.analysis import ChannelAnalysis
from ..graph.interface import exposing
from ..graph.runtime import pieces, session


def stream(model: onnx.ModelProto | ir.Model, names: list[str], input_name: str, batches: Iterable[np.ndarray],
           consume: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Call ``consume({name: tensor})`` for every batch, with the model's outputs and ``names``."""
    exposed = exposing(model, names)
    sess = session(exposed)
    out_names = [o.name for o in sess.get_outputs()]
    for x in pieces(exposed, batches, input_name):
        consume(dict(zip(out_names, sess.run(None, {input_name: x}))))


class ChannelMoments:
    """Per-position mean and variance along one axis of several tensors, accumulated in float64."""

    def __init__(self, axes: dict[str, int]) -> None:
        self.axes = axes
        self.n: dict[str, float] = defaultdict(float)
        self.s1: dict[str, np.ndarray] = {}
        self.s2: dict[str, np.ndarray] = {}

    def __call__(self, tensors: dict[str, np.ndarray]) -> None:
        for name, axis in self.axes.items():
            x = np.moveaxis(np.asarray(tensors[name], np.float64), axis, 0)
            x = x.reshape(x.shape[0], -1)
            self.n[name] += x.shape[1]
            self.s1[name] = self.s1.get(name, 0) + x.sum(axis=1)
            self.s2[name] = self.s2.get(name, 0) + (x * x).sum(axis=1)

    def mean(self, name: str) -> np.ndarray:
        return self.s1[name] / max(self.n[name], 1)

    def var(self, name: str) -> np.ndarray:
        return np.maximum(self.s2[name] / max(self.n[name], 1) - self.mean(name) ** 2, 0.0)


def consumer_moments(model: ir.Model, analysis: ChannelAnalysis, input_name: str,
                     batches: Iterable[np.ndarray]) -> ChannelMoments:
    """Mean and variance of every channel position that a foldable consumer reads."""
    shapes = {c.input: c for c in analysis.consumers}
    axes = {}
    for name, c in shapes.items():
        # Conv and Gemm read channels on axis 1; MatMul on the last axis of its input.
        axes[name] = 1 if c.kind != "gemm" or _node(model, c.node).op_type == "Gemm" else -1
    moments = ChannelMoments(axes)
    stream(model, list(axes), input_name, batches, moments)
    return moments


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def relu_gaps(model: ir.Model, nodes: list[str], input_name: str, batches: Iterable[np.ndarray]) -> dict[str, float]:
    """For each named activation node, ``||f(x) - relu(x)||^2 / ||f(x)||^2`` on the calibration batches.

    How much of a LeakyRelu/PRelu's output its negative side carries on real data: near 0, the
    activation is a ReLU in practice and can become one; a PReLU with large learnt slopes is not.
    """
    by_name = {n.name: n for n in model.graph}
    pairs = {n: (by_name[n].inputs[0].name, by_name[n].outputs[0].name) for n in nodes}
    gap: dict[str, float] = defaultdict(float)
    energy: dict[str, float] = defaultdict(float)

    def consume(t: dict[str, np.ndarray]) -> None:
        for n, (x, y) in pairs.items():
            fx = t[y].astype(np.float64)
            gap[n] += float(np.square(fx - np.maximum(t[x], 0)).sum())
            energy[n] += float(np.square(fx).sum())

    stream(model, sorted({v for p in pairs.values() for v in p}), input_name, batches, consume)
    return {n: gap[n] / energy[n] if energy[n] > 0 else 0.0 for n in nodes}
