"""Face-detector heads recognised from their output shapes, and decoded to boxes.

Why shapes, not names: official exports name outputs by number (SCRFD's ``446``, ``466``, ...), and a
user's re-export renames them again. What does not change is the geometry: how many rows each output
has per image, and how that count follows from the input size, the strides and the anchors. So a
family is recognised when every row count it predicts for this input size is there, and only then.

Families: RetinaFace (loc/conf over Pytorch_Retinaface's priors), UltraFace/RFB (boxes/scores over its
four-level priors, decoded in the graph or not), SCRFD (per-stride score/bbox[/kps], anchor-free
distances, 1 or 2 anchors per point), YuNet-2023 (per-stride cls/obj/bbox/kps, one point per location).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DetectionHeads", "decode_retinaface", "decode_scrfd", "nms", "per_image", "prior_boxes",
           "recognize", "ultraface_priors"]

RETINA_MIN_SIZES = ((16, 32), (64, 128), (256, 512))
RETINA_STEPS = (8, 16, 32)
ULTRA_MIN_BOXES = ((10, 16, 24), (32, 48), (64, 96), (128, 192, 256))
ULTRA_STEPS = (8, 16, 32, 64)
STRIDE_SETS = ((8, 16, 32), (8, 16, 32, 64, 128))
SCORE_THRESHOLD = 0.5
NMS_IOU = 0.4


# ------------------------------------------------------------------------------------------------- boxes
def _iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one [4] box with [K,4] boxes (x1,y1,x2,y2, continuous pixel coordinates, no +1)."""
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0.0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0.0, None)
    inter = w * h
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    union = area(box) + area(boxes) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS; indices kept, highest score first. Plain numpy so fidelity needs no torchvision."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        order = rest[_iou_one(boxes[i], boxes[rest]) <= iou]
    return np.asarray(keep, dtype=np.int64)


def _select(boxes: np.ndarray, scores: np.ndarray, threshold: float, iou: float, top_k: int | None) -> np.ndarray:
    """Threshold, NMS, cap: the shared tail of every detector decode; returns [K,5] float32."""
    m = scores > threshold
    boxes, scores = boxes[m], scores[m]
    keep = nms(boxes, scores, iou)
    if top_k is not None:
        keep = keep[:top_k]
    return np.concatenate([boxes[keep], scores[keep, None]], axis=1).astype(np.float32).reshape(-1, 5)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def conf_is_softmaxed(conf: np.ndarray, atol: float = 1e-3) -> bool:
    """True if class scores already are probabilities (non-negative, rows sum to 1).

    Why check: exports differ (Softmax folded into the graph at test time or not); guessing wrong
    either double-softmaxes (compressing all scores towards 0.5..0.73) or thresholds logits.
    """
    c = np.asarray(conf)
    return bool(c.size and c.min() >= -atol and np.allclose(c.sum(-1), 1.0, atol=atol))


def in_unit_range(x: np.ndarray) -> bool:
    """True if scores already are probabilities (exports differ in where the sigmoid sits)."""
    x = np.asarray(x)
    return bool(x.size == 0 or (x.min() >= 0.0 and x.max() <= 1.0))


def _probabilities(x: np.ndarray, activated: bool) -> np.ndarray:
    """``x`` as probabilities: as it is when the export applied the sigmoid, else through one."""
    x = np.asarray(x, np.float64)
    return x if activated else 1.0 / (1.0 + np.exp(-np.clip(x, -50.0, 50.0)))


# ------------------------------------------------------------------------------------------------ anchors
def prior_boxes(image_hw: tuple[int, int], min_sizes: Sequence[Sequence[int]] = RETINA_MIN_SIZES,
                steps: Sequence[int] = RETINA_STEPS) -> np.ndarray:
    """[P,4] (cx, cy, w, h) normalised anchors, in the exact order of Pytorch_Retinaface's PriorBox.

    Why exact order matters: loc/conf rows are matched to anchors by position only, so any other
    ordering decodes garbage that still looks like boxes.
    """
    h, w = image_hw
    levels = []
    for sizes, step in zip(min_sizes, steps):
        fh, fw = math.ceil(h / step), math.ceil(w / step)
        ii, jj = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        cx, cy = (jj + 0.5) * step / w, (ii + 0.5) * step / h
        per_size = [np.stack([cx, cy, np.full_like(cx, s / w), np.full_like(cy, s / h)], -1) for s in sizes]
        levels.append(np.stack(per_size, axis=2).reshape(-1, 4))  # (i, j) row-major, then min_sizes
    return np.concatenate(levels).astype(np.float64)


