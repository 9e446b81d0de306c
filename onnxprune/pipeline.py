"""The one-way flow every entry point shares: load → prepare → analyse → score → rewrite → verify → report.

The CLI and the Python API are thin layers over :func:`slim` and :func:`analyze`.
"""

from __future__ import annotations

import time
import warnings

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from .allocation import allocate
from .calibration import CalibrationSet
from .calibration.split import CalibrationSplit, check_task
from .calibration.activations import consumer_moments
from .bench import netscore
from .fidelity import TASKS, FidelityReport
from .passes.reconstruct import LayerFit, reconstruct
from .sensitivity import scan
from .channels.analysis import ChannelAnalysis, analyze_channels
from .errors import ConfigError, NothingToPruneError
from .executors import TaskExecutor
from .graph.interface import restore_interface
from .graph.io import ModelLike, ModelSource, materialize, save_atomic, stored_size
from .graph.metrics import count_macs, count_nonzero_params, count_params, weight_zeros
from .memory import release_memory
from .graph.shapes import Shape, infer_concrete_shapes, representative_shapes
from .passes import cleanup, fold_batchnorm, remove_channels
from .passes.sparsify import SparsifyRecord, check_sparsity, sparsify
from .quantization.qdq import check_not_quantized
from .progress import Progress, log_progress
from .report import AnalysisReport, GroupReport, LayerReport, RefitReport, SlimReport, SparseLayerReport, SparsityReport
from .saliency.criteria import NEEDS_CALIBRATION, ScoreContext, get_criterion
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
    fidelity: FidelityReport | None = None  # held-out fidelity (also in ``report.fidelity`` as a dict)

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
    m, rec = cleanup(m)
    steps += [f"cleanup: {p}" for p in rec.passes]
    m, fold = fold_batchnorm(m)
    if fold.folded:
        steps.append(f"folded {len(fold.folded)} BatchNormalization into Conv")
    materialize(m)  # the weights folding did not replace: read once, then the input's file is unmapped
    release_memory()  # the graphs before folding still hold the unfolded weights
    say("inferring shapes")
    shapes = infer_concrete_shapes(m, shapes_in)
    return Prepared(source, m, shapes_in, shapes, fold.gamma, steps, notes)


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


