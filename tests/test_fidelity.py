"""Fidelity metrics: exact copies score perfectly, perturbations score lower, decoders match PriorBox/SCRFD."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from onnxprune.fidelity import (FidelityReport, average_precision, conf_is_softmaxed, decode_retinaface,
                                decode_scrfd, embedding_fidelity, nms, output_fidelity, prior_boxes,
                                top1_agreement, verification)

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"


def test_identical_outputs_are_perfect_and_noise_lowers_scores() -> None:
    rng = np.random.default_rng(0)
    ref = [rng.standard_normal((4, 100, 2)).astype(np.float32), rng.standard_normal((4, 8)).astype(np.float32)]
    same = output_fidelity(ref, [r.copy() for r in ref], ["a", "b"])
    assert [(o.cosine, o.sqnr_db) for o in same] == [(1.0, math.inf)] * 2
    noisy = output_fidelity(ref, [r + 0.1 * rng.standard_normal(r.shape) for r in ref], ["a", "b"])
    assert all(0.9 < o.cosine < 1.0 and 15 < o.sqnr_db < 25 for o in noisy)  # 1% noise power ~ 20 dB
    logits = rng.standard_normal((200, 5))
    assert top1_agreement(logits, logits) == 1.0
    assert top1_agreement(logits, logits + rng.standard_normal(logits.shape)) < 1.0
    emb = rng.standard_normal((10, 64))
    assert embedding_fidelity(emb, 3 * emb) == pytest.approx({"mean_cosine": 1.0, "min_cosine": 1.0})
    e = embedding_fidelity(emb, emb + 0.5 * rng.standard_normal(emb.shape))
    assert e["min_cosine"] <= e["mean_cosine"] < 1.0


@pytest.mark.parametrize(("hw", "count"), [((640, 640), 16800), ((320, 320), 4200), ((480, 640), 12600)])
def test_prior_count(hw: tuple[int, int], count: int) -> None:
    assert prior_boxes(hw).shape == (count, 4)


def test_prior_order_matches_priorbox() -> None:
    p = prior_boxes((64, 96))  # level 0: 8x12 cells, two sizes each
    np.testing.assert_allclose(p[:3], [[4 / 96, 4 / 64, 16 / 96, 16 / 64], [4 / 96, 4 / 64, 32 / 96, 32 / 64],
                                       [12 / 96, 4 / 64, 16 / 96, 16 / 64]])
    np.testing.assert_allclose(p[2 * 12], [4 / 96, 12 / 64, 16 / 96, 16 / 64])  # second row starts after 12 cells


def _planted(hw: tuple[int, int], index: int, dx: float = 0.0, dw: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    n = len(prior_boxes(hw))
    loc, conf = np.zeros((1, n, 4), np.float32), np.tile(np.float32([4.0, -4.0]), (1, n, 1))
    loc[0, index] = [dx, 0.0, dw, 0.0]
    conf[0, index] = [-4.0, 4.0]
    return loc, conf


def test_planted_face_decodes_to_pixel_box() -> None:
    hw = (640, 640)
    # level 1 (step 16, 40x40 cells, sizes 64/128) starts after 80*80*2; cell (i=10, j=20), size 128
    idx = 80 * 80 * 2 + (10 * 40 + 20) * 2 + 1
    loc, conf = _planted(hw, idx, dx=1.0, dw=math.log(2) / 0.2)  # shift cx by 0.1*128 px, double the width
    assert not conf_is_softmaxed(conf)
    (dets,) = decode_retinaface(loc, conf, hw)
    cx, cy = 20.5 * 16 + 12.8, 10.5 * 16
    np.testing.assert_allclose(dets[:, :4], [[cx - 128, cy - 64, cx + 128, cy + 64]], atol=1e-3)
    assert dets[0, 4] == pytest.approx(1 / (1 + math.exp(-8)), abs=1e-5)
    probs = np.exp(conf) / np.exp(conf).sum(-1, keepdims=True)
    assert conf_is_softmaxed(probs)
    np.testing.assert_allclose(decode_retinaface(loc, probs, hw)[0], dets, atol=1e-5)


def test_nms_removes_overlaps_and_decode_applies_it() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], np.float64)
    assert nms(boxes, np.array([0.9, 0.95, 0.8, 0.7]), 0.4).tolist() == [1, 2]
    hw = (320, 320)
    loc, conf = _planted(hw, 2 * (5 * 40 + 5))  # cell (5, 5), size 16 ...
    conf[0, 2 * (5 * 40 + 5) + 1] = [-4.0, 3.0]  # ... and size 32 at the same centre: IoU 0.25, both kept
    conf[0, 2 * (5 * 40 + 6)] = [-4.0, 3.0]  # neighbour one cell right (8 px) of the 16 px box: IoU 1/3, kept
    assert len(decode_retinaface(loc, conf, hw)[0]) == 3
    assert len(decode_retinaface(loc, conf, hw, nms_iou=0.2)[0]) == 1


def test_average_precision() -> None:
    box = lambda x, s=1.0: [x, 10, x + 20, 30, s]  # noqa: E731
    ref = [np.array([box(0), box(50)], np.float32), np.array([box(100)], np.float32), np.zeros((0, 5), np.float32)]
    assert average_precision(ref, ref) == 1.0
    half = [np.array([box(0, 0.9)], np.float32), np.zeros((0, 5), np.float32), np.zeros((0, 5), np.float32)]
    ref2 = [ref[0], np.zeros((0, 5), np.float32), ref[2]]
    assert average_precision(ref2, half) == pytest.approx(0.5)  # one of two reference faces missed
    shifted = [r + np.float32([3, 0, 3, 0, 0]) for r in ref]  # IoU 17/23 > 0.5: still matches
    assert average_precision(ref, shifted) == 1.0
    spurious = [ref[0], ref[1], np.array([box(5, 1.5)], np.float32)]  # a false positive ranked first
    assert 0.5 < average_precision(ref, spurious) < 1.0
    empty = [np.zeros((0, 5), np.float32)] * 2
    assert average_precision(empty, empty) == 1.0 and average_precision(empty, [ref[1], empty[0]]) == 0.0


def test_decode_scrfd_planted_face() -> None:
    hw, outs = (64, 64), {}
    for s in (8, 16, 32):
        n = (64 // s) ** 2 * 2
        outs[f"score_{s}"], outs[f"bbox_{s}"] = np.zeros((1, n, 1), np.float32), np.ones((1, n, 4), np.float32)
        outs[f"kps_{s}"] = np.zeros((1, n, 10), np.float32)
    outs["score_16"][0, (2 * 4 + 1) * 2 + 1] = 0.95  # cell i=2, j=1 -> centre (16, 32), second anchor
    outs["bbox_16"][0, (2 * 4 + 1) * 2 + 1] = [0.5, 1.0, 1.0, 0.5]
    (dets,) = decode_scrfd(outs, hw)
    np.testing.assert_allclose(dets, [[8, 16, 32, 40, 0.95]], atol=1e-6)


def test_verification_separated_and_overlapping() -> None:
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((5, 32)) * 10
    labels = np.repeat(np.arange(5), 6)
    emb = centres[labels] + 0.1 * rng.standard_normal((30, 32))
    v = verification(emb, labels)
    assert v["n_genuine"] == 75 and v["n_impostor"] == 360
    assert v["accuracy"] == 1.0 and v["auc"] == 1.0
    assert v["fnmr@fmr=0.01"] == 0.0 and v["fnmr@fmr=0.1"] == 0.0 and v["fmr@fmr=0.01"] <= 0.01
    noisy = verification(centres[labels] + 20 * rng.standard_normal((30, 32)), labels)
    assert noisy["auc"] < 1.0 and noisy["fnmr@fmr=0.01"] > 0.0


def test_report_dict_and_summary() -> None:
    ref = [np.ones((2, 3), np.float32)]
    emb = np.eye(4)
    r = FidelityReport(n_inputs=2, outputs=output_fidelity(ref, ref, ["out"]), detection_ap=1.0, detections=(3, 3),
                       embedding=embedding_fidelity(emb, emb), verification_got=verification(emb, [0, 0, 1, 1]),
                       top1_agreement=1.0)
    d = r.to_dict()
    assert d["outputs"][0] == {"name": "out", "cosine": 1.0, "sqnr_db": math.inf} and d["detection_ap"] == 1.0
    text = r.summary()
    assert "sqnr=infdB" in text and "AP@0.5" in text and "FNMR@0.01" in text and len(text.splitlines()) <= 8


# ---------------------------------------------------------------------------------- real model, real photos
@pytest.fixture(scope="module")
def retinaface():  # type: ignore[no-untyped-def]
    ort = pytest.importorskip("onnxruntime")
    from onnxprune.sample_models import SampleUnavailable, load_sample
    try:
        model = load_sample("retinaface-mnet025")
    except SampleUnavailable as exc:
        pytest.skip(f"retinaface-mnet025 unavailable: {exc}")
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _load(name: str) -> np.ndarray:
    image = pytest.importorskip("PIL.Image")
    path = FACES / name
    if not path.is_file():
        pytest.skip(f"no photo {path}")
    rgb = np.asarray(image.open(path).convert("RGB").resize((640, 640)), np.float32)
    return (rgb[..., ::-1] - np.float32([104, 117, 123])).transpose(2, 0, 1)


def test_real_retinaface_on_photos(retinaface) -> None:  # type: ignore[no-untyped-def]
    if not FACES.is_dir():
        pytest.skip(f"no photos at {FACES}")
    names = ["angelina_jolie.jpg", "fr-two_people.jpg", "multiface.jpg"]
    x = np.stack([_load(n) for n in names])
    loc, conf, _ = retinaface.run(None, {retinaface.get_inputs()[0].name: x})
    assert conf.shape == (3, 16800, 2) and conf_is_softmaxed(conf)  # this export ends in Softmax
    dets = decode_retinaface(loc, conf, (640, 640))
    assert (dets[0][:, 4] > 0.9).sum() == 1  # single portrait: one confident face
    assert len(dets[1]) >= 2 and len(dets[2]) >= 4
    assert average_precision(dets, dets) == 1.0
    np.testing.assert_allclose(np.concatenate(decode_retinaface(loc, np.log(conf), (640, 640))),
                               np.concatenate(dets), atol=1e-3)  # logits path agrees with probability path
