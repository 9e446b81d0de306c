"""Sweeps: compress each model at several ratios, criteria and int8 settings; measure every point.

A deployment team rarely knows the right ratio up front; it picks a point on the frontier of
fidelity against latency. Each point is one independent compute job (slim, optionally
quantize, fidelity on held-out calibration samples) on a :class:`~onnxprune.executors.TaskExecutor`,
then one timing job (original vs compressed, interleaved, on one thread) run alone.

Points are content-addressed (model hash + options), so an interrupted sweep re-run with the same
arguments only does what is missing. Files appear atomically: ``model.onnx`` first, then
``compute.json`` (fidelity, size, params), then ``point.json`` (with latency): a point is complete
when ``point.json`` exists and the model's hash matches it.

A point that fails (its compression raises, its worker dies or cannot import onnxprune, its timing
fails) does not stop the others: it is a ``failed`` row, listed in :attr:`SweepResult.failures`,
and ``onnxprune sweep`` exits with status 1 after writing the good points' results.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from . import __version__
from .budget.target import SpeedTarget
from .calibration import CalibrationSet
from .errors import ConfigError
from .executors import LocalExecutor, TaskExecutor
from .fidelity import TASKS
from .graph.io import load_proto, write_bytes_atomic, write_text_atomic
from .graph.runtime import session
from .graph.shapes import Shape
from .pipeline import DEFAULT_ROUND_TO
from .progress import Progress, log_progress
from .report import SCHEMA_VERSION, _finite, budget_text, record_dict
from .saliency.criteria import DESCRIPTIONS

log = logging.getLogger(__name__)
FORMAT = 1  # bump when a point's contents change meaning: old caches are then recomputed


@dataclass(frozen=True)
class SweepOptions:
    """Everything besides the model that decides a point's output (and so its cache key)."""

    ratios: tuple[float, ...]
    criteria: tuple[str | None, ...] = (None,)  # None: slim's default for calibrated pruning
    int8: tuple[bool, ...] = (False,)
    task: str = "auto"
    thresholds: str = "mse"
    round_to: int = DEFAULT_ROUND_TO
    holdout: float = 0.25
    input_shapes: tuple[tuple[str, Shape], ...] = ()
    runs: int = 30  # interleaved timing rounds per point
    seed: int = 0
    relu: bool = False  # int8 points: LeakyRelu/PRelu made ReLU where nearly ReLU (see quantize)
    speedups: tuple[float, ...] = ()  # latency targets (slim --speedup), an axis beside the ratios

    def validate(self) -> None:
        if not self.ratios and not self.speedups:
            raise ConfigError("a sweep needs --ratios or --speedups (or both)")
        for s in self.speedups:
            SpeedTarget(s)  # one message for a bad value, as slim's
        for r in self.ratios:
            if not 0 <= r < 1:
                raise ConfigError(f"--ratios must be in [0, 1) (share of parameters removed), got {r}")
        for c in self.criteria:
            if c is not None and c not in DESCRIPTIONS:
                raise ConfigError(f"unknown criterion {c!r}; known: {', '.join(DESCRIPTIONS)}")
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.runs < 1:
            raise ConfigError(f"--runs must be at least 1, got {self.runs}")
        if self.relu and True not in self.int8:
            raise ConfigError("--relu only applies with --int8")


@dataclass(frozen=True)
class Point:
    model: str  # label: the model's file name
    model_hash: str
    ratio: float | None  # None: a speed-up point
    criterion: str | None
    int8: bool
    speedup: float | None = None

    def key(self, options: SweepOptions, calibration_hash: str) -> str:
        """Content address: the same model bytes, options and calibration give the same key."""
        spec = {"format": FORMAT, "model": self.model_hash, "ratio": self.ratio, "criterion": self.criterion,
                "int8": self.int8, "calibration": calibration_hash, "task": options.task,
                "thresholds": options.thresholds if self.int8 else None, "round_to": options.round_to,
                "holdout": options.holdout, "input_shapes": [list(map(str, kv)) for kv in options.input_shapes],
                "seed": options.seed}
        if options.relu and self.int8:  # only when set, so earlier sweeps' points keep their keys
            spec["relu"] = True
        if self.speedup is not None:
            spec["speedup"] = self.speedup
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return f"{self.model} {budget_text(self.ratio, self.speedup)} {self.criterion or 'default'}" + \
            (" int8" if self.int8 else "")


