"""Calibration inputs: a few real images (or a saved array) turned into the model's input tensor.

Pruning saliency and int8 ranges are only as good as the activations they see, so the images must be
preprocessed exactly as the deployed model expects; a wrong mean or channel order silently shifts every
statistic. Hence explicit presets for the face models we target, strict validation against the model's
declared input, and a recorded note whenever the preprocessing had to be guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import numpy as np
import onnx

from ..errors import ConfigError
from ..graph.shapes import graph_inputs
from ..progress import Progress, log_progress
from .presets import PRESETS, infer_preset
from .preprocess import Preprocess

if TYPE_CHECKING:  # PIL is imported lazily: only image loading needs it
    from PIL import Image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
Dim = int | str | None  # fixed size, symbolic name, or unknown


@dataclass
class CalibrationSet:
    """Samples for one model input, with where they came from and how they were made (for the report)."""

    name: str
    batches: list[np.ndarray]
    files: list[str] = field(default_factory=list)
    preprocess: Preprocess | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(int(b.shape[0]) for b in self.batches)

    def samples(self) -> np.ndarray:
        """All samples as one [N, ...] array."""
        return self.batches[0] if len(self.batches) == 1 else np.concatenate(self.batches)

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Arrays of shape [B, ...], B == batch_size except possibly the last."""
        if batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {batch_size}")
        data = self.samples()
        for start in range(0, len(data), batch_size):
            yield data[start:start + batch_size]

    def split(self, holdout_fraction: float = 0.5, seed: int = 0) -> tuple[CalibrationSet, CalibrationSet]:
        """(calibration, holdout): a seeded, disjoint split, so accuracy is checked on samples not used to prune."""
        if not 0.0 < holdout_fraction < 1.0:
            raise ConfigError(f"holdout fraction must be between 0 and 1 (exclusive), got {holdout_fraction}")
        n = len(self)
        if n < 2:
            raise ConfigError(f"need at least 2 calibration samples to hold some out, got {n}")
        n_hold = min(n - 1, max(1, round(n * holdout_fraction)))
        order = np.random.default_rng(seed).permutation(n)
        data = self.samples()

        def part(idx: np.ndarray) -> CalibrationSet:
            idx = np.sort(idx)
            files = [self.files[i] for i in idx] if len(self.files) == n else list(self.files)
            return CalibrationSet(self.name, [data[idx]], files, self.preprocess, list(self.notes))

        return part(order[n_hold:]), part(order[:n_hold])


def parse_floats(text: str, count: int | None = 3) -> tuple[float, ...]:
    """``"104,117,123"`` -> floats; ``count`` (if not None) is the required number of values."""
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise ConfigError(f"bad number list {text!r}: expected comma-separated numbers like 127.5,127.5,127.5") from None
    if count is not None and len(values) != count:
        raise ConfigError(f"bad number list {text!r}: expected {count} comma-separated numbers, got {len(values)}")
    if not all(np.isfinite(values)):
        raise ConfigError(f"bad number list {text!r}: values must be finite")
    return values


