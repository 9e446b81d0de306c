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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .detection import (DetectionHeads, _iou_one, conf_is_softmaxed, decode_retinaface, decode_scrfd, nms,
                        per_image, prior_boxes, recognize)
from .errors import ConfigError
from .records import record_dict
from .verification import Verification, VerificationReport

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
        finite = np.isfinite(r64)  # where the reference itself overflows there is nothing to agree with
        r64, g64 = r64[finite], np.nan_to_num(g64[finite], nan=0.0, posinf=0.0, neginf=0.0)
        nr, ng = float(np.linalg.norm(r64)), float(np.linalg.norm(g64))
        err = float(np.sum((r64 - g64) ** 2))
        if err == 0.0:  # exact copy: report exactly 1, not 1 +- rounding
            cos = 1.0
        else:
            cos = 0.0 if nr == 0.0 or ng == 0.0 else float(np.clip(r64 @ g64 / (nr * ng), -1.0, 1.0))
        sqnr = math.inf if err == 0.0 else (-math.inf if nr == 0.0 else 10.0 * math.log10(nr * nr / err))
        result.append(OutputFidelity(name, cos, sqnr))
    return result


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
    """Verification ROC over all same/different pairs, as the report's dict: best-threshold accuracy,
    AUC, FNMR at fixed FMRs (see :mod:`onnxprune.verification`, which also compares two models).

    Why compare before/after on labelled identities: embedding cosine to the reference can stay high
    while the genuine/impostor margin shrinks; FNMR at a fixed FMR shows exactly that.
    """
    from .verification import verify
    return verification_dict(verify(embeddings, [str(x) for x in labels], fmr))


def verification_dict(v: Verification) -> dict[str, float]:
    """One model's :class:`~onnxprune.verification.Verification` in the report's ``verification_ref/got`` form."""
    out = {"n_genuine": float(v.genuine), "n_impostor": float(v.impostor), "accuracy": v.accuracy,
           "threshold": v.threshold, "auc": v.auc}
    for (f, fnmr), (_, reached) in zip(v.fnmr_at_fmr, v.fmr_reached):
        out[f"fnmr@fmr={f:g}"] = fnmr
        out[f"fmr@fmr={f:g}"] = reached
    return out


# -------------------------------------------------------------------------------------------- classification
def top1_agreement(ref_logits: np.ndarray, got_logits: np.ndarray) -> float:
    """Fraction of inputs whose argmax class is unchanged (classifiers: age/gender heads)."""
    r, g = np.asarray(ref_logits), np.asarray(got_logits)
    if r.shape != g.shape:
        raise ValueError(f"shape {r.shape} vs {g.shape}")
    return float(np.mean(r.argmax(-1) == g.argmax(-1)))


# ------------------------------------------------------------------------------------------------------ report
MIN_HELD_OUT = 8  # fewer held-out images than this: the fidelity figure is flagged as anecdotal