def slim(model: ModelLike, ratio: float, *, criterion: str | None = None, round_to: int = DEFAULT_ROUND_TO,
         exclude: Sequence[str] = (), input_shapes: Mapping[str, Shape] | None = None, min_keep: float = 0.1,
         simplify: bool = True, calibration: CalibrationSet | None = None, allocation: str = "auto",
         recover: bool | None = None, holdout: float = 0.25, task: str = "auto", workers: int = 2,
         finetune_steps: int = 0, identities: tuple[np.ndarray, list[str]] | None = None,
         executor: TaskExecutor | None = None, sparsity: float = 0.0, progress: Progress | None = None) -> SlimResult:
    """Remove about ``ratio`` of the model's parameters by deleting whole channels.

    With ``calibration`` (unlabelled samples in the model's input format, see
    :func:`onnxprune.calibration.load_calibration`) channels are scored on activations, the budget
    is spread by a per-group sensitivity scan, removed channels are replaced by their mean, the
    layers after them are refitted by least squares, and a held-out part of the samples measures
    how close the result stays to the original. Without it, weight criteria only.

    ``sparsity`` > 0 then sets that share of the remaining Conv/Gemm/MatMul weights to zero
    (smallest magnitudes, budget spread by a per-layer scan, survivors refitted: see
    ``passes/sparsify.py``); the report's ``sparsity`` gives density, file and gzip sizes and NetScore.

    Returns the smaller model (same inputs and outputs, symbolic dims kept) and a report. Raises
    :class:`~onnxprune.errors.OnnxPruneError` subclasses for bad input.
    """
    start = time.perf_counter()
    _check_options(ratio, round_to, min_keep, allocation, task, holdout)
    check_sparsity(sparsity)
    criterion = criterion or (CALIBRATED_CRITERION if calibration is not None else DEFAULT_CRITERION)
    score_fn = get_criterion(criterion)
    if calibration is None:  # before any work: these options cannot run without data
        if criterion in NEEDS_CALIBRATION:
            raise ConfigError(f"criterion {criterion} needs calibration data (--calib)")
        if recover:
            raise ConfigError("--recover needs calibration data (--calib)")
        if finetune_steps:
            raise ConfigError("--finetune-steps needs calibration data (--calib)")
    say = progress or log_progress
    prep = prepare(model, input_shapes=input_shapes, simplify=simplify, progress=say)
    say("analysing channel dependencies")
    analysis = analyze_channels(prep.model, prep.shapes, exclude)
    warns = prep.warnings + [f"--exclude {p!r} matched no node" for p in analysis.unmatched_excludes]
    if ratio > 0 and not analysis.prunable_units:
        reasons = sorted({r for g in analysis.groups for r in g.reasons})
        raise NothingToPruneError("no prunable channel in the model" + (f" ({reasons[0]})" if reasons else ""))

    calib, moments = None, None
    if calibration is None:
        warns.append("no calibration data: channels chosen by weights only, no recovery (use --calib)")
    else:
        calib = CalibrationSplit.split(calibration, holdout, prep.input_shapes)
        check_task(prep.original, calibration, task)  # before any expensive work; refuses a batch fixed above 1
        calib.identities = identities
        say(f"collecting activation statistics on {calib.count} samples")
        moments = consumer_moments(prep.model, analysis, calib.input_name, calib.batches)
    params_in = count_params(prep.skeleton)
    say(f"scoring channels ({criterion})")
    arrays = {n: v.const_value.numpy() for n, v in prep.model.graph.initializers.items() if v.const_value is not None}
    bn_scales = {n.name: n.inputs[1].name for n in prep.model.graph if n.op_type == "BatchNormalization"}
    scores = score_fn(ScoreContext(analysis, arrays, prep.bn_gamma, bn_scales, moments, prep.model,
                                   calib.batches if calib is not None else None,
                                   calib.input_name if calib is not None else ""))
    if criterion in ("bn", "double") and not prep.bn_gamma and not bn_scales:
        warns.append(f"criterion {criterion}: the model has no BatchNormalization (folded at export?); "
                     "BN-γ is unavailable, L2 magnitude was used")
    means = {k: moments.mean(k) for k in moments.axes} if moments is not None else None
    already = params_in - analysis.total_params()  # removed by preparation (BN folding, constant folding)
    target = max(0, int(round(ratio * params_in)) - already) if ratio > 0 else 0

    sensitivity = None
    mode = ("sensitivity" if calib is not None else "uniform") if allocation == "auto" else allocation
    if mode == "sensitivity" and target > 0:
        if calib is None:
            raise ConfigError("--allocation sensitivity needs calibration data (--calib)")
        sensitivity = scan(prep.model, analysis, scores, calib.input_name, calib.scan_batches, input_means=means,
                           executor=executor, workers=workers,
                           progress=lambda i, n: say("sensitivity scan", i, n))
    say("allocating the parameter budget")
    alloc, used_round_to = _allocate_rounded(analysis, scores, target, round_to, min_keep, int(TOLERANCE * params_in),
                                             sensitivity)
    if used_round_to != round_to:
        warns.append(f"--round-to {round_to} cannot reach the target on this model; used {used_round_to} "
                     "(layers narrower than the rounding cannot shrink)")
    say(f"removing {len(alloc.removed)} channel units")
    pruned_ir, record = remove_channels(prep.model, analysis, alloc.removed, input_means=means)
    refits: list[LayerFit] = []
    if calib is not None and (recover is None or recover) and alloc.removed:
        say("refitting layers on calibration data")
        pruned_ir, rec = reconstruct(prep.model, pruned_ir, analysis, alloc.removed, calib.input_name, calib.batches)
        refits = rec.layers
    del arrays
    if not sparsity:
        prep.release_model()  # last use of the working model: free its weights before the output is serialised
    finetune = None
    if finetune_steps and calib is not None:
        from .finetune import distill
        tuned, finetune = distill(prep.original, pruned_ir, calib.input_name, calib.batches, steps=finetune_steps,
                                  task=task if task in ("detection", "embedding") else "auto", progress=say)
        if finetune.get("final_loss", 0.0) <= finetune.get("initial_loss", 0.0):
            pruned_ir = tuned
        else:  # label-free distillation on few samples can overfit: never hand back a worse model
            warns.append("distillation did not lower the loss on the calibration samples; kept the refitted model")
    record_sparse, dense_size = None, None
    if sparsity:
        # The file slim writes without --sparsity, measured: what the zeros are compared with.
        dense_size = stored_size(restore_interface(ir.to_proto(pruned_ir), prep.skeleton),
                                 external_data=prep.source.external or None)
        say(f"zeroing {sparsity:.0%} of the remaining weights")
        pruned_ir, record_sparse = sparsify(
            pruned_ir, sparsity, exclude=exclude, reference=prep.model, keep_out=_kept_outputs(analysis, alloc.removed),
            input_name=calib.input_name if calib is not None else None,
            batches=calib.batches if calib is not None else None,
            scan_batches=calib.scan_batches if calib is not None else None, refit=recover is None or recover,
            executor=executor, workers=workers, progress=say)
        if calib is None:
            warns.append("--sparsity without calibration data: the same share of every layer zeroed by magnitude, "
                         "not refitted (use --calib)")
        prep.release_model()
    pruned = restore_interface(ir.to_proto(pruned_ir), prep.skeleton)
    del pruned_ir
    release_memory()
    say("verifying the output model")
    check = verify(prep.source.runtime_model(), pruned, prep.input_shapes)
    fidelity = calib.evaluate(prep.original, pruned, task) if calib is not None else None

    params_out = count_params(pruned)
    achieved = 1 - params_out / params_in if params_in else 0.0
    if ratio > 0 and abs(achieved - ratio) > TOLERANCE:
        warns.append(f"achieved {achieved:.1%} of parameters removed, target {ratio:.1%}: "
                     "not enough prunable channels at this --round-to / --exclude")
    shapes_out = infer_concrete_shapes(pruned, prep.input_shapes)
    report = SlimReport(
        model=_name(model), output=None, criterion=criterion, target_ratio=float(ratio), achieved_ratio=achieved,
        params_before=params_in, params_after=params_out,
        macs_before=count_macs(prep.skeleton, infer_concrete_shapes(prep.skeleton, prep.input_shapes)),
        macs_after=count_macs(pruned, shapes_out), round_to=used_round_to,
        input_shapes={k: list(v) for k, v in prep.input_shapes.items()},
        layers=[LayerReport(c.node, c.before, c.after) for c in record.layers],
        unprunable=[g for g in _group_reports(analysis) if not g.prunable],
        excluded=list(exclude), output_rel_error=check.output_rel_error, preprocessing=prep.steps,
        folded_biases=record.folded_biases, inexact_folds=record.inexact_folds, warnings=warns,
        seconds=time.perf_counter() - start, allocation=mode,
        calibration=calib.describe() if calib is not None else None,
        sensitivity=_sensitivity_report(analysis, sensitivity, alloc) if sensitivity else [],
        refits=[RefitReport(f.node, f.error_before, f.error_after) for f in refits],
        fidelity=fidelity.to_dict() if fidelity is not None else None,
        fidelity_summary=fidelity.summary() if fidelity is not None else "",
        finetune={k: v for k, v in finetune.items() if k != "curve"} if finetune else None,
        sparsity=sparsity_report(pruned, record_sparse, fidelity, count_macs(pruned, shapes_out), dense_size=dense_size,
                                 external_data=prep.source.external or None) if record_sparse is not None else None)
    return SlimResult(pruned, report, calib.preview if calib is not None else "",
                      external_data=prep.source.external or None, fidelity=fidelity)


