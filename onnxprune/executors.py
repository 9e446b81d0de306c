"""Where independent jobs run: in this process, in a local process pool, or on a Ray cluster.

A sweep and the per-layer sensitivity scan are the same kind of work: many independent
"prune, run, measure" jobs over one large shared input (the model bytes, the calibration tensors).
One small interface serves both:

- :meth:`TaskExecutor.map` runs *compute* jobs ``fn(shared, item)`` anywhere, concurrently.
  ``shared`` is shipped once per worker process (local pool) or put once into Ray's object store,
  never once per job. A job that raises, or whose worker dies, becomes a failed :class:`Outcome`;
  the other jobs go on.
- :meth:`TaskExecutor.timing` runs *timing* jobs one at a time on a single node with nothing else
  of ours running there: a latency measured next to other work lies.

Jobs must be module-level functions (they are pickled by reference), and deterministic: every
executor gives the same results for the same jobs, only faster or slower.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import re
import shutil
import sys
import tempfile
import traceback
from abc import ABC, abstractmethod
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

from .errors import ConfigError

log = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")
Job = Callable[[S, T], R]
Ticks = Callable[[int, int], None]  # (done, total) of a pool's tasks; callers wrap a progress.Progress

EXECUTORS = ("local", "ray")


@dataclass
class Outcome(Generic[R]):
    """The result of one job, or why it has none."""

    index: int
    value: R | None = None
    error: str | None = None  # "TypeName: message" (first line), None when the job succeeded

    @property
    def ok(self) -> bool:
        return self.error is None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _call(fn: Job, shared: Any, item: Any) -> tuple[Any, str | None]:
    """Run one job; an exception becomes an error string so one bad job cannot sink the batch."""
    try:
        return fn(shared, item), None
    except Exception as exc:  # the job's own failure is data for the result table
        log.debug("job failed:\n%s", traceback.format_exc())
        return None, _describe(exc)


class TaskExecutor(ABC):
    """Runs compute jobs concurrently and timing jobs alone; see the module docstring."""

    name: str = ""
    workers: int = 1

    @abstractmethod
    def imap(self, fn: Job, items: Sequence[T], shared: Any = None) -> Iterator[Outcome]:
        """``fn(shared, item)`` for every item, yielded as each finishes (``Outcome.index`` says which)."""

    def map(self, fn: Job, items: Sequence[T], shared: Any = None, *,
            progress: Ticks | None = None) -> list[Outcome]:
        """``[fn(shared, item) for item in items]`` as Outcomes, in the order of ``items``."""
        return _collect(self.imap(fn, items, shared), len(items), progress)

    def timing(self, fn: Job, items: Sequence[T], shared: Any = None, *,
               progress: Ticks | None = None) -> list[Outcome]:
        """Like :meth:`map`, but one job at a time, alone on this machine (the default: in this process)."""
        return _collect(_iserial(fn, items, shared), len(items), progress)

    def close(self) -> None:
        """Release workers; the executor must not be used afterwards."""

    def __enter__(self) -> "TaskExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _collect(outcomes: Iterator[Outcome], total: int, progress: Ticks | None) -> list[Outcome]:
    """Outcomes in item order, reporting progress as each one arrives."""
    out: list[Outcome] = []
    for o in outcomes:
        out.append(o)
        if progress:
            progress(len(out), total)
    return sorted(out, key=lambda o: o.index)


def _iserial(fn: Job, items: Sequence[T], shared: Any) -> Iterator[Outcome]:
    for i, item in enumerate(items):
        yield Outcome(i, *_call(fn, shared, item))


# ------------------------------------------------------------------------------------------ local process pool
_WORKER_SHARED: Any = None


def _install_shared(blob: bytes) -> None:
    global _WORKER_SHARED
    _WORKER_SHARED = pickle.loads(blob)


def _worker_call(fn: Job, shared: Any, item: Any) -> tuple[Any, str | None]:
    """A job in a worker that owns one CPU: its ONNX Runtime sessions use one thread."""
    from .graph.runtime import use_threads
    use_threads(1)
    return _call(fn, shared, item)


def _pool_call(fn: Job, item: Any) -> tuple[Any, str | None]:
    return _worker_call(fn, _WORKER_SHARED, item)


class LocalExecutor(TaskExecutor):
    """A process pool on this machine (the default): no extra dependency.

    With one worker, jobs run in this process (no start-up cost, easiest to debug). Workers are
    started with ``forkserver`` (``spawn`` where it is missing), never plain ``fork``: ONNX
    Runtime's thread pools do not survive a fork. ``shared`` is sent once per worker at start-up.
    """

    name = "local"

    def __init__(self, workers: int | None = None, retries: int = 1) -> None:
        n = (os.cpu_count() or 1) if workers is None else workers
        if n < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        self.workers = n
        self.retries = retries

    def imap(self, fn: Job, items: Sequence[T], shared: Any = None) -> Iterator[Outcome]:
        items = list(items)
        if self.workers == 1 or len(items) <= 1:
            yield from _iserial(fn, items, shared)
            return
        blob = pickle.dumps(shared)
        died: list[int] = []
        for i, value, error in self._pool(fn, list(enumerate(items)), blob, self.workers):
            if error == _DIED:
                died.append(i)
            else:
                yield Outcome(i, value, error)
        # A crashed worker takes every job running beside it down: re-run those alone, so only the
        # job that kills its worker is reported failed.
        for i in died:
            for _ in range(self.retries + 1):
                (_, value, error), = self._pool(fn, [(i, items[i])], blob, 1)
                if error != _DIED:
                    break
            yield Outcome(i, value, f"worker died {self.retries + 1} times" if error == _DIED else error)

    @staticmethod
    def _pool(fn: Job, jobs: list[tuple[int, Any]], blob: bytes, workers: int) -> Iterator[tuple[int, Any, str | None]]:
        pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=_context(),
                                   initializer=_install_shared, initargs=(blob,))
        try:
            with _caller_not_rerun(fn):  # workers start on submit
                futures = {pool.submit(_pool_call, fn, item): i for i, item in jobs}
            for fut in as_completed(futures):
                try:
                    value, error = fut.result()
                except BrokenProcessPool:  # a worker died (killed, out of memory, segfault)
                    value, error = None, _DIED
                yield futures[fut], value, error
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


_DIED = "\0worker died"


@contextmanager
def _caller_not_rerun(fn: Job) -> Iterator[None]:
    """Start workers without re-importing the caller's ``__main__``.

    forkserver and spawn workers import the main script (to unpickle what it defines): a script
    that calls ``onnxprune.slim`` without an ``if __name__ == "__main__"`` guard would run again in
    every worker and fail there. Our jobs live in onnxprune's modules, so the main module is hidden
    while workers start; a job defined in ``__main__`` keeps the standard behaviour.
    """
    main = sys.modules.get("__main__")
    if main is None or getattr(fn, "__module__", None) == "__main__":
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _context() -> multiprocessing.context.BaseContext:
    """forkserver with the heavy imports done once in the server, so workers start in milliseconds."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["onnxprune.executors", "onnxprune.sensitivity"])
    return ctx


