"""The server's memory bounds: the render budget and the heap bound."""

from __future__ import annotations

import threading
import time

import numpy as np

from compositor.alloc import heap_resident, retain_freed_memory, trim_heap
from compositor.memory import RenderBudget, render_bytes


def _run(budget: RenderBudget, sizes: list[int]) -> int:
    """Reserve each size in a thread of its own, holding it 50 ms; the most held at once."""
    peak = [0]
    lock = threading.Lock()

    def job(n: int) -> None:
        with budget.reserve(n):
            with lock:
                peak[0] = max(peak[0], budget.used)
            time.sleep(0.05)

    threads = [threading.Thread(target=job, args=(n,)) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert budget.used == 0
    return peak[0]


def test_renders_in_flight_stay_within_the_budget():
    assert _run(RenderBudget(100), [40] * 8) <= 80  # two at a time
    assert _run(RenderBudget(100), [250, 30, 30]) == 250  # too big for the budget: alone
    assert _run(RenderBudget(None), [40] * 8) > 100  # no bound (the CLI)


def test_render_estimate_follows_looks_window_and_mask_level():
    one = render_bytes(1, 256, 256, 2)
    assert render_bytes(100, 256, 256, 2) == 100 * one
    assert render_bytes(1, 512, 512, 2) == 4 * one
    assert render_bytes(1, 256, 256, 1) > one  # masks at the window's own level cost more


def test_heap_bound_hands_free_pages_back():
    retain_freed_memory()  # as the server: freed memory is kept...
    a = np.ones(64 * 2**20, np.uint8)  # 64 MB touched
    held = heap_resident()
    del a
    assert heap_resident() > held - 32 * 2**20  # ... still resident after free
    assert trim_heap(2**62) is False  # under the bound: nothing done
    assert trim_heap(0) is True
    assert heap_resident() < held - 32 * 2**20  # past it: handed back
