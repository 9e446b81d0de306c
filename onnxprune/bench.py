"""Latency, size and compute of several models side by side, measured so the comparison is fair.

Why interleaved rounds: CPU frequency, thermal state and noisy neighbours drift over seconds. Timing
model A for 50 runs and then model B lets that drift pose as a speed-up; running every model once
per round, in a shuffled order, exposes both to the same conditions, and the per-round ratio
(B/A inside one round) cancels what the round had in common.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .errors import ConfigError, ModelLoadError
from .graph.io import ModelLike, load_proto
from .graph.metrics import ModelCost, count_nonzero_params, model_cost
from .graph.runtime import session
from .graph.shapes import Shape, random_inputs, representative_shapes
from .memory import KEPT_NOTE, UNAVAILABLE_NOTE, RssMeter
from .progress import Progress, log_progress
from .quantization.qdq import is_int8_kernel
from .report import SCHEMA_VERSION, _big, dims_text, record_dict, shape_text, short_name

# Dense float compute as it appears after ORT's fusions (FusedConv etc. are com.microsoft ops).
FLOAT_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul",
                               "NhwcConv", "Attention", "MultiHeadAttention", "Einsum"})

_INT_WEIGHTS = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4})


@dataclass
class BenchRow:
    """One model under one (provider, threads, input shape) configuration."""

    model: str
    provider: str
    threads: int
    input_shapes: dict[str, list[int]]
    file_bytes: int
    params: int
    macs: int
    int8_nodes: int  # QLinear* / *Integer ops in ORT's optimised graph
    float_nodes: int  # float Conv/Gemm/MatMul (and their fused forms) in ORT's optimised graph
    peak_mem_mb: float | None  # peak RSS growth over session creation + first run (None: not measurable here)
    min_ms: float
    median_ms: float
    p90_ms: float
    throughput: float  # samples/s at the median latency (batch = first dim of the first input)
    ratio_median: float | None = None  # latency / first model's latency, median over rounds
    ratio_iqr: float | None = None  # p75 - p25 of the per-round ratios: how far to trust ratio_median
    speedup: float | None = None  # median over rounds of first model's latency / this one's
    netscore: float | None = None  # with the parameters that are not zero (a sparse model's zeros are not counted)


@dataclass
class BenchReport:
    rows: list[BenchRow]
    notes: list[str] = field(default_factory=list)
    runs: int = 0
    warmup: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "kind": "bench", "runs": self.runs, "warmup": self.warmup,
                "rows": record_dict(self.rows), "notes": list(self.notes)}

    def summary(self) -> str:
        """One table per (provider, threads); rows per input shape then model, so a resolution sweep
        reads as a latency-per-resolution table."""
        lines: list[str] = []
        configs = list(dict.fromkeys((r.provider, r.threads) for r in self.rows))
        names = {r.model: short_name(r.model) for r in self.rows}
        width = max([5] + [len(n) for n in names.values()])
        for provider, threads in configs:
            lines += [""] if lines else []
            lines.append(f"{provider}, {threads} thread{'s' * (threads != 1)}, {self.runs} interleaved rounds")
            lines.append(f"{'model':{width}s}  {'input':>14s}  {'min ms':>8s} {'med ms':>8s} {'p90 ms':>8s} "
                         f"{'smp/s':>8s}  {'vs first':>14s}  {'params':>9s} {'MACs':>9s} {'int8/float':>10s} "
                         f"{'mem MB':>7s} {'size':>8s} {'NetScore':>8s}")
            for r in (r for r in self.rows if (r.provider, r.threads) == (provider, threads)):
                vs = "—" if r.speedup is None else f"x{r.speedup:.3f}±{(r.ratio_iqr or 0) / 2:.3f}"
                shape = dims_text(r.input_shapes)
                ns = "—" if r.netscore is None else f"{r.netscore:.1f}"
                lines.append(f"{names[r.model]:{width}s}  {shape:>14s}  {r.min_ms:8.3f} {r.median_ms:8.3f} "
                             f"{r.p90_ms:8.3f} {r.throughput:8.1f}  {vs:>14s}  {_big(r.params):>9s} "
                             f"{_big(r.macs):>9s} {f'{r.int8_nodes}/{r.float_nodes}':>10s} {_mem(r.peak_mem_mb):>7s} "
                             f"{_bytes(r.file_bytes):>8s} {ns:>8s}")
        if any(r.speedup is not None for r in self.rows):
            lines.append("vs first: median per-round speed-up over the first model (±half the IQR of the ratios)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def bench(models: Sequence[ModelLike], *, providers: Sequence[str] = ("CPUExecutionProvider",),
          threads: Sequence[int] = (1,), input_shapes: Sequence[Mapping[str, Shape]] | None = None,
          runs: int = 50, warmup: int = 5, seed: int = 0, accuracy: Mapping[int, float] | None = None,
          progress: Progress | None = None) -> BenchReport:
    """Time ``models`` interleaved under every (provider, threads, input shape) configuration.

    ``input_shapes`` is a list of overrides (one dict per resolution of a sweep); dims left out take
    the model's declared or default sizes. ``accuracy`` maps a model index to its accuracy or fidelity
    in [0, 1] for NetScore; models without one get no NetScore. Unavailable providers are skipped
    with a note.
    """
    accuracy = _check_options(models, threads, runs, warmup, accuracy)
    providers, notes = _available(providers)
    subjects = _Subjects.load(models, input_shapes, accuracy)
    _warm_up(subjects, providers[0], seed)
    rng = np.random.default_rng(seed)
    rows: list[BenchRow] = []
    mem_kinds: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="onnxprune-bench-") as tmp:
        counts = _NodeCounts(tmp)
        for provider in providers:
            for n_threads in threads:
                for k in range(len(subjects.shape_sets)):
                    rows += _bench_config(subjects, provider, int(n_threads), k, runs, warmup, seed, rng, progress,
                                          counts, mem_kinds)
    notes += [KEPT_NOTE] * ("kept" in mem_kinds) + [UNAVAILABLE_NOTE] * ("unavailable" in mem_kinds)
    return BenchReport(rows, notes, runs, warmup)


def netscore(accuracy: float, params: int, macs: int, alpha: float = 2.0, beta: float = 0.5,
             gamma: float = 0.5) -> float | None:
    """NetScore (Wong 2019): 20·log10(a^α / (p^β · m^γ)), p and m in millions.

    Callers pass the parameters that are not zero as p (``count_nonzero_params``): for a dense model
    that is every parameter, for ``slim --sparsity`` output the zeros do not count. m stays the
    dense MACs, which is what ONNX Runtime's kernels execute.

    ``accuracy`` is in [0, 1] here; the paper uses percent, which adds a constant 40·α·log10(10)=80
    (for α=2), so only differences between models are comparable across the two conventions.
    None when params or MACs are 0 (the score is undefined).
    """
    p, m = params / 1e6, macs / 1e6
    if accuracy <= 0 or p <= 0 or m <= 0:
        return None
    return 20.0 * (alpha * math.log10(accuracy) - beta * math.log10(p) - gamma * math.log10(m))


def ratio_quartiles(num: np.ndarray, den: np.ndarray) -> tuple[float, float, float]:
    """Quartiles of the per-round ratio num/den of interleaved timings: pairing rounds cancels drift."""
    q25, q50, q75 = np.percentile(np.asarray(num) / np.asarray(den), [25, 50, 75])
    return float(q25), float(q50), float(q75)


def interleaved_times(sessions: Sequence[ort.InferenceSession], feeds: Mapping[str, np.ndarray], runs: int,
                      warmup: int, seed: int = 0, progress: Progress | None = None, *, what: str = "timing",
                      clock: Callable[[], float] = time.perf_counter) -> np.ndarray:
    """[runs, models] latencies in ms, every model once per round in a shuffled order (see module doc).
    ``clock``: wall time by default; ``time.thread_time`` counts only the calling thread's CPU time
    (single-thread sessions on a loaded machine: preemption is not counted)."""
    return _interleaved(sessions, feeds, runs, warmup, np.random.default_rng(seed), progress, what, clock)


# ----------------------------------------------------------------------------------------------- stages
def _check_options(models: Sequence[ModelLike], threads: Sequence[int], runs: int, warmup: int,
                   accuracy: Mapping[int, float] | None) -> dict[int, float]:
    """Refuse bad options before any work; returns ``accuracy`` as a dict."""
    if not models:
        raise ConfigError("bench needs at least one model")
    if runs < 1 or warmup < 0:
        raise ConfigError(f"--runs must be >= 1 and --warmup >= 0, got {runs} and {warmup}")
    if not threads or any(int(t) < 1 for t in threads):
        raise ConfigError(f"--threads must be positive integers, got {list(threads)}")
    accuracy = dict(accuracy or {})
    for i, a in accuracy.items():
        if not 0 <= i < len(models) or not 0.0 < a <= 1.0:
            raise ConfigError(f"accuracy for model {i} must be in (0, 1] for an existing model, got {a}")
    return accuracy


def _available(providers: Sequence[str]) -> tuple[list[str], list[str]]:
    """The requested providers this onnxruntime build has (each once, in order), and a note per missing one."""
    available = set(ort.get_available_providers())
    notes = [f"provider {p} is not available in this onnxruntime build; skipped" for p in providers if p not in available]
    usable = [p for p in dict.fromkeys(providers) if p in available]
    if not usable:
        raise ConfigError(f"none of the requested providers is available; available: {', '.join(sorted(available))}")
    return usable, notes


@dataclass
class _Subjects:
    """The models compared, and what is measured of them once, whatever the configuration."""

    protos: list[onnx.ModelProto]
    labels: list[str]
    sources: list[str | None]  # the path a model was given as (ORT reads it itself), else None
    sizes: list[int]
    shape_sets: list[dict[str, Shape]]  # one concrete input shape set per resolution
    costs: dict[tuple[int, int], ModelCost]  # (model, shape set) -> params, MACs
    nonzero: dict[int, int]  # NetScore's p for the models given an accuracy (slim --sparsity zeros)
    accuracy: dict[int, float]

    @classmethod
    def load(cls, models: Sequence[ModelLike], input_shapes: Sequence[Mapping[str, Shape]] | None,
             accuracy: dict[int, float]) -> "_Subjects":
        protos = [load_proto(m) for m in models]
        shape_sets = [_resolve_shapes(protos, dict(o)) for o in (input_shapes or [{}])]
        return cls(protos, _labels(models), [str(m) if isinstance(m, (str, os.PathLike)) else None for m in models],
                   [p.ByteSize() for p in protos], shape_sets,
                   {(i, k): _cost(p, shape_sets[k]) for k in range(len(shape_sets)) for i, p in enumerate(protos)},
                   {i: count_nonzero_params(protos[i]) for i in accuracy}, accuracy)

    def source(self, i: int) -> str | onnx.ModelProto:
        return self.sources[i] or self.protos[i]


def _warm_up(subjects: _Subjects, provider: str, seed: int) -> None:
    """ORT's one-off process setup (allocators, thread pools) would be charged to the first model's memory."""
    first = _session(subjects.source(0), provider, 1, None, subjects.labels[0])
    _run(first, random_inputs(first, subjects.shape_sets[0], np.random.default_rng(seed)), subjects.labels[0])


class _NodeCounts:
    """(int8, float) compute nodes per (model, provider), read from the graph ORT optimised, once."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.counts: dict[tuple[int, str], tuple[int, int]] = {}

    def path(self, i: int, provider: str) -> str | None:
        """Where the session should save its optimised graph; None once counted."""
        return None if (i, provider) in self.counts else str(Path(self.tmp) / f"m{i}_{len(self.counts)}.onnx")

    def read(self, i: int, provider: str, path: str | None) -> None:
        if path is not None:
            self.counts[(i, provider)] = _count_nodes(path)

    def __getitem__(self, key: tuple[int, str]) -> tuple[int, int]:
        return self.counts[key]


