#!/usr/bin/env python
"""PReLU networks in int8: the PRelu left to ORT vs rewritten exactly (passes/prelu_split.py), one run.

Models: the trained Paddle MobileFaceNet (../shared/models, calibrated on ../shared/data/faces112) and
an iResNet-50 layout with random weights (``sample_models.generate.iresnet(blocks=(3, 4, 14, 3))``,
BatchNorm with non-trivial statistics, 43.6M parameters), 112x112, calibrated on the same crops.
Rows: fp32 as exported; fp32 with the PRelu rewritten as Mul+Max (exact: ORT's float PRelu kernel
is the slow part, in fp32 too); int8 with ``prelu="keep"`` (ORT runs each PRelu in float between
DequantizeLinear/QuantizeLinear), ``"split"`` (every PRelu rewritten: absorbed into doubled convs
where only dense layers read it, Mul+Max elsewhere) and ``"auto"`` (the default: absorb or Mul+Max
by timing on the model). For MobileFaceNet also ``auto`` with its embedding head in float (conv_sep,
its PRelu, the 7x7 GDC and the linear layer: the GDC amplifies any int8 noise at its input), with
``mse`` and ``trained`` thresholds (the latter needs PyTorch).
Columns: ORT CPU latency (1 thread, median of interleaved rounds) and its ratio to fp32 (median of
per-round ratios), the embedding cosine to fp32 on the held-out crops (quantize's held-out samples:
the crops not used for calibration), and the rewrite patterns. ``--profile`` adds ORT's per-op time
(``SessionOptions.enable_profiling``) for each model.

    python benchmarks/prelu_int8.py [--rounds 60] [--models mobilefacenet,iresnet50] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.bench import interleaved_times, ratio_quartiles
from onnxprune.calibration import load_calibration
from onnxprune.calibration.split import CalibrationSplit
from onnxprune.graph.runtime import session
from onnxprune.graph.shapes import representative_shapes
from onnxprune.int8 import quantize
from onnxprune.passes import prelu_split
from onnxprune.sample_models.generate import iresnet

SHARED = Path(__file__).resolve().parents[2] / "shared"
MFN_HEAD = ["^Conv.4[789]$", "^PRelu.32$"]  # Paddle MobileFaceNet: conv_sep, its PRelu, GDC, linear


def _cosine(model: onnx.ModelProto, candidate: onnx.ModelProto, data) -> tuple[float, float]:
    f = CalibrationSplit.held_out_fidelity(data, 0.25, representative_shapes(model), model, candidate, "embedding")
    return f.embedding["mean_cosine"], f.embedding["min_cosine"]


def _patterns(report) -> str:
    if not report.prelu:
        return "-"
    counts = collections.Counter(p for _, p in report.prelu["rewritten"])
    counts.update({"PRelu": len(report.prelu["left"])} if report.prelu["left"] else {})
    return ", ".join(f"{n} {p}" for p, n in sorted(counts.items()))


def variants(model: onnx.ModelProto, data, head: list[str] | None) -> list[tuple[str, onnx.ModelProto, tuple, str]]:
    rows = [("fp32", model, (1.0, 1.0), "33 PRelu" if head else "PRelu")]
    fp32_max, record = prelu_split(model, absorb=frozenset())
    rows.append(("fp32, PRelu as Mul+Max", fp32_max, _cosine(model, fp32_max, data), f"{len(record.rewritten)} max"))
    for mode in ("keep", "split", "auto"):
        r = quantize(model, data, prelu=mode)
        f = r.report.fidelity["embedding"]
        rows.append((f"int8 prelu={mode}", r.model, (f["mean_cosine"], f["min_cosine"]), _patterns(r.report)))
        print(f"  {mode}: {r.report.seconds:.0f} s; " + r.report.summary().splitlines()[4], flush=True)
    for thresholds in ("mse", "trained") if head else ():
        r = quantize(model, data, prelu="auto", exclude=head, thresholds=thresholds)
        f = r.report.fidelity["embedding"]
        label = f"  + head float, {thresholds}"
        rows.append((label, r.model, (f["mean_cosine"], f["min_cosine"]), _patterns(r.report)))
    return rows


def table(name: str, model: onnx.ModelProto, data, rounds: int, head: list[str] | None, profile: bool) -> None:
    print(f"\n== {name}", flush=True)
    rows = variants(model, data, head)
    feeds = {model.graph.input[0].name: data.samples()[:1]}
    times = interleaved_times([session(m, threads=1) for _, m, _, _ in rows], feeds, rounds, warmup=5)
    print(f"{'variant':24s} {'ms':>7s} {'vs fp32':>8s} {'cos mean':>8s} {'cos min':>8s}  rewrite")
    for i, (label, _, (mean, low), what) in enumerate(rows):
        _, speed, _ = ratio_quartiles(times[:, 0], times[:, i])
        print(f"{label:24s} {np.median(times[:, i]):7.2f} {speed:7.2f}x {mean:8.4f} {low:8.4f}  {what}")
    if profile:
        for label, m, _, _ in rows:
            print(f"  {label}: " + ", ".join(f"{op} {ms:.2f}" for op, ms in _op_times(m, feeds)[:6]) + " (ms per run)")


def _op_times(model: onnx.ModelProto, feeds: dict, runs: int = 30) -> list[tuple[str, float]]:
    """ORT's own per-op-type kernel time, 1 thread, ms per run."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / 1000.0 / runs
    return by_op.most_common()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--models", default="mobilefacenet,iresnet50")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    crops = SHARED / "data" / "faces112"
    if not crops.is_dir():
        print("../shared/data/faces112 is not available: this benchmark needs the face crops")
        return 1
    print(f"onnxruntime {ort.__version__}; int8 = QDQ, weights int8 per-channel, activations uint8; 1 thread")
    chosen = set(args.models.split(","))
    paddle = SHARED / "models" / "mobilefacenet_paddle.onnx"
    if "mobilefacenet" in chosen and paddle.exists():
        m = onnx.load(str(paddle))
        table("MobileFaceNet (Paddle, trained) 112x112", m, load_calibration(crops, m, preset="arcface"),
              args.rounds, MFN_HEAD, args.profile)
    if "iresnet50" in chosen:
        m = iresnet(blocks=(3, 4, 14, 3), widths=(64, 128, 256, 512), stem=64, embedding=512, name="iresnet50")
        table("iResNet-50 layout (random weights) 112x112", m, load_calibration(crops, m, preset="arcface"),
              max(args.rounds // 3, 10), None, args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
