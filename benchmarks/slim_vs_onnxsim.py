#!/usr/bin/env python
"""onnxprune `slim` against onnxsim 0.8's `apply_structured_pruning`, same models, same data, one run.

For each model and parameter ratio it prints, relative to the unpruned original measured in the
same run: parameters, MACs, ONNX Runtime CPU latency (1 thread, median of interleaved runs), the
share of weighted layers each tool could shrink, and how close the outputs stay to the original
on real face images (cosine similarity; ../shared/data, random inputs when absent). onnxsim's
sparsity is bisected to remove the same share of parameters as onnxprune did.

    python benchmarks/slim_vs_onnxsim.py [--quick] [--rounds R]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxprune
from onnxprune.bench import interleaved_times
from onnxprune.graph.runtime import session
from onnxprune.graph.metrics import count_macs, count_params
from onnxprune.graph.shapes import infer_concrete_shapes
from onnxprune.sample_models import GENERATED, load_sample

SHARED = Path(__file__).resolve().parents[2] / "shared"
RATIOS = (0.3, 0.5, 0.69)


def _images(kind: str, shape: tuple[int, ...], n: int) -> list[np.ndarray]:
    """Real faces in the model's layout, or random inputs when the shared data is absent."""
    folder = SHARED / "data" / ("faces112" if kind == "recognizer" else "faces")
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".png"))[:n] if folder.is_dir() else []
    try:
        from PIL import Image
    except ImportError:
        files = []
    if not files:
        rng = np.random.default_rng(0)
        return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]
    out = []
    for f in files:
        img = Image.open(f).convert("RGB").resize((shape[3], shape[2]))
        x = np.asarray(img, np.float32)
        if kind == "recognizer":
            x = (x - 127.5) / 128.0
        else:  # RetinaFace convention: BGR minus the ImageNet means
            x = x[:, :, ::-1] - np.array([104.0, 117.0, 123.0], np.float32)
        out.append(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))
    return out


def _weighted_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {n.name: inits.get(n.input[1], ()) for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}


def _layers_shrunk(orig: onnx.ModelProto, pruned: onnx.ModelProto) -> float:
    """Share of the original's weight tensors (by element count of shapes) that got smaller."""
    from collections import Counter
    before = Counter(tuple(s) for s in _weighted_shapes(orig).values() if s)
    after = Counter(tuple(s) for s in _weighted_shapes(pruned).values() if s)
    total = sum(before.values())
    # Node and weight names change under onnxsim; compare the multisets of weight shapes instead.
    return 1 - sum((before & after).values()) / total if total else 0.0


def _runs(model: onnx.ModelProto, inp: str, shape: tuple[int, ...]) -> str | None:
    try:
        for optimize in (True, False):  # some broken graphs only fail without ORT's fusions
            session(model, threads=1, optimize=optimize).run(None, {inp: np.zeros(shape, np.float32)})
        onnx.checker.check_model(model)
        return None
    except Exception as exc:  # ORT raises several types
        return str(exc).split("Status Message:")[-1].strip().splitlines()[0][:90]


def _onnxsim_at(orig: onnx.ModelProto, ratio: float, inp: str, shape) -> tuple[onnx.ModelProto | None, float, str]:
    """onnxsim structured pruning bisected to remove ``ratio`` of parameters (None if it declines or breaks).

    The graph is simplified with onnxsim first, its best case: on unsimplified exports (Identity-fed
    weights) its pruning writes invalid models at almost any sparsity.
    """
    import onnxsim
    p0 = count_params(orig)
    try:
        orig, _ = onnxsim.simplify(orig)
    except Exception:
        pass
    lo, hi, best, broken = 0.0, 0.95, None, None
    for _ in range(12):
        s = (lo + hi) / 2
        try:
            m = onnxsim.apply_structured_pruning(orig, sparsity=s)
        except Exception as exc:
            return None, 0.0, f"raised {type(exc).__name__}"
        problem = _runs(m, inp, shape) if count_params(m) < p0 else None
        if problem:  # an invalid graph: try a lower sparsity, remember why
            broken = f"invalid model at sparsity {s:.2f} (params -{1 - count_params(m) / p0:.0%}): {problem}"
            hi = s
            continue
        r = 1 - count_params(m) / p0
        if best is None or abs(r - ratio) < abs(best[1] - ratio):
            best = (m, r)
        if abs(r - ratio) < 0.005:
            break
        lo, hi = (s, hi) if r < ratio else (lo, s)
    if best is None or best[1] <= 1e-6:
        return None, 0.0, broken or "declined (topology not matched)"
    note = f"ratio {best[1]:.3f}" + (f"; beyond: {broken}" if broken and abs(best[1] - ratio) > 0.01 else "")
    return best[0], best[1], note


