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


@dataclass
class LayerChange:
    node: str
    before: int
    after: int


@dataclass
class RemovalRecord:
    removed_units: int = 0
    layers: list[LayerChange] = field(default_factory=list)
    folded_biases: int = 0
    inexact_folds: int = 0


def remove_channels(model: ir.Model, analysis: ChannelAnalysis, removed: set[int] | list[int], *,
                    input_means: dict[str, np.ndarray] | None = None) -> tuple[ir.Model, RemovalRecord]:
    """Return a copy of ``model`` without the channel units in ``removed`` (unit ids).

    ``input_means`` (consumer input tensor -> mean per channel position, from calibration data)
    replaces each removed channel by its mean activation instead of its masked constant: the
    bias compensation of channel pruning, which keeps the consumers' outputs unbiased.
    """
    model = model.clone()  # nodes and values copied; tensors shared (replaced below, never edited in place)
    graph = model.graph
    nodes = {n.name: n for n in graph}
    removed_arr = np.array(sorted(set(int(u) for u in removed)), dtype=np.int64)
    record = RemovalRecord(removed_units=len(removed_arr))
    bad = [u for u in removed_arr.tolist() if u not in analysis.units or not analysis.units[u].prunable]
    if bad:
        raise ValueError(f"units {bad[:5]} are not prunable")

    def keep(elems: np.ndarray) -> np.ndarray:
        return ~np.isin(analysis.root[elems], removed_arr)

    for s in analysis.slots:  # a zero-width layer is not a valid graph (and crashes some kernels)
        if s.role == "out" and len(s.elems) and not keep(s.elems).any():
            raise ValueError(f"removing these units would leave {s.node} with no channels")

    # The weights as they are (memory-mapped for external data): every change below makes a new array.
    arrays = {name: v.const_value.numpy() for name, v in graph.initializers.items() if v.const_value is not None}
    unchanged = dict(arrays)
    slots = list(analysis.slots)
    folds = analysis.folds
    if input_means is not None:
        folds = [_with_means(c, input_means[c.input]) if c.input in input_means else c for c in analysis.consumers]
        covered = {c.node for c in analysis.consumers}
        folds += [f for f in analysis.folds if f.node not in covered]
    slots.extend(_fold_biases(graph, nodes, folds, analysis, keep, arrays, record))

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

    for s in analysis.slots:
        if s.role == "out" and not any(c.node == s.node for c in record.layers):
            record.layers.append(LayerChange(s.node, len(s.elems), int(keep(s.elems).sum())))

    for edit in analysis.group_edits:
        nodes[edit.node].attributes["group"] = ir.AttrInt64("group", int(keep(edit.out_elems).sum()))
    for edit in analysis.axis_edits:
        _apply_axis_edit(model, nodes[edit.node], edit, keep)

    for node in graph:  # widths changed: let shape inference recompute the intermediate shapes
        for v in node.outputs:
            if not v.is_graph_output():
                v.shape = None
    return model, record


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


def _fold_biases(graph, nodes, folds, analysis: ChannelAnalysis, keep, arrays, record: RemovalRecord) -> list[ParamSlot]:
    """Add what removed constant channels contributed to each consumer's bias; new bias slots."""
    new_slots: list[ParamSlot] = []
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
        record.folded_biases += 1
        record.inexact_folds += int(not fold.exact)
    return new_slots


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
