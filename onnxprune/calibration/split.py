"""Calibration samples split into a part to fit on and a held-out part to measure fidelity on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import ConfigError
from ..detection import per_image, recognize
from ..fidelity import FidelityReport, evaluate, resolve_task, verification_dict
from ..verification import verify_identities
from ..graph.runtime import check_batch, pieces, run_all, session
from ..report import CalibrationReport
from .data import CalibrationSet


@dataclass
class CalibrationSplit:
    """Calibration samples split into a fitting part and a held-out part for the fidelity report."""

    input_name: str
    fit: np.ndarray
    held: np.ndarray
    source: CalibrationSet
    batch: int = 8
    identities: tuple[np.ndarray, list[str]] | None = None  # labelled crops for verification (embeddings)
    preview: str = ""  # an SVG of the first held-out photo with both models' detections, for HTML reports

    @classmethod
    def split(cls, data: CalibrationSet, holdout: float, input_shapes: dict) -> "CalibrationSplit":
        if data.name not in input_shapes:
            raise ConfigError(f"calibration data is for input {data.name!r}; model inputs: {sorted(input_shapes)}")
        if len(input_shapes) != 1:
            raise ConfigError("calibration needs a single-input model")
        samples = data.samples()
        n_held = len(samples) if holdout >= 1 else int(round(holdout * len(samples))) if len(samples) >= 4 else 0
        order = np.random.default_rng(0).permutation(len(samples))
        held, fit = samples[order[:n_held]], samples[order[n_held:]]
        return cls(data.name, fit, held, data)

    @classmethod
    def held_out_fidelity(cls, data: CalibrationSet, holdout: float, input_shapes: dict, original: onnx.ModelProto,
                          candidate: onnx.ModelProto, task: str) -> FidelityReport | None:
        """``candidate`` against ``original`` on the samples slim and quantize hold out with the same
        ``holdout``: the end-to-end fidelity of a chain of steps (slim, then int8)."""
        return cls.split(data, holdout, input_shapes).evaluate(original, candidate, task)

    @property
    def count(self) -> int:
        return len(self.fit)

    @property
    def batches(self) -> list[np.ndarray]:
        return [self.fit[i:i + self.batch] for i in range(0, len(self.fit), self.batch)]

    @property
    def scan_batches(self) -> list[np.ndarray]:
        return [self.fit[:8]]  # the scan ranks groups; a few samples suffice and keep it fast

    def evaluate(self, original: onnx.ModelProto, pruned: onnx.ModelProto, task: str) -> FidelityReport | None:
        data = self.held if len(self.held) else self.fit
        ref_sess, new_sess = session(original), session(pruned)
        names = [o.name for o in ref_sess.get_outputs()]
        feeds = pieces(original, [data[i:i + self.batch] for i in range(0, len(data), self.batch)], self.input_name)
        ref, got = run_all(ref_sess, self.input_name, feeds), run_all(new_sess, self.input_name, feeds)
        hw = image_hw(data)
        report = evaluate(ref, got, names, hw, task, n_images=len(data))
        report.held_out = bool(len(self.held))
        if self.identities is not None and report.embedding is not None:
            x, labels = self.identities
            before, after = (_embed(s, original, self.input_name, x) for s in (ref_sess, new_sess))
            report.verification = verify_identities(before, after, [str(label) for label in labels])
            report.verification_ref = verification_dict(report.verification.reference)
            report.verification_got = verification_dict(report.verification.candidate)
        self.preview = ""
        heads = recognize(names, ref, hw, len(data)) if report.detection_ap is not None else None
        if heads is not None and data.ndim == 4:
            first = [per_image(o, len(data))[:1] for o in ref], [per_image(o, len(data))[:1] for o in got]
            r, g = (heads.decode(dict(zip(names, outs)), 1)[0] for outs in first)
            channels_last = data[0].transpose(1, 2, 0) if data.shape[1] in (1, 3) else data[0]
            self.preview = _detection_preview(channels_last, r, g, self.source.preprocess)
        return report

    def describe(self) -> CalibrationReport:
        return CalibrationReport(
            samples=len(self.fit) + len(self.held), fit=len(self.fit), held_out=len(self.held),
            files=self.source.files[:3] + (["..."] if len(self.source.files) > 3 else []),
            preprocess=str(self.source.preprocess) if self.source.preprocess else "array, used as is",
            notes=list(self.source.notes))


def check_task(original: onnx.ModelProto, data: CalibrationSet, task: str) -> tuple[str, str]:
    """(task, heads description) measured on one sample, before any expensive work; raises ConfigError
    when ``task`` cannot be measured on this model's outputs."""
    check_batch(original, data.name)
    x = data.batches[0][:1]
    sess = session(original)
    outs = sess.run(None, {data.name: x})
    resolved, heads = resolve_task(task, [o.name for o in sess.get_outputs()], outs, image_hw(x), 1)
    return resolved, heads.describe() if heads is not None else ""


def image_hw(data: np.ndarray) -> tuple[int, int]:
    """(height, width) of an image batch, NCHW when axis 1 holds 1 or 3 channels, else NHWC."""
    if data.ndim != 4:
        return (0, 0)
    return tuple(data.shape[2:4]) if data.shape[1] in (1, 3) else tuple(data.shape[1:3])  # type: ignore[return-value]


def _embed(sess, model: onnx.ModelProto, input_name: str, x: np.ndarray) -> np.ndarray:
    return run_all(sess, input_name, pieces(model, [x], input_name))[0]


def _detection_preview(image: np.ndarray, ref: np.ndarray, got: np.ndarray, pre) -> str:
    from ..html_report import detection_overlay
    bgr = pre is not None and getattr(pre, "channel_order", "rgb") == "bgr"
    return detection_overlay(image[..., ::-1] if bgr and image.shape[-1] == 3 else image, ref, got)
