"""Keep freed memory in the process instead of handing it back to the kernel.

A tile allocates tens of MB of short-lived arrays. glibc gives large blocks (above its adaptive
mmap threshold, at most 32 MB) back to the kernel on free, so the next tile faults every page in
again: ~4 us per 4 KiB page measured on the 2-core VM, 10-40 ms per tile. With mmap disabled
for malloc and trimming off, freed blocks are reused. Only glibc has mallopt; elsewhere this is a
no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_done = False


def limit_arenas(n: int) -> bool:
    """At most ``n`` malloc arenas (glibc): with freed memory kept, each arena holds on to the
    peak of the threads that used it, so fewer arenas means the process keeps the peak of what
    runs at once, not the sum of every thread's peak. True if applied."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_ARENA_MAX, max(int(n), 1)))


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (once per process). True if applied."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("no glibc mallopt: freed memory goes back to the OS as usual")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _done
