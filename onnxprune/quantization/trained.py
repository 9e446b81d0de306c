"""Trainable activation thresholds (Goncharenko et al.; Jain et al. TQT), label-free.

Starting from the MSE ranges, every activation tensor gets a fake quantizer whose clipping
thresholds are parameters (log scale, so they stay positive and move proportionally). Weights are
fake-quantized once, per channel, as ORT will store them, and stay frozen. The thresholds are
trained by gradient descent through a straight-through estimator of rounding to make the
fake-quantized model reproduce the float model on the unlabelled calibration samples. The
result is handed to ORT's quantizer like any other ranges, and is kept only if it lowered the
loss on calibration samples held out of the training steps.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import onnx
import torch

from ..graph.runtime import pieces, session
from ..torch_bridge import to_torch
from .qdq import compute_ranges

WEIGHT_OPS = {"Conv": 0, "ConvTranspose": 1, "Gemm": None, "MatMul": 1}


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """uint8 asymmetric quantize-dequantize as ORT does it; gradients reach ``lo``/``hi`` (TQT)."""
    scale = (hi - lo) / 255.0
    zero = torch.clamp(_round_ste(-lo / scale), 0, 255)
    q = torch.clamp(_round_ste(x / scale) + zero, 0, 255)
    return (q - zero) * scale


def _quantize_weights(module, model: onnx.ModelProto) -> None:
    """Replace weights by their int8 per-channel symmetric values (what the QDQ model will hold)."""
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in module.param_key:
            continue
        p = module.params[module.param_key[node.input[1]]]
        w = p.data
        axis = WEIGHT_OPS[node.op_type]
        if axis is None:  # Gemm: output axis depends on transB
            axis = 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
        dims = [d for d in range(w.dim()) if d != axis]
        amax = w.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) if dims else w.abs().clamp_min(1e-12)
        scale = amax / 127.0
        p.data = torch.clamp(torch.round(w / scale), -127, 127) * scale


def quantized_activations(qdq: onnx.ModelProto) -> set[str]:
    """Float tensors ORT actually quantizes in a QDQ model: the inputs of its QuantizeLinear nodes."""
    weights = {i.name for i in qdq.graph.initializer}
    return {n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in weights}


def train_ranges(model: onnx.ModelProto, input_name: str, batches: Sequence[np.ndarray], *, steps: int = 100,
                 lr: float = 0.02, seed: int = 0, only: set[str] | None = None,
                 init: dict[str, tuple[float, float]] | None = None) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """Trained (rmin, rmax) per activation tensor, initialised from the MSE ranges.

    ``only``: the tensors ORT will quantize (see :func:`quantized_activations`); simulating others
    would train thresholds for a different graph than the one that runs.
    """
    torch.manual_seed(seed)
    init = init or compute_ranges(model, input_name, batches, "mse")
    module = to_torch(model).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    _quantize_weights(module, model)
    names = [n for n, (lo, hi) in init.items() if hi > lo and (only is None or n in only)]
    log_hi = {n: torch.tensor(math.log(max(init[n][1], 1e-6)), requires_grad=True) for n in names if init[n][1] > 0}
    log_lo = {n: torch.tensor(math.log(-init[n][0]), requires_grad=True) for n in names if init[n][0] < 0}

    def bounds(n: str) -> tuple[torch.Tensor, torch.Tensor]:
        hi = torch.exp(log_hi[n]) if n in log_hi else torch.tensor(0.0)
        lo = -torch.exp(log_lo[n]) if n in log_lo else torch.tensor(0.0)
        return lo, hi

    transform = {n: (lambda x, n=n: fake_quant(x, *bounds(n))) for n in names}
    sess = session(model)
    samples = np.concatenate(list(batches)).astype(np.float32)
    feeds = pieces(model, [samples[i:i + 8] for i in range(0, len(samples), 8)], input_name)
    targets = [[torch.from_numpy(np.asarray(o, np.float32)) for o in sess.run(None, {input_name: x})] for x in feeds]
    scales = [max(float(torch.stack([t[k].var() for t in targets]).mean()), 1e-12) for k in range(len(targets[0]))]

    def loss_on(i: int) -> torch.Tensor:
        outs, _ = module.run({input_name: torch.from_numpy(feeds[i])}, transform=transform)
        return sum(((o - t) ** 2).mean() / s for o, t, s in zip(outs, targets[i], scales))

    # Every fifth piece validates: thresholds fitted to a few dozen images can overfit them.
    val = list(range(0, len(feeds), 5)) if len(feeds) >= 5 else list(range(len(feeds)))
    train = [i for i in range(len(feeds)) if i not in val] or val

    def total() -> float:
        with torch.no_grad():
            return float(sum(loss_on(i) for i in val) / len(val))

    params = list(log_hi.values()) + list(log_lo.values())
    initial = total()
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_on(train[int(rng.integers(len(train)))])
        loss.backward()
        opt.step()
    final = total()
    if not final < initial:
        return init, [f"trained thresholds did not lower the validation loss ({initial:.5f} -> {final:.5f}); kept mse"]
    ranges = {}
    for n in init:
        if n in names:
            lo, hi = bounds(n)
            ranges[n] = (float(lo.detach()), float(hi.detach()))
        else:
            ranges[n] = init[n]
    return ranges, [f"trained thresholds: validation loss {initial:.5f} -> {final:.5f} in {steps} steps"]
