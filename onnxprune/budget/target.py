"""A speed target (`slim --speedup S`): what it means, how many stages reach it, how it is measured."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from ..errors import ConfigError

MAX_STAGE_SPEEDUP = 2.0  # automatic staging: at most this much speed-up bought per stage
MEASURE_RUNS = 30


@dataclass(frozen=True)
class SpeedTarget:
    """Latency ratio original/compressed to reach, on ``providers`` with ``threads`` intra-op threads,
    at the analysis input shape. With ``int8`` the compressed model's latency is its int8 version's
    (``slim --int8``), against the float original."""

    speedup: float
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 1
    int8: bool = False
    strict: bool = False  # an unreachable target is an error (nothing written), not a warning
    relu: bool = False  # the int8 model will have its LeakyRelu/PRelu made ReLU (quantize --relu): faster
    retries: int = 3  # float targets: re-allocations of the last stage when the measurement misses by >10%

    def __post_init__(self) -> None:
        if not isinstance(self.speedup, (int, float)) or not math.isfinite(self.speedup) or self.speedup <= 1:
            raise ConfigError(f"--speedup must be a number above 1 (latency original/compressed), got {self.speedup}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"--threads must be a positive integer, got {self.threads}")
        if not self.providers:
            raise ConfigError("a speed target needs at least one execution provider")
        if not isinstance(self.retries, int) or not 0 <= self.retries <= 10:
            raise ConfigError(f"speed-target retries must be an integer from 0 to 10, got {self.retries}")

    def stage_targets(self, stages: int, start: float = 1.0) -> list[float]:
        """Cumulative speed-up after each of ``stages`` stages: equal factors from ``start`` (what the
        unpruned model already gains: int8, exact rewrites), the last one exact."""
        base = min(start, self.speedup)
        return [base * (self.speedup / base) ** ((k + 1) / stages) for k in range(stages)]


def auto_stages(speedup: float) -> int:
    """Stages so that no stage buys more than :data:`MAX_STAGE_SPEEDUP` of the ``speedup`` pruning
    must buy (a large one-shot cut loses accuracy that the refit of a smaller step keeps)."""
    return max(1, math.ceil(math.log(speedup) / math.log(MAX_STAGE_SPEEDUP) - 1e-9))


def check_stages(stages: int | None) -> None:
    if stages is not None and (not isinstance(stages, int) or not 1 <= stages <= 10):
        raise ConfigError(f"--stages must be an integer from 1 to 10, got {stages}")


@dataclass(frozen=True)
class MeasuredSpeed:
    """Interleaved medians of the original and the compressed model on the target."""

    original_ms: float
    compressed_ms: float
    speedup: float  # median of the per-round ratios (drift cancels), not the ratio of medians


def measure_speedup(original: onnx.ModelProto | str | Path, compressed: onnx.ModelProto, input_shapes: Mapping[str, tuple],
                    target: SpeedTarget, runs: int = MEASURE_RUNS, warmup: int = 3) -> MeasuredSpeed:
    """Time both models interleaved on the target's provider and threads at ``input_shapes``."""
    from ..bench import _session, interleaved_times, ratio_quartiles  # noqa: PLC0415 - bench imports the pipeline

    feeds = {name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)
             for name, shape in input_shapes.items()}
    provider = target.providers[0]
    sessions = [_session(m if isinstance(m, onnx.ModelProto) else str(m), provider, target.threads, None, label)
                for m, label in ((original, "the original"), (compressed, "the compressed model"))]
    times = interleaved_times(sessions, feeds, runs, warmup, progress=lambda *a: None)
    _, ratio, _ = ratio_quartiles(times[:, 0], times[:, 1])
    return MeasuredSpeed(float(np.median(times[:, 0])), float(np.median(times[:, 1])), ratio)