def _bench_config(subjects: _Subjects, provider: str, threads: int, k: int, runs: int, warmup: int, seed: int,
                  rng: np.random.Generator, progress: Progress | None, counts: _NodeCounts,
                  mem_kinds: set[str]) -> list[BenchRow]:
    """Every model under one (provider, threads, shape set k): opened, timed interleaved, one row each.
    The sessions and inputs are freed on return, before the next configuration's memory is measured."""
    shapes = subjects.shape_sets[k]
    sessions, mems, feeds = _open_sessions(subjects, provider, threads, shapes, seed, counts, mem_kinds)
    what = f"timing {provider}, {threads} thread{'s' * (threads != 1)}, {shape_text(shapes)}"
    times = _interleaved(sessions, feeds, runs, warmup, rng, progress, what)
    return [_row(subjects, i, k, provider, threads, times, mems[i], counts[(i, provider)])
            for i in range(len(subjects.protos))]


def _open_sessions(subjects: _Subjects, provider: str, threads: int, shapes: Mapping[str, Shape], seed: int,
                   counts: _NodeCounts, mem_kinds: set[str]
                   ) -> tuple[list[ort.InferenceSession], list[float | None], dict[str, np.ndarray]]:
    """One session per model, each run once on the same random inputs; the memory each took."""
    sessions, mems, feeds = [], [], None
    for i in range(len(subjects.protos)):
        opt_path = counts.path(i, provider)
        meter = RssMeter()  # the previous configuration's sessions are gone: _bench_config returned
        sess = _session(subjects.source(i), provider, threads, opt_path, subjects.labels[i])
        if feeds is None:  # the same inputs for every model
            feeds = random_inputs(sess, shapes, np.random.default_rng(seed))
        _run(sess, feeds, subjects.labels[i])
        mems.append(_grown_mb(meter, feeds if i == 0 else None))  # model 0's block made the feeds
        mem_kinds.add(meter.kind)
        sessions.append(sess)
        counts.read(i, provider, opt_path)
    return sessions, mems, feeds


