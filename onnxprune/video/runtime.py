"""Running detectors on frame sequences: the gated model with its state kept inside, and the ungated one.

Both take a frame (uint8 RGB [H, W, 3], a PIL image or a path), preprocess it as calibration does
(``Preprocess``: letterbox or resize to the model size), run, decode with ``detection.py`` (score > 0.5,
NMS) and map the boxes back to frame pixels. The gated detector decodes only when the head ran: when the
gate is shut its raw outputs are the carried ones, so the detections are the previous frame's, unchanged.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from ..calibration.preprocess import Preprocess
from ..calibration.presets import PRESETS, infer_preset
from ..detection import DetectionHeads, recognize
from ..errors import ConfigError
from ..graph.io import load_proto
from ..graph.runtime import session
from ..graph.shapes import graph_inputs
from ..passes.gate import BACKGROUND, LAST, NEXT, RAN_HEAD, SCORE, SKIPPED

GATE_METADATA = "onnxprune.gate"
GATE_FORMAT = 1
MATCH_IOU = 0.5
_NONE = np.zeros((0, 5), np.float32)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")


# ------------------------------------------------------------------------------------- frames in and out
@dataclass(frozen=True)
class InputMap:
    """How a frame sits in the model input: boxes in input pixels -> frame pixels."""

    frame_hw: tuple[int, int]
    content_hw: tuple[int, int]  # the frame's size inside the input (letterbox: top-left, rest is padding)

    def to_frame(self, boxes: np.ndarray) -> np.ndarray:
        """[K, 5] (x1, y1, x2, y2, score) from input to frame pixels, clipped to the frame."""
        out = np.asarray(boxes, np.float32).reshape(-1, 5).copy()
        sx, sy = self.frame_hw[1] / self.content_hw[1], self.frame_hw[0] / self.content_hw[0]
        out[:, [0, 2]] = np.clip(out[:, [0, 2]] * sx, 0, self.frame_hw[1])
        out[:, [1, 3]] = np.clip(out[:, [1, 3]] * sy, 0, self.frame_hw[0])
        return out


def as_rgb(frame) -> np.ndarray:
    """uint8 RGB [H, W, 3] from an array, a PIL image or an image path."""
    if isinstance(frame, (str, Path)):
        from ..calibration.data import _open_rgb
        return np.asarray(_open_rgb(Path(frame))[0])
    if not isinstance(frame, np.ndarray):
        return np.asarray(frame.convert("RGB"))
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ConfigError(f"a frame must be uint8 RGB [H, W, 3], got {frame.dtype} {list(frame.shape)}")
    return frame


def prepare(frame: np.ndarray, pre: Preprocess, reuse: dict | None = None) -> tuple[np.ndarray, InputMap]:
    """([1, ...] model input, map back) of one uint8 RGB frame; the values are exactly
    ``Preprocess.apply``'s (a frame that needs no resampling skips PIL, which would only copy it).
    ``reuse`` (a dict the caller keeps) holds the input buffer between frames of one size: its padding
    is written once, and no fresh pages are faulted in per frame."""
    h, w = pre.size  # type: ignore[misc]
    fh, fw = frame.shape[:2]
    nh, nw = pre.content_size((fh, fw), (h, w))
    if (nh, nw) == (fh, fw) and not pre.swap_hw and pre.layout == "nchw":
        key = (nh, nw, h, w, pre.dtype)
        sample = reuse.get(key) if reuse is not None else None
        if sample is None:
            sample = np.zeros((1, 3, h, w), pre.dtype)  # letterbox padding is the mean: exactly 0 after normalising
            if reuse is not None:
                reuse.clear()
                reuse[key] = sample
        order = (2, 1, 0) if pre.channel_order == "bgr" else (0, 1, 2)
        for c, src in enumerate(order):  # (x - mean) / std in float32, as Preprocess.apply computes it
            dst = sample[0, c, :nh, :nw]
            np.subtract(frame[..., src], np.float32(pre.mean[c]), out=dst, dtype=np.float32)
            if pre.std[c] != 1.0:
                np.divide(dst, np.float32(pre.std[c]), out=dst)
        return sample, InputMap((fh, fw), (nh, nw))
    from PIL import Image
    return pre.apply(Image.fromarray(frame), (h, w))[None], InputMap((fh, fw), (nh, nw))


def frame_files(path: str | Path) -> list[Path]:
    """Images of a folder in name order (not recursive); ConfigError when there are none."""
    folder = Path(path)
    if not folder.exists():
        raise ConfigError(f"frames {folder} do not exist")
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not found:
        raise ConfigError(f"no frames (jpg, jpeg, png, bmp) found in {folder}")
    return found


def read_frames(path: str | Path) -> tuple[list[str], Iterator[np.ndarray]]:
    """(names, frames): a folder of images in name order, or a video file where OpenCV or imageio is installed."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
        return _read_video(p)
    if p.is_file():
        raise ConfigError(f"{p} is neither a folder of frames nor a video file ({', '.join(VIDEO_SUFFIXES)})")
    files = frame_files(p)
    return [f.name for f in files], (as_rgb(f) for f in files)