@dataclass
class SweepRow:
    """One point of the result table."""

    model: str
    ratio: float | None  # None: a speed-up point
    criterion: str
    int8: bool
    key: str
    speedup: float | None = None  # the point's --speedup target
    predicted_speedup: float | None = None
    status: str = "ok"  # ok | failed
    error: str | None = None
    achieved_ratio: float | None = None
    params: int | None = None
    macs: int | None = None
    size_bytes: int | None = None
    fidelity: float | None = None
    fidelity_metric: str | None = None
    latency_ratio: float | None = None  # compressed / original, median of interleaved rounds
    latency_iqr: float | None = None
    original_ms: float | None = None
    compressed_ms: float | None = None
    pareto: bool = False
    cached: bool = False  # reused from an earlier run
    output: str | None = None
    compute_seconds: float | None = None
    fidelity_detail: dict | None = None  # the full FidelityReport, as in slim's report (JSON only)


@dataclass(frozen=True)
class PointFailure:
    """A point that has no result, and why (one line)."""

    model: str
    ratio: float | None
    criterion: str
    int8: bool
    stage: str  # "compress" (slim, quantize, fidelity) or "timing"
    reason: str  # one line: "TypeName: message" ("timing: TypeName: message" at the timing stage)
    speedup: float | None = None

    def __str__(self) -> str:
        budget = f"ratio={self.ratio:g}" if self.speedup is None else f"speedup={self.speedup:g}"
        return (f"point {self.model} {budget} criterion={self.criterion} "
                f"int8={'yes' if self.int8 else 'no'}: {self.reason}")


_TIMING = "timing: "


