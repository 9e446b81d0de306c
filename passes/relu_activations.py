"""Replace leaky activations after int8 convs by ReLU, which ONNX Runtime fuses into the conv.

ORT's int8 CPU path folds a ReLU into the QLinearConv before it (the output range starts at 0),
but runs LeakyReLU as a separate table-lookup pass over the whole activation (QLinearLeakyRelu)
and has no int8 PReLU kernel at all (DequantizeLinear, float PRelu, QuantizeLinear). On
RetinaFace-mnet0.25 at 640x640 those passes were a fifth of the int8 latency (2.4 of 12 ms).

This pass is *not* function-preserving: the negative side of each replaced activation is lost.
It only rewrites; :func:`onnxprune.passes.reconstruct.reconstruct` then refits the layers that
read the changed activations on calibration data, and the caller measures what is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from .checks import CheckedPass

LEAKY = ("LeakyRelu", "PRelu")


@dataclass(frozen=True)
class ReluRecord:
    replaced: list[tuple[str, str]] = field(default_factory=list)  # (node, former op type)
    outputs: list[str] = field(default_factory=list)  # activations whose values changed


@dataclass
class ReluResult(ir.passes.PassResult):
    record: ReluRecord = field(default_factory=ReluRecord)


def fusable_activations(model: ir.Model, *, float_nodes: set[str] = frozenset()) -> list[str]:
    """LeakyRelu/PRelu nodes that would run as their own int8 op: each reads the only output of
    a Conv that is quantized (not in ``float_nodes``) and is itself quantized."""
    picked = []
    for node in model.graph:
        if node.op_type not in LEAKY or not node.name or node.name in float_nodes:
            continue
        x = node.inputs[0]
        producer = x.producer() if x is not None else None
        if producer is None or producer.op_type != "Conv" or producer.name in float_nodes:
            continue
        if len(x.uses()) != 1 or x.is_graph_output():
            continue  # the conv's raw output is read elsewhere: ORT cannot fold the activation
        picked.append(node.name)
    return picked


class ReluActivations(CheckedPass, ir.passes.FunctionalPass):
    """Make each LeakyRelu/PRelu node named in ``nodes`` a Relu (same name, same output); the input model is
    not modified. Not function-preserving (see the module doc)."""

    def __init__(self, nodes: list[str], *, check: bool | None = None) -> None:
        super().__init__(check=check)
        self.nodes = list(nodes)

    def call(self, model: ir.Model) -> ReluResult:
        model = model.clone()
        wanted = set(self.nodes)
        record = ReluRecord()  # its lists are filled here, then never again
        for node in model.graph:
            if node.name not in wanted or node.op_type not in LEAKY or node.domain not in ("", "ai.onnx"):
                continue
            record.replaced.append((node.name, node.op_type))
            record.outputs.append(node.outputs[0].name)
            slope = node.inputs[1] if node.op_type == "PRelu" else None
            node.op_type = "Relu"
            node.attributes.pop("alpha", None)
            node.resize_inputs(1)
            if slope is not None and not slope.uses() and slope.name in model.graph.initializers:
                model.graph.initializers.pop(slope.name)  # the PReLU slope is dead now
        return ReluResult(model, bool(record.replaced), record)


def relu_activations(model: ir.Model, nodes: list[str]) -> tuple[ir.Model, ReluRecord]:
    """A copy of ``model`` in which each named LeakyRelu/PRelu node becomes a Relu (:class:`ReluActivations`)."""
    result = ReluActivations(nodes)(model)
    return result.model, result.record