def _read_video(path: Path) -> tuple[list[str], Iterator[np.ndarray]]:
    try:
        import cv2  # type: ignore[import-not-found]
    except ImportError:
        cv2 = None
    if cv2 is not None:
        cap = cv2.VideoCapture(str(path))
        frames = []
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(np.ascontiguousarray(bgr[..., ::-1]))
        cap.release()
    else:
        try:
            import imageio.v3 as iio  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError(f"reading the video {path.name} needs OpenCV (pip install opencv-python-headless) or "
                              "imageio with ffmpeg (pip install 'imageio[ffmpeg]'); or pass a folder of frames") from None
        frames = [np.asarray(f)[..., :3].astype(np.uint8) for f in iio.imiter(path)]
    if not frames:
        raise ConfigError(f"no frames could be read from {path}")
    return [f"{path.name}#{i}" for i in range(len(frames))], iter(frames)


def synthetic_note(path: str | Path) -> str | None:
    """The generator's note when ``path`` is a folder written by ``onnxprune.video.synthetic``, else None."""
    from .synthetic import MARKER, SYNTHETIC_NOTE
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return str(meta.get("note") or SYNTHETIC_NOTE) if meta.get("synthetic") else None


def synthetic_faces(path: str | Path) -> dict[str, tuple[int, int, int, int] | None]:
    """file name -> pasted face box (x1, y1, x2, y2) or None, from a synthetic folder's marker ({} otherwise)."""
    from .synthetic import MARKER
    try:
        meta = json.loads((Path(path) / MARKER).read_text())
        return {f["file"]: tuple(f["face"]) if f.get("face") else None for f in meta.get("frames", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# ------------------------------------------------------------------------------------------ detectors
@dataclass
class FrameResult:
    detections: np.ndarray  # [K, 5] x1, y1, x2, y2, score in frame pixels (empty when not decoding)
    ran_head: bool
    ms: float  # preprocessing + model + decoding
    score: float | None = None  # the gate statistic (None for the ungated detector)
    model_ms: float = 0.0  # the ONNX Runtime call alone
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # raw detector outputs (the carried ones if shut)


def heads_to_json(heads: DetectionHeads) -> dict:
    return {k: (list(map(list, v)) if k == "roles" else list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(heads).items()}


def heads_from_json(d: dict) -> DetectionHeads:
    return DetectionHeads(d["family"], tuple(d["image_hw"]), tuple(tuple(r) for r in d["roles"]),
                          tuple(d.get("strides", ())), int(d.get("anchors", 1)), bool(d.get("decoded", False)),
                          bool(d.get("activated", True)))


def preprocess_to_json(pre: Preprocess) -> dict:
    return asdict(pre)


def preprocess_from_json(d: dict) -> Preprocess:
    return Preprocess(size=tuple(d["size"]) if d.get("size") else None, mean=tuple(d["mean"]), std=tuple(d["std"]),
                      channel_order=d["channel_order"], layout=d["layout"], resize=d["resize"],
                      dtype=d.get("dtype", "float32"), swap_hw=bool(d.get("swap_hw", False)))


class Detector:
    """The ungated detector on frames: ``Detector(path).process(frame) -> FrameResult``."""

    def __init__(self, model, *, preprocess: Preprocess | None = None, preset: str | None = None,
                 threads: int = 1, decode: bool = True, heads: DetectionHeads | None = None) -> None:
        """``heads``: decode as these (a gated model's, so both decode alike); default: recognised here."""
        self.decode = decode
        self._buffer: dict = {}
        proto = load_proto(model)
        inputs = graph_inputs(proto)
        if len(inputs) != 1:
            raise ConfigError(f"a detector has one image input; this model has {len(inputs)}")
        self.input_name = inputs[0].name
        self.preprocess = _resolve(proto, preprocess, preset)
        self.session = session(proto, threads)
        self.names = [o.name for o in self.session.get_outputs()]
        blank = np.zeros((1, *_input_shape(self.preprocess)), np.float32)
        found = recognize(self.names, self.session.run(None, {self.input_name: blank}), self.preprocess.size, 1)
        self.heads = heads if heads is not None and found is not None and found.roles == heads.roles else found
        if self.heads is None:
            raise ConfigError("the model is not a face detector onnxprune can decode (no RetinaFace, UltraFace, "
                              "SCRFD or YuNet heads among its outputs)")

    def raw(self, frame) -> tuple[list[np.ndarray], InputMap]:
        x, where = prepare(as_rgb(frame), self.preprocess, self._buffer)
        return self.session.run(None, {self.input_name: x}), where

    def warmup(self, frame) -> None:
        """One untimed run (ORT's first run allocates and plans)."""
        self.raw(frame)

    def process(self, frame) -> FrameResult:
        start = time.perf_counter()
        x, where = prepare(as_rgb(frame), self.preprocess, self._buffer)
        t = time.perf_counter()
        outs = dict(zip(self.names, self.session.run(None, {self.input_name: x})))
        model_ms = (time.perf_counter() - t) * 1e3
        dets = where.to_frame(self.heads.decode(outs, 1)[0]) if self.decode else _NONE
        return FrameResult(dets, True, (time.perf_counter() - start) * 1e3, None, model_ms, outs)


@dataclass
class GateState:
    """Everything the gated model carries between frames. ``save``/``load`` keep it across processes."""

    background: np.ndarray
    skipped: np.ndarray  # int64 [1]; -1: no background yet
    last: dict[str, np.ndarray]  # raw detector outputs of the last frame that ran the head
    frame_hw: tuple[int, int] = (0, 0)
    detections: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), np.float32))  # decoded ``last``

    def copy(self) -> "GateState":
        return GateState(self.background.copy(), self.skipped.copy(), {k: v.copy() for k, v in self.last.items()},
                         self.frame_hw, self.detections.copy())

    def save(self, path: str | Path) -> None:
        arrays = {"background": self.background, "skipped": self.skipped, "frame_hw": np.asarray(self.frame_hw),
                  "detections": self.detections, **{f"last/{k}": v for k, v in self.last.items()}}
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "GateState":
        with np.load(path, allow_pickle=False) as z:
            last = {k[len("last/"):]: z[k] for k in z.files if k.startswith("last/")}
            return cls(z["background"], z["skipped"], last, tuple(int(v) for v in z["frame_hw"]), z["detections"])


