"""Label-free fidelity: how close a pruned/quantized model stays to its original on calibration inputs.

Why no labels: calibration photos come without annotations, and the question after slimming is not
"is the model accurate" but "does it still behave like the model we started from". So the original
model's outputs serve as ground truth: raw-tensor agreement (cosine, SQNR) catches numeric drift, and
task-level agreement (detection AP against the reference detections, embedding cosine / verification
ROC, top-1 agreement) tells whether that drift matters to what the model is used for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = [
    "FidelityReport", "OutputFidelity", "average_precision", "conf_is_softmaxed", "decode_retinaface",
    "decode_scrfd", "embedding_fidelity", "nms", "output_fidelity", "prior_boxes", "top1_agreement",
    "verification",
]


# --------------------------------------------------------------------------------------------- raw outputs
@dataclass
class OutputFidelity:
    """Agreement of one output tensor over the whole batch (cosine in [-1, 1], SQNR in dB, inf if exact)."""

    name: str
    cosine: float
    sqnr_db: float


def output_fidelity(ref: Sequence[np.ndarray], got: Sequence[np.ndarray], names: Sequence[str]) -> list[OutputFidelity]:
    """Per-output cosine and SQNR over the flattened batch.

    Why both: cosine ignores scale (a uniformly shrunk output looks perfect) while SQNR counts every
    bit of error energy; pruning tends to rescale, quantization tends to add noise.
    """
    if not len(ref) == len(got) == len(names):
        raise ValueError(f"length mismatch: {len(ref)} ref, {len(got)} got, {len(names)} names")
    result = []
    for name, r, g in zip(names, ref, got):
        r64, g64 = np.asarray(r, np.float64).ravel(), np.asarray(g, np.float64).ravel()
        if r64.shape != g64.shape:
            raise ValueError(f"{name}: shape {np.shape(r)} vs {np.shape(g)}")
        nr, ng = float(np.linalg.norm(r64)), float(np.linalg.norm(g64))
        err = float(np.sum((r64 - g64) ** 2))
        if err == 0.0:  # exact copy: report exactly 1, not 1 +- rounding
            cos = 1.0
        else:
            cos = 0.0 if nr == 0.0 or ng == 0.0 else float(np.clip(r64 @ g64 / (nr * ng), -1.0, 1.0))
        sqnr = math.inf if err == 0.0 else (-math.inf if nr == 0.0 else 10.0 * math.log10(nr * nr / err))
        result.append(OutputFidelity(name, cos, sqnr))
    return result


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


# ------------------------------------------------------------------------------------------------ RetinaFace
def prior_boxes(image_hw: tuple[int, int], min_sizes: Sequence[Sequence[int]] = ((16, 32), (64, 128), (256, 512)),
                steps: Sequence[int] = (8, 16, 32)) -> np.ndarray:
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


def conf_is_softmaxed(conf: np.ndarray, atol: float = 1e-3) -> bool:
    """True if class scores already are probabilities (non-negative, rows sum to 1).

    Why check: exports differ (Softmax folded into the graph at test time or not); guessing wrong
    either double-softmaxes (compressing all scores towards 0.5..0.73) or thresholds logits.
    """
    c = np.asarray(conf)
    return bool(c.size and c.min() >= -atol and np.allclose(c.sum(-1), 1.0, atol=atol))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def decode_retinaface(loc: np.ndarray, conf: np.ndarray, image_hw: tuple[int, int], *,
                      min_sizes: Sequence[Sequence[int]] = ((16, 32), (64, 128), (256, 512)),
                      steps: Sequence[int] = (8, 16, 32), variances: tuple[float, float] = (0.1, 0.2),
                      score_threshold: float = 0.5, nms_iou: float = 0.4, top_k: int = 750) -> list[np.ndarray]:
    """Per image [K,5] (x1,y1,x2,y2,score) pixel boxes from RetinaFace loc [N,P,4] / conf [N,P,2].

    ``top_k`` caps the detections kept after NMS (Pytorch_Retinaface's keep_top_k).
    """
    loc, conf = np.asarray(loc, np.float64), np.asarray(conf, np.float64)
    if loc.ndim == 2:
        loc, conf = loc[None], conf[None]
    priors = prior_boxes(image_hw, min_sizes, steps)
    if loc.shape[1] != len(priors) or conf.shape[:2] != loc.shape[:2]:
        raise ValueError(f"loc {loc.shape} / conf {conf.shape} do not match {len(priors)} priors for {image_hw}")
    probs = conf if conf_is_softmaxed(conf) else _softmax(conf)
    h, w = image_hw
    scale = np.array([w, h, w, h], np.float64)
    out = []
    for l, p in zip(loc, probs):
        centre = priors[:, :2] + l[:, :2] * variances[0] * priors[:, 2:]
        size = priors[:, 2:] * np.exp(l[:, 2:] * variances[1])
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1) * scale
        out.append(_select(boxes, p[:, 1], score_threshold, nms_iou, top_k))
    return out


# ------------------------------------------------------------------------------------------------------ SCRFD
def decode_scrfd(outputs: dict[str, np.ndarray], image_hw: tuple[int, int], strides: Sequence[int] = (8, 16, 32),
                 num_anchors: int = 2, score_threshold: float = 0.5, nms_iou: float = 0.4) -> list[np.ndarray]:
    """Per image [K,5] boxes from SCRFD ``score_<s>`` [N,A,1] (sigmoid applied) and ``bbox_<s>`` [N,A,4]
    (l,t,r,b distances in stride units from anchor centres (j*s, i*s), row-major, num_anchors each)."""
    h, w = image_hw
    per_level = []
    for s in strides:
        score, dist = np.asarray(outputs[f"score_{s}"], np.float64), np.asarray(outputs[f"bbox_{s}"], np.float64)
        if score.ndim == 2:
            score, dist = score[None], dist[None]
        fh, fw = math.ceil(h / s), math.ceil(w / s)
        ii, jj = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        centres = np.repeat(np.stack([jj, ii], -1).reshape(-1, 2) * s, num_anchors, axis=0).astype(np.float64)
        if len(centres) != score.shape[1]:
            raise ValueError(f"stride {s}: {score.shape[1]} rows, expected {len(centres)} for {image_hw}")
        d = dist * s
        boxes = np.concatenate([centres - d[..., :2], centres + d[..., 2:]], axis=-1)
        per_level.append((boxes, score[..., 0]))
    boxes = np.concatenate([b for b, _ in per_level], axis=1)
    scores = np.concatenate([c for _, c in per_level], axis=1)
    return [_select(b, c, score_threshold, nms_iou, None) for b, c in zip(boxes, scores)]


# -------------------------------------------------------------------------------------------------------- AP
def average_precision(ref_dets: Sequence[np.ndarray], got_dets: Sequence[np.ndarray], iou: float = 0.5) -> float:
    """VOC all-point AP of ``got`` detections with the reference model's detections as ground truth.

    Why reference-as-truth: it measures whether the slimmed detector finds the same faces, no labels needed.
    """
    if len(ref_dets) != len(got_dets):
        raise ValueError(f"{len(ref_dets)} reference images vs {len(got_dets)} detected")
    gts = [np.asarray(r, np.float64).reshape(-1, np.shape(r)[-1] if np.size(r) else 4)[:, :4] for r in ref_dets]
    n_pos = sum(len(g) for g in gts)
    cands = [(float(d[4]), img, np.asarray(d[:4], np.float64))
             for img, ds in enumerate(got_dets) for d in np.asarray(ds).reshape(-1, 5)]
    if n_pos == 0:
        return 1.0 if not cands else 0.0
    if not cands:
        return 0.0
    cands.sort(key=lambda c: -c[0])
    used = [np.zeros(len(g), bool) for g in gts]
    tp = np.zeros(len(cands))
    for k, (_, img, box) in enumerate(cands):
        if len(gts[img]):
            ious = np.where(used[img], -1.0, _iou_one(box, gts[img]))
            best = int(np.argmax(ious))
            if ious[best] >= iou:
                used[img][best] = True
                tp[k] = 1.0
    ctp = np.cumsum(tp)
    recall, precision = ctp / n_pos, ctp / np.arange(1, len(cands) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    step = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


# ------------------------------------------------------------------------------------------------ embeddings
def _l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embedding_fidelity(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Mean and worst cosine between corresponding (L2-normalised) embeddings.

    Why the minimum too: one collapsed identity ruins verification while barely moving the mean.
    """
    if np.shape(ref) != np.shape(got):
        raise ValueError(f"shape {np.shape(ref)} vs {np.shape(got)}")
    cos = np.clip(np.sum(_l2n(ref) * _l2n(got), axis=1), -1.0, 1.0)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}


