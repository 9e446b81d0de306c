#!/usr/bin/env python
"""Run the models of a ``prepare.py`` work dir, or compare two runs: needs only numpy and onnxruntime.

It runs unchanged on x86-64 and under an emulated (or real) aarch64 Python, so the same code produces
the reference and the ARM outputs.

    python compare.py run  WORK --tag x86_64 [--provider CPUExecutionProvider]   # -> WORK/outputs/TAG/
    python compare.py diff WORK x86_64 aarch64 [more tags]                         # table; exit 1 on a failure

Tolerances (ARM vs x86, same ONNX Runtime version, same input tensors):
- fp32 models: max |a - b| <= 1e-4 x max |reference| per output (kernels differ only in summation order);
- int8 models: max |a - b| <= 2 quantisation steps of the output's DequantizeLinear scale (the integer
  kernels differ in requantisation rounding, which may flip a value by one step and propagate), or cosine
  >= 0.999 where the output has no scale; plus the task: the same detections (RetinaFace anchors with face
  score > 0.5, flips allowed only within 2 steps of the threshold), the same top-1 class, embedding cosine
  >= 0.999.
An int8 model outside these bounds is reported as ``drift``, not a failure, when it is as close to its fp32
model on this architecture as on the reference one: mean cosine at most 0.01 lower, and at most max(1, 5%)
more detections or top-1 classes unlike fp32's. Rounding differs, accuracy does not. Exit 1 only on FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

FP32_REL = 1e-4
INT8_STEPS = 2.0
MIN_COSINE = 0.999
FACE_THRESHOLD = 0.5
DRIFT_MARGIN = 0.01  # mean cosine to the fp32 outputs may be this much lower than on the reference arch


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _manifest(work: Path) -> dict:
    path = work / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"compare.py: error: {path} not found; run prepare.py first")
    return json.loads(path.read_text())


def run(work: Path, tag: str, provider: str, threads: int) -> int:
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        print(f"compare.py: {provider} is not in this onnxruntime build "
              f"({', '.join(ort.get_available_providers())}); skipped")
        return 0
    out_dir = work / "outputs" / tag
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"machine": platform.machine(), "python": platform.python_version(), "onnxruntime": ort.__version__,
            "numpy": np.__version__, "provider": provider, "threads": threads, "seconds": {}}
    for entry in _manifest(work)["models"]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        start = time.perf_counter()
        sess = ort.InferenceSession(str(work / entry["file"]), opts, providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])))
        feeds = {name: np.load(work / "inputs" / file) for name, file in entry["inputs"].items()}
        outputs = sess.run(None, feeds)
        names = [o.name for o in sess.get_outputs()]
        np.savez(out_dir / (_slug(entry["name"]) + ".npz"), **dict(zip(names, outputs)))
        info["seconds"][entry["name"]] = round(time.perf_counter() - start, 2)
        print(f"{tag}: {entry['name']}: {', '.join(f'{n}{list(o.shape)}' for n, o in zip(names, outputs))} "
              f"({info['seconds'][entry['name']]} s)", flush=True)
    (out_dir / "info.json").write_text(json.dumps(info, indent=1))
    return 0


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest per-sample cosine (axis 0 is the batch)."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, (a * b).sum(axis=1) / np.maximum(den, 1e-300), 1.0)
    return float(cos.min())


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
    return float(((a * b).sum(axis=1) / den).mean())


def _task(entry: dict, ref: dict, other: dict) -> tuple[str, bool]:
    """(description, ok) of the task-level agreement."""
    task = entry["task"]
    if task == "detection":
        conf_step = entry["output_steps"].get("conf") or 0.0
        r, o = ref["conf"][..., 1], other["conf"][..., 1]
        rd, od = r > FACE_THRESHOLD, o > FACE_THRESHOLD
        flips = rd != od
        near = np.abs(r - FACE_THRESHOLD) <= INT8_STEPS * conf_step
        ok = bool(np.all(near[flips]))
        return f"face anchors {int(rd.sum())}/{int(od.sum())}, {int(flips.sum())} flipped", ok
    if task == "classification":
        name = list(ref)[0]
        agree = float(np.mean(ref[name].argmax(-1) == other[name].argmax(-1)))
        return f"top-1 agreement {agree:.3f}", agree == 1.0
    if task == "embedding":
        name = list(ref)[0]
        cos = _cosine(ref[name], other[name])
        return f"embedding cosine {cos:.6f}", cos >= MIN_COSINE
    return "-", True


def _load(work: Path, tag: str, name: str) -> dict[str, np.ndarray]:
    path = work / "outputs" / tag / (_slug(name) + ".npz")
    if not path.is_file():
        raise SystemExit(f"compare.py: error: {path} not found; rerun `compare.py run` for {tag}")
    return dict(np.load(path))


def _compare_model(work: Path, entry: dict, ref_tag: str, tag: str) -> tuple[str, list[dict]]:
    """(verdict, rows): 'ok' within tolerance; 'drift' for an int8 model outside it whose distance to its fp32
    model is no larger on this architecture than on the reference one (different rounding, same accuracy);
    else 'FAIL'."""
    ref, other = _load(work, ref_tag, entry["name"]), _load(work, tag, entry["name"])
    rows, within = [], True
    for name, a in ref.items():
        b = other.get(name)
        if b is None or a.shape != b.shape:
            rows.append({"output": name, "error": f"shape {a.shape} vs {None if b is None else b.shape}"})
            within = False
            continue
        d = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
        rel = d / max(float(np.max(np.abs(a))), 1e-30)
        cos = _cosine(a, b)
        step = entry["output_steps"].get(name)
        steps = d / step if step else None
        if entry["kind"] == "fp32":
            ok = rel <= FP32_REL
        else:
            # + 1e-3: a difference of exactly 2 steps of a float32 output measures 2.0000002 steps
            ok = steps <= INT8_STEPS + 1e-3 if steps is not None else cos >= MIN_COSINE
        within &= ok
        rows.append({"output": name, "max_abs": d, "rel": rel, "steps": steps, "cosine": cos, "ok": ok})
    what, ok = _task(entry, ref, other)
    within &= ok
    rows.append({"output": "(task)", "task": what, "ok": ok})
    if within:
        return "ok", rows
    if entry["kind"] != "int8" or not entry.get("fp32_of"):
        return "FAIL", rows
    fp32 = _load(work, ref_tag, entry["fp32_of"])
    no_worse = True
    for name, f in fp32.items():
        c_ref, c_other = _mean_cosine(ref[name], f), _mean_cosine(other[name], f)
        no_worse &= c_other >= c_ref - DRIFT_MARGIN
        rows.append({"output": name, "vs_fp32": f"mean cosine to fp32: {ref_tag} {c_ref:.4f}, {tag} {c_other:.4f}"})
    misses = _disagreements(entry["task"], fp32, ref), _disagreements(entry["task"], fp32, other)
    if misses[0] is not None:
        unit, total = ("face anchors", int((fp32["conf"][..., 1] > FACE_THRESHOLD).sum())) \
            if entry["task"] == "detection" else ("top-1 classes", len(next(iter(fp32.values()))))
        no_worse &= misses[1] <= misses[0] + max(1, round(0.05 * total))
        rows.append({"output": "(task)", "vs_fp32": f"{unit} unlike fp32's (of {total}): {ref_tag} {misses[0]}, "
                                                    f"{tag} {misses[1]}"})
    return ("drift" if no_worse else "FAIL"), rows


def _disagreements(task: str, fp32: dict, int8: dict) -> int | None:
    """How many detections (anchors over the face threshold) or top-1 classes differ from the fp32 model's."""
    if task == "detection":
        return int(((fp32["conf"][..., 1] > FACE_THRESHOLD) != (int8["conf"][..., 1] > FACE_THRESHOLD)).sum())
    if task == "classification":
        name = list(fp32)[0]
        return int((fp32[name].argmax(-1) != int8[name].argmax(-1)).sum())
    return None


