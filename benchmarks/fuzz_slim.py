#!/usr/bin/env python
"""Fuzz ``slim`` on random conv graphs and count the invalid outputs (the promise: 0).

Hypothesis draws graphs from tests/graph_strategies.py (branches, residuals, Concat, Split,
depthwise, grouped, SE, NHWC transposes, Flatten->Gemm heads). Every example is checked twice:

- removal oracle: random prunable units are removed; the model must pass ``onnx.checker``,
  keep its interface, run in ONNX Runtime and equal the same units masked at their source;
- pipeline: ``onnxprune.slim`` at a random ratio must return a model that passes the checker and
  runs at another batch size, or refuse with an ``OnnxPruneError`` (nothing to prune is fine).

Failures are counted, not raised, so hypothesis never shrinks and the run covers all examples
(``derandomize`` off: each run draws new graphs). The first failing models of each kind are
saved to ``--save`` for reproduction.

Usage:  python benchmarks/fuzz_slim.py [--examples 10000] [--save DIR] [--seed S]
Not part of the CI test run: ~0.1-0.3 s per example.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune.errors import NothingToPruneError, OnnxPruneError, VerificationError  # noqa: E402
from onnxprune.verify import interface  # noqa: E402
from tests.graph_strategies import random_conv_model  # noqa: E402
from tests.oracle import analysed, close, random_selection, run  # noqa: E402
from tests.pattern_models import example_input  # noqa: E402

KINDS = ("checker", "interface", "ort", "oracle", "traceback", "verification")


class Tally:
    def __init__(self, save: Path | None, keep: int = 3) -> None:
        self.counts: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.examples = 0
        self.save, self.keep = save, keep
        self.first: dict[str, str] = {}

    def fail(self, kind: str, stage: str, proto: onnx.ModelProto, detail: str) -> None:
        self.counts[kind] += 1
        key = f"{stage}:{kind}"
        self.first.setdefault(key, detail.strip().splitlines()[-1][:300] if detail.strip() else "")
        if self.save is not None and self.counts[kind] <= self.keep:
            self.save.mkdir(parents=True, exist_ok=True)
            onnx.save(proto, str(self.save / f"{key.replace(':', '_')}_{self.counts[kind]}.onnx"))


def _valid(model: onnx.ModelProto, original: onnx.ModelProto, stage: str, tally: Tally) -> bool:
    """Passes the full checker and keeps the original's interface (else counted as a failure)."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        tally.fail("checker", stage, original, str(exc))
        return False
    if interface(model) != interface(original):
        tally.fail("interface", stage, original, "interface changed")
        return False
    return True


def _oracle(proto: onnx.ModelProto, feeds: dict, rng: np.random.Generator, p: float, keep_bias: bool,
            tally: Tally) -> None:
    """Remove random prunable units: valid, same interface, runs, equals the mask."""
    from onnxprune.graph.interface import restore_interface
    from onnxprune.passes import mask_channels, remove_channels
    import onnx_ir as ir
    model, analysis = analysed(proto, feeds, keep_bias=keep_bias)
    removed = random_selection(analysis, rng, p)
    pruned = restore_interface(ir.to_proto(remove_channels(model, analysis, removed)[0]), proto)
    if not _valid(pruned, proto, "oracle", tally):
        return
    try:
        got = run(pruned, feeds)
    except Exception as exc:
        return tally.fail("ort", "oracle", proto, str(exc))
    err = close(run(mask_channels(model, analysis, removed), feeds), got)
    if not err < 1e-5:
        tally.fail("oracle", "oracle", proto, f"pruned differs from masked by {err:.3g} ({len(removed)} units)")


def _pipeline(proto: onnx.ModelProto, ratio: float, tally: Tally) -> None:
    """The whole ``slim``: a valid model that runs at another batch, or a clear refusal."""
    try:
        result = onnxprune.slim(proto, ratio)
    except NothingToPruneError:
        tally.outcomes["nothing to prune"] += 1
        return
    except VerificationError as exc:  # the tool caught its own invalid graph: still a bug
        return tally.fail("verification", "pipeline", proto, str(exc))
    except OnnxPruneError as exc:
        tally.outcomes[f"refused: {str(exc)[:60]}"] += 1
        return
    out = result.model
    if not _valid(out, proto, "pipeline", tally):
        return
    feeds = example_input(proto, seed=1)
    feeds = {k: np.concatenate([v, v[:1]]) for k, v in feeds.items()}  # batch 3, not the analysis batch
    try:
        want, got = run(proto, feeds), run(out, feeds)
    except Exception as exc:
        return tally.fail("ort", "pipeline", proto, str(exc))
    if [w.shape for w in want] != [g.shape for g in got] or not all(np.isfinite(g).all() for g in got):
        return tally.fail("ort", "pipeline", proto, "output shapes changed or not finite")
    tally.outcomes["slimmed"] += 1


def fuzz(examples: int, tally: Tally, fixed_seed: int | None = None, progress_every: int = 500) -> None:
    start = time.perf_counter()

    @settings(max_examples=examples, derandomize=False, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(proto=random_conv_model(), s=st.integers(0, 2**16), p=st.floats(0.0, 0.9),
           ratio=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.9]))
    def target(proto: onnx.ModelProto, s: int, p: float, ratio: float) -> None:
        tally.examples += 1
        # The pipeline calls gc.collect() between stages (peak RSS on big models); on tiny graphs full
        # collections over every imported module's objects would dominate. Collect, then freeze what
        # survives: later collections scan only this example's objects. Same outputs, several times faster.
        gc.collect()
        gc.freeze()
        for stage, fn in (("oracle", lambda: _oracle(proto, example_input(proto, seed=s),
                                                     np.random.default_rng(s), p, s % 2 == 0, tally)),
                          ("pipeline", lambda: _pipeline(proto, ratio, tally))):
            try:
                fn()
            except Exception:
                tally.fail("traceback", stage, proto, traceback.format_exc())
        if tally.examples % progress_every == 0:
            rate = tally.examples / (time.perf_counter() - start)
            print(f"  {tally.examples} examples, {sum(tally.counts.values())} invalid ({rate:.1f}/s)", flush=True)

    (target if fixed_seed is None else seed(fixed_seed)(target))()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="hypothesis examples (default 10000)")
    parser.add_argument("--save", type=Path, help="write the first failing models of each kind here")
    parser.add_argument("--seed", type=int, help="fix hypothesis' seed (default: a new draw every run)")
    args = parser.parse_args(argv)
    tally = Tally(args.save)
    start = time.perf_counter()
    fuzz(args.examples, tally, args.seed)
    gc.unfreeze()  # let the interpreter free everything at exit
    gc.collect()
    seconds = time.perf_counter() - start
    invalid = sum(tally.counts.values())
    print(f"examples: {tally.examples} in {seconds:.0f} s ({tally.examples / max(seconds, 1e-9):.1f}/s)")
    print("pipeline outcomes: " + ", ".join(f"{k} {v}" for k, v in tally.outcomes.most_common()))
    print("invalid outputs: " + ", ".join(f"{k} {tally.counts[k]}" for k in KINDS) + f"; total {invalid}")
    for key, detail in tally.first.items():
        print(f"  first {key}: {detail}")
    return 1 if invalid else 0


if __name__ == "__main__":
    raise SystemExit(main())
