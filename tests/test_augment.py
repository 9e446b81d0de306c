"""Augmentation of image calibration samples, and what distillation does with it."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.calibration.augment import Augmentation, augment, is_image, mix

X = np.random.default_rng(0).standard_normal((6, 3, 32, 40)).astype(np.float32)


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a = augment(X, np.random.default_rng(7))
    b = augment(X, np.random.default_rng(7))
    c = augment(X, np.random.default_rng(8))
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    assert a.shape == X.shape and a.dtype == np.float32 and np.isfinite(a).all()


def test_nothing_asked_changes_nothing_and_flip_alone_is_exact() -> None:
    off = Augmentation(p=0.0, flip=0.0)
    assert np.array_equal(augment(X, np.random.default_rng(0), off), X)
    flipped = augment(X, np.random.default_rng(0), Augmentation(p=0.0, flip=1.0))
    assert np.array_equal(flipped, X[:, :, :, ::-1])


def test_each_change_stays_close_to_the_image() -> None:
    """Small changes: every kind alone moves a smooth image by far less than its own spread."""
    yy, xx = np.mgrid[0:32, 0:40]
    smooth = np.stack([np.sin(yy / 5 + c) * np.cos(xx / 7) for c in range(3)])[None].astype(np.float32)
    kinds = {"rotate": Augmentation(p=1, flip=0, shift=0, scale=0, brightness=0, gain=0, contrast=0, blur=0, jpeg=0),
             "blur": Augmentation(p=1, flip=0, shift=0, rotate=0, scale=0, brightness=0, gain=0, contrast=0, blur=1, jpeg=0),
             "jpeg": Augmentation(p=1, flip=0, shift=0, rotate=0, scale=0, brightness=0, gain=0, contrast=0, blur=0, jpeg=1)}
    for name, spec in kinds.items():
        out = augment(smooth, np.random.default_rng(1), spec)
        change = float(np.abs(out - smooth).mean())
        assert 0 < change < 0.25 * float(smooth.std()), (name, change)


def test_only_image_batches_are_augmented() -> None:
    rows = np.ones((5, 7), np.float32)
    assert is_image(X) and not is_image(rows)


def test_mix_blends_within_bounds() -> None:
    out = mix(X, np.random.default_rng(0), p=1.0, low=0.6)
    assert out.shape == X.shape and not np.array_equal(out, X)
    assert np.array_equal(mix(X, np.random.default_rng(0), p=0.0), X)
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(out, mix(X, np.random.default_rng(1), p=1.0))
