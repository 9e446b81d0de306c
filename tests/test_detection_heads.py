"""Detector heads recognised from output shapes alone, and decoded: planted faces as the oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxprune.detection import prior_boxes, recognize, ultraface_priors
from onnxprune.errors import ConfigError
from onnxprune.fidelity import evaluate, resolve_task

HW = (64, 96)


def _scrfd(hw, anchors=2, kps=True, batch=True, n=1):
    """Outputs in the official export's order (scores, bboxes, kps per stride), numbered names."""
    outs: list[np.ndarray] = []
    for key, c in (("score", 1), ("bbox", 4), ("kps", 10)):
        if key == "kps" and not kps:
            continue
        for s in (8, 16, 32):
            rows = math.ceil(hw[0] / s) * math.ceil(hw[1] / s) * anchors
            value = 0.0 if key == "score" else 1.0
            outs.append(np.full((n, rows, c), value, np.float32))
    if not batch:
        outs = [o.reshape(-1, o.shape[-1]) for o in outs]
    return [str(446 + 20 * i) for i in range(len(outs))], outs


def _plant_scrfd(names, outs, hw, n_images=1, image=0, anchors=2):
    """A face at stride 16, cell (i=2, j=1), second anchor: centre (16, 32); box (8, 16, 32, 40)."""
    fw = math.ceil(hw[1] / 16)
    row = (2 * fw + 1) * anchors + (anchors - 1)
    score, bbox = outs[1], outs[4]  # stride 16 score and bbox
    for arr, value in ((score, 0.95), (bbox, [0.5, 1.0, 1.0, 0.5])):
        if arr.ndim == 3:
            arr[image, row] = value
        else:
            arr[image * (arr.shape[0] // n_images) + row] = value


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("kps", [True, False])
def test_scrfd_numbered_outputs_recognised_and_decoded(batch: bool, kps: bool) -> None:
    names, outs = _scrfd(HW, kps=kps, batch=batch, n=2)
    _plant_scrfd(names, outs, HW, n_images=2, image=1)
    heads = recognize(names, outs, HW, n_images=2)
    assert heads is not None and heads.family == "scrfd" and heads.strides == (8, 16, 32) and heads.anchors == 2
    dets = heads.decode(dict(zip(names, outs)), 2)
    assert len(dets) == 2 and len(dets[0]) == 0
    np.testing.assert_allclose(dets[1], [[8, 16, 32, 40, 0.95]], atol=1e-6)


def test_scrfd_fidelity_counts_images_not_rows() -> None:
    names, outs = _scrfd(HW, batch=False, n=3)
    _plant_scrfd(names, outs, HW, n_images=3)
    report = evaluate(outs, outs, names, HW, "auto", n_images=3)
    assert report.task == "detection" and report.n_inputs == 3 and "SCRFD" in report.heads
    assert report.detection_ap == 1.0 and report.detections == (1, 1)
    assert "fidelity on 3 images" in report.summary()


def test_scrfd_with_one_anchor_and_logit_scores() -> None:
    names, outs = _scrfd(HW, anchors=1)
    outs[1][0, 2 * math.ceil(HW[1] / 16) + 1] = 3.0  # a logit: sigmoid 0.953
    outs[4][0, 2 * math.ceil(HW[1] / 16) + 1] = [0.5, 1.0, 1.0, 0.5]
    heads = recognize(names, outs, HW)
    assert heads is not None and heads.family == "scrfd" and heads.anchors == 1
    (dets,) = heads.decode(dict(zip(names, outs)), 1)
    np.testing.assert_allclose(dets[:, :4], [[8, 16, 32, 40]], atol=1e-6)
    assert dets[0, 4] == pytest.approx(1 / (1 + math.exp(-3.0)), rel=1e-6)


def test_yunet_layout_recognised_and_decoded() -> None:
    names, outs = [], []
    for key, c in (("cls", 1), ("obj", 1), ("bbox", 4), ("kps", 10)):
        for s in (8, 16, 32):
            names.append(f"{key}_{s}")
            outs.append(np.zeros((1, math.ceil(HW[0] / s) * math.ceil(HW[1] / s), c), np.float32))
    anon = [str(i) for i in range(len(names))]  # names must not matter
    r = 2 * math.ceil(HW[1] / 8) + 3  # stride 8, row 2, col 3
    outs[0][0, r] = 0.81
    outs[3][0, r] = 1.0
    outs[6][0, r] = [0.5, 0.5, math.log(2.0), math.log(4.0)]  # centre (28, 20), size 16 x 32
    heads = recognize(anon, outs, HW)
    assert heads is not None and heads.family == "yunet" and heads.strides == (8, 16, 32)
    (dets,) = heads.decode(dict(zip(anon, outs)), 1)
    np.testing.assert_allclose(dets, [[20, 4, 36, 36, 0.9]], atol=1e-5)


@pytest.mark.parametrize("decoded", [True, False])
def test_ultraface_boxes_decoded_in_graph_or_not(decoded: bool) -> None:
    hw = (240, 320)
    priors = ultraface_priors(hw)
    assert len(priors) == 4420  # the RFB-320 export's row count
    scores = np.zeros((1, len(priors), 2), np.float32)
    scores[..., 0] = 1.0
    k = 1234
    scores[0, k] = [0.1, 0.9]
    cx, cy, w, h = priors[k]
    corners = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    boxes = np.random.default_rng(0).normal(0, 1, (1, len(priors), 4)).astype(np.float32)  # SSD offsets
    boxes[0, k] = 0.0  # exactly the prior
    if decoded:
        boxes[0] = np.concatenate([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], 1)
    heads = recognize(["951", "952"], [scores, boxes], hw)
    assert heads is not None and heads.family == "ultraface" and heads.decoded is decoded
    (dets,) = heads.decode({"951": scores, "952": boxes}, 1)
    np.testing.assert_allclose(dets[0, :4], corners * [320, 240, 320, 240], atol=1e-3)
    assert len(dets) == 1 and dets[0, 4] == pytest.approx(0.9)


def test_retinaface_by_prior_count_not_by_name() -> None:
    hw = (64, 64)
    p = len(prior_boxes(hw))
    outs = [np.zeros((1, p, 4), np.float32), np.zeros((1, p, 2), np.float32), np.zeros((1, p, 10), np.float32)]
    heads = recognize(["443", "444", "445"], outs, hw)
    assert heads is not None and heads.family == "retinaface" and heads.output("conf") == "444"
    assert recognize(["a", "b"], [np.zeros((1, p + 2, 4)), np.zeros((1, p + 2, 2))], hw) is None


def test_detection_task_on_unknown_outputs_is_one_line_error() -> None:
    outs = [np.zeros((1, 7, 4), np.float32), np.zeros((1, 7, 2), np.float32)]
    with pytest.raises(ConfigError) as err:
        resolve_task("detection", ["a", "b"], outs, (64, 64), 1)
    assert "no detector heads recognised" in str(err.value) and "--task outputs" in str(err.value)
    assert "\n" not in str(err.value)
    assert resolve_task("auto", ["a", "b"], outs, (64, 64), 1) == ("outputs", None)
