#!/usr/bin/env python
"""Does pruning keep same-person pairs above different-person pairs? Trained MobileFaceNet, real identities.

The aligned crops in ../shared/data/faces112 whose source photos sit under
../shared/data/faces/identities/<person>/ have known identities. Calibration uses only the other
crops, so the identities are never seen while pruning. For the original and each pruned model it
prints verification AUC, best-threshold accuracy and FNMR at FMR 10% over all pairs, and the mean
embedding cosine to the original on the identity crops.

    python benchmarks/identity_ordering.py [--finetune-steps N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxprune
from onnxprune.calibration import CalibrationSet, load_calibration
from onnxprune.fidelity import embedding_fidelity, verification

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _identity_crops() -> tuple[list[Path], list[str]]:
    crops, labels, seen = [], [], {}
    for person in sorted((SHARED / "data" / "faces" / "identities").iterdir()):
        for photo in sorted(person.iterdir()):
            seen.setdefault(photo.stem, set()).add(person.name)
    for stem, people in sorted(seen.items()):
        crop = SHARED / "data" / "faces112" / f"{stem}_0.png"
        if len(people) == 1 and crop.exists():  # a stem shared by two people (img1) is ambiguous
            crops.append(crop)
            labels.append(next(iter(people)))
    return crops, labels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finetune-steps", type=int, default=0)
    args = ap.parse_args()
    model_path = SHARED / "models" / "mobilefacenet_paddle.onnx"
    if not model_path.exists():
        print("../shared is not available")
        return 1
    model = onnx.load(str(model_path))
    crops, labels = _identity_crops()
    everything = load_calibration(SHARED / "data" / "faces112", model, preset="arcface", count=1000)
    keep = [i for i, f in enumerate(everything.files) if Path(f) not in set(crops)]
    samples = everything.samples()
    calib = CalibrationSet(everything.name, [samples[keep]], [everything.files[i] for i in keep], everything.preprocess, [])
    ident = np.stack([samples[everything.files.index(str(c))] for c in crops])
    print(f"{len(crops)} identity crops of {len(set(labels))} people ({sum(labels.count(p) > 1 for p in set(labels))} "
          f"with pairs); calibration on the other {len(keep)} crops")

    def emb(m: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": ident})[0]

    ref = emb(model)
    print(f"{'model':22s} {'AUC':>6s} {'acc':>6s} {'FNMR@FMR10%':>12s} {'cos to orig':>12s}")
    rows = [("original", ref)]
    for ratio in (0.3, 0.5, 0.69):
        for cal in (None, calib):
            res = onnxprune.slim(model, ratio, calibration=cal, holdout=0.0 if cal else 0.25,
                                 finetune_steps=args.finetune_steps if cal else 0)
            rows.append((f"slim {ratio} {'calib' if cal else 'weights'}", emb(res.model)))
    for name, e in rows:
        v = verification(e, labels, fmr=(0.1,))
        cos = embedding_fidelity(ref, e)["mean_cosine"]
        print(f"{name:22s} {v['auc']:6.3f} {v['accuracy']:6.3f} {v['fnmr@fmr=0.1']:12.3f} {cos:12.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
