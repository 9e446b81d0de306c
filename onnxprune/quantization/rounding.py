"""Label-free weight rounding (AdaRound, Nagel et al. 2020), handed to ONNX Runtime's quantizer exactly.

ORT rounds every int8 weight to the nearest step of its grid (symmetric, per output channel, scale
max|w| / 127). Nearest is best for each weight alone, not for the layer's output: AdaRound learns,
per layer, whether each weight goes up or down so that the layer reproduces the float model's output
there on the calibration samples, from its input in the model whose earlier layers are already rounded
(so it also makes up for their rounding). A soft rounding h(V) in [0, 1] (rectified sigmoid) is fitted by Adam on the
layer's output error, with a regulariser that pushes every h to 0 or 1 as its exponent anneals.

ORT is handed the result by placing the float weights on its grid: ``w = q * s`` with the ``s`` its
own ``quantize_data`` computes, which the channel's largest weight (left at +-127) keeps fixed, so
ORT's ``round(w / s)`` gives back ``q`` bit for bit. A layer keeps its learnt rounding only if that
lowers its output error on calibration samples left out of its fit (every fifth); ``quantize``
keeps the whole only if it lowers the held-out fidelity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..calibration.activations import stream
from ..progress import Progress, log_progress

F = torch.nn.functional

QMAX = 127  # ORT's symmetric int8 weights: [-127, 127]
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound)
BETA = (20.0, 2.0)  # the regulariser's exponent, annealed from the first to the second
WARMUP = 0.2  # share of the steps fitted on the output error alone
REG = 0.01  # weight of the regulariser against the output error (relative to nearest rounding's)
BATCH = 4  # samples per step


@dataclass(frozen=True)
class RoundingRecord:
    """What :func:`round_weights` did: layers rounded (learnt), layers left at nearest and why."""

    rounded: tuple[str, ...] = ()
    left: tuple[tuple[str, str], ...] = ()
    error_nearest: float = 0.0  # mean over rounded layers of the held-out output error, relative to its energy
    error_learnt: float = 0.0
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.rounded:
            return f"weight rounding (AdaRound): no layer improved on nearest rounding ({len(self.left)} tried)"
        return (f"weight rounding (AdaRound): {len(self.rounded)} layer(s) rounded by their output, held-out "
                f"layer error {self.error_nearest:.2e} -> {self.error_learnt:.2e} (nearest -> learnt); "
                f"{len(self.left)} left at nearest ({self.seconds:.0f} s)")


def weight_axis(node: onnx.NodeProto) -> int | None:
    """The axis ORT's QDQ quantizer takes per channel for this node's weight; None: not a layer handled here."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return None


def ort_scales(w: np.ndarray, axis: int, per_channel: bool) -> np.ndarray:
    """The scale ORT's quantizer gives ``w`` (its own ``quantize_data``), broadcastable against ``w``."""
    from onnxruntime.quantization.quant_utils import quantize_data
    int8 = onnx.TensorProto.INT8
    if not per_channel:
        return np.asarray(quantize_data(w.ravel(), int8, True)[1], np.float32).reshape((1,) * w.ndim)
    scales = [np.float32(quantize_data(w.take(i, axis).ravel(), int8, True)[1]) for i in range(w.shape[axis])]
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.asarray(scales, np.float32).reshape(shape)


def on_grid(q: np.ndarray, w: np.ndarray, axis: int, per_channel: bool) -> np.ndarray:
    """Float32 weights that ORT quantizes to exactly ``q`` (int values in [-127, 127] with +-127 where
    ``w`` is largest in each channel): ``q`` times the scale ORT computes for them, iterated to its fixed point."""
    s = ort_scales(w, axis, per_channel)
    for _ in range(4):
        placed = (q * s).astype(np.float32)
        again = ort_scales(placed, axis, per_channel)
        if np.array_equal(again, s):
            return placed
        s = again
    return placed


def round_weights(model: onnx.ModelProto, input_name: str, batches: Sequence[np.ndarray], *, per_channel: bool = True,
                  exclude_nodes: Sequence[str] = (), steps: int = 200, seed: int = 0,
                  progress: Progress | None = None) -> tuple[onnx.ModelProto, RoundingRecord]:
    """``model`` with the weights of its Conv/Gemm layers on ORT's int8 grid, rounded by AdaRound where
    that lowers the layer's held-out output error (nearest elsewhere is left to ORT: those weights are
    untouched)."""
    say, start = progress or log_progress, time.perf_counter()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {t.name: t for t in out.graph.initializer}
    readers: dict[str, int] = {}
    for n in out.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    layers = [n for n in out.graph.node if weight_axis(n) is not None and n.name not in set(exclude_nodes)
              and len(n.input) > 1 and n.input[1] in weights and readers[n.input[1]] == 1
              and weights[n.input[1]].data_type == onnx.TensorProto.FLOAT]
    rounded, left, before, after = [], [], [], []
    samples = sum(len(b) for b in batches)
    for k, node in enumerate(layers):
        say("learning weight rounding (AdaRound)", k + 1, len(layers))
        layer = _Layer.make(node, weights)
        why = "layer form not handled (attributes)" if layer is None else (
            "fewer than 5 calibration samples" if samples < 5 else "")
        if not why:  # only then are its activations read (two runs of the model)
            x = _inputs(out, node.input[0], input_name, batches)  # after the layers before it were rounded
            target = _inputs(model, node.output[0], input_name, batches)  # the float model's
            why = _round_layer(node, layer, weights, x, target, per_channel, steps, seed)
        if isinstance(why, str):
            left.append((node.name, why))
            continue
        placed, err_nearest, err_learnt = why
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(placed, node.input[1]))
        rounded.append(node.name)
        before.append(err_nearest)
        after.append(err_learnt)
    record = RoundingRecord(tuple(rounded), tuple(left), float(np.mean(before)) if before else 0.0,
                            float(np.mean(after)) if after else 0.0, time.perf_counter() - start)
    return out, record