def parse_size(text: str) -> tuple[int, int]:
    """``"640x480"`` -> (height=640, width=480)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise ConfigError(f"bad size {text!r}: expected HxW with positive integers, e.g. 640x640")
    return int(m.group(1)), int(m.group(2))


def _input(model: onnx.ModelProto, input_name: str | None) -> tuple[str, list[Dim] | None, np.dtype]:
    inputs = graph_inputs(model)
    if not inputs:
        raise ConfigError("the model has no inputs to calibrate")
    if input_name is None:
        inp = inputs[0]
    else:
        found = [i for i in inputs if i.name == input_name]
        if not found:
            raise ConfigError(f"unknown input {input_name!r}; model inputs: {[i.name for i in inputs]}")
        inp = found[0]
    tt = inp.type.tensor_type
    if not tt.elem_type:
        raise ConfigError(f"model input {inp.name!r} is not a tensor")
    dims: list[Dim] | None = None
    if tt.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None) for d in tt.shape.dim]
    return inp.name, dims, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))


def _fmt(dims: list[Dim] | tuple[int, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


_HINT = "; use --preset, --size or --layout to match the model input"


def _check_array(name: str, dims: list[Dim] | None, dtype: np.dtype, arr: np.ndarray, what: str, hint: str) -> None:
    """Rank, fixed non-batch dims and dtype must match, or ORT fails later with a less helpful message."""
    if dims is not None:
        bad = len(dims) != arr.ndim or any(isinstance(d, int) and d != g for d, g in zip(dims[1:], arr.shape[1:]))
        if bad:
            raise ConfigError(f"input {name!r} expects {_fmt(dims)}, {what} gives {_fmt(tuple(arr.shape))}{hint}")
    if arr.dtype != dtype:
        raise ConfigError(f"input {name!r} expects {dtype}, {what} gives {arr.dtype}")


def _resolve_preprocess(model: onnx.ModelProto, name: str, dims: list[Dim] | None, dtype: np.dtype,
                        preprocess: Preprocess | None, preset: str | None, notes: list[str]) -> Preprocess:
    if preprocess is not None and preset is not None:
        raise ConfigError("give either a preset or an explicit preprocessing, not both")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        inferred = infer_preset(model)
        if inferred is not None and PRESETS[inferred.name] != PRESETS[preset]:
            notes.append(f"--preset {preset} given, but the model looks like {inferred.name} ({inferred.reason}); "
                         f"its normalisation differs: check that {preset} is how this model was trained")
        return replace(PRESETS[preset])
    if preprocess is not None:
        return preprocess
    inferred = infer_preset(model)
    if inferred is None:
        raise ConfigError(f"cannot tell how input {name!r} {_fmt(dims or [])} expects its images (no known face-model "
                          f"layout); pass --preset ({', '.join(PRESETS)}; --preset help describes them) "
                          "or --mean, --std and --channel-order")
    notes.append(inferred.note())
    fixed = dims is not None and len(dims) == 4 and all(isinstance(d, int) for d in dims[1:])
    base = inferred.preprocess()
    return replace(base, dtype=str(dtype), size=None if fixed else base.size)


def _target_size(name: str, dims: list[Dim] | None, pre: Preprocess) -> tuple[int, int]:
    """Image (height, width): the model's fixed spatial dims, which an explicit size must agree with."""
    if dims is None:
        if pre.size is None:
            raise ConfigError(f"input {name!r} has no declared shape; pass --size HxW")
        return pre.size
    if len(dims) != 4:
        raise ConfigError(f"input {name!r} expects rank {len(dims)} {_fmt(dims)}, images give rank 4; "
                          f"give a .npy/.npz instead")
    ch, spatial = (dims[1], dims[2:]) if pre.layout == "nchw" else (dims[3], dims[1:3])
    if pre.swap_hw:
        spatial = spatial[::-1]
    if isinstance(ch, int) and ch != 3:
        other = "nhwc" if pre.layout == "nchw" else "nchw"
        hint = f"; try --layout {other}" if (dims[3] if other == "nhwc" else dims[1]) == 3 else _HINT
        raise ConfigError(f"input {name!r} expects {_fmt(dims)} ({pre.layout}, {ch} channels), images give 3 channels{hint}")
    size: list[int] = []
    for i, d in enumerate(spatial):
        want = pre.size[i] if pre.size is not None else None
        if isinstance(d, int):
            if want is not None and want != d:
                got = f"{pre.size[0]}x{pre.size[1]}"  # type: ignore[index]
                raise ConfigError(f"input {name!r} expects {_fmt(dims)}, preprocessing gives {got} images{_HINT}")
            size.append(d)
        elif want is None:
            raise ConfigError(f"input {name!r} {_fmt(dims)} has a dynamic spatial size; pass --size HxW")
        else:
            size.append(want)
    return size[0], size[1]


def _find_images(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ConfigError(f"{path}: not an image (jpg, jpeg, png, bmp) or .npy/.npz file")
        return [path]
    found = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith(".")), key=lambda p: p.relative_to(path).as_posix())
    if not found:
        raise ConfigError(f"no images (jpg, jpeg, png, bmp) found in {path}")
    return found


MIN_SIDE = 8  # pixels: smaller images are refused, they cannot be photos of faces
MAX_UPSCALE = 4.0  # images enlarged more than this to the model size are flagged


