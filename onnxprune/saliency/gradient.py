"""Gradient criteria: SNIP, first-order Taylor and SynFlow, computed by running the ONNX graph in torch.

They need PyTorch (``pip install 'onnxprune[torch]'``); torch is imported inside the functions so
the package, and every other criterion, works without it.

**The loss.** Pruning calibration data has no labels, so the loss must come from the model itself.
The obvious distillation loss ``||f(x) - f0(x)||^2`` is useless here: it is evaluated at the
unpruned point, where ``f == f0``, so it is exactly zero and so is its gradient (it is a minimum).
Any saliency ``|w * dL/dw|`` would be 0 for every weight. We use instead

    L_v(x) = sum over outputs o of <f_o(x), v_o>,    v_o ~ N(0, I), one fixed draw per backward,

a random projection of the outputs. ``dL_v/dw = J_w^T v`` and ``E_v[(w * J_w^T v)^2] = ||w * J_w^T||^2``
row-wise (Hutchinson): averaging over a few draws estimates how strongly each weight moves the
outputs, which is what removing it perturbs. We average ``|w * dL_v/dw|`` over K=4 projections
(one backward each) and every calibration batch.

Scores are aggregated per unit over the weight slots the analysis recorded: ``out`` (weights that
produce the channel) and ``in`` (weights that read it), summing the slot positions of that unit
over all other axes. Only the order within a group matters to the allocator.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from ..graph.runtime import check_batch
from .criteria import ScoreContext, position_sums, register_criterion

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..torch_bridge import OnnxModule

PROJECTIONS = 4  # K: random output projections per calibration batch (one backward each)
_SLOT_ROLES = ("out", "in")


def _require_torch(criterion: str):
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError(f"criterion {criterion} needs PyTorch: pip install 'onnxprune[torch]'") from None
    return torch


def _module(model: Any, dtype: Any = None) -> "OnnxModule":
    from ..torch_bridge import to_torch

    try:
        module = to_torch(model)
    except NotImplementedError as exc:
        raise ConfigError(f"gradient criteria cannot run this graph in PyTorch: {exc}") from None
    module.eval()
    return module.to(dtype) if dtype is not None else module


def _float_outputs(outputs: Iterable["torch.Tensor"]) -> list["torch.Tensor"]:
    return [o for o in outputs if o.dtype.is_floating_point]


def draw_projections(outputs: Sequence["torch.Tensor"], generator: "torch.Generator") -> list["torch.Tensor"]:
    """One Gaussian direction per float output, drawn from ``generator`` (reproducible)."""
    import torch

    return [torch.randn(o.shape, generator=generator, dtype=o.dtype) for o in _float_outputs(outputs)]


def projected_loss(outputs: Sequence["torch.Tensor"], projection: Sequence["torch.Tensor"]) -> "torch.Tensor":
    """L_v = sum over outputs of <f_o(x), v_o>: non-zero gradient at the unpruned point (see module doc)."""
    total = None
    for o, v in zip(_float_outputs(outputs), projection):
        term = (o * v).sum()
        total = term if total is None else total + term
    assert total is not None, "the model has no float output"
    return total


def weight_saliency(module: "OnnxModule", input_name: str, batches: Sequence[np.ndarray], *, k: int = PROJECTIONS,
                    seed: int = 0, capture: Mapping[str, int] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Mean ``|w * dL_v/dw|`` per initializer element, and per channel ``|a * dL_v/da|`` per captured tensor.

    ``capture`` maps intermediate tensor names to their channel axis; their saliency is summed
    over every other axis (batch, spatial).

    Draws ``k`` projections per batch from one generator seeded with ``seed`` (in batch order, the
    projections of a batch drawn right after its forward pass), one backward each. Captured
    activations are centred first (``a - mean`` over the calibration data, see :func:`taylor`).
    """
    import torch

    capture = dict(capture or {})

    gen = torch.Generator().manual_seed(seed)
    floating = [(n, p) for n, p in module.named_initializers() if p.dtype.is_floating_point]
    names, params = [n for n, _ in floating], [p for _, p in floating]
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, params)}
    means = _capture_means(module, input_name, batches, capture) if capture else {}
    act_acc: dict[str, torch.Tensor] = {}
    count = 0
    for x in batches:
        outputs, captured = module.run({input_name: torch.from_numpy(np.ascontiguousarray(x))}, capture=list(capture))
        acts = [captured[c] for c in capture if c in captured]
        act_names = [c for c in capture if c in captured]
        for _ in range(k):
            loss = projected_loss(outputs, draw_projections(outputs, gen))
            grads = torch.autograd.grad(loss, params + acts, retain_graph=True, allow_unused=True)
            for n, p, g in zip(names, params, grads[:len(params)]):
                if g is not None:
                    acc[n] += (p.detach() * g).abs().to(torch.float64)
            for c, a, g in zip(act_names, acts, grads[len(params):]):
                if g is None:
                    continue
                centred = a.detach() - means[c].reshape(_axis_shape(a, capture[c]))
                per_channel = _per_channel((centred * g).abs().to(torch.float64), capture[c])
                act_acc[c] = act_acc[c] + per_channel if c in act_acc else per_channel
            count += 1
        del outputs, captured, acts
    scale = 1.0 / max(count, 1)
    return ({n: (a * scale).numpy() for n, a in acc.items()},
            {c: (a * scale).numpy() for c, a in act_acc.items()})


