"""Channel importance: how much each prunable unit matters, by a pluggable criterion.

A criterion maps each unit to a non-negative score; only the order *within a group* and the
group-normalised value are used by the allocator, so criteria need not share a scale. Weight-only
criteria live here; calibration-based ones (SNIP, Taylor) register themselves the same way.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from ..channels.analysis import ChannelAnalysis
from ..errors import ConfigError


@dataclass
class ScoreContext:
    analysis: ChannelAnalysis
    arrays: dict[str, np.ndarray]  # initializer values of the analysed model
    bn_gamma: dict[str, np.ndarray] = field(default_factory=dict)  # conv node -> γ of the BN folded into it
    bn_scale_inputs: dict[str, str] = field(default_factory=dict)  # BN node -> its scale initializer
    moments: Any = None  # calibration.activations.ChannelMoments, for data-aware criteria
    model: Any = None  # the analysed onnx_ir.Model (BN folded), for criteria that run it
    batches: list[np.ndarray] | None = None  # calibration batches in the model's input format
    input_name: str = ""


class Criterion(Protocol):
    def __call__(self, ctx: ScoreContext) -> dict[int, float]: ...


CRITERIA: dict[str, Criterion] = {}
DESCRIPTIONS: dict[str, str] = {}


NEEDS_CALIBRATION: set[str] = set()


def register_criterion(name: str, description: str, *, needs_calibration: bool = False) -> Callable[[Criterion], Criterion]:
    def register(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        DESCRIPTIONS[name] = description
        if needs_calibration:
            NEEDS_CALIBRATION.add(name)
        return fn
    return register


def get_criterion(name: str) -> Criterion:
    try:
        return CRITERIA[name]
    except KeyError:
        raise ConfigError(f"unknown criterion {name!r}; choose one of {', '.join(sorted(CRITERIA))}") from None


# Weights are reduced in blocks of this many elements: float64 copies of a whole 50 MB Gemm weight
# (three of them: abs, power, moved axis) were the peak memory of slim on 65M-parameter models.
_BLOCK_ELEMS = 1 << 21


def position_sums(weight: np.ndarray, axis: int, order: float) -> np.ndarray:
    """Per position along ``axis``, the sum of ``|w|**order`` over all other axes (float64, bounded memory)."""
    moved = np.moveaxis(weight, axis, 0)
    out = np.empty(moved.shape[0])
    step = max(1, _BLOCK_ELEMS // max(1, moved[0].size))
    for i in range(0, moved.shape[0], step):
        block = np.abs(moved[i:i + step].astype(np.float64))
        if order != 1:
            block **= order
        out[i:i + step] = block.reshape(len(block), -1).sum(axis=1)
    return out


def _slot_norms(ctx: ScoreContext, order: float, roles: tuple[str, ...]) -> dict[int, list[float]]:
    """Per unit, the norm of its slice in every weight slot, each normalised by the slot's mean."""
    a = ctx.analysis
    per_unit: dict[int, list[float]] = defaultdict(list)
    for s in a.slots:
        if s.role not in roles:
            continue
        roots = a.root[s.elems]
        units, inverse = np.unique(roots, return_inverse=True)
        sums = np.zeros(len(units))
        np.add.at(sums, inverse, position_sums(ctx.arrays[s.value], s.axis, order))
        norms = sums ** (1 / order)
        mean = norms.mean()
        if mean <= 0:
            continue
        for u, n in zip(units.tolist(), (norms / mean).tolist()):
            if u in a.units:
                per_unit[u].append(n)
    return per_unit


def _magnitude(ctx: ScoreContext, order: float) -> dict[int, float]:
    per_unit = _slot_norms(ctx, order, ("out", "in"))
    return {u: float(np.mean(per_unit[u])) if per_unit.get(u) else 0.0 for u in ctx.analysis.units}


@register_criterion("l1", "L1 norm of every weight slice the channel owns or feeds (producers and consumers)")
def l1(ctx: ScoreContext) -> dict[int, float]:
    return _magnitude(ctx, 1.0)


@register_criterion("l2", "L2 norm of every weight slice the channel owns or feeds (producers and consumers)")
def l2(ctx: ScoreContext) -> dict[int, float]:
    return _magnitude(ctx, 2.0)


def _gammas(ctx: ScoreContext) -> dict[int, list[float]]:
    a = ctx.analysis
    out: dict[int, list[float]] = defaultdict(list)
    for s in a.slots:
        gamma = None
        if s.role == "out" and s.node in ctx.bn_gamma and len(ctx.bn_gamma[s.node]) == len(s.elems):
            gamma = ctx.bn_gamma[s.node]
        elif s.role == "param" and ctx.bn_scale_inputs.get(s.node) == s.value:
            gamma = ctx.arrays[s.value]
        if gamma is None:
            continue
        for u, g in zip(a.root[s.elems].tolist(), np.abs(gamma).tolist()):
            out[u].append(g)
    return out


@register_criterion("bn", "|γ| of the channel's BatchNorm (network slimming); L2 where a group has no BN")
def bn(ctx: ScoreContext) -> dict[int, float]:
    gam = _gammas(ctx)
    fallback = _magnitude(ctx, 2.0)
    scores: dict[int, float] = {}
    for group in ctx.analysis.groups:
        has_bn = all(gam.get(u) for u in group.units)
        for u in group.units:
            scores[u] = float(np.mean(gam[u])) if has_bn else fallback[u]
    return scores


@register_criterion("double", "geometric mean of group-normalised BN-γ and L2 (double pruning)")
def double(ctx: ScoreContext) -> dict[int, float]:
    b, m = bn(ctx), _magnitude(ctx, 2.0)
    scores: dict[int, float] = {}
    for group in ctx.analysis.groups:
        bm = np.mean([b[u] for u in group.units]) or 1.0
        mm = np.mean([m[u] for u in group.units]) or 1.0
        for u in group.units:
            scores[u] = float(np.sqrt((b[u] / bm) * (m[u] / mm)))
    return scores


@register_criterion("activation", "calibration output energy: Var(activation) x |consumer weights|^2, the "
                    "error of replacing the channel by its mean (needs --calib)", needs_calibration=True)
def activation(ctx: ScoreContext) -> dict[int, float]:
    if ctx.moments is None:
        raise ConfigError("criterion activation needs calibration data (--calib)")
    a = ctx.analysis
    energy: dict[int, float] = defaultdict(float)
    covered: set[int] = set()
    for c in a.consumers:
        if c.input not in ctx.moments.axes:
            continue
        per_pos = position_sums(ctx.arrays[c.weight], c.in_axis, 2.0)
        var = ctx.moments.var(c.input)
        if len(var) != len(c.elems):
            continue
        if c.kind == "grouped":  # weight column i serves input i of every group
            per_pos = np.tile(per_pos, len(c.elems) // len(per_pos))
        roots = a.root[c.elems]
        for u, e in zip(roots.tolist(), (var * per_pos).tolist()):
            energy[u] += e
            covered.add(u)
    fallback = _magnitude(ctx, 2.0)
    scores: dict[int, float] = {}
    for group in a.groups:
        use = all(u in covered for u in group.units)
        for u in group.units:
            scores[u] = float(energy[u]) if use else fallback[u]
    return scores
from . import gradient  # noqa: E402,F401  (registers snip/taylor/synflow)
from . import perturbation  # noqa: E402,F401  (registers perturbation)