def verification(embeddings: np.ndarray, labels: Sequence[Any], fmr: Sequence[float] = (1e-2, 1e-1)) -> dict[str, float]:
    """Verification ROC over all same/different pairs: best-threshold accuracy, AUC, FNMR at fixed FMRs.

    Why compare before/after on labelled identities: embedding cosine to the reference can stay high
    while the genuine/impostor margin shrinks; FNMR at a fixed FMR shows exactly that.
    The FMR threshold is set on impostor scores: accept ``score > t`` with at most ``floor(fmr * n_imp)``
    impostors above ``t``.
    """
    e, lab = _l2n(embeddings), np.asarray(labels)
    i, j = np.triu_indices(len(e), k=1)
    scores, same = np.sum(e[i] * e[j], axis=1), lab[i] == lab[j]
    gen, imp = np.sort(scores[same]), np.sort(scores[~same])
    if not len(gen) or not len(imp):
        raise ValueError("verification needs at least one genuine and one impostor pair")
    # accuracy at every distinct threshold (accept score >= t), plus "accept nothing"
    ts = np.concatenate([np.unique(scores), [np.inf]])
    tp = len(gen) - np.searchsorted(gen, ts, "left")
    tn = np.searchsorted(imp, ts, "left")
    acc = (tp + tn) / (len(gen) + len(imp))
    best = int(np.argmax(acc))
    lo, hi = np.searchsorted(imp, gen, "left"), np.searchsorted(imp, gen, "right")
    out = {"n_genuine": float(len(gen)), "n_impostor": float(len(imp)), "accuracy": float(acc[best]),
           "threshold": float(ts[best]), "auc": float((lo.sum() + 0.5 * (hi - lo).sum()) / (len(gen) * len(imp)))}
    imp_desc = imp[::-1]
    for f in fmr:
        k = int(math.floor(f * len(imp)))
        t = -np.inf if k >= len(imp) else float(imp_desc[k])
        out[f"fnmr@fmr={f:g}"] = float(np.mean(gen <= t))
        out[f"fmr@fmr={f:g}"] = float(np.mean(imp > t))
    return out


