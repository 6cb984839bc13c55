"""Benchmark of the masked percentile kernel (issue 3).

    python bench/percentile.py [--json] [--shape 100,3,256,256] [--q 50] [--repeats 7]

Builds a realistic tile stack (seeded: smooth surface reflectance, spatially correlated
cloud masks from thresholded smooth noise, ~60 % of observations masked, some pixels with
exactly 0, 1 and 2 valid observations), then measures in one run:

* numpy.nanpercentile on a subset of rows, extrapolated to the full tile (too slow to run
  whole) and labelled "extrapolated";
* Kersten's sort-based numpy method (1 thread, and rows split over 2 Python threads);
* the project kernel ``masked_percentile`` at 1 and 2 numba threads;
* the one-pass floor: a numba masked sum reading the same data once, 1 and 2 threads.

Compilation and first-touch are excluded (warm-up call before timing); each figure is the
best and the median of several repeats. The kernel output is checked bit for bit against
nanpercentile on the subset and against Kersten on the whole tile. Without ``--shape``
both (100, 3, 256, 256) and (100, 4, 512, 512) are run. ``--json`` prints one JSON object
with every figure as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

try:
    from compositor.percentile import kersten_percentile, masked_percentile
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from compositor.percentile import kersten_percentile, masked_percentile

DEFAULT_SHAPES = [(100, 3, 256, 256), (100, 4, 512, 512)]


# ---------------------------------------------------------------------------- data


def _smooth_field(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Coarse uniform noise on a ``cell``-pixel grid, bilinearly upsampled: values in [0, 1)."""
    ch, cw = h // cell + 2, w // cell + 2
    coarse = rng.random((ch, cw))
    ys = np.linspace(0, ch - 1.001, h)
    xs = np.linspace(0, cw - 1.001, w)
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bot = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bot * fy


