"""Bring an exported graph into the canonical form the channel analysis expects.

Exporters wrap blocks in model-local functions, hide weights behind Constant nodes or Identity
chains (RetinaFace's Conv weights arrive through Identity), list initializers as graph inputs, or
leave nodes unnamed. The
analysis wants every weight as an initializer read directly by its consumer and every node
named (users exclude layers by name), so normalise that here, with onnx-ir's own passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    InlinePass,
    LiftConstantsToInitializersPass,
    NameFixPass,
    RemoveInitializersFromInputsPass,
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    TopologicalSortPass,
)

from .checks import CheckedPass


@dataclass(frozen=True)
class CleanupRecord:
    identity_removed: int = 0
    constants_lifted: int = 0
    passes: list[str] = field(default_factory=list)  # the onnx-ir passes that changed the graph, in order


@dataclass
class CleanupResult(ir.passes.PassResult):
    record: CleanupRecord = field(default_factory=CleanupRecord)


class Cleanup(CheckedPass, ir.passes.FunctionalPass):
    """Canonical form for the channel analysis (see the module doc); the input model is not modified."""

    def call(self, model: ir.Model) -> CleanupResult:
        model = model.clone()  # nodes and values copied; tensors shared (passes replace them, never edit them)
        ran = []
        before_identity = _count(model, "Identity")
        before_const = _count(model, "Constant")
        passes = [
            InlinePass(),  # model-local functions (exported modules kept whole) become plain, prunable nodes
            RemoveUnusedFunctionsPass(),
            NameFixPass(),
            LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            IdentityEliminationPass(),
            RemoveUnusedNodesPass(),
            TopologicalSortPass(),
        ]
        if model.ir_version >= 4:
            # Since IR v4 initializers need not be inputs; exporters that still list them make
            # weights look like runtime inputs, which would hide them from the analysis.
            passes.insert(1, RemoveInitializersFromInputsPass())
        for p in passes:
            result = p(model)
            model = result.model
            if result.modified:
                ran.append(type(p).__name__)
        record = CleanupRecord(before_identity - _count(model, "Identity"), before_const - _count(model, "Constant"),
                               ran)
        return CleanupResult(model, bool(ran), record)


def cleanup(model: ir.Model) -> tuple[ir.Model, CleanupRecord]:
    """Return a cleaned copy of ``model`` and what changed (:class:`Cleanup`)."""
    result = Cleanup()(model)
    return result.model, result.record


def _count(model: ir.Model, op_type: str) -> int:
    return sum(1 for n in model.graph if n.op_type == op_type)
