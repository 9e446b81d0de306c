#!/usr/bin/env python
"""Double pruning on the real RetinaFace-mnet0.25: channels first (`slim --ratio 0.69`), then zeros.

One run, calibrated on ../shared/data/faces exactly as `onnxprune slim sample:retinaface-mnet025
--ratio 0.69 [--sparsity S] --calib ../shared/data/faces` does (default --holdout 0.25: 22 photos
fit, 7 held out). Rows: slim 0.69 alone, then with --sparsity 0.3 / 0.5 / 0.7. Columns:

- density: nonzero share of the Conv weights the pass covers (all of them here);
- file and `gzip -9` size of the written model, and gzip relative to slim alone;
- AP@0.5 of the detections against the original's on the 7 held-out photos (what `slim` reports),
  and on all 29 photos (22 of them were fitted on: a steadier but optimistic figure);
- NetScore (Wong 2019) with the held-out AP, the nonzero parameters and the dense MACs at 640².

A second table repeats slim alone and slim + sparsity 0.5 in 4 folds, each fold holding out 7
other photos (28 of the 29 held out once): the detections of each fold's models on the photos that
fold never saw are pooled, and AP@0.5 is computed once over all 28, a steadier held-out figure than 7.

A third table compares ways to store the 0.5 model: dense (what onnxprune writes), dense with
external data, and ONNX sparse initializers; whether onnx.checker, ONNX Runtime and onnx-ir accept
each; and whether ORT's outputs equal the dense model's bit for bit.

    python benchmarks/sparsity.py
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

import onnxprune
from onnxprune.bench import netscore
from onnxprune.calibration import CalibrationSet, load_calibration
from onnxprune.fidelity import evaluate
from onnxprune.graph.io import stored_size, with_sparse_initializers
from onnxprune.graph.metrics import count_macs, count_nonzero_params, weight_zeros
from onnxprune.graph.runtime import run_all, session
from onnxprune.graph.shapes import infer_concrete_shapes
from onnxprune.sample_models import load_sample

SHARED = Path(__file__).resolve().parents[2] / "shared"
SPARSITIES = (0.0, 0.3, 0.5, 0.7)
FOLDS = 4
HOLDOUT = 0.25  # slim's default --holdout


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return run_all(session(model), "input", [x[i:i + 8] for i in range(0, len(x), 8)])


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def main() -> None:
    original = load_sample("retinaface-mnet025")
    calib = load_calibration(SHARED / "data" / "faces", original, preset="retinaface")
    photos = calib.samples()
    names = [o.name for o in original.graph.output]
    reference = _outputs(original, photos)
    rows, models = [], {}
    for s in SPARSITIES:
        start = time.perf_counter()
        result = onnxprune.slim(original, 0.69, calibration=calib, sparsity=s)
        seconds = time.perf_counter() - start
        model = result.model
        zeros, weights = weight_zeros(model)
        size, gz = stored_size(model)
        ap_held = result.fidelity.detection_ap
        ap_all = evaluate(reference, _outputs(model, photos), names, (640, 640), "detection", len(photos)).detection_ap
        macs = count_macs(model, infer_concrete_shapes(model, {"input": (1, 3, 640, 640)}))
        nonzero = count_nonzero_params(model)
        rows.append((s, 1 - zeros / weights, size, gz, ap_held, ap_all, nonzero, netscore(ap_held, nonzero, macs),
                     seconds, result.report.sparsity))
        print(result.report.summary() if s else "", flush=True)
        models[s] = model
        held = result.report.calibration.held_out
    base_gz = rows[0][3]
    print(f"RetinaFace-mnet0.25 (real), slim --ratio 0.69 --calib ../shared/data/faces ({len(photos)} photos, "
          f"{held} held out), 640x640\n")
    print(f"| model | density | nonzero params | file | gzip -9 | gzip vs slim | AP@0.5 held-out ({held}) | "
          "AP@0.5 all 29 | NetScore | time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s, density, size, gz, ap_held, ap_all, nonzero, score, seconds, _ in rows:
        label = "slim 0.69" if s == 0 else f"slim 0.69 + sparsity {s:.1f}"
        ns = "—" if score is None else f"{score:.2f}"
        print(f"| {label} | {density:.3f} | {nonzero:,} | {_kib(size)} | {_kib(gz)} | {gz / base_gz:.3f} | "
              f"{ap_held:.3f} | {ap_all:.3f} | {ns} | {seconds:.0f} s |")

    cross_validate(original, calib, reference, names)

    half = models[0.5]
    x = photos[:4]
    dense_out = _outputs(half, x)
    print("\nStorage of the slim 0.69 + sparsity 0.5 model:\n")
    print("| layout | file(s) | gzip -9 | onnx.checker | ORT loads | ORT outputs = dense | onnx-ir keeps weights |")
    print("|---|---|---|---|---|---|---|")
    layouts = [("dense, zeros inline (written)", half, False), ("dense, external data (.onnx + .data)", half, True),
               ("sparse_initializer, int64 indices", with_sparse_initializers(half), False)]
    for label, model, external in layouts:
        size, gz = stored_size(model, external_data=external)
        try:
            onnx.checker.check_model(model)
            checker = "yes"
        except onnx.checker.ValidationError:
            checker = "no"
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception:  # onnx's shape inference does not read sparse initializers
            checker += " (full_check fails)"
        try:
            same = all(np.array_equal(a, b) for a, b in zip(dense_out, _outputs(model, x)))
            loads = "yes"
        except Exception as exc:  # noqa: BLE001 - reported in the table
            loads, same = f"no ({type(exc).__name__})", False
        kept = len(ir.to_proto(ir.from_proto(model)).graph.initializer) == len(half.graph.initializer)
        print(f"| {label} | {_kib(size)} | {_kib(gz)} | {checker} | {loads} | {'yes' if same else 'no'} | "
              f"{'yes' if kept else 'no (drops them)'} |")


def fold_calibration(calib: CalibrationSet, held: np.ndarray) -> CalibrationSet:
    """The same photos reordered so that slim's seeded split holds out exactly ``held``."""
    photos = calib.samples()
    order = np.random.default_rng(0).permutation(len(photos))  # CalibrationSplit.split's order
    seq = np.concatenate([held, np.setdiff1d(np.arange(len(photos)), held)])
    data = np.empty_like(photos)
    data[order] = photos[seq]
    return CalibrationSet(calib.name, [data], [], calib.preprocess, list(calib.notes))


