"""Per-group sensitivity: how much the model's outputs move when one group alone is pruned.

Weight criteria rank channels *within* a layer well enough but say little about how much each
layer can lose: removing one channel of MobileFaceNet's residual stream costs more than a
quarter of an ordinary layer. The scan prunes each group alone at a few fractions (physically,
with mean compensation, exactly as the final model will be), measures the output distortion on
calibration images, and the allocator then spends the parameter budget where distortion per
removed parameter is lowest. Every (group, fraction) is independent, so the scan runs on a
:class:`~onnxprune.executors.TaskExecutor`: a local process pool by default, or Ray.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from .graph.runtime import pieces, run_all, session
from .channels.analysis import ChannelAnalysis
from .executors import LocalExecutor, TaskExecutor
from .passes import remove_channels

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class GroupSensitivity:
    """One group's scanned curve: output distortion against the share of its units removed.
    :func:`scan` returns one per scanned group (group id -> curve); the allocator prices steps on it."""

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


@dataclass
class ScanInputs:
    """What every scan job reads; shipped once per worker, the model as ONNX bytes."""

    model: ir.Model
    analysis: ChannelAnalysis
    input_name: str
    batches: list[np.ndarray]
    input_means: dict[str, np.ndarray] | None
    reference: list[np.ndarray]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["model"] = ir.to_proto(self.model).SerializeToString()
        return state

    def __setstate__(self, state: dict) -> None:
        state["model"] = ir.from_proto(onnx.load_from_string(state["model"]))
        self.__dict__.update(state)


def scan_job(inputs: ScanInputs, item: tuple[int, float, list[int]]) -> float:
    """Distortion of the model with ``units`` removed (one group at one fraction)."""
    _, _, units = item
    pruned, _ = remove_channels(inputs.model, inputs.analysis, units, input_means=inputs.input_means)
    return distortion(inputs.reference, _run(pruned, inputs.input_name, inputs.batches))


def scan(model: ir.Model, analysis: ChannelAnalysis, scores: dict[int, float], input_name: str,
         batches: list[np.ndarray], *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
         input_means: dict[str, np.ndarray] | None = None, executor: TaskExecutor | None = None,
         workers: int = 2, progress: Callable[[int, int], None] | None = None) -> dict[int, GroupSensitivity]:
    """Distortion of pruning each prunable group alone at each of ``fractions``.

    Jobs run on ``executor`` (a local pool of ``workers`` processes when None). A job that fails
    leaves its point out of the curve, with a warning: the scan only ranks groups.
    """
    reference = _run(model, input_name, batches)
    jobs = []
    for group in analysis.groups:
        prunable = sorted((u for u in group.units if analysis.units[u].prunable), key=lambda u: (scores.get(u, 0.0), u))
        for f in fractions:
            k = min(int(round(f * len(prunable))), len(group.units) - 1)
            if k >= 1:
                jobs.append((group.id, f, prunable[:k]))
    inputs = ScanInputs(model, analysis, input_name, batches, input_means, reference)
    own = executor is None
    pool = executor or LocalExecutor(workers)
    try:
        outcomes = pool.map(scan_job, jobs, inputs, progress=progress)
    finally:
        if own:
            pool.close()
    results: dict[int, dict[float, float]] = {gid: {0.0: 0.0} for gid, _, _ in jobs}
    for (gid, f, _), o in zip(jobs, outcomes):
        if o.ok:
            results[gid][f] = o.value
        else:
            warnings.warn(f"sensitivity scan: group {gid} at {f:.0%} failed ({o.error}); left out")
    out = {}
    for gid, curve in results.items():
        fs = sorted(curve)
        ds = np.maximum.accumulate([curve[f] for f in fs])  # more pruning never helps: keep it monotone
        out[gid] = GroupSensitivity(gid, fs, [float(d) for d in ds])
    return out
