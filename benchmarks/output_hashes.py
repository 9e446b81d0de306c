#!/usr/bin/env python
"""SHA-256 of what `slim` and `quantize` write for every sample model: the proof that a refactor or a
new option changed no existing output.

Run it before and after a change and diff the two listings (same machine, same library versions:
the bytes depend on onnx, onnxruntime and numpy):

    python benchmarks/output_hashes.py > before.txt   # on the old commit
    python benchmarks/output_hashes.py > after.txt
    diff before.txt after.txt

Per sample: slim --ratio 0.5 without data, slim --ratio 0.5 --calib (16 seeded random samples; the
generated samples only, where random inputs are meaningful), quantize --calib (the same samples).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from contextlib import redirect_stderr

import numpy as np
import onnx

import onnxprune
from onnxprune.calibration import CalibrationSet
from onnxprune.errors import OnnxPruneError
from onnxprune.graph.shapes import graph_inputs
from onnxprune.sample_models import GENERATED, load_sample, names as sample_names


def _digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()[:16]


def _random_calibration(model: onnx.ModelProto, size: int | None) -> CalibrationSet:
    inp = graph_inputs(model)[0]
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (size or 64)
            for d in inp.type.tensor_type.shape.dim]
    dims[0] = 16
    x = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    return CalibrationSet(inp.name, [x])


def _run(label: str, fn) -> str:
    try:
        with redirect_stderr(io.StringIO()):
            return _digest(fn().model)
    except OnnxPruneError as exc:
        return f"refused ({type(exc).__name__})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated sample names")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else sample_names()
    for name in names:
        model = load_sample(name)
        quiet = lambda *a, **k: None  # noqa: E731
        print(f"{name} slim-0.5 {_run(name, lambda: onnxprune.slim(model, 0.5, progress=quiet))}", flush=True)
        if name in GENERATED and name not in ("iresnet",):
            calib = _random_calibration(model, 64 if name == "retinaface" else None)
            print(f"{name} slim-0.5-calib "
                  f"{_run(name, lambda: onnxprune.slim(model, 0.5, calibration=calib, progress=quiet))}", flush=True)
            print(f"{name} quantize {_run(name, lambda: onnxprune.quantize(model, calib, progress=quiet))}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