def _row(subjects: _Subjects, i: int, k: int, provider: str, threads: int, times: np.ndarray,
         peak_mem_mb: float | None, nodes: tuple[int, int]) -> BenchRow:
    """Model ``i``'s row: its latencies (column ``i`` of ``times``) and their ratios to model 0's."""
    shapes = subjects.shape_sets[k]
    t, cost = times[:, i], subjects.costs[(i, k)]
    batch = next(iter(shapes.values()))[0] if shapes and next(iter(shapes.values())) else 1
    row = BenchRow(
        model=subjects.labels[i], provider=provider, threads=threads,
        input_shapes={n: list(s) for n, s in shapes.items()}, file_bytes=subjects.sizes[i],
        params=cost.params, macs=cost.macs, int8_nodes=nodes[0], float_nodes=nodes[1], peak_mem_mb=peak_mem_mb,
        min_ms=float(t.min()), median_ms=float(np.median(t)), p90_ms=float(np.percentile(t, 90)),
        throughput=float(batch * 1000.0 / np.median(t)),
        netscore=(netscore(subjects.accuracy[i], subjects.nonzero[i], cost.macs) if i in subjects.accuracy
                  else None))
    if len(subjects.protos) > 1:
        q25, q50, q75 = ratio_quartiles(t, times[:, 0])
        row.ratio_median, row.ratio_iqr = float(q50), float(q75 - q25)
        row.speedup = float(np.median(times[:, 0] / t))
    return row