@dataclass
class SweepResult:
    rows: list[SweepRow]
    executor: str
    workers: int
    outdir: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[PointFailure]:
        """The failed points, in row order; empty when every point has a result."""
        out = []
        for r in self.rows:
            if r.status == "ok":
                continue
            error = " ".join((r.error or "unknown error").split())  # one line, whatever the job raised
            stage = "timing" if error.startswith(_TIMING) else "compress"
            out.append(PointFailure(r.model, r.ratio, r.criterion, r.int8, stage, error, r.speedup))
        return out

    @property
    def ok(self) -> bool:
        """Every point has a result."""
        return all(r.status == "ok" for r in self.rows)

    @property
    def exit_code(self) -> int:
        """``onnxprune sweep``'s status: 0 when every point has a result, 1 when one failed."""
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "version": __version__, "kind": "sweep", "executor": self.executor, "workers": self.workers,
                "outdir": self.outdir, "seconds": self.seconds, "notes": self.notes,
                "rows": record_dict(self.rows)}

    def to_csv(self) -> str:
        buf = io.StringIO()
        names = [f for f in SweepRow.__dataclass_fields__ if f != "fidelity_detail"]
        w = csv.DictWriter(buf, fieldnames=names, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow(record_dict(r))
        return buf.getvalue()

    def summary(self) -> str:
        lines = [f"sweep: {len(self.rows)} points ({sum(r.cached for r in self.rows)} reused, "
                 f"{sum(r.status != 'ok' for r in self.rows)} failed) on {self.executor} "
                 f"({self.workers} workers) in {self.seconds:.1f} s; outputs in {self.outdir}",
                 f"{'model':<26s} {'target':>7s} {'criterion':<10s} {'int8':<4s} {'removed':>7s} {'fidelity':>8s} "
                 f"{'latency':>7s} {'size':>8s}  frontier"]
        for r in self.rows:
            if r.status != "ok":
                lines.append(f"{r.model[:26]:<26s} {budget_text(r.ratio, r.speedup):>7s} {r.criterion:<10s} "
                             f"{'yes' if r.int8 else 'no':<4s} FAILED: {r.error}")
                continue
            lat = f"{r.latency_ratio:.3f}" if r.latency_ratio is not None else "-"
            lines.append(f"{r.model[:26]:<26s} {budget_text(r.ratio, r.speedup):>7s} {r.criterion:<10s} "
                         f"{'yes' if r.int8 else 'no':<4s} "
                         f"{r.achieved_ratio:7.1%} {r.fidelity:8.4f} {lat:>7s} {r.size_bytes / 1e6:7.2f}M  "
                         f"{'*' if r.pareto else ''}")
        lines.append("fidelity: task metric on held-out calibration samples vs the original "
                     "(mean output cosine without a task); latency: compressed/original, 1 thread, median of "
                     "interleaved rounds; * = on the fidelity/latency Pareto frontier of its model; target: "
                     "r=share of parameters (--ratios) or s=speed-up (--speedups)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- jobs
@dataclass
class SweepInputs:
    """What every job reads, shipped once per worker or object-store put: models and calibration."""

    models: dict[str, bytes]  # hash -> ONNX bytes
    calibration: dict[str, CalibrationSet]  # hash -> that model's samples
    options: SweepOptions


def compute_point(inputs: SweepInputs, point: Point) -> dict[str, Any]:
    """slim (+ quantize) one point and measure it; returns the row fields and the model bytes."""
    from .compress import PruneOptions, QuantizeOptions, compress
    start = time.perf_counter()
    opts = inputs.options
    original = onnx.load_from_string(inputs.models[point.model_hash])
    calibration = inputs.calibration[point.model_hash]
    prune = PruneOptions(ratio=point.ratio, speedup=point.speedup, criterion=point.criterion, round_to=opts.round_to,
                         input_shapes=opts.input_shapes, workers=1)
    quant = QuantizeOptions(thresholds=opts.thresholds, relu=opts.relu) if point.int8 else None
    result = compress(original, prune=prune, quantize=quant, calibration=calibration, holdout=opts.holdout,
                      task=opts.task)
    final, fidelity = result.model, result.fidelity  # held out, end to end (int8 points: the int8 model)
    report = result.report.slim if point.int8 else result.report
    metric, value = fidelity.headline()
    data = final.SerializeToString()  # params and MACs below: the float graph's, a QDQ graph's are the same
    return {"achieved_ratio": report.achieved_ratio, "params": report.params_after, "macs": report.macs_after,
            "predicted_speedup": report.speed.predicted if report.speed is not None else None,
            "size_bytes": len(data), "fidelity": float(value), "fidelity_metric": metric,
            "fidelity_detail": _finite(fidelity.to_dict()),
            "compute_seconds": time.perf_counter() - start, "model_bytes": data}


def time_point(inputs: SweepInputs, item: tuple[str, str]) -> dict[str, float]:
    """Original and compressed (a file path) timed interleaved on one thread, alone on this node."""
    from .bench import interleaved_times, ratio_quartiles
    model_hash, path = item
    opts = inputs.options
    original = onnx.load_from_string(inputs.models[model_hash])
    calibration = inputs.calibration[model_hash]
    feeds = {calibration.name: calibration.samples()[:1]}
    times = interleaved_times([session(original, 1), session(path, 1)], feeds, opts.runs,
                              max(3, opts.runs // 10), opts.seed)
    q25, q50, q75 = ratio_quartiles(times[:, 1], times[:, 0])
    med = np.median(times, axis=0)
    return {"latency_ratio": q50, "latency_iqr": q75 - q25, "original_ms": float(med[0]),
            "compressed_ms": float(med[1])}


# ------------------------------------------------------------------------------------------------- driver
def plan(hashes: Mapping[str, str], options: SweepOptions) -> list[Point]:
    """Every (model, ratio, criterion, int8) combination, in a stable order; ``hashes``: name -> model hash."""
    budgets = [(float(r), None) for r in options.ratios] + [(None, float(s)) for s in options.speedups]
    return [Point(name, hashes[name], r, c, bool(q), s)
            for name, (r, s), c, q in itertools.product(hashes, budgets, options.criteria, options.int8)]


def sweep(models: Sequence[str | Path], calibration: CalibrationSet | Sequence[CalibrationSet], options: SweepOptions,
          outdir: str | Path, *, executor: TaskExecutor | None = None, progress: Progress | None = None) -> SweepResult:
    """Run (or resume) a sweep; returns the table with its Pareto frontier marked per model.

    ``calibration`` is one set for all models, or one per model (models with different inputs).
    A point that fails is a ``failed`` row (see :attr:`SweepResult.failures`), not an exception;
    bad input (options, an unreadable model) raises :class:`~onnxprune.errors.OnnxPruneError` first.
    """
    options.validate()
    if not models:
        raise ConfigError("sweep needs at least one model")
    start = time.perf_counter()
    say = progress or log_progress
    out = Path(outdir)
    try:
        (out / "points").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    inputs, hashes = _sweep_inputs(models, calibration, options)
    job = _Sweep(out, plan(hashes, options), inputs)
    todo_compute, todo_time = job.resume()
    own = executor is None
    pool = executor or LocalExecutor()
    notes = ["int8 points: LeakyRelu/PRelu after int8 convs made ReLU where nearly ReLU (--relu)"] if options.relu else []
    try:
        todo_time += job.compress(pool, todo_compute, say)
        job.time_points(pool, sorted(todo_time), say)
    finally:
        if own:
            pool.close()
    job.finish()
    result = SweepResult(job.rows, pool.name, pool.workers, str(out), time.perf_counter() - start, notes)
    write_text_atomic(json.dumps(result.to_dict(), indent=2, sort_keys=True), out / "sweep.json")
    write_text_atomic(result.to_csv(), out / "sweep.csv")
    return result


def _sweep_inputs(models: Sequence[str | Path], calibration: CalibrationSet | Sequence[CalibrationSet],
                  options: SweepOptions) -> tuple[SweepInputs, dict[str, str]]:
    """Every model read once (one clear error for a bad one, before any job runs) with its calibration
    set, keyed by content hash; and model name -> hash."""
    blobs: dict[str, bytes] = {}
    for m in models:
        proto = load_proto(m)
        name = Path(m).name
        if name in blobs:
            raise ConfigError(f"two models named {name}; rename one")
        blobs[name] = proto.SerializeToString()
    sets = [calibration] * len(models) if isinstance(calibration, CalibrationSet) else list(calibration)
    if len(sets) != len(models):
        raise ConfigError(f"{len(models)} models but {len(sets)} calibration sets")
    hashes = {name: hashlib.sha256(b).hexdigest() for name, b in blobs.items()}
    return SweepInputs({hashes[n]: b for n, b in blobs.items()}, dict(zip(hashes.values(), sets)), options), hashes


class _Sweep:
    """One sweep's points, their content keys and result rows, and the folder they are kept in."""

    def __init__(self, out: Path, points: list[Point], inputs: SweepInputs) -> None:
        self.out, self.points, self.inputs = out, points, inputs
        calib_hash = {h: _calibration_hash(c) for h, c in inputs.calibration.items()}
        self.keys = [p.key(inputs.options, calib_hash[p.model_hash]) for p in points]
        self.rows = [SweepRow(p.model, p.ratio, p.criterion or "default", p.int8, k, p.speedup)
                     for p, k in zip(points, self.keys)]

    def folder(self, i: int) -> Path:
        return self.out / "points" / self.keys[i]

    def resume(self) -> tuple[list[int], list[int]]:
        """Rows filled from what earlier runs completed; returns the points still to compute and to time."""
        todo_compute, todo_time = [], []
        for i in range(len(self.points)):
            state = _load_state(self.folder(i))
            if state.get("point"):
                _fill(self.rows[i], state["point"])
                self.rows[i].cached = True
            elif state.get("compute"):
                _fill(self.rows[i], state["compute"])
                self.rows[i].cached = True
                todo_time.append(i)
            else:
                todo_compute.append(i)
        return todo_compute, todo_time

    def compress(self, pool: TaskExecutor, todo: list[int], say: Progress) -> list[int]:
        """Compress the ``todo`` points on ``pool``, storing each as it arrives; returns those to time."""
        stage = f"compressing on {pool.name} ({pool.workers} workers)"
        if todo:
            say(stage, 0, len(todo))
        done = []
        for n, o in enumerate(pool.imap(compute_point, [self.points[i] for i in todo], self.inputs), 1):
            i = todo[o.index]
            say(stage, n, len(todo))
            if not o.ok:  # reported in the result (SweepResult.failures), not as a warning besides it
                log.info("sweep point %s failed: %s", self.points[i].label, o.error)
                self.rows[i].status, self.rows[i].error = "failed", o.error
                continue
            _store_compute(self.folder(i), o.value, self.points[i])
            _fill(self.rows[i], {k: v for k, v in o.value.items() if k != "model_bytes"})
            self.rows[i].output = str(self.folder(i) / "model.onnx")
            done.append(i)
        return done

    def time_points(self, pool: TaskExecutor, todo: list[int], say: Progress) -> None:
        """Time the ``todo`` points one at a time (``pool.timing``), storing each complete point."""
        timed = pool.timing(time_point, [(self.points[i].model_hash, self.rows[i].output or
                                          str(self.folder(i) / "model.onnx")) for i in todo], self.inputs,
                            progress=lambda d, n: say("timing, one point at a time", d, n))
        for i, o in zip(todo, timed):
            if not o.ok:
                log.info("sweep point %s failed: timing: %s", self.points[i].label, o.error)
                self.rows[i].status, self.rows[i].error = "failed", f"{_TIMING}{o.error}"
                continue
            _fill(self.rows[i], o.value)
            _store_point(self.folder(i), self.rows[i])

    def finish(self) -> None:
        """Every complete point's model path set, and the frontier marked."""
        for i, r in enumerate(self.rows):
            if r.status == "ok":
                r.output = str(self.folder(i) / "model.onnx")
        mark_pareto(self.rows)


def mark_pareto(rows: Sequence[SweepRow]) -> None:
    """Per model: a point is on the frontier when no other is at least as good in both and better in one."""
    ok = [r for r in rows if r.status == "ok" and r.fidelity is not None and r.latency_ratio is not None]
    for r in rows:
        r.pareto = r in ok and not any(
            o.model == r.model and o.fidelity >= r.fidelity and o.latency_ratio <= r.latency_ratio
            and (o.fidelity > r.fidelity or o.latency_ratio < r.latency_ratio) for o in ok)


def _calibration_hash(calibration: CalibrationSet) -> str:
    h = hashlib.sha256(calibration.name.encode())
    for b in calibration.batches:
        h.update(str(b.shape).encode() + str(b.dtype).encode())
        h.update(np.ascontiguousarray(b).tobytes())
    return h.hexdigest()


def _fill(row: SweepRow, values: Mapping[str, Any]) -> None:
    for k, v in values.items():
        if k in SweepRow.__dataclass_fields__ and k not in ("model", "ratio", "criterion", "int8", "key", "cached"):
            setattr(row, k, v)


def _load_state(folder: Path) -> dict[str, Any]:
    """What is complete in a point's folder; anything inconsistent counts as missing."""
    model = folder / "model.onnx"
    state: dict[str, Any] = {}
    try:
        compute = json.loads((folder / "compute.json").read_text())
        if not model.is_file() or hashlib.sha256(model.read_bytes()).hexdigest() != compute.get("model_sha256"):
            return {}
        state["compute"] = compute
        state["point"] = json.loads((folder / "point.json").read_text()) if (folder / "point.json").is_file() else None
    except (OSError, ValueError):
        return state
    return state


def _store_compute(folder: Path, value: Mapping[str, Any], point: Point) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "point.json").unlink(missing_ok=True)  # a stale timing must not outlive a recomputed model
    data = value["model_bytes"]
    write_bytes_atomic(data, folder / "model.onnx")
    record = {k: v for k, v in value.items() if k != "model_bytes"}
    record.update(model_sha256=hashlib.sha256(data).hexdigest(), point=record_dict(point))
    write_text_atomic(json.dumps(record, indent=2, sort_keys=True), folder / "compute.json")


def _store_point(folder: Path, row: SweepRow) -> None:
    write_text_atomic(json.dumps({k: v for k, v in record_dict(row).items() if k not in ("cached", "pareto")},
                                 indent=2, sort_keys=True), folder / "point.json")
