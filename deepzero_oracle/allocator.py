"""Keep freed tensor memory for reuse instead of handing it back to the OS after every query.

glibc's malloc serves blocks above a threshold (128 KiB at start, raised as blocks are freed,
at most 32 MiB) with fresh ``mmap`` pages and unmaps them on free. A CNN forward at batch 256
frees tens of megabytes of activations, and the engine's stacked copies more, so every query
pays the kernel to fault those pages in again, more the longer the process has run.
Fixing both thresholds lets freed blocks be reused. The command line does this at start;
library users call it themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
OPT_OUT = "DEEPZERO_ORACLE_MALLOC"
_retained = False  # whether retain_freed_memory took effect in this process


def retain_freed_memory(limit_mb: int = 256) -> bool:
    """Ask glibc's malloc to reuse freed blocks below ``limit_mb`` MiB.

    Blocks smaller than the limit come from the heap and stay there when freed (up to
    ``limit_mb`` of free memory at the heap's top), so a loop of same-sized queries reuses its
    pages. The cost is memory held for reuse (a higher peak RSS).
    Blocks above the limit are still mapped afresh. Process-wide and not undoable; call it once,
    early.

    Returns:
        True if applied; False on a C library without ``mallopt`` (macOS, musl, Windows) or when
        the environment variable ``DEEPZERO_ORACLE_MALLOC`` is ``default``.
    """
    if not 0 < limit_mb < 2048:  # mallopt takes a C int: 2 GiB would wrap to a negative size
        raise ValueError(f"limit_mb must lie in 1..2047 (MiB), got {limit_mb}")
    if os.environ.get(OPT_OUT, "").strip().lower() == "default":
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # no libc by that name, or no mallopt in it
        return False
    limit = limit_mb << 20
    global _retained
    _retained = bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))
    return _retained


def freed_memory_retained() -> bool:
    """Whether ``retain_freed_memory`` took effect in this process (the fast path sizes its
    chunks by it: see ``deepzero_oracle.fastpath.default_working_set``)."""
    return _retained


__all__ = ["OPT_OUT", "freed_memory_retained", "retain_freed_memory"]
