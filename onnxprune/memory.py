"""Give freed memory back to the operating system between pipeline stages, and measure a step's memory.

Why: peak RSS on big models is a contract (under 3x the model's size for a 65M-parameter
recognizer). onnx-ir graphs are reference cycles, so their weights are freed only by the cycle
collector; and glibc keeps freed heap pages (its mmap threshold grows after large frees), so
RSS would stay at the previous stage's peak and the next stage would stack on top of it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

_libc = None


def release_memory() -> None:
    """Collect reference cycles, then ask glibc to return free heap pages (a no-op elsewhere)."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Ask glibc to return free heap pages of every arena to the OS (a no-op elsewhere)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


class RssMeter:
    """How much resident memory a block of code needs, in bytes: ``meter = RssMeter(); ...; meter.growth()``.

    Why trim first: memory an earlier step freed (a deleted ONNX Runtime session, a previous
    configuration) stays in glibc's heap, still resident; the next session is carved out of it
    and RSS does not grow, so a delta read 0.0 for small models or for every model after the
    first. Returning those pages first makes the block fault in what it really uses.
    The peak comes from the kernel's high-water mark (VmHWM), reset at the start. Where that mark
    cannot be reset, :meth:`growth` is the RSS still held at the end (``kind`` says which), and
    where RSS cannot be read at all (no /proc) it is None rather than a misleading 0.
    """

    def __init__(self) -> None:
        trim_heap()  # sessions are freed by reference counting: no cycle collection needed
        self.kind = "peak" if _reset_peak() else "kept"
        self.before = rss()
        if self.before is None:
            self.kind = "unavailable"

    def growth(self) -> int | None:
        if self.before is None:
            return None
        end = peak_rss() if self.kind == "peak" else rss()
        return None if end is None else max(0, end - self.before)


KEPT_NOTE = ("mem MB is the memory a session still holds after its first run, not its peak: this kernel's "
             "peak-RSS mark cannot be reset (/proc/self/clear_refs)")
UNAVAILABLE_NOTE = "mem MB n/a: resident memory cannot be read on this platform (no /proc/self/statm)"


def rss() -> int | None:
    """Current resident set size in bytes (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss() -> int | None:
    """Peak RSS since the last reset (VmHWM) in bytes, or None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return max(int(line.split()[1]) * 1024, rss() or 0)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