def diff(work: Path, ref_tag: str, other_tags: list[str]) -> int:
    manifest = _manifest(work)
    failed = 0
    results: dict[str, dict] = {}
    for tag in other_tags:
        info_path = work / "outputs" / tag / "info.json"
        if not info_path.is_file():
            print(f"{tag}: no outputs (run `compare.py run` there first); skipped")
            continue
        info = json.loads(info_path.read_text())
        print(f"\n{tag} ({info['machine']}, onnxruntime {info['onnxruntime']}, {info['provider']}) vs {ref_tag}")
        print(f"{'model':28} {'output':18} {'max |diff|':>10} {'rel':>9} {'steps':>6} {'cosine':>10}")
        results[tag] = {}
        for entry in manifest["models"]:
            verdict, rows = _compare_model(work, entry, ref_tag, tag)
            failed += verdict == "FAIL"
            results[tag][entry["name"]] = {"verdict": verdict, "rows": rows}
            for r in rows:
                if "max_abs" in r:
                    st = f"{r['steps']:6.2f}" if r["steps"] is not None else f"{'-':>6}"
                    print(f"{entry['name']:28} {r['output']:18} {r['max_abs']:10.3e} {r['rel']:9.2e} {st} "
                          f"{r['cosine']:10.7f}")
                else:
                    print(f"{entry['name']:28} {r['output']:18} {r.get('error') or r.get('task') or r['vs_fp32']}")
            print(f"{entry['name']:28} -> {verdict}")
    tmp = work / "results.json.tmp"
    tmp.write_text(json.dumps({"reference": ref_tag, "results": results}, indent=1))
    os.replace(tmp, work / "results.json")
    verdicts = [m["verdict"] for r in results.values() for m in r.values()]
    if not verdicts:
        print(f"compare.py: error: none of {', '.join(other_tags)} has outputs under {work / 'outputs'}",
              file=sys.stderr)
        return 2
    print(f"\n{verdicts.count('ok')} ok, {verdicts.count('drift')} drift, {verdicts.count('FAIL')} FAIL "
          f"(drift: int8 rounding differs, accuracy vs fp32 the same within {DRIFT_MARGIN})")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every model of WORK/manifest.json, save outputs to WORK/outputs/TAG")
    r.add_argument("work", type=Path)
    r.add_argument("--tag", required=True)
    r.add_argument("--provider", default="CPUExecutionProvider")
    r.add_argument("--threads", type=int, default=1)
    d = sub.add_parser("diff", help="compare the outputs of OTHER tags with REF")
    d.add_argument("work", type=Path)
    d.add_argument("ref")
    d.add_argument("others", nargs="+")
    args = ap.parse_args()
    if args.cmd == "run":
        return run(args.work, args.tag, args.provider, args.threads)
    return diff(args.work, args.ref, args.others)


if __name__ == "__main__":
    sys.exit(main())
