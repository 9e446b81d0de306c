"""ORT's QDQ model simulated in torch, differentiable in the activation thresholds.

The contract is ONNX Runtime's execution of the exported QDQ model with graph optimisation
disabled (QuantizeLinear → DequantizeLinear → float op, the operator definitions); with
optimisations on, ORT fuses QDQ groups into int8 kernels (QLinearConv...) that requantize in
fixed point and may land one step away on a few values. What the simulation must reproduce:

- which tensors are quantized: read from the QDQ model (including the graph input and graph
  outputs, which ORT renames to ``y_QuantizeLinear_Input``), not guessed from op types;
- weights and other quantized constants: their dequantized values, read from the QDQ model
  (int8 per-channel symmetric weights, constants of Mul/Add quantized like activations...);
- biases: int32 with scale ``input_scale * weight_scale`` (float32 product), rounded half to even,
  recomputed from the current input threshold since that scale moves while thresholds train;
- activations: ``q = clamp(round_half_even(x / scale) + zero_point)``, scale and zero point from
  the thresholds exactly as ORT derives them (range widened to include 0, zero point rounded);
- shared parameters: ORT gives the outputs of MaxPool, AveragePool, Reshape... the quantization
  parameters of their input and ignores their own ranges; those tensors follow their owner's
  threshold (read from the QDQ model: their QuantizeLinear reads the owner's scale initializer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..torch_bridge import OnnxModule, to_torch

QUANT_SUFFIX = "_quantized"  # ORT's name for a quantized initializer
OUTPUT_SUFFIX = "_QuantizeLinear_Input"  # ORT's new name for a quantized graph output before its Q/DQ
Bounds = tuple[torch.Tensor, torch.Tensor]


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()  # torch.round rounds half to even, like ORT


def fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmin: int = 0, qmax: int = 255) -> torch.Tensor:
    """Asymmetric quantize-dequantize to [qmin, qmax] as ORT does it; gradients reach ``lo``/``hi`` (TQT).

    Like ORT's ``compute_scale_zp``: scale and zero point in float64, the scale then stored in
    the tensor's precision, which ``x / scale`` uses.
    """
    scale = (hi.double() - lo.double()) / float(qmax - qmin)
    zero = torch.clamp(_round_ste(qmin - lo.double() / scale), qmin, qmax).to(x.dtype)
    scale = scale.to(x.dtype)
    q = torch.clamp(_round_ste(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def scale_of(lo: torch.Tensor, hi: torch.Tensor, qmin: int = 0, qmax: int = 255) -> torch.Tensor:
    return ((hi.double() - lo.double()) / float(qmax - qmin)).float()


def quantized_activations(qdq: onnx.ModelProto) -> set[str]:
    """Float tensors ORT actually quantizes in a QDQ model: the inputs of its QuantizeLinear nodes.

    Names are those of the float model: ORT renames a quantized graph output ``y`` to
    ``y_QuantizeLinear_Input`` (its DequantizeLinear then produces ``y``).
    """
    return set(_activation_qparams(qdq))


def _float_name(name: str, outputs: set[str]) -> str:
    stem = name[:-len(OUTPUT_SUFFIX)]
    return stem if name.endswith(OUTPUT_SUFFIX) and stem in outputs else name


def shared_qparams(qdq: onnx.ModelProto) -> dict[str, str]:
    """Quantized activation → the tensor whose quantization parameters it reuses (itself if its own)."""
    inits = {i.name for i in qdq.graph.initializer}
    outputs = {o.name for o in qdq.graph.output}
    by_scale: dict[str, list[str]] = {}
    for n in qdq.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            by_scale.setdefault(n.input[1], []).append(_float_name(n.input[0], outputs))
    owner = {}
    for scale, names in by_scale.items():
        first = next((t for t in names if scale == t + "_scale"), names[0])  # ORT names it after its owner
        owner.update({t: first for t in names})
    return owner


def _activation_qparams(qdq: onnx.ModelProto) -> dict[str, tuple[float, int, int, int]]:
    """Quantized activation → (scale, zero point, qmin, qmax) as stored in the QDQ model."""
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    outputs = {o.name for o in qdq.graph.output}
    found = {}
    for n in qdq.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits:
            continue
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros((), np.uint8)
        info = np.iinfo(zp.dtype)
        found[_float_name(n.input[0], outputs)] = (float(inits[n.input[1]]), int(zp), int(info.min), int(info.max))
    return found


@dataclass
class _Bias:
    param: str  # initializer name in the float model
    activation: str  # the quantized input whose scale sets the bias scale
    weight_scale: torch.Tensor  # float32, per output channel


class QDQSimulation:
    """A torch module computing what ORT's QDQ model ``qdq`` computes, from its float source ``model``.

    ``run(feeds, bounds)``: ``bounds`` maps some quantized tensors to trainable (lo, hi) thresholds;
    the other quantized tensors use the scale and zero point stored in ``qdq``.
    """

    def __init__(self, model: onnx.ModelProto, qdq: onnx.ModelProto) -> None:
        self.module: OnnxModule = to_torch(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.fixed = _activation_qparams(qdq)
        self.owner = shared_qparams(qdq)
        self.biases: list[_Bias] = []
        self._float_bias: dict[str, torch.Tensor] = {}
        self._load_constants(qdq)

    @property
    def quantized(self) -> set[str]:
        return set(self.fixed)

    @property
    def trainable(self) -> set[str]:
        """Quantized tensors with their own parameters (the others follow an owner, see module doc)."""
        return {t for t, o in self.owner.items() if t == o}

    def _load_constants(self, qdq: onnx.ModelProto) -> None:
        inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
        outputs = {o.name for o in qdq.graph.output}
        q_input = {n.output[0]: _float_name(n.input[0], outputs) for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
        act_of = {n.output[0]: q_input[n.input[0]] for n in qdq.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in q_input}  # DQ output → activation
        const_dq: dict[str, tuple[str, np.ndarray]] = {}  # DQ output → (float initializer, scale)
        for n in qdq.graph.node:
            if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
                continue
            name = n.input[0][:-len(QUANT_SUFFIX)] if n.input[0].endswith(QUANT_SUFFIX) else n.input[0]
            if name not in self.module.param_key:
                continue
            q, scale = inits[n.input[0]], inits[n.input[1]].astype(np.float32)
            const_dq[n.output[0]] = (name, scale)
            if q.dtype == np.int32:
                continue  # a bias: its scale follows the input's threshold, see run()
            zp = inits[n.input[2]] if len(n.input) > 2 and n.input[2] else np.zeros_like(scale, q.dtype)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % max(q.ndim, 1)
            shape = [-1 if d == axis else 1 for d in range(q.ndim)] if scale.ndim and q.ndim else [1] * q.ndim
            value = (q.astype(np.float32) - zp.astype(np.float32).reshape(shape)) * scale.reshape(shape)
            p = self.module.params[self.module.param_key[name]]
            p.data = torch.from_numpy(value.astype(np.float32)).to(p.dtype)
        for n in qdq.graph.node:
            if n.op_type in ("Conv", "Gemm", "ConvTranspose") and len(n.input) > 2 and n.input[2] in const_dq:
                bias, _ = const_dq[n.input[2]]
                if n.input[0] in act_of and n.input[1] in const_dq:
                    self.biases.append(_Bias(bias, act_of[n.input[0]], torch.from_numpy(const_dq[n.input[1]][1])))
                    self._float_bias[bias] = self.module.params[self.module.param_key[bias]].data.clone()

    def _set_biases(self, bounds: Mapping[str, Bounds]) -> None:
        with torch.no_grad():
            for b in self.biases:
                own = self.owner.get(b.activation, b.activation)
                if own in bounds:
                    _, _, qmin, qmax = self.fixed[b.activation]
                    s_in = scale_of(*(t.detach() for t in bounds[own]), qmin, qmax)
                else:
                    s_in = torch.tensor(self.fixed[b.activation][0], dtype=torch.float32)
                scale = (s_in * b.weight_scale).to(torch.float64)  # float32 product, as ORT stores it
                fb = self._float_bias[b.param].to(torch.float64)
                q = torch.clamp(torch.round(fb / scale), -2 ** 31, 2 ** 31 - 1)
                p = self.module.params[self.module.param_key[b.param]]
                p.data = (q.float() * scale.float()).to(p.dtype)

    def transform(self, bounds: Mapping[str, Bounds]) -> dict:
        out = {}
        for n, (s, z, qmin, qmax) in self.fixed.items():
            own = self.owner.get(n, n)
            if own in bounds:
                out[n] = lambda x, own=own, qmin=qmin, qmax=qmax: fake_quant(x, *bounds[own], qmin, qmax)
            else:
                s_t = torch.tensor(s, dtype=torch.float32)
                out[n] = lambda x, s=s_t, z=z, qmin=qmin, qmax=qmax: (
                    torch.clamp(_round_ste(x / s) + z, qmin, qmax) - z) * s
        return out

    def run(self, feeds: Mapping[str, torch.Tensor], bounds: Mapping[str, Bounds] | None = None
            ) -> tuple[torch.Tensor, ...]:
        bounds = bounds or {}
        self._set_biases(bounds)
        outputs, _ = self.module.run(dict(feeds), transform=self.transform(bounds))
        return outputs