def cross_validate(original: onnx.ModelProto, calib: CalibrationSet, reference: list[np.ndarray],
                   names: list[str]) -> None:
    photos = calib.samples()
    n_held = int(round(HOLDOUT * len(photos)))
    folds = np.random.default_rng(1).permutation(len(photos))[:FOLDS * n_held].reshape(FOLDS, n_held)
    seen = np.sort(folds.ravel())
    print(f"\n{FOLDS}-fold: each fold holds out {n_held} photos; AP@0.5 over the {len(seen)} pooled held-out photos\n")
    print("| model | AP@0.5 pooled held-out | per fold | gzip vs slim (mean) |")
    print("|---|---|---|---|")
    for s in (0.0, 0.5):
        pooled = [np.empty_like(r[seen]) for r in reference]
        per_fold, sizes = [], []
        for held in folds:
            result = onnxprune.slim(original, 0.69, calibration=fold_calibration(calib, held), sparsity=s)
            out = _outputs(result.model, photos[held])
            for p, o in zip(pooled, out):
                p[np.searchsorted(seen, held)] = o
            per_fold.append(result.fidelity.detection_ap)
            sizes.append(stored_size(result.model)[1])
        ref = [r[seen] for r in reference]
        ap = evaluate(ref, pooled, names, (640, 640), "detection", len(seen)).detection_ap
        if s == 0:
            base = np.mean(sizes)
        label = "slim 0.69" if s == 0 else f"slim 0.69 + sparsity {s:.1f}"
        print(f"| {label} | {ap:.3f} | {', '.join(f'{a:.3f}' for a in per_fold)} | {np.mean(sizes) / base:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
