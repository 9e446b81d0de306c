"""The ``quantize`` verb: load → opset ≥ 13 → ORT pre-processing → activation ranges → QDQ → ORT's calibrators
compared → verify → report.

Each stage is a function handing the next a typed value: :func:`_begin` (checks, split) → :func:`_float_model`
(:class:`FloatModel`: the graph ORT's quantizer gets, and the nodes it leaves float) → :func:`_ranges` →
:func:`_attempt` (:class:`Attempt`: a QDQ model scored on the held-out samples) → :func:`_learnt_rounding`
(``adaround``) → :func:`_compare_ort` (:class:`CalibratorComparison`) → :func:`_keep_float` and
:func:`_precise_prelu` (``max_drop``) → :func:`_finish` (tiling, verification, :class:`QuantizeReport`).
"""

from __future__ import annotations

import dataclasses
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
from .fidelity import MIN_HELD_OUT, TASKS, FidelityReport
from .graph.interface import restore_interface
from .graph.io import ModelLike, load_proto
from .graph.matching import match_nodes
from .graph.metrics import model_cost
from .graph.runtime import pieces, run_all, session
from .graph.shapes import representative_shapes
from .graph.skeleton import skeleton
from .passes import equalize
from .passes.reconstruct import reconstruct
from .passes.relu_activations import fusable_activations, relu_activations
from .passes.tile_rows import tile_rows
from .pipeline import prepare
from .progress import Progress, log_progress
from .quantization.calibrators import ORT_CALIBRATORS, ActivationStats, make_calibrator, missing
from .quantization.qdq import QuantizeRecord, check_float32, decode_tail
from .quantization.latency import slow_int8_layers
from .quantization.prelu import PreluChoice, check_prelu_mode, rewrite_prelu
from .quantization.islands import islands
from .quantization.layer_error import WEIGHTED_OPS, LayerError, layer_errors, worst_layers
from .quantization import (THRESHOLDS, check_not_quantized, int8_kernels, is_int8_kernel, pre_process, quantize_qdq,
                           to_opset13)
from .verify import verify

DEFAULT_THRESHOLDS = "mse"
# --relu replaces an activation only when its negative side carries at most this share of its output
# energy on the calibration data. RetinaFace-mnet's LeakyReLU(0.1): 0-3% each (refitted, AP nearly kept);
# MobileFaceNet's learnt PReLUs: 9-90% (replacing them all took the embedding cosine to 0).
RELU_MAX_GAP = 0.05
# compare_ort=None compares ORT's calibrators when the float model's MACs times the calibration samples stay
# under this: each candidate costs an ORT calibration pass (unoptimised, one sample at a time), a QDQ export
# and a held-out evaluation: in all 1-1.4 s per 1e9 of MACs x samples on an x86 core (ORT 1.32). MobileFaceNet
# 112x112 (0.22 GMAC x 40 images) +12 s on a 10 s run; age-v1 64x64 +2.6 s on 3 s; RetinaFace-mnet0.25
# 640x640 (1.06 GMAC x 29 images) +31 s on 20 s, so at 64 images it is left to --ort-compare on.
ORT_COMPARE_MAX_MACS = 20e9
# ORT's ranges are kept only when they score better than ours by more than float noise between runs: on the
# fidelity headline, or on a tie there (top-1 agreement on a few images often ties) on the mean output cosine.
ORT_WIN_MARGIN = 1e-6


@dataclass(frozen=True)
class QuantizeOptions:
    """Static int8 (see :func:`quantize`), checked when made so a bad value fails before any work."""

    thresholds: str = DEFAULT_THRESHOLDS  # the calibrator (``quantization/calibrators.py``)
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    equalize: bool = True
    max_drop: float | None = None
    max_float_layers: int = 8  # with max_drop
    float_slow_layers: bool = True
    relu: bool = False
    tile: bool = True
    prelu: str = "auto"  # exact PRelu rewrite before int8: auto (timed), split, keep
    compare_ort: bool | None = None  # ORT's MinMax/Percentile/Entropy ranges as candidates; None: when cheap
    adaround: bool = False  # weights rounded by each layer's output (AdaRound), kept if better held out

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        check_prelu_mode(self.prelu)
        if self.thresholds not in THRESHOLDS:
            raise ConfigError(f"--thresholds must be one of {', '.join(THRESHOLDS)}, got {self.thresholds!r}")
        if self.max_drop is not None and not 0 <= self.max_drop < 1:
            raise ConfigError(f"--max-drop must be in [0, 1), got {self.max_drop}")
        if self.max_float_layers < 1:
            raise ConfigError(f"--max-float-layers must be at least 1, got {self.max_float_layers}")


