"""Gate construction: where to cut a detector, and how sensitive its gate is, measured on calibration frames.

What the gate must do: stay shut under a fixed camera's nuisance (sensor noise, JPEG, light flicker:
``synthetic.CALIBRATION_LEVEL``) and open when a face of ``min_face`` model-input pixels appears or
moves by a quarter of its size. Both are simulated on every calibration frame: three independently
perturbed copies give noise pairs; a face crop (a face the detector finds in the frames, else the most
textured patch) pasted at a random place, then moved, gives change pairs. Each pair's gate score
(``passes.gate.gate_score``) is measured on a candidate feature map:

- noise ceiling N: the highest score of a noise pair; change floor M: the lowest score of a change pair.
- Split point: candidates (ends of conv blocks, in order of the compute before them, up to ``max_prefix``
  of the model's MACs) are tried from the earliest; the first with M / N >= ``SEPARABLE`` is chosen.
  Earliest is cheapest: a skipped frame costs the prefix.
- Threshold tau = ``HEADROOM`` x N: above every noise pair seen, with headroom for unseen noise.
- Update rate: a skipped frame moves the background by at most rate x tau (in the score's norm), so a
  change creeping in slowly enough to stay under tau can build up to tau (1 + rate x max_skip) before the
  forced refresh; rate = (M / tau - 1) / max_skip keeps that under the change floor M. Conservative
  throughout: a skipped frame with a moving face is a missed face, a spurious head run only costs time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from ..calibration.data import load_calibration
from ..calibration.preprocess import Preprocess
from ..detection import recognize
from ..errors import ConfigError, VerificationError
from ..graph.io import load_proto, save_atomic
from ..graph.metrics import count_macs
from ..graph.runtime import check_batch, session
from ..graph.shapes import graph_inputs, infer_concrete_shapes
from ..passes.gate import BACKGROUND, LAST, RAN_HEAD, SCORE, SKIPPED, GatePass, GateSpec, gate_score, pool_cells, \
    residual
from ..progress import Progress, log_progress
from .runtime import GATE_METADATA, GateInfo, as_rgb, prepare, synthetic_note
from .synthetic import CALIBRATION_LEVEL, NoiseLevel, paste, perturb, resize

SEPARABLE = 1.5  # change floor / noise ceiling a feature map needs to be chosen
HEADROOM = 1.2  # threshold = HEADROOM x noise ceiling
RATE_MAX = 0.1
MOVE = 0.25  # a move by this share of the face's size must open the gate
RECOMPUTE_SHARE = 0.1  # up to this share of the MACs, the head branch reruns the prefix (passes/gate.py)
OBJECTS = 2  # pasted faces per calibration frame
MIN_TEXTURE = 20.0  # pixel std a detected face crop needs to stand for a face
WEIGHT_FLOOR = 0.5  # a channel's noise scale is taken as at least this share of the median channel's: channels
# that hardly vary (dead, saturated) would otherwise weigh hundreds of times more than the rest
_ACTIVATIONS = {"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Elu", "Selu", "Tanh",
                "Mish", "Gelu", "Softplus", "BatchNormalization"}
_FEATURE_OPS = _ACTIVATIONS | {"Conv", "Add", "Mul", "MaxPool", "AveragePool", "Concat"}


@dataclass(frozen=True)
class GateOptions:
    """How the gate is built (``onnxprune gate`` options)."""

    at: str | None = None  # split tensor; None: the earliest separable one
    min_face: int = 32  # model-input pixels: a face this small appearing, or moving by a quarter, opens the gate
    max_skip: int = 50  # the head runs at least every max_skip + 1 frames (0: never forced)
    count: int = 16  # calibration frames
    seed: int = 0
    noise: NoiseLevel = CALIBRATION_LEVEL
    max_prefix: float = 0.5  # candidates: at most this share of the model's MACs before the split
    threads: int = 1  # for the verification run and the frame-cost measurement

    def validate(self) -> None:
        if self.min_face < 4:
            raise ConfigError(f"--min-face must be at least 4 pixels, got {self.min_face}")
        if self.max_skip < 0:
            raise ConfigError(f"--max-skip must be 0 (no forced refresh) or more, got {self.max_skip}")
        if self.count < 1:
            raise ConfigError(f"--calib-count must be positive, got {self.count}")
        if not 0.0 < self.max_prefix <= 1.0:
            raise ConfigError(f"max_prefix must be in (0, 1], got {self.max_prefix}")


@dataclass
class SplitCandidate:
    """A feature map the graph can be cut at, and how well it separates change from noise."""

    name: str
    shape: tuple[int, ...]
    stride: int
    pool: int
    prefix_share: float  # MACs before it / all MACs
    noise_ceiling: float = math.nan
    change_floor: float = math.nan

    @property
    def ratio(self) -> float:
        return self.change_floor / self.noise_ceiling if self.noise_ceiling > 0 else math.inf

    def to_dict(self) -> dict:
        return {"tensor": self.name, "shape": list(self.shape), "stride": self.stride, "cell": self.pool,
                "prefix_macs_share": round(self.prefix_share, 4), "noise_ceiling": _r(self.noise_ceiling),
                "change_floor": _r(self.change_floor), "ratio": _r(self.ratio)}


@dataclass
class GateReport:
    model: str
    detector: str
    frames: int
    preprocess: str
    split: SplitCandidate
    tried: list[SplitCandidate]
    threshold: float
    rate: float
    max_skip: int
    min_face: int
    noise: NoiseLevel
    head_ms: float = math.nan  # one frame through the gated model when the head runs
    skip_ms: float = math.nan  # ... when the gate is shut
    original_ms: float = math.nan
    prefix_nodes: int = 0
    head_nodes: int = 0
    recompute: bool = False
    notes: list[str] = field(default_factory=list)
    output: str = ""

    def summary(self) -> str:
        s = self.split
        lines = [f"gate: {self.model}" + (f" -> {self.output}" if self.output else ""),
                 f"  detector: {self.detector}",
                 f"  split: {s.name} {'x'.join(map(str, s.shape))} (stride {s.stride}, cells of {s.pool}x{s.pool}), "
                 f"{s.prefix_share:.0%} of the MACs before it; {self.prefix_nodes} nodes run on every frame, "
                 f"{self.head_nodes} only when the gate opens"
                 + (" (with a copy of the first ones: ORT keeps its blocked layout)" if self.recompute else ""),
                 f"  calibrated on {self.frames} frames ({self.preprocess}) under noise sigma {self.noise.sigma:g}, "
                 f"flicker +-{self.noise.flicker:.0%}, JPEG q{self.noise.jpeg_quality}: noise ceiling "
                 f"{s.noise_ceiling:.3g}, weakest change {s.change_floor:.3g} (a {self.min_face} px face appearing "
                 f"or moving {MOVE:.0%} of its size), ratio {s.ratio:.2f} ({SEPARABLE:g} needed)",
                 f"  threshold {self.threshold:.3g}, background update rate {self.rate:.3g}, "
                 + (f"head forced after {self.max_skip} skipped frames" if self.max_skip else "no forced refresh"),
                 f"  frame cost ({1} thread): original {self.original_ms:.1f} ms, gated {self.head_ms:.1f} ms when the "
                 f"head runs, {self.skip_ms:.1f} ms when the gate is shut ({self.skip_ms / self.original_ms:.2f}x)"]
        earlier = [c for c in self.tried if c is not s]
        if earlier:
            lines.append("  earlier feature maps not separable: " + ", ".join(
                f"{c.name} ({c.ratio:.2f})" for c in earlier[:6]) + (", ..." if len(earlier) > 6 else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"schema": "onnxprune.gate/1", "model": self.model, "output": self.output, "detector": self.detector,
                "frames": self.frames, "preprocess": self.preprocess, "split": self.split.to_dict(),
                "tried": [c.to_dict() for c in self.tried], "threshold": _r(self.threshold), "rate": _r(self.rate),
                "max_skip": self.max_skip, "min_face": self.min_face, "move_share": MOVE,
                "noise": {"sigma": self.noise.sigma, "flicker": self.noise.flicker,
                          "jpeg_quality": self.noise.jpeg_quality},
                "ms": {"original": _r(self.original_ms), "head": _r(self.head_ms), "skip": _r(self.skip_ms)},
                "prefix_nodes": self.prefix_nodes, "head_nodes": self.head_nodes, "recompute_prefix": self.recompute,
                "notes": self.notes}


@dataclass
class GateResult:
    model: onnx.ModelProto
    report: GateReport

    def save(self, path, *, protect: Sequence = ()) -> Path:
        return save_atomic(self.model, path, protect=[Path(p) for p in protect])


def gate(model, calib, *, options: GateOptions | None = None, preset: str | None = None,
         preprocess: Preprocess | None = None, progress: Progress | None = None) -> GateResult:
    """A gated copy of detector ``model``, calibrated on the frames in ``calib`` (see the module docstring)."""
    opts = options or GateOptions()
    opts.validate()
    say = progress or log_progress
    proto = load_proto(model)
    input_name = _single_input(proto)
    say("loading calibration frames")
    data = load_calibration(calib, proto, count=opts.count, seed=opts.seed, preprocess=preprocess, preset=preset,
                            progress=say)
    if data.preprocess is None:
        raise ConfigError("the gate calibrates on image frames (a folder of images), not on an array")
    pre, samples = data.preprocess, data.samples()
    ref = session(proto, opts.threads)
    names = [o.name for o in ref.get_outputs()]
    first = ref.run(None, {input_name: samples[:1]})
    heads = _detector_heads(names, first, pre)
    image_shape = (1, *samples.shape[1:])
    candidates = split_candidates(proto, infer_concrete_shapes(proto, {input_name: image_shape}), image_shape, pre,
                                  opts)
    frames = [as_rgb(f) for f in data.files]
    notes = list(data.notes) + _frame_notes(calib, frames)
    say("simulating noise and moving faces")
    images = _calibration_images(frames, _objects(frames, samples, ref, heads, names, pre, opts), pre, opts)
    chosen, tried = _choose_split(proto, candidates, images, pre, input_name, opts, say)
    threshold, rate = calibrate_threshold(chosen.noise_ceiling, chosen.change_floor, opts.max_skip)
    if chosen.ratio < SEPARABLE:
        notes.append(f"{chosen.name} does not separate change from noise well (ratio {chosen.ratio:.2f}): the "
                     "threshold sits below the weakest change, so noise will often open the gate")
    say("building the gated model")
    spec = GateSpec(split=chosen.name, split_shape=chosen.shape, pool=chosen.pool,
                    weights=tuple(map(float, _weights(chosen))), threshold=threshold, rate=rate,
                    max_skip=opts.max_skip, image_shape=image_shape,
                    output_shapes=tuple(tuple(o.shape) for o in first),
                    recompute=chosen.prefix_share <= RECOMPUTE_SHARE)
    metadata = _gate_metadata(model, spec, chosen, names, heads, pre, opts, preset)
    say("verifying against the original")
    gated, spec, rewrite, times = _build_verified(proto, spec, metadata, samples, input_name, names, opts.threads)
    report = GateReport(str(model) if isinstance(model, (str, Path)) else "model", heads.describe(), len(frames),
                        describe_preprocess(pre), chosen, tried, threshold, rate, opts.max_skip, opts.min_face,
                        opts.noise, *times, prefix_nodes=len(rewrite.record.prefix),
                        head_nodes=len(rewrite.record.head), recompute=spec.recompute, notes=notes)
    return GateResult(gated, report)


def _single_input(proto: onnx.ModelProto) -> str:
    """The detector's one input, refused when the graph cannot be gated."""
    inputs = graph_inputs(proto)
    if len(inputs) != 1:
        raise ConfigError(f"the gate needs a single-input detector; this model has {len(inputs)} inputs")
    if any(n.op_type in ("If", "Loop", "Scan") for n in proto.graph.node):
        raise ConfigError("models with If/Loop/Scan nodes cannot be gated")
    check_batch(proto, inputs[0].name)
    return inputs[0].name


