"""The ``quantize`` verb: load → opset ≥ 13 → ORT pre-processing → activation ranges → QDQ → verify → report."""

from __future__ import annotations

import fnmatch
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from .calibration import CalibrationSet
from .calibration.activations import stream
from .calibration.split import CalibrationSplit
from .errors import ConfigError
from .fidelity import TASKS
from .graph.interface import restore_interface
from .graph.io import ModelLike, load_proto
from .graph.shapes import representative_shapes
from .passes import equalize
from .pipeline import prepare
from .quantization import (THRESHOLDS, check_not_quantized, int8_kernels, is_int8_kernel, pre_process, quantize_qdq,
                           to_opset13)
from .verify import verify

DEFAULT_THRESHOLDS = "mse"


@dataclass
class QuantizeReport:
    model: str
    output: str | None
    thresholds: str
    per_channel: bool
    size_before: int
    size_after: int
    kernels: dict[str, int]  # op types of ORT's optimised CPU graph
    excluded: list[str] = field(default_factory=list)
    ranges: int = 0
    fidelity: dict | None = None
    fidelity_summary: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": 1, "kind": "quantize", **asdict(self)}

    def summary(self) -> str:
        int8 = sum(v for k, v in self.kernels.items() if is_int8_kernel(k))
        lines = [
            f"model: {self.model}" + (f" -> {self.output}" if self.output else ""),
            f"int8 QDQ: weights int8 per-{'channel' if self.per_channel else 'tensor'} symmetric, activations uint8, "
            f"ranges: {self.thresholds}",
            f"size    {self.size_before / 1e6:8.2f} MB -> {self.size_after / 1e6:8.2f} MB",
            f"ORT CPU kernels: {int8} int8 of {sum(self.kernels.values())} nodes ("
            + ", ".join(f"{k} {v}" for k, v in list(self.kernels.items())[:6]) + ")",
        ]
        if self.excluded:
            lines.append(f"kept in float: {', '.join(self.excluded[:8])}" + (" ..." if len(self.excluded) > 8 else ""))
        if self.fidelity_summary:
            lines += ["held-out " + self.fidelity_summary.splitlines()[0]] + self.fidelity_summary.splitlines()[1:]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"time: {self.seconds:.1f} s")
        return "\n".join(lines)


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    report: QuantizeReport
    preview: str = ""

    def save(self, path, *, protect=()):
        from pathlib import Path
        from .graph.io import save_atomic
        return save_atomic(self.model, path, protect=[Path(p) for p in protect])


