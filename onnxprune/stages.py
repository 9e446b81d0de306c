"""One pruning step: score → allocate → remove → refit, run once (`--ratio`) or per stage (`--stages`).

A stage reads the model the previous stage left (the prepared original for the first), spends its
share of the budget (parameters, or milliseconds predicted by the latency cost model), removes the
channels and refits the layers after them against the *original* model's layer outputs, so errors
of earlier stages are absorbed rather than compounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_ir as ir

from .allocation import Allocation, allocate
from .budget.speed import CostModel, LatencyCounter
from .calibration.activations import consumer_moments
from .calibration.split import CalibrationSplit
from .finetune import DistillOptions
from .channels.analysis import ChannelAnalysis
from .executors import TaskExecutor
from .passes import remove_channels
from .passes.reconstruct import LayerFit, reconstruct
from .passes.remove_channels import RemovalRecord
from .progress import Progress
from .saliency.criteria import ScoreContext
from .sensitivity import GroupSensitivity, scan

Scorer = Callable[[ScoreContext], dict[int, float]]


@dataclass
class StageContext:
    """What every stage shares."""

    reference: ir.Model  # the prepared original: refit target, and the model of the first stage
    calib: CalibrationSplit | None
    score_fn: Scorer
    criterion: str
    bn_gamma: dict[str, np.ndarray]
    mode: str  # sensitivity | uniform
    round_to: int
    min_keep: float
    tolerance: int  # parameters: the ratio lands within this of its target
    recover: bool
    executor: TaskExecutor | None
    workers: int
    say: Progress
    distill: DistillOptions | None = None  # --finetune-steps: distillation after each stage (steps: the total)


@dataclass(frozen=True)
class ParamBudget:
    """Remove ``target`` parameters of the analysed model in this stage."""

    target: int


@dataclass(frozen=True)
class LatencyBudget:
    """Reach ``reference_ms / speedup`` predicted by ``cost`` in this stage."""

    cost: CostModel
    reference_ms: float
    speedup: float


@dataclass
class Stage:
    """What one stage did, and the model it left."""

    model: ir.Model
    analysis: ChannelAnalysis
    alloc: Allocation
    record: RemovalRecord
    round_to: int
    means: dict[str, np.ndarray] | None
    sensitivity: dict[int, GroupSensitivity] | None = None  # the scan's curve per group (--allocation sensitivity)
    refits: list[LayerFit] = field(default_factory=list)
    predicted_ms: float | None = None  # latency budgets: the cost model's prediction after this stage
    keep: dict[str, np.ndarray] = field(default_factory=dict)  # per layer: original outputs still present
    scores: dict[int, float] = field(default_factory=dict)


def run_stage(ctx: StageContext, model: ir.Model, analysis: ChannelAnalysis, budget: ParamBudget | LatencyBudget,
              keep_before: dict[str, np.ndarray] | None = None, again: Stage | None = None) -> Stage:
    """Score, allocate, remove and refit once. ``keep_before`` (later stages) maps each layer's
    outputs in ``model`` to the original's; the first stage passes None. ``again``: the same stage
    run before with another budget, whose scores and sensitivity scan are reused."""
    scores, means = (again.scores, again.means) if again is not None else score(ctx, model, analysis)
    counter = LatencyCounter(model, analysis, budget.cost) if isinstance(budget, LatencyBudget) else None
    target = budget.target if counter is None else counter.total - budget.reference_ms / budget.speedup
    sensitivity = again.sensitivity if again is not None else None
    if ctx.mode == "sensitivity" and target > 0 and sensitivity is None:
        sensitivity = scan(model, analysis, scores, ctx.calib.input_name, ctx.calib.scan_batches, input_means=means,
                           executor=ctx.executor, workers=ctx.workers,
                           progress=lambda i, n: ctx.say("sensitivity scan", i, n))
    ctx.say("allocating the parameter budget" if counter is None else "allocating the latency budget")
    if counter is None:
        alloc, round_to = allocate_rounded(analysis, scores, int(target), ctx.round_to, ctx.min_keep, ctx.tolerance,
                                           sensitivity)
    else:
        alloc = allocate(analysis, scores, max(target, 0.0), round_to=ctx.round_to, min_keep_frac=ctx.min_keep,
                         sensitivity=sensitivity, budget=counter)
        round_to = ctx.round_to
    ctx.say(f"removing {len(alloc.removed)} channel units")
    pruned, record = remove_channels(model, analysis, alloc.removed, input_means=means)
    keep = compose_keep(keep_before, kept_outputs(analysis, alloc.removed))
    stage = Stage(pruned, analysis, alloc, record, round_to, means, sensitivity, keep=keep,
                  predicted_ms=counter.predicted_ms() if counter is not None else None, scores=scores)
    if ctx.calib is not None and ctx.recover and alloc.removed:
        ctx.say("refitting layers on calibration data")
        if keep_before is None:  # the first stage: exactly the one-shot refit
            stage.model, rec = reconstruct(model, pruned, analysis, alloc.removed, ctx.calib.input_name,
                                           ctx.calib.batches, downstream=True)
        else:
            stage.model, rec = reconstruct(ctx.reference, pruned, None, set(), ctx.calib.input_name,
                                           ctx.calib.batches, keep_out=keep, downstream=True)
        stage.refits = rec.layers
    return stage


def score(ctx: StageContext, model: ir.Model, analysis: ChannelAnalysis
          ) -> tuple[dict[int, float], dict[str, np.ndarray] | None]:
    """Channel scores of ``model`` and, with calibration data, the mean of every pruned layer's input."""
    moments = None
    if ctx.calib is not None:
        ctx.say(f"collecting activation statistics on {ctx.calib.count} samples")
        moments = consumer_moments(model, analysis, ctx.calib.input_name, ctx.calib.batches)
    ctx.say(f"scoring channels ({ctx.criterion})")
    arrays = {n: v.const_value.numpy() for n, v in model.graph.initializers.items() if v.const_value is not None}
    bn_scales = {n.name: n.inputs[1].name for n in model.graph if n.op_type == "BatchNormalization"}
    scores = ctx.score_fn(ScoreContext(analysis, arrays, ctx.bn_gamma, bn_scales, moments, model,
                                       ctx.calib.batches if ctx.calib is not None else None,
                                       ctx.calib.input_name if ctx.calib is not None else ""))
    means = {k: moments.mean(k) for k in moments.axes} if moments is not None else None
    return scores, means


