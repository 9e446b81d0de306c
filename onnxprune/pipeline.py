"""The one-way flow every entry point shares: load → prepare → analyse → score → rewrite → verify → report.

The CLI and the Python API are thin layers over :func:`slim` and :func:`analyze`.
"""

from __future__ import annotations

import time
import warnings

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from .budget.speed import CostModel, LatencyCounter
from .budget.target import SpeedTarget, auto_stages, check_stages, measure_speedup
from .calibration import CalibrationSet
from .calibration.split import CalibrationSplit, check_task
from .bench import netscore
from .fidelity import TASKS, FidelityReport
from .finetune import DistillOptions, DistillRecord, distill
from .channels.analysis import ChannelAnalysis, analyze_channels
from .errors import ConfigError, NothingToPruneError, TargetUnreachableError
from .executors import TaskExecutor
from .graph.interface import restore_interface
from .graph.io import ModelLike, ModelSource, materialize, save_atomic, stored_size
from .graph.metrics import count_macs, count_nonzero_params, count_params, weight_zeros
from .memory import release_memory
from .graph.shapes import Shape, infer_concrete_shapes, representative_shapes
from .passes import Cleanup, FoldBatchNorm, prelu_split, run_composed
from .plan import Plan, make_plan
from .passes.sparsify import SparsifyRecord, check_sparsity, sparsify
from .quantization.qdq import check_not_quantized
from .progress import Progress, log_progress
from .report import (AnalysisReport, GroupReport, LayerReport, RefitReport, SensitivityReport, SlimReport,
                     SparseLayerReport, SparsityReport, SpeedReport, StageReport)
from .saliency.criteria import NEEDS_CALIBRATION, get_criterion
from .stages import LatencyBudget, ParamBudget, Stage, StageContext, run_stage
from .verify import verify

# Channel counts are kept multiples of this by default: see benchmarks/channel_rounding.py and README.
DEFAULT_ROUND_TO = 16
DEFAULT_CRITERION = "l2"  # without calibration data
CALIBRATED_CRITERION = "activation"  # with it
TOLERANCE = 0.01  # the achieved ratio lands within ±1% of parameters of the target
# Above this much weight onnxsim is skipped: it copies the model several times (and this onnxsim
# build imports torch, another 250 MB); 65M-parameter recognizers must stay under 3x their size.
ONNXSIM_MAX_BYTES = 128 * 2**20



@dataclass
class Prepared:
    """A model in the canonical form the analysis reads, with what preparing it took."""

    source: ModelSource  # the model as given, weights not loaded (memory-mapped from a path)
    model: ir.Model
    input_shapes: dict[str, Shape]
    shapes: dict[str, Shape]
    bn_gamma: dict[str, np.ndarray]
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def skeleton(self) -> onnx.ModelProto:
        """The original graph and interface without its large weights: for counts, shapes, interface."""
        return self.source.skeleton

    @cached_property
    def original(self) -> onnx.ModelProto:
        """The original with every weight in memory, loaded on first use (fidelity runs, distillation)."""
        return self.source.proto()

    def release_model(self) -> None:
        """Drop the working model and its weights once the output exists (before the verification sessions)."""
        self.model = None  # type: ignore[assignment]
        release_memory()


@dataclass
class SlimResult:
    """The pruned model and the report of how it was made."""

    model: onnx.ModelProto
    report: SlimReport
    preview: str = ""  # SVG of detections on a held-out photo (detectors with calibration data)
    external_data: bool | None = None  # save weights beside the model (None: only if too big for one protobuf)
    fidelity: FidelityReport | None = None  # held-out fidelity (the same object as ``report.fidelity``)
    plan: Plan | None = None  # the kept channels, replayable on the same architecture (``apply_plan``)

    def save(self, path: str | Path, *, protect: Sequence[str | Path] = ()) -> Path:
        return save_atomic(self.model, path, protect=[Path(p) for p in protect], external_data=self.external_data)


def _name(model: ModelLike) -> str:
    return str(model) if isinstance(model, (str, Path)) else "<in-memory model>"


