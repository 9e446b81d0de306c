#!/usr/bin/env python
"""`slim --speedup S` against its targets, and against the parameter budget at the same measured speed.

One run. Per case: the model is compressed with `--speedup S` (cost model measured layer by layer on
this machine, cached), then with `--ratio R` where R is searched (bisection on the measured speed-up)
so that the parameter budget reaches the same measured speed; finally the original, the speed-target
model and the ratio model are timed side by side, interleaved, 1 thread, at the analysis shape, and
fidelity is measured against the original on held-out samples never used for calibration:

- RetinaFace-mnet0.25 (real, 640x640; ../shared/data/faces, half held out): AP@0.5 vs the original;
  `--speedup 2` float without distillation, and `--speedup 4 --int8 --relu --finetune-steps 100`;
- Paddle MobileFaceNet (trained, ../shared/models; faces112 crops, a quarter held out): embedding cosine;
- the generated SCRFD architecture (random weights: mean output cosine on the photos) at 640x640;
- age-v1 (real dlib/Cydral ResNet, its own layout: BN as Mul+Add, Pad ops; faces112): top-1 agreement.

    python benchmarks/speed_target.py [--cases retinaface2,retinaface4,mobilefacenet,scrfd,age]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, from any directory

from onnxprune.bench import _session, interleaved_times, ratio_quartiles  # noqa: E402
from onnxprune.calibration import load_calibration  # noqa: E402
from onnxprune.compress import PruneOptions, QuantizeOptions, compress  # noqa: E402
from onnxprune.sample_models import load_sample  # noqa: E402
from onnxprune.sample_models.generate import GENERATED  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
RUNS = 40


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    speedup: float
    goal: str  # the target, as text
    int8: bool = False
    finetune: int = 0
    holdout: float = 0.25


CASES = [
    Case("retinaface2", "RetinaFace-mnet0.25 640² fp32", 2.0, "≥1.9x at AP ≥ 0.95", holdout=0.5),
    Case("retinaface4", "RetinaFace-mnet0.25 640² int8 --relu, 100 distillation steps", 4.0, "≥3.7x at AP ≥ 0.93",
         int8=True, finetune=100, holdout=0.5),
    Case("mobilefacenet", "Paddle MobileFaceNet 112²", 1.5, "≥1.4x at cosine ≥ 0.95"),
    Case("scrfd", "generated SCRFD 640² (random weights)", 2.0, "≥1.8x"),
    Case("age", "age-v1 64² (real; BN as Mul+Add, Pad)", 2.0, "≥1.8x"),
]


def _model_and_data(key: str):
    faces, crops = SHARED / "data" / "faces", SHARED / "data" / "faces112"
    if key.startswith("retinaface"):
        m = load_sample("retinaface-mnet025")
        return m, load_calibration(faces, m, preset="retinaface")
    if key == "mobilefacenet":
        m = onnx.load(str(SHARED / "models" / "mobilefacenet_paddle.onnx"))
        return m, load_calibration(crops, m, preset="arcface")
    if key == "scrfd":
        m = GENERATED["scrfd"]()
        return m, load_calibration(faces, m, preset="scrfd")
    m = load_sample("age-v1")
    return m, load_calibration(crops, m, preset="age-gender")


def _run(model, calib, case: Case, **budget):
    prune = PruneOptions(finetune_steps=case.finetune, **budget)
    quant = QuantizeOptions(relu=True) if case.int8 else None
    start = time.perf_counter()
    result = compress(model, prune=prune, quantize=quant, calibration=calib, holdout=case.holdout,
                      progress=lambda *a: None)
    return result, time.perf_counter() - start


def _measured(original: onnx.ModelProto, models: list[onnx.ModelProto], shape: dict) -> list[float]:
    """Speed-up of each model over the original, interleaved rounds, 1 thread (median of per-round ratios)."""
    feeds = {k: np.random.default_rng(0).standard_normal(v).astype(np.float32) for k, v in shape.items()}
    sessions = [_session(m, "CPUExecutionProvider", 1, None, f"model {i}") for i, m in enumerate([original, *models])]
    times = interleaved_times(sessions, feeds, RUNS, 5, progress=lambda *a: None)
    return [ratio_quartiles(times[:, 0], times[:, i])[1] for i in range(1, len(sessions))]


def _slim_report(result):
    return result.report.slim if hasattr(result.report, "slim") else result.report


def _ratio_at_speed(model, calib, case: Case, goal: float, shape: dict, first: float) -> tuple[float, object]:
    """The parameter ratio whose measured speed-up is closest to ``goal`` (bisection, 3 steps)."""
    lo, hi, best = 0.05, 0.95, None
    r = first
    for _ in range(3):
        result, _ = _run(model, calib, case, ratio=round(r, 3))
        speed = _measured(model, [result.model], shape)[0]
        if best is None or abs(speed - goal) < abs(best[2] - goal):
            best = (r, result, speed)
        lo, hi = (r, hi) if speed < goal else (lo, r)
        r = (lo + hi) / 2
    return best[0], best[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(c.key for c in CASES))
    args = ap.parse_args()
    if not (SHARED / "data").is_dir():
        print("../shared/data is not available: this benchmark needs real photos")
        return 1
    rows = []
    for case in [c for c in CASES if c.key in args.cases.split(",")]:
        model, calib = _model_and_data(case.key)
        by_speed, seconds = _run(model, calib, case, speedup=case.speedup)
        report = _slim_report(by_speed)
        shape = {k: tuple(v) for k, v in report.input_shapes.items()}
        metric, value = by_speed.fidelity.headline()
        if case.int8:  # distilled int8 points: no ratio search (each try costs a distillation)
            speed_x, = _measured(model, [by_speed.model], shape)
            rows.append((case, report, speed_x, value, metric, None, None, None, None, seconds))
        else:
            ratio, by_ratio = _ratio_at_speed(model, calib, case, report.speed.measured, shape, report.achieved_ratio)
            speed_x, ratio_x = _measured(model, [by_speed.model, by_ratio.model], shape)
            rows.append((case, report, speed_x, value, metric, ratio, _slim_report(by_ratio), ratio_x,
                         by_ratio.fidelity.headline()[1], seconds))
        print(f"{case.label}: --speedup {case.speedup:g}: predicted {report.speed.predicted:.2f}x, measured "
              f"{speed_x:.2f}x, {metric} {value:.3f} ({seconds:.0f} s)", flush=True)
    print("\n| model | target | goal | predicted | measured | held-out fidelity | params removed | stages | "
          "--ratio at the same speed | its measured | its fidelity | time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case, rep, sx, val, metric, ratio, rrep, rx, rval, secs in rows:
        stages = max(1, len(rep.speed.stages))
        same = ("— | — | —" if ratio is None else
                f"{ratio:.2f} ({rrep.achieved_ratio:.1%}) | {rx:.2f}x | {rval:.3f}")
        print(f"| {case.label} | {case.speedup:g}x | {case.goal} | {rep.speed.predicted:.2f}x | {sx:.2f}x | "
              f"{metric} {val:.3f} | {rep.achieved_ratio:.1%} | {stages} | {same} | {secs:.0f} s |")
    print(f"\nmeasured: median of per-round ratios, {RUNS} interleaved rounds, 1 thread, "
          "CPUExecutionProvider; predicted: the per-layer cost model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