def ultraface_priors(image_hw: tuple[int, int]) -> np.ndarray:
    """[P,4] (cx, cy, w, h) normalised priors of Ultra-Light-Fast-Generic-Face-Detector (``generate_priors``):
    feature maps ceil(size/stride), centres at (i + 0.5) / (size/stride), clipped to [0, 1]."""
    h, w = image_hw
    levels = []
    for sizes, step in zip(ULTRA_MIN_BOXES, ULTRA_STEPS):
        fh, fw = math.ceil(h / step), math.ceil(w / step)
        ii, jj = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        cx, cy = (jj + 0.5) / (w / step), (ii + 0.5) / (h / step)
        per_size = [np.stack([cx, cy, np.full_like(cx, s / w), np.full_like(cy, s / h)], -1) for s in sizes]
        levels.append(np.stack(per_size, axis=2).reshape(-1, 4))
    return np.clip(np.concatenate(levels), 0.0, 1.0).astype(np.float64)


def _centre_decode(loc: np.ndarray, priors: np.ndarray, variances: tuple[float, float] = (0.1, 0.2)) -> np.ndarray:
    """SSD centre-form offsets -> normalised corner boxes [P,4]."""
    centre = priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * np.exp(np.clip(loc[:, 2:] * variances[1], -50.0, 50.0))  # no overflow to inf
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1)


def _grid(image_hw: tuple[int, int], stride: int, anchors: int) -> np.ndarray:
    """[rows, 2] (x, y) points of one stride, row-major, ``anchors`` copies each (SCRFD anchor centres)."""
    fh, fw = math.ceil(image_hw[0] / stride), math.ceil(image_hw[1] / stride)
    ii, jj = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
    return np.repeat(np.stack([jj, ii], -1).reshape(-1, 2), anchors, axis=0).astype(np.float64)


def _rows(image_hw: tuple[int, int], stride: int, anchors: int) -> int:
    return math.ceil(image_hw[0] / stride) * math.ceil(image_hw[1] / stride) * anchors


# ------------------------------------------------------------------------------------------ legacy decoders
def decode_retinaface(loc: np.ndarray, conf: np.ndarray, image_hw: tuple[int, int], *,
                      min_sizes: Sequence[Sequence[int]] = RETINA_MIN_SIZES, steps: Sequence[int] = RETINA_STEPS,
                      variances: tuple[float, float] = (0.1, 0.2), score_threshold: float = SCORE_THRESHOLD,
                      nms_iou: float = NMS_IOU, top_k: int = 750, softmaxed: bool | None = None) -> list[np.ndarray]:
    """Per image [K,5] (x1,y1,x2,y2,score) pixel boxes from RetinaFace loc [N,P,4] / conf [N,P,2].

    ``top_k`` caps the detections kept after NMS (Pytorch_Retinaface's keep_top_k). ``softmaxed``
    says whether ``conf`` holds probabilities; None tells from the values. Comparing two models,
    decide it once on the reference: an int8 softmax's rows no longer sum to 1 within 1e-3.
    """
    loc, conf = np.asarray(loc, np.float64), np.asarray(conf, np.float64)
    if loc.ndim == 2:
        loc, conf = loc[None], conf[None]
    priors = prior_boxes(image_hw, min_sizes, steps)
    if loc.shape[1] != len(priors) or conf.shape[:2] != loc.shape[:2]:
        raise ValueError(f"loc {loc.shape} / conf {conf.shape} do not match {len(priors)} priors for {image_hw}")
    probs = conf if (conf_is_softmaxed(conf) if softmaxed is None else softmaxed) else _softmax(conf)
    h, w = image_hw
    scale = np.array([w, h, w, h], np.float64)
    return [_select(_centre_decode(l, priors, variances) * scale, p[:, 1], score_threshold, nms_iou, top_k)
            for l, p in zip(loc, probs)]


def decode_scrfd(outputs: Mapping[str, np.ndarray], image_hw: tuple[int, int], strides: Sequence[int] = (8, 16, 32),
                 num_anchors: int = 2, score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU
                 ) -> list[np.ndarray]:
    """Per image [K,5] boxes from SCRFD ``score_<s>`` [N,A,1] (sigmoid applied) and ``bbox_<s>`` [N,A,4]
    (l,t,r,b distances in stride units from anchor centres (j*s, i*s), row-major, num_anchors each)."""
    score = {s: outputs[f"score_{s}"] for s in strides}
    dist = {s: outputs[f"bbox_{s}"] for s in strides}
    n = 1 if np.ndim(score[strides[0]]) == 2 else int(np.shape(score[strides[0]])[0])
    activated = all(in_unit_range(v) for v in score.values())
    return _decode_points(score, dist, image_hw, tuple(strides), num_anchors, n, activated, score_threshold, nms_iou)


