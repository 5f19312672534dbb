"""Allocator settings for training: reuse freed memory instead of mapping fresh pages each step.

Every training step allocates its activations and gradients anew (numpy arrays, freed at the end
of the step). glibc serves blocks above its mmap threshold (128 KB at start, raised dynamically
to at most 32 MB) with fresh ``mmap`` pages and unmaps them on free, so every step of a model
with large logits page-faults its working set in again (the kernel zeroes each page). Fixing the
threshold at 32 MB and keeping up to 64 MB of freed heap top lets the next step reuse the same
memory: 20 updates of the tiny preset on Multi30k (8,000 pieces, 4,096-token batches, one
thread) took 282,900 minor page faults without and 46,500 with these settings (``/usr/bin/time``
counts, which other processes do not disturb), peak RSS 361 MB and 379 MB.

Process-wide and glibc only; elsewhere, or with ``PYTRANSFORMER_MALLOC_TUNING=0`` in the
environment, nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["reuse_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_applied = False


def reuse_freed_memory(mmap_threshold: int = 32 << 20) -> bool:
    """Sets glibc's mmap threshold to ``mmap_threshold`` bytes and its trim threshold to twice
    that (once per process). Returns whether the settings are in effect."""
    global _applied
    if _applied:
        return True
    if os.environ.get("PYTRANSFORMER_MALLOC_TUNING", "1") == "0":
        return False
    if isinstance(mmap_threshold, bool) or not isinstance(mmap_threshold, int):
        raise TypeError(f"mmap_threshold: expected an int, got {type(mmap_threshold).__name__}")
    if not 0 < mmap_threshold <= 1 << 30:
        raise ValueError(f"mmap_threshold: must be in (0, 2^30], got {mmap_threshold}")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold) == 1 and ok
    _applied = ok
    return ok