def _detector_heads(names: list[str], first: list[np.ndarray], pre: Preprocess):
    """The detector heads recognised among the outputs on the first frame; refused when there are none."""
    heads = recognize(names, first, pre.size, 1)
    if heads is None:
        raise ConfigError("the model is not a face detector onnxprune can decode (no RetinaFace, UltraFace, SCRFD or "
                          "YuNet heads among its outputs): the gate carries a detector's outputs between frames")
    return heads


def _frame_notes(calib, frames: list[np.ndarray]) -> list[str]:
    """What the report should say about the calibration frames themselves."""
    notes = []
    if Path(str(calib)).is_dir() and synthetic_note(calib):
        notes.append(f"the calibration frames are SYNTHETIC ({synthetic_note(calib)})")
    if len(frames) < 4:
        notes.append(f"only {len(frames)} calibration frames: the threshold rests on few samples; use 16 or more")
    return notes


def _choose_split(proto: onnx.ModelProto, candidates: list[SplitCandidate], images: _Images, pre: Preprocess,
                  input_name: str, opts: GateOptions, say: Progress) -> tuple[SplitCandidate, list[SplitCandidate]]:
    """The earliest candidate that separates change from noise (``opts.at``: the first, whatever it
    measures), and every candidate measured up to it; refused when none does."""
    tried: list[SplitCandidate] = []
    for i, cand in enumerate(candidates):
        say("measuring split points", i + 1, len(candidates))
        _measure(proto, cand, images, pre, input_name)
        tried.append(cand)
        if opts.at is not None or cand.ratio >= SEPARABLE:
            return cand, tried
    best = max(tried, key=lambda c: c.ratio)
    raise ConfigError(f"no feature map in the first {opts.max_prefix:.0%} of the model's compute separates a "
                      f"{opts.min_face} px face appearing or moving from noise on these frames (best: {best.name}, "
                      f"change/noise {best.ratio:.2f}, {SEPARABLE:g} needed); pass --at TENSOR to gate there "
                      "anyway, or a larger --min-face")