def _matching(model: onnx.ModelProto, patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    names, unmatched = [], []
    for p in patterns:
        glob = any(c in p for c in "*?[")
        hits = [n.name for n in model.graph.node if n.name and (fnmatch.fnmatchcase(n.name, p) if glob else re.search(p, n.name))]
        names += [h for h in hits if h not in names]
        if not hits:
            unmatched.append(p)
    return names, unmatched


def fidelity_value(report) -> float:
    """The task metric when there is one, else the mean cosine of the outputs."""
    if report.detection_ap is not None:
        return report.detection_ap
    if report.embedding is not None:
        return report.embedding["mean_cosine"]
    if report.top1_agreement is not None:
        return report.top1_agreement
    return float(np.mean([o.cosine for o in report.outputs])) if report.outputs else 1.0


def most_harmful_layer(float_model: onnx.ModelProto, quantized: onnx.ModelProto, input_name: str,
                       batches: Sequence[np.ndarray], skip: Sequence[str] = ()) -> str | None:
    """The quantized node whose output error grows most over its inputs' error (float vs QDQ run)."""
    nodes = [n for n in float_model.graph.node
             if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and n.name and n.name not in skip]
    quantized_names = {o for n in quantized.graph.node for o in n.output} | {i.name for i in quantized.graph.input}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in float_model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def visible(t: str) -> str:
        """The tensor itself, or the activation after it when ORT folded that activation into the QDQ."""
        while t not in quantized_names and len(consumers.get(t, [])) == 1 and \
                consumers[t][0].op_type in ("Relu", "Clip", "LeakyRelu"):
            t = consumers[t][0].output[0]
        return t

    outs = {n.name: visible(n.output[0]) for n in nodes}
    ins = {n.name: visible(n.input[0]) for n in nodes}
    names = sorted({t for t in list(outs.values()) + list(ins.values()) if t in quantized_names})
    if not names:
        return None
    ref: dict[str, list[np.ndarray]] = {t: [] for t in names}
    got: dict[str, list[np.ndarray]] = {t: [] for t in names}
    stream(float_model, names, input_name, batches[:1], lambda d: [ref[t].append(d[t]) for t in names])
    stream(quantized, names, input_name, batches[:1], lambda d: [got[t].append(d[t]) for t in names])

    def err(t: str) -> float:
        a, b = np.concatenate(ref[t]).astype(np.float64), np.concatenate(got[t]).astype(np.float64)
        return float(((a - b) ** 2).sum() / max((a * a).sum(), 1e-12))

    errors = {t: err(t) for t in names}
    added = {n.name: errors[outs[n.name]] - errors.get(ins[n.name], 0.0) for n in nodes if outs[n.name] in errors}
    return max(added, key=added.get) if added else None


def quantize(model: ModelLike, calibration: CalibrationSet, *, thresholds: str = DEFAULT_THRESHOLDS,
             per_channel: bool = True, exclude: Sequence[str] = (), holdout: float = 0.25, task: str = "auto",
             equalize_ranges: bool = True, max_drop: float | None = None, max_float_layers: int = 8,
             progress: Callable[[str], None] | None = None) -> QuantizeResult:
    """Static int8 QDQ model of ``model``, with activation ranges chosen by ``thresholds`` on ``calibration``.

    Before quantization, BatchNorm is folded and channel ranges are equalised across layers
    (``equalize_ranges``, function-preserving), which int8 needs on depthwise architectures.
    With ``max_drop``, the layers that add the most error are kept in float, one at a time, until
    the held-out fidelity drop (1 - task metric, or 1 - mean output cosine) is at most ``max_drop``.
    """
    start = time.perf_counter()
    if thresholds not in THRESHOLDS:
        raise ConfigError(f"--thresholds must be one of {', '.join(THRESHOLDS)}, got {thresholds!r}")
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    say = progress or (lambda _: None)
    notes: list[str] = []
    original = load_proto(model)
    check_not_quantized(original)
    if thresholds == "trained":
        try:
            from .quantization import trained  # noqa: F401
        except ImportError:
            notes.append("trained thresholds need PyTorch (pip install 'onnxprune[torch]'); used mse")
            thresholds = "mse"
    shapes = representative_shapes(original)
    split = CalibrationSplit.split(calibration, holdout, shapes)
    say("pre-processing for quantization")
    prep = prepare(original, simplify=True)  # BN folded, Identity removed: what equalisation needs
    graph = prep.model
    if equalize_ranges:
        graph, eq = equalize(graph)
        notes.append(f"cross-layer equalisation on {len(eq.pairs)} conv pairs")
    pre = pre_process(to_opset13(ir.to_proto(graph)))
    excluded, unmatched = _matching(pre, exclude)
    notes += [f"--exclude {p!r} matched no node" for p in unmatched]
    ranges = None
    if thresholds == "trained":
        from .quantization.qdq import compute_ranges
        from .quantization.trained import quantized_activations, train_ranges
        say("activation ranges (mse) to start from")
        init = compute_ranges(pre, split.input_name, split.batches, "mse", say)
        first, _ = quantize_qdq(pre, split.input_name, split.batches, thresholds="mse", ranges=init,
                                per_channel=per_channel, exclude_nodes=excluded)
        say("training activation thresholds")
        ranges, train_notes = train_ranges(pre, split.input_name, split.batches, init=init,
                                           only=quantized_activations(first))
        notes += train_notes
    say(f"quantizing ({thresholds})")
    quantized, record = quantize_qdq(pre, split.input_name, split.batches, thresholds=thresholds, ranges=ranges,
                                     per_channel=per_channel, exclude_nodes=excluded, progress=say)
    quantized = restore_interface(quantized, original)
    fidelity = split.evaluate(original, quantized, task)
    kept_float: list[str] = []
    while max_drop is not None and 1 - fidelity_value(fidelity) > max_drop and len(kept_float) < max_float_layers:
        worst = most_harmful_layer(pre, quantized, split.input_name, split.batches, skip=excluded + kept_float)
        if worst is None:
            break
        kept_float.append(worst)
        say(f"keeping {worst} in float ({len(kept_float)})")
        quantized, record = quantize_qdq(pre, split.input_name, split.batches, thresholds=thresholds,
                                         ranges=record.ranges or None, per_channel=per_channel,
                                         exclude_nodes=excluded + kept_float, progress=say)
        quantized = restore_interface(quantized, original)
        fidelity = split.evaluate(original, quantized, task)
    if max_drop is not None:
        drop = 1 - fidelity_value(fidelity)
        notes.append(f"--max-drop {max_drop}: drop {drop:.4f} with {len(kept_float)} layer(s) kept in float"
                     + ("" if drop <= max_drop else " (target not reached)"))
    excluded = excluded + kept_float
    say("verifying the output model")
    verify(original, quantized, shapes)
    report = QuantizeReport(
        model=str(model) if not isinstance(model, onnx.ModelProto) else "<in-memory model>", output=None,
        thresholds=thresholds, per_channel=per_channel, size_before=original.ByteSize(),
        size_after=quantized.ByteSize(), kernels=int8_kernels(quantized), excluded=excluded,
        ranges=len(record.ranges), fidelity=fidelity.to_dict() if fidelity else None,
        fidelity_summary=fidelity.summary() if fidelity else "", notes=notes + record.notes,
        seconds=time.perf_counter() - start)
    return QuantizeResult(quantized, report, split.preview)
