"""The one chain `slim`, `slim --int8`, `quantize` and `sweep` run: prune → quantize → end-to-end fidelity.

    import onnxprune
    from onnxprune.compress import PruneOptions, QuantizeOptions, compress
    calib = onnxprune.load_calibration("photos/", "retinaface.onnx")
    result = compress("retinaface.onnx", prune=PruneOptions(speedup=3.0), quantize=QuantizeOptions(relu=True),
                      calibration=calib)
    result.save("retinaface.fast.onnx"); print(result.report.summary())

Options are frozen dataclasses checked when they are made, so a bad value fails before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from .budget.target import SpeedTarget, check_stages, measure_speedup
from .calibration import CalibrationSet
from .calibration.split import CalibrationSplit
from .errors import ConfigError
from .executors import TaskExecutor
from .fidelity import FidelityReport
from .graph.io import ModelLike, load_proto, save_atomic
from .graph.shapes import Shape
from .int8 import QuantizeOptions, quantize as quantize_model  # noqa: F401 - QuantizeOptions lives in int8.py
from .passes.sparsify import check_sparsity
from .plan import Plan
from .pipeline import DEFAULT_ROUND_TO, check_options, slim, sparsity_report
from .progress import Progress, log_progress
from .report import CombinedReport


@dataclass(frozen=True)
class PruneOptions:
    """How channels are removed: exactly one of ``ratio`` (share of parameters) and ``speedup``
    (latency original/compressed on ``providers`` with ``threads``; with quantization, of the int8 model)."""

    ratio: float | None = None
    speedup: float | None = None
    stages: int | None = None  # None: 1 with ratio; with speedup, enough that none buys more than 2x
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 1
    strict: bool = False  # an unreachable speed-up is an error (nothing written)
    criterion: str | None = None
    round_to: int = DEFAULT_ROUND_TO
    exclude: tuple[str, ...] = ()
    input_shapes: tuple[tuple[str, Shape], ...] = ()
    min_keep: float = 0.1
    simplify: bool = True
    allocation: str = "auto"
    recover: bool | None = None
    finetune_steps: int = 0
    seed: int = 0  # distillation's batches and augmentation
    sparsity: float = 0.0
    workers: int = 2

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.speedup is None):
            raise ConfigError("give exactly one of --ratio (share of parameters to remove) and --speedup "
                              "(latency target)")
        if self.speedup is not None:
            SpeedTarget(self.speedup, self.providers, self.threads)
        check_options(self.ratio or 0.0, self.round_to, self.min_keep, self.allocation, "auto", 0.0)
        check_sparsity(self.sparsity)
        check_stages(self.stages)
        if self.finetune_steps < 0:
            raise ConfigError(f"--finetune-steps must be >= 0, got {self.finetune_steps}")

    def target(self, quantize: QuantizeOptions | None) -> SpeedTarget | None:
        if self.speedup is None:
            return None
        return SpeedTarget(self.speedup, self.providers, self.threads, int8=quantize is not None, strict=self.strict,
                           relu=quantize is not None and quantize.relu)


@dataclass
class CompressResult:
    """The compressed model, its report (slim, quantize, or both with the end-to-end fidelity)."""

    model: onnx.ModelProto
    report: Any  # SlimReport | QuantizeReport | CombinedReport
    preview: str = ""
    external_data: bool | None = None
    fidelity: FidelityReport | None = None  # held-out, against the original: end to end
    plan: Plan | None = None  # the pruning, replayable (``onnxprune.plan.apply_plan``)

    def save(self, path: str | Path, *, protect: Sequence[str | Path] = ()) -> Path:
        return save_atomic(self.model, path, protect=[Path(p) for p in protect], external_data=self.external_data)


def compress(model: ModelLike, *, prune: PruneOptions | None = None, quantize: QuantizeOptions | None = None,
             calibration: CalibrationSet | None = None, holdout: float = 0.25, task: str = "auto",
             identities: tuple[np.ndarray, list[str]] | None = None, executor: TaskExecutor | None = None,
             progress: Progress | None = None) -> CompressResult:
    """Prune (``prune``), then quantize (``quantize``, needs ``calibration``), then measure the
    result against the original on the held-out samples. An int8 speed target is timed on the int8 model."""
    if prune is None and quantize is None:
        raise ConfigError("nothing to do: give prune and/or quantize options")
    if quantize is not None and calibration is None:
        raise ConfigError("int8 quantization needs calibration data (--calib)")
    say = progress or log_progress
    if prune is None:
        q = _quantize(model, calibration, quantize, holdout, task, say)
        return CompressResult(q.model, q.report, q.preview, fidelity=None)
    result = slim(model, prune.ratio, speedup=prune.target(quantize), stages=prune.stages,
                  criterion=prune.criterion, round_to=prune.round_to, exclude=prune.exclude,
                  input_shapes=dict(prune.input_shapes) or None, min_keep=prune.min_keep, simplify=prune.simplify,
                  calibration=calibration, allocation=prune.allocation, recover=prune.recover, holdout=holdout,
                  task=task, workers=prune.workers, finetune_steps=prune.finetune_steps, seed=prune.seed,
                  identities=identities, executor=executor, sparsity=prune.sparsity, progress=say)
    if quantize is None:
        return CompressResult(result.model, result.report, result.preview, result.external_data, result.fidelity,
                              result.plan)
    q = _quantize(result.model, calibration, quantize, holdout, task, say)
    say("end-to-end fidelity")
    original = load_proto(model)
    end_to_end = CalibrationSplit.held_out_fidelity(calibration, holdout, result.report.input_shapes, original,
                                                    q.model, task)
    report = CombinedReport(result.report, q.report, end_to_end)
    if result.report.sparsity is not None:  # symmetric int8 weights keep zeros zero; measured, not assumed
        report.sparsity = sparsity_report(q.model, result.report.sparsity)
    if result.report.speed is not None:
        say("measuring the speed-up of the int8 model")
        _measure_int8(result.report, original, q.model)
    return CompressResult(q.model, report, q.preview or result.preview, fidelity=end_to_end, plan=result.plan)


def _quantize(model: ModelLike | onnx.ModelProto, calibration: CalibrationSet, options: QuantizeOptions,
              holdout: float, task: str, say: Progress):
    return quantize_model(model, calibration, options, holdout=holdout, task=task, progress=say)


def _measure_int8(report, original: onnx.ModelProto, int8_model: onnx.ModelProto) -> None:
    """An int8 speed target is measured on the int8 model, against the float original."""
    speed = report.speed
    target = SpeedTarget(speed.target, tuple(speed.providers), speed.threads, int8=True)
    shapes: Mapping[str, tuple] = {k: tuple(v) for k, v in report.input_shapes.items()}
    m = measure_speedup(original, int8_model, shapes, target)
    speed.measured, speed.original_ms, speed.compressed_ms = m.speedup, m.original_ms, m.compressed_ms