@dataclass
class CalibratorScore:
    """One calibrator's ranges made into the QDQ model, scored on the held-out samples (higher is better)."""

    calibrator: str  # a --thresholds name: ours first, then ort-minmax, ort-percentile, ort-entropy
    score: float  # the fidelity headline (task metric, else mean output cosine)
    cosine: float  # mean output cosine: breaks ties of ``score``
    seconds: float  # its calibration, QDQ export and evaluation (ours: and its per-layer error table)


@dataclass
class CalibratorComparison:
    """``quantize``'s ranges against ONNX Runtime's own calibrators on the same calibration split, each made
    into the same QDQ model (ORT's quantizer, ``TensorQuantOverrides``, same float nodes): the best was kept."""

    metric: str  # what ``score`` is: "embedding cosine", "detection AP@0.5", ...
    held_out: int  # samples scored on
    requested: str  # the calibrator asked for (``thresholds``)
    winner: str
    candidates: list[CalibratorScore] = field(default_factory=list)
    seconds: float = 0.0  # the comparison's extra time (ORT calibrations, exports, evaluations)

    def summary(self) -> str:
        scores = ", ".join(f"{c.calibrator} {c.score:.5f}" + (f" (cos {c.cosine:.5f})" if c.score != c.cosine else "")
                           for c in self.candidates)
        kept = "kept" if self.winner == self.requested else "ORT's ranges kept:"
        return (f"calibrators on {self.held_out} held-out ({self.metric}): {scores}; {kept} {self.winner} "
                f"(+{self.seconds:.1f} s)")


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
    calibrators: CalibratorComparison | None = None  # ORT's calibrators compared (``compare_ort``), or None

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
        if self.calibrators:
            lines.append(self.calibrators.summary())
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


# --max-drop first keeps layers float while each island closes at least this share of the remaining gap
# to the target, then (PRelu models) tries the more precise PRelu rewrite, then resumes without this rule.
STALL_SHARE = 0.25

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


