#!/usr/bin/env python
"""The README's model x verb table: every CLI verb on models onnxprune was not developed against.

Runs the harness of ``tests/test_unseen.py`` (calibration photos from ../shared/data/faces, no
--preset) on the unseen-model builders and the real models, and prints one Markdown row per model:
the outcome of analyze, slim --ratio 0.3, quantize and check, with the fidelity task and, for
trained weights, its headline value on held-out photos (generated models have random weights: for
them only the task says something, that their heads were recognised).

    python benchmarks/unseen_table.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package, from any directory

from onnxprune.sample_models import SampleUnavailable  # noqa: E402
from tests.unseen_harness import REAL, VERBS, expected_task, photos_for, run_verbs  # noqa: E402
from tests.unseen_models import UNSEEN  # noqa: E402


def _cell(outcome, trained: bool) -> str:
    """The outcome; for slim/quantize the fidelity task, and its value on held-out photos where the
    weights are trained (random weights fire on most anchors of a real photo: their AP is noise)."""
    mark = {"ok": "ok", "unprunable": "unprunable", "failed": "**failed**"}[outcome.status]
    if outcome.status != "ok" or outcome.verb not in ("slim", "quantize"):
        return f"{mark} {outcome.detail}".strip() if outcome.status != "ok" else mark
    task, _, value = outcome.detail.partition(" ")
    return f"ok, {task} {value}" if trained else f"ok, {task}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="keep the outputs here (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="onnxprune-unseen-"))
    print("| model | " + " | ".join(VERBS) + " |")
    print("|---|" + "---|" * len(VERBS))
    for name in [*UNSEEN, *REAL]:
        try:
            model = REAL[name].path() if name in REAL else UNSEEN[name].build(root / name / "model")
        except SampleUnavailable as exc:
            print(f"| {name} | unavailable: {exc} |")
            continue
        outcomes = run_verbs(model, photos_for(name), root / name / "work", expected_task(name))
        trained = name in REAL or UNSEEN[name].family == "mtcnn"  # facenet-pytorch's real weights
        print(f"| {name} | " + " | ".join(_cell(outcomes[v], trained) for v in VERBS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