def _gate_metadata(model, spec: GateSpec, chosen: SplitCandidate, names: list[str], heads, pre: Preprocess,
                   opts: GateOptions, preset: str | None) -> dict[str, str]:
    """The model metadata the gated runtime reads back (:class:`GateInfo`), and the preset when given."""
    info = GateInfo(chosen.name, spec.threshold, spec.rate, opts.max_skip, spec.background_shape, tuple(names),
                    spec.output_shapes, heads, pre,
                    {"min_face": opts.min_face, "noise_ceiling": chosen.noise_ceiling,
                     "change_floor": chosen.change_floor, "source": Path(str(model)).name
                     if isinstance(model, (str, Path)) else ""})
    return {GATE_METADATA: info.to_json(), **({"onnxprune.preset": preset} if preset else {})}


def _build_verified(proto: onnx.ModelProto, spec: GateSpec, metadata: dict[str, str], samples: np.ndarray,
                    input_name: str, names: list[str], threads: int):
    """:func:`_build`; when the head branch that recomputes the prefix fails verification, once more with
    the branch reading the split from the outer graph. Returns the spec that was built too."""
    try:
        gated, rewrite, times = _build(proto, spec, metadata, samples, input_name, names, threads)
    except VerificationError:
        if not spec.recompute:
            raise
        spec = replace(spec, recompute=False)  # the branch reads the split from the outer graph instead
        gated, rewrite, times = _build(proto, spec, metadata, samples, input_name, names, threads)
    return gated, spec, rewrite, times