@dataclass
class FidelityReport:
    """Everything measured for one reference/candidate pair; fields left None were not applicable.

    ``n_inputs`` counts images (samples fed to the model), never output rows. ``held_out`` is False
    when there were too few samples to keep any out of fitting, so the figure is measured on the
    samples that were fitted on and says little about unseen inputs.
    """

    n_inputs: int = 0
    outputs: list[OutputFidelity] = field(default_factory=list)
    detection_ap: float | None = None
    detections: tuple[int, int] | None = None  # total boxes (reference, candidate)
    embedding: dict[str, float] | None = None
    verification_ref: dict[str, float] | None = None
    verification_got: dict[str, float] | None = None
    verification: VerificationReport | None = None  # both models at the original's threshold, drift per identity
    top1_agreement: float | None = None
    task: str = "outputs"  # the metric used: detection, embedding, classification or outputs
    heads: str = ""  # detection: which heads were recognised, from which outputs
    held_out: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready apart from inf SQNR, which json writes as Infinity)."""
        return record_dict(self)

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

    @property
    def caveat(self) -> str:
        """Why the figure may not mean much, or ''."""
        if not self.held_out:
            return (f"measured on the {self.n_inputs} calibration images themselves (too few to hold any out): "
                    f"it says little about unseen images; give --calib at least {2 * MIN_HELD_OUT} images")
        if self.n_inputs < MIN_HELD_OUT:
            return (f"only {self.n_inputs} held-out image{'s' if self.n_inputs != 1 else ''}: an anecdote, not a "
                    f"measurement; give --calib more images (or raise --holdout) for at least {MIN_HELD_OUT}")
        return ""

    def summary(self) -> str:
        """A few human lines; worst output first because that is the one to look at."""
        unit = "image" if self.n_inputs == 1 else "images"
        lines = [f"fidelity on {self.n_inputs} {unit} (task {self.task}{': ' + self.heads if self.heads else ''})"]
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
        if self.verification is not None:
            lines += self.verification.summary_lines()
        for tag, v in (("ref", self.verification_ref), ("got", self.verification_got)):
            if v is not None and self.verification is None:
                fn = ", ".join(f"{k.split('@')[0].upper()}@{k.split('=')[1]}={x:.4f}"
                               for k, x in v.items() if k.startswith("fnmr@"))
                lines.append(f"verification [{tag}]: acc {v['accuracy']:.4f}, auc {v['auc']:.4f}, {fn}")
        if self.top1_agreement is not None:
            lines.append(f"top-1 agreement: {self.top1_agreement:.4f}")
        if self.caveat:
            lines.append(f"caution: {self.caveat}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ evaluation
TASKS = ("auto", "detection", "embedding", "classification", "outputs")
DETECTION_HELP = ("--task detection: no detector heads recognised among the outputs {shapes} at input size "
                  "{hw} (known: RetinaFace loc/conf, UltraFace boxes/scores, SCRFD and YuNet per-stride heads); "
                  "use --task outputs")


MAX_LOGITS = 16  # a [N, D] output with D <= this and no softmax: class logits (gender, emotion, liveness)
MIN_EMBEDDING = 64  # D >= this and no softmax: an embedding; in between (landmarks, 3DMM): plain outputs


def guess_task(output_names: Sequence[str], outputs: Sequence[np.ndarray],
               image_hw: tuple[int, int] | None = None, n_images: int | None = None) -> str:
    """Detection (heads recognised by shape), embedding, classification, or plain outputs.

    Without ``image_hw`` only RetinaFace-like loc [N,P,4] / conf [N,P,2] pairs count as detection.
    """
    n = n_images if n_images is not None else (int(np.shape(outputs[0])[0]) if outputs else 0)
    if image_hw is not None and recognize(output_names, outputs, image_hw, n) is not None:
        return "detection"
    shapes = [np.asarray(o).shape for o in outputs]
    if image_hw is None:
        loc = [s for s in shapes if len(s) == 3 and s[-1] == 4]
        if loc and any(len(s) == 3 and s[-1] == 2 for s in shapes):
            return "detection"
    if len(outputs) == 1 and len(shapes[0]) == 2 and shapes[0][0] == n:
        probs = np.asarray(outputs[0])
        if probs.shape[1] <= MAX_LOGITS or (np.all(probs >= 0) and np.allclose(probs.sum(axis=1), 1, atol=1e-3)):
            return "classification"
        if probs.shape[1] >= MIN_EMBEDDING:
            return "embedding"
    return "outputs"  # e.g. landmark or 3DMM regressors: [N, 62] has no argmax to agree on


def resolve_task(task: str, names: Sequence[str], outputs: Sequence[np.ndarray], image_hw: tuple[int, int],
                 n_images: int) -> tuple[str, DetectionHeads | None]:
    """The task to measure (``auto`` guessed) and, for detection, the recognised heads.

    Raises ConfigError when the task cannot be measured on these outputs, so callers can check it on
    one sample before any expensive work.
    """
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    task = guess_task(names, outputs, image_hw, n_images) if task == "auto" else task
    heads = recognize(names, outputs, image_hw, n_images) if task == "detection" else None
    if task == "detection" and heads is None:
        shapes = ", ".join(f"{n} {list(np.shape(o))}" for n, o in zip(names, outputs))
        raise ConfigError(DETECTION_HELP.format(shapes=f"({shapes})", hw=f"{image_hw[0]}x{image_hw[1]}"))
    if task in ("embedding", "classification") and not (len(outputs) >= 1 and np.ndim(outputs[0]) == 2):
        raise ConfigError(f"--task {task} needs a first output of shape [N, D]; got "
                          f"{list(np.shape(outputs[0])) if outputs else 'no output'}; use --task outputs")
    return task, heads


def evaluate(ref: Sequence[np.ndarray], got: Sequence[np.ndarray], names: Sequence[str], image_hw: tuple[int, int],
             task: str = "auto", n_images: int | None = None) -> FidelityReport:
    """Compare a candidate's outputs with the reference's on the same (held-out) inputs.

    ``n_images`` is how many samples were fed (outputs without a batch axis are concatenated rows).
    """
    n = n_images if n_images is not None else (int(np.asarray(ref[0]).shape[0]) if ref else 0)
    task, heads = resolve_task(task, names, ref, image_hw, n)
    report = FidelityReport(n_inputs=n, outputs=output_fidelity(ref, got, names), task=task,
                            heads=heads.describe() if heads is not None else "")
    if heads is not None:
        r = heads.decode(dict(zip(names, ref)), n)
        g = heads.decode(dict(zip(names, got)), n)
        report.detection_ap = average_precision(r, g)
        report.detections = (sum(len(x) for x in r), sum(len(x) for x in g))
    elif task == "embedding":
        report.embedding = embedding_fidelity(np.asarray(ref[0]), np.asarray(got[0]))
    elif task == "classification":
        report.top1_agreement = top1_agreement(np.asarray(ref[0]), np.asarray(got[0]))
    return report
