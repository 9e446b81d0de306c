"""Calibration samples split into a part to fit on and a held-out part to measure fidelity on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import ConfigError
from ..fidelity import FidelityReport, evaluate, verification
from ..graph.runtime import pieces, run_all, session
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
        n_held = int(round(holdout * len(samples))) if len(samples) >= 4 else 0
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
        nchw = data.ndim == 4 and data.shape[1] in (1, 3)
        hw = tuple(data.shape[2:4]) if nchw else tuple(data.shape[1:3])
        report = evaluate(ref, got, names, hw, task)
        if self.identities is not None and report.embedding is not None:
            x, labels = self.identities
            report.verification_ref = verification(ref_sess.run(None, {self.input_name: x})[0], labels)
            report.verification_got = verification(new_sess.run(None, {self.input_name: x})[0], labels)
        self.preview = ""
        if report.detection_ap is not None and not any(n.startswith("score_") for n in names):
            self.preview = _detection_preview(names, ref, got, data[0].transpose(1, 2, 0) if nchw else data[0], hw)
        return report

    def describe(self) -> dict:
        return {"samples": len(self.fit) + len(self.held), "fit": len(self.fit), "held_out": len(self.held),
                "files": self.source.files[:3] + (["..."] if len(self.source.files) > 3 else []),
                "preprocess": str(self.source.preprocess) if self.source.preprocess else "array, used as is",
                "notes": list(self.source.notes)}


def _detection_preview(names, ref, got, image: np.ndarray, hw) -> str:
    from ..fidelity import decode_retinaface
    from ..html_report import detection_overlay
    by_ref, by_got = dict(zip(names, ref)), dict(zip(names, got))
    loc = next(n for n, o in by_ref.items() if o.ndim == 3 and o.shape[-1] == 4)
    conf = next(n for n, o in by_ref.items() if o.ndim == 3 and o.shape[-1] == 2)
    r = decode_retinaface(by_ref[loc][:1], by_ref[conf][:1], hw)[0]
    g = decode_retinaface(by_got[loc][:1], by_got[conf][:1], hw)[0]
    channels_last = image[..., ::-1] if image.shape[-1] == 3 else image  # presets feed BGR detectors: show RGB
    return detection_overlay(channels_last, r, g)
