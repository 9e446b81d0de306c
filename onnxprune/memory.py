"""Give freed memory back to the operating system between pipeline stages.

Why: peak RSS on big models is a contract (under 3x the model's size for a 65M-parameter
recognizer). onnx-ir graphs are reference cycles, so their weights are freed only by the cycle
collector; and glibc keeps freed heap pages (its mmap threshold grows after large frees), so
RSS would stay at the previous stage's peak and the next stage would stack on top of it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_libc = None


def release_memory() -> None:
    """Collect reference cycles, then ask glibc to return free heap pages (a no-op elsewhere)."""
    global _libc
    gc.collect()
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
