"""The ``quantize`` verb: load → opset ≥ 13 → ORT pre-processing → activation ranges → QDQ → verify → report."""

from __future__ import annotations

import fnmatch
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import onnx
import onnx_ir as ir

from .calibration import CalibrationSet
from .calibration.split import CalibrationSplit
from .errors import ConfigError
from .fidelity import TASKS
from .graph.interface import restore_interface
from .graph.io import ModelLike, load_proto
from .graph.shapes import representative_shapes
from .passes import equalize
from .pipeline import prepare
from .quantization import THRESHOLDS, check_not_quantized, int8_kernels, pre_process, quantize_qdq, to_opset13
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
        int8 = sum(v for k, v in self.kernels.items() if k.startswith("QLinear") or k.endswith("Integer"))
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


def quantize(model: ModelLike, calibration: CalibrationSet, *, thresholds: str = DEFAULT_THRESHOLDS,
             per_channel: bool = True, exclude: Sequence[str] = (), holdout: float = 0.25, task: str = "auto",
             equalize_ranges: bool = True, progress: Callable[[str], None] | None = None) -> QuantizeResult:
    """Static int8 QDQ model of ``model``, with activation ranges chosen by ``thresholds`` on ``calibration``.

    Before quantization, BatchNorm is folded and channel ranges are equalised across layers
    (``equalize_ranges``, function-preserving), which int8 needs on depthwise architectures.
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
        from .quantization.trained import train_ranges
        say("training activation thresholds")
        ranges, train_notes = train_ranges(pre, split.input_name, split.batches)
        notes += train_notes
    say(f"quantizing ({thresholds})")
    quantized, record = quantize_qdq(pre, split.input_name, split.batches, thresholds=thresholds, ranges=ranges,
                                     per_channel=per_channel, exclude_nodes=excluded, progress=say)
    quantized = restore_interface(quantized, original)
    say("verifying the output model")
    verify(original, quantized, shapes)
    fidelity = split.evaluate(original, quantized, task)
    report = QuantizeReport(
        model=str(model) if not isinstance(model, onnx.ModelProto) else "<in-memory model>", output=None,
        thresholds=thresholds, per_channel=per_channel, size_before=original.ByteSize(),
        size_after=quantized.ByteSize(), kernels=int8_kernels(quantized), excluded=excluded,
        ranges=len(record.ranges), fidelity=fidelity.to_dict() if fidelity else None,
        fidelity_summary=fidelity.summary() if fidelity else "", notes=notes + record.notes,
        seconds=time.perf_counter() - start)
    return QuantizeResult(quantized, report)
