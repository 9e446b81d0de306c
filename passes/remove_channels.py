"""Physically remove channel units: a smaller dense graph, not a model full of zeros.

Every place the analysis recorded is rewritten mechanically: initializer axes are sliced, the
constants dead channels would have fed forward are folded into the consumers' biases (computed on
the original weights, before slicing), and integers that count channels (Conv ``group``, Split
sizes, Slice bounds, Reshape and Resize dims) are recomputed from what is kept.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..channels.analysis import ChannelAnalysis
from ..channels.model import ParamSlot
from .checks import CheckedPass, Shapes, assert_close, check_output, run
from .mask_channels import MaskChannels


@dataclass(frozen=True)
class LayerChange:
    node: str
    before: int
    after: int


@dataclass(frozen=True)
class RemovalRecord:
    removed_units: int = 0
    layers: list[LayerChange] = field(default_factory=list)
    folded_biases: int = 0
    inexact_folds: int = 0


@dataclass
class RemovalResult(ir.passes.PassResult):
    record: RemovalRecord = field(default_factory=RemovalRecord)


class RemovalError(ir.passes.PreconditionError, ValueError):
    """Units that cannot be removed: a ``PreconditionError`` of the pass, and a ``ValueError`` as before."""


class RemoveChannels(CheckedPass, ir.passes.FunctionalPass):
    """Remove the channel units ``removed`` (ids of ``analysis``); the input model is not modified.

    ``input_means`` (consumer input tensor -> mean per channel position, from calibration data)
    replaces each removed channel by its mean activation instead of its masked constant: the
    bias compensation of channel pruning, which keeps the consumers' outputs unbiased.

    Its check (see :mod:`.checks`) adds the mask oracle: on the same random inputs, the output must
    give what :class:`MaskChannels` gives on the input model. Skipped where the two differ by design:
    with ``input_means``, or for units whose removal is exact only away from borders (``analysis.inexact``).
    """

    def __init__(self, analysis: ChannelAnalysis, removed: set[int] | list[int], *,
                 input_means: dict[str, np.ndarray] | None = None, check: bool | None = None,
                 check_shapes: Shapes | None = None) -> None:
        super().__init__(check=check)
        self.analysis = analysis
        self.removed = np.array(sorted(set(int(u) for u in removed)), dtype=np.int64)
        self.input_means = input_means
        self.check_shapes = check_shapes

    def keep(self, elems: np.ndarray) -> np.ndarray:
        """Which of ``elems`` (element ids) stay."""
        return ~np.isin(self.analysis.root[elems], self.removed)

    def requires(self, model: ir.Model) -> None:
        analysis = self.analysis
        bad = [u for u in self.removed.tolist() if u not in analysis.units or not analysis.units[u].prunable]
        if bad:
            raise RemovalError(f"units {bad[:5]} are not prunable")
        for s in analysis.slots:  # a zero-width layer is not a valid graph (and crashes some kernels)
            if s.role == "out" and len(s.elems) and not self.keep(s.elems).any():
                raise RemovalError(f"removing these units would leave {s.node} with no channels")

    def call(self, model: ir.Model) -> RemovalResult:
        model = model.clone()  # nodes and values copied; tensors shared (replaced below, never edited in place)
        graph, analysis, keep = model.graph, self.analysis, self.keep
        nodes = {n.name: n for n in graph}
        # The weights as they are (memory-mapped for external data): every change below makes a new array.
        arrays = {name: v.const_value.numpy() for name, v in graph.initializers.items() if v.const_value is not None}
        unchanged = dict(arrays)
        new_slots, folded, inexact = _fold_biases(graph, nodes, self._folds(), analysis, keep, arrays)
        _slice(graph, [*analysis.slots, *new_slots], keep, arrays, unchanged)
        layers: list[LayerChange] = []
        for s in analysis.slots:
            if s.role == "out" and not any(c.node == s.node for c in layers):
                layers.append(LayerChange(s.node, len(s.elems), int(keep(s.elems).sum())))
        for edit in analysis.group_edits:
            nodes[edit.node].attributes["group"] = ir.AttrInt64("group", int(keep(edit.out_elems).sum()))
        for edit in analysis.axis_edits:
            _apply_axis_edit(model, nodes[edit.node], edit, keep)
        for node in graph:  # widths changed: let shape inference recompute the intermediate shapes
            for v in node.outputs:
                if not v.is_graph_output():
                    v.shape = None
        record = RemovalRecord(len(self.removed), layers, folded, inexact)
        return RemovalResult(model, bool(len(self.removed)), record)

    def _folds(self) -> list:
        """What removed channels feed forward, per consumer: masked constants, or calibration means."""
        analysis, means = self.analysis, self.input_means
        if means is None:
            return analysis.folds
        folds = [_with_means(c, means[c.input]) if c.input in means else c for c in analysis.consumers]
        covered = {c.node for c in analysis.consumers}
        return folds + [f for f in analysis.folds if f.node not in covered]

    def verify(self, source: ir.Model | None, model: ir.Model) -> None:
        feeds, got = check_output(model, shapes=self.check_shapes, source=source)
        exact = self.input_means is None and not set(self.removed.tolist()) & set(self.analysis.inexact)
        if feeds is None or source is None or not exact:
            return
        masked = MaskChannels(self.analysis, self.removed.tolist(), check=False)(source).model
        want = run(ir.to_proto(masked), feeds, "the masked model")
        assert_close(got, want, "mask oracle: the removed model differs from the masked one")


def remove_channels(model: ir.Model, analysis: ChannelAnalysis, removed: set[int] | list[int], *,
                    input_means: dict[str, np.ndarray] | None = None) -> tuple[ir.Model, RemovalRecord]:
    """Return a copy of ``model`` without the channel units in ``removed`` (unit ids; :class:`RemoveChannels`)."""
    result = RemoveChannels(analysis, removed, input_means=input_means)(model)
    return result.model, result.record


def _slice(graph: ir.Graph, slots: list[ParamSlot], keep, arrays: dict[str, np.ndarray],
           unchanged: dict[str, np.ndarray]) -> None:
    """Slice every recorded initializer axis to the kept elements; set the initializers that changed."""
    by_value: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for s in slots:
        by_value[s.value][s.axis] = keep(s.elems)
    for name, axes in by_value.items():
        for axis, mask in axes.items():
            if not mask.all():
                arrays[name] = np.compress(mask, arrays[name], axis=axis)
    for name, value in list(graph.initializers.items()):
        arr = arrays.get(name)
        if arr is not None and value.const_value is not None and arr is not unchanged.get(name):
            _set_initializer(value, arr)


def _set_initializer(value: ir.Value, arr: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(arr), name=value.name)
    value.shape = ir.Shape(arr.shape)


def _with_means(consumer, means: np.ndarray):
    """The consumer's fold record with calibration means in place of masked constants."""
    from dataclasses import replace
    means = np.asarray(means, np.float64)
    if len(means) != len(consumer.positions):
        return consumer
    return replace(consumer, const=np.where(np.isnan(consumer.const), np.nan, means))


