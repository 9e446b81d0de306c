"""The ``quantize`` verb: load → opset ≥ 13 → ORT pre-processing → activation ranges → QDQ → verify → report."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from .calibration import CalibrationSet
from .calibration.activations import relu_gaps
from .calibration.split import CalibrationSplit, check_task
from .errors import ConfigError
from .fidelity import TASKS
from .graph.interface import restore_interface
from .graph.io import ModelLike, load_proto
from .graph.matching import match_nodes
from .graph.runtime import pieces, run_all, session
from .graph.shapes import representative_shapes
from .graph.skeleton import skeleton
from .passes import equalize
from .passes.reconstruct import reconstruct
from .passes.relu_activations import fusable_activations, relu_activations
from .passes.tile_rows import tile_rows
from .pipeline import prepare
from .progress import Progress, log_progress
from .quantization.qdq import check_float32, decode_tail
from .quantization.latency import slow_int8_layers
from .quantization.prelu import PreluChoice, check_prelu_mode, rewrite_prelu
from .quantization.layer_error import WEIGHTED_OPS, LayerError, layer_errors, worst_layers
from .quantization import (THRESHOLDS, check_not_quantized, int8_kernels, is_int8_kernel, pre_process, quantize_qdq,
                           to_opset13)
from .verify import verify

DEFAULT_THRESHOLDS = "mse"
# --relu replaces an activation only when its negative side carries at most this share of its output
# energy on the calibration data. RetinaFace-mnet's LeakyReLU(0.1): 0-3% each (refitted, AP nearly kept);
# MobileFaceNet's learnt PReLUs: 9-90% (replacing them all took the embedding cosine to 0).
RELU_MAX_GAP = 0.05


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
    layer_errors: list[dict] = field(default_factory=list)  # per quantized tensor, see quantization/layer_error.py
    relu_replaced: list[str] = field(default_factory=list)  # LeakyRelu/PRelu nodes made Relu (``relu=True``)
    tiled: dict | None = None  # the float prefix run in row strips (``tile=True``): nodes, strips
    prelu: dict | None = None  # exact PRelu rewrites before int8 (``prelu=``): PreluChoice.to_dict()

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
        if self.relu_replaced:
            lines.append(f"activations made ReLU (fused into int8 convs, then refitted): {len(self.relu_replaced)}")
        if self.prelu:
            lines.append(PreluChoice.from_dict(self.prelu).summary())
        if self.fidelity_summary:
            lines += ["held-out " + self.fidelity_summary.splitlines()[0]] + self.fidelity_summary.splitlines()[1:]
        lines += self._worst_layers()
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"time: {self.seconds:.1f} s")
        return "\n".join(lines)


    def _worst_layers(self, n: int = 5) -> list[str]:
        rows = worst_layers([LayerError(**r) for r in self.layer_errors], n)
        if not rows:
            return []
        db = lambda v: f"{v:6.1f}" if v is not None else "     -"  # noqa: E731  (None: no error at all)
        lines = [f"layers adding the most int8 error (of {len(self.layer_errors)} quantized tensors; "
                 "SQNR dB vs float / own QDQ / weights):"]
        lines += [f"  {r.node[-48:]:48s} {r.op_type:14s} {db(r.sqnr_db)} {db(r.qdq_sqnr_db)} {db(r.weight_sqnr_db)}"
                  f"  +{r.added:.2e}" for r in rows]
        return lines


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
    """(nodes matched by --exclude, patterns that matched none): the rule every verb uses."""
    return match_nodes((n.name for n in model.graph.node), patterns)


def _relu(graph: ir.Model, exclude: Sequence[str], float_slow_layers: bool, split: CalibrationSplit,
          say: Progress) -> tuple[ir.Model, list[str], list[str]]:
    """LeakyRelu/PRelu after the convs that will be int8 made ReLU, and the layers reading them refitted."""
    proto = skeleton(graph)  # names and weight shapes are all the two rules read
    keep_float = set(_matching(proto, exclude)[0]) | (set(slow_int8_layers(proto)) if float_slow_layers else set())
    candidates = fusable_activations(graph, float_nodes=keep_float)
    if not candidates:
        return graph, [], ["--relu: no LeakyRelu/PRelu directly after an int8 conv; nothing replaced"]
    gaps = relu_gaps(graph, candidates, split.input_name, split.batches)
    close = [n for n in candidates if gaps[n] <= RELU_MAX_GAP]
    notes = [] if len(close) == len(candidates) else [
        f"--relu: {len(candidates) - len(close)} activation(s) kept: their negative side carries over "
        f"{RELU_MAX_GAP:.0%} of their output energy on the calibration data (largest {max(gaps.values()):.0%})"]
    new, record = relu_activations(graph, close)
    if not record.replaced:
        return graph, [], notes
    say(f"refitting the layers after {len(record.replaced)} activations made ReLU")
    new, fits = reconstruct(graph, new, None, set(), split.input_name, split.batches, changed=record.outputs)
    ops = sorted({op for _, op in record.replaced})
    return new, [n for n, _ in record.replaced], [
        f"--relu: {len(record.replaced)} {'/'.join(ops)} made ReLU (fused into int8 convs by ORT), "
        f"{len(fits.layers)} layers after them refitted; the fidelity above includes this change"] + notes


# Tiled and untiled models run the same arithmetic on the same rows; allow float reassociation only.
TILE_TOLERANCE = 1e-4


def _tile(quantized: onnx.ModelProto, split: CalibrationSplit, shape) -> tuple[onnx.ModelProto, dict | None, str]:
    """``quantized`` with its high-resolution prefix in row strips, if that reproduces its outputs.

    Checked on a calibration batch against the untiled model: a rewrite that changed the outputs
    would be a bug, and the untiled model is kept (with a note) rather than shipped.
    """
    tiled, record = tile_rows(ir.from_proto(quantized), shape)
    if not record.tiled:
        return quantized, None, f"row tiling: nothing tiled ({record.reason})"
    proto = restore_interface(ir.to_proto(tiled), quantized)  # onnx-ir also writes value_info for initializers
    feed = pieces(quantized, split.batches[:1], split.input_name)
    want, got = run_all(session(quantized), split.input_name, feed), run_all(session(proto), split.input_name, feed)
    for w, g in zip(want, got):
        scale = max(float(np.abs(w).max(initial=0.0)), 1.0)
        if w.shape != g.shape or float(np.abs(w.astype(np.float64) - g).max(initial=0.0)) > TILE_TOLERANCE * scale:
            return quantized, None, "row tiling changed the outputs; left untiled (please report this model)"
    return proto, {"nodes": record.nodes, "strips": record.strips}, (
        f"row tiling: the first {len(record.nodes)} nodes (the full-resolution layers) run in {record.strips} strips "
        "of rows that fit in the CPU cache; outputs unchanged")


def most_harmful_layer(float_model: onnx.ModelProto, rows: Sequence[LayerError],
                       skip: Sequence[str] = ()) -> str | None:
    """The quantized Conv/Gemm/MatMul whose output error grows most over its inputs' error.

    ``rows``: the per-layer table of the quantized model (:func:`layer_errors`).
    """
    names = {n.name for n in float_model.graph.node if n.name} - set(skip)
    candidates = [r for r in rows if r.op_type.split("+")[0] in WEIGHTED_OPS and r.node in names]
    return max(candidates, key=lambda r: r.added).node if candidates else None


def quantize(model: ModelLike, calibration: CalibrationSet, *, thresholds: str = DEFAULT_THRESHOLDS,
             per_channel: bool = True, exclude: Sequence[str] = (), holdout: float = 0.25, task: str = "auto",
             equalize_ranges: bool = True, max_drop: float | None = None, max_float_layers: int = 8,
             float_slow_layers: bool = True, relu: bool = False, tile: bool = True, prelu: str = "auto",
             progress: Progress | None = None) -> QuantizeResult:
    """Static int8 QDQ model of ``model``, with activation ranges chosen by ``thresholds`` on ``calibration``.

    Before quantization, BatchNorm is folded and channel ranges are equalised across layers
    (``equalize_ranges``, function-preserving), which int8 needs on depthwise architectures.
    With ``max_drop``, the layers that add the most error are kept in float, one at a time, until
    the held-out fidelity drop (1 - task metric, or 1 - mean output cosine) is at most ``max_drop``.
    ``float_slow_layers`` keeps in float the layers ORT's int8 CPU kernels run slower than fp32
    (3-channel stem conv or depthwise conv with under 16 outputs: ``quantization/latency.py``).
    ``relu`` trades fidelity for speed: LeakyRelu/PRelu after int8 convs become ReLU, which ORT
    fuses into the conv, and the layers reading them are refitted on the calibration samples
    (``passes/relu_activations.py``); the reported fidelity includes that change.
    ``tile`` runs the full-resolution layers of the result in strips of rows (``passes/tile_rows.py``):
    the same outputs, faster where those layers are bound by memory traffic (detector stems).
    ``prelu`` rewrites PRelu nodes exactly into ops ORT runs fast (``passes/prelu_split.py``; it has no
    int8 PRelu): ``auto`` (default) where timing on the model says so, ``split`` all, ``keep`` none.
    With ``relu`` the nearly-ReLU ones become ReLU first; the rest are rewritten exactly.
    """
    start = time.perf_counter()
    if thresholds not in THRESHOLDS:
        raise ConfigError(f"--thresholds must be one of {', '.join(THRESHOLDS)}, got {thresholds!r}")
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    check_prelu_mode(prelu)
    say = progress or log_progress
    notes: list[str] = []
    original = load_proto(model)
    check_not_quantized(original)
    check_float32(original)
    if thresholds == "trained":
        try:
            from .quantization import trained  # noqa: F401
        except ImportError:
            notes.append("trained thresholds need PyTorch (pip install 'onnxprune[torch]'); used mse")
            thresholds = "mse"
    shapes = representative_shapes(original)
    split = CalibrationSplit.split(calibration, holdout, shapes)
    check_task(original, calibration, task)  # before any expensive work; refuses a batch fixed above 1
    say("pre-processing for quantization")
    prep = prepare(original, simplify=True)  # BN folded, Identity removed: what equalisation needs
    graph = prep.model
    replaced: list[str] = []
    if relu:
        graph, replaced, relu_notes = _relu(graph, exclude, float_slow_layers, split, say)
        notes += relu_notes
    if equalize_ranges:
        graph, eq = equalize(graph)
        notes.append(f"cross-layer equalisation on {len(eq.pairs)} conv pairs")
    graph, prelu_done = rewrite_prelu(graph, prelu, split.input_name, split.batches, exclude=exclude, progress=say)
    pre = pre_process(to_opset13(ir.to_proto(graph)))
    float_ops = [n.name for n in pre.graph.node if n.name in set(prelu_done.float_nodes)]  # exact slopes
    excluded, unmatched = _matching(pre, exclude)
    notes += [f"--exclude {p!r} matched no node" for p in unmatched]
    if float_slow_layers:
        slow = [n for n in slow_int8_layers(pre) if n not in excluded]
        excluded += slow
        if slow:
            notes.append(f"kept in float for CPU speed (int8 kernels slower there): {len(slow)} node(s)")
    tail = [n for n in decode_tail(pre) if n not in excluded]
    if tail:
        excluded += tail
        notes.append(f"box decoding kept in float: {len(tail)} node(s) from Exp on (int8 cannot hold exp's range)")
    ranges = None
    if thresholds == "trained":
        from .quantization.qdq import compute_ranges
        from .quantization.trained import train_ranges
        say("activation ranges (mse) to start from")
        init = compute_ranges(pre, split.input_name, split.batches, "mse", say)
        first, _ = quantize_qdq(pre, split.input_name, split.batches, thresholds="mse", ranges=init,
                                per_channel=per_channel, exclude_nodes=excluded + float_ops)
        say("training activation thresholds")
        ranges, train_notes = train_ranges(pre, split.input_name, split.batches, init=init, qdq=first,
                                           progress=say)
        notes += train_notes
    def attempt(ranges, exclude_nodes: list[str]):
        """Quantize, measure each layer (on ``pre``'s names, so before restoring the interface), evaluate."""
        q, rec = quantize_qdq(pre, split.input_name, split.batches, thresholds=thresholds, ranges=ranges,
                              per_channel=per_channel, exclude_nodes=[*exclude_nodes, *float_ops], progress=say)
        say("per-layer quantization error")
        table = layer_errors(pre, q, split.input_name, split.batches)
        q = restore_interface(q, original)
        return q, rec, table, split.evaluate(original, q, task)

    say(f"quantizing ({thresholds})")
    quantized, record, rows, fidelity = attempt(ranges, excluded)
    kept_float: list[str] = []
    while max_drop is not None and 1 - fidelity.headline()[1] > max_drop and len(kept_float) < max_float_layers:
        worst = most_harmful_layer(pre, rows, skip=excluded + kept_float)
        if worst is None:
            break
        kept_float.append(worst)
        say(f"keeping {worst} in float ({len(kept_float)})")
        quantized, record, rows, fidelity = attempt(record.ranges or None, excluded + kept_float)
    if max_drop is not None:
        drop = 1 - fidelity.headline()[1]
        notes.append(f"--max-drop {max_drop}: drop {drop:.4f} with {len(kept_float)} layer(s) kept in float"
                     + ("" if drop <= max_drop else " (target not reached)"))
    excluded = excluded + kept_float
    tiled = None
    if tile:
        say("row tiling")
        quantized, tiled, tile_note = _tile(quantized, split, shapes.get(split.input_name))
        notes.append(tile_note)
    say("verifying the output model")
    verify(original, quantized, shapes)
    report = QuantizeReport(
        model=str(model) if not isinstance(model, onnx.ModelProto) else "<in-memory model>", output=None,
        thresholds=thresholds, per_channel=per_channel, size_before=original.ByteSize(),
        size_after=quantized.ByteSize(), kernels=int8_kernels(quantized), excluded=excluded,
        ranges=len(record.ranges), fidelity=fidelity.to_dict() if fidelity else None,
        fidelity_summary=fidelity.summary() if fidelity else "", notes=notes + record.notes,
        seconds=time.perf_counter() - start, layer_errors=[r.to_dict() for r in rows], relu_replaced=replaced,
        tiled=tiled, prelu=prelu_done.to_dict() if prelu_done.summary() else None)
    return QuantizeResult(quantized, report, split.preview)