def quantize(model: ModelLike, calibration: CalibrationSet, options: QuantizeOptions | None = None, *,
             holdout: float = 0.25, task: str = "auto", progress: Progress | None = None,
             **fields: Any) -> QuantizeResult:
    """Static int8 QDQ model of ``model``, with activation ranges chosen on ``calibration``.

    ``options``: a :class:`QuantizeOptions`, or its fields as keywords (``thresholds="trained", relu=True``),
    which override those of ``options``. ``holdout``: share of ``calibration`` kept out of fitting to
    measure fidelity (``task``: see ``fidelity.TASKS``).

    Before quantization, BatchNorm is folded and channel ranges are equalised across layers
    (``equalize``, function-preserving), which int8 needs on depthwise architectures.
    ``thresholds`` names the calibrator choosing the ranges (``quantization/calibrators.py``).
    ``compare_ort``: ONNX Runtime's MinMax, Percentile and Entropy calibrators are also run on the
    same samples, each made into the same QDQ model and scored on the held-out samples, and the best
    ranges are kept (:class:`CalibratorComparison` in the report); None (default) does it when the
    held-out samples can tell them apart and the model is small (:func:`_why_not_compare`).
    With ``max_drop``, the layers that add the most error are kept in float, each alone or with the
    layers feeding it (an island), until the held-out fidelity drop (1 - task metric, or 1 - mean
    output cosine) is at most ``max_drop`` or ``max_float_layers`` are float; on a PReLU model whose
    PReLUs ``auto`` made Mul+Max, the absorb form is tried when islands stop paying.
    ``adaround`` rounds the weights by each layer's output (``quantization/rounding.py``, PyTorch),
    kept where it lowers the held-out error.
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
    options = dataclasses.replace(options or QuantizeOptions(), **fields)
    start = time.perf_counter()
    run = _begin(model, calibration, options, holdout, task, progress or log_progress)
    flt = _float_model(run)
    began = time.perf_counter()
    name, ranges = _ranges(run, flt)
    run.say(f"quantizing ({name})")
    ours = _attempt(run, flt, ranges, flt.excluded, name)
    ours.seconds = time.perf_counter() - began
    flt, ours = _learnt_rounding(run, flt, ours)
    best, comparison = _compare_ort(run, flt, ours)
    best, kept_float = _keep_float(run, flt, best, [], stall=STALL_SHARE if _absorb_untried(flt) else None)
    flt, best, kept_float = _precise_prelu(run, flt, best, kept_float)
    best, kept_float = _keep_float(run, flt, best, kept_float)
    _note_drop(run, best, kept_float)
    return _finish(run, flt, best, kept_float, comparison, start)


@dataclass
class _Run:
    """What the stages of one ``quantize`` call read, and the notes they add."""

    model: ModelLike
    original: onnx.ModelProto
    options: QuantizeOptions
    thresholds: str  # options.thresholds, or mse when that calibrator cannot run here
    task: str
    shapes: dict
    split: CalibrationSplit
    say: Progress
    notes: list[str] = field(default_factory=list)


def _begin(model: ModelLike, calibration: CalibrationSet, options: QuantizeOptions, holdout: float, task: str,
           say: Progress) -> _Run:
    """Checks on the input and the data, before any expensive work; the calibration split."""
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    original = load_proto(model)
    check_not_quantized(original)
    check_float32(original)
    thresholds, notes = options.thresholds, []
    why = missing(thresholds)
    if why:
        notes.append(f"{why}; used mse")
        thresholds = "mse"
    shapes = representative_shapes(original)
    split = CalibrationSplit.split(calibration, holdout, shapes)
    check_task(original, calibration, task)  # refuses a batch fixed above 1
    return _Run(model, original, options, thresholds, task, shapes, split, say, notes)


@dataclass
class FloatModel:
    """The float graph handed to ORT's quantizer (pre-processed, tensor names ORT's), and what stays float."""

    pre: onnx.ModelProto
    excluded: list[str]  # kept float by rule: --exclude, slow in int8 (float_slow_layers), box decoding
    float_ops: list[str]  # the PRelu rewrites' float nodes (exact slopes)
    relu_replaced: list[str]  # LeakyRelu/PRelu made Relu (``relu``)
    prelu: PreluChoice
    unrewritten: ir.Model  # the graph before the PRelu rewrite (``_precise_prelu`` redoes it)

    @property
    def float_nodes(self) -> list[str]:
        return [*self.excluded, *self.float_ops]


def _float_model(run: _Run) -> FloatModel:
    """BN folded, optional ReLU replacement, equalisation, PRelu rewrite, then ORT's pre-processing."""
    opts, split, say = run.options, run.split, run.say
    say("pre-processing for quantization")
    graph = prepare(run.original, simplify=True).model  # BN folded, Identity removed: what equalisation needs
    replaced: list[str] = []
    if opts.relu:
        graph, replaced, relu_notes = _relu(graph, opts.exclude, opts.float_slow_layers, split, say)
        run.notes += relu_notes
    if opts.equalize:
        graph, eq = equalize(graph)
        run.notes.append(f"cross-layer equalisation on {len(eq.pairs)} conv pairs")
    return _with_prelu(run, graph, opts.prelu, replaced)


def _with_prelu(run: _Run, graph: ir.Model, mode: str, replaced: list[str]) -> FloatModel:
    """``graph`` (before any PRelu rewrite) with its PRelu rewritten as ``mode`` says, pre-processed by ORT."""
    done_graph, prelu_done = rewrite_prelu(graph, mode, run.split.input_name, run.split.batches,
                                           exclude=run.options.exclude, progress=run.say)
    pre = pre_process(to_opset13(ir.to_proto(done_graph)))
    float_ops = [n.name for n in pre.graph.node if n.name in set(prelu_done.float_nodes)]  # exact slopes
    return FloatModel(pre, _kept_float_by_rule(run, pre), float_ops, replaced, prelu_done, graph)


def _kept_float_by_rule(run: _Run, pre: onnx.ModelProto) -> list[str]:
    """Nodes of ``pre`` left float: matched by --exclude, slower in int8 on CPU, box decoding from Exp on."""
    excluded, unmatched = _matching(pre, run.options.exclude)
    run.notes.extend(f"--exclude {p!r} matched no node" for p in unmatched)
    if run.options.float_slow_layers:
        slow = [n for n in slow_int8_layers(pre) if n not in excluded]
        excluded += slow
        if slow:
            run.notes.append(f"kept in float for CPU speed (int8 kernels slower there): {len(slow)} node(s)")
    tail = [n for n in decode_tail(pre) if n not in excluded]
    if tail:
        excluded += tail
        run.notes.append(f"box decoding kept in float: {len(tail)} node(s) from Exp on (int8 cannot hold exp's range)")
    return excluded