def make_tile(
    shape: tuple[int, int, int, int], seed: int = 0, cloud: float = 0.6
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (stack uint16 (T,B,H,W), mask bool (T,H,W)) like a cloudy S2 tile."""
    t, b, h, w = shape
    rng = np.random.default_rng(seed)
    # Per-scene cloud cover: mostly clear to overcast, mean ``cloud``.
    cover = rng.beta(1.2, 0.8, size=t)
    cover = np.clip(cover * cloud / cover.mean(), 0.0, 1.0)
    mask = np.empty((t, h, w), dtype=bool)
    for i in range(t):
        f = 0.7 * _smooth_field(rng, h, w, 32) + 0.3 * _smooth_field(rng, h, w, 8)
        mask[i] = f < np.quantile(f, cover[i])
    surface = 300.0 + 2500.0 * _smooth_field(rng, h, w, 16)
    stack = np.empty(shape, dtype=np.uint16)
    for i in range(t):
        bright = 4000.0 + 4000.0 * _smooth_field(rng, h, w, 16)  # cloud tops
        for j in range(b):
            v = surface * (0.8 + 0.1 * j) + rng.normal(0.0, 80.0, (h, w))
            v = np.where(mask[i], bright, v)
            stack[i, j] = np.clip(v, 0, 65535).astype(np.uint16)
    # A few pixels with exactly 0, 1 and 2 valid observations.
    npx = max(4, h * w // 2000)
    for nvalid in range(3):
        ys, xs = rng.integers(0, h, npx), rng.integers(0, w, npx)
        for y, x in zip(ys, xs, strict=True):
            mask[:, y, x] = True
            mask[rng.choice(t, size=min(nvalid, t), replace=False), y, x] = False
    return stack, mask


# ---------------------------------------------------------------------------- floor


# cache=False: this file runs as __main__ and is also importable as bench.percentile, and
# numba's cache would mix the two; compiling takes a second and is not timed.
@njit(parallel=True, cache=False, fastmath=False)
def _masked_sum(s1, m1, T, B, H, W, out):  # pragma: no cover - compiled
    """Sum of unmasked values per pixel: one streaming pass over stack and mask."""
    for h in prange(H):
        acc = np.empty(W, dtype=np.uint32)
        for b in range(B):
            for w in range(W):
                acc[w] = 0
            for t in range(T):
                so = ((t * B + b) * H + h) * W
                mo = (t * H + h) * W
                for w in range(W):
                    # multiply, not a ternary: the ternary compiles to a slow blend chain
                    acc[w] += np.uint32(s1[so + w]) * np.uint32(1 - m1[mo + w])
            oo = (b * H + h) * W
            for w in range(W):
                out[oo + w] = acc[w]


def masked_sum(stack: np.ndarray, mask: np.ndarray) -> np.ndarray:
    t, b, h, w = stack.shape
    out = np.empty((b, h, w), dtype=np.uint32)
    u = np.uint64
    _masked_sum(stack.reshape(-1), mask.reshape(-1), u(t), u(b), u(h), u(w), out.reshape(-1))
    return out


# ---------------------------------------------------------------------------- helpers


def nanpercentile_ref(stack: np.ndarray, mask: np.ndarray, q: float) -> np.ndarray:
    x = stack.astype(np.float64)
    x[np.broadcast_to(mask[:, None], x.shape)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
        return np.nanpercentile(x, q, axis=0, method="linear").astype(np.float32)


def kersten_threaded(stack: np.ndarray, mask: np.ndarray, q: float, threads: int) -> np.ndarray:
    """Kersten on row bands in Python threads (numpy's sort releases the GIL)."""
    if threads == 1:
        return kersten_percentile(stack, mask, q)
    h = stack.shape[2]
    cuts = np.linspace(0, h, threads + 1).astype(int)
    with ThreadPoolExecutor(threads) as ex:
        parts = ex.map(
            lambda i: kersten_percentile(
                stack[:, :, cuts[i] : cuts[i + 1]], mask[:, cuts[i] : cuts[i + 1]], q
            ),
            range(threads),
        )
        return np.concatenate(list(parts), axis=1)


def timeit(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    fn()  # warm-up: JIT compile / cache load, page faults
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"best_ms": min(ts), "median_ms": statistics.median(ts)}


def timeit_interleaved(
    cases: dict[str, tuple[int, Callable[[], object]]], repeats: int
) -> dict[str, dict[str, float]]:
    """Time several (threads, fn) cases round-robin, so a burst of load from other
    processes hits all of them alike instead of whichever happened to run then."""
    for k, fn in cases.values():
        numba.set_num_threads(k)
        fn()  # warm-up: JIT compile / cache load, page faults
    ts: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (k, fn) in cases.items():
            numba.set_num_threads(k)
            t0 = time.perf_counter()
            fn()
            ts[name].append((time.perf_counter() - t0) * 1e3)
    return {
        name: {"threads": cases[name][0], "best_ms": min(v), "median_ms": statistics.median(v)}
        for name, v in ts.items()
    }


class OtherLoad:
    """CPU share used by other processes between start() and stop() (Linux /proc/stat)."""

    def start(self) -> None:
        self._t = self._read()

    def stop(self) -> float | None:
        t0, t1 = self._t, self._read()
        if t0 is None or t1 is None:
            return None
        ours = (t1[2] - t0[2]) * os.sysconf("SC_CLK_TCK")
        total, busy = t1[0] - t0[0], t1[1] - t0[1]
        return round(max(0.0, busy - ours) / total, 3) if total > 0 else None

    @staticmethod
    def _read() -> tuple[int, int, float] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        t = os.times()
        return sum(v), sum(v) - v[3] - v[4], t.user + t.system


def background_busy(seconds: float = 0.5) -> float | None:
    """Fraction of all CPUs busy while we sleep: other processes skew the figures."""
    try:
        with open("/proc/stat") as f:
            a = [int(x) for x in f.readline().split()[1:]]
        time.sleep(seconds)
        with open("/proc/stat") as f:
            b = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    total = sum(b) - sum(a)
    idle = (b[3] + b[4]) - (a[3] + a[4])
    return round(1.0 - idle / total, 3) if total > 0 else None


# ---------------------------------------------------------------------------- run


def bench_shape(shape: tuple[int, int, int, int], q: float, repeats: int) -> dict:
    t, b, h, w = shape
    t0 = time.perf_counter()
    stack, mask = make_tile(shape)
    nvalid = t - np.count_nonzero(mask, axis=0)
    res: dict = {
        "shape": list(shape),
        "q": q,
        "masked_fraction": round(float(mask.mean()), 4),
        "pixels_with_0_1_2_valid": [int((nvalid == k).sum()) for k in range(3)],
        "data_build_s": round(time.perf_counter() - t0, 2),
    }
    max_threads = numba.config.NUMBA_NUM_THREADS
    threads = [k for k in (1, 2) if k <= max_threads]
    rows = {}

    # nanpercentile on a few rows (it is ~1000x slower), extrapolated linearly to the tile:
    # its cost is per pixel (a Python-level loop over pixels inside numpy).
    sub_h = max(1, min(h, 2048 // w))
    sub = (stack[:, :, :sub_h], mask[:, :sub_h])
    ref_sub = nanpercentile_ref(*sub, q)
    nan = timeit(lambda: nanpercentile_ref(*sub, q), 2)
    rows["nanpercentile (extrapolated)"] = {
        "threads": 1,
        "best_ms": nan["best_ms"] * h / sub_h,
        "median_ms": nan["median_ms"] * h / sub_h,
        "extrapolated_from_rows": sub_h,
    }
    nan_ms = rows["nanpercentile (extrapolated)"]["best_ms"]

    for k in threads:
        rows[f"kersten {k}t"] = {
            "threads": k,
            **timeit(lambda k=k: kersten_threaded(stack, mask, q, k), max(3, repeats // 2)),
        }
    cases: dict[str, tuple[int, Callable[[], object]]] = {}
    for k in threads:
        cases[f"kernel {k}t"] = (k, lambda: masked_percentile(stack, mask, q))
    for k in threads:
        cases[f"floor (masked sum) {k}t"] = (k, lambda: masked_sum(stack, mask))
    load = OtherLoad()
    load.start()
    rows.update(timeit_interleaved(cases, repeats))
    res["other_processes_cpu_share_during_kernel_timing"] = load.stop()
    numba.set_num_threads(max_threads)

    # Correctness on the same data: bit-exact against nanpercentile and Kersten.
    got = masked_percentile(stack, mask, q)
    res["equal_nanpercentile_subset"] = bool(
        np.array_equal(got[:, :sub_h], ref_sub, equal_nan=True)
    )
    res["equal_kersten_full"] = bool(
        np.array_equal(got, kersten_percentile(stack, mask, q), equal_nan=True)
    )

    kers1 = rows["kersten 1t"]["best_ms"]
    for r in rows.values():
        r["speedup_vs_nanpercentile"] = nan_ms / r["best_ms"]
        r["speedup_vs_kersten_1t"] = kers1 / r["best_ms"]
        fl = rows.get(f"floor (masked sum) {r['threads']}t")
        r["ratio_to_floor"] = r["best_ms"] / fl["best_ms"] if fl else None
    res["rows"] = rows
    return res


def print_table(res: dict) -> None:
    shape = "x".join(map(str, res["shape"]))
    print(
        f"\nshape {shape} (T,B,H,W) uint16, q={res['q']}, "
        f"masked {res['masked_fraction']:.1%}, pixels with 0/1/2 valid: "
        f"{res['pixels_with_0_1_2_valid']}"
    )
    head = (
        f"{'method':<30}{'best ms':>10}{'median ms':>11}{'x nanpct':>10}"
        f"{'x kersten1t':>13}{'/ floor':>9}"
    )
    print(head)
    print("-" * len(head))
    for name, r in res["rows"].items():
        print(
            f"{name:<30}{r['best_ms']:>10.1f}{r['median_ms']:>11.1f}"
            f"{r['speedup_vs_nanpercentile']:>10.1f}{r['speedup_vs_kersten_1t']:>13.2f}"
            f"{r['ratio_to_floor']:>9.2f}"
        )
    other = res.get("other_processes_cpu_share_during_kernel_timing")
    if other is not None:
        print(f"other processes used {other:.0%} of the CPUs while kernel/floor were timed")
    sub_rows = res["rows"]["nanpercentile (extrapolated)"]["extrapolated_from_rows"]
    print(
        f"kernel == nanpercentile on {sub_rows} rows: {res['equal_nanpercentile_subset']};"
        f" kernel == kersten on the tile: {res['equal_kersten_full']}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--shape", help="T,B,H,W (default: both issue-3 shapes)")
    ap.add_argument("--q", type=float, default=50.0)
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args(argv)
    shapes = [tuple(int(x) for x in args.shape.split(","))] if args.shape else DEFAULT_SHAPES
    if any(len(s) != 4 for s in shapes):
        ap.error("--shape needs four integers T,B,H,W")
    info = {
        "numba_threads_available": numba.config.NUMBA_NUM_THREADS,
        "cpu_count": os.cpu_count(),
        "background_cpu_busy": background_busy(),
        "numpy": np.__version__,
        "numba": numba.__version__,
    }
    print(
        f"numpy {info['numpy']}, numba {info['numba']}, "
        f"{info['numba_threads_available']} numba threads, background CPU busy "
        f"{info['background_cpu_busy']}"
    )
    results = []
    ok = True
    for shape in shapes:
        res = bench_shape(shape, args.q, args.repeats)  # type: ignore[arg-type]
        print_table(res)
        ok &= res["equal_nanpercentile_subset"] and res["equal_kersten_full"]
        results.append(res)
    info["background_cpu_busy_after"] = background_busy()
    if args.json:
        print(json.dumps({"info": info, "results": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
