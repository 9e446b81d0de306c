"""What a run did, as data (JSON for CI pipelines) and as a human summary (the CLI's output)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .records import record_dict

if TYPE_CHECKING:
    from .fidelity import FidelityReport
    from .finetune import DistillRecord

SCHEMA_VERSION = 1
IN_MEMORY = "<in-memory model>"  # the model name reports give a ModelProto passed without a path


@dataclass(frozen=True)
class CalibrationReport:
    """The calibration samples of a run: how many, how split, where from and how preprocessed."""

    samples: int
    fit: int  # samples the scores, scan and refit were computed on
    held_out: int  # samples kept out to measure fidelity
    files: list[str]  # the first three image files ("..." when there are more); empty for arrays
    preprocess: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return record_dict(self)


@dataclass(frozen=True)
class SensitivityReport:
    """One channel group of the sensitivity scan: the output distortion when it alone loses each share
    of its prunable units, and the channels the allocation left it."""

    group: int
    layers: list[str]
    fractions: list[float]
    distortion: list[float]  # relative squared output error, summed over outputs
    channels_before: int
    channels_after: int

    def to_dict(self) -> dict[str, Any]:
        return record_dict(self)


@dataclass
class LayerReport:
    node: str
    before: int
    after: int


@dataclass
class RefitReport:
    node: str
    error_before: float  # relative squared error of the layer's output on calibration data
    error_after: float


@dataclass
class SparseLayerReport:
    node: str
    weights: int
    zeros: int
    error_zeroed: float | None = None  # relative squared output error on calibration rows with the zeros alone
    error_refit: float | None = None  # after the least-squares refit (None: not refitted)


@dataclass
class StageReport:
    """One stage of a staged pruning (``--stages``): its target and the held-out fidelity after it."""

    stage: int
    kind: str  # ratio | speedup
    target: float  # cumulative: share of parameters, or speed-up over the original
    params: int
    units_removed: int
    predicted_speedup: float | None = None
    fidelity: str = ""  # "AP@0.5 0.9512": the task's headline metric on held-out samples
    fidelity_value: float | None = None

    def line(self) -> str:
        goal = f"{self.target:.2f}x" if self.kind == "speedup" else f"{self.target:.1%} of parameters"
        pred = f", predicted {self.predicted_speedup:.2f}x" if self.predicted_speedup else ""
        return f"  stage {self.stage}: target {goal}{pred}, {self.params:,} params" + \
            (f", held-out {self.fidelity}" if self.fidelity else "")


@dataclass
class SpeedReport:
    """``slim --speedup``: the latency target, what the cost model predicted and what was measured."""

    target: float
    providers: list[str]
    threads: int
    int8: bool
    predicted: float  # original / compressed latency, from the per-layer cost model
    measured: float | None  # the same, timed (interleaved medians); int8 targets: measured after quantization
    original_ms: float
    compressed_ms: float | None
    stages: list[StageReport] = field(default_factory=list)
    rewrites: list[str] = field(default_factory=list)  # exact rewrites for speed (PRelu as Max), before pruning
    retarget: float | None = None  # the cost model missed by >10%: the last stage re-allocated for this prediction

    @property
    def prediction_error(self) -> float | None:
        return self.predicted / self.measured - 1 if self.measured else None

    def summary_lines(self) -> list[str]:
        where = f"{self.providers[0]}, {self.threads} thread{'s' if self.threads > 1 else ''}" + \
            (", int8" if self.int8 else "")
        lines = [f"speed-up target {self.target:g}x ({where}): predicted {self.predicted:.2f}x"]
        if self.measured is not None:
            lines[0] += (f", measured {self.measured:.2f}x ({self.original_ms:.1f} -> {self.compressed_ms:.1f} ms, "
                         f"prediction error {self.prediction_error:+.0%})")
        if self.retarget is not None:
            lines.append(f"  first allocation measured >10% off the target: re-allocated for a predicted "
                         f"{self.retarget:.2f}x")
        lines += [f"  exact rewrite: {r}" for r in self.rewrites]
        if self.stages:
            lines.append(f"{len(self.stages)} stages:")
            lines += [s.line() for s in self.stages]
        return lines


@dataclass
class SparsityReport:
    """``slim --sparsity``: the zeros inside the remaining layers, what they cost and what they save."""

    target: float  # requested share of the layers' weights set to zero
    split: str  # how the budget was spread over layers: sensitivity | uniform
    refit: bool  # surviving weights re-solved on calibration data
    weights: int  # weights of the Conv/Gemm/MatMul layers the pass covers (not excluded, not shared)
    zeros: int  # of those, exactly zero in the output model
    density: float  # nonzero share of those weights
    nonzero_params: int | None  # all parameters that are not zero (NetScore's p; None for an int8 model)
    file_bytes: int
    gzip_bytes: int  # `gzip -9` of the file(s) as written
    dense_file_bytes: int | None = None  # the same model before the zeros (what slim writes without --sparsity)
    dense_gzip_bytes: int | None = None
    storage: str = "dense"  # zeros stored inline in ordinary initializers (README, "Sparse weights")
    netscore: float | None = None  # NetScore with nonzero parameters and dense MACs
    accuracy: str = ""  # the fidelity NetScore used, e.g. "held-out detection AP@0.5 0.500"
    layers: list[SparseLayerReport] = field(default_factory=list)  # as the pass left them (float)
    skipped: list[str] = field(default_factory=list)  # layers left dense, and why
    float_zeros: int | None = None  # int8 model: zeros of the float model it was quantized from

    @property
    def gzip_ratio(self) -> float | None:
        return self.gzip_bytes / self.dense_gzip_bytes if self.dense_gzip_bytes else None

    def summary_lines(self, label: str = "sparsity") -> list[str]:
        if self.float_zeros is not None:  # the int8 model: what quantization did to the zeros
            return [f"int8 sparsity: {self.zeros:,} of {self.weights:,} weights zero, density {self.density:.3f} "
                    f"(float model: {self.float_zeros:,}; symmetric int8 keeps zeros zero, rounding adds "
                    f"{self.zeros - self.float_zeros:,}); size {_kb(self.file_bytes)}, gzip -9 {_kb(self.gzip_bytes)}"]
        lines = [f"{label}: {self.zeros:,} of {self.weights:,} weights zero (target {self.target:.1%}), density "
                 f"{self.density:.3f}; split {self.split}, {'refitted' if self.refit else 'not refitted'}"]
        fits = [l for l in self.layers if l.error_refit is not None]
        if fits:
            before = sum(l.error_zeroed or 0.0 for l in fits) / len(fits)
            after = sum(l.error_refit for l in fits) / len(fits)
            lines.append(f"  refitted {len(fits)} of {len(self.layers)} layers: mean relative output error "
                         f"{before:.3f} -> {after:.3f}")
        size = f"  size {_kb(self.file_bytes)}, gzip -9 {_kb(self.gzip_bytes)}"
        if self.gzip_ratio is not None:
            size += (f" = {self.gzip_ratio:.3f}x of the same model without the zeros ({_kb(self.dense_file_bytes)}, "
                     f"gzip {_kb(self.dense_gzip_bytes)})")
        lines.append(size + f"; zeros stored {self.storage}")
        ns = f"NetScore {self.netscore:.2f}" if self.netscore is not None else "NetScore unknown (no fidelity)"
        lines.append(f"  {ns} with {self.nonzero_params:,} nonzero parameters" +
                     (f" and {self.accuracy}" if self.accuracy else ""))
        return lines


@dataclass
class GroupReport:
    id: int
    layers: list[str]
    channels: int
    prunable: bool
    reasons: list[str] = field(default_factory=list)


@dataclass
class AnalysisReport:
    model: str
    input_shapes: dict[str, list[int]]
    params: int
    macs: int
    groups: list[GroupReport]
    prunable_channels: int
    total_channels: int
    preprocessing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "kind": "analysis", **record_dict(self)}

    def summary(self, max_rows: int = 60) -> str:
        prunable = [g for g in self.groups if g.prunable]
        lines = [
            f"model: {self.model}",
            f"analysis shape: {shape_text(self.input_shapes)}   params {self.params:,}   MACs {_big(self.macs)}",
            f"channel groups: {len(self.groups)} ({len(prunable)} prunable), channels "
            f"{self.prunable_channels:,} of {self.total_channels:,} prunable",
            "",
            f"{'group':>5}  {'ch':>5}  {'prunable':8}  layers / why not",
        ]
        for g in self.groups[:max_rows]:
            layers = ", ".join(g.layers[:3]) + (f" (+{len(g.layers) - 3})" if len(g.layers) > 3 else "")
            why = "" if g.prunable else f"  <- {g.reasons[0]}" + (f" (+{len(g.reasons) - 1} more)" if len(g.reasons) > 1 else "")
            lines.append(f"{g.id:>5}  {g.channels:>5}  {'yes' if g.prunable else 'no':8}  {layers}{why}")
        if len(self.groups) > max_rows:
            lines.append(f"  ... {len(self.groups) - max_rows} more groups (use --json for all)")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


@dataclass
class SlimReport:
    model: str
    output: str | None
    criterion: str
    target_ratio: float
    achieved_ratio: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    round_to: int
    input_shapes: dict[str, list[int]]
    layers: list[LayerReport]
    unprunable: list[GroupReport]
    excluded: list[str]
    output_rel_error: dict[str, float]
    preprocessing: list[str] = field(default_factory=list)
    folded_biases: int = 0
    inexact_folds: int = 0
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    allocation: str = "uniform"
    calibration: CalibrationReport | None = None
    sensitivity: list[SensitivityReport] = field(default_factory=list)
    refits: list[RefitReport] = field(default_factory=list)
    fidelity: FidelityReport | None = None  # on the held-out samples
    fidelity_summary: str = ""
    finetune: DistillRecord | None = None
    sparsity: SparsityReport | None = None
    speed: SpeedReport | None = None  # --speedup
    stages: list[StageReport] = field(default_factory=list)  # --stages with --ratio

    @property
    def mac_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "kind": "slim", **record_dict(self), "mac_ratio": self.mac_ratio}

    def summary(self, max_rows: int = 40) -> str:
        changed = [l for l in self.layers if l.after != l.before]
        lines = [
            f"model: {self.model}" + (f" -> {self.output}" if self.output else ""),
            f"criterion {self.criterion}, round-to {self.round_to}, analysis shape {shape_text(self.input_shapes)}",
            f"params  {self.params_before:>12,} -> {self.params_after:>12,}   removed {self.achieved_ratio:6.1%} "
            + (f"(target {self.target_ratio:.1%})" if self.speed is None else "(speed target)"),
            f"MACs    {_big(self.macs_before):>12} -> {_big(self.macs_after):>12}   x{self.mac_ratio:.3f}",
            f"layers pruned: {len(changed)} of {len(self.layers)}",
        ]
        if changed:
            lines.append(f"  {'layer':48s} channels")
            for l in changed[:max_rows]:
                lines.append(f"  {l.node[:48]:48s} {l.before:>5} -> {l.after:<5}")
            if len(changed) > max_rows:
                lines.append(f"  ... {len(changed) - max_rows} more (use --json for all)")
        if self.unprunable:
            lines.append(f"unprunable groups: {len(self.unprunable)}")
            for g in self.unprunable[:10]:
                lines.append(f"  {', '.join(g.layers[:2])[:48]:48s} {g.channels:>5} ch  {g.reasons[0] if g.reasons else ''}")
            if len(self.unprunable) > 10:
                lines.append(f"  ... {len(self.unprunable) - 10} more (onnxprune analyze shows all)")
        if self.folded_biases:
            lines.append(f"bias folds: {self.folded_biases} ({self.inexact_folds} exact only away from padded borders)")
        if self.calibration is not None:
            c = self.calibration
            lines.append(f"calibration: {c.fit} samples to fit, {c.held_out} held out; allocation {self.allocation}")
            lines += [f"  note: {n}" for n in c.notes]
        if self.refits:
            before = sum(r.error_before for r in self.refits) / len(self.refits)
            after = sum(r.error_after for r in self.refits) / len(self.refits)
            lines.append(f"refitted {len(self.refits)} layers: mean relative output error {before:.3f} -> {after:.3f}")
        if self.finetune:
            lines.append(self.finetune.summary())
        if self.sparsity is not None:
            lines += self.sparsity.summary_lines()
        if self.speed is not None:
            lines += self.speed.summary_lines()
        elif self.stages:
            lines += [f"{len(self.stages)} stages:"] + [s.line() for s in self.stages]
        if self.fidelity_summary:
            lines += ["held-out " + self.fidelity_summary.splitlines()[0]] + self.fidelity_summary.splitlines()[1:]
        if self.output_rel_error and not self.fidelity_summary:
            lines += drift_verdict(self.output_rel_error)
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append(f"time: {self.seconds:.1f} s")
        return "\n".join(lines)


def budget_text(ratio: float | None, speedup: float | None) -> str:
    """A point's budget: r=0.5 (share of parameters) or s=2x (speed-up target)."""
    return f"s={speedup:g}x" if speedup is not None else f"r={ratio:.2f}"


