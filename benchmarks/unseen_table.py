#!/usr/bin/env python
"""The README's model x verb table: every CLI verb on models onnxprune was not developed against.

Runs the harness of ``tests/test_unseen.py`` (calibration photos from ../shared/data/faces, no
--preset) on the unseen-model builders and the real models, and prints one Markdown row per model:
the outcome of analyze, slim --ratio 0.3, quantize and check, with the fidelity task and its headline
value on held-out photos (the generated models have random weights: their values say that the task
was recognised, not how good compression is).

    python benchmarks/unseen_table.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package, from any directory

from onnxprune.sample_models import SampleUnavailable  # noqa: E402
from tests.unseen_harness import PHOTOS, REAL, VERBS, expected_task, run_verbs  # noqa: E402
from tests.unseen_models import UNSEEN  # noqa: E402


def _cell(outcome) -> str:
    mark = {"ok": "ok", "unprunable": "unprunable", "failed": "**failed**"}[outcome.status]
    return f"{mark} {outcome.detail}".strip() if outcome.verb in ("slim", "quantize") or outcome.status != "ok" \
        else mark


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
        outcomes = run_verbs(model, PHOTOS, root / name / "work", expected_task(name))
        print(f"| {name} | " + " | ".join(_cell(outcomes[v]) for v in VERBS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
