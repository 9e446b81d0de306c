"""Unstructured magnitude pruning of the weights channel pruning kept: the sparse half of "double pruning".

Network slimming removes whole channels (a smaller dense graph, faster everywhere); this pass then
zeroes the smallest-magnitude weights inside the Conv/Gemm/MatMul layers that are left. ONNX
Runtime's dense kernels run zeros at full cost, so what falls is the download: the zeros are stored
inline and the file compresses (README, "Sparse weights", has the measured alternatives).

- **Split.** The budget is a share of all the layers' weights, met exactly: ``round(sparsity × N)``
  zeros. With calibration data each layer is pruned alone at the target and ±``band`` (refitted as
  below, on its own inputs) and the distortion of the network's outputs is measured (the metric of
  the channel budget's scan, :mod:`onnxprune.sensitivity`); within the band the budget goes where
  distortion per zeroed weight is lowest (greedy on each curve's lower convex hull). The band
  exists because each layer is scanned alone: an unrestricted split zeroed whole detector heads and
  stacked sparsity in layers that only hurt together. Layers under 1% of the weights (depthwise,
  heads), and every layer without data, get the target share (largest-remainder rounding keeps
  the total exact); a global magnitude threshold would wipe layers whose weights are small only
  because of their scale.
- **Mask.** In each layer, the ``k`` weights of smallest ``|w|`` (ties by position), reached
  gradually: at most ``STEP`` of a layer's weights are zeroed between two refits, each step ranking
  the weights the last refit left.
- **Refit.** In graph order, each layer's surviving weights and its bias are re-solved by least
  squares so that, on calibration rows, its output from the *sparse* network's inputs matches the
  reference's (upstream errors are absorbed, as in ``reconstruct``); the zeros stay zero. Per output
  o with surviving inputs S: ``(G_SS + λI) θ_S = H_So + λ θ0_S``. Then each output's gain is set so
  its variance matches the target's (``_match_gain``: least squares on noisy inputs shrinks outputs,
  and a detector's face scores with them). A layer with too few rows for its unknowns (a head after
  global pooling) gets only its bias corrected; a refit that does not lower the layer's error on
  the calibration rows is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import ConfigError
from ..executors import LocalExecutor, TaskExecutor
from ..graph.matching import match_nodes
from ..graph.runtime import pieces, session
from ..graph.interface import exposing
from ..sensitivity import distortion
from .checks import CheckedPass, shapes_of
from .rows import input_rows, up_to

BAND = 0.1  # each layer's sparsity stays within ±BAND of the target (README, "Sparse weights": wider hurt)
SCAN_MIN_SHARE = 0.01  # layers smaller than this share of the weights are not scanned: they get the target
MAX_UNKNOWNS = 2048  # per output; above this only the bias is corrected (the solves grow as d³)
MIN_ROWS_PER_UNKNOWN = 4.0
STEP = 0.2  # gradual pruning: at most this share of a layer's weights is zeroed between two refits
HUGE = 1e30  # distortion of a failed or non-finite scan point: the budget goes there last


@dataclass(frozen=True)
class LayerSparsity:
    node: str
    weights: int
    zeros: int
    error_zeroed: float | None = None  # relative squared output error on calibration rows, zeros alone
    error_refit: float | None = None  # after the refit (None: not refitted)


@dataclass(frozen=True)
class SparsifyRecord:
    target: float  # requested share of the layers' weights set to zero
    split: str  # "sensitivity" (scanned on calibration data) or "uniform"
    layers: list[LayerSparsity] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # layers left dense, and why
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # node -> (sparsity, distortion)

    @property
    def total(self) -> int:
        return sum(l.weights for l in self.layers)

    @property
    def zeros(self) -> int:
        return sum(l.zeros for l in self.layers)


@dataclass
class SparsifyResult(ir.passes.PassResult):
    record: SparsifyRecord = field(default_factory=lambda: SparsifyRecord(0.0, "uniform"))


@dataclass
class _Layer:
    node: str
    kind: str  # conv | gemm | matmul
    in_name: str
    out_name: str  # the node's output (for MatMul: its bias Add's output when the bias is editable)
    weight: str
    bias: str | None  # an initializer this layer alone reads, one value per output; else no bias term
    groups: int
    trans_b: bool
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_out(self) -> int:
        return self.shape[0] if self.kind == "conv" or self.trans_b else self.shape[1]


def check_sparsity(sparsity: float) -> None:
    """One-line error unless ``0 <= sparsity < 1`` (a NaN fails too)."""
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ConfigError(f"--sparsity must be in [0, 1) (share of the remaining weights set to zero), got {sparsity}")


class Sparsify(CheckedPass, ir.passes.FunctionalPass):
    """Set ``round(sparsity × N)`` of the model's N layer weights to zero; the input model is not modified.

    ``batches`` (calibration samples for ``input_name``) enable the sensitivity split and the
    refit; ``scan_batches`` (default: the first batch) are what the scan runs on. ``exclude``
    patterns (regex or glob on node names, as ``--exclude``) keep layers dense.

    The refit makes each layer reproduce the same layer of ``reference`` (default: the model the
    pass runs on), e.g. the model before channel pruning, whose layers' outputs ``keep_out`` maps
    to this one's (node -> which of the reference layer's output channels this layer still has).
    """

    def __init__(self, sparsity: float, *, exclude: Sequence[str] = (), reference: ir.Model | None = None,
                 keep_out: Mapping[str, np.ndarray] | None = None, input_name: str | None = None,
                 batches: Sequence[np.ndarray] | None = None, scan_batches: Sequence[np.ndarray] | None = None,
                 refit: bool = True, band: float = BAND, executor: TaskExecutor | None = None,
                 workers: int = 2, ridge: float = 1e-3, rows_per_image: int = 256, seed: int = 0,
                 progress: Callable[..., None] | None = None, check: bool | None = None) -> None:
        super().__init__(check=check)
        check_sparsity(sparsity)
        self.sparsity, self.exclude, self.reference, self.keep_out = sparsity, exclude, reference, keep_out
        self.input_name, self.batches, self.scan_batches = input_name, batches, scan_batches
        self.refit, self.band, self.executor, self.workers = refit, band, executor, workers
        self.ridge, self.rows_per_image, self.seed = ridge, rows_per_image, seed
        self.say = progress or (lambda *a: None)
        self.check_shapes = shapes_of(input_name, batches)

    def call(self, model: ir.Model) -> SparsifyResult:
        sparsity, input_name, batches, band = self.sparsity, self.input_name, self.batches, self.band
        out = model.clone()  # tensors shared: new weights replace them, never edit them
        layers, skipped = _layers(out, self.exclude)
        calibrated = batches is not None and input_name is not None
        if not layers or sparsity == 0:
            return SparsifyResult(out, False, SparsifyRecord(float(sparsity), "uniform", skipped=skipped))
        dense = {l.node: out.graph.initializers[l.weight].const_value.numpy() for l in layers}
        total = sum(l.size for l in layers)
        budget = int(round(sparsity * total))
        scanned = [l for l in layers if l.size >= SCAN_MIN_SHARE * total] if calibrated and band > 0 else []
        counts = _split_uniform(layers, budget, sparsity)
        curves: dict[str, list[tuple[float, float]]] = {}
        if scanned:
            grid = sorted({round(min(max(sparsity + d, 0.0), 1.0), 6) for d in (-band, 0.0, band)} - {0.0})
            scan_feeds = pieces(model, list(self.scan_batches or list(batches)[:1]), input_name)
            curves = _scan(out, scanned, dense, input_name, scan_feeds, grid, self.refit, self.ridge,
                           self.rows_per_image, self.seed, self.executor, self.workers,
                           lambda i, n: self.say("sparsity scan", i, n))
            # small layers keep the target share
            rest = budget - sum(counts[l.node] for l in layers if l not in scanned)
            counts.update(_split_by_curves(scanned, curves, rest, sparsity, band))
        if calibrated and self.refit:
            fits = self._zero(model, out, layers, dense, counts)
        else:
            fits = {}
            for l in layers:
                keep = _magnitude_keep(dense[l.node], counts[l.node])
                _write(out.graph.initializers[l.weight], np.where(keep, dense[l.node], 0).astype(dense[l.node].dtype))
        record = SparsifyRecord(float(sparsity), "sensitivity" if scanned else "uniform", skipped=skipped,
                                curves=curves)
        for l in layers:
            w = out.graph.initializers[l.weight].const_value.numpy()
            before, after = fits.get(l.node, (None, None))
            record.layers.append(LayerSparsity(l.node, l.size, int(l.size - np.count_nonzero(w)), before, after))
        return SparsifyResult(out, record.zeros > 0, record)

    def _zero(self, model: ir.Model, out: ir.Model, layers: list[_Layer], dense: dict[str, np.ndarray],
              counts: dict[str, int]) -> dict[str, tuple[float, float | None]]:
        """Zero ``counts`` weights per layer of ``out`` gradually, refitting after each step; the fits."""
        input_name = self.input_name
        feeds = pieces(model, list(self.batches), input_name)
        targets, spread = _refit_targets(model, self.reference, self.keep_out or {}, layers, input_name, feeds,
                                         self.rows_per_image, self.seed)
        steps = max(1, int(np.ceil(self.sparsity / STEP - 1e-9)))
        fits: dict[str, tuple[float, float | None]] = {}
        for step in range(1, steps + 1):  # gradual: each step zeroes more of what the last refit made smallest
            current = {l.node: out.graph.initializers[l.weight].const_value.numpy() for l in layers}
            masks = {l.node: _magnitude_keep(current[l.node], int(round(counts[l.node] * step / steps)))
                     for l in layers}
            fits = _refit(out, layers, current, dense, masks, targets, spread, input_name, feeds, self.ridge,
                          lambda i, n, k=step: self.say(f"refitting sparse layers (step {k} of {steps})", i, n))
        return fits


def sparsify(model: ir.Model, sparsity: float, *, exclude: Sequence[str] = (), reference: ir.Model | None = None,
             keep_out: Mapping[str, np.ndarray] | None = None, input_name: str | None = None,
             batches: Sequence[np.ndarray] | None = None, scan_batches: Sequence[np.ndarray] | None = None,
             refit: bool = True, band: float = BAND, executor: TaskExecutor | None = None,
             workers: int = 2, ridge: float = 1e-3, rows_per_image: int = 256, seed: int = 0,
             progress: Callable[..., None] | None = None) -> tuple[ir.Model, SparsifyRecord]:
    """A copy of ``model`` with ``round(sparsity × N)`` of its N layer weights set to zero (:class:`Sparsify`)."""
    result = Sparsify(sparsity, exclude=exclude, reference=reference, keep_out=keep_out, input_name=input_name,
                      batches=batches, scan_batches=scan_batches, refit=refit, band=band, executor=executor,
                      workers=workers, ridge=ridge, rows_per_image=rows_per_image, seed=seed,
                      progress=progress)(model)
    return result.model, result.record


# --------------------------------------------------------------------------------------------------- layers
def _layers(model: ir.Model, exclude: Sequence[str]) -> tuple[list[_Layer], list[str]]:
    """The Conv/Gemm/MatMul layers whose weight this pass may zero, in graph order, and those it leaves."""
    excluded = set(match_nodes([n.name for n in model.graph], exclude)[0])  # the --exclude rule of every verb
    layers, skipped = [], []
    for node in model.graph:  # topological order
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w is None or w.const_value is None or w.name not in model.graph.initializers:
            continue  # a weight computed at run time (an activation × activation MatMul): not a parameter
        if node.name in excluded:
            skipped.append(f"{node.name}: excluded")
            continue
        if len(w.uses()) != 1:
            skipped.append(f"{node.name}: shared weight")
            continue
        if w.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            skipped.append(f"{node.name}: {w.const_value.dtype.name} weight")
            continue
        shape = tuple(int(d) for d in w.const_value.shape)
        kind, trans_b, groups = node.op_type.lower(), bool(node.attributes.get_int("transB", 0)), 1
        if kind == "conv":
            groups = node.attributes.get_int("group", 1)
        elif kind == "gemm" and (node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0
                                 or node.attributes.get_float("beta", 1.0) != 1.0):
            skipped.append(f"{node.name}: transposed or scaled Gemm")
            continue
        elif kind == "matmul" and len(shape) != 2:
            skipped.append(f"{node.name}: {len(shape)}-d MatMul weight")
            continue
        layer = _Layer(node.name, kind, node.inputs[0].name, node.outputs[0].name, w.name, None, groups, trans_b, shape)
        bias = node.inputs[2] if kind != "matmul" and len(node.inputs) > 2 else None
        if kind == "matmul":
            uses = node.outputs[0].uses()
            if len(uses) == 1 and uses[0].node.op_type == "Add":
                other = uses[0].node.inputs[1 - uses[0].idx]
                if _editable(model, other, layer.n_out):
                    bias, layer.out_name = other, uses[0].node.outputs[0].name
        if bias is not None and _editable(model, bias, layer.n_out):
            layer.bias = bias.name
        elif bias is not None and kind != "matmul":
            layer.bias = None
            layer.out_name = ""  # a bias it cannot edit: zeroed, never refitted
        layers.append(layer)
    return layers, skipped


def _editable(model: ir.Model, value: ir.Value | None, n_out: int) -> bool:
    """A constant bias this layer alone reads, one value per output: the refit may change it."""
    return (value is not None and value.const_value is not None and value.name in model.graph.initializers
            and len(value.uses()) == 1 and int(np.prod(value.const_value.shape)) == n_out)


# ---------------------------------------------------------------------------------------------------- split
def _magnitude_keep(w: np.ndarray, k: int) -> np.ndarray:
    """False at the ``k`` entries of smallest |w| (ties by position), True elsewhere."""
    keep = np.ones(w.size, bool)
    keep[np.argsort(np.abs(w).ravel(), kind="stable")[:k]] = False
    return keep.reshape(w.shape)


def _split_uniform(layers: list[_Layer], budget: int, sparsity: float) -> dict[str, int]:
    """The same share in every layer; the remainders go to the largest fractional parts (exact total)."""
    want = np.array([sparsity * l.size for l in layers])
    counts = np.floor(want).astype(np.int64)
    extra = budget - int(counts.sum())
    order = sorted(range(len(layers)), key=lambda i: (-(want[i] - counts[i]), i))
    for i in order[:max(extra, 0)]:
        counts[i] += 1
    return {l.node: int(min(c, l.size)) for l, c in zip(layers, counts)}


def _split_by_curves(layers: list[_Layer], curves: dict[str, list[tuple[float, float]]], budget: int,
                     sparsity: float, band: float) -> dict[str, int]:
    """Exactly ``budget`` zeros, each layer between ``sparsity ± band``, spread where distortion per zeroed
    weight is lowest.

    Each layer starts at its lower bound. Its measured curve between the bounds is replaced by its
    lower convex hull, whose segments have rising cost per weight; the cheapest segments across
    all layers are taken whole, the last one in part. If the bounds cannot hold the budget (rounding),
    the layers' upper bounds are lifted to the whole layer.
    """
    counts, segments = {}, []  # segments: (cost per weight, layer index, segment index, weights)
    for i, l in enumerate(layers):
        pts = sorted((s, min(d, HUGE)) for s, d in curves[l.node])
        xs, ds = [s for s, _ in pts], list(np.maximum.accumulate([d for _, d in pts]))  # more zeros never help
        lo, hi = max(sparsity - band, 0.0), min(sparsity + band, 1.0)
        klo, khi = int(round(lo * l.size)), int(round(hi * l.size))
        inner = [(int(round(x * l.size)), d) for x, d in zip(xs, ds) if klo < round(x * l.size) < khi]
        hull = _lower_hull([(klo, _interp(lo, xs, ds))] + inner + [(khi, _interp(hi, xs, ds))])
        hull.append((l.size, HUGE))  # beyond the band: only if rounding leaves no other room
        counts[l.node] = klo
        for j, ((k0, d0), (k1, d1)) in enumerate(zip(hull, hull[1:])):
            if k1 > k0:
                segments.append(((d1 - d0) / (k1 - k0), i, j, k1 - k0))
    segments.sort()
    left = budget - sum(counts.values())
    if left < 0:  # the lower bounds alone exceed the budget (a band narrower than the rounding): no split
        return _split_uniform(layers, budget, budget / max(sum(l.size for l in layers), 1))
    for _, i, _, size in segments:
        if left <= 0:
            break
        take = min(size, left)
        counts[layers[i].node] += take
        left -= take
    return counts


def _interp(x: float, xs: list[float], ds: list[float]) -> float:
    """The curve at ``x``; beyond the last measured point, its last slope continues."""
    if x <= xs[-1] or len(xs) < 2:
        return float(np.interp(x, xs, ds))
    return float(ds[-1] + max(ds[-1] - ds[-2], 0.0) / max(xs[-1] - xs[-2], 1e-9) * (x - xs[-1]))


def _lower_hull(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Lower convex hull of points sorted by x with distinct x (monotone chain)."""
    hull: list[tuple[int, float]] = []
    for p in points:
        if hull and p[0] == hull[-1][0]:
            if p[1] >= hull[-1][1]:
                continue
            hull.pop()
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] is on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


