#!/usr/bin/env python
"""int8 side by side: ONNX Runtime's own calibrators vs onnxprune's ranges, same models, same data, one run.

Rows per model: fp32; ORT ``quantize_static`` with MinMax, Percentile and Entropy (its own flow:
no equalisation, every layer int8); onnxprune ``mse`` with every layer int8, then as by default
(layers slower in int8 than fp32 kept float, see ``quantization/latency.py``), the same with our ranges
as chosen (``--ort-compare off``), and ``trained`` when PyTorch is installed. The other onnxprune rows
also make the model with ORT's calibrators' ranges and keep the best on the held-out images, as
``quantize`` does by default (column ``ranges``: the calibrator kept). For RetinaFace also
``mse --relu`` (LeakyReLU made ReLU so ORT fuses it into the int8 convs) and ``slim --ratio 0.69`` +
int8, with and without ``--relu``, and with ``--finetune-steps 100`` (label-free distillation) when
PyTorch is installed, and ``--relu`` without row tiling (``--no-tile``: the full-resolution float
prefix run whole). ORT's rows are never tiled. Columns: worst-output SQNR and cosine on held-out
calibration images, the task metric (detection AP@0.5 vs fp32, embedding cosine, top-1 agreement),
file size, and ONNX Runtime CPU latency (1 thread, median of interleaved runs) as a ratio to fp32
measured in the same run.

    python benchmarks/int8_vs_ort.py [--quick] [--models retinaface,mobilefacenet,age]
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxprune
from onnxprune.bench import interleaved_times
from onnxprune.graph.runtime import session
from onnxprune.calibration import load_calibration
from onnxprune.int8 import quantize
from onnxprune.sample_models import load_sample

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _task(f: dict) -> str:
    if f.get("detection_ap") is not None:
        return f"AP {f['detection_ap']:.3f}"
    if f.get("embedding"):
        return f"emb {f['embedding']['mean_cosine']:.3f}"
    if f.get("top1_agreement") is not None:
        return f"top1 {f['top1_agreement']:.3f}"
    return "-"


def bench(name: str, model: onnx.ModelProto, data, rounds: int, with_slim: bool) -> None:
    variants: list[tuple[str, onnx.ModelProto, dict | None]] = [("fp32", model, None)]
    kept: dict[str, str] = {}  # variant -> calibrator whose ranges were kept (+ the comparison's time)

    def ours(label: str, **options) -> None:
        r = quantize(model, data, **options)
        variants.append((label, r.model, r.report.fidelity))
        comp = r.report.calibrators
        kept[label] = r.report.thresholds + (f" (+{comp.seconds:.0f} s of {r.report.seconds:.0f})" if comp else "")

    for th in ("ort-minmax", "ort-percentile", "ort-entropy"):  # ORT's own flow: nothing of ours
        r = quantize(model, data, thresholds=th, equalize=False, float_slow_layers=False, tile=False,
                     compare_ort=False)
        variants.append((f"ORT {th[4:]}", r.model, r.report.fidelity))
    ours("mse, all int8", thresholds="mse", float_slow_layers=False)
    ours("onnxprune mse", thresholds="mse")
    ours("  no ORT compare", thresholds="mse", compare_ort=False)
    if importlib.util.find_spec("torch"):
        ours("onnxprune trained", thresholds="trained")
    if with_slim:  # the detector's LeakyReLUs: also with --relu (ReLU fused into the int8 convs, refitted)
        r = quantize(model, data, thresholds="mse", relu=True)
        variants.append(("mse --relu", r.model, r.report.fidelity))
        s = onnxprune.slim(model, 0.69, calibration=data, holdout=0.5)
        variants.append(("slim 0.69 fp32", s.model, s.report.fidelity))
        # fidelity of the two rows below is recomputed against the original (quantize's is vs the slim model)
        q = quantize(s.model, data, thresholds="mse", holdout=0.5)
        variants.append(("slim 0.69 + int8", q.model, None))
        q = quantize(s.model, data, thresholds="mse", holdout=0.5, relu=True)
        variants.append(("  + --relu", q.model, None))
        q = quantize(s.model, data, thresholds="mse", holdout=0.5, relu=True, tile=False)
        variants.append(("  + --relu --no-tile", q.model, None))
        if importlib.util.find_spec("torch"):  # label-free distillation from the original (100 steps)
            s = onnxprune.slim(model, 0.69, calibration=data, holdout=0.5, finetune_steps=100)
            q = quantize(s.model, data, thresholds="mse", holdout=0.5, relu=True)
            variants.append(("  + distilled", q.model, None))
    inp = model.graph.input[0].name
    x = data.samples()[:1]
    sessions = {n: session(m, threads=1) for n, m, _ in variants}
    times = interleaved_times(list(sessions.values()), {inp: x}, rounds, warmup=3)
    med = {n: float(np.median(times[:, i])) / 1e3 for i, n in enumerate(sessions)}  # seconds
    print(f"\n== {name}: fp32 {med['fp32'] * 1e3:.2f} ms (median of {rounds}, 1 thread); fidelity on held-out images")
    print(f"{'variant':22s} {'worst SQNR':>10s} {'cosine':>7s} {'task':>11s} {'size MB':>8s} {'latency':>8s} {'speed-up':>8s}"
          f"  ranges")
    for n, m, f in variants:
        if f is None and n != "fp32":  # end-to-end fidelity of slim+int8 against the original fp32
            f = _fidelity_vs(model, m, data)
        sq = min((o["sqnr_db"] for o in f["outputs"]), default=float("inf")) if f else float("inf")
        cos = min((o["cosine"] for o in f["outputs"]), default=1.0) if f else 1.0
        print(f"{n:22s} {sq:10.1f} {cos:7.4f} {_task(f) if f else '-':>11s} {m.ByteSize() / 1e6:8.2f} "
              f"{med[n] / med['fp32']:8.3f} {med['fp32'] / med[n]:7.2f}x  {kept.get(n, '')}", flush=True)


def _fidelity_vs(original: onnx.ModelProto, candidate: onnx.ModelProto, data) -> dict:
    from onnxprune.calibration.split import CalibrationSplit
    from onnxprune.graph.shapes import representative_shapes
    return CalibrationSplit.held_out_fidelity(data, 0.5, representative_shapes(original), original, candidate,
                                              "auto").to_dict()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="retinaface,mobilefacenet,age")
    args = ap.parse_args()
    if not (SHARED / "data").is_dir():
        print("../shared/data is not available: this benchmark needs real photos")
        return 1
    rounds = 15 if args.quick else 50
    print(f"onnxruntime {ort.__version__}; int8 = QDQ, weights int8 per-channel, activations uint8")
    chosen = set(args.models.split(","))
    if "retinaface" in chosen:
        m = load_sample("retinaface-mnet025")
        bench("RetinaFace-mnet0.25 (real) 640x640", m, load_calibration(SHARED / "data" / "faces", m, preset="retinaface"),
              rounds, with_slim=not args.quick)
    paddle = SHARED / "models" / "mobilefacenet_paddle.onnx"
    if "mobilefacenet" in chosen and paddle.exists():
        m = onnx.load(str(paddle))
        bench("MobileFaceNet (trained) 112x112", m, load_calibration(SHARED / "data" / "faces112", m, preset="arcface"),
              rounds, with_slim=False)
    if "age" in chosen:
        m = load_sample("age-v1")
        bench("age-v1 (real) 64x64", m, load_calibration(SHARED / "data" / "faces112", m, preset="age-gender"),
              rounds, with_slim=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