def _ranges(run: _Run, flt: FloatModel, also_float: Sequence[str] = ()) -> tuple[str, dict[str, tuple[float, float]]]:
    """(calibrator name, its range per activation tensor of ``flt.pre``), ``also_float`` left float too."""
    calibrator = make_calibrator(run.thresholds, per_channel=run.options.per_channel,
                                 exclude_nodes=(*flt.float_nodes, *also_float))
    stats = ActivationStats(flt.pre, run.split.input_name, run.split.batches, run.say)
    ranges = calibrator.ranges(stats)
    run.notes += stats.notes
    return calibrator.name, ranges


@dataclass
class Attempt:
    """One QDQ model of the float model and how it scores on the held-out samples."""

    model: onnx.ModelProto  # with the user's interface restored
    record: QuantizeRecord  # the calibrator's name, its ranges, the nodes left float
    fidelity: FidelityReport | None
    rows: list[LayerError]  # per-layer error table (empty until measured)
    qdq: onnx.ModelProto | None = None  # as ORT wrote it (``pre``'s interface), while ``rows`` is pending
    preview: str = ""  # the held-out detection preview of this model (detectors)
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return self.fidelity.headline()[1] if self.fidelity is not None else float("nan")

    @property
    def cosine(self) -> float:
        outputs = self.fidelity.outputs if self.fidelity is not None else []
        return float(np.mean([o.cosine for o in outputs])) if outputs else float("nan")

    def beats(self, other: Attempt) -> bool:
        """Better than ``other`` by more than ``ORT_WIN_MARGIN``: on the headline, or on a tie there on the cosine."""
        if abs(self.score - other.score) <= ORT_WIN_MARGIN:
            return self.cosine > other.cosine + ORT_WIN_MARGIN
        return self.score > other.score + ORT_WIN_MARGIN


def _attempt(run: _Run, flt: FloatModel, ranges: dict | None, excluded: list[str], thresholds: str, *,
             table: bool = True) -> Attempt:
    """Quantize with ``ranges``, measure each layer (``table``: on ``pre``'s names, so before restoring the
    interface; else the QDQ model is kept to measure later), evaluate on the held-out samples."""
    split = run.split
    q, rec = quantize_qdq(flt.pre, split.input_name, split.batches, thresholds=thresholds, ranges=ranges,
                          per_channel=run.options.per_channel, exclude_nodes=[*excluded, *flt.float_ops],
                          progress=run.say)
    rows: list[LayerError] = []
    raw = None
    if table:
        run.say("per-layer quantization error")
        rows = layer_errors(flt.pre, q, split.input_name, split.batches)
    else:
        raw = onnx.ModelProto()
        raw.CopyFrom(q)
    q = restore_interface(q, run.original)
    fidelity = split.evaluate(run.original, q, run.task)
    return Attempt(q, rec, fidelity, rows, raw, split.preview)


def _learnt_rounding(run: _Run, flt: FloatModel, ours: Attempt) -> tuple[FloatModel, Attempt]:
    """``adaround``: the weights rounded by each layer's output (``quantization/rounding.py``), kept only if
    the QDQ model made from them scores better on the held-out samples than ORT's nearest rounding."""
    if not run.options.adaround:
        return flt, ours
    if ours.fidelity is None:
        run.notes.append("--adaround: no held-out samples to judge it on; weights rounded to nearest")
        return flt, ours
    try:
        from .quantization.rounding import round_weights
    except ImportError:
        run.notes.append("--adaround needs PyTorch (pip install 'onnxprune[torch]'); weights rounded to nearest")
        return flt, ours
    pre, record = round_weights(flt.pre, run.split.input_name, run.split.batches,
                                per_channel=run.options.per_channel, exclude_nodes=flt.float_nodes,
                                progress=run.say)
    if not record.rounded:
        run.notes.append(record.summary())
        return flt, ours
    rounded = dataclasses.replace(flt, pre=pre)
    tried = _attempt(run, rounded, ours.record.ranges or None, flt.excluded, ours.record.thresholds)
    keep = tried.beats(ours)
    run.notes.append(f"{record.summary()}; held out {ours.score:.5f} -> {tried.score:.5f}, "
                     + ("kept" if keep else "not kept (nearest rounding)"))
    return (rounded, tried) if keep else (flt, ours)