def prepare(model: ModelLike, *, input_shapes: Mapping[str, Shape] | None = None, simplify: bool = True,
            progress: Progress | None = None) -> Prepared:
    """Load and canonicalise: onnxsim, lifted constants, no Identity, BN folded (γ kept)."""
    say = progress or log_progress
    source = ModelSource(model)
    check_not_quantized(source.skeleton, "prune")
    shapes_in = representative_shapes(source.skeleton, input_shapes)
    steps, notes = [], []
    if simplify and source.weight_bytes > ONNXSIM_MAX_BYTES:
        steps.append("onnxsim skipped")
        notes.append(f"onnxsim skipped: {source.weight_bytes / 2**20:.0f} MiB of weights is above "
                     f"{ONNXSIM_MAX_BYTES // 2**20} MiB (onnxsim holds several copies of the model); "
                     "the graph is still cleaned up and BatchNorm folded")
        simplify = False
    if simplify:
        say("simplifying with onnxsim")
        proto, note = _simplify(source.proto())
        steps.append("onnxsim" if note is None else "onnxsim skipped")
        if note:
            notes.append(note)
        m = ir.from_proto(proto)
    else:
        m = source.ir_model()  # from a path: external weights memory-mapped, read when a pass needs them
    say("canonicalising graph")
    clean, fold = Cleanup(), FoldBatchNorm()
    m = run_composed(ir.passes.PassManager([clean, fold]), m).model  # each pass keeps its record
    steps += [f"cleanup: {p}" for p in clean.record.passes]
    if fold.record.folded:
        steps.append(f"folded {len(fold.record.folded)} BatchNormalization into Conv")
    materialize(m)  # the weights folding did not replace: read once, then the input's file is unmapped
    release_memory()  # the graphs before folding still hold the unfolded weights
    say("inferring shapes")
    shapes = infer_concrete_shapes(m, shapes_in)
    return Prepared(source, m, shapes_in, shapes, fold.record.gamma, steps, notes)


