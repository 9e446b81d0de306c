"""Running a model in ONNX Runtime the way every stage does: one session builder, one batching rule."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ..errors import ConfigError
from .shapes import graph_inputs


# Models above this size reach ORT as a file with external data, which it reads tensor by tensor,
# instead of serialised bytes it parses whole: two transient copies of the weights less.
BY_PATH_BYTES = 64 * 2**20


_default_threads = 0  # 0: ORT's default (all cores); executor workers set 1, see use_threads


def use_threads(n: int) -> None:
    """Default intra-op threads of later sessions in this process (0 = all cores).

    Worker processes of an executor run one job per CPU: each job's sessions must then stay on
    one thread, or N workers start N x cores threads that fight over the same cores.
    """
    global _default_threads
    _default_threads = max(0, int(n))


CPU = "CPUExecutionProvider"


def session(model: onnx.ModelProto | str | os.PathLike, threads: int = 0, *, optimize: bool = True,
            providers: Sequence[str] = (CPU,), spinning: bool = True, optimized_path: str | None = None,
            profile_prefix: str | None = None, big_by_path: bool = True) -> ort.InferenceSession:
    """A quiet session: every ONNX Runtime session onnxprune opens is made here.

    ``threads`` > 0 pins the intra-op pool to that many threads and the inter-op pool to one
    (benchmarks and checks use 1); 0 takes :func:`use_threads`' default. ``optimize`` False turns
    ORT's graph optimisations off. ``providers`` are tried in order, CPU appended as the fallback.
    ``spinning`` False stops idle intra-op workers spinning between runs (with more than one thread):
    timed side by side, that spinning would steal cores from the next model. ``optimized_path``
    saves the graph ORT optimised; ``profile_prefix`` turns ORT's profiler on, writing there.

    A path lets ORT read external data itself, without a serialised copy of the weights; a
    ModelProto above :data:`BY_PATH_BYTES` is written to a temporary folder and opened the same way
    (``big_by_path`` False: passed as serialised bytes whatever its size).
    """
    opts = _options(threads or _default_threads, optimize, spinning, optimized_path, profile_prefix)
    chain = list(providers) + [CPU] * (CPU not in providers)
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), opts, providers=chain)
    if not big_by_path or model.ByteSize() <= BY_PATH_BYTES:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=chain)
    with tempfile.TemporaryDirectory(prefix="onnxprune-session-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(ir.from_proto(model), path, external_data="model.onnx.data")
        return ort.InferenceSession(str(path), opts, providers=chain)


def _options(threads: int, optimize: bool, spinning: bool, optimized_path: str | None,
             profile_prefix: str | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning and threads > 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def batch_size(model: onnx.ModelProto | ir.Model, input_name: str | None = None) -> int | None:
    """The batch dim the input (the first real one by default) is fixed to; None if symbolic or unknown.

    Reads the graph's inputs only: an ir.Model is not serialised (that would copy every weight).
    """
    if isinstance(model, ir.Model):
        inputs = [(v.name, list(v.shape) if v.shape is not None else []) for v in model.graph.inputs
                  if v.const_value is None]
    else:
        inputs = [(i.name, [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim])
                  for i in graph_inputs(model)]
    dims = next((d for n, d in inputs if n == input_name), None) if input_name else (inputs[0][1] if inputs else None)
    return dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None


def fixed_batch(model: onnx.ModelProto | ir.Model, input_name: str | None = None) -> bool:
    """True when the input (the first real one by default) has its batch dim fixed to 1."""
    return batch_size(model, input_name) == 1


def check_batch(model: onnx.ModelProto | ir.Model, input_name: str | None = None) -> None:
    """Refuse a batch fixed above 1: calibration batches are split into single samples, never regrouped."""
    n = batch_size(model, input_name)
    if n is not None and n > 1:
        what = f"input {input_name!r}" if input_name else "the model's input"
        raise ConfigError(f"{what} has its batch dimension fixed to {n}: calibration samples run in batches of "
                          "any size or one at a time, so the model needs a dynamic batch or a batch of 1 "
                          "(re-export it with either)")


def pieces(model: onnx.ModelProto | ir.Model, batches: Iterable[np.ndarray], input_name: str | None = None
           ) -> list[np.ndarray]:
    """``batches`` as the model can take them: split into single samples when its batch is fixed to 1.

    Every stage that feeds calibration data to a model goes through this (ORT runs, with
    :func:`run_all`) or through the torch bridge, which splits the same way (``OnnxModule.run``).
    """
    check_batch(model, input_name)
    one = fixed_batch(model, input_name)
    out: list[np.ndarray] = []
    for b in batches:
        out.extend([b[i:i + 1] for i in range(len(b))] if one and len(b) > 1 else [b])
    return out


def run_all(sess: ort.InferenceSession, input_name: str, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Every output over all ``feeds``, concatenated along the batch axis."""
    runs = [sess.run(None, {input_name: x}) for x in feeds]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]


def run_rows(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray], one: bool) -> list[np.ndarray]:
    """``sess.run(None, feeds)``; with ``one`` (batch fixed to 1) row by row of every feed, outputs concatenated."""
    n = len(next(iter(feeds.values())))
    if not one or n == 1:
        return sess.run(None, dict(feeds))
    runs = [sess.run(None, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]
