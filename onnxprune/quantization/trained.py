"""Trainable activation thresholds (Goncharenko et al.; Jain et al. TQT), label-free.

Starting from the MSE ranges, every activation tensor gets a fake quantizer whose clipping
thresholds are parameters (log scale, so they stay positive and move proportionally). The model
simulated is ORT's own QDQ export (``simulate.py``): its quantized tensors, weights as ORT stores
them (frozen), int32 biases following the input threshold. The thresholds are
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
from ..progress import Progress, log_progress
from .qdq import compute_ranges, quantize_qdq
from .simulate import QDQSimulation, fake_quant

__all__ = ["fake_quant", "train_ranges"]


def train_ranges(model: onnx.ModelProto, input_name: str, batches: Sequence[np.ndarray], *, steps: int = 100,
                 lr: float = 0.02, seed: int = 0,
                 init: dict[str, tuple[float, float]] | None = None, qdq: onnx.ModelProto | None = None,
                 progress: Progress | None = None) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """Trained (rmin, rmax) per activation tensor, initialised from the MSE ranges.

    ``qdq``: ORT's QDQ model of ``model`` with the ``init`` ranges (made here when not given). The
    training simulates exactly that graph (:class:`QDQSimulation`): the tensors it quantizes, its
    quantized weights and biases; simulating others would train thresholds for a different graph
    than the one that runs.
    """
    torch.manual_seed(seed)
    init = init or compute_ranges(model, input_name, batches, "mse")
    if qdq is None:
        qdq, _ = quantize_qdq(model, input_name, batches, ranges=init)
    sim = QDQSimulation(model, qdq)
    names = [n for n, (lo, hi) in init.items() if hi > lo and n in sim.trainable]
    log_hi = {n: torch.tensor(math.log(max(init[n][1], 1e-6)), requires_grad=True) for n in names if init[n][1] > 0}
    log_lo = {n: torch.tensor(math.log(-init[n][0]), requires_grad=True) for n in names if init[n][0] < 0}

    def bounds(n: str) -> tuple[torch.Tensor, torch.Tensor]:
        hi = torch.exp(log_hi[n]) if n in log_hi else torch.tensor(0.0)
        lo = -torch.exp(log_lo[n]) if n in log_lo else torch.tensor(0.0)
        return lo, hi

    sess = session(model)
    samples = np.concatenate(list(batches)).astype(np.float32)
    feeds = pieces(model, [samples[i:i + 8] for i in range(0, len(samples), 8)], input_name)
    targets = [[torch.from_numpy(np.asarray(o, np.float32)) for o in sess.run(None, {input_name: x})] for x in feeds]
    scales = [max(float(torch.stack([t[k].var() for t in targets]).mean()), 1e-12) for k in range(len(targets[0]))]

    def loss_on(i: int) -> torch.Tensor:
        outs = sim.run({input_name: torch.from_numpy(feeds[i])}, {n: bounds(n) for n in names})
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
    say = progress or log_progress
    for step in range(steps):
        opt.zero_grad()
        loss = loss_on(train[int(rng.integers(len(train)))])
        loss.backward()
        opt.step()
        say("training activation thresholds", step + 1, steps)
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