# -------------------------------------------------------------------------------------------- classification
def top1_agreement(ref_logits: np.ndarray, got_logits: np.ndarray) -> float:
    """Fraction of inputs whose argmax class is unchanged (classifiers: age/gender heads)."""
    r, g = np.asarray(ref_logits), np.asarray(got_logits)
    if r.shape != g.shape:
        raise ValueError(f"shape {r.shape} vs {g.shape}")
    return float(np.mean(r.argmax(-1) == g.argmax(-1)))


# ------------------------------------------------------------------------------------------------------ report
@dataclass
class FidelityReport:
    """Everything measured for one reference/candidate pair; fields left None were not applicable."""

    n_inputs: int = 0
    outputs: list[OutputFidelity] = field(default_factory=list)
    detection_ap: float | None = None
    detections: tuple[int, int] | None = None  # total boxes (reference, candidate)
    embedding: dict[str, float] | None = None
    verification_ref: dict[str, float] | None = None
    verification_got: dict[str, float] | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready apart from inf SQNR, which json writes as Infinity)."""
        return asdict(self)

    def headline(self) -> tuple[str, float]:
        """(name, value) of the one number to rank by: the task metric when there is one, else the mean
        output cosine."""
        if self.detection_ap is not None:
            return "detection AP@0.5", self.detection_ap
        if self.embedding is not None:
            return "embedding cosine", self.embedding["mean_cosine"]
        if self.top1_agreement is not None:
            return "top-1 agreement", self.top1_agreement
        return "mean output cosine", float(np.mean([o.cosine for o in self.outputs])) if self.outputs else 1.0

    def summary(self) -> str:
        """A few human lines; worst output first because that is the one to look at."""
        lines = [f"fidelity on {self.n_inputs} inputs"]
        if self.outputs:
            worst = min(self.outputs, key=lambda o: o.sqnr_db)
            lines.append("outputs: " + ", ".join(f"{o.name} cos={o.cosine:.5f} sqnr={o.sqnr_db:.1f}dB"
                                                 for o in sorted(self.outputs, key=lambda o: o.sqnr_db)))
            lines[-1] += f"  (worst: {worst.name})"
        if self.detection_ap is not None:
            n = f" ({self.detections[0]} ref / {self.detections[1]} got boxes)" if self.detections else ""
            lines.append(f"detection AP@0.5 vs reference: {self.detection_ap:.4f}{n}")
        if self.embedding is not None:
            lines.append(f"embedding cosine: mean {self.embedding['mean_cosine']:.5f}, "
                         f"min {self.embedding['min_cosine']:.5f}")
        for tag, v in (("ref", self.verification_ref), ("got", self.verification_got)):
            if v is not None:
                fn = ", ".join(f"{k.split('@')[0].upper()}@{k.split('=')[1]}={x:.4f}"
                               for k, x in v.items() if k.startswith("fnmr@"))
                lines.append(f"verification [{tag}]: acc {v['accuracy']:.4f}, auc {v['auc']:.4f}, {fn}")
        if self.top1_agreement is not None:
            lines.append(f"top-1 agreement: {self.top1_agreement:.4f}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ evaluation
TASKS = ("auto", "detection", "embedding", "classification", "outputs")


def guess_task(output_names: Sequence[str], outputs: Sequence[np.ndarray],
               image_hw: tuple[int, int] | None = None) -> str:
    """Detection (RetinaFace loc/conf or SCRFD score_*), embedding, classification, or plain outputs.

    With ``image_hw``, loc/conf-shaped outputs count as RetinaFace only if their anchor count
    matches its priors: other detectors (other anchor layouts) are compared output by output.
    """
    shapes = [np.asarray(o).shape for o in outputs]
    if any(n.startswith("score_") for n in output_names) and any(n.startswith("bbox_") for n in output_names):
        return "detection"
    loc = [s for s in shapes if len(s) == 3 and s[-1] == 4]
    if loc and any(len(s) == 3 and s[-1] == 2 for s in shapes):
        if image_hw is None or loc[0][1] == len(prior_boxes(image_hw)):
            return "detection"
        return "outputs"
    if len(outputs) == 1 and len(shapes[0]) == 2:
        probs = np.asarray(outputs[0])
        if probs.shape[1] < 64 or (np.all(probs >= 0) and np.allclose(probs.sum(axis=1), 1, atol=1e-3)):
            return "classification"
        return "embedding"
    return "outputs"


def evaluate(ref: Sequence[np.ndarray], got: Sequence[np.ndarray], names: Sequence[str], image_hw: tuple[int, int],
             task: str = "auto") -> FidelityReport:
    """Compare a candidate's outputs with the reference's on the same (held-out) inputs."""
    report = FidelityReport(n_inputs=int(np.asarray(ref[0]).shape[0]) if ref else 0,
                            outputs=output_fidelity(ref, got, names))
    task = guess_task(names, ref, image_hw) if task == "auto" else task
    by_name_ref, by_name_got = dict(zip(names, ref)), dict(zip(names, got))
    if task == "detection":
        if any(n.startswith("score_") for n in names):
            r = decode_scrfd(by_name_ref, image_hw)
            g = decode_scrfd(by_name_got, image_hw)
        else:
            loc = next((n for n, o in by_name_ref.items() if o.ndim == 3 and o.shape[-1] == 4), None)
            conf = next((n for n, o in by_name_ref.items() if o.ndim == 3 and o.shape[-1] == 2), None)
            if loc is None or conf is None:
                raise ConfigError("--task detection needs RetinaFace loc [N,P,4] / conf [N,P,2] or SCRFD "
                                  "score_*/bbox_* outputs; use --task outputs")
            try:
                r = decode_retinaface(by_name_ref[loc], by_name_ref[conf], image_hw)
            except ValueError as exc:  # another anchor layout than RetinaFace's
                raise ConfigError(f"--task detection: {exc}; use --task outputs") from None
            g = decode_retinaface(by_name_got[loc], by_name_got[conf], image_hw)
        report.detection_ap = average_precision(r, g)
        report.detections = (sum(len(x) for x in r), sum(len(x) for x in g))
    elif task == "embedding":
        report.embedding = embedding_fidelity(np.asarray(ref[0]), np.asarray(got[0]))
    elif task == "classification":
        report.top1_agreement = top1_agreement(np.asarray(ref[0]), np.asarray(got[0]))
    return report
