"""Face verification before and after compression, on crops of known people (``--identities``).

Embedding cosine to the original can stay high while same-person and different-person scores
move towards each other. What a deployment sees is its match threshold, tuned on the original:
so the report gives the candidate's accuracy *at the original's threshold*, TAR at fixed FAR and
FNMR at fixed FMR for both models, and the identities whose embeddings moved most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

RATES = (1e-2, 1e-1)  # FAR (= FMR) operating points


@dataclass(frozen=True)
class Verification:
    """One model on all same/different pairs of the labelled crops."""

    genuine: int  # same-person pairs
    impostor: int  # different-person pairs
    accuracy: float  # at the best threshold for this model
    threshold: float  # that threshold (cosine; accept score >= threshold)
    auc: float
    tar_at_far: tuple[tuple[float, float], ...]  # (FAR, TAR) pairs; TAR = 1 - FNMR at the same threshold
    fnmr_at_fmr: tuple[tuple[float, float], ...]
    fmr_reached: tuple[tuple[float, float], ...]  # (FMR asked, impostor share accepted at its threshold)


@dataclass(frozen=True)
class IdentityDrift:
    """How far one person's crops moved: cosine of each crop's embedding to the original's."""

    identity: str
    crops: int
    mean_cosine: float
    genuine_change: float | None  # mean change of this person's same-person scores (None: a single crop)


@dataclass(frozen=True)
class VerificationReport:
    reference: Verification
    candidate: Verification
    accuracy_at_reference_threshold: float  # the candidate, deployed with the original's threshold
    drift: tuple[IdentityDrift, ...]  # worst (lowest cosine) first

    def summary_lines(self, worst: int = 3) -> list[str]:
        r, c = self.reference, self.candidate
        tar = ", ".join(f"TAR@FAR={f:g} {a:.3f}->{b:.3f}" for (f, a), (_, b) in zip(r.tar_at_far, c.tar_at_far))
        lines = [f"verification on {r.genuine} same-person and {r.impostor} different-person pairs: "
                 f"accuracy at the original's threshold {r.accuracy:.4f} -> {self.accuracy_at_reference_threshold:.4f} "
                 f"(best threshold {c.accuracy:.4f}), AUC {r.auc:.4f} -> {c.auc:.4f}, {tar}"]
        moved = ", ".join(f"{d.identity} (cos {d.mean_cosine:.3f})" for d in self.drift[:worst])
        return lines + ([f"identities that moved most: {moved}"] if moved else [])


def verify(embeddings: np.ndarray, labels: Sequence[str], rates: Sequence[float] = RATES) -> Verification:
    """One model's verification ROC over all pairs of its embeddings of labelled crops."""
    scores, same = _pairs(_normalise(embeddings), labels)
    return _verification(scores, same, rates)


def verify_identities(reference: np.ndarray, candidate: np.ndarray, labels: Sequence[str],
                      rates: Sequence[float] = RATES) -> VerificationReport:
    """Compare two models' embeddings of the same labelled crops (rows aligned with ``labels``)."""
    ref, got = _normalise(reference), _normalise(candidate)
    ref_scores, same = _pairs(ref, labels)
    got_scores, _ = _pairs(got, labels)
    before = _verification(ref_scores, same, rates)
    after = _verification(got_scores, same, rates)
    at_ref = _accuracy(got_scores, same, before.threshold)
    return VerificationReport(before, after, at_ref, _drift(ref, got, labels, ref_scores, got_scores, same))


def _normalise(e: np.ndarray) -> np.ndarray:
    e = np.asarray(e, dtype=np.float64).reshape(len(e), -1)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def _pairs(e: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.triu_indices(len(e), k=1)
    lab = np.asarray(labels)
    return np.sum(e[i] * e[j], axis=1), lab[i] == lab[j]


def _accuracy(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    return float(np.mean((scores >= threshold) == same))


def _verification(scores: np.ndarray, same: np.ndarray, rates: Sequence[float]) -> Verification:
    gen, imp = np.sort(scores[same]), np.sort(scores[~same])
    if not len(gen) or not len(imp):
        raise ValueError("verification needs at least one same-person and one different-person pair")
    ts = np.concatenate([np.unique(scores), [np.inf]])
    acc = (len(gen) - np.searchsorted(gen, ts, "left") + np.searchsorted(imp, ts, "left")) / len(scores)
    best = int(np.argmax(acc))
    lo, hi = np.searchsorted(imp, gen, "left"), np.searchsorted(imp, gen, "right")
    auc = float((lo.sum() + 0.5 * (hi - lo).sum()) / (len(gen) * len(imp)))
    ts_far = [_far_threshold(imp, f) for f in rates]
    fnmr = tuple((float(f), float(np.mean(gen <= t))) for f, t in zip(rates, ts_far))
    reached = tuple((float(f), float(np.mean(imp > t))) for f, t in zip(rates, ts_far))
    return Verification(len(gen), len(imp), float(acc[best]), float(ts[best]), auc,
                        tuple((f, 1.0 - x) for f, x in fnmr), fnmr, reached)


def _far_threshold(imp_sorted: np.ndarray, far: float) -> float:
    """Accept ``score > t`` with at most ``floor(far * n)`` impostor pairs above ``t``."""
    k = int(math.floor(far * len(imp_sorted)))
    return -np.inf if k >= len(imp_sorted) else float(imp_sorted[::-1][k])


def _drift(ref: np.ndarray, got: np.ndarray, labels: Sequence[str], ref_scores: np.ndarray,
           got_scores: np.ndarray, same: np.ndarray) -> tuple[IdentityDrift, ...]:
    lab = np.asarray(labels)
    cos = np.sum(ref * got, axis=1)
    i, _ = np.triu_indices(len(ref), k=1)
    out = []
    for person in sorted(set(labels)):
        mine = same & (lab[i] == person)
        change = float(np.mean(got_scores[mine] - ref_scores[mine])) if mine.any() else None
        out.append(IdentityDrift(str(person), int(np.sum(lab == person)), float(np.mean(cos[lab == person])), change))
    return tuple(sorted(out, key=lambda d: (d.mean_cosine, d.identity)))
