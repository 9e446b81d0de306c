"""Split a global parameter budget into per-group channel counts.

Scores are normalised by their group's mean, so layers of different scale compete fairly, and
units are removed in *steps* that keep every layer's channel count a multiple of ``round_to``
(ONNX Runtime's CPU kernels are fastest on such widths; odd widths can make a pruned model slower
than the original). Parameter savings are counted exactly, including weights shared between
coupled layers and the overlap of a weight's rows and columns.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Protocol

import numpy as np

from .channels.analysis import ChannelAnalysis

if TYPE_CHECKING:  # the scan imports the removal pass; the allocator needs only the curves' type
    from .sensitivity import GroupSensitivity


@dataclass
class Allocation:
    removed: set[int]
    params_before: int  # of the analysed model
    params_removed: int
    target_removed: int
    per_group: dict[int, tuple[int, int]] = field(default_factory=dict)  # group -> (units before, after)


class ParamCounter:
    """Parameters of the analysed model as units are removed, counted per initializer axis."""

    def __init__(self, analysis: ChannelAnalysis) -> None:
        self.shapes = analysis.value_shapes
        self.kept: dict[str, dict[int, int]] = defaultdict(dict)
        self.unit_positions: dict[int, list[tuple[str, int, int]]] = defaultdict(list)
        for value, axes in analysis.value_axes().items():
            if value not in self.shapes:
                continue
            for axis, roots in axes.items():
                self.kept[value][axis] = len(roots)
                units, counts = np.unique(roots, return_counts=True)
                for u, c in zip(units.tolist(), counts.tolist()):
                    self.unit_positions[u].append((value, axis, c))
        self.total = analysis.total_params()

    def _size(self, value: str, kept: dict[int, int]) -> int:
        shape = list(self.shapes[value])
        for axis, k in kept.items():
            shape[axis] = k
        return int(np.prod(shape, dtype=np.int64))

    def changes(self, units: list[int]) -> dict[str, dict[int, int]]:
        """Per initializer axis touched by ``units``: how many positions it would keep without them."""
        changes: dict[str, dict[int, int]] = defaultdict(dict)
        for u in units:
            for value, axis, c in self.unit_positions.get(u, ()):
                cur = changes[value].get(axis, self.kept[value][axis])
                changes[value][axis] = cur - c
        return changes

    def gain(self, units: list[int]) -> int:
        """Parameters saved by removing ``units`` now (without removing them)."""
        changes = self.changes(units)
        saved = 0
        for value, axes in changes.items():
            saved += self._size(value, self.kept[value]) - self._size(value, {**self.kept[value], **axes})
        return saved

    def remove(self, units: list[int]) -> None:
        for u in units:
            for value, axis, c in self.unit_positions.get(u, ()):
                self.kept[value][axis] -= c


def allowed_sizes(n: int, fixed: int, round_to: int, min_keep_frac: float) -> list[int]:
    """Channel-unit counts a group may shrink to, largest first (excluding ``n`` itself)."""
    floor = max(fixed, round_to, math.ceil(min_keep_frac * n), 1)
    top = (n - 1) // round_to * round_to
    return [k for k in range(top, floor - 1, -round_to) if k >= floor and k > 0]


class Budget(Protocol):
    """What the allocator spends: parameters (:class:`ParamCounter`) or latency
    (:class:`onnxprune.budget.speed.LatencyCounter`)."""

    total: float

    def gain(self, units: list[int]) -> float: ...

    def remove(self, units: list[int]) -> None: ...


def allocate(analysis: ChannelAnalysis, scores: dict[int, float], target_removed: float, *,
             round_to: int = 16, min_keep_frac: float = 0.1, tolerance: float = 0,
             chunk_guard: bool = True, sensitivity: Mapping[int, GroupSensitivity] | None = None,
             budget: Budget | None = None) -> Allocation:
    """Choose units to remove so that about ``target_removed`` of the budget goes.

    The budget is parameters unless ``budget`` says otherwise. Greedy over steps: each group offers
    its next step (the lowest-scored units that bring its width to the next allowed size). With a
    parameter budget the globally cheapest step is taken while it fits in ``target_removed +
    tolerance``; any other budget is a floor (a speed-up to reach): cheapest steps are taken until
    ``target_removed`` is met. Without ``sensitivity`` a step costs its mean group-normalised score
    (per unit of budget it saves, for a budget other than parameters); with it (group id ->
    :class:`~onnxprune.sensitivity.GroupSensitivity`) a step costs the output distortion it adds
    per unit of budget it saves.
    """
    counter = budget if budget is not None else ParamCounter(analysis)
    steps = _Steps.plan(analysis, scores, round_to, min_keep_frac)
    cost = _StepCost(analysis, steps, sensitivity, counter, per_budget=budget is not None)
    guard = _ChunkGuard(analysis) if chunk_guard else None
    removed, saved = _take_steps(steps, cost, counter, target_removed, tolerance, guard)
    return Allocation(removed, counter.total, saved, target_removed, cost.per_group)


@dataclass
class _Steps:
    """Per prunable group: its steps (the units each removes, lowest scored first) and each step's
    mean score, normalised by the group's mean score."""

    plans: dict[int, list[list[int]]]
    scores: dict[int, list[float]]

    @classmethod
    def plan(cls, analysis: ChannelAnalysis, scores: dict[int, float], round_to: int,
             min_keep_frac: float) -> "_Steps":
        plans: dict[int, list[list[int]]] = {}
        step_scores: dict[int, list[float]] = {}
        for group in analysis.groups:
            prunable = [u for u in group.units if analysis.units[u].prunable]
            if not prunable:
                continue
            vals = np.array([scores.get(u, 0.0) for u in group.units], dtype=np.float64)
            mean = vals.mean() if vals.size and vals.mean() > 0 else 1.0
            ranked = sorted(prunable, key=lambda u: (scores.get(u, 0.0), u))
            width = _channels_per_unit(analysis, group.units[0])
            unit_step = max(1, round_to // math.gcd(round_to, width)) if round_to > 1 else 1
            sizes = allowed_sizes(len(group.units), len(group.units) - len(prunable), unit_step, min_keep_frac)
            steps, taken, current = [], 0, len(group.units)
            for k in sizes:
                count = current - k
                steps.append(ranked[taken:taken + count])
                taken += count
                current = k
            if steps:
                plans[group.id] = steps
                step_scores[group.id] = [float(np.mean([scores.get(u, 0.0) for u in s]) / mean) for s in steps]
        return cls(plans, step_scores)


class _StepCost:
    """What taking group ``g``'s step ``i`` costs, given the units each group has lost so far
    (``per_group``: group -> (units before, after), updated by :meth:`took`)."""

    def __init__(self, analysis: ChannelAnalysis, steps: _Steps, sensitivity: Mapping[int, GroupSensitivity] | None,
                 counter: Budget, per_budget: bool) -> None:
        self.steps, self.sensitivity, self.counter = steps, sensitivity, counter
        self.per_budget = per_budget  # score-only costs are divided by what a step saves
        self.per_group = {g.id: (len(g.units), len(g.units)) for g in analysis.groups}
        self.n_prunable = {g.id: sum(analysis.units[u].prunable for u in g.units) for g in analysis.groups}

    def __call__(self, g: int, i: int) -> float:
        plans, sensitivity = self.steps.plans, self.sensitivity
        if sensitivity is None or g not in sensitivity:
            if sensitivity is not None:
                return float("inf")
            score = self.steps.scores[g][i]
            return _per_saving(score, self.counter.gain(plans[g][i])) if self.per_budget else score
        gone = self.per_group[g][0] - self.per_group[g][1]
        n = max(self.n_prunable[g], 1)
        added = sensitivity[g].at((gone + len(plans[g][i])) / n) - sensitivity[g].at(gone / n)
        gain = self.counter.gain(plans[g][i])
        return _per_saving(added, gain) if self.per_budget else added / max(gain, 1)

    def took(self, g: int, units: int) -> None:
        before, after = self.per_group[g]
        self.per_group[g] = (before, after - units)


def _take_steps(steps: _Steps, cost: _StepCost, counter: Budget, target_removed: float, tolerance: float,
                guard: "_ChunkGuard | None") -> tuple[set[int], float]:
    """The greedy: cheapest next step first, until ``target_removed`` is met (a parameter budget also
    skips steps that would overshoot it by more than ``tolerance``). Returns (units removed, saved)."""
    heap = [(cost(g, 0), g, 0) for g in steps.plans]
    heapq.heapify(heap)
    removed: set[int] = set()
    saved = 0
    while heap and saved < target_removed - tolerance // 2:
        _, g, i = heapq.heappop(heap)
        step = steps.plans[g][i]
        if guard is not None:
            step = guard.filter(step, removed)
        gain = counter.gain(step)
        if not cost.per_budget and saved + gain > target_removed + tolerance:
            continue  # this group stops here; smaller steps elsewhere may still fit
        counter.remove(step)
        removed.update(step)
        saved += gain
        cost.took(g, len(step))
        if i + 1 < len(steps.plans[g]) and len(step) == len(steps.plans[g][i]):
            heapq.heappush(heap, (cost(g, i + 1), g, i + 1))
    return removed, saved


def _per_saving(loss: float, gain: float) -> float:
    """Loss per unit of budget saved. Steps that save nothing (or cost: a width off the kernels'
    vector size can be slower) come after every step that saves, ordered by their loss."""
    return loss / gain if gain > 0 else 1e30 * (1.0 + max(loss, 0.0))


def _channels_per_unit(analysis: ChannelAnalysis, unit: int) -> int:
    for s in analysis.slots:
        if s.role == "out":
            roots = analysis.root[s.elems]
            if unit in roots:
                return int((roots == unit).sum())
    return 1


class _ChunkGuard:
    """Never empty a Split output or Slice range: a zero-width tensor would break its consumers."""

    def __init__(self, analysis: ChannelAnalysis) -> None:
        self.chunks: list[set[int]] = []
        for edit in analysis.axis_edits:
            if edit.kind == "split":
                self.chunks.extend(set(analysis.root[c].tolist()) for c in edit.chunks)
            elif edit.kind == "slice":
                self.chunks.append(set(analysis.root[edit.chunks[0][edit.start:edit.end]].tolist()))

    def filter(self, step: list[int], removed: set[int]) -> list[int]:
        out = list(step)
        for chunk in self.chunks:
            if chunk and chunk <= removed | set(out):
                survivor = max((u for u in out if u in chunk), default=None)
                if survivor is not None:
                    out.remove(survivor)
        return out