# ----------------------------------------------------------------------------------------------------- scan
@dataclass
class _ScanShared:
    """What every scan job reads; shipped once per worker, the model as ONNX bytes."""

    model: onnx.ModelProto
    input_name: str
    feeds: list[np.ndarray]
    reference: list[np.ndarray]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "model": self.model.SerializeToString()}

    def __setstate__(self, state: dict) -> None:
        state["model"] = onnx.load_from_string(state["model"])
        self.__dict__.update(state)


def _scan_job(shared: _ScanShared, item: tuple[str, float, dict[str, np.ndarray]]) -> float:
    """Output distortion with one layer's weights (and bias) replaced by ``item``'s arrays."""
    _, _, arrays = item
    inits = {t.name: t for t in shared.model.graph.initializer}
    saved = {n: onnx.TensorProto() for n in arrays}
    for name, arr in arrays.items():
        saved[name].CopyFrom(inits[name])
        inits[name].CopyFrom(onnx.numpy_helper.from_array(arr, name))
    try:
        sess = session(shared.model, threads=1)
    finally:
        for name, t in saved.items():  # the shared model stays as it was for the next job
            inits[name].CopyFrom(t)
    got = [np.concatenate(outs) for outs in zip(*(sess.run(None, {shared.input_name: x}) for x in shared.feeds))]
    return distortion(shared.reference, got)


