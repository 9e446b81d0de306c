#!/usr/bin/env python
"""Conv latency vs. channel count on ONNX Runtime's CPU EP -> default ``--round-to``.

Builds small float32 / opset-17 ONNX blocks that are typical of face models and
times every block at many channel widths on ONNX Runtime's CPU execution provider
(``--threads`` intra-op threads, default 1; ORT_ENABLE_ALL graph optimizations):

  a) conv3x3:   [Conv3x3(C->C, pad 1) + Relu] x 2                 @ 56x56
  b) mbconv:    Conv1x1(C->2C)+Relu, DW3x3(2C)+Relu, Conv1x1(2C->C) @ 28x28
  c) conv1x1:   Conv1x1(C->C)                                       @ 80x80

For every base width C0 in {32, 64, 128} the sweep covers C in [C0/2, C0].

Because the target machine has a few shared, noisy cores, all sessions are
created up front and timed round-robin (in a freshly shuffled order every round);
each sample is the mean of a small calibrated batch of ``run()`` calls, and only
medians over rounds are reported.  All ratios therefore come from the same run.

Usage:  python benchmarks/channel_rounding.py [--quick] [--threads T] [--repeats R]
"""
from __future__ import annotations

import argparse
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
BASE_WIDTHS = (32, 64, 128)
ROUND_CANDIDATES = (1, 2, 4, 8, 16, 32)


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class BlockSpec:
    name: str
    hw: int
    desc: str

    def macs(self, c: int) -> int:
        p = self.hw * self.hw
        if self.name == "conv3x3":
            return 2 * (c * c * 9) * p
        if self.name == "mbconv":
            return (c * 2 * c + 2 * c * 9 + 2 * c * c) * p
        if self.name == "conv1x1":
            return c * c * p
        raise ValueError(self.name)


BLOCKS = (
    BlockSpec("conv3x3", 56, "2x [Conv3x3 C->C pad1 + Relu] @56x56"),
    BlockSpec("mbconv", 28, "Conv1x1 C->2C, DW3x3 g=2C, Conv1x1 2C->C (+Relu) @28x28"),
    BlockSpec("conv1x1", 80, "Conv1x1 C->C @80x80"),
)


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> TensorProto:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    arr = (rng.standard_normal(shape) * math.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)
    return numpy_helper.from_array(arr, name)


