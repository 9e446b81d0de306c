"""How an image becomes one sample of a model input: size, normalisation, channel order and layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:  # PIL is imported lazily: only image loading needs it
    from PIL import Image


@dataclass
class Preprocess:
    """How an RGB image becomes one sample of the model input.

    ``mean``/``std`` are given in the order of ``channel_order`` (e.g. B, G, R for ``'bgr'``) and applied as
    ``(x - mean) / std`` to 0..255 pixel values. ``size`` is the (height, width) of the image fed to the
    network; ``None`` takes it from the model's fixed spatial dims. ``resize='letterbox'`` keeps the aspect
    ratio and pads bottom/right with the mean colour, so padded pixels are exactly 0 after normalisation
    (what a detector sees as "nothing"); ``'resize'`` stretches to the size (recognisers get aligned crops).
    ``swap_hw`` feeds the tensor transposed ([W, H] instead of [H, W]), as the Caffe-derived MTCNN weights do.
    """

    size: tuple[int, int] | None = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: Literal["rgb", "bgr"] = "rgb"
    layout: Literal["nchw", "nhwc"] = "nchw"
    resize: Literal["letterbox", "resize"] = "resize"
    dtype: str = "float32"
    swap_hw: bool = False

    def __post_init__(self) -> None:
        # Fail at construction, where the bad option is still obvious, not deep inside loading.
        self.mean = _three(self.mean, "mean")
        self.std = _three(self.std, "std")
        if any(s == 0 for s in self.std):
            raise ConfigError(f"std must not contain 0, got {self.std}")
        if self.size is not None:
            if len(self.size) != 2 or any(int(v) <= 0 for v in self.size):
                raise ConfigError(f"size must be two positive ints (height, width), got {self.size}")
            self.size = (int(self.size[0]), int(self.size[1]))
        for name, value, allowed in (("channel_order", self.channel_order, ("rgb", "bgr")),
                                     ("layout", self.layout, ("nchw", "nhwc")),
                                     ("resize", self.resize, ("letterbox", "resize")),
                                     ("dtype", self.dtype, ("float32", "float16", "float64"))):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")

    def content_size(self, image_hw: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) the image is resampled to inside a ``size`` input: aspect kept for letterbox."""
        h, w = size
        if self.resize != "letterbox":
            return h, w
        scale = min(h / image_hw[0], w / image_hw[1])
        return max(1, min(h, round(image_hw[0] * scale))), max(1, min(w, round(image_hw[1] * scale)))

    def apply(self, image: Image.Image, size: tuple[int, int]) -> np.ndarray:
        """One sample ([C,H,W] or [H,W,C], H/W swapped if ``swap_hw``) from an RGB PIL image at ``size``."""
        from PIL import Image

        h, w = size
        mean = np.asarray(self.mean, dtype=np.float32)
        if self.resize == "letterbox":
            nh, nw = self.content_size((image.height, image.width), size)
            pixels = _channels(np.asarray(image.resize((nw, nh), Image.BILINEAR), dtype=np.float32), self.channel_order)
            canvas = np.empty((h, w, 3), dtype=np.float32)
            canvas[...] = mean  # exact mean (not a rounded uint8 colour) so padding normalises to exactly 0
            canvas[:nh, :nw] = pixels
        else:
            canvas = _channels(np.asarray(image.resize((w, h), Image.BILINEAR), dtype=np.float32), self.channel_order)
        out = (canvas - mean) / np.asarray(self.std, dtype=np.float32)
        if self.swap_hw:
            out = out.transpose(1, 0, 2)
        if self.layout == "nchw":
            out = out.transpose(2, 0, 1)
        return np.ascontiguousarray(out, dtype=self.dtype)


def _three(values: object, name: str) -> tuple[float, float, float]:
    try:
        t = tuple(float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be three numbers, got {values!r}") from None
    if len(t) != 3:
        raise ConfigError(f"{name} must be three numbers (one per channel), got {len(t)}")
    return t  # type: ignore[return-value]


def _channels(rgb: np.ndarray, order: str) -> np.ndarray:
    return rgb[..., ::-1] if order == "bgr" else rgb