def _fold_biases(graph, nodes, folds, analysis: ChannelAnalysis, keep, arrays) -> tuple[list[ParamSlot], int, int]:
    """Add what removed constant channels contributed to each consumer's bias; the new bias slots, and
    how many biases were folded into (of which inexactly)."""
    new_slots: list[ParamSlot] = []
    folded = inexact = 0
    out_slots = {s.node: s for s in analysis.slots if s.role == "out"}
    for fold in folds:
        gone = ~keep(fold.elems)
        if not gone.any():
            continue
        node = nodes[fold.node]
        W = arrays[fold.weight]  # still the original, unsliced weight; only the removed positions are read
        c = np.nan_to_num(fold.const[gone])
        p = fold.positions[gone]
        if not c.any():
            continue
        if fold.kind == "conv":
            delta = W[:, p].astype(np.float64).reshape(W.shape[0], len(p), -1).sum(axis=2) @ c
        elif fold.kind == "grouped":
            groups = node.attributes.get_int("group", 1)
            cout_g, cin_g = W.shape[0] // groups, W.shape[1]
            ksum = W.astype(np.float64).reshape(W.shape[0], cin_g, -1).sum(axis=2)
            delta = np.zeros(W.shape[0])
            for pos, val in zip(p.tolist(), c.tolist()):
                k, i = divmod(pos, cin_g)
                delta[k * cout_g:(k + 1) * cout_g] += val * ksum[k * cout_g:(k + 1) * cout_g, i]
        elif fold.in_axis == 1:
            delta = W[:, p].astype(np.float64) @ c
        else:
            delta = c @ W[p, :].astype(np.float64)
        bias = graph.initializers[fold.bias] if fold.bias is not None else None
        if bias is None:
            dtype = arrays[fold.weight].dtype
            name = _unique(graph, f"{node.name}.bias_folded")
            arr = np.zeros(delta.shape[0], dtype=dtype)
            bias = ir.Value(name=name, const_value=ir.tensor(arr, name=name), shape=ir.Shape(arr.shape),
                            type=ir.TensorType(ir.DataType.from_numpy(dtype)))
            graph.register_initializer(bias)
            node.resize_inputs(3)
            node.replace_input_with(2, bias)
            arrays[name] = arr
            out = out_slots[node.name]
            new_slots.append(ParamSlot(name, 0, out.elems, "bias", node.name))
        arr = arrays[bias.name]
        arrays[bias.name] = (arr.astype(np.float64) + delta.reshape(arr.shape)).astype(arr.dtype)
        folded += 1
        inexact += int(not fold.exact)
    return new_slots, folded, inexact


