#!/usr/bin/env python
"""Latency per input resolution for RetinaFace: original vs slim 0.69 vs slim 0.69 + int8 (thesis-style table).

All three models are timed interleaved at each resolution (1 thread, median), so the speed-ups
are ratios measured side by side. The slim models are made once, calibrated on ../shared/data/faces
when it is there (weights-only otherwise), and keep RetinaFace's dynamic input size.

    python benchmarks/resolution_table.py [--runs N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx

import onnxprune
from onnxprune.bench import bench
from onnxprune.calibration import load_calibration
from onnxprune.int8 import quantize
from onnxprune.sample_models import load_sample

SHARED = Path(__file__).resolve().parents[2] / "shared"
SIZES = (320, 480, 640, 960)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    model = load_sample("retinaface-mnet025")
    faces = SHARED / "data" / "faces"
    data = load_calibration(faces, model, preset="retinaface") if faces.is_dir() else None
    slim = onnxprune.slim(model, 0.69, calibration=data).model
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / n for n in ("original.onnx", "slim069.onnx", "slim069_int8.onnx")]
        onnx.save(model, str(paths[0]))
        onnx.save(slim, str(paths[1]))
        models = [paths[0], paths[1]]
        if data is not None:
            onnx.save(quantize(slim, data).model, str(paths[2]))
            models.append(paths[2])
        report = bench([str(p) for p in models], input_shapes=[{"input": (1, 3, s, s)} for s in SIZES], runs=args.runs)
    print("RetinaFace-mnet0.25, 1 thread, median of interleaved runs; speed-up vs the original at the same size")
    print(f"{'size':>6s} " + " ".join(f"{Path(m).stem:>22s}" for m in models))
    for s in SIZES:
        rows = [r for r in report.rows if r.input_shapes["input"][2] == s]
        print(f"{s:>6d} " + " ".join(f"{r.median_ms:9.2f} ms ({(r.speedup or 1.0):5.2f}x)" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
