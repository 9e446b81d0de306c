"""Label-free augmentation of image calibration samples: more distinct inputs from a few dozen crops.

Recovery on unlabelled data (the refit's rows, distillation's batches) overfits a small calibration
set: 300 distillation steps on 30 face crops reach cosine 0.98 on those crops and 0.90 on others.
Each augmented sample is a plausible new input in the same preprocessed space, so the original
model's output on it is a valid target: flip, a small rotation/scale/shift, colour gain and
contrast, blur, JPEG re-encoding.

Everything is drawn from one ``numpy.random.Generator``: the same seed gives the same bytes.
Samples are arrays [N, C, H, W] in the model's input space (already normalised); colour
operations work in units of the data's own spread, JPEG maps each sample to 0..255 and back.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Augmentation:
    """How far each random change may go (0 turns it off)."""

    p: float = 0.5  # share of samples changed beyond the flip (the rest stay as they were)
    flip: float = 0.5  # probability of a horizontal flip (faces are left-right symmetric)
    shift: float = 0.04  # translation, fraction of H/W
    rotate: float = 6.0  # degrees
    scale: float = 0.05  # zoom in or out by up to this fraction
    brightness: float = 0.1  # additive, in units of the data's standard deviation
    gain: float = 0.08  # per-channel multiplicative colour gain
    contrast: float = 0.1  # contrast about the sample mean
    blur: float = 0.2  # probability of a Gaussian blur (sigma 0.5-1.2 px)
    jpeg: float = 0.2  # probability of JPEG re-encoding (quality 40-90)


def is_image(x: np.ndarray) -> bool:
    """Image batches the augmentation understands: [N, 1 or 3, H, W], at least 8x8."""
    return x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[2] >= 8 and x.shape[3] >= 8


def augment(x: np.ndarray, rng: np.random.Generator, spec: Augmentation = Augmentation(),
            std: float | None = None) -> np.ndarray:
    """A randomly changed copy of each sample of the image batch ``x`` (float32, same shape)."""
    x = np.asarray(x, dtype=np.float32)
    std = (float(x.std()) or 1.0) if std is None else std
    return np.stack([_one(s, rng, spec, std) for s in x]).astype(np.float32, copy=False)


def mix(x: np.ndarray, rng: np.random.Generator, p: float = 0.5, low: float = 0.6) -> np.ndarray:
    """Mixup without labels: with probability ``p`` a sample becomes ``l*a + (1-l)*b`` with another
    sample ``b`` of the batch, ``l`` uniform in [``low``, 1]. The original model labels the blend, so
    a batch of 8 crops yields inputs no crop alone gives (for distillation, not for the refit)."""
    if len(x) < 2 or p <= 0:
        return x
    other = rng.permutation(len(x))
    lam = np.where(rng.random(len(x)) < p, rng.uniform(low, 1.0, len(x)), 1.0).astype(np.float32)
    return lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[other]


def _one(s: np.ndarray, rng: np.random.Generator, spec: Augmentation, std: float) -> np.ndarray:
    if rng.random() < spec.flip:
        s = s[:, :, ::-1]
    if rng.random() >= spec.p:
        return np.ascontiguousarray(s)
    _, h, w = s.shape
    angle = np.deg2rad(rng.uniform(-spec.rotate, spec.rotate))
    zoom = 1.0 + rng.uniform(-spec.scale, spec.scale)
    dy, dx = rng.uniform(-spec.shift, spec.shift) * h, rng.uniform(-spec.shift, spec.shift) * w
    s = _affine(s, angle, zoom, dy, dx)
    mean = s.mean(axis=(1, 2), keepdims=True)
    gain = 1.0 + rng.uniform(-spec.gain, spec.gain, size=(s.shape[0], 1, 1))
    contrast = 1.0 + rng.uniform(-spec.contrast, spec.contrast)
    s = (s - mean) * contrast * gain + mean + rng.uniform(-spec.brightness, spec.brightness) * std
    if rng.random() < spec.blur:
        s = _blur(s, rng.uniform(0.5, 1.2))
    if rng.random() < spec.jpeg:
        s = _jpeg(s, int(rng.integers(40, 91)))
    return s


def _affine(s: np.ndarray, angle: float, zoom: float, dy: float, dx: float) -> np.ndarray:
    """Rotate by ``angle`` and zoom about the centre, then shift; bilinear, edges replicated."""
    if angle == 0 and zoom == 1 and dy == 0 and dx == 0:
        return s
    _, h, w = s.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy, xx = yy - cy - dy, xx - cx - dx  # output pixel -> source pixel: the inverse transform
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    sy = np.clip(cos * yy - sin * xx + cy, 0, h - 1)
    sx = np.clip(sin * yy + cos * xx + cx, 0, w - 1)
    y0, x0 = np.minimum(sy.astype(int), h - 2), np.minimum(sx.astype(int), w - 2)
    fy, fx = sy - y0, sx - x0
    top = s[:, y0, x0] * (1 - fx) + s[:, y0, x0 + 1] * fx
    bottom = s[:, y0 + 1, x0] * (1 - fx) + s[:, y0 + 1, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _blur(s: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (radius 2), edges replicated."""
    k = np.exp(-0.5 * (np.arange(-2, 3) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(s, ((0, 0), (2, 2), (2, 2)), mode="edge")
    rows = sum(k[i] * p[:, i:i + s.shape[1], :] for i in range(5))
    return sum(k[i] * rows[:, :, i:i + s.shape[2]] for i in range(5)).astype(np.float32)


def _jpeg(s: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip of one sample, mapped to 0..255 by its own range and back."""
    from PIL import Image

    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        return s
    u8 = np.clip(np.rint((s - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
    img = Image.fromarray(u8[0] if s.shape[0] == 1 else u8.transpose(1, 2, 0))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32)
    back = back[None] if back.ndim == 2 else back.transpose(2, 0, 1)
    return back / 255 * (hi - lo) + lo
