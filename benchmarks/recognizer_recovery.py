#!/usr/bin/env python
"""Recognizers keep identity through pruning and int8: the trained Paddle MobileFaceNet on held-out crops.

The 40 aligned crops of ../shared/data/faces112 are split into folds of 10 (seeded): each fold's
crops are never given to onnxprune, which calibrates on the other 30 (and holds out a quarter of
those itself, for its report and for keeping the best distilled weights). Embedding cosine to the
original is pooled over the evaluation crops of all folds run.

Rows: `slim --ratio R` with the least-squares refit only, and with `--finetune-steps N`
(distillation: augmented batches, outputs and feature maps matched, keep-best on the held-out
quarter); `quantize` (int8) of the original: alone, with `--adaround` (weights rounded by each layer's
output), with `--max-drop 0.01` (float islands around the layers that add the most error, then the
absorb PRelu rewrite, until the held-out drop is at most 0.01), with trained thresholds too;
`slim --ratio 0.5 --finetune-steps N --int8`, alone and with `--max-drop 0.01`.
Speed: ORT CPU, 1 thread, median of interleaved rounds against the fp32 original.

    python benchmarks/recognizer_recovery.py [--folds 0,1] [--steps 300] [--ratios 0.3,0.5] [--no-int8] [--only TEXT]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

from onnxprune.bench import interleaved_times
from onnxprune.calibration import CalibrationSet, load_calibration
from onnxprune.compress import PruneOptions, QuantizeOptions, compress
from onnxprune.graph.runtime import session

SHARED = Path(__file__).resolve().parents[2] / "shared"
FOLD = 10


def _embed(model: onnx.ModelProto, name: str, x: np.ndarray) -> np.ndarray:
    s = session(model, threads=1)
    return np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def _cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    a = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    b = got / np.linalg.norm(got, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def _speedup(original: onnx.ModelProto, candidate: onnx.ModelProto, name: str, x: np.ndarray, rounds: int) -> float:
    sessions = [session(m, threads=1) for m in (original, candidate)]
    times = interleaved_times(sessions, {name: x[:1]}, runs=rounds, warmup=3)
    return float(np.median(times[:, 0] / times[:, 1]))


def _rows(ratios: list[float], steps: int, int8: bool):
    for r in ratios:
        yield f"slim {r:g}, refit", PruneOptions(ratio=r), None
        if steps:
            yield f"slim {r:g}, refit + distil {steps}", PruneOptions(ratio=r, finetune_steps=steps), None
    if int8:
        yield "int8", None, QuantizeOptions()
        yield "int8 --adaround", None, QuantizeOptions(adaround=True)
        yield "int8 --max-drop 0.01", None, QuantizeOptions(max_drop=0.01)
        yield "int8 --max-drop 0.01 --thresholds trained", None, QuantizeOptions(max_drop=0.01, thresholds="trained")
        yield f"slim 0.5 + distil {steps} + int8", PruneOptions(ratio=0.5, finetune_steps=steps), QuantizeOptions()
        yield (f"slim 0.5 + distil {steps} + int8 --max-drop 0.01", PruneOptions(ratio=0.5, finetune_steps=steps),
               QuantizeOptions(max_drop=0.01))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", default="0,1,2,3", help="which folds of 10 crops to evaluate on (0-3)")
    ap.add_argument("--steps", type=int, default=300, help="distillation steps (0: refit only)")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--rounds", type=int, default=40, help="interleaved timing rounds")
    ap.add_argument("--only", default="", help="only the configurations whose label contains this text")
    args = ap.parse_args()
    path = SHARED / "models" / "mobilefacenet_paddle.onnx"
    if not path.exists():
        print("../shared is not available: this benchmark needs the trained MobileFaceNet and real crops")
        return 1
    model = onnx.load(str(path))
    data = load_calibration(SHARED / "data" / "faces112", model, preset="arcface", count=1000)
    x, name = data.samples(), data.name
    order = np.random.default_rng(123).permutation(len(x))
    folds = [int(f) for f in args.folds.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    print(f"MobileFaceNet (Paddle, trained), {len(x)} crops; folds {folds} of {FOLD} held-out crops each")
    print("| configuration | cosine mean | cosine min | speed-up vs fp32 | seconds per fold |\n|---|---|---|---|---|")
    for label, prune, quant in _rows(ratios, args.steps, not args.no_int8):
        if args.only not in label:
            continue
        cos, speed, seconds = [], [], []
        for fold in folds:
            held = order[fold * FOLD:(fold + 1) * FOLD]
            calib = CalibrationSet(name, [x[np.setdiff1d(order, held)]])
            t0 = time.perf_counter()
            result = compress(model, prune=prune, quantize=quant, calibration=calib, progress=lambda *a, **k: None)
            seconds.append(time.perf_counter() - t0)
            cos.append(_cosines(_embed(model, name, x[held]), _embed(result.model, name, x[held])))
            speed.append(_speedup(model, result.model, name, x, args.rounds))
        c = np.concatenate(cos)
        print(f"| {label} | {c.mean():.4f} | {c.min():.4f} | {np.median(speed):.2f}x | {np.mean(seconds):.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