# ----------------------------------------------------------------------------------------------- helpers
def _interleaved(sessions: Sequence[ort.InferenceSession], feeds: Mapping[str, np.ndarray], runs: int, warmup: int,
                 rng: np.random.Generator, progress: Progress | None = None, what: str = "timing",
                 clock: Callable[[], float] = time.perf_counter) -> np.ndarray:
    times = np.zeros((runs, len(sessions)))
    say = progress or log_progress
    for r in range(warmup + runs):
        for i in rng.permutation(len(sessions)):
            start = clock()
            sessions[i].run(None, feeds)
            if r >= warmup:
                times[r - warmup, i] = (clock() - start) * 1000.0
        say(what, r + 1, warmup + runs)  # after the timed region: drawing a bar must not be timed
    return times


def _session(model: str | onnx.ModelProto, provider: str, threads: int, optimized_path: str | None,
             label: str) -> ort.InferenceSession:
    """A timing session (idle workers do not spin: interleaved, that would steal cores from the next
    model); ORT's failure to load becomes a :class:`ModelLoadError` naming ``label``."""
    try:
        return session(model, threads, providers=(provider,), spinning=False, optimized_path=optimized_path,
                       big_by_path=False)
    except Exception as exc:  # ORT raises several unrelated types
        raise ModelLoadError(f"ONNX Runtime cannot load {label} with {provider}: {_line(exc)}") from None