def _build(proto: onnx.ModelProto, spec: GateSpec, metadata: dict[str, str], samples: np.ndarray, input_name: str,
           names: list[str], threads: int) -> tuple[onnx.ModelProto, GatePass, tuple[float, float, float]]:
    """The gated model, checked (onnx.checker, then bit-exact against the original in ORT) and timed."""
    rewrite = GatePass(spec)
    gated = ir.to_proto(rewrite(ir.from_proto(proto)).model)
    _set_metadata(gated, metadata)
    onnx.checker.check_model(gated, full_check=True)
    return gated, rewrite, _verify(proto, gated, samples, input_name, names, spec, threads)


def describe_preprocess(pre: Preprocess) -> str:
    """``BGR - (104, 117, 123), letterbox 640x640``: the preprocessing in one phrase."""
    mean = ", ".join(f"{m:g}" for m in pre.mean)
    std = "" if set(pre.std) == {1.0} else " / (" + ", ".join(f"{s:g}" for s in pre.std) + ")"
    size = "x".join(map(str, pre.size or ()))
    return f"{pre.channel_order.upper()} - ({mean}){std}, {pre.resize} {size}, {pre.layout.upper()}"


def calibrate_threshold(noise_ceiling: float, change_floor: float, max_skip: int) -> tuple[float, float]:
    """(threshold, update rate) from the noise ceiling N and change floor M (module docstring).
    When M is not above HEADROOM x N the threshold goes under M (changes still open the gate; noise often
    does too) and the background is never updated (no creep at all)."""
    threshold = HEADROOM * noise_ceiling
    if not change_floor > threshold:
        return 0.9 * change_floor, 0.0
    if max_skip <= 0:
        return threshold, 0.0
    return threshold, min(RATE_MAX, (change_floor / threshold - 1.0) / max_skip)