def _compare_ort(run: _Run, flt: FloatModel, ours: Attempt) -> tuple[Attempt, CalibratorComparison | None]:
    """The best of ``ours`` and ORT's MinMax/Percentile/Entropy ranges on the same split, each exported the
    same way and scored on the held-out samples; ORT's must beat ours (:meth:`Attempt.beats`)."""
    why = _why_not_compare(run, flt, ours)
    if why is not None:
        run.notes += [f"ONNX Runtime's calibrators not compared: {why}"] if why else []
        return ours, None
    start = time.perf_counter()
    stats = ActivationStats(flt.pre, run.split.input_name, run.split.batches, run.say)
    scores = [CalibratorScore(ours.record.thresholds, ours.score, ours.cosine, ours.seconds)]
    best, made = ours, []
    for name in ORT_CALIBRATORS:
        if name == ours.record.thresholds:
            continue
        began = time.perf_counter()
        ranges = make_calibrator(name, exclude_nodes=tuple(flt.float_nodes)).ranges(stats)
        # ORT's Entropy at its default 128 bins often returns MinMax's ranges: the same model, made once
        candidate = next((a for r, a in made if r == ranges), None)
        if candidate is None:
            run.say(f"quantizing ({name}) to compare")
            candidate = _attempt(run, flt, ranges, flt.excluded, name, table=False)
            made.append((ranges, candidate))
        scores.append(CalibratorScore(name, candidate.score, candidate.cosine, time.perf_counter() - began))
        if candidate.beats(best):
            best = candidate
    if best is not ours:
        run.say("per-layer quantization error")
        best.rows = layer_errors(flt.pre, best.qdq, run.split.input_name, run.split.batches)
    best.qdq = None
    metric = ours.fidelity.headline()[0] if ours.fidelity is not None else ""
    held = ours.fidelity.n_inputs if ours.fidelity is not None else 0
    return best, CalibratorComparison(metric, held, ours.record.thresholds, best.record.thresholds, scores,
                                      time.perf_counter() - start)


def _why_not_compare(run: _Run, flt: FloatModel, ours: Attempt) -> str | None:
    """None to compare ORT's calibrators; '' when told not to; else why the automatic choice skips them."""
    mode = run.options.compare_ort
    if mode is False:
        return ""
    if ours.fidelity is None:
        return "no held-out fidelity to score them on"
    if mode:
        return None
    held, total = len(run.split.held), len(run.split.held) + len(run.split.fit)
    if held < MIN_HELD_OUT:
        return (f"{held} held-out samples, fewer than {MIN_HELD_OUT}: their scores would not tell the calibrators "
                "apart (compare_ort=True, --ort-compare on, forces it)")
    macs = model_cost(flt.pre, run.shapes).macs
    if macs * total > ORT_COMPARE_MAX_MACS:
        return (f"{macs / 1e9:.2f} GMAC x {total} samples is over the {ORT_COMPARE_MAX_MACS / 1e9:.0f} G it does "
                "automatically (each calibrator costs a calibration pass, a QDQ export and an evaluation; "
                "--ort-compare on forces it)")
    return None


def _keep_float(run: _Run, flt: FloatModel, best: Attempt, kept: list[str], *,
                stall: float | None = None) -> tuple[Attempt, list[str]]:
    """``max_drop``: the most harmful layers kept float (beyond ``kept``), one island at a time, until the
    held-out drop is small enough. Each step tries the layer alone, with the layers feeding it, and with
    those feeding them (``quantization/islands.py``), and keeps the best-scoring (on a tie, the smallest).
    ``stall``: stop, without taking it, at a step that closes less than this share of the gap to ``max_drop``."""
    max_drop, kept = run.options.max_drop, list(kept)
    while max_drop is not None and 1 - best.score > max_drop and len(kept) < run.options.max_float_layers:
        worst = most_harmful_layer(flt.pre, best.rows, skip=flt.excluded + kept)
        if worst is None:
            break
        candidates = [[n for n in island if n not in flt.excluded + kept] for island in islands(flt.pre, worst)]
        fits = [c for i, c in enumerate(candidates) if c not in candidates[:i]
                and len(kept) + len(c) <= run.options.max_float_layers]
        step = None
        for island in fits:
            run.say(f"keeping {', '.join(island)} in float ({len(kept) + len(island)})")
            tried = _attempt(run, flt, best.record.ranges or None, flt.excluded + kept + island,
                             best.record.thresholds)
            if step is None or tried.beats(step[1]):
                step = island, tried
        if stall is not None and step[1].score - best.score < stall * (1 - best.score - max_drop):
            break
        kept += step[0]
        best = step[1]
    return best, kept


