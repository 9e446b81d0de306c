"""The fake-quantized torch model that trains thresholds computes what ORT runs for the exported QDQ model.

The contract is ORT's QDQ execution with graph optimisation disabled (operator semantics); the
optimised session (fused QLinearConv...) is checked too. Remaining differences are values that sit
on a rounding boundary and land on the other side because float sums run in another order
(AveragePool over 4 or 6 values makes exact .5 ties): one step at most, on a small share.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnxprune.graph.runtime import session  # noqa: E402
from onnxprune.quantization import pre_process, quantize_qdq, to_opset13  # noqa: E402
from onnxprune.quantization.qdq import compute_ranges  # noqa: E402
from onnxprune.quantization.simulate import QDQSimulation, quantized_activations  # noqa: E402
from onnxprune.sample_models import load_sample  # noqa: E402

from .pattern_models import PATTERNS  # noqa: E402


def _exported(model: onnx.ModelProto, x: np.ndarray):
    pre = pre_process(to_opset13(model))
    name = pre.graph.input[0].name
    ranges = compute_ranges(pre, name, [x], "mse")
    qdq, _ = quantize_qdq(pre, name, [x], ranges=ranges)
    return pre, qdq, ranges, name


def _output_step(sim: QDQSimulation, pre: onnx.ModelProto, output: str) -> float:
    """Scale of the output's QuantizeLinear, else of the last quantized tensor feeding it."""
    producer = {o: n for n in pre.graph.node for o in n.output}
    todo = [output]
    while todo:
        t = todo.pop(0)
        if t in sim.fixed:
            return sim.fixed[t][0]
        todo += [i for i in producer[t].input if i in producer] if t in producer else []
    raise AssertionError(f"no quantized tensor feeds {output}")


def _compare(model: onnx.ModelProto, x: np.ndarray) -> list[tuple[str, bool, float, float]]:
    """(output, optimised?, max |sim - ORT| in output steps, share of values that differ)."""
    pre, qdq, ranges, name = _exported(model, x)
    sim = QDQSimulation(pre, qdq)
    assert sim.quantized == quantized_activations(qdq)
    assert name in sim.quantized and all(o.name in sim.quantized for o in pre.graph.output
                                         if o.name in {p for n in qdq.graph.node for p in n.output})
    bounds = {n: (torch.tensor(min(lo, 0.0)), torch.tensor(max(hi, 0.0))) for n, (lo, hi) in ranges.items()
              if n in sim.quantized}  # the trainable-threshold path, from the ranges handed to ORT
    with torch.no_grad():
        simulated = [o.numpy() for o in sim.run({name: torch.from_numpy(x)}, bounds)]
    rows = []
    for optimize in (False, True):
        for out, s, o in zip(pre.graph.output, simulated, session(qdq, optimize=optimize).run(None, {name: x})):
            step = _output_step(sim, pre, out.name)
            diff = np.abs(s.astype(np.float64) - o)
            rows.append((out.name, optimize, float(diff.max() / step), float((diff > 1e-3 * step).mean())))
    return rows


@pytest.mark.parametrize("name", ["chain", "residual_add", "concat", "se", "pool", "flatten_gemm"])
def test_simulation_matches_ort_qdq_on_tiny_models(name: str) -> None:
    model = PATTERNS[name](0)
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    for out, optimize, steps, share in _compare(model, x):
        assert steps <= 1.0 + 1e-4, (out, optimize, steps)
        assert share <= 0.05, (out, optimize, share)  # pool: 80 output values, a tie flip is 1.25%


def test_simulation_matches_ort_qdq_on_a_sample_detector() -> None:
    model = load_sample("retinaface")  # generated RetinaFace-mnet0.25: depthwise, FPN Resize+Add, SSH Concat
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    rows = _compare(model, x)
    assert len(rows) == 6
    for out, optimize, steps, share in rows:
        assert steps <= 1.0 + 1e-4, (out, optimize, steps)
        assert share <= (0.01 if not optimize else 0.2), (out, optimize, share)


def test_bias_follows_the_trained_input_threshold() -> None:
    """A moved input threshold changes the int32 bias scale: the simulation must requantize the bias."""
    model = PATTERNS["chain"](0)
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    pre, qdq, ranges, name = _exported(model, x)
    sim = QDQSimulation(pre, qdq)
    assert sim.biases
    b = sim.biases[0]
    lo, hi = ranges[b.activation]
    wide = {b.activation: (torch.tensor(3 * min(lo, 0.0)), torch.tensor(3 * max(hi, 0.0)))}
    sim.run({name: torch.from_numpy(x)}, wide)
    bias = sim.module.params[sim.module.param_key[b.param]].detach().double()
    step = (3 * (max(hi, 0.0) - min(lo, 0.0)) / 255) * b.weight_scale.double()
    q = bias / step
    assert torch.allclose(q, torch.round(q), atol=1e-3)  # on the grid of the new bias scale
    exact = onnx.numpy_helper.to_array(next(i for i in pre.graph.initializer if i.name == b.param))
    assert np.abs(bias.numpy() - exact).max() <= 0.5 * step.max().item() + 1e-9