def _simplify(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    try:
        import onnxsim
    except ImportError:
        return proto, "onnxsim is not installed; continuing without simplification"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, ok = onnxsim.simplify(proto, check_n=0, skip_fuse_bn=True)
    except Exception as exc:  # onnxsim fails on some exotic graphs; the analysis copes without it
        return proto, f"onnxsim could not simplify the model ({type(exc).__name__}); continuing without it"
    if not ok:
        return proto, "onnxsim check failed; continuing without simplification"
    return out, None


def analyze(model: ModelLike, *, input_shapes: Mapping[str, Shape] | None = None, exclude: Sequence[str] = (),
            simplify: bool = True, progress: Progress | None = None) -> AnalysisReport:
    """Which channel groups a model has, which are prunable, and why the others are not."""
    prep = prepare(model, input_shapes=input_shapes, simplify=simplify, progress=progress)
    analysis = analyze_channels(prep.model, prep.shapes, exclude)
    groups = _group_reports(analysis)
    warns = prep.warnings + [f"--exclude {p!r} matched no node" for p in analysis.unmatched_excludes]
    return AnalysisReport(
        model=_name(model), input_shapes={k: list(v) for k, v in prep.input_shapes.items()},
        params=count_params(prep.skeleton),
        macs=count_macs(prep.skeleton, infer_concrete_shapes(prep.skeleton, prep.input_shapes)),
        groups=groups, prunable_channels=sum(g.channels for g in groups if g.prunable),
        total_channels=sum(g.channels for g in groups), preprocessing=prep.steps, warnings=warns)


def _group_reports(analysis: ChannelAnalysis) -> list[GroupReport]:
    out = []
    for g in analysis.groups:
        prunable = any(analysis.units[u].prunable for u in g.units)
        out.append(GroupReport(g.id, g.layers, len(g.units), prunable, [] if prunable else g.reasons))
    return out


def slim(model: ModelLike, ratio: float | None = None, *, speedup: float | SpeedTarget | None = None,
         stages: int | None = None, criterion: str | None = None, round_to: int = DEFAULT_ROUND_TO,
         exclude: Sequence[str] = (), input_shapes: Mapping[str, Shape] | None = None, min_keep: float = 0.1,
         simplify: bool = True, calibration: CalibrationSet | None = None, allocation: str = "auto",
         recover: bool | None = None, holdout: float = 0.25, task: str = "auto", workers: int = 2,
         finetune_steps: int = 0, seed: int = 0, identities: tuple[np.ndarray, list[str]] | None = None,
         executor: TaskExecutor | None = None, sparsity: float = 0.0, latency_cache: Path | None | str = "default",
         cost_model: CostModel | None = None, progress: Progress | None = None) -> SlimResult:
    """Remove whole channels: about ``ratio`` of the parameters, or as many as make it ``speedup`` times
    faster (exactly one; a :class:`~onnxprune.budget.target.SpeedTarget` also names EP, threads, int8,
    strictness). Speed is budgeted in ms from a per-layer cost model measured in ONNX Runtime
    (``budget/latency.py``; ``latency_cache=None``: in memory; ``cost_model`` replaces it).
    ``stages``: prune in that many steps, each recovered before the next is scored.

    With ``calibration`` (see :func:`onnxprune.calibration.load_calibration`): activation scores, a
    per-group sensitivity scan, mean compensation, a least-squares refit, and held-out fidelity;
    ``finetune_steps`` then distils from the original (PyTorch; augmented with ``seed``, keep-best on
    the held-out samples: ``finetune.py``). ``sparsity``: that share of the remaining weights zeroed
    and refitted (``passes/sparsify.py``). Without data, weight criteria only.

    Returns the smaller model (same interface) and a report; bad input raises
    :class:`~onnxprune.errors.OnnxPruneError` subclasses. See docs/architecture.md for the stages.
    """
    start = time.perf_counter()
    target = _speed_target(ratio, speedup)
    ratio = 0.0 if target is not None else ratio
    check_options(ratio, round_to, min_keep, allocation, task, holdout)
    check_sparsity(sparsity)
    check_stages(stages)
    criterion = criterion or (CALIBRATED_CRITERION if calibration is not None else DEFAULT_CRITERION)
    _check_calibration_needs(calibration, criterion, recover, finetune_steps)
    say = progress or log_progress
    prep = prepare(model, input_shapes=input_shapes, simplify=simplify, progress=say)
    prelu_note = fast_prelu(prep) if target is not None and not target.int8 else ""
    analysis, warns = _analysed(prep, exclude, ratio > 0 or target is not None, say)
    calib = _split(calibration, holdout, prep, task, identities, warns)
    params_in = count_params(prep.skeleton)
    mode = ("sensitivity" if calib is not None else "uniform") if allocation == "auto" else allocation
    if mode == "sensitivity" and calib is None and (ratio > 0 or target is not None):
        raise ConfigError("--allocation sensitivity needs calibration data (--calib)")
    distill = DistillOptions(finetune_steps, task=task if task in ("detection", "embedding") else "auto",
                             seed=seed) if finetune_steps and calib is not None else None
    ctx = StageContext(prep.model, calib, get_criterion(criterion), criterion, prep.bn_gamma, mode, round_to, min_keep,
                       int(TOLERANCE * params_in), recover is None or recover, executor, workers, say, distill)
    cost = (cost_model or _cost_model(prep, target, latency_cache, say)) if target is not None else None
    done = _run_stages(ctx, prep, analysis, ratio, params_in, target, cost, stages, task, warns)
    warns += _stage_warnings(prep, criterion, round_to, done.stages[-1].round_to)
    plan = make_plan(prep.model, prep.input_shapes, done.keep, ("prelu-max",) if prelu_note else ())
    pruned, record_sparse, dense_size = _output(prep, done, sparsity, exclude, calib, recover, executor, workers,
                                                say, warns)
    say("verifying the output model")
    check = verify(prep.source.runtime_model(), pruned, prep.input_shapes)
    fidelity = calib.evaluate(prep.original, pruned, task) if calib is not None else None
    speed = _speed_report(prep, pruned, target, cost, done, prelu_note, warns, say) if target is not None else None
    report = _slim_report(model, prep, pruned, done, criterion, ratio, params_in, round_to, exclude, check, warns,
                          mode, calib, fidelity, record_sparse, dense_size, speed, start)
    return SlimResult(pruned, report, calib.preview if calib is not None else "",
                      external_data=prep.source.external or None, fidelity=fidelity, plan=plan)


def _analysed(prep: Prepared, exclude: Sequence[str], pruning: bool, say: Progress) -> tuple[ChannelAnalysis, list[str]]:
    """The channel groups of the prepared model, and the warnings so far; refuses a model with nothing to prune."""
    say("analysing channel dependencies")
    analysis = analyze_channels(prep.model, prep.shapes, exclude)
    warns = prep.warnings + [f"--exclude {p!r} matched no node" for p in analysis.unmatched_excludes]
    if pruning and not analysis.prunable_units:
        reasons = sorted({r for g in analysis.groups for r in g.reasons})
        raise NothingToPruneError("no prunable channel in the model" + (f" ({reasons[0]})" if reasons else ""))
    return analysis, warns


def _split(calibration: CalibrationSet | None, holdout: float, prep: Prepared, task: str,
           identities: tuple[np.ndarray, list[str]] | None, warns: list[str]) -> CalibrationSplit | None:
    if calibration is None:
        warns.append("no calibration data: channels chosen by weights only, no recovery (use --calib)")
        return None
    calib = CalibrationSplit.split(calibration, holdout, prep.input_shapes)
    check_task(prep.original, calibration, task)  # before any expensive work; refuses a batch fixed above 1
    calib.identities = identities
    return calib


def _stage_warnings(prep: Prepared, criterion: str, round_to: int, used_round_to: int) -> list[str]:
    warns = []
    if criterion in ("bn", "double") and not prep.bn_gamma and not any(
            n.op_type == "BatchNormalization" for n in prep.model.graph):
        warns.append(f"criterion {criterion}: the model has no BatchNormalization (folded at export?); "
                     "BN-γ is unavailable, L2 magnitude was used")
    if used_round_to != round_to:
        warns.append(f"--round-to {round_to} cannot reach the target on this model; used {used_round_to} "
                     "(layers narrower than the rounding cannot shrink)")
    return warns


def _output(prep: Prepared, done: "_Staged", sparsity: float, exclude: Sequence[str], calib: CalibrationSplit | None,
            recover: bool | None, executor: TaskExecutor | None, workers: int, say: Progress, warns: list[str]
            ) -> tuple[onnx.ModelProto, SparsifyRecord | None, tuple[int, int] | None]:
    """The output model with the original interface (sparsified with ``sparsity``); the working model is freed."""
    pruned_ir, record_sparse, dense_size = done.model, None, None
    if sparsity:
        pruned_ir, record_sparse, dense_size = _sparsify(prep, pruned_ir, sparsity, exclude, done.keep, calib, recover,
                                                         executor, workers, say, warns)
    prep.release_model()  # last use of the working model: free its weights before the output is serialised
    pruned = restore_interface(ir.to_proto(pruned_ir), prep.skeleton)
    del pruned_ir
    done.model = None  # type: ignore[assignment]
    release_memory()
    return pruned, record_sparse, dense_size


def fast_prelu(prep: Prepared) -> str:
    """Float speed targets: PRelu as Max(y, a·y) (exact; ORT's float PRelu kernel is several times
    slower, e.g. 58% of MobileFaceNet's time). Returns what was done, as a preparation step ("": nothing)."""
    prep.model, record = prelu_split(prep.model, absorb=frozenset())
    if not record.rewritten:
        return ""
    note = (f"{len(record.rewritten)} PRelu rewritten exactly as Max/Min with a per-channel Mul "
            "(ONNX Runtime's float PRelu kernel is slow)")
    prep.steps.append(note)
    prep.shapes = infer_concrete_shapes(prep.model, prep.input_shapes)
    return note


def _speed_target(ratio: float | None, speedup: float | SpeedTarget | None) -> SpeedTarget | None:
    if (ratio is None) == (speedup is None):
        raise ConfigError("give exactly one of --ratio (share of parameters to remove) and --speedup (latency target)")
    if speedup is None or isinstance(speedup, SpeedTarget):
        return speedup
    return SpeedTarget(speedup)


def _check_calibration_needs(calibration: CalibrationSet | None, criterion: str, recover: bool | None,
                             finetune_steps: int) -> None:
    get_criterion(criterion)  # an unknown criterion is refused before any work
    if calibration is None:  # before any work: these options cannot run without data
        if criterion in NEEDS_CALIBRATION:
            raise ConfigError(f"criterion {criterion} needs calibration data (--calib)")
        if recover:
            raise ConfigError("--recover needs calibration data (--calib)")
        if finetune_steps:
            raise ConfigError("--finetune-steps needs calibration data (--calib)")


@dataclass
class _Staged:
    """The stages run, and the model (and per-layer kept outputs) they left."""

    model: ir.Model
    stages: list[Stage]
    keep: dict[str, np.ndarray]
    finetune: DistillRecord | None = None
    reports: list[StageReport] = field(default_factory=list)
    retarget: float | None = None  # the cost-model target of the last stage, corrected by a measurement


def _run_stages(ctx: StageContext, prep: Prepared, analysis: ChannelAnalysis, ratio: float, params_in: int,
                target: SpeedTarget | None, cost, n_stages: int | None, task: str, warns: list[str]) -> _Staged:
    """Prune in ``n_stages`` steps (None: 1 for a ratio; for a speed-up, enough that no stage buys
    more than 2x beyond what int8 and exact rewrites give unpruned); after each, refit (in the
    stage), distil, and measure held-out fidelity."""
    model, keep, stages, reports, finetune, retarget = prep.model, None, [], [], None, None
    if target is not None:
        start = cost.reference_ms / cost.predict({})  # int8 and exact rewrites alone
        n_stages = n_stages or auto_stages(target.speedup / start)
        goals = target.stage_targets(n_stages, start)
    else:
        n_stages = n_stages or 1
        goals = [ratio * (k + 1) / n_stages for k in range(n_stages)]
    reference_ms = cost.reference_ms if cost is not None else None
    for k, goal in enumerate(goals):
        if k:
            ctx.say(f"stage {k + 1} of {n_stages}: analysing the pruned model")
            analysis = analyze_channels(model, infer_concrete_shapes(model, prep.input_shapes), ())
        if target is not None:
            budget = LatencyBudget(cost, cost.reference_ms, goal)
        else:
            already = params_in - analysis.total_params()  # preparation (BN, constants) and earlier stages
            budget = ParamBudget(max(0, int(round(goal * params_in)) - already) if goal > 0 else 0)
        stage = run_stage(ctx, model, analysis, budget, keep)
        if target is not None and not target.int8 and target.retries and k == n_stages - 1:
            stage, retarget = _measured_retry(ctx, prep, model, analysis, budget, keep, stage, target)
        stages.append(stage)
        model, keep = stage.model, stage.keep
        if ctx.distill is not None:
            steps = ctx.distill.steps // n_stages + (k < ctx.distill.steps % n_stages)
            model, finetune = _distill(ctx, prep, model, keep, steps, finetune, warns)
        if n_stages > 1:
            reports.append(_stage_report(k, n_stages, goal, reference_ms, prep, model, stage, ctx, task))
    return _Staged(model, stages, keep or {}, finetune, reports, retarget)


RETRY_TOLERANCE = 0.1  # a float speed target measured more than 10% off: the last stage is re-allocated


def _measured_retry(ctx: StageContext, prep: Prepared, model: ir.Model, analysis: ChannelAnalysis,
                    budget: LatencyBudget, keep, stage: Stage, target: SpeedTarget) -> tuple[Stage, float | None]:
    """Close the loop: time the last stage's result; while it misses the target by more than
    :data:`RETRY_TOLERANCE` (the cost model mispredicts some models: small, overhead-bound ones run
    faster than predicted), bisect the cost-model target of the stage's allocation on the measured
    speed-up (scores and scan reused), at most ``target.retries`` times. Keeps the candidate that meets
    the target most closely (else the fastest)."""
    goal = budget.speedup
    lo, hi = budget.reference_ms / LatencyCounter(model, analysis, budget.cost).total, None
    t, best = goal, None
    for attempt in range(target.retries + 1):
        measured = _measure(ctx, prep, stage, target)
        best = _closer(best, (stage, t, measured), goal)
        at_floor = budget.reference_ms / stage.predicted_ms < t * 0.99  # the allocation fell short of its own target
        if abs(measured / goal - 1) <= RETRY_TOLERANCE or attempt == target.retries or (measured < goal and at_floor):
            break
        if measured > goal:
            hi = t
        else:
            lo = t
        t = (lo * hi) ** 0.5 if hi is not None else t * goal / max(measured, 1e-9)
        ctx.say(f"measured {measured:.2f}x for the target {goal:g}x: re-allocating for a predicted {t:.2f}x")
        stage = run_stage(ctx, model, analysis, LatencyBudget(budget.cost, budget.reference_ms, t), keep, again=stage)
    chosen, t, _ = best
    return chosen, (t if t != goal else None)


def _measure(ctx: StageContext, prep: Prepared, stage: Stage, target: SpeedTarget) -> float:
    ctx.say("measuring the speed-up")
    proto = restore_interface(ir.to_proto(stage.model), prep.skeleton)
    return measure_speedup(prep.source.runtime_model(), proto, prep.input_shapes, target).speedup


def _closer(best, candidate, goal: float):
    """The better of two (stage, target, measured): meeting ``goal`` beats missing it; then closer to it."""
    if best is None:
        return candidate
    key = lambda c: (c[2] < goal * (1 - RETRY_TOLERANCE / 2), abs(c[2] / goal - 1))  # noqa: E731
    return candidate if key(candidate) < key(best) else best


def _distill(ctx: StageContext, prep: Prepared, model: ir.Model, keep: dict[str, np.ndarray] | None, steps: int,
             previous: DistillRecord | None, warns: list[str]) -> tuple[ir.Model, DistillRecord]:
    """Distil on the fitting samples (augmented; outputs and feature maps of the prepared original);
    the held-out samples keep the best weights, so a model is never handed back worse than it came."""
    calib = ctx.calib
    tuned, record = distill(prep.original, model, calib.input_name, calib.batches, replace(ctx.distill, steps=steps),
                            held=calib.held, reference=ctx.reference, keep=keep, progress=ctx.say)
    if previous is not None:
        record = replace(record, steps=previous.steps + record.steps)
    if record.improved():
        return tuned, record
    warns.append("distillation did not lower the loss on the held-out samples; kept the refitted model")
    return model, record


def _sparsify(prep: Prepared, model: ir.Model, sparsity: float, exclude: Sequence[str], keep: dict[str, np.ndarray],
              calib: CalibrationSplit | None, recover: bool | None, executor: TaskExecutor | None, workers: int,
              say: Progress, warns: list[str]) -> tuple[ir.Model, SparsifyRecord, tuple[int, int]]:
    # The file slim writes without --sparsity, measured: what the zeros are compared with.
    dense_size = stored_size(restore_interface(ir.to_proto(model), prep.skeleton),
                             external_data=prep.source.external or None)
    say(f"zeroing {sparsity:.0%} of the remaining weights")
    model, record = sparsify(
        model, sparsity, exclude=exclude, reference=prep.model, keep_out=keep,
        input_name=calib.input_name if calib is not None else None,
        batches=calib.batches if calib is not None else None,
        scan_batches=calib.scan_batches if calib is not None else None, refit=recover is None or recover,
        executor=executor, workers=workers, progress=say)
    if calib is None:
        warns.append("--sparsity without calibration data: the same share of every layer zeroed by magnitude, "
                     "not refitted (use --calib)")
    return model, record, dense_size


def _cost_model(prep: Prepared, target: SpeedTarget, cache: Path | None | str, say: Progress) -> CostModel:
    """The latency cost model of the prepared original on the target (per-layer times measured or cached)."""
    from .budget.latency import LatencyModel, LatencyTable, LatencyTarget, int8_form

    table = LatencyTable(LatencyTarget(target.providers, target.threads, target.int8),
                         **({} if cache == "default" else {"cache": None if cache is None else Path(cache)}))
    say("measuring layer latencies (cached for the next run)")
    int8_model = int8_form(ir.to_proto(prep.model), prep.input_shapes, say, relu=True) if target.relu else None
    reference = prep.source.runtime_model() if not target.int8 else None  # the float original, as given
    return LatencyModel(prep.model, prep.input_shapes, table, reference=reference, int8_model=int8_model,
                        progress=say)


def _speed_report(prep: Prepared, pruned: onnx.ModelProto, target: SpeedTarget, cost: CostModel, done: _Staged,
                  prelu_note: str, warns: list[str], say: Progress) -> SpeedReport:
    predicted = cost.reference_ms / done.stages[-1].predicted_ms
    if predicted < (done.retarget or target.speedup) * 0.99:
        line = (f"--speedup {target.speedup:g} is out of reach: the cost model predicts {predicted:.2f}x with every "
                "prunable layer at its floor (--min-keep, --round-to, unprunable or --exclude'd layers)")
        if target.strict:
            raise TargetUnreachableError(line + "; nothing written (--strict)")
        warns.append(line)
    measured = None
    if not target.int8:  # an int8 target is measured on the int8 model (slim --int8 / compress)
        # Timed afresh even after the retries: their readings chose the candidate, so they are biased.
        say("measuring the speed-up")
        measured = measure_speedup(prep.source.runtime_model(), pruned, prep.input_shapes, target)
    return SpeedReport(target=target.speedup, providers=list(target.providers), threads=target.threads,
                       int8=target.int8, predicted=predicted, measured=measured.speedup if measured else None,
                       original_ms=measured.original_ms if measured else cost.reference_ms,
                       compressed_ms=measured.compressed_ms if measured else None,
                       stages=list(done.reports), rewrites=[prelu_note] if prelu_note else [],
                       retarget=done.retarget)


def _stage_report(k: int, n: int, goal: float, reference_ms: float | None, prep: Prepared, model: ir.Model,
                  stage: Stage, ctx: StageContext, task: str) -> StageReport:
    proto = restore_interface(ir.to_proto(model), prep.skeleton)
    fidelity = ctx.calib.evaluate(prep.original, proto, task) if ctx.calib is not None else None
    head = fidelity.headline() if fidelity is not None else None
    ctx.say(f"stage {k + 1} of {n}: " + (f"{head[0]} {head[1]:.3f} held out" if head else "done"))
    predicted = reference_ms / stage.predicted_ms if reference_ms and stage.predicted_ms else None
    return StageReport(stage=k + 1, target=goal, kind="ratio" if reference_ms is None else "speedup",
                       params=count_params(proto), units_removed=len(stage.alloc.removed),
                       predicted_speedup=predicted, fidelity=f"{head[0]} {head[1]:.4f}" if head else "",
                       fidelity_value=head[1] if head else None)


def _slim_report(model: ModelLike, prep: Prepared, pruned: onnx.ModelProto, done: _Staged, criterion: str, ratio: float,
                 params_in: int, round_to: int, exclude: Sequence[str], check, warns: list[str], mode: str,
                 calib: CalibrationSplit | None, fidelity: FidelityReport | None, record_sparse, dense_size,
                 speed: SpeedReport | None, start: float) -> SlimReport:
    params_out = count_params(pruned)
    achieved = 1 - params_out / params_in if params_in else 0.0
    if ratio > 0 and abs(achieved - ratio) > TOLERANCE:
        warns.append(f"achieved {achieved:.1%} of parameters removed, target {ratio:.1%}: "
                     "not enough prunable channels at this --round-to / --exclude")
    shapes_out = infer_concrete_shapes(pruned, prep.input_shapes)
    first, last = done.stages[0], done.stages[-1]
    layers = _layer_widths(done.stages)
    return SlimReport(
        model=_name(model), output=None, criterion=criterion, target_ratio=float(ratio if speed is None else achieved),
        achieved_ratio=achieved, params_before=params_in, params_after=params_out,
        macs_before=count_macs(prep.skeleton, infer_concrete_shapes(prep.skeleton, prep.input_shapes)),
        macs_after=count_macs(pruned, shapes_out), round_to=last.round_to,
        input_shapes={k: list(v) for k, v in prep.input_shapes.items()},
        layers=layers, unprunable=[g for g in _group_reports(first.analysis) if not g.prunable],
        excluded=list(exclude), output_rel_error=check.output_rel_error, preprocessing=prep.steps,
        folded_biases=sum(s.record.folded_biases for s in done.stages),
        inexact_folds=sum(s.record.inexact_folds for s in done.stages), warnings=warns,
        seconds=time.perf_counter() - start, allocation=mode,
        calibration=calib.describe() if calib is not None else None,
        sensitivity=_sensitivity_report(first),
        refits=[RefitReport(f.node, f.error_before, f.error_after) for f in last.refits],
        fidelity=fidelity,
        fidelity_summary=fidelity.summary() if fidelity is not None else "",
        finetune=done.finetune,
        sparsity=sparsity_report(pruned, record_sparse, fidelity, count_macs(pruned, shapes_out), dense_size=dense_size,
                                 external_data=prep.source.external or None) if record_sparse is not None else None,
        speed=speed, stages=done.reports if speed is None else [])


def _layer_widths(stages: list[Stage]) -> list[LayerReport]:
    """Per layer: channels in the original, and after the last stage (stages keep node names)."""
    before = {c.node: c.before for c in stages[0].record.layers}
    after = {}
    for s in stages:
        after.update({c.node: c.after for c in s.record.layers})
    return [LayerReport(node, before[node], after[node]) for node in before]


def sparsity_report(model: onnx.ModelProto, covered: SparsifyRecord | SparsityReport,
                    fidelity: FidelityReport | None = None, macs: int = 0, *, dense_size: tuple[int, int] | None = None,
                    external_data: bool | None = None) -> SparsityReport:
    """Density, sizes and NetScore of ``model``, over the layers ``covered`` lists (the pass's record, or
    the float model's report when ``model`` is its int8 version: a weight is then zero when its int8
    value is its zero point). NetScore needs ``fidelity`` and ``macs``."""
    zeros, weights = weight_zeros(model, {l.node for l in covered.layers})
    size, gz = stored_size(model, external_data=external_data)
    quantized = isinstance(covered, SparsityReport)
    nonzero = None if quantized else count_nonzero_params(model)  # int8 weights are not float parameters
    accuracy, score = "", None
    if fidelity is not None and macs and nonzero is not None:
        name, value = fidelity.headline()
        accuracy = f"{'held-out ' if fidelity.held_out else ''}{name} {value:.3f}"
        score = netscore(value, nonzero, macs)
    refit = covered.refit if quantized else any(l.error_refit is not None for l in covered.layers)
    return SparsityReport(
        target=covered.target, split=covered.split, refit=refit, weights=weights, zeros=zeros,
        density=1 - zeros / weights if weights else 1.0, nonzero_params=nonzero, file_bytes=size, gzip_bytes=gz,
        dense_file_bytes=dense_size[0] if dense_size else None, dense_gzip_bytes=dense_size[1] if dense_size else None,
        netscore=score, accuracy=accuracy,
        layers=[SparseLayerReport(l.node, l.weights, l.zeros, l.error_zeroed, l.error_refit) for l in covered.layers],
        skipped=list(covered.skipped), float_zeros=covered.zeros if quantized else None)


def check_options(ratio: float, round_to: int, min_keep: float, allocation: str, task: str, holdout: float) -> None:
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ConfigError(f"--ratio must be in [0, 1) (share of parameters removed), got {ratio}")
    if not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"--round-to must be a positive integer, got {round_to}")
    if not 0 <= min_keep <= 1:
        raise ConfigError(f"min_keep must be in [0, 1], got {min_keep}")
    if allocation not in ("auto", "uniform", "sensitivity"):
        raise ConfigError(f"--allocation must be auto, uniform or sensitivity, got {allocation!r}")
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if not 0 <= holdout < 1:
        raise ConfigError(f"--holdout must be in [0, 1), got {holdout}")


def _sensitivity_report(stage: Stage) -> list[SensitivityReport]:
    """The stage's sensitivity scan per group (none without one), with the channels its allocation left."""
    rows = []
    for gid, curve in (stage.sensitivity or {}).items():
        before, after = stage.alloc.per_group.get(gid, (0, 0))
        rows.append(SensitivityReport(gid, list(stage.analysis.groups[gid].layers), list(curve.fractions),
                                      list(curve.distortion), before, after))
    return rows
