"""Group the channels of a graph into prunable units: the DepGraph idea, on ONNX.

Walk the graph once in topological order applying the op rules, then close the coupling over
shared initializers, block what must stay (graph outputs, excluded layers, weights read by ops we
do not model) and collect units into groups by the layers that produce them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..graph.matching import match_nodes
from . import op_rules
from .model import AxisEdit, BiasFold, ChannelGroup, GroupEdit, ParamSlot, Unit
from .tracer import Tracer


@dataclass
class ChannelAnalysis:
    """Everything scoring and removal need, with elements resolved to unit ids (``root``)."""

    units: dict[int, Unit]
    groups: list[ChannelGroup]
    slots: list[ParamSlot]
    folds: list[BiasFold]
    group_edits: list[GroupEdit]
    axis_edits: list[AxisEdit]
    root: np.ndarray  # element id -> unit id
    value_shapes: dict[str, tuple[int, ...]]  # every float initializer
    inexact: set[int] = field(default_factory=set)  # units whose removal is exact only away from borders
    unmatched_excludes: list[str] = field(default_factory=list)
    keep_bias: bool = True  # removed channels output their bias (folded forward), not zero
    consumers: list[BiasFold] = field(default_factory=list)  # foldable readers, with every position

    def roots(self, elems: np.ndarray) -> np.ndarray:
        return self.root[elems]

    @property
    def prunable_units(self) -> list[int]:
        return [u for u, unit in self.units.items() if unit.prunable]

    def value_axes(self) -> dict[str, dict[int, np.ndarray]]:
        """Per initializer and axis, the unit of each position (positions of no unit: -1)."""
        out: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        for s in self.slots:
            out[s.value][s.axis] = self.root[s.elems]
        return out

    def total_params(self) -> int:
        return int(sum(np.prod(s, dtype=np.int64) for s in self.value_shapes.values()))


def analyze_channels(model: ir.Model, shapes: dict[str, tuple[int, ...]], exclude: list[str] | tuple[str, ...] = (),
                     *, keep_bias: bool = True) -> ChannelAnalysis:
    """Find the coupled channel units of ``model`` (cleaned, BN folded) given concrete ``shapes``.

    ``keep_bias``: a removed channel is replaced by the constant it outputs once its weights are
    gone (its bias, after BN folding the BN shift), folded into the next layers. This is what
    network slimming relies on: a channel with tiny γ is almost its β. With ``keep_bias=False``
    a removed channel is zero, the semantics of naive physical pruning.
    """
    graph = model.graph
    t = Tracer(shapes, opset=model.opset_imports.get("", 13), keep_bias=keep_bias)
    for node in graph:
        op_rules.apply(node, t)
    for out in graph.outputs:
        m = t.map(out)
        if m is not None:
            t.block(m.elems, f"reaches graph output {out.name}")

    _close_shared_slots(t)
    _block_unmodelled_uses(graph, t)
    unmatched = _apply_excludes(graph, t, exclude)

    root = t.uf.roots(np.arange(len(t.uf), dtype=np.int64))
    reasons: dict[int, list[str]] = defaultdict(list)
    for e, rs in t.block_reasons.items():
        r = int(root[e])
        for reason in rs:
            if reason not in reasons[r]:
                reasons[r].append(reason)

    producers: dict[int, set[str]] = defaultdict(set)
    for s in t.slots:
        if s.role == "out":
            for r in np.unique(root[s.elems]).tolist():
                producers[r].add(s.node)
    by_layers: dict[frozenset[str], list[int]] = defaultdict(list)
    for r, nodes in producers.items():
        by_layers[frozenset(nodes)].append(r)
    order = {n.name: i for i, n in enumerate(graph)}
    units: dict[int, Unit] = {}
    groups: list[ChannelGroup] = []
    for gid, (nodes, rs) in enumerate(sorted(by_layers.items(), key=lambda kv: min(order.get(n, 0) for n in kv[0]))):
        rs = sorted(rs)
        group_reasons: list[str] = []
        for r in rs:
            units[r] = Unit(r, gid, reasons.get(r, []))
            for reason in units[r].blocked:
                if reason not in group_reasons:
                    group_reasons.append(reason)
        layers = sorted(nodes, key=lambda n: order.get(n, 0))
        groups.append(ChannelGroup(gid, layers, rs, reasons=group_reasons))

    value_shapes = {
        name: tuple(v.const_value.shape.numpy())
        for name, v in graph.initializers.items()
        if v.const_value is not None and v.const_value.dtype.is_floating_point()
    }
    inexact = {int(root[e]) for e in t.inexact}
    return ChannelAnalysis(units, groups, t.slots, t.folds, t.group_edits, t.axis_edits, root,
                           value_shapes, inexact, unmatched, keep_bias, t.consumers)


def _close_shared_slots(t: Tracer) -> None:
    """Positions of one initializer axis are one tensor row: every slot on it must agree."""
    by_axis: dict[tuple[str, int], list[ParamSlot]] = defaultdict(list)
    for s in t.slots:
        by_axis[(s.value, s.axis)].append(s)
    for (value, axis), slots in by_axis.items():
        first = slots[0]
        for s in slots[1:]:
            if len(s.elems) != len(first.elems):
                for x in slots:
                    t.block(x.elems, f"initializer {value} is read with different channel counts")
                break
            t.union(first.elems, s.elems)


def _block_unmodelled_uses(graph: ir.Graph, t: Tracer) -> None:
    """A sliced initializer must be sliced for every reader; readers without a slot forbid it."""
    slotted: dict[str, list[ParamSlot]] = defaultdict(list)
    for s in t.slots:
        slotted[s.value].append(s)
    for name, slots in slotted.items():
        value = graph.initializers.get(name)
        users = {u.node.name for u in value.uses()} if value is not None else set()
        if value is None or value.is_graph_output() or users - t.slot_users[name]:
            for s in slots:
                t.block(s.elems, f"initializer {name} is also read by an op that is not channel-aware")


def _apply_excludes(graph: ir.Graph, t: Tracer, patterns) -> list[str]:
    """Block what excluded nodes touch; the patterns that matched no node (rule: graph/matching.py)."""
    names = [node.name for node in graph]
    for pattern in patterns:
        for name in match_nodes(names, [pattern])[0]:
            for elems in t.touched.get(name, []):
                t.block(elems, f"excluded by --exclude {pattern}")
    return match_nodes(names, patterns)[1]
