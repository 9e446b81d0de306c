"""CLI: ``python -m onnxprune.sample_models list|fetch [NAMES...]|generate [NAMES...] [--cache-dir D]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

from . import FETCHED, GENERATED, describe, names, sample_path
from .fetch import sha256_file


def _report(name: str, cache_dir: Path | None) -> None:
    path = sample_path(name, cache_dir)
    model = onnx.load(path)
    floats = (t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    params = sum(int(np.prod(t.dims)) for t in floats)
    print(f"{name}\t{path}\tparams={params}\tsha256={sha256_file(path)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onnxprune.sample_models", description=__doc__)
    ap.add_argument("command", choices=["list", "fetch", "generate"])
    ap.add_argument("names", nargs="*", help="models (default: all of that kind)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="default: $ONNXPRUNE_CACHE or ~/.cache/onnxprune/models")
    args = ap.parse_args(argv)
    try:
        if args.command == "list":
            for n in args.names or names():
                print(describe(n))
            return 0
        pool = FETCHED if args.command == "fetch" else GENERATED
        for n in args.names or list(pool):
            if n not in pool:
                raise KeyError(f"{n!r} is not a {args.command}able model; choose from: {', '.join(pool)}")
            _report(n, args.cache_dir)
    except Exception as e:  # noqa: BLE001 - CLI contract: one line, exit 1
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
