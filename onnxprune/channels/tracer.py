"""The mutable state of one channel-dependency walk over a graph.

Op rules (``op_rules.py``) read and extend it node by node, in topological order: which channel
map each tensor carries, which elements are coupled (union-find), which initializer axes and
attributes count channels, and why some elements may never be removed.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from .model import AxisEdit, BiasFold, ChannelMap, GroupEdit, ParamSlot
from .union_find import UnionFind


class Tracer:
    def __init__(self, shapes: dict[str, tuple[int, ...]], opset: int, keep_bias: bool = True) -> None:
        self.opset = opset
        self.keep_bias = keep_bias
        self.uf = UnionFind()
        self.shapes = shapes
        self.maps: dict[str, ChannelMap] = {}
        self.slots: list[ParamSlot] = []
        self.folds: list[BiasFold] = []
        self.consumers: list[BiasFold] = []  # every foldable reader of tracked channels, all positions
        self.group_edits: list[GroupEdit] = []
        self.axis_edits: list[AxisEdit] = []
        self.block_reasons: dict[int, list[str]] = defaultdict(list)
        self.inexact: set[int] = set()  # elements whose removal is exact only away from borders
        self.touched: dict[str, list[np.ndarray]] = defaultdict(list)  # node -> elements it reads or writes
        self.slot_users: dict[str, set[str]] = defaultdict(set)  # initializer -> nodes holding a slot on it

    # -- tensors -------------------------------------------------------------------------------
    def map(self, value: ir.Value | None) -> ChannelMap | None:
        if value is None or not value.name:
            return None
        return self.maps.get(value.name)

    def set_map(self, node: ir.Node, value: ir.Value, axis: int, elems: np.ndarray, const: np.ndarray) -> None:
        self.maps[value.name] = ChannelMap(axis, np.asarray(elems, np.int64), np.asarray(const, np.float64))
        self.touched[node.name].append(self.maps[value.name].elems)

    def shape(self, value: ir.Value | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if value.const_value is not None:
            return tuple(value.const_value.shape.numpy())
        return self.shapes.get(value.name)

    @staticmethod
    def const(value: ir.Value | None) -> np.ndarray | None:
        if value is None or value.const_value is None:
            return None
        return value.const_value.numpy()

    def fresh(self, n: int) -> np.ndarray:
        return self.uf.make(n)

    # -- coupling and blocking -----------------------------------------------------------------
    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        self.uf.union_arrays(a, b)

    def block(self, elems: np.ndarray, reason: str) -> None:
        for e in np.unique(elems).tolist():
            if reason not in self.block_reasons[e]:
                self.block_reasons[e].append(reason)

    def block_inputs(self, node: ir.Node, reason: str) -> None:
        for v in node.inputs:
            m = self.map(v)
            if m is not None:
                self.block(m.elems, reason)

    # -- what removal must rewrite -------------------------------------------------------------
    def slot(self, node: ir.Node, value: ir.Value, axis: int, elems: np.ndarray, role: str) -> None:
        self.slots.append(ParamSlot(value.name, axis, np.asarray(elems, np.int64), role, node.name))  # type: ignore[arg-type]
        self.slot_users[value.name].add(node.name)
        self.touched[node.name].append(np.asarray(elems, np.int64))

    def fold(self, fold: BiasFold) -> None:
        self.folds.append(fold)
        if not fold.exact:
            self.inexact.update(fold.elems.tolist())

    def approximate(self, elems: np.ndarray) -> None:
        """Removing these elements is exact only away from padded borders."""
        self.inexact.update(np.asarray(elems).tolist())
