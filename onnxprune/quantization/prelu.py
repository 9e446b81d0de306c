"""``quantize(prelu=...)``: the exact PRelu rewrites of ``passes/prelu_split.py`` before int8, and which one.

ORT has no int8 PRelu, and its float PRelu kernel is the slowest op in a PReLU network: MobileFaceNet
int8 with its 33 PRelu ran at 0.87-0.98x the fp32 speed. Measured with ``benchmarks/prelu_int8.py``
(ORT 1.32, 1 thread, AMD EPYC with AVX-512 VNNI, interleaved medians):

- ``max`` (Mul + Max in float between the int8 convs) beat ``keep`` on every layer shape tried
  (2.4-3.4x on MobileFaceNet blocks, 1.1-1.6x on iResNet blocks), so a PRelu the user did not
  exclude is never kept by ``auto`` and the choice is not timed;
- ``absorb`` (ReLU fused into doubled convs, no activation pass at all) against ``max`` depends on
  the layers: on MobileFaceNet's depthwise-to-pointwise layers it is a tie, on iResNet's dense 3x3
  pairs it doubles the biggest convs and loses (0.56-1.03x of keep). ``auto`` times both on the
  model (int8 built with quick min/max ranges: kernels, not ranges, set the speed) and takes
  ``absorb`` only when it is at least ``ABSORB_MARGIN`` faster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx_ir as ir

from ..bench import interleaved_times
from ..errors import ConfigError
from ..graph.matching import match_nodes
from ..passes.prelu_split import PreluSplit
from ..graph.runtime import session
from ..progress import Progress, log_progress
from .qdq import pre_process, quantize_qdq, to_opset13

PRELU_MODES = ("auto", "split", "keep")
ABSORB_MARGIN = 0.03  # absorb must beat max by this share of the latency (median of per-round ratios)
TIMING_BUDGET_S = 3.0  # interleaved rounds of the candidates, about this long in all
STANDARD = ("", "ai.onnx")


@dataclass(frozen=True)
class PreluChoice:
    mode: str  # auto | split | keep
    rewritten: tuple[tuple[str, str], ...] = ()  # (PRelu node, pattern), see passes/prelu_split.py
    left: tuple[tuple[str, str], ...] = ()  # (PRelu node, why it stays a PRelu)
    float_nodes: tuple[str, ...] = ()  # Mul/Max nodes of the ``max`` pattern: kept in float (exact slopes)
    timings_ms: dict[str, float] = field(default_factory=dict)  # auto: candidate -> median int8 latency
    absorb_ratio: float | None = None  # auto: median over interleaved rounds of absorb / max (what decides)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "rewritten": [list(r) for r in self.rewritten], "left": [list(r) for r in self.left],
                "timings_ms": dict(self.timings_ms), "absorb_ratio": self.absorb_ratio}

    @classmethod
    def from_dict(cls, d: dict) -> PreluChoice:
        return cls(d["mode"], tuple(map(tuple, d["rewritten"])), tuple(map(tuple, d["left"])),
                   timings_ms=dict(d.get("timings_ms", {})), absorb_ratio=d.get("absorb_ratio"))

    def summary(self) -> str:
        """One line for the report ("" when the model has no PRelu)."""
        if not self.rewritten and not self.left:
            return ""
        if not self.rewritten:
            return f"PRelu left to ORT's float kernel (--prelu {self.mode}): {len(self.left)}"
        counts: dict[str, int] = {}
        for _, pattern in self.rewritten:
            counts[pattern] = counts.get(pattern, 0) + 1
        text = ", ".join(f"{n} {p}" for p, n in sorted(counts.items()))
        line = f"PRelu rewritten exactly for int8 (--prelu {self.mode}): {text}"
        if self.left:
            line += f"; {len(self.left)} left as PRelu"
        if self.timings_ms:
            line += " (int8 timed: " + ", ".join(f"{k} {v:.2f} ms" for k, v in self.timings_ms.items())
            line += f"; absorb/max per round {self.absorb_ratio:.3f})"
        return line


def check_prelu_mode(mode: str) -> None:
    if mode not in PRELU_MODES:
        raise ConfigError(f"--prelu must be one of {', '.join(PRELU_MODES)}, got {mode!r}")


def rewrite_prelu(graph: ir.Model, mode: str, input_name: str, batches: Sequence[np.ndarray], *,
                  exclude: Sequence[str] = (), progress: Progress | None = None) -> tuple[ir.Model, PreluChoice]:
    """``graph`` with its PRelu nodes rewritten as ``mode`` says, and what was done.

    ``split`` rewrites every PRelu (``absorb`` where the readers allow, ``max`` elsewhere); ``auto``
    does the same where timing says ``absorb`` pays, else ``max`` everywhere; ``keep`` leaves them.
    A PRelu matched by the ``exclude`` patterns (kept in float) is only ever written as ``max``, in float.
    """
    check_prelu_mode(mode)
    names = [n.name for n in graph.graph if n.op_type == "PRelu" and n.domain in STANDARD]
    if mode == "keep" or not names:
        return graph, PreluChoice(mode, left=tuple((n, "--prelu keep") for n in names))
    int8 = frozenset(names) - set(match_nodes(names, exclude)[0])
    absorbed = PreluSplit(absorb=int8)(graph)
    chosen, timings, ratio = absorbed, {}, None
    if mode == "auto":
        elementwise = PreluSplit(absorb=frozenset())(graph)
        if any(p == "absorb" for _, p in absorbed.record.rewritten):
            timings, ratio = _time_int8({"max": elementwise, "absorb": absorbed}, input_name, batches, progress)
            chosen = absorbed if ratio < 1 - ABSORB_MARGIN else elementwise
        else:
            chosen = elementwise
    rec = chosen.record
    return chosen.model, PreluChoice(mode, rec.rewritten, rec.left, rec.elementwise, timings, ratio)


def _time_int8(candidates: dict, input_name: str, batches: Sequence[np.ndarray],
               progress: Progress | None) -> tuple[dict[str, float], float]:
    """({candidate: median ms of its int8 model}, median per-round ratio absorb / max), 1 thread, interleaved."""
    say = progress or log_progress
    sample = [np.asarray(batches[0][:1])]
    sessions = []
    for name, result in candidates.items():
        say(f"--prelu auto: int8 model with the {name} rewrite, for timing")
        pre = pre_process(to_opset13(ir.to_proto(result.model)))
        q, _ = quantize_qdq(pre, input_name, sample, thresholds="minmax", exclude_nodes=result.record.elementwise)
        sessions.append(session(q, threads=1))
    feeds = {input_name: sample[0]}
    once = interleaved_times(sessions, feeds, runs=1, warmup=1, progress=lambda *a: None)
    runs = int(np.clip(TIMING_BUDGET_S * 1000.0 / max(float(once.sum()), 1e-3), 8, 40))
    times = interleaved_times(sessions, feeds, runs=runs, warmup=2, progress=say)
    medians = {name: float(np.median(times[:, i])) for i, name in enumerate(candidates)}
    return medians, float(np.median(times[:, 1] / times[:, 0]))