# -- activation capture (Taylor) -------------------------------------------------------------------
def _axis_shape(a: "torch.Tensor", axis: int) -> list[int]:
    shape = [1] * a.dim()
    shape[axis] = a.shape[axis]
    return shape


def _per_channel(t: "torch.Tensor", axis: int) -> "torch.Tensor":
    """Sum over every axis but ``axis``."""
    dims = tuple(d for d in range(t.dim()) if d != axis)
    return t.sum(dim=dims) if dims else t


def _capture_means(module: "OnnxModule", input_name: str, batches: Sequence[np.ndarray],
                   capture: Mapping[str, int]) -> dict[str, "torch.Tensor"]:
    """Per-channel mean of every captured tensor over all calibration batches (no grad)."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)
    with torch.no_grad():
        for x in batches:
            _, captured = module.run({input_name: torch.from_numpy(np.ascontiguousarray(x))}, capture=list(capture))
            for c, a in captured.items():
                axis = capture[c]
                s = _per_channel(a.to(torch.float64), axis)
                sums[c] = sums[c] + s if c in sums else s
                counts[c] += a.numel() // a.shape[axis]
    return {c: (s / counts[c]).to(module.float_dtype) for c, s in sums.items()}


# -- per-unit aggregation --------------------------------------------------------------------------
def unit_scores_from_weights(ctx: ScoreContext, saliency: dict[str, np.ndarray],
                             roles: tuple[str, ...] = _SLOT_ROLES) -> dict[int, float]:
    """Sum each unit's positions of every slot (``roles``) of the per-element saliency."""
    a = ctx.analysis
    scores: dict[int, float] = defaultdict(float)
    for s in a.slots:
        if s.role not in roles or s.value not in saliency:
            continue
        arr = saliency[s.value]
        if arr.ndim <= s.axis or arr.shape[s.axis] != len(s.elems):
            continue
        per_pos = position_sums(arr, s.axis, 1)  # saliencies are |w * grad|: the abs is a no-op
        for u, v in zip(a.root[s.elems].tolist(), per_pos.tolist()):
            scores[u] += v
    return {u: float(scores.get(u, 0.0)) for u in a.units}


def _batches(ctx: ScoreContext, name: str) -> list[np.ndarray]:
    if not ctx.batches or ctx.model is None:
        raise ConfigError(f"criterion {name} needs calibration data (--calib)")
    check_batch(ctx.model, ctx.input_name or None)
    return list(ctx.batches)  # whole batches: the bridge runs a batch-1 graph sample by sample


def _input_name(ctx: ScoreContext) -> str:
    if ctx.input_name:
        return ctx.input_name
    return next(iter(v.name for v in ctx.model.graph.inputs if v.const_value is None))


@register_criterion("snip", "connection sensitivity |w·dL/dw| on calibration data, L a random projection of "
                    "the outputs (needs --calib and PyTorch)", needs_calibration=True)
def snip(ctx: ScoreContext) -> dict[int, float]:
    _require_torch("snip")
    batches = _batches(ctx, "snip")
    module = _module(ctx.model)
    saliency, _ = weight_saliency(module, _input_name(ctx), batches)
    return unit_scores_from_weights(ctx, saliency)