@dataclass(frozen=True)
class GateInfo:
    """What ``onnxprune gate`` recorded in the gated model's metadata."""

    split: str
    threshold: float
    rate: float
    max_skip: int
    background_shape: tuple[int, ...]
    outputs: tuple[str, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    heads: DetectionHeads
    preprocess: Preprocess
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        d = {"format": GATE_FORMAT, "split": self.split, "threshold": self.threshold, "rate": self.rate,
             "max_skip": self.max_skip, "background_shape": list(self.background_shape),
             "outputs": list(self.outputs), "output_shapes": [list(s) for s in self.output_shapes],
             "heads": heads_to_json(self.heads), "preprocess": preprocess_to_json(self.preprocess), **self.extra}
        return json.dumps(d)

    @classmethod
    def of(cls, model: onnx.ModelProto, where: str = "the model") -> "GateInfo":
        meta = {p.key: p.value for p in model.metadata_props}
        if GATE_METADATA not in meta:
            raise ConfigError(f"{where} is not a gated model (no {GATE_METADATA} metadata); make one with "
                              "`onnxprune gate DET.onnx --calib FRAMES -o DET.gated.onnx`")
        d = json.loads(meta[GATE_METADATA])
        if d.get("format") != GATE_FORMAT:
            raise ConfigError(f"{where} was gated by another onnxprune version (format {d.get('format')})")
        known = {"format", "split", "threshold", "rate", "max_skip", "background_shape", "outputs", "output_shapes",
                 "heads", "preprocess"}
        return cls(d["split"], float(d["threshold"]), float(d["rate"]), int(d["max_skip"]),
                   tuple(d["background_shape"]), tuple(d["outputs"]), tuple(tuple(s) for s in d["output_shapes"]),
                   heads_from_json(d["heads"]), preprocess_from_json(d["preprocess"]),
                   {k: v for k, v in d.items() if k not in known})


class GatedDetector:
    """The gated model on a frame sequence, its state kept inside::

        det = onnxprune.video.GatedDetector("det.gated.onnx")
        for frame in frames:
            r = det.process(frame)      # r.detections [K, 5] in frame pixels, r.ran_head, r.ms
        saved = det.state               # a copy; det.state = saved resumes there (GateState.save/load: on disk)
    """

    def __init__(self, model, *, preprocess: Preprocess | None = None, preset: str | None = None,
                 threads: int = 1, decode: bool = True) -> None:
        self.decode = decode
        self._buffer: dict = {}
        proto = load_proto(model)
        self.info = GateInfo.of(proto, str(model) if isinstance(model, (str, Path)) else "the model")
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        self.preprocess = preprocess or (replace(PRESETS[preset], size=self.info.preprocess.size) if preset
                                         else self.info.preprocess)
        if self.preprocess.size != self.info.preprocess.size:
            raise ConfigError(f"the gated model takes {self.info.preprocess.size} inputs, the preprocessing gives "
                              f"{self.preprocess.size}")
        self.input_name = graph_inputs(proto)[0].name
        self._dtypes = {i.name[len(LAST):]: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                        for i in proto.graph.input if i.name.startswith(LAST)}
        self.session = session(proto, threads)
        self.names = [o.name for o in self.session.get_outputs()]
        self._state = self.initial_state()

    def initial_state(self) -> GateState:
        last = {n: np.zeros(s, self._dtypes.get(n, np.float32))
                for n, s in zip(self.info.outputs, self.info.output_shapes)}
        return GateState(np.zeros(self.info.background_shape, np.float32), np.array([-1], np.int64), last)

    @property
    def state(self) -> GateState:
        return self._state.copy()

    @state.setter
    def state(self, value: GateState) -> None:
        self._state = value.copy()

    def reset(self) -> None:
        self._state = self.initial_state()

    def warmup(self, frame) -> None:
        """One untimed run from a fresh state (ORT's first run allocates and plans); the state is untouched."""
        self._step(prepare(as_rgb(frame), self.preprocess, self._buffer)[0], self.initial_state())

    def process(self, frame) -> FrameResult:
        """Detections for the next frame of the sequence; the state moves on."""
        start = time.perf_counter()
        x, where = prepare(as_rgb(frame), self.preprocess, self._buffer)
        state = self._state
        if state.frame_hw != where.frame_hw:  # another camera or size: nothing carried applies
            state = self.initial_state()
        t = time.perf_counter()
        outs = self._step(x, state)
        model_ms = (time.perf_counter() - t) * 1e3
        ran = bool(outs[RAN_HEAD][0])
        last = {n: outs[n] for n in self.info.outputs}
        if not ran:
            dets = state.detections  # the carried outputs decode to the carried detections
        else:
            dets = where.to_frame(self.info.heads.decode(last, 1)[0]) if self.decode else _NONE
        self._state = GateState(outs[BACKGROUND + NEXT], outs[SKIPPED + NEXT], last, where.frame_hw, dets)
        return FrameResult(dets, ran, (time.perf_counter() - start) * 1e3, float(outs[SCORE][0]), model_ms, last)

    def _step(self, x: np.ndarray, state: GateState) -> dict[str, np.ndarray]:
        feed = {self.input_name: x, BACKGROUND: state.background, SKIPPED: state.skipped,
                **{LAST + n: v for n, v in state.last.items()}}
        return dict(zip(self.names, self.session.run(None, feed)))


def _resolve(proto: onnx.ModelProto, preprocess: Preprocess | None, preset: str | None) -> Preprocess:
    """The explicit preprocessing, the preset, or the one the model points to (its size filled in)."""
    if preprocess is not None:
        pre = preprocess
    elif preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        pre = replace(PRESETS[preset])
    else:
        inferred = infer_preset(proto)
        if inferred is None:
            raise ConfigError("cannot tell how the model expects its images; pass --preset")
        pre = inferred.preprocess()
    dims = graph_inputs(proto)[0].type.tensor_type.shape.dim
    fixed = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    spatial = fixed[2:4] if pre.layout == "nchw" else fixed[1:3]
    if len(fixed) == 4 and all(spatial):
        pre = replace(pre, size=(int(spatial[0]), int(spatial[1])))  # type: ignore[arg-type]
    if pre.size is None:
        raise ConfigError("the model's input size is dynamic and the preprocessing has none; pass --preset")
    return pre


def _input_shape(pre: Preprocess) -> tuple[int, int, int]:
    h, w = pre.size  # type: ignore[misc]
    return (3, h, w) if pre.layout == "nchw" else (h, w, 3)
