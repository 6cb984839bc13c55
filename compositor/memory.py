"""The process's memory bound, kept by a thread of its own (off the tiles' path).

Freed buffers are kept for reuse (compositor/alloc.py: faulting fresh pages in costs a tile
10-40 ms), so without a bound the heap keeps the peak of its whole history, fragmented. Past
the bound the thread hands malloc's free pages back to the kernel, checking periodically and
after every render.
"""

from __future__ import annotations

import threading

from compositor.alloc import trim_heap

_WAKE = threading.Event()
TRIMS = {"heap": 0}  # how often the bound was enforced (for /metrics)


def after_render() -> None:
    """A render thread says a tile is done: the checking thread looks now rather than at its
    next period. Costs the render nothing."""
    _WAKE.set()


def keep_heap_under(limit_bytes: int, every_s: float = 0.5) -> threading.Thread:
    """Check every ``every_s`` seconds and after every render (:func:`after_render`) that at
    most ``limit_bytes`` of anonymous memory are resident; hand free heap pages back past it."""

    def loop() -> None:
        while True:
            _WAKE.wait(every_s)
            _WAKE.clear()
            TRIMS["heap"] += trim_heap(limit_bytes)

    t = threading.Thread(target=loop, name="clearsky-heap-bound", daemon=True)
    t.start()
    return t
