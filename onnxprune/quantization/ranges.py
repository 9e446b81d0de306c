"""Activation ranges for int8: statistics over calibration data and the clipping thresholds chosen from them.

ONNX Runtime's calibrators pick ranges by fixed rules (MinMax, Percentile, Entropy). Here the
range of each tensor is chosen to minimise the quantisation error of that tensor itself (``mse``),
from a histogram accumulated batch by batch; the result is handed to ONNX Runtime's own quantizer
as ``TensorQuantOverrides``, so the QDQ graph is still written by ORT. :class:`ActivationStats`
holds the two passes over the data (min/max, then histograms), run once each and only when a
calibrator (``calibrators.py``) asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx

from ..calibration.activations import stream
from ..graph.shapes import graph_inputs
from ..progress import Progress, quiet

BINS = 2048
Range = tuple[float, float]


def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """Float tensors that may carry quantization parameters: real inputs and node outputs."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    names = [i.name for i in graph_inputs(model)] + [o for n in model.graph.node for o in n.output if o]
    return [n for n in names if types.get(n, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT]


@dataclass
class ActivationStats:
    """The calibration data of a float model (pre-processed for ORT's quantizer) and the statistics
    calibrators read: every activation tensor's min/max, then its histogram over that range. Each
    pass runs once, on first use. ``notes``: what calibrators had to report (kept for the report)."""

    model: onnx.ModelProto
    input_name: str
    batches: Sequence[np.ndarray]
    progress: Progress = quiet
    notes: list[str] = field(default_factory=list)
    _names: list[str] | None = field(default=None, init=False, repr=False)
    _minmax: dict[str, Range] | None = field(default=None, init=False, repr=False)
    _hists: dict[str, TensorHistogram] | None = field(default=None, init=False, repr=False)

    @property
    def names(self) -> list[str]:
        if self._names is None:
            self._names = activation_tensors(self.model)
        return self._names

    def minmax(self) -> dict[str, Range]:
        """(min, max) of every float activation over all batches (inf/NaN included as seen)."""
        if self._minmax is None:
            self.progress("activation ranges: min/max pass")
            self._minmax = minmax_pass(self._stream, self.names)
        return self._minmax

    def histograms(self) -> dict[str, TensorHistogram]:
        """A histogram of every tensor with a finite min/max, over that range."""
        if self._hists is None:
            minmax = self.minmax()
            self.progress("activation ranges: histogram pass")
            self._hists = histogram_pass(self._stream, minmax)
        return self._hists

    def from_histograms(self, pick: Callable[[TensorHistogram], Range]) -> dict[str, Range]:
        """``pick``'s range of every histogram; tensors without one (inf/NaN seen) keep their min/max,
        so they stay float (``qdq._finite``)."""
        hists = self.histograms()
        unbounded = {n: r for n, r in self.minmax().items() if n not in hists}
        return {n: pick(h) for n, h in hists.items()} | unbounded

    def _stream(self, consume: Callable[[dict[str, np.ndarray]], None]) -> None:
        stream(self.model, self.names, self.input_name, self.batches, consume)


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