def _inputs(model: onnx.ModelProto, name: str, input_name: str, batches: Sequence[np.ndarray]) -> np.ndarray:
    """``model``'s values of tensor ``name`` on every calibration sample."""
    if name == input_name:
        return np.concatenate([np.asarray(b, np.float32) for b in batches])
    got: list[np.ndarray] = []
    stream(model, [name], input_name, batches, lambda t: got.append(np.asarray(t[name], np.float32)))
    return np.concatenate(got)


def _round_layer(node: onnx.NodeProto, layer: _Layer, weights: dict, x: np.ndarray, target: np.ndarray,
                 per_channel: bool, steps: int, seed: int) -> tuple[np.ndarray, float, float] | str:
    """(weights on ORT's grid, held-out error nearest, learnt) for one layer, or why it stays at nearest."""
    w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
    axis = weight_axis(node)
    s = ort_scales(w, axis, per_channel)
    scaled = w / s
    floor = np.floor(scaled)
    nearest = np.clip(np.round(scaled), -QMAX, QMAX)
    # the channel's largest weights stay at +-127 so that ORT's scale does not move; all-zero channels stay zero
    fixed = (np.abs(nearest) >= QMAX) | (w == 0).all(axis=tuple(i for i in range(w.ndim) if i != axis), keepdims=True)
    val = np.arange(len(x)) % 5 == 0
    xt, target = torch.from_numpy(x), torch.from_numpy(target)
    learnt = _fit(layer, xt[~val], target[~val], torch.from_numpy(s), torch.from_numpy(floor),
                  torch.from_numpy(scaled - floor), steps, seed)
    q = np.where(fixed, nearest, np.clip(floor + learnt, -QMAX, QMAX)).astype(np.float32)
    err = lambda qq: _error(layer, xt[val], target[val], torch.from_numpy((qq * s).astype(np.float32)))  # noqa: E731
    e_nearest, e_learnt = err(nearest), err(q)
    if not e_learnt < e_nearest:
        return f"learnt rounding did not lower the held-out output error ({e_nearest:.2e} -> {e_learnt:.2e})"
    return on_grid(q, w, axis, per_channel), e_nearest, e_learnt


def _error(layer: _Layer, x, target, w) -> float:
    with torch.no_grad():
        return float(((layer(x, w) - target) ** 2).mean() / target.pow(2).mean().clamp_min(1e-12))


def _fit(layer: _Layer, x, target, s, floor, frac, steps: int, seed: int) -> np.ndarray:
    """The learnt up (1) / down (0) choice per weight: Adam on the soft rounding V, AdaRound's loss."""
    gen = torch.Generator().manual_seed(seed)
    p = frac.clamp(1e-4, 1 - 1e-4)
    v = torch.log((p - GAMMA) / (ZETA - p)).clone().requires_grad_(True)  # h(V) == frac: starts at w itself
    h = lambda: torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)  # noqa: E731
    with torch.no_grad():
        base = ((layer(x, s * torch.clamp(torch.round(floor + frac), -QMAX, QMAX)) - target) ** 2).mean()
    base = base.clamp_min(1e-12)
    opt = torch.optim.Adam([v], lr=1e-2)
    for step in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:BATCH]
        soft = s * torch.clamp(floor + h(), -QMAX, QMAX)
        loss = ((layer(x[idx], soft) - target[idx]) ** 2).mean() / base
        if step >= WARMUP * steps:
            t = (step - WARMUP * steps) / max((1 - WARMUP) * steps, 1)
            beta = BETA[0] + (BETA[1] - BETA[0]) * t
            loss = loss + REG * (1 - (2 * h() - 1).abs().pow(beta)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (h() >= 0.5).detach().numpy().astype(np.float32)


@dataclass(frozen=True)
class _Layer:
    """A Conv (2-D, explicit or VALID padding) or Gemm as a torch function of its input and weight (bias fixed)."""

    op: str
    attrs: dict
    bias: object

    @classmethod
    def make(cls, node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> _Layer | None:
        """``node`` (weight and bias read from ``weights``), or None for a form not handled here."""
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        bias = weights.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and bias is None:
            return None  # a computed bias: not a function of the weight alone
        b = torch.from_numpy(numpy_helper.to_array(bias).astype(np.float32)) if bias is not None else None
        w_rank = len(weights[node.input[1]].dims)
        if node.op_type == "Gemm":
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                return None
            return cls("Gemm", {"transB": a.get("transB", 0)}, b)
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if w_rank != 4 or auto not in ("NOTSET", "VALID"):
            return None  # SAME_* padding depends on the input size: left at nearest
        top, left, bottom, right = a.get("pads", [0, 0, 0, 0]) if auto == "NOTSET" else [0, 0, 0, 0]
        return cls("Conv", {"stride": tuple(a.get("strides", (1, 1))), "dilation": tuple(a.get("dilations", (1, 1))),
                            "groups": a.get("group", 1), "pad": (left, right, top, bottom)}, b)

    def __call__(self, x, w):
        if self.op == "Gemm":
            return F.linear(x, w if self.attrs["transB"] else w.T, self.bias)
        attrs = dict(self.attrs)
        pad = attrs.pop("pad")
        return F.conv2d(F.pad(x, pad) if any(pad) else x, w, self.bias, **attrs)
