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


Ranges = dict[str, tuple[float, float]]


def train_ranges(model: onnx.ModelProto, input_name: str, batches: Sequence[np.ndarray], *, steps: int = 100,
                 lr: float = 0.02, seed: int = 0, init: Ranges | None = None, qdq: onnx.ModelProto | None = None,
                 progress: Progress | None = None) -> tuple[Ranges, list[str]]:
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
    thresholds = _Thresholds(init, [n for n, (lo, hi) in init.items() if hi > lo and n in sim.trainable])
    loss = _Loss(model, sim, thresholds, input_name, batches)
    initial = loss.validation()
    _fit(loss, thresholds, steps, lr, seed, progress or log_progress)
    final = loss.validation()
    if not final < initial:
        return init, [f"trained thresholds did not lower the validation loss ({initial:.5f} -> {final:.5f}); kept mse"]
    return thresholds.ranges(), [f"trained thresholds: validation loss {initial:.5f} -> {final:.5f} in {steps} steps"]


class _Thresholds:
    """Trainable clipping thresholds, log scale (positive, moving proportionally): one per nonzero end."""

    def __init__(self, init: Ranges, names: list[str]) -> None:
        self.init, self.names = init, names
        self.log_hi = {n: torch.tensor(math.log(max(init[n][1], 1e-6)), requires_grad=True)
                       for n in names if init[n][1] > 0}
        self.log_lo = {n: torch.tensor(math.log(-init[n][0]), requires_grad=True) for n in names if init[n][0] < 0}

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.log_hi.values()) + list(self.log_lo.values())

    def bounds(self, n: str) -> tuple[torch.Tensor, torch.Tensor]:
        hi = torch.exp(self.log_hi[n]) if n in self.log_hi else torch.tensor(0.0)
        lo = -torch.exp(self.log_lo[n]) if n in self.log_lo else torch.tensor(0.0)
        return lo, hi

    def all_bounds(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: self.bounds(n) for n in self.names}

    def ranges(self) -> Ranges:
        """The trained ranges; tensors not trained keep their initial one."""
        out = {}
        for n in self.init:
            if n in self.names:
                lo, hi = self.bounds(n)
                out[n] = (float(lo.detach()), float(hi.detach()))
            else:
                out[n] = self.init[n]
        return out


class _Loss:
    """Output error of the simulated QDQ model vs the float model, per output normalised by its variance,
    on pieces of 8 samples. Every fifth piece validates: thresholds fitted to a few dozen images can overfit."""

    def __init__(self, model: onnx.ModelProto, sim: QDQSimulation, thresholds: _Thresholds, input_name: str,
                 batches: Sequence[np.ndarray]) -> None:
        self.sim, self.thresholds, self.input_name = sim, thresholds, input_name
        sess = session(model)
        samples = np.concatenate(list(batches)).astype(np.float32)
        self.feeds = pieces(model, [samples[i:i + 8] for i in range(0, len(samples), 8)], input_name)
        self.targets = [[torch.from_numpy(np.asarray(o, np.float32)) for o in sess.run(None, {input_name: x})]
                        for x in self.feeds]
        self.scales = [max(float(torch.stack([t[k].var() for t in self.targets]).mean()), 1e-12)
                       for k in range(len(self.targets[0]))]
        n = len(self.feeds)
        self.val = list(range(0, n, 5)) if n >= 5 else list(range(n))
        self.train = [i for i in range(n) if i not in self.val] or self.val

    def on(self, i: int) -> torch.Tensor:
        outs = self.sim.run({self.input_name: torch.from_numpy(self.feeds[i])}, self.thresholds.all_bounds())
        return sum(((o - t) ** 2).mean() / s for o, t, s in zip(outs, self.targets[i], self.scales))

    def validation(self) -> float:
        with torch.no_grad():
            return float(sum(self.on(i) for i in self.val) / len(self.val))


def _fit(loss: _Loss, thresholds: _Thresholds, steps: int, lr: float, seed: int, say: Progress) -> None:
    """Adam on the log thresholds, one random training piece per step (straight-through rounding)."""
    opt = torch.optim.Adam(thresholds.params, lr=lr)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        opt.zero_grad()
        value = loss.on(loss.train[int(rng.integers(len(loss.train)))])
        value.backward()
        opt.step()
        say("training activation thresholds", step + 1, steps)