def _run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray], label: str) -> None:
    try:
        sess.run(None, dict(feeds))
    except Exception as exc:
        raise ModelLoadError(f"ONNX Runtime cannot run {label} at this input shape: {_line(exc)}") from None


def _count_nodes(path: str) -> tuple[int, int]:
    """(int8, float) compute nodes of the graph ORT actually runs, after its fusions."""
    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception:  # optimised-model saving is best effort (some EPs refuse it)
        return 0, 0
    ops = [n.op_type for n in graph.node]
    int8 = sum(is_int8_kernel(op) for op in ops)
    return int8, sum(op in FLOAT_COMPUTE_OPS for op in ops)


def _cost(proto: onnx.ModelProto, shapes: Mapping[str, Shape]) -> ModelCost:
    """MACs as usual; params also count integer weights, or an int8 model would look weightless."""
    cost = model_cost(proto, shapes)
    ints = sum(int(np.prod(t.dims)) for t in proto.graph.initializer
               if t.data_type in _INT_WEIGHTS and len(t.dims) > 1)
    return ModelCost(cost.params + ints, cost.macs)


def _resolve_shapes(protos: Sequence[onnx.ModelProto], overrides: dict[str, Shape]) -> dict[str, Shape]:
    """One concrete shape set valid for every model (they are compared on the same inputs)."""
    first = representative_shapes(protos[0], overrides)
    for i, p in enumerate(protos[1:], 1):
        if representative_shapes(p, overrides) != first:
            raise ConfigError(f"model {i} has different inputs than model 0; benchmarked models must share inputs")
    return first


def _labels(models: Sequence[ModelLike]) -> list[str]:
    labels = [str(m) if isinstance(m, (str, os.PathLike)) else f"model{i}" for i, m in enumerate(models)]
    return [l if labels.count(l) == 1 else f"{l}#{i}" for i, l in enumerate(labels)]


def _grown_mb(meter: RssMeter, feeds: Mapping[str, np.ndarray] | None) -> float | None:
    """The block's RSS growth in MiB, less the benchmark's own input arrays made inside it."""
    grown = meter.growth()
    if grown is None:
        return None
    made = sum(np.asarray(v).nbytes for v in feeds.values()) if feeds else 0
    return round(max(0, grown - made) / 2**20, 2)


def _mem(mb: float | None) -> str:
    """Memory cell: n/a when not measurable; two decimals below 0.1 MiB so small never reads as 0.0."""
    return "n/a" if mb is None else f"{mb:.1f}" if mb >= 0.1 or mb == 0 else f"{mb:.2f}"


def _bytes(n: int) -> str:
    for unit, div in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n}B"


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
