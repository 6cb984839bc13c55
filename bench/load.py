"""Load on a real server: N clients for S seconds of mixed tile requests, in rounds.

    python bench/load.py [--clients 32] [--seconds 60] [--rounds 3] [--json]

Starts `clearsky serve` on 127.0.0.1 (default settings unless CLEARSKY_* variables say
otherwise) over the tiles bench stack (100 scenes, 2048 x 2048 px; built once by
bench/tiles.py's code into bench/.data/tiles), then per round: N clients (asyncio, one
connection each) send mixed tile requests for S seconds — new tiles and percentiles at the native
zoom, coarser zooms, mask=segformer, the count and date layers, the hillshade, @2x, and repeats
of tiles already served (cache hits). Bounded in time (rounds x S) and count (--max-requests).
Meanwhile /health is asked every 0.25 s (from a process of its own) and the server's RSS is
sampled every second.

Per round: requests, errors by status, latency p50/p95/p99, RSS at start/peak/end, and the
worst /health latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import morecantile  # noqa: E402
from tiles import DATA, build_stack  # noqa: E402  (bench/tiles.py)

from compositor.grid import transform_bounds_to_lonlat  # noqa: E402

TMS = morecantile.tms.get("WebMercatorQuad")


def start_server(port: int, data: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "CLEARSKY_DATA_DIR": str(data)}
    cmd = [
        sys.executable,
        "-m",
        "compositor.cli",
        "serve",
        "--port",
        str(port),
        "--data",
        str(data),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start; see {log}")


class Mix:
    """Random requests over the stack, about as a map viewer's users would send them."""

    def __init__(self, stack, seed: int):
        self.rng = random.Random(seed)
        w, s, e, n = transform_bounds_to_lonlat(stack.epsg, stack.bounds)
        self.zooms = {z: list(TMS.tiles(w, s, e, n, [z])) for z in (11, 12, 13, 14)}
        self.dates = [stack.scenes[i].date.isoformat() for i in stack.complete_indices()]
        self.served: list[str] = []

    def next(self) -> str:
        r = self.rng.random()
        if self.served and r < 0.25:  # a tile someone already looked at
            return self.rng.choice(self.served[-500:])
        z = 14 if r < 0.65 else self.rng.choice((11, 12, 13))
        t = self.rng.choice(self.zooms[z])
        path = f"/cells/49NDB/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}"
        q = self.rng.random()
        params = f"percentile={self.rng.choice((10, 25, 25, 25, 50, 75))}"
        if q < 0.12:
            params += "&mask=segformer"
        elif q < 0.2:
            params = "layer=count"
        elif q < 0.26:
            params = f"layer=date&date={self.rng.choice(self.dates)}"
        elif q < 0.32:
            params += "&hillshade=0.5"
        ext = "@2x.png" if self.rng.random() < 0.08 else ".png"
        url = f"{path}{ext}?{params}"
        self.served.append(url)
        return url


async def client_loop(base: str, mix: Mix, end: float, budget: list[int], out: list) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        while time.monotonic() < end and budget[0] > 0:
            budget[0] -= 1
            url = mix.next()
            t0 = time.perf_counter()
            try:
                r = await c.get(url)
                status = r.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            out.append((status, time.perf_counter() - t0))


def health_probe(base: str, seconds: float, out) -> None:
    """/health every 0.25 s, in its own process: the clients' event loop does not delay it."""
    res = []
    end = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=30) as c:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                ok = c.get("/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            res.append((ok, time.perf_counter() - t0))
            time.sleep(0.25)
    out.put(res)


async def rss_loop(proc: psutil.Process, end: float, out: list, anon: list, file: list) -> None:
    while time.monotonic() < end:
        m = proc.memory_info()
        out.append(m.rss)
        anon.append(m.rss - m.shared)  # less file-backed pages (libraries)
        file.append(m.shared)
        await asyncio.sleep(1.0)


async def one_round(base, mix, proc, clients, seconds, budget) -> dict:
    end = time.monotonic() + seconds
    results: list = []
    rss: list = [proc.memory_info().rss]
    anon: list = []
    file: list = []
    q = mp.Queue()
    prober = mp.Process(target=health_probe, args=(base, seconds, q))
    prober.start()
    await asyncio.gather(
        rss_loop(proc, end, rss, anon, file),
        *(client_loop(base, mix, end, budget, results) for _ in range(clients)),
    )
    rss.append(proc.memory_info().rss)
    health = q.get(timeout=120)
    prober.join()
    lat = np.array([t for _, t in results]) * 1000
    by_status = Counter(str(s) for s, _ in results)
    return {
        "requests": len(results),
        "status": dict(sorted(by_status.items())),
        "errors": sum(v for k, v in by_status.items() if k != "200"),
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "rss_start_mb": rss[0] / 2**20,
        "rss_peak_mb": max(rss) / 2**20,
        "rss_end_mb": rss[-1] / 2**20,
        "anon_peak_mb": max(anon) / 2**20,
        "file_peak_mb": max(file) / 2**20,
        "health_worst_ms": max(t for _, t in health) * 1000 if health else None,
        "health_failed": sum(1 for ok, _ in health if not ok),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    stack = build_stack()
    log = DATA / "load-server.log"
    server = start_server(args.port, DATA, log)
    base = f"http://127.0.0.1:{args.port}"
    settings = {
        k: v
        for k, v in httpx.get(f"{base}/metrics").json().items()
        if "cache_max" in k or "render_" in k
    }
    mix = Mix(stack, args.seed)
    budget = [args.max_requests]
    rounds = []
    try:
        proc = psutil.Process(server.pid)
        for _ in range(args.rounds):
            rounds.append(
                asyncio.run(one_round(base, mix, proc, args.clients, args.seconds, budget))
            )
        metrics = httpx.get(f"{base}/metrics").json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    res = {
        "clients": args.clients,
        "seconds": args.seconds,
        "settings": settings,
        "rounds": rounds,
        "metrics": metrics,
    }
    print(
        f"\n{args.clients} clients x {args.rounds} rounds of {args.seconds:.0f} s, mixed tiles "
        f"over a 100-scene 2048 x 2048 stack; server settings {settings}"
    )
    print(
        f"{'round':>5} {'requests':>8} {'errors':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'RSS start':>9} {'peak':>6} {'end MB':>6} {'anon peak':>9} {'file peak':>9} "
        f"{'/health worst ms':>16}  "
        "statuses"
    )
    for i, r in enumerate(rounds, 1):
        print(
            f"{i:>5} {r['requests']:>8} {r['errors']:>7} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
            f"{r['p99_ms']:>8.1f} {r['rss_start_mb']:>9.0f} {r['rss_peak_mb']:>6.0f} "
            f"{r['rss_end_mb']:>6.0f} {r['anon_peak_mb']:>9.0f} {r['file_peak_mb']:>9.0f} "
            f"{r['health_worst_ms']:>16.1f}  "
            f"{r['status']}"
        )
    print(
        f"server: {metrics['tiles_rendered']} rendered, {metrics['cache_hits']} cache hits, "
        f"{metrics['rejected_overload']} shed (503), cache {metrics['cache_bytes'] / 2**20:.0f} "
        f"of {metrics['cache_max_bytes'] / 2**20:.0f} MB; heap bound enforced "
        f"{metrics.get('heap_trims', 0)} x"
    )
    if args.json:
        print(json.dumps({"load": res}))


if __name__ == "__main__":
    main()