def _absorb_untried(flt: FloatModel) -> bool:
    """``--prelu auto`` timed the absorb rewrite and chose Mul+Max everywhere for speed."""
    return flt.prelu.absorb_ratio is not None and not any(p == "absorb" for _, p in flt.prelu.rewritten)


def _precise_prelu(run: _Run, flt: FloatModel, best: Attempt,
                   kept: list[str]) -> tuple[FloatModel, Attempt, list[str]]:
    """``max_drop`` missed after ``--prelu auto`` chose the Mul+Max rewrite for speed: the absorb rewrite
    tried too (ReLU fused into doubled convs, so each activation is rounded once, on its ReLU'd range, where
    Mul+Max rounds the conv output and then the activation), with the same layers float (and the twins
    absorb makes of them), and kept if it scores better held out."""
    if run.options.max_drop is None or not _absorb_untried(flt) or 1 - best.score <= run.options.max_drop:
        return flt, best, kept
    before = list(run.notes)
    run.say("--max-drop: trying the absorb PRelu rewrite (one rounding per activation)")
    other = _with_prelu(run, flt.unrewritten, "split", flt.relu_replaced)
    twins = [n.name for n in other.pre.graph.node if n.name.removesuffix(".neg") in kept and n.name not in kept]
    name, ranges = _ranges(run, other, kept + twins)
    run.notes = before + [n for n in run.notes[len(before):] if n not in before]
    tried = _attempt(run, other, ranges, other.excluded + kept + twins, name)
    keep = tried.beats(best)
    run.notes.append(f"--max-drop: PRelu as absorb {tried.score:.5f} vs Mul+Max {best.score:.5f} held out, "
                     f"{len(kept)} layer(s) float; {'absorb' if keep else 'Mul+Max'} kept")
    if not keep:
        return flt, best, kept
    prelu = dataclasses.replace(other.prelu, mode=flt.prelu.mode, timings_ms=flt.prelu.timings_ms,
                                absorb_ratio=flt.prelu.absorb_ratio)
    return dataclasses.replace(other, prelu=prelu), tried, kept + twins


def _note_drop(run: _Run, best: Attempt, kept: list[str]) -> None:
    if run.options.max_drop is not None:
        drop = 1 - best.score
        run.notes.append(f"--max-drop {run.options.max_drop}: drop {drop:.4f} with {len(kept)} layer(s) kept in "
                         "float" + ("" if drop <= run.options.max_drop else " (target not reached)"))


def _finish(run: _Run, flt: FloatModel, best: Attempt, kept_float: list[str],
            comparison: CalibratorComparison | None, start: float) -> QuantizeResult:
    """Row tiling, verification against the original, and the report."""
    quantized, tiled = best.model, None
    if run.options.tile:
        run.say("row tiling")
        quantized, tiled, tile_note = _tile(quantized, run.split, run.shapes.get(run.split.input_name))
        run.notes.append(tile_note)
    run.say("verifying the output model")
    verify(run.original, quantized, run.shapes)
    fidelity, record = best.fidelity, best.record
    report = QuantizeReport(
        model=str(run.model) if not isinstance(run.model, onnx.ModelProto) else "<in-memory model>", output=None,
        thresholds=record.thresholds, per_channel=run.options.per_channel, size_before=run.original.ByteSize(),
        size_after=quantized.ByteSize(), kernels=int8_kernels(quantized), excluded=flt.excluded + kept_float,
        ranges=len(record.ranges), fidelity=fidelity.to_dict() if fidelity else None,
        fidelity_summary=fidelity.summary() if fidelity else "", notes=run.notes + record.notes,
        seconds=time.perf_counter() - start, layer_errors=[r.to_dict() for r in best.rows],
        relu_replaced=flt.relu_replaced, tiled=tiled, prelu=flt.prelu.to_dict() if flt.prelu.summary() else None,
        calibrators=comparison)
    return QuantizeResult(quantized, report, best.preview)
