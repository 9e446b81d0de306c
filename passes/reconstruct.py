"""Label-free recovery: refit each layer that lost input channels to reproduce its original output.

ThiNet / He et al. (2017): after channels are removed, a consumer layer sees fewer inputs. Its
weights (and bias) are re-solved by least squares so that, on calibration images, its output from
the *pruned* network's activations matches the *original* network's output. Using the pruned
network's own inputs also absorbs the error of the layers before it. The solve is ridge-
regularised toward the current weights, done in float64, from Gram matrices accumulated batch by
batch, so memory is bounded by the sampled rows of one batch, not the calibration set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from ..graph.runtime import pieces, session
from ..graph.interface import exposing
from ..channels.analysis import ChannelAnalysis
from .checks import CheckedPass, shapes_of
from .rows import input_rows, up_to


@dataclass(frozen=True)
class LayerFit:
    node: str
    error_before: float  # relative squared error of the layer output on the calibration rows
    error_after: float


@dataclass(frozen=True)
class ReconstructRecord:
    layers: list[LayerFit] = field(default_factory=list)  # filled while the pass runs, then never again
    skipped: list[str] = field(default_factory=list)  # "node: why"


@dataclass
class ReconstructResult(ir.passes.PassResult):
    record: ReconstructRecord = field(default_factory=ReconstructRecord)


@dataclass
class _Target:
    node: str
    kind: str  # conv | gemm | matmul
    in_name: str
    out_name: str  # in the original model (for matmul: its bias Add's output when there is one)
    keep_out: np.ndarray
    weight: str
    bias: str | None
    trans_b: bool = False
    gram: np.ndarray | None = None
    cross: np.ndarray | None = None
    yy: float = 0.0
    rows: int = 0


class Reconstruct(CheckedPass, ir.passes.FunctionalPass):
    """Refit the consumers of removed channels in the pruned model the pass runs on, against ``original``.

    The configuration is the data: ``original`` (the reference the layers are refitted to), ``analysis``
    and ``removed`` (which channels the pruned model lost), and calibration ``batches`` for ``input_name``
    (an iterable read once per run). ``changed`` names activations whose values differ from
    ``original``'s without losing channels (e.g. a LeakyReLU replaced by ReLU): the first weighted
    layers reading them are refitted too. Without ``analysis`` (nothing removed), output channels map
    one to one, unless ``keep_out`` says, per layer, which of the original's outputs the pruned model
    still has (several removals apart). ``downstream``: also refit every later dense layer whose input
    differs from the original's, though it lost no channel (the detection and embedding heads after a
    pruned backbone), each against the original's output. The pruned model is not modified.
    """

    def __init__(self, original: ir.Model, analysis: ChannelAnalysis | None, removed: set[int], input_name: str,
                 batches: Iterable[np.ndarray], *, changed: Collection[str] = (), ridge: float = 1e-3,
                 rows_per_image: int = 256, seed: int = 0, min_rows_per_unknown: float = 4.0,
                 keep_out: Mapping[str, np.ndarray] | None = None, downstream: bool = False,
                 check: bool | None = None) -> None:
        super().__init__(check=check)
        self.downstream = downstream
        self.original, self.analysis, self.removed = original, analysis, removed
        self.input_name, self.batches = input_name, batches
        self.changed, self.keep_out = changed, keep_out
        self.ridge, self.rows_per_image, self.seed = ridge, rows_per_image, seed
        self.min_rows_per_unknown = min_rows_per_unknown
        self.check_shapes = shapes_of(input_name, batches)

    def call(self, model: ir.Model) -> ReconstructResult:
        original, input_name = self.original, self.input_name
        pruned = model.clone()  # tensors shared: refits replace them, never edit them
        record = ReconstructRecord()
        reads = _drifted(original, pruned, self.changed) if self.downstream else _reached(pruned, self.changed)
        targets = _targets(original, pruned, self.analysis, self.removed, record, reads, self.keep_out or {})
        if not targets:
            return ReconstructResult(pruned, False, record)
        feeds = pieces(original, list(self.batches), input_name)
        # The original's outputs do not change: one pass samples every target's rows (and the positions
        # they were taken at). The pruned model is then run per target, in graph order, each layer
        # fitted on the activations of the already-refitted layers before it, so errors do not compound
        # (fitting all at once made outputs worse); each run stops at the target's input.
        wanted = _original_rows(original, targets, input_name, feeds, self.rows_per_image, self.seed)
        nodes = {n.name: n for n in pruned.graph}  # refits replace tensors, never nodes
        for t in targets:
            _accumulate(pruned, nodes[t.node], t, input_name, feeds, wanted[t.node])
            _solve(pruned, nodes[t.node], t, self.ridge, record, self.min_rows_per_unknown)
        return ReconstructResult(pruned, bool(record.layers), record)


def reconstruct(original: ir.Model, pruned: ir.Model, analysis: ChannelAnalysis | None, removed: set[int],
                input_name: str, batches: Iterable[np.ndarray], *, changed: Collection[str] = (),
                ridge: float = 1e-3, rows_per_image: int = 256, seed: int = 0,
                min_rows_per_unknown: float = 4.0, keep_out: Mapping[str, np.ndarray] | None = None,
                downstream: bool = False) -> tuple[ir.Model, ReconstructRecord]:
    """Return a copy of ``pruned`` whose consumers of removed channels are refitted (:class:`Reconstruct`)."""
    result = Reconstruct(original, analysis, removed, input_name, batches, changed=changed, ridge=ridge,
                         rows_per_image=rows_per_image, seed=seed, min_rows_per_unknown=min_rows_per_unknown,
                         keep_out=keep_out, downstream=downstream)(pruned)
    return result.model, result.record


Rows = tuple[np.ndarray | None, tuple[int, int], np.ndarray]  # sampled positions, output (H, W), output rows


def _original_rows(original: ir.Model, targets: list[_Target], input_name: str, feeds: list[np.ndarray],
                   per_image: int, seed: int, chunk: int = 16) -> dict[str, list[Rows]]:
    """Per target and feed: the sampled output positions (None: every row), the output's spatial
    size and the original's rows there.

    ``chunk`` targets are read per pass, which bounds the activations alive at once.
    """
    rows: dict[str, list[Rows]] = {t.node: [] for t in targets}
    for start in range(0, len(targets), chunk):
        group = targets[start:start + chunk]
        sess = session(exposing(original, sorted({t.out_name for t in group})))
        names = [o.name for o in sess.get_outputs()]
        rngs = {t.node: np.random.default_rng(seed) for t in group}  # one stream per target, as if run alone
        for x in feeds:
            ys = dict(zip(names, sess.run(None, {input_name: x})))
            for t in group:
                y = ys[t.out_name]
                if t.kind == "conv":
                    hw = (y.shape[2], y.shape[3])
                    idx = rngs[t.node].choice(hw[0] * hw[1], size=min(per_image, hw[0] * hw[1]), replace=False)
                    oy, ox = np.divmod(idx, hw[1])
                    Y = y[:, :, oy, ox].transpose(0, 2, 1).reshape(-1, y.shape[1])
                else:
                    idx, hw, Y = None, (0, 0), y.reshape(-1, y.shape[-1])
                rows[t.node].append((idx, hw, np.asarray(Y[:, t.keep_out], np.float64)))
            del ys
    return rows


def _accumulate(pruned: ir.Model, node: ir.Node, t: _Target, input_name: str, feeds: list[np.ndarray],
                wanted: list[Rows]) -> None:
    sess = session(up_to(pruned, t.in_name))
    for x, (idx, hw, Y) in zip(feeds, wanted):
        X = input_rows(node, sess.run(None, {input_name: x})[0], idx, hw)
        X = np.hstack([X, np.ones((len(X), 1))])
        t.gram = X.T @ X if t.gram is None else t.gram + X.T @ X
        t.cross = X.T @ Y if t.cross is None else t.cross + X.T @ Y
        t.yy += float((Y * Y).sum())
        t.rows += len(X)


WEIGHTED = ("Conv", "Gemm", "MatMul")


def _reached(model: ir.Model, changed: Collection[str]) -> set[str]:
    """``changed`` and every value computed from them by parameter-free ops (Add, Concat, Resize...)."""
    reached = set(changed)
    if not reached:
        return reached
    for node in model.graph:  # topological order
        if node.op_type in WEIGHTED:
            continue
        if any(v is not None and v.name in reached for v in node.inputs):
            reached.update(o.name for o in node.outputs)
    return reached


def _drifted(original: ir.Model, pruned: ir.Model, changed: Collection[str]) -> set[str]:
    """Every value of ``pruned`` that may differ from ``original``'s: ``changed``, and everything
    computed from them or by a node that lost channels (a weight of another shape) or is new."""
    before = {n.name: n for n in original.graph}
    drifted = set(changed)
    for node in pruned.graph:  # topological order
        if (node.name not in before or _reshaped(node, before[node.name])
                or any(v is not None and v.name in drifted for v in node.inputs)):
            drifted.update(o.name for o in node.outputs)
    return drifted


def _reshaped(node: ir.Node, before: ir.Node) -> bool:
    """Whether ``node`` has other inputs than ``before``, or a constant input of another shape."""
    if len(node.inputs) != len(before.inputs):
        return True
    return any(a is not None and b is not None and a.const_value is not None and b.const_value is not None
               and tuple(a.const_value.shape) != tuple(b.const_value.shape) for a, b in zip(node.inputs, before.inputs))


def _targets(original: ir.Model, pruned: ir.Model, analysis: ChannelAnalysis | None, removed: set[int],
             record: ReconstructRecord, reads: set[str], keep_out: Mapping[str, np.ndarray]) -> list[_Target]:
    """The layers to refit: those that lost input channels, and those whose input is in ``reads``."""
    removed_arr = np.array(sorted(removed), dtype=np.int64)
    orig_nodes = {n.name: n for n in original.graph}
    out_slots = {s.node: s for s in analysis.slots if s.role == "out"} if analysis is not None else {}
    targets = []
    for node in pruned.graph:
        if node.op_type not in WEIGHTED or node.name not in orig_nodes:
            continue
        w, w0 = node.inputs[1], orig_nodes[node.name].inputs[1]
        if w is None or w.const_value is None or w0 is None or w0.const_value is None:
            continue
        in_axis = {"Conv": 1, "MatMul": 0}.get(node.op_type, 1 if node.attributes.get_int("transB", 0) else 0)
        if w.const_value.shape[in_axis] == w0.const_value.shape[in_axis] and node.inputs[0].name not in reads:
            continue  # this layer lost no input channel and reads what it read before
        if node.op_type == "Conv" and node.attributes.get_int("group", 1) != 1:
            record.skipped.append(f"{node.name}: grouped")
            continue
        if node.op_type == "Gemm" and (node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0
                                       or node.attributes.get_float("beta", 1.0) != 1.0):
            record.skipped.append(f"{node.name}: transposed or scaled Gemm")
            continue
        if len(w.uses()) != 1:
            record.skipped.append(f"{node.name}: shared weight")
            continue
        out_name, bias = node.outputs[0].name, None
        if node.op_type == "MatMul":
            uses = node.outputs[0].uses()
            if len(uses) == 1 and uses[0].node.op_type == "Add":
                add = uses[0].node
                other = add.inputs[1 - uses[0].idx]
                if other is not None and other.const_value is not None and len(other.uses()) == 1:
                    out_name, bias = add.outputs[0].name, other.name
        elif len(node.inputs) > 2 and node.inputs[2] is not None:
            if node.inputs[2].const_value is None or len(node.inputs[2].uses()) != 1:
                record.skipped.append(f"{node.name}: shared or runtime bias")
                continue
            bias = node.inputs[2].name
        slot = out_slots.get(node.name)
        n_out = w0.const_value.shape[0 if node.op_type == "Conv" or node.attributes.get_int("transB", 0) else 1]
        if node.name in keep_out:
            keep = keep_out[node.name]
        else:
            keep = ~np.isin(analysis.root[slot.elems], removed_arr) if slot is not None else np.ones(n_out, bool)
        kind = node.op_type.lower()
        targets.append(_Target(node.name, kind, node.inputs[0].name, out_name, keep, w.name, bias,
                               bool(node.attributes.get_int("transB", 0))))
    return targets


def _solve(model: ir.Model, node: ir.Node, t: _Target, ridge: float, record: ReconstructRecord,
           min_rows_per_unknown: float = 4.0) -> None:
    W = node.inputs[1].const_value.numpy()
    dtype = W.dtype
    if t.kind == "conv":
        w0 = W.reshape(W.shape[0], -1).T.astype(np.float64)  # [d, out]
    elif t.kind == "gemm" and t.trans_b:
        w0 = W.T.astype(np.float64)
    else:
        w0 = W.astype(np.float64)
    bias_v = model.graph.initializers[t.bias] if t.bias else None
    b0 = bias_v.const_value.numpy().reshape(-1).astype(np.float64) if bias_v is not None else np.zeros(w0.shape[1])
    theta0 = np.vstack([w0, b0[None, :]])
    if t.gram is None or theta0.shape[1] != t.cross.shape[1]:
        record.skipped.append(f"{t.node}: shape mismatch")
        return
    G, H = t.gram / t.rows, t.cross / t.rows
    d = G.shape[0]
    if t.rows < min_rows_per_unknown * d:  # e.g. a head after global pooling: one row per image
        record.skipped.append(f"{t.node}: {t.rows} calibration rows for {d} unknowns per output")
        return
    lam = ridge * np.trace(G) / d
    theta = np.linalg.solve(G + lam * np.eye(d), H + lam * theta0)

    def err(th: np.ndarray) -> float:  # mean squared residual, relative to the output energy
        return float(np.einsum("ij,ij->", th, G @ th) - 2 * np.einsum("ij,ij->", th, H) + t.yy / t.rows) / (t.yy / t.rows)

    before, after = err(theta0), err(theta)
    if not np.isfinite(after) or after >= before:
        record.skipped.append(f"{t.node}: refit did not reduce the error")
        return
    w_new, b_new = theta[:-1], theta[-1]
    if t.kind == "conv":
        w_new = w_new.T.reshape(W.shape)
    elif t.kind == "gemm" and t.trans_b:
        w_new = w_new.T
    _write(node.inputs[1], w_new.astype(dtype))
    if bias_v is not None:
        _write(bias_v, b_new.reshape(bias_v.const_value.shape.numpy()).astype(dtype))
    else:  # Conv or Gemm without a bias yet
        name = f"{node.name}.bias_refit"
        value = ir.Value(name=name, const_value=ir.tensor(b_new.astype(dtype), name=name),
                         shape=ir.Shape(b_new.shape), type=ir.TensorType(ir.DataType.from_numpy(dtype)))
        model.graph.register_initializer(value)
        node.resize_inputs(3)
        node.replace_input_with(2, value)
    record.layers.append(_fit(t.node, before, after))


def _fit(node: str, before: float, after: float) -> LayerFit:
    return LayerFit(node, max(before, 0.0), max(after, 0.0))


def _write(value: ir.Value, arr: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(arr), name=value.name)