def _unique(graph: ir.Graph, base: str) -> str:
    name, k = base, 1
    while name in graph.initializers:
        name, k = f"{base}_{k}", k + 1
    return name


def _const_input(model: ir.Model, node: ir.Node, index: int, arr: np.ndarray) -> None:
    """Point ``node``'s input ``index`` at a new initializer holding ``arr`` (the old one is not shared)."""
    graph = model.graph
    name = _unique(graph, f"{node.name}.pruned_{index}")
    value = ir.Value(name=name, const_value=ir.tensor(arr, name=name), shape=ir.Shape(arr.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)))
    graph.register_initializer(value)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    old = node.inputs[index]
    node.replace_input_with(index, value)
    if old is not None and old.is_initializer() and not old.uses():
        graph.initializers.pop(old.name)


def _apply_axis_edit(model: ir.Model, node: ir.Node, edit, keep) -> None:
    if edit.kind == "split":
        sizes = np.array([int(keep(c).sum()) for c in edit.chunks], dtype=np.int64)
        if "split" in node.attributes:
            node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())
        elif model.opset_imports.get("", 13) >= 13:
            node.attributes.pop("num_outputs", None)
            _const_input(model, node, 1, sizes)
        else:
            node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())
    elif edit.kind == "slice":
        kept = keep(edit.chunks[0])
        start = int(kept[:edit.start].sum())
        end = start + int(kept[edit.start:edit.end].sum())
        _set_slice_bound(model, node, edit.axis, start, end)
    elif edit.kind in ("reshape", "resize"):
        index = 1 if edit.kind == "reshape" else 3
        arr = node.inputs[index].const_value.numpy().copy()
        arr[edit.axis] = int(keep(edit.chunks[0]).sum())
        _const_input(model, node, index, arr)


def _set_slice_bound(model: ir.Model, node: ir.Node, axis: int, start: int, end: int) -> None:
    if len(node.inputs) < 2:  # opset < 10 keeps bounds in attributes
        axes = list(node.attributes.get_ints("axes", range(len(node.attributes.get_ints("starts")))))
        i = [a if a >= 0 else a + 99 for a in axes].index(axis) if axis in axes else axes.index(axis - 99)
        for key, val in (("starts", start), ("ends", end)):
            vals = list(node.attributes.get_ints(key))
            vals[i] = val
            node.attributes[key] = ir.AttrInt64s(key, vals)
        return
    axes_v = node.inputs[3] if len(node.inputs) > 3 else None
    n = len(node.inputs[1].const_value.numpy())
    axes = axes_v.const_value.numpy().tolist() if axes_v is not None else list(range(n))
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    norm = [a + rank if a < 0 and rank else a for a in axes]
    i = norm.index(axis) if axis in norm else axes.index(axis)
    for index, val in ((1, start), (2, end)):
        arr = node.inputs[index].const_value.numpy().copy()
        arr[i] = val
        _const_input(model, node, index, arr)
