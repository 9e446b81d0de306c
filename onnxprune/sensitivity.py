"""Per-group sensitivity: how much the model's outputs move when one group alone is pruned.

Weight criteria rank channels *within* a layer well enough but say little about how much each
layer can lose: removing one channel of MobileFaceNet's residual stream costs more than a
quarter of an ordinary layer. The scan prunes each group alone at a few fractions (physically,
with mean compensation, exactly as the final model will be), measures the output distortion on
calibration images, and the allocator then spends the parameter budget where distortion per
removed parameter is lowest. Every (group, fraction) is independent, so the scan runs on any
``concurrent.futures.Executor``: threads by default (ONNX Runtime releases the GIL), a process
pool or a cluster executor can be passed in.
"""

from __future__ import annotations

from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir

from .graph.runtime import pieces, run_all, session
from .channels.analysis import ChannelAnalysis
from .passes import remove_channels

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)


@dataclass
class GroupSensitivity:
    group: int
    fractions: list[float]  # share of the group's prunable units removed (0 included)
    distortion: list[float]  # relative squared output error, summed over outputs

    def at(self, fraction: float) -> float:
        """Interpolated distortion; beyond the last measured fraction, the last slope continues."""
        fs, ds = self.fractions, self.distortion
        if fraction <= fs[-1] or len(fs) < 2:
            return float(np.interp(fraction, fs, ds))
        slope = (ds[-1] - ds[-2]) / max(fs[-1] - fs[-2], 1e-9)
        return float(ds[-1] + slope * (fraction - fs[-1]))


def distortion(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    """Sum over outputs of ||got - ref||² / ||ref||²: scale-free, zero when nothing changed."""
    total = 0.0
    for a, b in zip(ref, got):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        total += float(((b - a) ** 2).sum() / max((a * a).sum(), 1e-12))
    return total


def _run(model: ir.Model | object, input_name: str, batches: list[np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return run_all(session(proto, threads=1), input_name, pieces(proto, batches, input_name))


def scan(model: ir.Model, analysis: ChannelAnalysis, scores: dict[int, float], input_name: str,
         batches: list[np.ndarray], *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
         input_means: dict[str, np.ndarray] | None = None, executor: Executor | None = None,
         workers: int = 2, progress: Callable[[int, int], None] | None = None) -> dict[int, GroupSensitivity]:
    """Distortion of pruning each prunable group alone at each of ``fractions``."""
    reference = _run(model, input_name, batches)
    jobs = []
    for group in analysis.groups:
        prunable = sorted((u for u in group.units if analysis.units[u].prunable), key=lambda u: (scores.get(u, 0.0), u))
        for f in fractions:
            k = min(int(round(f * len(prunable))), len(group.units) - 1)
            if k >= 1:
                jobs.append((group.id, f, prunable[:k]))

    def job(item):
        gid, f, units = item
        pruned, _ = remove_channels(model, analysis, units, input_means=input_means)
        return gid, f, distortion(reference, _run(pruned, input_name, batches))

    own = executor is None
    pool = executor or ThreadPoolExecutor(max_workers=max(1, workers))
    results: dict[int, dict[float, float]] = {}
    try:
        for done, (gid, f, d) in enumerate(pool.map(job, jobs), 1):
            results.setdefault(gid, {0.0: 0.0})[f] = d
            if progress:
                progress(done, len(jobs))
    finally:
        if own:
            pool.shutdown()
    out = {}
    for gid, curve in results.items():
        fs = sorted(curve)
        ds = np.maximum.accumulate([curve[f] for f in fs])  # more pruning never helps: keep it monotone
        out[gid] = GroupSensitivity(gid, fs, [float(d) for d in ds])
    return out