def _scan(model: ir.Model, layers: list[_Layer], dense: dict[str, np.ndarray], input_name: str,
          feeds: list[np.ndarray], grid: Sequence[float], refit: bool, ridge: float, per_image: int, seed: int,
          executor: TaskExecutor | None, workers: int, progress) -> dict[str, list[tuple[float, float]]]:
    """Per layer: (sparsity, output distortion) with that layer alone zeroed and refitted on its own inputs."""
    proto = ir.to_proto(model)
    sess = session(proto)
    reference = [np.concatenate(o) for o in zip(*(sess.run(None, {input_name: x}) for x in feeds))]
    del sess
    stats = _dense_stats(proto, layers, input_name, feeds, per_image, seed)
    jobs = []
    for l in layers:
        G, n = stats[l.node]
        theta0 = _theta(l, dense[l.node], _bias(model, l))
        H = G @ theta0  # target: the dense layer's own output
        ey2 = np.einsum("gio,gio->go", theta0, H)  # E[y²] of the dense output
        want = ey2 - np.einsum("gi,gio->go", G[:, -1, :], theta0) ** 2 if l.bias is not None else ey2
        for s in grid:
            k = int(round(s * l.size))
            if k < 1:
                continue
            free = _theta_mask(l, _magnitude_keep(dense[l.node], k))
            if refit and l.out_name:  # as the final refit does, on this layer's own (dense) inputs
                theta = _match_gain(l, _solve(l, G, H, n, theta0, free, ridge), G, want, free)
            else:
                theta = np.where(free, theta0, 0.0)
            w, b = _unpack(l, theta, dense[l.node])
            arrays = {l.weight: w}
            if l.bias is not None:
                arrays[l.bias] = b.reshape(model.graph.initializers[l.bias].const_value.shape.numpy()).astype(w.dtype)
            jobs.append((l.node, float(s), arrays))
    own = executor is None
    pool = executor or LocalExecutor(workers)
    try:
        outcomes = pool.map(_scan_job, jobs, _ScanShared(proto, input_name, feeds, reference), progress=progress)
    finally:
        if own:
            pool.close()
    curves: dict[str, list[tuple[float, float]]] = {l.node: [(0.0, 0.0)] for l in layers}
    for (node, s, _), o in zip(jobs, outcomes):
        if o.ok:
            curves[node].append((s, min(float(o.value), HUGE) if not np.isnan(o.value) else HUGE))
    for l in layers:  # a layer whose every point failed stays dense (a steep curve), never guessed cheap
        if len(curves[l.node]) == 1:
            curves[l.node].append((1.0, HUGE))
    return curves


