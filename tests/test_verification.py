"""The recognizer verification report: pairs, thresholds, TAR@FAR and per-identity drift."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from onnxprune.fidelity import verification
from onnxprune.verification import verify_identities


def _brute(e: np.ndarray, labels: list[str]) -> dict[str, float]:
    """The ROC by definition, pair by pair (the oracle)."""
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    pairs = [(float(e[a] @ e[b]), labels[a] == labels[b]) for a in range(len(e)) for b in range(a + 1, len(e))]
    gen = [s for s, same in pairs if same]
    imp = sorted((s for s, same in pairs if not same), reverse=True)
    acc = max(np.mean([(s >= t) == same for s, same in pairs]) for t in [s for s, _ in pairs] + [np.inf])
    auc = np.mean([1.0 if g > i else 0.5 if g == i else 0.0 for g in gen for i in imp])
    out = {"accuracy": acc, "auc": auc}
    for f in (1e-2, 1e-1):
        k = int(np.floor(f * len(imp)))
        t = -np.inf if k >= len(imp) else imp[k]
        out[f"fnmr@fmr={f:g}"] = float(np.mean([g <= t for g in gen]))
    return out


def _crops(seed: int, people: int = 4, each: int = 3, dim: int = 16):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((people, dim))
    emb = np.concatenate([c + 0.6 * rng.standard_normal((each, dim)) for c in centres])
    return emb, [f"p{k}" for k in range(people) for _ in range(each)]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_agrees_with_the_roc_by_definition(seed: int) -> None:
    """Accuracy, AUC and FNMR@FMR of both models, and the report dict, match a pair-by-pair computation."""
    emb, labels = _crops(seed)
    got = emb + 0.3 * np.random.default_rng(seed + 1).standard_normal(emb.shape)
    rep = verify_identities(emb, got, labels)
    for v, e in ((rep.reference, emb), (rep.candidate, got)):
        want, old = _brute(e, labels), verification(e, labels)
        assert v.accuracy == pytest.approx(want["accuracy"]) == old["accuracy"]
        assert v.auc == pytest.approx(want["auc"]) == old["auc"]
        for (f, fnmr), (_, tar) in zip(v.fnmr_at_fmr, v.tar_at_far):
            assert fnmr == pytest.approx(want[f"fnmr@fmr={f:g}"]) == old[f"fnmr@fmr={f:g}"]
            assert tar == pytest.approx(1 - fnmr)


def test_same_embeddings_keep_everything() -> None:
    emb, labels = _crops(0)
    rep = verify_identities(emb, emb.copy(), labels)
    assert rep.accuracy_at_reference_threshold == rep.reference.accuracy == rep.candidate.accuracy
    assert all(d.mean_cosine == pytest.approx(1.0) and d.genuine_change == pytest.approx(0.0) for d in rep.drift)


def test_the_identity_that_moved_is_named_first_and_the_old_threshold_costs_accuracy() -> None:
    emb, labels = _crops(3)
    got = emb.copy()
    moved = [i for i, l in enumerate(labels) if l == "p2"]
    got[moved] = np.random.default_rng(9).standard_normal((len(moved), emb.shape[1]))  # p2 lost its identity
    rep = verify_identities(emb, got, labels)
    assert rep.drift[0].identity == "p2" and rep.drift[0].mean_cosine < rep.drift[1].mean_cosine
    assert rep.drift[0].genuine_change < 0
    assert rep.accuracy_at_reference_threshold <= rep.reference.accuracy
    assert "p2" in rep.summary_lines()[1]


def test_needs_both_kinds_of_pair() -> None:
    emb, _ = _crops(0, people=1)
    with pytest.raises(ValueError, match="same-person and one different-person"):
        verify_identities(emb, emb, ["a"] * len(emb))
