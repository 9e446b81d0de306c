"""Layers that ONNX Runtime's int8 CPU kernels run no faster than fp32: left in float by default.

Measured on RetinaFace-mnet0.25 at 640x640, 1 thread, AMD EPYC with AVX-512 VNNI, ORT 1.32
(``enable_profiling``, per node): fp32 fuses Conv+LeakyRelu into one NCHWc kernel, while int8
runs QLinearConv (NHWC) and then a separate table-lookup QLinearLeakyRelu. For wide layers int8
still wins (QLinearConv ~2x faster than Conv), but two kinds of layer lose:

- a narrow stem conv reading the 3-channel image (3->8: int8 6.2 ms + LeakyRelu 3.6 ms vs fp32
  fused 7.0 ms);
- depthwise convs with fewer than 16 channels (NHWC int8 depthwise vectorises over channels; at
  8 channels and 320x320 it takes 5.9 ms + 0.9 ms LeakyRelu vs fp32 fused 4.7 ms).

Keeping both in float took the whole model from 1.45x to 1.70x fp32 speed (interleaved medians).
Both rules need fewer than 16 output channels: a wide stem (age-v1's 3->64 7x7) is much faster in
int8, and keeping it float cost age-v1 a third of its int8 speed-up (2.9x -> 2.1x).
"""

from __future__ import annotations

import onnx

from ..graph.shapes import graph_inputs

ACTIVATIONS = ("Relu", "LeakyRelu", "Clip", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Elu")
MIN_CHANNELS = 16  # below this, int8 NHWC kernels do not fill a vector
MAX_STEM_CHANNELS = 4


def slow_int8_layers(model: onnx.ModelProto) -> list[str]:
    """Names of Conv nodes (and the activation each feeds alone) better left in float for CPU latency."""
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    inputs = {i.name for i in graph_inputs(model)}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    picked: list[str] = []
    for n in model.graph.node:
        if n.op_type != "Conv" or not n.name or len(n.input) < 2 or n.input[1] not in weights:
            continue
        w = weights[n.input[1]]
        if len(w) != 4:
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        stem = n.input[0] in inputs and w[1] * group <= MAX_STEM_CHANNELS
        depthwise = group > 1 and w[1] == 1 and group == w[0]
        if not ((stem or depthwise) and w[0] < MIN_CHANNELS):
            continue
        picked.append(n.name)
        after = consumers.get(n.output[0], [])
        if len(after) == 1 and after[0].op_type in ACTIVATIONS and after[0].name:
            picked.append(after[0].name)
    return picked
