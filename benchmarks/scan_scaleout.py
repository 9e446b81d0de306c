#!/usr/bin/env python
"""Scale-out of the per-layer sensitivity scan and of sweeps: measured here, estimated for a cluster.

1. Wall time of the RetinaFace-mnet0.25 sensitivity scan (640x640, the scan's 8 calibration
   photos) with 1 worker (in process), 2 local worker processes, and a local Ray instance on 2
   CPUs; ratios to 1 worker, all in one run. Ray's start-up is timed separately.
2. Per-point costs of a sweep (compute job, timing job, bytes shipped to the object store) for
   RetinaFace, MobileFaceNet and age-v1, and from them a paper estimate of a
   3-model x 4-ratio x 5-criterion sweep on a 16-node cluster.

    python benchmarks/scan_scaleout.py [--skip-ray] [--nodes 16 --cpus-per-node 16]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path

import numpy as np
import onnx

from onnxprune.calibration import load_calibration
from onnxprune.calibration.activations import consumer_moments
from onnxprune.calibration.split import CalibrationSplit
from onnxprune.channels.analysis import analyze_channels
from onnxprune.executors import LocalExecutor, RayExecutor
from onnxprune.pipeline import prepare
from onnxprune.sample_models import load_sample
from onnxprune.saliency.criteria import ScoreContext, get_criterion
from onnxprune.sensitivity import scan
from onnxprune.sweep import Point, SweepInputs, SweepOptions, compute_point, time_point

SHARED = Path(__file__).resolve().parents[2] / "shared"


def scan_times(skip_ray: bool) -> None:
    model = load_sample("retinaface-mnet025")
    calib = load_calibration(SHARED / "data" / "faces", model, preset="retinaface", count=16)
    prep = prepare(model)
    analysis = analyze_channels(prep.model, prep.shapes)
    split = CalibrationSplit.split(calib, 0.25, prep.input_shapes)
    moments = consumer_moments(prep.model, analysis, split.input_name, split.batches)
    arrays = {n: v.const_value.numpy() for n, v in prep.model.graph.initializers.items() if v.const_value is not None}
    scores = get_criterion("activation")(ScoreContext(analysis, arrays, prep.bn_gamma, {}, moments, prep.model,
                                                      split.batches, split.input_name))
    means = {k: moments.mean(k) for k in moments.axes}
    args = (prep.model, analysis, scores, split.input_name, split.scan_batches)
    jobs = sum(1 for g in analysis.groups for _ in range(3) if any(analysis.units[u].prunable for u in g.units))
    print(f"RetinaFace-mnet0.25 sensitivity scan: {len(analysis.groups)} groups, about {jobs} jobs, "
          f"{split.scan_batches[0].shape[0]} photos at {split.scan_batches[0].shape[2:]}")
    rows = []
    reference = None
    for label, make in [("1 worker (in process)", lambda: LocalExecutor(1)),
                        ("2 local processes", lambda: LocalExecutor(2))] + \
                       ([] if skip_ray else [("Ray, local, 2 CPUs", lambda: RayExecutor(workers=2))]):
        t0 = time.perf_counter()
        ex = make()
        started = time.perf_counter() - t0
        t0 = time.perf_counter()
        curves = scan(*args, input_means=means, executor=ex)
        wall = time.perf_counter() - t0
        ex.close()
        if reference is None:
            reference = curves
        same = all(np.allclose(curves[g].distortion, reference[g].distortion, rtol=1e-6) for g in reference)
        rows.append((label, started, wall, same))
    base = rows[0][2]
    print(f"{'executor':<24s} {'start s':>8s} {'scan s':>8s} {'vs 1 worker':>12s}  same curves")
    for label, started, wall, same in rows:
        print(f"{label:<24s} {started:8.1f} {wall:8.1f} {base / wall:11.2f}x  {same}")


def sweep_estimate(nodes: int, cpus: int) -> None:
    models = [("RetinaFace-mnet0.25", load_sample("retinaface-mnet025"), SHARED / "data" / "faces", "retinaface")]
    paddle = SHARED / "models" / "mobilefacenet_paddle.onnx"
    if paddle.exists():
        models.append(("MobileFaceNet", onnx.load(str(paddle)), SHARED / "data" / "faces112", "arcface"))
    models.append(("age-v1", load_sample("age-v1"), SHARED / "data" / "faces112", "age-gender"))
    options = SweepOptions(ratios=(0.5,), runs=30)
    print(f"\nper-point costs (1 worker; compute = slim with calibration + held-out fidelity; timing = {options.runs} "
          "interleaved rounds)")
    print(f"{'model':<22s} {'compute s':>9s} {'timing s':>9s} {'model MB':>9s} {'calib MB':>9s}")
    costs = []
    for name, model, data, preset in models:
        calib = load_calibration(data, model, preset=preset, count=32)
        blob = model.SerializeToString()
        h = hashlib.sha256(blob).hexdigest()
        inputs = SweepInputs({h: blob}, {h: calib}, options)
        t0 = time.perf_counter()
        out = compute_point(inputs, Point(name, h, 0.5, None, False))
        compute = time.perf_counter() - t0
        tmp = Path("/tmp/onnxprune-scan-estimate.onnx")
        tmp.write_bytes(out["model_bytes"])
        t0 = time.perf_counter()
        time_point(inputs, (h, str(tmp)))
        timing = time.perf_counter() - t0
        tmp.unlink()
        calib_mb = sum(b.nbytes for b in calib.batches) / 1e6
        costs.append((compute, timing, len(blob) / 1e6 + calib_mb))
        print(f"{name:<22s} {compute:9.1f} {timing:9.1f} {len(blob) / 1e6:9.2f} {calib_mb:9.2f}")
    n_models, n_ratios, n_criteria = 3, 4, 5
    points = n_models * n_ratios * n_criteria
    mean_compute = float(np.mean([c[0] for c in costs]))
    mean_timing = float(np.mean([c[1] for c in costs]))
    shipped = sum(c[2] for c in costs)
    slots = nodes * cpus
    waves = math.ceil(points / slots)
    compute_wall = waves * max(c[0] for c in costs) * 1.5  # slowest model, x1.5 for criteria slower than activation
    timing_wall = points * mean_timing
    transfer = shipped * nodes / 1000 / 1.0  # GB at ~1 GB/s from the head node (10 GbE), once per node
    print(f"\npaper estimate, {n_models} models x {n_ratios} ratios x {n_criteria} criteria = {points} points "
          f"on {nodes} nodes x {cpus} CPUs:")
    print(f"  on this machine, 1 worker: {points * (mean_compute * 1.5 + mean_timing) / 60:.0f} min")
    print(f"  object store: {shipped:.1f} MB put once, ~{transfer:.1f} s to reach every node")
    print(f"  compute: {points} jobs in {waves} wave(s) of {slots} slots: ~{compute_wall:.0f} s")
    print(f"  timing: {points} points one at a time on one node: ~{timing_wall:.0f} s "
          f"({'the bottleneck: lower --runs or time fewer points' if timing_wall > compute_wall else 'not the bottleneck'})")
    print(f"  total: ~{(transfer + compute_wall + timing_wall) / 60:.1f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-estimate", action="store_true")
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--cpus-per-node", type=int, default=16)
    args = ap.parse_args()
    scan_times(args.skip_ray)
    if not args.skip_estimate:
        sweep_estimate(args.nodes, args.cpus_per_node)


if __name__ == "__main__":
    main()
