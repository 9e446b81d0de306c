"""Synthetic static-camera sequences: a still scene with sensor noise, JPEG and light flicker, and a face
that enters, moves, stands still and leaves.

Why synthetic: no public video is at hand here, and a generated sequence knows where the face is and
which frames are static. Every folder written here carries ``sequence.json`` with ``"synthetic": true``;
``onnxprune video`` says so in its summary and JSON, so numbers measured on these frames are never
mistaken for measurements on real footage. Real frame folders are read the same way (images in name order).

The nuisance model (:class:`NoiseLevel`) is also what ``onnxprune gate`` calibrates against: the gate
must stay shut under it and open for a face that appears or moves.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MARKER = "sequence.json"
SYNTHETIC_NOTE = ("synthetic frames (onnxprune.video.synthetic: a still photo with generated sensor noise, JPEG "
                  "and flicker, and a pasted face), not camera footage")


@dataclass(frozen=True)
class NoiseLevel:
    """Per-frame nuisance of a fixed camera: Gaussian sensor noise, light flicker, JPEG compression."""

    name: str
    sigma: float  # sensor noise std, in 0..255 pixel units
    flicker: float  # light gain varies by up to +-flicker per frame (70% global, 30% rolling-shutter bands)
    jpeg_quality: int  # every frame is JPEG-compressed at this quality


LEVELS: dict[str, NoiseLevel] = {
    "clean": NoiseLevel("clean", 0.5, 0.0, 95),
    "low": NoiseLevel("low", 2.0, 0.02, 90),
    "medium": NoiseLevel("medium", 4.0, 0.04, 75),
    "high": NoiseLevel("high", 6.0, 0.06, 60),
    "extreme": NoiseLevel("extreme", 10.0, 0.10, 40),  # beyond what the gate is calibrated for
}
CALIBRATION_LEVEL = LEVELS["high"]


def perturb(rgb: np.ndarray, level: NoiseLevel, rng: np.random.Generator) -> np.ndarray:
    """One frame of ``rgb`` (uint8 [H, W, 3]) as the camera would deliver it under ``level``."""
    return decode(perturb_encoded(rgb, level, rng))


def perturb_encoded(rgb: np.ndarray, level: NoiseLevel, rng: np.random.Generator) -> bytes:
    """:func:`perturb`, as the JPEG file the camera would write."""
    x = rgb.astype(np.float32)
    if level.flicker:
        h = x.shape[0]
        phase, frequency = rng.uniform(0, 2 * np.pi), rng.uniform(1.0, 3.0)
        bands = np.sin(phase + 2 * np.pi * frequency * np.arange(h) / h)[:, None, None]
        x *= 1.0 + level.flicker * (0.7 * rng.uniform(-1, 1) + 0.3 * bands)
    if level.sigma:
        x += rng.normal(0.0, level.sigma, x.shape).astype(np.float32)
    return encode_jpeg(np.clip(np.rint(x), 0, 255).astype(np.uint8), level.jpeg_quality)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """uint8 RGB pixels of an encoded image (the same pixels as reading the file it is written to)."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def paste(frame: np.ndarray, patch: np.ndarray, x: int, y: int) -> np.ndarray:
    """``frame`` with ``patch`` (uint8 [s, s, 3]) blended in at top-left (x, y) through a soft ellipse;
    parts outside the frame are cut off (a face entering from the edge)."""
    out = frame.astype(np.float32)
    s_h, s_w = patch.shape[:2]
    yy, xx = np.mgrid[0:s_h, 0:s_w]
    r = np.hypot((xx + 0.5 - s_w / 2) / (s_w / 2), (yy + 0.5 - s_h / 2) / (s_h / 2))
    alpha = np.clip((1.0 - r) / 0.2, 0.0, 1.0)[..., None]
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + s_w, w), min(y + s_h, h)
    if x1 <= x0 or y1 <= y0:
        return frame.copy()
    a = alpha[y0 - y:y1 - y, x0 - x:x1 - x]
    out[y0:y1, x0:x1] = a * patch[y0 - y:y1 - y, x0 - x:x1 - x] + (1 - a) * out[y0:y1, x0:x1]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``rgb`` resized to (width, height), bilinear."""
    from PIL import Image
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


@dataclass
class SyntheticSequence:
    """Frames (JPEG files in memory) with where the face is (x1, y1, x2, y2 of the pasted square, or None)
    and whether the scene moved since the previous frame."""

    encoded: list[bytes]
    faces: list[tuple[int, int, int, int] | None]
    moving: list[bool]
    level: NoiseLevel
    description: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.encoded)

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i``, uint8 RGB, decoded as a reader of the written file would."""
        return decode(self.encoded[i])

    @property
    def static_fraction(self) -> float:
        return 1.0 - float(np.mean(self.moving))

    def write(self, folder: str | Path) -> Path:
        """``folder/frame_00000.jpg`` ... and ``folder/sequence.json``, which marks the folder synthetic."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for i, (data, face, moving) in enumerate(zip(self.encoded, self.faces, self.moving)):
            name = f"frame_{i:05d}.jpg"
            (folder / name).write_bytes(data)
            entries.append({"file": name, "face": list(face) if face else None, "moving": moving})
        meta = {"synthetic": True, "note": SYNTHETIC_NOTE, "level": asdict(self.level),
                "static_fraction": round(self.static_fraction, 4), **self.description, "frames": entries}
        (folder / MARKER).write_text(json.dumps(meta, indent=1))
        return folder


def sequence(background: np.ndarray, face: np.ndarray, *, frames: int = 200, static: float = 0.8,
             face_size: int | None = None, level: NoiseLevel = LEVELS["medium"], seed: int = 0,
             description: dict | None = None) -> SyntheticSequence:
    """A fixed camera on ``background`` (uint8 [H, W, 3]); ``face`` (uint8 square crop) enters from the left,
    walks in, stands, steps aside, stands again and leaves to the right. ``static`` of the frames show no
    motion (empty scene or the face standing still); the rest move by about the same step each frame."""
    if not 0.0 <= static < 1.0 or frames < 10:
        raise ValueError("need 0 <= static < 1 and at least 10 frames")
    h, w = background.shape[:2]
    size = int(face_size or round(0.28 * h))
    patch = resize(face, (size, size))
    rng = np.random.default_rng(seed)
    moving_total = max(3, int(round(frames * (1.0 - static))))
    still_total = frames - moving_total
    enter, shift = int(round(0.45 * moving_total)), int(round(0.2 * moving_total))
    leave = moving_total - enter - shift
    holds = [int(round(f * still_total)) for f in (0.2, 0.35, 0.3)]
    holds.append(still_total - sum(holds))
    y = int(0.42 * h - size / 2)
    stops = [(-size, y), (int(0.25 * w), y), (int(0.55 * w), y + int(0.05 * h)), (w, y + int(0.05 * h))]
    track: list[tuple[tuple[int, int] | None, bool]] = [(None, False)] * holds[0]
    for (a, b), steps, hold in zip(zip(stops, stops[1:]), (enter, shift, leave), holds[1:]):
        for k in range(1, steps + 1):
            t = k / steps
            track.append(((int(round(a[0] + t * (b[0] - a[0]))), int(round(a[1] + t * (b[1] - a[1])))), True))
        end = track[-1][0]
        visible = end is not None and end[0] < w
        track += [(end if visible else None, False)] * hold
    out = SyntheticSequence([], [], [], level, dict(description or {}))
    previous: tuple[int, int] | None = None
    for pos, moving in track:
        scene = background if pos is None else paste(background, patch, *pos)
        out.encoded.append(perturb_encoded(scene, level, rng))
        box = None if pos is None else _clip_box(pos, size, w, h)
        out.faces.append(box)
        out.moving.append(bool(moving and pos != previous))
        previous = pos
    return out


def _clip_box(pos: tuple[int, int], size: int, w: int, h: int) -> tuple[int, int, int, int] | None:
    x0, y0, x1, y1 = max(pos[0], 0), max(pos[1], 0), min(pos[0] + size, w), min(pos[1] + size, h)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


# ------------------------------------------------------------------------------ scenes from photos
# Face-free regions (x0, y0, x1, y1 as fractions) of photos in ../shared/data/faces, used as still scenes.
SCENES: dict[str, tuple[str, tuple[float, float, float, float]]] = {
    "backdrop": ("shea_whigham.jpg", (0.0, 0.0, 0.42, 0.32)),
    "armour": ("fr-johnsnow_test1.jpg", (0.0, 0.55, 1.0, 1.0)),
    "press-room": ("fr-obama1.jpg", (0.0, 0.0, 0.45, 0.55)),
}


def scene_from_photo(path: str | Path, box: tuple[float, float, float, float], size: tuple[int, int] = (640, 480)
                     ) -> np.ndarray:
    """The ``box`` region of a photo, resized to (width, height): a still scene."""
    from PIL import Image
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    crop = rgb.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))
    return np.asarray(crop.resize(size, Image.BILINEAR))


def load_rgb(path: str | Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
