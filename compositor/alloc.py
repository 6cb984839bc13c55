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
import functools
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_done = False


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, loaded once (find_library runs ldconfig: not per call); None where absent."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_arenas(n: int) -> bool:
    """At most ``n`` malloc arenas (glibc): with freed memory kept, each arena holds on to the
    peak of the threads that used it, so fewer arenas means the process keeps the peak of what
    runs at once, not the sum of every thread's peak. True if applied."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_ARENA_MAX, max(int(n), 1)))


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (once per process). True if applied."""
    global _done
    if _done:
        return True
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        log.info("no glibc mallopt: freed memory goes back to the OS as usual")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _done


_RSS_ANON = b"RssAnon:"


def heap_resident() -> int:
    """Bytes of anonymous memory resident in this process (the malloc heap, numpy buffers,
    caches; not mapped files). 0 where /proc cannot tell."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(_RSS_ANON):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def trim_heap(limit_bytes: int) -> bool:
    """If more than ``limit_bytes`` of anonymous memory are resident, hand malloc's free pages
    back to the kernel (glibc ``malloc_trim``: every arena, holes in the middle too). Freed
    memory is kept for reuse (:func:`retain_freed_memory`) only up to this bound, so the
    process's heap follows the settings instead of the peak fragmentation of its history.
    True if it trimmed."""
    if heap_resident() <= limit_bytes:
        return False
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim(0)
    return True