def _decode_points(score: Mapping[int, np.ndarray], dist: Mapping[int, np.ndarray], image_hw: tuple[int, int],
                   strides: tuple[int, ...], anchors: int, n_images: int, activated: bool,
                   threshold: float = SCORE_THRESHOLD, iou: float = NMS_IOU) -> list[np.ndarray]:
    """SCRFD distance decoding: boxes (cx - l*s, cy - t*s, cx + r*s, cy + b*s) around anchor points."""
    boxes, scores = [], []
    for s in strides:
        sc, d = per_image(score[s], n_images), per_image(dist[s], n_images)
        centres = _grid(image_hw, s, anchors) * s
        if len(centres) != sc.shape[1]:
            raise ValueError(f"stride {s}: {sc.shape[1]} rows, expected {len(centres)} for {image_hw}")
        d = np.asarray(d, np.float64) * s
        boxes.append(np.concatenate([centres - d[..., :2], centres + d[..., 2:4]], axis=-1))
        scores.append(_probabilities(sc, activated)[..., 0])
    b, c = np.concatenate(boxes, axis=1), np.concatenate(scores, axis=1)
    return [_select(bi, ci, threshold, iou, None) for bi, ci in zip(b, c)]


def _decode_yunet(cls: Mapping[int, np.ndarray], obj: Mapping[int, np.ndarray], bbox: Mapping[int, np.ndarray],
                  image_hw: tuple[int, int], strides: tuple[int, ...], n_images: int, activated: bool
                  ) -> list[np.ndarray]:
    """OpenCV YuNet (2023): score sqrt(cls*obj); centre ((c + dx)*s, (r + dy)*s), size exp(dw)*s, exp(dh)*s."""
    boxes, scores = [], []
    for s in strides:
        c = np.clip(_probabilities(per_image(cls[s], n_images), activated), 0, 1)
        o = np.clip(_probabilities(per_image(obj[s], n_images), activated), 0, 1)
        b = np.asarray(per_image(bbox[s], n_images), np.float64)
        points = _grid(image_hw, s, 1)
        centre = (points + b[..., :2]) * s
        size = np.exp(np.clip(b[..., 2:4], -20, 20)) * s
        boxes.append(np.concatenate([centre - size / 2, centre + size / 2], axis=-1))
        scores.append(np.sqrt(c * o)[..., 0])
    bx, sc = np.concatenate(boxes, axis=1), np.concatenate(scores, axis=1)
    return [_select(bi, ci, SCORE_THRESHOLD, NMS_IOU, None) for bi, ci in zip(bx, sc)]