def _open_rgb(path: Path) -> tuple[Image.Image, bool]:
    """(RGB image, True if it holds no colour) of one file; refuses images too small to be photos."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            rgb = ImageOps.exif_transpose(im).convert("RGB")  # phone photos store rotation in EXIF
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"cannot read image {path}: {exc}") from None
    if min(rgb.size) < MIN_SIDE:
        raise ConfigError(f"calibration image {path} is {rgb.width}x{rgb.height} pixels, too small to calibrate on; "
                          f"use photos of at least {MIN_SIDE} pixels a side")
    thumb = np.asarray(rgb.resize((32, 32)))
    return rgb, bool((thumb[..., 0] == thumb[..., 1]).all() and (thumb[..., 1] == thumb[..., 2]).all())


def _image_notes(gray: int, upscaled: int, total: int, size: tuple[int, int]) -> list[str]:
    """One line per kind of doubtful calibration image, with what to do about it."""
    notes = []
    if gray:
        notes.append(f"{gray} of {total} calibration images are grayscale: a colour model is calibrated on gray "
                     "faces; use colour photos unless the deployed camera is grayscale")
    if upscaled:
        notes.append(f"{upscaled} of {total} calibration images are enlarged more than {MAX_UPSCALE:g}x to "
                     f"{size[0]}x{size[1]}: blurred inputs skew the statistics; use larger photos")
    return notes


def _load_array(path: Path, name: str) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        keys = list(loaded.files)
        if name in keys:
            return loaded[name]
        if len(keys) == 1:
            return loaded[keys[0]]
        raise ConfigError(f"{path} has arrays {keys}; name one after the model input {name!r}")


def load_calibration(path: str | Path, model: onnx.ModelProto, *, count: int = 64, seed: int = 0,
                     preprocess: Preprocess | None = None, preset: str | None = None,
                     input_name: str | None = None, progress: Progress | None = None) -> CalibrationSet:
    """Calibration samples for one model input (the first real input unless ``input_name``).

    ``path`` is an image folder (searched recursively, sorted, shuffled by ``seed``, first ``count`` kept so
    the same seed always picks the same images), a single image, or a ``.npy``/``.npz`` already in the model's
    input format (first ``count`` samples, values untouched). Without ``preset``/``preprocess`` the image
    preprocessing is guessed from the input and the guess is recorded in ``notes``.
    """
    if count <= 0:
        raise ConfigError(f"calibration count must be positive, got {count}")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"calibration data {path} does not exist")
    name, dims, dtype = _input(model, input_name)
    if path.is_file() and path.suffix.lower() in (".npy", ".npz"):
        if preset is not None or preprocess is not None:
            raise ConfigError(f"{path.name} is used as is; --preset/--size/--layout only apply to images")
        arr = _load_array(path, name)
        _check_array(name, dims, dtype, arr, path.name, "; save the array in the model's input layout")
        if arr.ndim == 0 or arr.shape[0] == 0:
            raise ConfigError(f"{path} holds no samples")
        return CalibrationSet(name, [arr[:count]], [str(path)], None, [])

    notes: list[str] = []
    files = _find_images(path)
    pre = _resolve_preprocess(model, name, dims, dtype, preprocess, preset, notes)
    if np.dtype(pre.dtype) != dtype:
        raise ConfigError(f"input {name!r} expects {dtype}, preprocessing gives {pre.dtype}")
    size = _target_size(name, dims, pre)
    if len(files) > 1:
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))[:count]]
    say = progress or log_progress
    data: np.ndarray | None = None
    gray = upscaled = 0
    for i, f in enumerate(files):
        image, is_gray = _open_rgb(f)
        gray += is_gray
        scales = (size[0] / image.height, size[1] / image.width)
        upscaled += (min(scales) if pre.resize == "letterbox" else max(scales)) > MAX_UPSCALE
        sample = pre.apply(image, size)
        if data is None:  # one buffer: no per-image copies to stack
            data = np.empty((len(files), *sample.shape), dtype=sample.dtype)
        data[i] = sample
        say("loading calibration images", i + 1, len(files))
    assert data is not None
    if dims is not None:
        _check_array(name, dims, dtype, data, "preprocessing", _HINT)
    notes += _image_notes(gray, upscaled, len(files), size)
    return CalibrationSet(name, [data], [str(f) for f in files], replace(pre, size=size), notes)


def load_identities(path: str | Path, model: onnx.ModelProto, data: CalibrationSet) -> tuple[np.ndarray, list[str]]:
    """Labelled face crops for verification: ``path/<person>/*.png``, preprocessed like ``data``."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"identities folder {root} does not exist")
    people = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples, labels = [], []
    for person in people:
        try:
            found = load_calibration(person, model, count=10_000, preprocess=data.preprocess)
        except ConfigError:
            continue  # a folder without readable images
        samples.append(found.samples())
        labels += [person.name] * len(found)
    counts = {p: labels.count(p) for p in set(labels)}
    if len(counts) < 2 or max(counts.values()) < 2:
        raise ConfigError(f"{root} needs subfolders per person, at least two people and one person with two images")
    return np.concatenate(samples), labels