# ------------------------------------------------------------------------------------------------- Ray
class RayExecutor(TaskExecutor):
    """Ray 2.x (``pip install 'onnxprune[ray]'``): a local instance, or a cluster at ``address``.

    ``shared`` goes to the object store once (``ray.put``) and is reused by later calls on the same
    object; Ray hands each task the stored value (zero-copy for numpy arrays). ``retries`` is Ray's ``max_retries``: how often a
    task is re-run when its worker dies; a job that raises is not retried (it would raise again).
    Timing jobs run one at a time on the driver's node, each reserving every CPU of that node, so
    no other Ray task shares the machine while a latency is measured.

    Workers import the *installed* onnxprune. By default Ray puts the driver's working directory
    (and its script's folder) first on every worker's ``sys.path``: run from a source checkout,
    whose top-level ``onnxprune/`` folder lacks the subpackages the installer maps in (``passes``,
    ``sample_models``), or from any folder holding a same-named package, workers would import that
    instead and every job would fail. A Ray instance started here therefore gets an empty
    ``working_dir``: Ray then adds neither path, and workers start in that empty folder. A Ray
    instance the caller started already is used as it is.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, retries: int = 1) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'onnxprune[ray]'") from None
        self._ray = ray
        self._started = False
        self._shared: Any = None
        self._ref: Any = None
        if address and address != "auto":
            _reachable(address)
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": address, "include_dashboard": False, "log_to_driver": False,
                                      "logging_level": logging.WARNING}
            if address is None and workers:
                kwargs["num_cpus"] = workers
            empty = tempfile.mkdtemp(prefix="onnxprune-ray-")  # uploaded by ray.init, not needed after it
            kwargs["runtime_env"] = {"working_dir": empty}  # workers off the driver's cwd: see the class docstring
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise ConfigError(f"cannot start or join {where}: {_describe(exc)}") from None
            finally:
                shutil.rmtree(empty, ignore_errors=True)
            self._started = True
        self.workers = int(ray.cluster_resources().get("CPU", 1))
        self.retries = retries
        self._remote = ray.remote(num_cpus=1, max_retries=retries)(_worker_call)

    def imap(self, fn: Job, items: Sequence[T], shared: Any = None) -> Iterator[Outcome]:
        ray = self._ray
        ref = self._put(shared)
        pending = {self._remote.remote(fn, ref, item): i for i, item in enumerate(items)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                yield self._outcome(pending.pop(r), r)

    def timing(self, fn: Job, items: Sequence[T], shared: Any = None, *,
               progress: Ticks | None = None) -> list[Outcome]:
        ray = self._ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        node = ray.get_runtime_context().get_node_id()
        cpus = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node), 1)
        alone = ray.remote(num_cpus=cpus, max_retries=self.retries,
                           scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))(_call)
        ref = self._put(shared)
        # Strictly one after another: the next task is submitted only when the previous one is done.
        one_by_one = (self._outcome(i, alone.remote(fn, ref, item)) for i, item in enumerate(items))
        return _collect(one_by_one, len(items), progress)

    def _outcome(self, index: int, ref: Any) -> Outcome:
        try:
            return Outcome(index, *self._ray.get(ref))
        except Exception as exc:  # the worker died more often than `retries`, could not import the job, or was cancelled
            return Outcome(index, None, f"task failed: {_describe_remote(exc)}")

    def _put(self, shared: Any) -> Any:
        """One object-store copy per shared object, reused by later map/timing calls on it."""
        if self._shared is not shared:
            self._shared, self._ref = shared, self._ray.put(shared)
        return self._ref

    def close(self) -> None:
        self._shared = self._ref = None
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*: \S")


def _describe_remote(exc: BaseException) -> str:
    """One line for a Ray error: the worker's own exception when Ray wraps one with its traceback.

    A job that cannot be unpickled on a worker (``ModuleNotFoundError`` while importing it or its
    arguments) reaches the driver as a ``RayTaskError`` whose first line only names the task; the
    last line of the worker's traceback says what went wrong.
    """
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    if len(lines) > 1 and _EXCEPTION_LINE.match(lines[-1]):
        return lines[-1]
    return _describe(exc)


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line, when a cluster address does not answer (ray.init would wait minutes)."""
    import socket
    from urllib.parse import urlsplit
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ConfigError(f"--ray-address must be HOST:PORT, ray://HOST:PORT or auto, got {address!r}")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def make_executor(kind: str = "local", *, workers: int | None = None, address: str | None = None,
                  retries: int = 1) -> TaskExecutor:
    """The executor named ``kind`` (``local`` or ``ray``); ``address`` joins an existing Ray cluster."""
    if kind == "local":
        if address:
            raise ConfigError("--ray-address only applies with --executor ray")
        return LocalExecutor(workers, retries)
    if kind == "ray":
        return RayExecutor(address, workers, retries)
    raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