DRIFT_SMALL, DRIFT_LARGE = 0.05, 0.3  # relative output change on a random input


def drift_verdict(rel_error: dict[str, float]) -> list[str]:
    """What the data-free output check means: the size of the change, a verdict, and what to do next."""
    name, worst = max(rel_error.items(), key=lambda kv: kv[1])
    if worst <= DRIFT_SMALL:
        verdict = "small: the pruned model still computes nearly the same function"
    elif worst <= DRIFT_LARGE:
        verdict = "moderate: outputs moved noticeably; whether that matters depends on the task"
    else:
        verdict = f"large: more than {DRIFT_LARGE:.0%} of their size; expect a visible loss of accuracy"
    return [f"output change on a random input: {worst:.0%} of the output's size at {name!r} ({verdict})",
            "  a random input only shows how far the outputs moved, not whether faces are still found; "
            "run with --calib IMAGES to choose channels on real activations, refit the layers and measure "
            "fidelity on held-out images"]


@dataclass
class CombinedReport:
    """``slim --int8``: the pruning report, then the quantization report of the pruned model."""

    slim: Any
    quantize: Any
    fidelity: Any = None  # FidelityReport of the int8 model against the original fp32 one (end to end)
    sparsity: SparsityReport | None = None  # ``--sparsity``: the zeros as they are in the int8 model

    def __post_init__(self) -> None:
        # The quantizer was handed the pruned model in memory; both halves are about the user's input file.
        if self.quantize.model == IN_MEMORY:
            self.quantize.model = self.slim.model

    @property
    def output(self) -> str | None:
        return self.quantize.output

    @output.setter
    def output(self, value: str | None) -> None:
        self.slim.output = value
        self.quantize.output = value

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "kind": "slim+int8", **record_dict(self)}  # each part by its to_dict

    def summary(self) -> str:
        text = self.slim.summary() + "\n\n" + self.quantize.summary()
        if self.fidelity is not None:
            text += "\n\nend to end, original fp32 -> this int8 model: " + self.fidelity.summary()
        if self.sparsity is not None:
            text += "\n" + "\n".join(self.sparsity.summary_lines())
        return text


def write_json(report: AnalysisReport | SlimReport, path: str | Path) -> None:
    from .graph.io import write_text_atomic
    write_text_atomic(json.dumps(_finite(report.to_dict()), indent=2), path)


def _finite(value: Any) -> Any:
    """Strict JSON has no Infinity/NaN: write them as strings ("inf" SQNR means identical outputs)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def shape_text(shapes: Mapping[str, Sequence[int]]) -> str:
    """``input=1x3x640x640, ...``: how every report and message writes input shapes."""
    return ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())


def dims_text(shapes: Mapping[str, Sequence[int]]) -> str:
    """``1x3x640x640,...``: the dims alone, for table cells and chart labels."""
    return ",".join("x".join(map(str, v)) for v in shapes.values())


def short_name(label: str) -> str:
    """A model path shown as its file name (labels that are not paths stay as they are)."""
    return Path(label).name if os.sep in label else label


def _kb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def _big(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
