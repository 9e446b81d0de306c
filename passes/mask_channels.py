"""Zero channel units at their source, keeping every shape: the reference removal must match.

Masking a unit zeroes the weights that produce it (and its bias too when the analysis was made
with ``keep_bias=False``); everything downstream (BN shifts, activations, the next layers) runs
unchanged. Physically removing the same units must give the
same outputs, which makes this pass the oracle of the removal tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..channels.analysis import ChannelAnalysis
from .checks import CheckedPass


@dataclass(frozen=True)
class MaskRecord:
    units: tuple[int, ...] = ()  # the unit ids masked, sorted
    values: tuple[str, ...] = ()  # the initializers in which something was zeroed, in the order first touched


@dataclass
class MaskResult(ir.passes.PassResult):
    record: MaskRecord = field(default_factory=MaskRecord)


class MaskChannels(CheckedPass, ir.passes.FunctionalPass):
    """Zero the units ``removed`` (ids of ``analysis``) at their producers; the input model is not modified."""

    def __init__(self, analysis: ChannelAnalysis, removed: set[int] | list[int], *, check: bool | None = None) -> None:
        super().__init__(check=check)
        self.analysis = analysis
        self.removed = tuple(sorted(set(int(u) for u in removed)))

    def call(self, model: ir.Model) -> MaskResult:
        model = ir.from_proto(ir.to_proto(model))
        analysis = self.analysis
        removed_arr = np.array(self.removed, dtype=np.int64)
        arrays: dict[str, np.ndarray] = {}
        roles = ("out",) if analysis.keep_bias else ("out", "bias")
        for s in analysis.slots:
            if s.role not in roles:
                continue
            dead = np.isin(analysis.root[s.elems], removed_arr)
            if not dead.any():
                continue
            arr = arrays.setdefault(s.value, model.graph.initializers[s.value].const_value.numpy().copy())
            index = [slice(None)] * arr.ndim
            index[s.axis] = np.flatnonzero(dead)
            arr[tuple(index)] = 0
        for name, arr in arrays.items():
            value = model.graph.initializers[name]
            value.const_value = ir.tensor(arr, name=name)
        return MaskResult(model, bool(arrays), MaskRecord(self.removed, tuple(arrays)))


def mask_channels(model: ir.Model, analysis: ChannelAnalysis, removed: set[int] | list[int]) -> ir.Model:
    """Return a copy of ``model`` with the units in ``removed`` zeroed at their producers (:class:`MaskChannels`)."""
    return MaskChannels(analysis, removed)(model).model