def _kept_outputs(analysis: ChannelAnalysis, removed: set[int]) -> dict[str, np.ndarray]:
    """Per layer with prunable output channels: which of its original outputs the pruned layer still has."""
    gone = np.array(sorted(removed), dtype=np.int64)
    return {s.node: ~np.isin(analysis.root[s.elems], gone) for s in analysis.slots if s.role == "out"}


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


def _check_options(ratio: float, round_to: int, min_keep: float, allocation: str, task: str, holdout: float) -> None:
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


def _sensitivity_report(analysis: ChannelAnalysis, sensitivity: dict, alloc) -> list[dict]:
    rows = []
    for gid, sens in sensitivity.items():
        before, after = alloc.per_group.get(gid, (0, 0))
        rows.append({"group": gid, "layers": analysis.groups[gid].layers, "fractions": sens.fractions,
                     "distortion": sens.distortion, "channels_before": before, "channels_after": after})
    return rows


def _allocate_rounded(analysis: ChannelAnalysis, scores: dict[int, float], target: int, round_to: int,
                      min_keep: float, tolerance: int, sensitivity: dict | None = None):
    """Allocate at ``round_to``, halving it only if the target is out of reach at that granularity.

    Speed prefers coarse widths, but the ratio is the user's contract: small models (MTCNN's
    10- and 16-channel layers) cannot shrink at all when rounded to 16.
    """
    best = None
    r = round_to
    while True:
        alloc = allocate(analysis, scores, target, round_to=r, min_keep_frac=min_keep, tolerance=tolerance,
                         sensitivity=sensitivity)
        if best is None or abs(alloc.params_removed - target) < abs(best[0].params_removed - target):
            best = (alloc, r)
        if abs(alloc.params_removed - target) <= tolerance or r == 1:
            return best
        r = max(1, r // 2)
