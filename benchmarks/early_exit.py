#!/usr/bin/env python
"""Early exit on static frames: frames skipped, faces missed and frame time per noise level, as Markdown.

For each model (the trained RetinaFace-mnet0.25 and the generated SCRFD-like sample), ``onnxprune.gate``
is calibrated on photos from ../shared/data/faces (the three still scenes and the other photos, 640x480),
then the gated model and the ungated one run side by side (same process, same decoded frame, alternating
order, one thread) over SYNTHETIC static-camera sequences: three still scenes cut from those photos, a face
from ../shared/data/faces112 entering, moving, standing and leaving, 80% of the frames static, at each
noise level of ``onnxprune.video.synthetic.LEVELS`` (the gate is calibrated for ``high``; ``extreme`` is
beyond it). Frame time is preprocessing + model + decoding; "model" is the ONNX Runtime call alone.
A missed face is one the ungated detector finds (score > 0.5) with no gated box at IoU >= 0.5; "on the
face" counts those whose centre lies on the pasted face (a face really there), the rest are boxes the
ungated detector fires on a noisy empty scene for one frame, which the gated one did not carry.
The SCRFD-like model has random weights: it fires ~4000 boxes per frame whose NMS takes ~0.5 s, so it is
not decoded and its missed faces are not counted (its frame time is preprocessing + model).

    python benchmarks/early_exit.py [--frames 150] [--levels clean,...,extreme] [--calib-noise high] [--min-face 32]
                                   [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.sample_models import sample_path  # noqa: E402
from onnxprune.video import Detector, GatedDetector, GateOptions, gate  # noqa: E402
from onnxprune.video.run import on_face, unmatched  # noqa: E402
from onnxprune.video.synthetic import LEVELS, SCENES, load_rgb, scene_from_photo, sequence  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FACES = ("angelina_jolie_0.png", "biden_0.png", "deepface-stock-2_1.png")
MODELS = {"retinaface-mnet025": True, "scrfd": False}  # name -> decode (trained weights)


def calibration_frames(folder: Path) -> Path:
    """The still scenes and a 4:3 crop of every other photo, 640x480 (a camera calibrates on its own frames)."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for name, (photo, box) in SCENES.items():
        Image.fromarray(scene_from_photo(DATA / "faces" / photo, box)).save(folder / f"scene-{name}.png")
    for photo in sorted((DATA / "faces").glob("*.jpg")):
        with Image.open(photo) as im:
            w, h = im.size
        cw, ch = min(w, h * 4 // 3), min(h, w * 3 // 4)
        box = ((w - cw) / 2 / w, (h - ch) / 2 / h, (w + cw) / 2 / w, (h + ch) / 2 / h)
        Image.fromarray(scene_from_photo(photo, box)).save(folder / f"photo-{photo.stem}.png")
    return folder


def run_level(gated_path: Path, original: Path, level: str, frames: int, decode: bool) -> dict:
    """Every scene's sequence at ``level`` through both detectors; per-frame numbers pooled."""
    rows = {"ran": [], "ms": [], "model_ms": [], "base_ms": [], "base_model_ms": [], "missed": [], "lost": [],
            "faces": [], "moving": []}
    for i, (scene, (photo, box)) in enumerate(SCENES.items()):
        background = scene_from_photo(DATA / "faces" / photo, box)
        seq = sequence(background, load_rgb(DATA / "faces112" / FACES[i]), frames=frames, static=0.8,
                       level=LEVELS[level], seed=i, description={"scene": scene})
        gated = GatedDetector(gated_path, decode=decode)
        base = Detector(original, preprocess=gated.preprocess, decode=decode, heads=gated.info.heads)
        first = seq.frame(0)
        gated.warmup(first)
        base.warmup(first)
        for k in range(len(seq)):
            frame = seq.frame(k)
            if k % 2:
                b, g = base.process(frame), gated.process(frame)
            else:
                g, b = gated.process(frame), base.process(frame)
            rows["ran"].append(g.ran_head)
            rows["ms"].append(g.ms)
            rows["model_ms"].append(g.model_ms)
            rows["base_ms"].append(b.ms)
            rows["base_model_ms"].append(b.model_ms)
            lost = unmatched(b.detections, g.detections) if decode else []
            rows["missed"].append(len(lost))
            rows["lost"].append(sum(on_face(b.detections[j], seq.faces[k]) for j in lost))
            rows["faces"].append(len(b.detections))
            rows["moving"].append(seq.moving[k])
    return rows


def summarise(model: str, level: str, rows: dict, decode: bool) -> dict:
    ran, moving = np.array(rows["ran"]), np.array(rows["moving"])
    ms, base = np.array(rows["ms"]), np.array(rows["base_ms"])
    missed_n, lost = int(np.sum(rows["missed"])), np.array(rows["lost"])
    return {"model": model, "noise": level, "frames": len(ran), "static": round(float(1 - moving.mean()), 3),
            "skipped": round(float(1 - ran.mean()), 3), "moving_frames_skipped": int(np.sum(moving & ~ran)),
            "missed_faces": missed_n if decode else None, "baseline_faces": int(np.sum(rows["faces"])) if decode else None,
            "missed_on_face": int(lost.sum()) if decode else None,
            "frames_face_lost": int(np.sum(lost > 0)) if decode else None,
            "mean_ms": round(float(ms.mean()), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2),
            "baseline_mean_ms": round(float(base.mean()), 2), "baseline_p90_ms": round(float(np.percentile(base, 90)), 2),
            "time_ratio": round(float(ms.mean() / base.mean()), 3),
            "model_ratio": round(float(np.mean(rows["model_ms"]) / np.mean(rows["base_model_ms"])), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=150, help="frames per sequence (three sequences per level)")
    parser.add_argument("--levels", default=",".join(LEVELS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--calib-noise", default="high", choices=list(LEVELS),
                        help="the nuisance the gate is calibrated to ignore (default high)")
    parser.add_argument("--min-face", type=int, default=GateOptions.min_face,
                        help=f"gate option (default {GateOptions.min_face})")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if not (DATA / "faces").is_dir():
        print(f"needs the photos in {DATA}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="onnxprune-early-exit-"))
    calib = calibration_frames(work / "calib")
    results, notes = [], []
    for model in args.models.split(","):
        original = sample_path(model)
        built = gate(original, calib, options=GateOptions(noise=LEVELS[args.calib_noise], min_face=args.min_face))
        gated_path = work / f"{model}.gated.onnx"
        built.save(gated_path)
        r = built.report
        notes.append(f"- {model}: split {r.split.name} {'x'.join(map(str, r.split.shape))} "
                     f"({r.split.prefix_share:.0%} of the MACs), change/noise {r.split.ratio:.2f}, threshold "
                     f"{r.threshold:.3g}, update rate {r.rate:.3g}; one frame: {r.original_ms:.1f} ms ungated, "
                     f"{r.skip_ms:.1f} ms gated and shut, {r.head_ms:.1f} ms gated and open")
        for level in args.levels.split(","):
            rows = run_level(gated_path, original, level, args.frames, MODELS[model])
            results.append(summarise(model, level, rows, MODELS[model]))
            print(f"{model} {level}: {results[-1]}", file=sys.stderr, flush=True)
    print("SYNTHETIC sequences (onnxprune.video.synthetic; photos from ../shared/data, not camera footage), "
          f"1 thread, one run; gate calibrated for noise {args.calib_noise}, --min-face {args.min_face}\n")
    print("| model | noise | frames (static) | head skipped | moving frames skipped | ungated boxes missed: on the "
          "face / elsewhere / all | gated mean / p90 ms | ungated mean / p90 ms | mean time ratio | model-only ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        miss = "n/a (random weights)" if r["missed_faces"] is None else \
            f"{r['missed_on_face']} / {r['missed_faces'] - r['missed_on_face']} / {r['baseline_faces']}"
        print(f"| {r['model']} | {r['noise']} | {r['frames']} ({r['static']:.0%}) | {r['skipped']:.0%} | "
              f"{r['moving_frames_skipped']} | {miss} | {r['mean_ms']:.1f} / {r['p90_ms']:.1f} | "
              f"{r['baseline_mean_ms']:.1f} / {r['baseline_p90_ms']:.1f} | {r['time_ratio']:.2f}x | "
              f"{r['model_ratio']:.2f}x |")
    print("\n" + "\n".join(notes))
    if args.json:
        Path(args.json).write_text(json.dumps({"synthetic": True, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
