"""Progress of long steps, reported through one callback: ``progress(message, done=None, total=None)``.

Every long step (loading calibration images, the sensitivity scan, distillation, trained
thresholds, benchmark rounds) calls the same callback, so there is one mechanism for both the
terminal (tqdm bars, :class:`ConsoleProgress`) and the ``onnxprune`` logger (``--verbose``, or
the library's default :func:`log_progress`). A call without ``total`` announces a stage; a call
with ``done``/``total`` advances that stage's bar.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Protocol

logger = logging.getLogger("onnxprune")


class Progress(Protocol):
    def __call__(self, message: str, done: int | None = None, total: int | None = None) -> None: ...


class LogProgress:
    """Progress as log records: each new stage at INFO, each step at DEBUG."""

    def __init__(self) -> None:
        self._stage: tuple[str, int | None] | None = None

    def __call__(self, message: str, done: int | None = None, total: int | None = None) -> None:
        if (message, total) != self._stage:
            self._stage = (message, total)
            logger.info(message if total is None else f"{message} ({total} steps)")
        if total is not None and done is not None:
            logger.debug("%s: %d/%d", message, done, total)


def quiet(message: str, done: int | None = None, total: int | None = None) -> None:
    """Progress nobody watches."""


def log_progress(message: str, done: int | None = None, total: int | None = None) -> None:
    """The library's default progress (no terminal output): records on the ``onnxprune`` logger."""
    _default(message, done, total)


_default = LogProgress()


class ConsoleProgress:
    """A stage line or a tqdm bar on stderr, only on a terminal (CI logs and pipes stay clean).

    Everything is also logged (see :class:`LogProgress`). With ``stages=False`` the bare stage
    lines are left to the log (``--verbose`` prints them already) and only bars are drawn.
    """

    def __init__(self, enabled: bool, *, stages: bool = True, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.stages = stages
        self._log = LogProgress()
        self._bar = None
        self._key: tuple[str, int] | None = None

    def __call__(self, message: str, done: int | None = None, total: int | None = None) -> None:
        self._log(message, done, total)
        if not self.enabled:
            return
        if total is None:
            self._close()
            if self.stages:
                self.stream.write(f"\r\033[K{message}...")
                self.stream.flush()
            return
        if self._bar is None or self._key != (message, total):
            from tqdm import tqdm
            self._close()
            self.stream.write("\r\033[K")
            self._bar = tqdm(total=total, desc=message, file=self.stream, leave=False, dynamic_ncols=True)
            self._key = (message, total)
        if done is not None and done > self._bar.n:
            self._bar.update(done - self._bar.n)
            if done >= total:
                self._bar.refresh()  # tqdm skips redraws within mininterval: show the finished bar

    def done(self) -> None:
        """Clear the line (before the summary or an error message is printed)."""
        self._close()
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar, self._key = None, None


class _TqdmHandler(logging.Handler):
    """Log lines written through tqdm, so they do not tear an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def configure_logging(verbosity: int) -> None:
    """``-v``: INFO, ``-vv``: DEBUG on the ``onnxprune`` logger, to stderr; 0 leaves logging alone."""
    for h in [h for h in logger.handlers if isinstance(h, _TqdmHandler)]:
        logger.removeHandler(h)
        logger.setLevel(logging.NOTSET)
    if verbosity <= 0:
        return
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("onnxprune: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbosity == 1 else logging.DEBUG)