def _cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    x = np.concatenate([v.ravel() for v in a]).astype(np.float64)
    y = np.concatenate([v.ravel() for v in b]).astype(np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12))


def bench(name: str, model: onnx.ModelProto, kind: str, rounds: int, n_images: int) -> None:
    inp = model.graph.input[0].name
    shape = (1, 3, 640, 640) if kind == "detector" else (1, 3, 112, 112)
    images = _images(kind, shape, n_images)
    variants: dict[str, tuple[onnx.ModelProto, str]] = {"original": (model, "")}
    for r in RATIOS:
        t0 = time.perf_counter()
        res = onnxprune.slim(model, r, input_shapes={inp: shape})
        variants[f"onnxprune {r:.2f}"] = (res.model, f"{time.perf_counter() - t0:.1f}s")
        sim, _, note = _onnxsim_at(model, res.report.achieved_ratio, inp, shape)
        variants[f"onnxsim   {r:.2f}"] = (sim, note)

    sessions = {k: session(m, threads=1) for k, (m, _) in variants.items() if m is not None}
    outputs = {k: [s.run(None, {inp: x}) for x in images] for k, s in sessions.items()}
    times = interleaved_times(list(sessions.values()), {inp: images[0]}, rounds, warmup=3)
    med = {k: float(np.median(times[:, i])) / 1e3 for i, k in enumerate(sessions)}  # seconds

    p0, shapes0 = count_params(model), infer_concrete_shapes(model, {inp: shape})
    m0 = count_macs(model, shapes0)
    data = "real faces" if (SHARED / "data").is_dir() else "random inputs"
    print(f"\n== {name} at {'x'.join(map(str, shape[2:]))}: {p0:,} params, {m0 / 1e6:.1f}M MACs, "
          f"original {med['original'] * 1e3:.2f} ms (median of {rounds}, 1 thread); outputs on {len(images)} {data}")
    print(f"{'variant':16s} {'params':>7s} {'MACs':>7s} {'latency':>8s} {'speed-up':>8s} {'shrunk':>7s} {'cosine':>7s}  note")
    for k, (m, note) in variants.items():
        if m is None:
            print(f"{k:16s} {'-':>7s} {'-':>7s} {'-':>8s} {'-':>8s} {'0%':>7s} {'-':>7s}  {note}")
            continue
        macs = count_macs(m, infer_concrete_shapes(m, {inp: shape}))
        cos = np.mean([_cosine(a, b) for a, b in zip(outputs["original"], outputs[k])])
        print(f"{k:16s} {count_params(m) / p0:7.3f} {macs / m0:7.3f} {med[k] / med['original']:8.3f} "
              f"{med['original'] / med[k]:7.2f}x {_layers_shrunk(model, m):7.0%} {cos:7.4f}  {note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and images")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    rounds = args.rounds or (15 if args.quick else 60)
    n_images = 4 if args.quick else 16
    print(f"onnxruntime {ort.__version__}, onnxprune {onnxprune.__version__}, python {sys.version.split()[0]}")
    print("columns are ratios to the original measured in this run; speed-up = original latency / variant latency")
    models = [("retinaface-mnet025 (real)", load_sample("retinaface-mnet025"), "detector"),
              ("mobilefacenet (arch)", GENERATED["mobilefacenet"](), "recognizer")]
    paddle = SHARED / "models" / "mobilefacenet_paddle.onnx"
    if paddle.exists():
        models.append(("mobilefacenet (real, paddle)", onnx.load(str(paddle)), "recognizer"))
    for name, model, kind in models:
        bench(name, model, kind, rounds, n_images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
