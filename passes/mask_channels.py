"""Zero channel units at their source, keeping every shape: the reference removal must match.

Masking a unit zeroes the weights that produce it (and its bias too when the analysis was made
with ``keep_bias=False``); everything downstream (BN shifts, activations, the next layers) runs
unchanged. Physically removing the same units must give the
same outputs, which makes this pass the oracle of the removal tests.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..channels.analysis import ChannelAnalysis


def mask_channels(model: ir.Model, analysis: ChannelAnalysis, removed: set[int] | list[int]) -> ir.Model:
    """Return a copy of ``model`` with the units in ``removed`` zeroed at their producers."""
    model = ir.from_proto(ir.to_proto(model))
    removed_arr = np.array(sorted(set(int(u) for u in removed)), dtype=np.int64)
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
    return model
