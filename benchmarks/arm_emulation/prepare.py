#!/usr/bin/env python
"""x86 side of the ARM check: make pruned and int8 models with the CLI, fixed inputs, and a manifest.

The models are made the way a user makes them (``onnxprune slim`` / ``onnxprune quantize`` as
subprocesses) from the real sample models; the inputs are a few real photos preprocessed once here
and saved as ``.npy``, so both architectures run on bit-identical tensors. ``manifest.json`` also
records, for each output of an int8 model, the scale of the DequantizeLinear that produces it (through
shape-only ops): ``compare.py`` counts ARM/x86 differences in quantisation steps of that scale.

    python benchmarks/arm_emulation/prepare.py WORK_DIR [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import onnxprune
from onnxprune.calibration import PRESETS, load_calibration
from onnxprune.sample_models import sample_path

SHARED = Path(__file__).resolve().parents[3] / "shared"
FACES = SHARED / "data" / "faces"
FACES112 = SHARED / "data" / "faces112"
MFN = SHARED / "models" / "mobilefacenet_paddle.onnx"
SHAPE_ONLY = {"Reshape", "Transpose", "Concat", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
RF_SIZE = (320, 320)  # emulated runs are slow: RetinaFace is fully convolutional, 320² is enough


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "onnxprune", *args, "-q"]
    print("  $ onnxprune " + " ".join(args), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"prepare.py: error: `onnxprune {' '.join(args)}` failed (its message is above)")


def _output_steps(path: Path) -> dict[str, float | None]:
    """Output name -> scale of the DequantizeLinear feeding it through shape-only ops (max over Concat inputs)."""
    model = onnx.load(str(path), load_external_data=False)
    producer = {out: node for node in model.graph.node for out in node.output}
    inits = {t.name: t for t in model.graph.initializer}

    def scale(tensor: str) -> float | None:
        node = producer.get(tensor)
        if node is None:
            return None
        if node.op_type == "DequantizeLinear":
            s = inits.get(node.input[1])
            return float(np.max(numpy_helper.to_array(s))) if s is not None else None
        if node.op_type in SHAPE_ONLY:
            data_inputs = node.input if node.op_type == "Concat" else node.input[:1]
            scales = [scale(i) for i in data_inputs if i]
            return None if not scales or any(s is None for s in scales) else max(scales)
        return None

    return {o.name: scale(o.name) for o in model.graph.output}


def _save_inputs(model_path: Path, images: Path, count: int, preset: str, out: Path,
                 size: tuple[int, int] | None = None) -> tuple[str, str]:
    model = onnx.load(str(model_path), load_external_data=False)
    pre = replace(PRESETS[preset], size=size) if size else None
    data = load_calibration(images, model, count=count, seed=1, preprocess=pre,
                            preset=None if pre else preset)
    np.save(out, np.ascontiguousarray(data.samples()))
    return data.name, out.name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--quick", action="store_true", help="RetinaFace models only")
    args = ap.parse_args()
    if not FACES.is_dir():
        print(f"prepare.py: error: {FACES} not found (the real photos are needed for calibration)", file=sys.stderr)
        return 2
    work: Path = args.work
    (work / "models").mkdir(parents=True, exist_ok=True)
    (work / "inputs").mkdir(parents=True, exist_ok=True)
    m, i = work / "models", work / "inputs"
    rf, age, onet = (sample_path(n) for n in ("retinaface-mnet025", "age-v1", "mtcnn-onet"))
    size_arg = f"{RF_SIZE[0]}x{RF_SIZE[1]}"
    entries: list[dict] = []

    def add(name: str, path: Path, kind: str, task: str, inputs: dict[str, str], how: str,
            fp32_of: str | None = None) -> None:
        """``fp32_of``: the float model an int8 one was made from (its x86 outputs are the fp32 reference)."""
        entries.append({"name": name, "file": str(path.relative_to(work)), "kind": kind, "task": task,
                        "inputs": inputs, "made_by": how, "fp32_of": fp32_of,
                        "output_steps": _output_steps(path) if kind == "int8" else {}})

    print("RetinaFace-mnet0.25 (real)", flush=True)
    rf_in = dict([_save_inputs(rf, FACES, 3, "retinaface", i / "retinaface_320.npy", RF_SIZE)])
    rf_fp32 = m / "retinaface.onnx"
    rf_fp32.write_bytes(Path(rf).read_bytes())
    add("retinaface fp32", rf_fp32, "fp32", "detection", rf_in, "sample:retinaface-mnet025")
    calib = ["--calib", str(FACES), "--preset", "retinaface", "--size", size_arg, "--calib-count", "12"]
    # calibrated slim: weights-only pruning at 0.5 finds no face at all, which would make the check vacuous
    _cli("slim", str(rf_fp32), "--ratio", "0.5", *calib, "-o", str(m / "retinaface.slim50.onnx"))
    add("retinaface slim 0.5", m / "retinaface.slim50.onnx", "fp32", "detection", rf_in, "slim --ratio 0.5 --calib")
    _cli("quantize", str(rf_fp32), *calib, "--thresholds", "mse", "-o", str(m / "retinaface.int8.onnx"))
    add("retinaface int8", m / "retinaface.int8.onnx", "int8", "detection", rf_in, "quantize --thresholds mse",
        "retinaface fp32")
    _cli("quantize", str(m / "retinaface.slim50.onnx"), *calib, "--thresholds", "mse",
         "-o", str(m / "retinaface.slim50.int8.onnx"))
    add("retinaface slim 0.5 + int8", m / "retinaface.slim50.int8.onnx", "int8", "detection", rf_in,
        "slim --ratio 0.5 --calib, then quantize --thresholds mse", "retinaface slim 0.5")

    if not args.quick:
        print("MobileFaceNet", flush=True)
        mfn = MFN if MFN.is_file() else Path(sample_path("mobilefacenet"))
        mfn_in = dict([_save_inputs(mfn, FACES112, 4, "arcface", i / "faces112.npy")])
        mfn_fp32 = m / "mobilefacenet.onnx"
        mfn_fp32.write_bytes(mfn.read_bytes())
        add("mobilefacenet fp32", mfn_fp32, "fp32", "embedding", mfn_in, mfn.name)
        _cli("slim", str(mfn_fp32), "--ratio", "0.3", "-o", str(m / "mobilefacenet.slim30.onnx"))
        add("mobilefacenet slim 0.3", m / "mobilefacenet.slim30.onnx", "fp32", "embedding", mfn_in,
            "slim --ratio 0.3")
        _cli("quantize", str(mfn_fp32), "--calib", str(FACES112), "--preset", "arcface", "--calib-count", "16",
             "-o", str(m / "mobilefacenet.int8.onnx"))
        add("mobilefacenet int8", m / "mobilefacenet.int8.onnx", "int8", "embedding", mfn_in,
            "quantize --thresholds mse", "mobilefacenet fp32")

        print("age-v1 (real)", flush=True)
        age_in = dict([_save_inputs(age, FACES, 4, "age-gender", i / "age_64.npy")])
        (m / "age.onnx").write_bytes(Path(age).read_bytes())
        add("age-v1 fp32", m / "age.onnx", "fp32", "classification", age_in, "sample:age-v1")
        _cli("slim", "sample:age-v1", "--ratio", "0.5", "-o", str(m / "age.slim50.onnx"))
        add("age-v1 slim 0.5", m / "age.slim50.onnx", "fp32", "classification", age_in, "slim --ratio 0.5")
        _cli("quantize", "sample:age-v1", "--calib", str(FACES), "--preset", "age-gender", "--calib-count", "16",
             "-o", str(m / "age.int8.onnx"))
        add("age-v1 int8", m / "age.int8.onnx", "int8", "classification", age_in, "quantize --thresholds mse",
            "age-v1 fp32")

        print("MTCNN O-Net (real, NHWC)", flush=True)
        onet_in = dict([_save_inputs(onet, FACES, 4, "mtcnn", i / "onet_48.npy")])
        (m / "onet.onnx").write_bytes(Path(onet).read_bytes())
        add("mtcnn-onet fp32", m / "onet.onnx", "fp32", "outputs", onet_in, "sample:mtcnn-onet")
        _cli("quantize", "sample:mtcnn-onet", "--calib", str(FACES), "--preset", "mtcnn", "--calib-count", "16",
             "-o", str(m / "onet.int8.onnx"))
        add("mtcnn-onet int8", m / "onet.int8.onnx", "int8", "outputs", onet_in, "quantize --thresholds mse",
            "mtcnn-onet fp32")

    manifest = {"onnxprune": onnxprune.__version__ if hasattr(onnxprune, "__version__") else "?",
                "made_on": platform.machine(), "models": entries}
    tmp = work / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, work / "manifest.json")
    print(f"{len(entries)} models -> {work / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
