"""The allocator's budget in milliseconds: predicted latency of the analysed model as channels go.

:class:`LatencyCounter` follows every Conv/Gemm/MatMul's input and output widths through the
removal of channel units (the same per-initializer-axis bookkeeping as the parameter budget) and
prices a step by the latency the cost model (:class:`onnxprune.budget.latency.LatencyModel`:
per-layer times measured in ONNX Runtime) says it saves. The allocator then spends fidelity per
millisecond instead of per parameter, which reaches the early, high-resolution layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import onnx_ir as ir

from ..allocation import ParamCounter
from ..channels.analysis import ChannelAnalysis
from .latency import width_axes

Widths = tuple[int, int]  # (input channels, output channels) of one layer


class CostModel(Protocol):
    """Whole-model latency as a function of layer widths (ms); ``reference_ms`` is the float
    original's measured latency, what a speed-up is a ratio to."""

    reference_ms: float

    def predict(self, widths: Mapping[str, Widths]) -> float: ...

    def saving(self, node: str, old: Widths, new: Widths) -> float: ...


@dataclass(frozen=True)
class _Layer:
    node: str
    weight: str
    out_axis: int
    in_axis: int
    group: int  # Conv group attribute; depthwise when in_per_group == 1 and group > 1
    depthwise: bool


def weighted_layers(model: ir.Model) -> list[_Layer]:
    """Conv/Gemm/MatMul nodes with a constant weight, and which weight axes hold their widths."""
    layers = []
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w is None or w.const_value is None or len(w.const_value.shape) < 2:
            continue
        in_axis, out_axis = width_axes(node.op_type, bool(node.attributes.get_int("transB", 0)))
        group = node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1
        depthwise = group > 1 and w.const_value.shape[1] == 1
        layers.append(_Layer(node.name, w.name, out_axis, in_axis, group, depthwise))
    return layers


class LatencyCounter:
    """Predicted latency saved as units are removed: the :class:`~onnxprune.allocation.Budget` for speed."""

    def __init__(self, model: ir.Model, analysis: ChannelAnalysis, cost: CostModel) -> None:
        self.params = ParamCounter(analysis)
        self.cost = cost
        known = getattr(cost, "layers", None)  # a cost model may price only some layers (the rest cost nothing)
        self.layers = [l for l in weighted_layers(model) if known is None or l.node in known]
        self.shapes = analysis.value_shapes
        self.widths = {l.node: self._widths(l, {}) for l in self.layers}
        self.total = cost.predict(self.widths)

    def _kept(self, weight: str, axis: int, changes: Mapping[str, Mapping[int, int]]) -> int:
        if axis in changes.get(weight, {}):
            return changes[weight][axis]
        return self.params.kept.get(weight, {}).get(axis, self.shapes[weight][axis])

    def _widths(self, l: _Layer, changes: Mapping[str, Mapping[int, int]]) -> Widths:
        c_out = self._kept(l.weight, l.out_axis, changes)
        if l.depthwise:
            return c_out, c_out
        return self._kept(l.weight, l.in_axis, changes) * l.group, c_out

    def _after(self, units: list[int]) -> dict[str, Widths]:
        changes = self.params.changes(units)
        return {l.node: self._widths(l, changes) for l in self.layers if l.weight in changes}

    def gain(self, units: list[int]) -> float:
        """Milliseconds the cost model says removing ``units`` now saves (negative: slower)."""
        return sum(self.cost.saving(node, self.widths[node], new) for node, new in self._after(units).items())

    def remove(self, units: list[int]) -> None:
        self.widths.update(self._after(units))
        self.params.remove(units)

    def predicted_ms(self) -> float:
        return self.cost.predict(self.widths)