def kept_outputs(analysis: ChannelAnalysis, removed: set[int]) -> dict[str, np.ndarray]:
    """Per layer with prunable output channels: which of its outputs the pruned layer still has."""
    gone = np.array(sorted(removed), dtype=np.int64)
    return {s.node: ~np.isin(analysis.root[s.elems], gone) for s in analysis.slots if s.role == "out"}


def compose_keep(before: dict[str, np.ndarray] | None, now: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original's outputs still present after two removals (``now`` indexes what ``before`` kept)."""
    if before is None:
        return dict(now)
    out = dict(before)
    for node, mask in now.items():
        if node in out:
            kept = np.flatnonzero(out[node])
            composed = np.zeros_like(out[node])
            composed[kept[mask]] = True
            out[node] = composed
        else:
            out[node] = mask
    return out


def allocate_rounded(analysis: ChannelAnalysis, scores: dict[int, float], target: int, round_to: int,
                     min_keep: float, tolerance: int, sensitivity: dict[int, GroupSensitivity] | None = None
                     ) -> tuple[Allocation, int]:
    """Allocate at ``round_to``, halving it only if the target is out of reach at that granularity.

    Speed prefers coarse widths, but the ratio is the user's contract: small models (MTCNN's
    10- and 16-channel layers) cannot shrink at all when rounded to 16.
    """
    best = None
    r = round_to
    while True:
        alloc = allocate(analysis, scores, target, round_to=r, min_keep_frac=min_keep, tolerance=tolerance,
                         sensitivity=sensitivity)
        if best is None or abs(alloc.params_removed - target) < abs(best[0].params_removed - target):
            best = (alloc, r)
        if abs(alloc.params_removed - target) <= tolerance or r == 1:
            return best
        r = max(1, r // 2)
