#!/usr/bin/env python
"""How `slim` and `analyze` grow with model size: wall time and peak RSS on an iResNet-100 ladder.

Generates iResNet-100-style recognizers (blocks 3/13/30/3) at widths 1/8, 1/4, 1/2 and 1, about
1M, 4M, 16M and 65M parameters, saved with external data, and runs each command in a fresh
process (`python -m onnxprune ...`), reading that process's own peak RSS from ``os.wait4``.
The contract for the 65M model (~260 MB): `slim --ratio 0.5` under 5 minutes on 2 cores with
peak RSS under 3x the model's size, `analyze` under 30 s.

    python benchmarks/slim_scale.py [--dir DIR] [--calib /work/shared/data/faces112] [--huge] [--keep]

``--no-simplify`` columns isolate the pipeline itself: onnxsim runs only below 128 MiB of
weights (it holds several copies; this onnxsim build also imports torch), so the default column
steps between 16M and 65M. ``--huge`` also builds a model above protobuf's 2 GB limit (a Gemm
chain) and checks that it loads, prunes and saves with external data. Generated files are
deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.sample_models.generate import iresnet100

WIDTHS = (0.125, 0.25, 0.5, 1.0)


def _save_external(model: onnx.ModelProto, path: Path) -> int:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data")
    return path.stat().st_size + (path.parent / (path.name + ".data")).stat().st_size


def _generate(kind: str, path: Path) -> tuple[int, int]:
    """Build a model in a child process: a child's peak RSS includes its parent's at fork, so the
    measuring process must stay small. Returns (parameters, bytes on disk)."""
    out = subprocess.run([sys.executable, __file__, "--generate", kind, str(path)], check=True, text=True,
                         capture_output=True).stdout.split()
    return int(out[0]), int(out[1])


def _generate_main(kind: str, path: Path) -> None:
    if kind == "huge":
        params, size = _huge_gemm_model(path)
    else:
        model = iresnet100(float(kind))
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        size = _save_external(model, path)
    print(params, size)


def _measure(args: list[str]) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (MiB) and exit code of ``python -m onnxprune ARGS`` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "onnxprune", *args, "-q"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().strip() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_maxrss / 1024, proc.returncode, err


def _check_output(path: Path, batch_input: str, shape: tuple[int, ...]) -> None:
    """In a child process (see :func:`_generate`): the output passes the checker and runs in ORT."""
    subprocess.run([sys.executable, __file__, "--check", str(path), batch_input, "x".join(map(str, shape))],
                   check=True)


def _check_main(path: Path, batch_input: str, shape: tuple[int, ...]) -> None:
    import onnxruntime as ort
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {batch_input: np.zeros(shape, np.float32)})[0]
    assert np.isfinite(out).all()


def _huge_gemm_model(path: Path, hidden: int = 16384, features: int = 1024, out: int = 512) -> tuple[int, int]:
    """A Gemm chain above 2 GB (protobuf's limit), built with onnx-ir and written with external data."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="input", shape=ir.Shape(["N", features]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, inits, cur, cin = [], [], x, features
    for i, cout in enumerate((hidden, hidden, hidden, out)):
        w = rng.standard_normal((cout, cin), dtype=np.float32)
        w *= np.float32(np.sqrt(1.0 / cin))
        wv = ir.Value(name=f"fc{i}.weight", const_value=ir.tensor(w, name=f"fc{i}.weight"),
                      shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT))
        b = (0.05 * rng.standard_normal(cout)).astype(np.float32)
        bv = ir.Value(name=f"fc{i}.bias", const_value=ir.tensor(b, name=f"fc{i}.bias"),
                      shape=ir.Shape(b.shape), type=ir.TensorType(ir.DataType.FLOAT))
        inits += [wv, bv]
        gemm = ir.node("Gemm", [cur, wv, bv], {"transB": 1}, name=f"fc{i}", num_outputs=1)
        nodes.append(gemm)
        cur = gemm.outputs[0]
        if i < 3:
            relu = ir.node("Relu", [cur], name=f"relu{i}", num_outputs=1)
            nodes.append(relu)
            cur = relu.outputs[0]
        cin = cout
    cur.name, cur.shape, cur.type = "embedding", ir.Shape(["N", out]), ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [cur], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="huge_mlp")
    ir.save(ir.Model(graph, ir_version=8), path, external_data=path.name + ".data")
    params = sum(v.const_value.size for v in inits)
    return params, path.stat().st_size + (path.parent / (path.name + ".data")).stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to write the generated models (default: a temp dir on /work or /tmp)")
    parser.add_argument("--calib", help="also run slim with --calib on this image folder (112x112 face crops)")
    parser.add_argument("--calib-count", type=int, default=16)
    parser.add_argument("--huge", action="store_true", help="also prune a >2 GB Gemm model (needs ~8 GB RAM, 6 GB disk)")
    parser.add_argument("--widths", default=",".join(str(w) for w in WIDTHS))
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    parser.add_argument("--generate", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--check", nargs=3, metavar=("PATH", "INPUT", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check:
        _check_main(Path(args.check[0]), args.check[1], tuple(int(d) for d in args.check[2].split("x")))
        return 0
    if args.generate:
        _generate_main(args.generate[0], Path(args.generate[1]))
        return 0
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="slim_scale_",
                                                                 dir="/work" if os.access("/work", os.W_OK) else None))
    root.mkdir(parents=True, exist_ok=True)
    print(f"models in {root}; {os.cpu_count()} cores; each command in a fresh process", flush=True)
    cols = ["params", "size MB", "analyze s", "analyze MiB", "slim s", "slim MiB", "RSS/size",
            "no-simplify s", "no-simplify MiB"] + (["calib s", "calib MiB", "calib RSS/size"] if args.calib else [])
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols), flush=True)
    failures = 0
    try:
        for width in (float(w) for w in args.widths.split(",")):
            path = root / f"iresnet100_w{width:g}.onnx"
            params, size = _generate(str(width), path)
            out = root / f"iresnet100_w{width:g}.slim.onnx"
            row = [f"{params / 1e6:.1f}M", f"{size / 1e6:.0f}"]
            runs = [["analyze", str(path)], ["slim", str(path), "--ratio", "0.5", "-o", str(out)],
                    ["slim", str(path), "--ratio", "0.5", "-o", str(out), "--no-simplify"]]
            if args.calib:
                runs.append(["slim", str(path), "--ratio", "0.5", "-o", str(out), "--calib", args.calib,
                             "--preset", "arcface", "--calib-count", str(args.calib_count)])
            for i, cmd in enumerate(runs):
                seconds, peak, code, err = _measure(cmd)
                if code != 0:
                    failures += 1
                    print(f"  {' '.join(cmd)} failed ({code}): {err[-300:]}", file=sys.stderr)
                row += [f"{seconds:.1f}", f"{peak:.0f}"]
                if cmd[0] == "slim" and code == 0:
                    _check_output(out, "input", (1, 3, 112, 112))
                if i == 1 or i == 3:
                    row.append(f"{peak * 2**20 / size:.2f}")
            print(" | ".join(row), flush=True)
            if not args.keep:
                for p in root.glob(f"iresnet100_w{width:g}*"):
                    p.unlink()
        if args.huge:
            path = root / "huge_mlp.onnx"
            params, size = _generate("huge", path)
            out = root / "huge_mlp.slim.onnx"
            seconds, peak, code, err = _measure(["slim", str(path), "--ratio", "0.5", "-o", str(out)])
            print(f"\n>2 GB Gemm chain ({params / 1e6:.0f}M params): {size / 1e9:.2f} GB -> slim exit {code}, {seconds:.1f} s, "
                  f"peak {peak:.0f} MiB" + (f"\n  {err[-300:]}" if code else ""), flush=True)
            if code == 0:
                data = out.parent / (out.name + ".data")
                _check_output(out, "input", (1, 1024))
                print(f"  output {(out.stat().st_size + data.stat().st_size) / 1e9:.2f} GB with external data "
                      f"({data.name}); checker and ORT run OK")
            else:
                failures += 1
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
