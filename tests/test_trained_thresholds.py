"""Trained activation thresholds: STE gradients, never worse than their MSE initialisation, valid output."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxprune.calibration import CalibrationSet  # noqa: E402
from onnxprune.int8 import quantize  # noqa: E402
from onnxprune.quantization.trained import fake_quant  # noqa: E402

from .pattern_models import PATTERNS  # noqa: E402


def test_threshold_gradient_matches_analytic_clipping_gradient() -> None:
    x = torch.linspace(2.0, 4.0, 101, dtype=torch.float64)  # all above the threshold: pure clipping
    log_hi = torch.tensor(np.log(1.5), dtype=torch.float64, requires_grad=True)
    lo = torch.tensor(0.0, dtype=torch.float64)
    loss = ((fake_quant(x, lo, torch.exp(log_hi)) - x) ** 2).mean()
    loss.backward()
    hi = 1.5
    expected = float((2 * (hi - x)).mean()) * hi  # d/dlog(hi) = hi * d/dhi
    assert abs(float(log_hi.grad) - expected) < 1e-6 * abs(expected) + 1e-9


def test_fake_quant_matches_uint8_rounding() -> None:
    x = torch.linspace(-1.0, 3.0, 1000)
    lo, hi = torch.tensor(-1.0), torch.tensor(3.0)
    y = fake_quant(x, lo, hi)
    scale = 4.0 / 255
    zero = round(1.0 / scale)
    want = (np.clip(np.round(x.numpy() / scale) + zero, 0, 255) - zero) * scale
    assert np.abs(y.numpy() - want).max() < 1e-6


def test_trained_thresholds_never_raise_the_calibration_loss() -> None:
    model = PATTERNS["chain"](0)
    x = np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32)
    result = quantize(model, CalibrationSet("x", [x], [], None, []), thresholds="trained")
    note = next(n for n in result.report.notes if "trained thresholds" in n)
    before, after = map(float, re.findall(r"(\d+\.\d+) -> (\d+\.\d+)", note)[0])
    assert after <= before
    assert result.report.kernels.get("QLinearConv", 0) > 0