def _dense_stats(proto: onnx.ModelProto, layers: list[_Layer], input_name: str, feeds: list[np.ndarray],
                 per_image: int, seed: int, chunk: int = 16) -> dict[str, tuple[np.ndarray, int]]:
    """Per layer: the Gram matrix (per group, bias column last) of its input rows, and the row count."""
    nodes = {n.name: n for n in ir.from_proto(proto).graph}
    out: dict[str, tuple[np.ndarray, int]] = {}
    for start in range(0, len(layers), chunk):
        group = layers[start:start + chunk]
        names = sorted(({l.in_name for l in group} | {nodes[l.node].outputs[0].name for l in group}) - {input_name})
        sess = session(exposing(proto, names))
        order = [o.name for o in sess.get_outputs()]
        rngs = {l.node: np.random.default_rng(seed) for l in group}
        G = {l.node: None for l in group}
        rows = {l.node: 0 for l in group}
        for x in feeds:
            vals = {**dict(zip(order, sess.run(None, {input_name: x}))), input_name: x}
            for l in group:
                node = nodes[l.node]
                idx, hw = _positions(l, vals[node.outputs[0].name], rngs[l.node], per_image)
                X = _grouped(l, input_rows(node, vals[l.in_name], idx, hw))
                g = np.matmul(X.transpose(0, 2, 1), X)
                G[l.node] = g if G[l.node] is None else G[l.node] + g
                rows[l.node] += X.shape[1]
            del vals
        for l in group:
            out[l.node] = (G[l.node] / max(rows[l.node], 1), rows[l.node])
    return out