def build_model(block: BlockSpec, c: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed + 7919 * c)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    cur = "x"

    def conv(inp: str, cin: int, cout: int, k: int, group: int = 1, relu: bool = True) -> str:
        i = len(nodes)
        w, b, out = f"w{i}", f"b{i}", f"conv{i}"
        inits.append(_init(rng, w, (cout, cin // group, k, k)))
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32) + 0.01, b))
        nodes.append(helper.make_node(
            "Conv", [inp, w, b], [out], kernel_shape=[k, k], pads=[k // 2] * 4,
            strides=[1, 1], group=group, name=f"Conv_{i}"))
        if not relu:
            return out
        nodes.append(helper.make_node("Relu", [out], [out + "_relu"], name=f"Relu_{i}"))
        return out + "_relu"

    if block.name == "conv3x3":
        cur = conv(cur, c, c, 3)
        cur = conv(cur, c, c, 3)
    elif block.name == "mbconv":
        cur = conv(cur, c, 2 * c, 1)
        cur = conv(cur, 2 * c, 2 * c, 3, group=2 * c)
        cur = conv(cur, 2 * c, c, 1, relu=False)
    elif block.name == "conv1x1":
        cur = conv(cur, c, c, 1, relu=False)
    else:
        raise ValueError(block.name)

    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    shape = [1, c, block.hw, block.hw]
    graph = helper.make_graph(
        nodes, f"{block.name}_c{c}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnxprune-bench")
    model.ir_version = min(model.ir_version, 9)  # loadable by older ORT too
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------- sweeps
def sweep_widths(c0: int, quick: bool) -> list[int]:
    lo = c0 // 2
    if quick:
        step = 4 if c0 <= 64 else 8
        ws = set(range(lo, c0 + 1, step))
        # a few odd / non-multiple widths for contrast with the rounded ones
        ws |= {lo + 1, (lo + c0) // 2 - 1, c0 - 2, c0 - 1}
    else:
        step = 1 if c0 <= 64 else 2
        ws = set(range(lo, c0 + 1, step))
        if step > 1:  # keep a few odd widths so N=1 vs N=2 can still be compared
            ws |= {lo + 1, lo + 15, (lo + c0) // 2 - 1, (lo + c0) // 2 + 1, c0 - 17, c0 - 1}
    return sorted(w for w in ws if lo <= w <= c0)


# --------------------------------------------------------------------------- timing
@dataclass
class Case:
    block: BlockSpec
    width: int
    sess: ort.InferenceSession
    feed: dict
    inner: int = 1
    samples: list[float] = field(default_factory=list)

    def run_batch(self) -> float:
        run, feed, n = self.sess.run, self.feed, self.inner
        t0 = time.perf_counter()
        for _ in range(n):
            run(None, feed)
        return (time.perf_counter() - t0) / n

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1e3

    @property
    def iqr_pct(self) -> float:
        if len(self.samples) < 4:
            return float("nan")
        q = statistics.quantiles(self.samples, n=4)
        return 100.0 * (q[2] - q[0]) / statistics.median(self.samples)


def make_session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def cpu_info() -> tuple[str, bool, bool]:
    model_name, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and model_name in ("unknown", "", platform.processor()):
                    model_name = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    return model_name, "avx512f" in flags, "avx2" in flags


# --------------------------------------------------------------------------- analysis
def next_multiple_above(c: int, n: int) -> int:
    """Smallest multiple of n strictly greater than c if c is a multiple, else ceil to n."""
    return (c // n + 1) * n


def fmt_frac(k: int, tot: int) -> str:
    return f"{k}/{tot}" if tot else "-"


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer widths/rounds (< ~60 s)")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="round-robin rounds per width (default 51, quick: 21)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up runs per session")
    ap.add_argument("--min-sample-ms", type=float, default=None,
                    help="batch run() calls until one sample takes >= this (default 4, quick: 2)")
    ap.add_argument("--tol", type=float, default=0.03,
                    help="relative noise tolerance for 'slower' comparisons (default 0.03)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    repeats = args.repeats or (21 if args.quick else 51)
    min_sample = (args.min_sample_ms or (2.0 if args.quick else 4.0)) / 1e3
    tol = args.tol

    t_start = time.perf_counter()
    name, avx512, avx2 = cpu_info()
    print(f"CPU: {name} | avx512f: {'yes' if avx512 else 'no'} | avx2: {'yes' if avx2 else 'no'}"
          f" | logical cpus: {__import__('os').cpu_count()}")
    print(f"onnxruntime {ort.__version__} (CPUExecutionProvider) | onnx {onnx.__version__} | "
          f"numpy {np.__version__} | python {platform.python_version()}")
    print(f"mode: {'quick' if args.quick else 'full'} | intra-op threads: {args.threads} | "
          f"ORT_ENABLE_ALL | rounds: {repeats} | min sample: {min_sample * 1e3:.1f} ms | "
          f"tol: {tol:.0%}")
    print("statistic: median over round-robin rounds (shuffled order each round); each sample is the"
          " mean of a calibrated batch of run() calls")
    sys.stdout.flush()

    # ---- build every (block, width) session once; widths shared between sweeps reuse it
    sweeps = {c0: sweep_widths(c0, args.quick) for c0 in BASE_WIDTHS}
    all_widths = sorted(set().union(*sweeps.values()))
    rng = np.random.default_rng(args.seed)
    cases: dict[tuple[str, int], Case] = {}
    for blk in BLOCKS:
        for c in all_widths:
            sess = make_session(build_model(blk, c, args.seed), args.threads)
            x = rng.standard_normal((1, c, blk.hw, blk.hw)).astype(np.float32)
            cases[(blk.name, c)] = Case(blk, c, sess, {"x": x})

    # ---- warm-up + calibrate inner batch size so a sample is >= min_sample
    for case in cases.values():
        for _ in range(args.warmup):
            case.sess.run(None, case.feed)
        est = min(case.run_batch() for _ in range(3))
        case.inner = max(1, math.ceil(min_sample / max(est, 1e-6)))
    t_setup = time.perf_counter() - t_start
    print(f"models: {len(cases)} ({len(BLOCKS)} blocks x {len(all_widths)} widths), "
          f"setup {t_setup:.1f} s")
    sys.stdout.flush()

    # ---- interleaved measurement
    order = list(cases.values())
    shuffler = random.Random(args.seed)
    t0 = time.perf_counter()
    for r in range(repeats):
        shuffler.shuffle(order)
        for case in order:
            case.samples.append(case.run_batch())
    print(f"timing: {time.perf_counter() - t0:.1f} s")

    # ---- per-sweep tables
    # records: (block, c0, c, lat_ms, lat_ratio, mac_ratio, eff)
    lat: dict[tuple[str, int], float] = {k: v.median_ms for k, v in cases.items()}
    records = []
    for blk in BLOCKS:
        for c0 in BASE_WIDTHS:
            full = lat[(blk.name, c0)]
            print()
            print(f"== {blk.name} ({blk.desc}), C0={c0}, full-width median {full:.3f} ms")
            print(f"{'C':>5} {'mult':>4} {'median ms':>10} {'IQR%':>6} {'lat/C0':>7} "
                  f"{'MAC/C0':>7} {'eff':>6}  note")
            for c in sweeps[c0]:
                case = cases[(blk.name, c)]
                lr = lat[(blk.name, c)] / full
                mr = blk.macs(c) / blk.macs(c0)
                eff = lr / mr
                mult = max(n for n in ROUND_CANDIDATES if c % n == 0)
                notes = []
                if c < c0 and lr > 1 + tol:
                    notes.append("SLOWER than C0")
                m16 = next_multiple_above(c, 16)
                if c % 16 and m16 <= c0 and (blk.name, m16) in lat and \
                        lat[(blk.name, c)] > lat[(blk.name, m16)] * (1 + tol):
                    notes.append(f"slower than C={m16}")
                print(f"{c:>5} {mult:>4} {case.median_ms:>10.3f} {case.iqr_pct:>5.1f}% "
                      f"{lr:>7.3f} {mr:>7.3f} {eff:>6.2f}  {', '.join(notes)}")
                records.append((blk.name, c0, c, lat[(blk.name, c)], lr, mr, eff))

    # ---- per-N summary
    def summarize(recs, label: str):
        print()
        print(f"== rounding summary [{label}]  (eff = latency ratio / MAC ratio; lower is better;"
              f" C=C0 rows excluded from eff; 'slower' means > {tol:.0%} slower)")
        print(f"{'N':>3} {'#mult':>6} {'eff mult':>9} {'eff other':>9} "
              f"{'C>next mult':>12} {'C>C0':>8} {'mult>wider mult':>16} {'no-gain step':>13}")
        results = {}
        groups = sorted({(b, c0) for b, c0, *_ in recs})
        for n in ROUND_CANDIDATES:
            eff_m, eff_o = [], []
            slow_next = tot_next = slow_full = tot_full = 0
            viol = pairs = 0
            flat = flat_tot = 0
            for b, c0 in groups:
                rows = {c: (l, e) for bb, cc0, c, l, _, _, e in recs if bb == b and cc0 == c0}
                full = rows[c0][0]
                for c, (l, e) in rows.items():
                    if c == c0:
                        continue
                    (eff_m if c % n == 0 else eff_o).append(e)
                    tot_full += 1
                    slow_full += l > full * (1 + tol)
                    m = next_multiple_above(c, n)
                    if m in rows:
                        tot_next += 1
                        slow_next += l > rows[m][0] * (1 + tol)
                mults = sorted(c for c in rows if c % n == 0)
                for a in mults:
                    if a + n in rows:  # pruning n more channels bought (almost) nothing
                        flat_tot += 1
                        flat += rows[a][0] >= rows[a + n][0] * (1 - tol)
                for i, a in enumerate(mults):
                    for bw in mults[i + 1:]:
                        pairs += 1
                        viol += rows[a][0] > rows[bw][0] * (1 + tol)
            results[n] = dict(eff=med(eff_m), eff_other=med(eff_o), viol=viol, pairs=pairs,
                              n_mult=len(eff_m))
            print(f"{n:>3} {len(eff_m):>6} {med(eff_m):>9.3f} {med(eff_o):>9.3f} "
                  f"{fmt_frac(slow_next, tot_next):>12} {fmt_frac(slow_full, tot_full):>8} "
                  f"{fmt_frac(viol, pairs):>16} {fmt_frac(flat, flat_tot):>13}")
        valid = {n: r for n, r in results.items() if r["n_mult"] > 0 and not math.isnan(r["eff"])}
        best = min(r["eff"] for r in valid.values())
        ok = [n for n, r in valid.items() if r["viol"] == 0 and r["eff"] <= best * 1.10]
        rec = min(ok) if ok else None
        return rec, results, best

    for blk in BLOCKS:
        rec, _, _ = summarize([r for r in records if r[0] == blk.name], blk.name)
        print(f"   -> {blk.name}: smallest qualifying N = {rec if rec else 'none'}")
    rec, results, best = summarize(records, "all blocks")
    print()
    if rec is None:
        fallback = min(results, key=lambda n: (results[n]["viol"] / max(results[n]["pairs"], 1),
                                               results[n]["eff"]))
        print(f"RECOMMENDATION: no N satisfies 'multiples never slower than a wider multiple "
              f"(tol {tol:.0%})' AND 'eff within 10% of best ({best:.3f})'; least-violating N = "
              f"{fallback} -> --round-to {fallback}")
    else:
        r = results[rec]
        print(f"RECOMMENDATION: --round-to {rec}  (smallest N with 0/{r['pairs']} multiple-vs-wider-"
              f"multiple inversions at tol {tol:.0%} and median eff {r['eff']:.3f} within 10% of "
              f"best {best:.3f})")
    print("legend: 'C>next mult' = narrower widths slower than the next-larger multiple of N; "
          "'C>C0' = narrower widths slower than full width;\n        'mult>wider mult' = pairs of "
          "multiples where the narrower is slower; 'no-gain step' = multiples of N (C+N measured) "
          "not faster than C+N by > tol.")
    print("        eff relative to best (rule: <= 1.100x): " + ", ".join(
        f"N={n}: {results[n]['eff'] / best:.3f}x" for n in ROUND_CANDIDATES
        if not math.isnan(results[n]['eff'])))
    print(f"total wall time {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
