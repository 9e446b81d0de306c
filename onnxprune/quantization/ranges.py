"""Activation ranges for int8: statistics over calibration data and the clipping thresholds chosen from them.

ONNX Runtime's calibrators pick ranges by fixed rules (MinMax, Percentile, Entropy). Here the
range of each tensor is chosen to minimise the quantisation error of that tensor itself (``mse``),
from a histogram accumulated batch by batch; the result is handed to ONNX Runtime's own quantizer
as ``TensorQuantOverrides``, so the QDQ graph is still written by ORT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINS = 2048


@dataclass
class TensorHistogram:
    """Value histogram of one tensor over the calibration set (fixed range from a first pass)."""

    lo: float
    hi: float
    counts: np.ndarray

    @property
    def centers(self) -> np.ndarray:
        edges = np.linspace(self.lo, self.hi, len(self.counts) + 1)
        return (edges[:-1] + edges[1:]) / 2


def minmax_pass(stream_fn, names: list[str]) -> dict[str, tuple[float, float]]:
    """First pass: the range of every tensor."""
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}

    def consume(tensors: dict[str, np.ndarray]) -> None:
        for n in names:
            t = tensors[n]
            if t.size == 0 or not np.issubdtype(t.dtype, np.floating):
                continue
            lo[n] = min(lo.get(n, np.inf), float(t.min()))
            hi[n] = max(hi.get(n, -np.inf), float(t.max()))

    stream_fn(consume)
    return {n: (lo[n], hi[n]) for n in lo}


def histogram_pass(stream_fn, ranges: dict[str, tuple[float, float]], bins: int = BINS) -> dict[str, TensorHistogram]:
    """Second pass: a histogram of every tensor over its range."""
    hists = {n: TensorHistogram(lo, max(hi, lo + _min_width(lo, hi, bins)), np.zeros(bins))
             for n, (lo, hi) in ranges.items() if np.isfinite(lo) and np.isfinite(hi)}

    def consume(tensors: dict[str, np.ndarray]) -> None:
        for n, h in hists.items():
            counts, _ = np.histogram(tensors[n], bins=len(h.counts), range=(h.lo, h.hi))
            h.counts += counts

    stream_fn(consume)
    return hists


def _min_width(lo: float, hi: float, bins: int) -> float:
    """Narrowest range whose bins float32 data can still tell apart (constant tensors have none)."""
    return bins * 4 * float(np.finfo(np.float32).eps) * max(1.0, abs(lo), abs(hi))


def quant_error(h: TensorHistogram, rmin: float, rmax: float, qmin: int = 0, qmax: int = 255) -> float:
    """Expected squared error of quantising the histogram's values to [rmin, rmax].

    Values inside the range are rounded (uniform error, step²/12: the histogram's bins are often
    wider than a quantisation step, so rounding bin centres would misjudge it); values outside are
    clipped to the nearest end. Zero stays exactly representable, as in ORT.
    """
    rmin, rmax = min(rmin, 0.0), max(rmax, 0.0)
    step = (rmax - rmin) / (qmax - qmin) if rmax > rmin else 1.0
    x = h.centers
    err = np.where(x < rmin, (rmin - x) ** 2, np.where(x > rmax, (x - rmax) ** 2, step * step / 12))
    total = h.counts.sum()
    return float((h.counts * err).sum() / total) if total else 0.0


def mse_range(h: TensorHistogram, steps: int = 64, rounds: int = 2) -> tuple[float, float]:
    """The clipping range minimising quantisation MSE: alternating 1-D searches on each end."""
    rmin, rmax = min(h.lo, 0.0), max(h.hi, 0.0)
    grid = np.linspace(0.05, 1.0, steps)
    for _ in range(rounds):
        if h.hi > 0:
            rmax = max((h.hi * t for t in grid), key=lambda v: -quant_error(h, rmin, v))
        if h.lo < 0:
            rmin = max((h.lo * t for t in grid), key=lambda v: -quant_error(h, v, rmax))
    return float(rmin), float(rmax)


def percentile_range(h: TensorHistogram, percentile: float = 99.999) -> tuple[float, float]:
    cdf = np.cumsum(h.counts) / max(h.counts.sum(), 1)
    x = h.centers
    lo = x[np.searchsorted(cdf, (100 - percentile) / 100)]
    hi = x[min(np.searchsorted(cdf, percentile / 100), len(x) - 1)]
    return float(min(lo, 0.0)), float(max(hi, 0.0))