# ---------------------------------------------------------------------------------------- candidates
def split_candidates(proto: onnx.ModelProto, shapes: dict, image_shape: tuple[int, ...], pre: Preprocess,
                     opts: GateOptions) -> list[SplitCandidate]:
    """Feature maps to cut at, earliest first: ``opts.at`` alone, or block ends up to ``opts.max_prefix``."""
    graph = proto.graph
    producers = {o: n for n in graph.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    macs = {id(n): count_macs(_only(proto, [n]), shapes) for n in graph.node}
    total = max(1, sum(macs.values()))
    hw = image_shape[2:4] if pre.layout == "nchw" else image_shape[1:3]

    def feature_map(name: str) -> bool:
        s = shapes.get(name)
        return (name in producers and name not in outputs and s is not None and len(s) == 4 and s[0] == 1
                and s[2] >= 2 and s[3] >= 2 and hw[0] % s[2] == 0 and hw[0] // s[2] == hw[1] // s[3])

    def candidate(name: str) -> SplitCandidate:
        s = shapes[name]
        stride = hw[0] // s[2]
        pool = max(1, min(round(opts.min_face / 2 / stride), s[2] // 2, s[3] // 2))
        share = sum(macs[id(n)] for n in _ancestors(producers, name)) / total
        return SplitCandidate(name, tuple(int(d) for d in s), stride, pool, share)

    if opts.at is not None:
        if not feature_map(opts.at):
            known = [n.output[0] for n in graph.node if n.output and feature_map(n.output[0])
                     and n.op_type in _FEATURE_OPS][:8]
            raise ConfigError(f"unknown --at tensor {opts.at!r}: not an intermediate feature map [1, C, H, W] of this "
                              f"model; candidates: {', '.join(known)}{', ...' if known else ''}")
        return [candidate(opts.at)]
    found = []
    for node in graph.node:
        if node.op_type not in _FEATURE_OPS or not node.output or not feature_map(node.output[0]):
            continue
        users = consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type in _ACTIVATIONS:
            continue  # not a block end: cut after its activation
        c = candidate(node.output[0])
        if c.prefix_share <= opts.max_prefix:
            found.append(c)
    if not found:
        raise ConfigError(f"no feature map [1, C, H, W] in the first {opts.max_prefix:.0%} of this model's compute "
                          "to gate at; pass --at TENSOR")
    return sorted(found, key=lambda c: c.prefix_share)


def _ancestors(producers: dict[str, onnx.NodeProto], name: str) -> list[onnx.NodeProto]:
    seen: dict[int, onnx.NodeProto] = {}
    stack = [name]
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(i for i in node.input if i)
    return list(seen.values())


def _only(proto: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """A weightless model holding ``nodes`` (enough for ``count_macs``, which reads shapes only)."""
    m = onnx.ModelProto()
    m.graph.node.extend(nodes)
    return m


def _prefix_model(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The nodes ``name`` depends on, with ``name`` as the only output."""
    producers = {o: n for n in proto.graph.node for o in n.output if o}
    keep = {id(n) for n in _ancestors(producers, name)}
    nodes = [n for n in proto.graph.node if id(n) in keep]
    used = {i for n in nodes for i in n.input}
    graph = onnx.helper.make_graph(nodes, "prefix", list(graph_inputs(proto)),
                                   [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)],
                                   [t for t in proto.graph.initializer if t.name in used])
    return onnx.helper.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)


# ----------------------------------------------------------------------------------- simulated pairs
@dataclass
class _Images:
    """Model inputs of every simulated image, and which pairs (background, current) to score."""

    content: list[np.ndarray]  # uint8 frames at the size they take inside the model input
    noise: list[tuple[int, int]]
    change: list[tuple[int, int]]


def _objects(frames: list[np.ndarray], samples: np.ndarray, sess, heads, names: list[str], pre: Preprocess,
             opts: GateOptions) -> list[np.ndarray]:
    """Square crops to paste as moving faces: confident faces the detector finds in the frames, topped up
    with the most textured windows of the frames (a flat crop pasted on a flat wall would be no test)."""
    crops: list[tuple[float, np.ndarray]] = []
    for frame, x in zip(frames, samples):
        outs = sess.run(None, {sess.get_inputs()[0].name: x[None]})
        boxes = prepare(frame, pre)[1].to_frame(heads.decode(dict(zip(names, outs)), 1)[0])
        for x1, y1, x2, y2, score in boxes[:4]:
            w, h = x2 - x1, y2 - y1
            s = int(1.2 * max(w, h))
            a, b = int((x1 + x2) / 2 - s / 2), int((y1 + y2) / 2 - s / 2)
            if score >= 0.8 and 0.5 <= w / max(h, 1e-6) <= 2 and 16 <= s <= min(frame.shape[:2]) // 2 \
                    and a >= 0 and b >= 0 and a + s <= frame.shape[1] and b + s <= frame.shape[0]:
                crop = frame[b:b + s, a:a + s]
                if crop.std() >= MIN_TEXTURE:
                    crops.append((float(score), crop))
    crops.sort(key=lambda t: -t[0])
    found = [c for _, c in crops[:8]]
    rng = np.random.default_rng(opts.seed)
    for i in range(max(0, 4 - len(found))):
        frame = frames[i % len(frames)]
        s = max(8, min(frame.shape[:2]) // 4)
        windows = []
        for _ in range(32):
            a, b = rng.integers(0, frame.shape[1] - s + 1), rng.integers(0, frame.shape[0] - s + 1)
            windows.append(frame[b:b + s, a:a + s])
        found.append(max(windows, key=lambda w: float(w.std())))
    return found


def _calibration_images(frames: list[np.ndarray], objects: list[np.ndarray], pre: Preprocess,
                        opts: GateOptions) -> _Images:
    """Per frame: three noisy copies (noise pairs) and ``OBJECTS`` faces pasted then moved (change pairs)."""
    out = _Images([], [], [])
    for i, frame in enumerate(frames):
        rng = np.random.default_rng([opts.seed, i])
        fh, fw = frame.shape[:2]
        scale = _scale(frame.shape[:2], pre)
        side = int(np.clip(round(opts.min_face / scale), 4, min(fh, fw) // 2))
        step = max(1, round(MOVE * side))
        base = len(out.content)
        for _ in range(3):
            out.content.append(_content(perturb(frame, opts.noise, rng), pre))
        out.noise += [(base, base + 1), (base + 1, base + 2), (base, base + 2)]
        for j in range(OBJECTS):
            patch = resize(objects[rng.integers(len(objects))], (side, side))
            dx, dy = [(1, 0), (0, 1), (1, 1), (1, -1)][rng.integers(4)]
            dx, dy = dx * step * rng.choice([-1, 1]), dy * step
            x = int(rng.integers(max(0, -dx), max(1, fw - side - max(0, dx))))
            y = int(rng.integers(max(0, -dy), max(1, fh - side - max(0, dy))))
            appear = _content(perturb(paste(frame, patch, x, y), opts.noise, rng), pre)
            moved = _content(perturb(paste(frame, patch, x + dx, y + dy), opts.noise, rng), pre)
            k = len(out.content)
            out.content += [appear, moved]
            out.change += [(base + j, k), (k, k + 1)]
    return out


def _scale(frame_hw: tuple[int, int], pre: Preprocess) -> float:
    """Model-input pixels per frame pixel (the letterbox scale; the smaller axis scale when stretched)."""
    h, w = pre.size  # type: ignore[misc]
    return min(h / frame_hw[0], w / frame_hw[1])


def _content(frame: np.ndarray, pre: Preprocess) -> np.ndarray:
    """``frame`` resized to its size inside the model input (what ``Preprocess.apply`` resamples to)."""
    nh, nw = pre.content_size(frame.shape[:2], pre.size)  # type: ignore[arg-type]
    return frame if (nh, nw) == frame.shape[:2] else resize(frame, (nw, nh))


def _measure(proto: onnx.ModelProto, cand: SplitCandidate, images: _Images, pre: Preprocess, input_name: str) -> None:
    """Noise ceiling and change floor of ``cand`` (in place), with its per-channel noise scale."""
    sess = session(_prefix_model(proto, cand.name), 1)
    pooled = [pool_cells(sess.run(None, {input_name: prepare(c, pre)[0]})[0], cand.pool).astype(np.float32)
              for c in images.content]
    noise = [residual(pooled[b], pooled[a]) for a, b in images.noise]
    rms = np.sqrt(np.mean([np.mean(r * r, axis=(1, 2)) for r in noise], axis=0))
    cand.scale = np.maximum(rms, WEIGHT_FLOOR * np.median(rms) + 1e-12)  # type: ignore[attr-defined]
    w = _weights(cand)
    cand.noise_ceiling = max(gate_score(pooled[b], pooled[a], w) for a, b in images.noise)
    cand.change_floor = min(gate_score(pooled[b], pooled[a], w) for a, b in images.change)


def _weights(cand: SplitCandidate) -> np.ndarray:
    scale = cand.scale  # type: ignore[attr-defined]
    return 1.0 / (scale * len(scale))


# ------------------------------------------------------------------------------------------ checking
def _verify(original: onnx.ModelProto, gated: onnx.ModelProto, samples: np.ndarray, input_name: str,
            names: list[str], spec: GateSpec, threads: int) -> tuple[float, float, float]:
    """The gated model runs in ORT, equals the original bit for bit when the head runs, and carries its
    outputs when the gate is shut; returns (head, skip, original) ms per frame."""
    ref, sess = session(original, threads), session(gated, threads)
    out_names = [o.name for o in sess.get_outputs()]
    x = samples[:1]
    want = ref.run(None, {input_name: x})
    state = {BACKGROUND: np.zeros(spec.background_shape, np.float32), SKIPPED: np.array([-1], np.int64),
             **{LAST + n: np.zeros(o.shape, o.dtype) for n, o in zip(names, want)}}
    opened = dict(zip(out_names, sess.run(None, {input_name: x, **state})))
    if not bool(opened[RAN_HEAD][0]) or not all(np.array_equal(opened[n], w) for n, w in zip(names, want)):
        raise VerificationError("the gated model's outputs differ from the original's when the head runs "
                                "(a bug in onnxprune; nothing was written)")
    shut_state = {BACKGROUND: opened[BACKGROUND + ".next"], SKIPPED: opened[SKIPPED + ".next"],
                  **{LAST + n: opened[n] for n in names}}
    shut = dict(zip(out_names, sess.run(None, {input_name: x, **shut_state})))
    if bool(shut[RAN_HEAD][0]) or not all(np.array_equal(shut[n], w) for n, w in zip(names, want)):
        raise VerificationError(f"the gate opened on an identical frame (score {float(shut[SCORE][0]):.3g}) or did not "
                                "carry the last outputs (a bug in onnxprune; nothing was written)")
    return (_ms(sess, {input_name: x, **state}), _ms(sess, {input_name: x, **shut_state}),
            _ms(ref, {input_name: x}))


def _ms(sess, feed: dict, runs: int = 7) -> float:
    sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def _set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in entries.items():
        model.metadata_props.add(key=k, value=v)


def _r(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 5)
