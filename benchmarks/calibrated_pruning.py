#!/usr/bin/env python
"""How much each calibration-aware stage buys, on real trained face models and real photos.

For each model and parameter ratio, one row per configuration: the channel criterion, the budget
allocation (uniform global ranking vs per-group sensitivity scan), and whether the layers after
removed channels are refitted by least squares. Quality is measured against the original model
on held-out images that were not used for calibration:

- RetinaFace-mnet0.25 (real): AP@0.5 of the pruned detections against the original's
  (calibrate on half of ../shared/data/faces, evaluate on the other half);
- MobileFaceNet (trained, ../shared/models): mean embedding cosine on held-out aligned crops;
- age-v1 (real): top-1 agreement on held-out aligned crops.

    python benchmarks/calibrated_pruning.py [--quick] [--refit-rows] [--models retinaface,mobilefacenet,age]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import onnx

import onnxprune
from onnxprune.calibration import load_calibration
from onnxprune.sample_models import load_sample

SHARED = Path(__file__).resolve().parents[2] / "shared"

# (criterion, allocation, refit, distillation steps)
CONFIGS = [
    ("l1", "uniform", False, 0),  # what magnitude pruning without data does (Torch-Pruning-like)
    ("bn", "uniform", False, 0),
    ("activation", "uniform", False, 0),
    ("activation", "uniform", True, 0),
    ("activation", "sensitivity", False, 0),
    ("l1", "sensitivity", True, 0),
    ("perturbation", "sensitivity", True, 0),
    ("snip", "sensitivity", True, 0),
    ("taylor", "sensitivity", True, 0),
    ("activation", "sensitivity", True, 0),  # onnxprune's default with --calib
    ("activation", "sensitivity", True, 300),  # + label-free distillation (needs PyTorch)
]
QUICK = [CONFIGS[0], CONFIGS[-2]]


def _models(selected: set[str]):
    if "retinaface" in selected:
        m = load_sample("retinaface-mnet025")
        yield "RetinaFace-mnet0.25 (real)", m, load_calibration(SHARED / "data" / "faces", m, preset="retinaface"), 0.5, "AP@0.5"
    paddle = SHARED / "models" / "mobilefacenet_paddle.onnx"
    if "mobilefacenet" in selected and paddle.exists():
        m = onnx.load(str(paddle))
        yield "MobileFaceNet (trained)", m, load_calibration(SHARED / "data" / "faces112", m, preset="arcface"), 0.25, "emb. cosine"
    if "age" in selected:
        m = load_sample("age-v1")
        yield "age-v1 (real)", m, load_calibration(SHARED / "data" / "faces112", m, preset="age-gender"), 0.25, "top-1 agree"


def _quality(report) -> float:
    return report.fidelity.headline()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two configurations, two ratios")
    ap.add_argument("--models", default="retinaface,mobilefacenet,age")
    ap.add_argument("--refit-rows", action="store_true", help="only the configurations with the refit, no distillation")
    args = ap.parse_args()
    if not (SHARED / "data").is_dir():
        print("../shared/data is not available: this benchmark needs real photos")
        return 1
    configs = QUICK if args.quick else CONFIGS
    if args.refit_rows:
        configs = [c for c in configs if c[2] and not c[3]]
    ratios = (0.3, 0.5) if args.quick else (0.3, 0.5, 0.69)
    for name, model, data, holdout, metric in _models(set(args.models.split(","))):
        print(f"\n== {name}: {len(data)} calibration samples, {holdout:.0%} held out; quality = {metric} vs the original")
        print(f"{'criterion':12s} {'allocation':12s} {'refit':5s} {'distil':6s} " + " ".join(f"{r:>13.2f}" for r in ratios)
              + "   (quality / seconds)")
        for criterion, allocation, refit, steps in configs:
            cells = []
            for r in ratios:
                t0 = time.perf_counter()
                try:
                    res = onnxprune.slim(model, r, calibration=data, criterion=criterion, allocation=allocation,
                                         recover=refit, holdout=holdout, finetune_steps=steps)
                    cells.append(f"{_quality(res.report):7.3f} {time.perf_counter() - t0:4.0f}s")
                except onnxprune.OnnxPruneError:  # e.g. PyTorch missing for snip/taylor/distillation
                    cells.append("n/a")
            print(f"{criterion:12s} {allocation:12s} {'yes' if refit else 'no':5s} {steps or '-':>6} "
                  + " ".join(f"{c:>13s}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