# ---------------------------------------------------------------------------------------------- recognition
def per_image(arr: np.ndarray, n_images: int) -> np.ndarray:
    """[N, rows, C] from an output that has a batch axis ([N, rows, C]) or not ([N*rows, C], concatenated
    over single-image runs, as insightface's non-batched SCRFD exports give)."""
    a = np.asarray(arr)
    if a.ndim == 2 and n_images > 0 and a.shape[0] % n_images == 0:
        return a.reshape(n_images, a.shape[0] // n_images, a.shape[1])
    return a


@dataclass(frozen=True)
class DetectionHeads:
    """Which outputs of a detector play which role, and how they decode to boxes."""

    family: str  # retinaface | ultraface | scrfd | yunet
    image_hw: tuple[int, int]
    roles: tuple[tuple[str, str], ...]  # (role, output name): loc/conf, boxes/scores, score@8, bbox@8, cls@8, ...
    strides: tuple[int, ...] = ()
    anchors: int = 1
    decoded: bool = False  # ultraface: boxes already decoded to normalised corners in the graph
    activated: bool = True  # scores already softmax/sigmoid: decided on the reference, applied to both models

    def output(self, role: str) -> str:
        return dict(self.roles)[role]

    def describe(self) -> str:
        names = ", ".join(n for _, n in self.roles[:4]) + (", ..." if len(self.roles) > 4 else "")
        where = f" at strides {'/'.join(map(str, self.strides))}" if self.strides else ""
        extra = f", {self.anchors} anchors per point" if self.family == "scrfd" else ""
        return f"{_TITLES[self.family]} heads{where}{extra} (outputs {names})"

    def decode(self, outputs: Mapping[str, np.ndarray], n_images: int) -> list[np.ndarray]:
        """Per image [K,5] (x1, y1, x2, y2, score) in input pixels, score > 0.5, after NMS."""
        if self.family == "retinaface":
            loc, conf = (per_image(outputs[self.output(r)], n_images) for r in ("loc", "conf"))
            return decode_retinaface(loc, conf, self.image_hw, softmaxed=self.activated)
        if self.family == "ultraface":
            return self._decode_ultraface(outputs, n_images)
        pick = lambda role: {s: outputs[self.output(f"{role}@{s}")] for s in self.strides}  # noqa: E731
        if self.family == "scrfd":
            return _decode_points(pick("score"), pick("bbox"), self.image_hw, self.strides, self.anchors, n_images,
                                  self.activated)
        return _decode_yunet(pick("cls"), pick("obj"), pick("bbox"), self.image_hw, self.strides, n_images,
                             self.activated)

    def _decode_ultraface(self, outputs: Mapping[str, np.ndarray], n_images: int) -> list[np.ndarray]:
        boxes = np.asarray(per_image(outputs[self.output("boxes")], n_images), np.float64)
        scores = np.asarray(per_image(outputs[self.output("scores")], n_images), np.float64)
        probs = scores if self.activated else _softmax(scores)
        priors = ultraface_priors(self.image_hw)
        h, w = self.image_hw
        scale = np.array([w, h, w, h], np.float64)
        out = []
        for b, p in zip(boxes, probs):
            corners = b if self.decoded else _centre_decode(b, priors)
            out.append(_select(corners * scale, p[:, 1], SCORE_THRESHOLD, NMS_IOU, None))
        return out


_TITLES = {"retinaface": "RetinaFace", "ultraface": "UltraFace/RFB", "scrfd": "SCRFD", "yunet": "YuNet"}


def recognize(names: Sequence[str], outputs: Sequence[np.ndarray], image_hw: tuple[int, int],
              n_images: int = 1) -> DetectionHeads | None:
    """The detector family whose every predicted row count is among the outputs, or None.

    ``outputs`` are the model's outputs for ``n_images`` images of ``image_hw`` (with or without a
    batch axis). Names help only to order the roles; they are never required.
    """
    shaped = [(n, per_image(o, n_images)) for n, o in zip(names, outputs)]
    shaped = [(n, o) for n, o in shaped if o.ndim == 3]
    return (_prior_family(shaped, image_hw) or _point_family(shaped, image_hw))


def _prior_family(shaped: list[tuple[str, np.ndarray]], hw: tuple[int, int]) -> DetectionHeads | None:
    """RetinaFace or UltraFace: a 4-column and a 2-column output over one prior set."""
    for family, count in (("retinaface", len(prior_boxes(hw))), ("ultraface", len(ultraface_priors(hw)))):
        box = [(n, o) for n, o in shaped if o.shape[1:] == (count, 4)]
        cls = [(n, o) for n, o in shaped if o.shape[1:] == (count, 2)]
        if len(box) == 1 and len(cls) == 1:
            role = ("loc", "conf") if family == "retinaface" else ("boxes", "scores")
            decoded = family == "ultraface" and _looks_decoded(box[0][1])
            return DetectionHeads(family, hw, ((role[0], box[0][0]), (role[1], cls[0][0])), decoded=decoded,
                                  activated=conf_is_softmaxed(cls[0][1]))
    return None


def _looks_decoded(boxes: np.ndarray) -> bool:
    """Normalised corner boxes (x2 > x1, y2 > y1, inside about [0, 1]) rather than SSD offsets."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    b = b[np.isfinite(b).all(axis=1)]  # an overflowing row or two says nothing about the rest
    if not len(b):
        return False
    ordered = np.mean((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))
    lo, hi = np.percentile(b, [1, 99])
    return bool(ordered > 0.99 and lo > -0.5 and hi < 1.5)


def _point_family(shaped: list[tuple[str, np.ndarray]], hw: tuple[int, int]) -> DetectionHeads | None:
    """SCRFD (one 1-column output per stride, 1 or 2 anchors) or YuNet (two 1-column outputs, 1 point)."""
    for strides in STRIDE_SETS:
        for anchors in (2, 1):
            roles = _point_roles(shaped, hw, strides, anchors)
            if roles is not None:
                family = "yunet" if any(r.startswith("obj@") for r, _ in roles) else "scrfd"
                arrays = dict(shaped)
                activated = all(in_unit_range(arrays[n]) for r, n in roles if not r.startswith("bbox@"))
                return DetectionHeads(family, hw, roles, strides, anchors, activated=activated)
    return None


def _point_roles(shaped: list[tuple[str, np.ndarray]], hw: tuple[int, int], strides: tuple[int, ...],
                 anchors: int) -> tuple[tuple[str, str], ...] | None:
    roles: list[tuple[str, str]] = []
    for s in strides:
        rows = _rows(hw, s, anchors)
        ones = [n for n, o in shaped if o.shape[1:] == (rows, 1)]
        fours = [n for n, o in shaped if o.shape[1:] == (rows, 4)]
        if len(fours) != 1 or len(ones) not in (1, 2) or (len(ones) == 2 and anchors != 1):
            return None
        if len(ones) == 1:
            roles += [(f"score@{s}", ones[0]), (f"bbox@{s}", fours[0])]
        else:
            cls, obj = sorted(ones, key=lambda n: (not n.startswith("cls"), n))
            roles += [(f"cls@{s}", cls), (f"obj@{s}", obj), (f"bbox@{s}", fours[0])]
    return tuple(roles)
