"""The process's memory bound, kept by a thread of its own (off the tiles' path).

Freed buffers are kept for reuse (compositor/alloc.py: faulting fresh pages in costs a tile
10-40 ms), so without a bound the heap keeps the peak of its whole history, fragmented. Past
the bound the thread hands malloc's free pages back to the kernel, checking periodically and
after every render.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from compositor.alloc import trim_heap

# Anonymous memory of a server at rest after its warm-up (Python, numpy, numba's compiled
# kernels, GDAL): 0.26 GB measured, and 0.12 GB for the heap's fragmentation.
HEAP_BASE_MB = 384

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


# Bytes a composite holds per look and pixel while it renders: the window's three reflectance
# bands (6 B) and the percentile's work, plus the masks at the mask level (SCL, model
# probabilities, blue and NIR for the temporal test, packed bits). Fitted to peaks measured
# with VmHWM over the 100-scene bench stack, 256 and 512 px tiles at zooms 11-14 (54-531 MB
# each; the estimate within -5 %/+25 % of them).
BYTES_PER_LOOK_PX = 9
BYTES_PER_LOOK_MASK_PX = 15


def render_bytes(looks: int, height: int, width: int, mask_factor: int) -> int:
    """Estimated peak memory of compositing ``looks`` scenes over a (height, width) window
    whose masks are made ``mask_factor`` x coarser."""
    px = height * width
    return looks * (px * BYTES_PER_LOOK_PX + px // (mask_factor**2) * BYTES_PER_LOOK_MASK_PX)


class RenderBudget:
    """Renders in flight hold at most ``limit`` bytes (estimated) together: a render that
    would pass it waits for others to finish; one larger than the whole budget runs alone.
    ``limit`` None: no bound (the CLI, which renders one thing at a time)."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.used = 0
        self._cv = threading.Condition()

    def resize(self, limit: int | None) -> None:
        with self._cv:
            self.limit = limit
            self._cv.notify_all()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        with self._cv:
            while self.limit is not None and self.used and self.used + nbytes > self.limit:
                self._cv.wait()
            self.used += nbytes
        try:
            yield
        finally:
            with self._cv:
                self.used -= nbytes
                self._cv.notify_all()


RENDER_BUDGET = RenderBudget()