def _producers(ctx: ScoreContext) -> dict[str, tuple[str, int, list]]:
    """Output tensor of every node with an ``out`` slot: (tensor, channel axis, slots)."""
    nodes = {n.name: n for n in ctx.model.graph}
    out: dict[str, tuple[str, int, list]] = {}
    for s in ctx.analysis.slots:
        if s.role != "out" or s.node not in nodes:
            continue
        node = nodes[s.node]
        tensor = node.outputs[0].name
        axis = -1 if node.op_type == "MatMul" else 1
        if tensor not in out:
            out[tensor] = (s.node, axis, [])
        out[tensor][2].append(s)
    return out


@register_criterion("taylor", "first-order Taylor |(a-ā)·dL/da| on the producing layers' outputs (Molchanov), "
                    "L a random projection of the outputs (needs --calib and PyTorch)", needs_calibration=True)
def taylor(ctx: ScoreContext) -> dict[int, float]:
    """Molchanov et al.'s activation Taylor criterion, centred on the calibration mean.

    For each unit, sum over its producing layers' output channels of ``|(a - ā) * dL/da|`` over
    batch and spatial positions. Centring: a removed channel is replaced by its calibration mean
    (``input_means`` compensation, bias folding), so the first-order change of the loss is
    ``dL/da * (ā - a)``, not ``dL/da * (0 - a)``. Without it a channel that outputs a constant
    (dead weights, only a bias) would score ``|b * dL/da|`` although removing it changes nothing.
    """
    _require_torch("taylor")
    batches = _batches(ctx, "taylor")
    module = _module(ctx.model)
    producers = _producers(ctx)
    # MatMul outputs: the channel axis is the last one of whatever rank; resolve it on one batch.
    import torch

    with torch.no_grad():
        _, sample = module.run({_input_name(ctx): torch.from_numpy(np.ascontiguousarray(batches[0]))},
                               capture=list(producers))
    axes = {t: (producers[t][1] % a.dim()) for t, a in sample.items()}
    _, acts = weight_saliency(module, _input_name(ctx), batches, capture=axes)
    a = ctx.analysis
    scores: dict[int, float] = defaultdict(float)
    for tensor, (_, _, slots) in producers.items():
        if tensor not in acts:
            continue
        per_channel = acts[tensor]
        for s in slots:
            if len(per_channel) != len(s.elems):
                continue
            for u, v in zip(a.root[s.elems].tolist(), per_channel.tolist()):
                scores[u] += v
            break  # one slot per producing node maps its channels
    return {u: float(scores.get(u, 0.0)) for u in a.units}


# -- SynFlow ---------------------------------------------------------------------------------------
DETECTOR_SPATIAL = 640  # symbolic H, W of 4-D detector inputs
DEFAULT_SPATIAL = 112


def synflow_input_shape(model: Any, input_name: str = "") -> tuple[int, ...]:
    """Batch 1; fixed dims as declared; symbolic spatial dims 640 for 4-D NCHW inputs, else 112."""
    value = next((v for v in model.graph.inputs if (v.name == input_name or not input_name)
                  and v.const_value is None), None)
    if value is None or value.shape is None:
        raise ConfigError("criterion synflow needs a model input with a known rank")
    dims = [d if isinstance(d, int) and d > 0 else None for d in value.shape]
    shape = [1]
    for d in dims[1:]:
        shape.append(d if d is not None else (DETECTOR_SPATIAL if len(dims) == 4 else DEFAULT_SPATIAL))
    return tuple(shape)


@register_criterion("synflow", "data-free synaptic flow |p·dR/dp|, R the output sum of |params| on an all-ones "
                    "input (Tanaka et al. 2020; needs PyTorch)")
def synflow(ctx: ScoreContext) -> dict[int, float]:
    torch = _require_torch("synflow")
    if ctx.model is None:
        raise ConfigError("criterion synflow needs the model")
    module = _module(ctx.model, torch.float64)
    with torch.no_grad():
        for p in module.params.values():
            if p.dtype.is_floating_point:
                p.abs_()
    name = _input_name(ctx)
    shape = synflow_input_shape(ctx.model, name)
    outputs, _ = module.run({name: torch.ones(shape, dtype=torch.float64)})
    total = sum(o.sum() for o in _float_outputs(outputs))
    names = [n for n, _ in module.named_initializers()]
    params = [p for _, p in module.named_initializers()]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    saliency = {n: (p.detach() * g).abs().numpy() for n, p, g in zip(names, params, grads) if g is not None}
    return unit_scores_from_weights(ctx, saliency)
