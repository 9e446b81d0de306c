"""Float islands for ``quantize --max-drop``: a layer kept in float together with what feeds it.

A layer that sums many inputs whose terms nearly cancel (MobileFaceNet's global depthwise conv: 49
positions into one value per channel) turns a small input error into a large output error. Keeping
that layer in float does little while its input is still rounded to uint8: on the Paddle MobileFaceNet
the embedding cosine goes 0.883 -> 0.972 with the 7x7 depthwise conv float, and -> 0.989 when the 1x1
conv feeding it is float too, so that the tensor between them is never quantized.
"""

from __future__ import annotations

import onnx

from .layer_error import WEIGHTED_OPS

# Ops walked through back to the weighted layer that feeds them: one data input, elementwise or
# reshaping, so that their input is the same activation as their output. Add/Concat join streams and
# stop the walk (keeping a residual stream float would take whole blocks with it).
PASS_THROUGH = ("Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Mul", "Max", "Min",
                "Neg", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout", "MaxPool",
                "AveragePool", "GlobalAveragePool", "BatchNormalization")


def feeding_layers(model: onnx.ModelProto, node_name: str) -> list[str]:
    """The weighted layers (Conv/Gemm/MatMul) whose output reaches ``node_name``'s data input through
    pass-through ops only (activations, the PRelu rewrites' Mul/Max, reshapes, pooling)."""
    return _Walk(model).feeding(node_name)


def islands(model: onnx.ModelProto, node_name: str, depth: int = 2) -> list[list[str]]:
    """Growing float islands around ``node_name``: itself, then with the layers feeding it, then with the
    layers feeding those, up to ``depth`` levels (fewer where the walk stops)."""
    walk = _Walk(model)
    found, members, frontier = [[node_name]], [node_name], [node_name]
    for _ in range(depth):
        frontier = sorted({f for n in frontier for f in walk.feeding(n)} - set(members))
        if not frontier:
            break
        members = members + frontier
        found.append(list(members))
    return found


class _Walk:
    """The graph's producers, weights and nodes by name, read once for several walks."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.weights = {t.name for t in model.graph.initializer}
        self.nodes = {n.name: n for n in model.graph.node if n.name}

    def feeding(self, node_name: str) -> list[str]:
        node = self.nodes.get(node_name)
        if node is None or not node.input:
            return []
        found: set[str] = set()
        todo, seen = [node.input[0]], set()
        while todo:
            tensor = todo.pop()
            src = self.producer.get(tensor)
            if src is None or tensor in seen or tensor in self.weights:
                continue
            seen.add(tensor)
            if src.op_type in WEIGHTED_OPS:
                found.add(src.name)
            elif src.op_type in PASS_THROUGH:
                todo += [i for i in src.input if i and i not in self.weights]
        return sorted(found)