def _positions(l: _Layer, y: np.ndarray, rng: np.random.Generator, per_image: int):
    """Sampled output positions of a conv (None: every row of a Gemm/MatMul) and the output's (H, W)."""
    if l.kind != "conv":
        return None, (0, 0)
    hw = (y.shape[2], y.shape[3])
    return rng.choice(hw[0] * hw[1], size=min(per_image, hw[0] * hw[1]), replace=False), hw


def _out_rows(l: _Layer, y: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
    if l.kind != "conv":
        return np.asarray(y.reshape(-1, y.shape[-1]), np.float64)
    oy, ox = np.divmod(idx, y.shape[3])
    return np.asarray(y[:, :, oy, ox].transpose(0, 2, 1).reshape(-1, y.shape[1]), np.float64)


def _grouped(l: _Layer, X: np.ndarray) -> np.ndarray:
    """Input rows [N, d] as [groups, N, d/groups (+1 bias column)]."""
    g = l.groups
    Xg = X.reshape(len(X), g, -1).transpose(1, 0, 2)
    if l.bias is not None:
        Xg = np.concatenate([Xg, np.ones((g, len(X), 1))], axis=2)
    return Xg


# ------------------------------------------------------------------------------------------- weights <-> θ
def _theta(l: _Layer, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Weights (and bias, last row) as [groups, d_g (+1), outputs per group], float64."""
    w = np.asarray(w, np.float64)
    if l.kind == "conv":
        o = w.shape[0]
        t = w.reshape(l.groups, o // l.groups, -1).transpose(0, 2, 1)
    else:
        t = (w.T if l.trans_b else w)[None]
    if l.bias is not None:
        t = np.concatenate([t, np.asarray(b, np.float64).reshape(l.groups, 1, -1)], axis=1)
    return t


def _theta_mask(l: _Layer, keep: np.ndarray) -> np.ndarray:
    """Which entries of θ are free (the bias always is)."""
    m = _theta(_Layer(l.node, l.kind, "", "", "", None, l.groups, l.trans_b, l.shape), keep, None) != 0
    if l.bias is not None:
        m = np.concatenate([m, np.ones((m.shape[0], 1, m.shape[2]), bool)], axis=1)
    return m


def _unpack(l: _Layer, theta: np.ndarray, like: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    b = theta[:, -1, :].reshape(-1) if l.bias is not None else None
    t = theta[:, :-1, :] if l.bias is not None else theta
    if l.kind == "conv":
        w = t.transpose(0, 2, 1).reshape(like.shape)
    else:
        w = t[0].T if l.trans_b else t[0]
    return np.ascontiguousarray(w).astype(like.dtype), b


def _bias(model: ir.Model, l: _Layer) -> np.ndarray | None:
    return model.graph.initializers[l.bias].const_value.numpy().reshape(-1) if l.bias is not None else None


# ---------------------------------------------------------------------------------------------------- solve
def _solve(l: _Layer, G: np.ndarray, H: np.ndarray, rows: int, theta0: np.ndarray, free: np.ndarray,
           ridge: float) -> np.ndarray:
    """θ with zeros where not ``free``, the rest least squares (ridge toward ``theta0``); outputs with too
    many unknowns for the rows (or for a quick solve) get only their bias corrected."""
    theta = np.where(free, theta0, 0.0)
    for g in range(G.shape[0]):
        Gg, d = G[g], G.shape[1]
        lam = ridge * np.trace(Gg) / d
        for o in range(theta.shape[2]):
            S = np.flatnonzero(free[g, :, o])
            if len(S) > MAX_UNKNOWNS or rows < MIN_ROWS_PER_UNKNOWN * len(S):
                if l.bias is None:
                    continue
                S = np.array([d - 1])  # bias alone, the weights fixed at their zeroed values
            fixed = np.setdiff1d(np.arange(d), S)
            rhs = H[g][S, o] - Gg[np.ix_(S, fixed)] @ theta[g, fixed, o] + lam * theta0[g, S, o]
            try:
                theta[g, S, o] = np.linalg.solve(Gg[np.ix_(S, S)] + lam * np.eye(len(S)), rhs)
            except np.linalg.LinAlgError:  # singular even with the ridge: this output keeps its zeroed weights
                pass
    return theta


def _error(G: np.ndarray, H: np.ndarray, yy: float, theta: np.ndarray) -> float:
    """Mean squared residual of the layer output relative to its energy (G, H, yy per row)."""
    quad = float(np.einsum("gio,gio->", theta, np.matmul(G, theta)))
    return (quad - 2 * float(np.einsum("gio,gio->", theta, H)) + yy) / max(yy, 1e-30)


# ---------------------------------------------------------------------------------------------------- refit
def _refit_targets(model: ir.Model, reference: ir.Model | None, keep_out: Mapping[str, np.ndarray],
                   layers: list[_Layer], input_name: str, feeds: list[np.ndarray], per_image: int,
                   seed: int) -> tuple[dict[str, list], dict[str, np.ndarray]]:
    """What each layer's refit aims at: the ``reference`` layer's outputs (its kept channels); a layer the
    reference does not map onto (another width, a renamed output) aims at ``model``'s own output. And
    the spread of those targets (see ``_match_gain``)."""
    todo = [l for l in layers if l.out_name]
    targets = _targets(ir.to_proto(reference), todo, keep_out, input_name, feeds, per_image, seed) \
        if reference is not None else {}
    rest = [l for l in todo if l.node not in targets]
    targets.update(_targets(ir.to_proto(model), rest, {}, input_name, feeds, per_image, seed) if rest else {})
    return targets, {l.node: _spread(l, [Y for _, _, Y in targets[l.node]]) for l in todo}


def _spread(l: _Layer, rows: list[np.ndarray]) -> np.ndarray:
    """Per output [groups, outputs per group]: the variance of these rows (their second moment without a bias)."""
    Y = np.concatenate(rows)
    Y = Y.reshape(len(Y), l.groups, -1)
    return Y.var(axis=0) if l.bias is not None else (Y * Y).mean(axis=0)


def _refit(out: ir.Model, layers: list[_Layer], current: dict[str, np.ndarray], dense: dict[str, np.ndarray],
           masks: dict[str, np.ndarray], targets: dict[str, list], spread: dict[str, np.ndarray], input_name: str,
           feeds: list[np.ndarray], ridge: float, progress) -> dict[str, tuple[float, float | None]]:
    """Zero (``masks``) and refit each layer of ``out`` in graph order on the sparse network's own inputs.

    Returns node -> (error of the dense weights zeroed by the mask, error after the refit or None when
    it was dropped), both relative to the target's energy on the calibration rows.
    """
    nodes = {n.name: n for n in out.graph}
    fits = {}
    for i, l in enumerate(layers):
        theta0 = _theta(l, current[l.node], _bias(out, l))
        free = _theta_mask(l, masks[l.node])
        if not l.out_name:
            _write(out.graph.initializers[l.weight], _unpack(l, np.where(free, theta0, 0.0), current[l.node])[0])
            continue
        sess = session(up_to(out, l.in_name)) if l.in_name != input_name else None
        G = H = ey2 = None
        rows = 0
        for x, (idx, hw, Y) in zip(feeds, targets[l.node]):
            inp = sess.run(None, {input_name: x})[0] if sess is not None else x
            X = _grouped(l, input_rows(nodes[l.node], inp, idx, hw))
            Yg = Y.reshape(len(Y), l.groups, -1).transpose(1, 0, 2)
            g, h, e = np.matmul(X.transpose(0, 2, 1), X), np.matmul(X.transpose(0, 2, 1), Yg), (Yg * Yg).sum(axis=1)
            G, H, ey2 = (g, h, e) if G is None else (G + g, H + h, ey2 + e)
            rows += X.shape[1]
        del sess
        G, H, ey2 = G / rows, H / rows, ey2 / rows
        yy = float(ey2.sum())
        fitted = _solve(l, G, H, rows, theta0, free, ridge)
        zeroed = np.where(free, theta0, 0.0)
        errors = {"zeroed": _error(G, H, yy, zeroed)}
        candidates = [_match_gain(l, fitted, G, spread[l.node], free), fitted]
        theta, after = zeroed, None
        for c in candidates:  # the gain-matched refit, else the plain one, if it beats the zeros alone
            err = _error(G, H, yy, c)
            if np.isfinite(err) and err < errors["zeroed"]:
                theta, after = c, err
                break
        w, b = _unpack(l, theta, current[l.node])
        _write(out.graph.initializers[l.weight], np.where(masks[l.node], w, 0).astype(w.dtype))
        if l.bias is not None and after is not None:
            bias_v = out.graph.initializers[l.bias]
            _write(bias_v, b.reshape(bias_v.const_value.shape.numpy()).astype(bias_v.const_value.numpy().dtype))
        plain = np.where(_theta_mask(l, masks[l.node]), _theta(l, dense[l.node], _bias(out, l)), 0.0)
        fits[l.node] = (max(_error(G, H, yy, plain), 0.0), max(after, 0.0) if after is not None else None)
        progress(i + 1, len(layers))
    return fits


def _match_gain(l: _Layer, theta: np.ndarray, G: np.ndarray, want_spread: np.ndarray, free: np.ndarray) -> np.ndarray:
    """θ with each output's spread on the calibration rows scaled to ``want_spread`` (see ``_spread``).

    Least squares on inputs that carry the upstream layers' errors shrinks outputs toward their mean
    (errors in the regressors attenuate the fit): compounded over a detector's layers, face scores
    sink below the threshold. Each output's weights are scaled so its variance (second moment without
    a bias) is the target's, the bias keeping its mean. Zeros stay zero. (Matching the dense slim
    layer's variance instead of the unpruned reference's lowered AP on RetinaFace: README.)
    """
    out = theta.copy()
    for g in range(theta.shape[0]):
        for o in range(theta.shape[2]):
            t = theta[g, :, o]
            m2 = float(t @ G[g] @ t)
            want = float(want_spread[g, o])
            if l.bias is not None:
                mean = float(G[g, -1] @ t)  # E[ŷ] (the ones column is last)
                spread = m2 - mean * mean
            else:
                spread = m2
            if spread <= 1e-12 * max(want, 1e-30) or want <= 0:
                continue
            a = np.sqrt(want / spread)
            out[g, :, o] = np.where(free[g, :, o], t * a, 0.0)
            if l.bias is not None:
                out[g, -1, o] = t[-1] * a + mean * (1 - a)  # E[ŷ] unchanged
    return out


def _targets(proto: onnx.ModelProto, layers: list[_Layer], keep_out: Mapping[str, np.ndarray], input_name: str,
             feeds: list[np.ndarray], per_image: int, seed: int, chunk: int = 16) -> dict[str, list]:
    """Per layer and feed: sampled positions, output (H, W) and ``proto``'s output rows there (the
    ``keep_out`` channels); layers whose output ``proto`` lacks or whose width differs are left out."""
    known = {o for n in proto.graph.node for o in n.output}
    out: dict[str, list] = {}
    todo = [l for l in layers if l.out_name in known]
    for start in range(0, len(todo), chunk):
        group = todo[start:start + chunk]
        sess = session(exposing(proto, sorted({l.out_name for l in group})))
        order = [o.name for o in sess.get_outputs()]
        rngs = {l.node: np.random.default_rng(seed) for l in group}
        rows: dict[str, list] = {l.node: [] for l in group}
        for x in feeds:
            vals = dict(zip(order, sess.run(None, {input_name: x})))
            for l in group:
                y = vals[l.out_name]
                idx, hw = _positions(l, y, rngs[l.node], per_image)
                Y = _out_rows(l, y, idx)
                keep = keep_out.get(l.node)
                if keep is not None and len(keep) == Y.shape[1]:
                    Y = Y[:, keep]
                rows[l.node].append((idx, hw, Y))
            del vals
        out.update({node: r for node, r in rows.items() if all(Y.shape[1] == _width(group, node) for _, _, Y in r)})
    return out


def _width(layers: list[_Layer], node: str) -> int:
    return next(l.n_out for l in layers if l.node == node)


def _write(value: ir.Value, arr: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(arr), name=value.name)
