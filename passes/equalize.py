"""Cross-layer equalisation (Nagel et al. 2019, "Data-free quantization"): rescale channels between layers.

After BN folding, MobileNet-style layers have per-output-channel weight ranges that differ by
orders of magnitude, and a depthwise conv's per-tensor activation range is set by its loudest
channel: int8 then erases the quiet ones (MobileFaceNet's embedding cosine fell to 0.4 in int8).
For a Conv A whose output reaches Conv B only through per-channel positively homogeneous ops
(ReLU, PReLU, LeakyReLU: f(x/s) = f(x)/s for s > 0), scaling A's channel c by 1/s and B's input
c by s leaves the function unchanged and can equalise both layers' ranges: s = sqrt(r_A / r_B).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .checks import CheckedPass

HOMOGENEOUS = {"Relu", "PRelu", "LeakyRelu"}


@dataclass(frozen=True)
class EqualizeRecord:
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (A, B) conv nodes rescaled between
    rounds: int = 0


@dataclass
class EqualizeResult(ir.passes.PassResult):
    record: EqualizeRecord = field(default_factory=EqualizeRecord)


def _single_use(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _pairs(model: ir.Model) -> list[tuple[ir.Node, ir.Node]]:
    """(A, B) conv pairs joined by a chain of homogeneous ops only, weights constant and unshared."""
    out = []
    for a in model.graph:
        if a.op_type != "Conv" or not _const(a, 1):
            continue
        if a.attributes.get_int("group", 1) != 1 and a.inputs[1].const_value.shape[1] != 1:
            continue  # grouped (not depthwise) producers are left alone
        node = _single_use(a.outputs[0])
        while node is not None and node.op_type in HOMOGENEOUS:
            if node.op_type == "PRelu" and not _const(node, 1):
                node = None
                break
            node = _single_use(node.outputs[0])
        if node is None or node.op_type != "Conv" or not _const(node, 1) or node.inputs[0] is None:
            continue
        b = node
        cin = b.inputs[1].const_value.shape[1] * b.attributes.get_int("group", 1)
        if cin != a.inputs[1].const_value.shape[0]:
            continue
        g = b.attributes.get_int("group", 1)
        if g not in (1, cin):  # plain or depthwise consumer only
            continue
        out.append((a, b))
    return out


def _const(node: ir.Node, i: int) -> bool:
    v = node.inputs[i] if len(node.inputs) > i else None
    return v is not None and v.const_value is not None and len(v.uses()) == 1


class Equalize(CheckedPass, ir.passes.FunctionalPass):
    """Equalise channel ranges across every eligible conv pair, ``rounds`` times; the input model is not modified."""

    def __init__(self, rounds: int = 4, *, check: bool | None = None) -> None:
        super().__init__(check=check)
        self.rounds = rounds

    def call(self, model: ir.Model) -> EqualizeResult:
        model = model.clone()  # tensors shared: this pass replaces them, never edits them
        pairs = _pairs(model)
        rounds = self.rounds if pairs else 0
        for _ in range(rounds):
            for a, b in pairs:
                _equalize_pair(a, b)
        record = EqualizeRecord([(a.name or "", b.name or "") for a, b in pairs], max(rounds, 0))
        return EqualizeResult(model, record.rounds > 0, record)


def equalize(model: ir.Model, rounds: int = 4) -> tuple[ir.Model, EqualizeRecord]:
    """Return a copy of ``model`` with channel ranges equalised across every eligible pair (:class:`Equalize`)."""
    result = Equalize(rounds)(model)
    return result.model, result.record


def _equalize_pair(a: ir.Node, b: ir.Node) -> None:
    """One round on the pair (A, B): s = sqrt(r_A / r_B) per channel, A's channel divided by s, B's input multiplied."""
    wa = a.inputs[1].const_value.numpy().astype(np.float64)
    wb = b.inputs[1].const_value.numpy().astype(np.float64)
    depthwise = b.attributes.get_int("group", 1) > 1
    ra = np.abs(wa).reshape(wa.shape[0], -1).max(axis=1)
    rb = (np.abs(wb).reshape(wb.shape[0], -1).max(axis=1) if depthwise
          else np.abs(np.moveaxis(wb, 1, 0)).reshape(wb.shape[1], -1).max(axis=1))
    ok = (ra > 1e-12) & (rb > 1e-12)
    s = np.ones_like(ra)
    s[ok] = np.sqrt(ra[ok] / rb[ok])
    shape_a = (-1,) + (1,) * (wa.ndim - 1)
    _set(a.inputs[1], wa / s.reshape(shape_a))
    if len(a.inputs) > 2 and a.inputs[2] is not None and a.inputs[2].const_value is not None:
        _set(a.inputs[2], a.inputs[2].const_value.numpy().astype(np.float64) / s)
    if depthwise:
        _set(b.inputs[1], wb * s.reshape(shape_a))
    else:
        _set(b.inputs[1], wb * s.reshape(1, -1, *([1] * (wb.ndim - 2))))


def _set(value: ir.Value, arr: np.ndarray) -> None:
    dtype = value.const_value.numpy().dtype
    value.const_value = ir.tensor(arr.astype(dtype), name=value.name)
