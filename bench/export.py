"""Exports: tiles per second on this machine's cores, and archive bytes per km² at native zoom.

    python bench/export.py [--data data/demo] [--zooms 10,15] [--json]

Throughput, on the synthetic demo cell (49NDB, 64 dates, 1024 x 1024 px at 10 m) over zooms
Z0-Z1, every run cold (a percentile no run asked before, mask cache empty):
- baseline: the same tiles fetched from `clearsky serve` (a fresh process on 127.0.0.1) by two
  concurrent HTTP clients, i.e. scraping the server;
- `clearsky export --workers 1`: one thread in this process;
- `clearsky export`: one thread per core in this process (the default under 256 tiles);
- `clearsky export --workers 2`: a Dask LocalCluster of 2 worker processes, started and stopped
  by the export (counted; the default from 256 tiles up);
- `clearsky export --scheduler`: the same cluster started beforehand, as a running cluster
  would be (its start is timed apart).
For exports, end to end (size estimate, archive and page included) and the steady rate (from the
first finished chunk to the last).

Size: each demo cell exported at its native zoom only, as PNG, WebP and JPEG: archive bytes per
km² of the cell (the tiles along the edges are counted whole).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from compositor.demo import REAL_CELL, SYNTH_CELL, build_demo  # noqa: E402
from compositor.export import plan_export, render_chunk, run_export  # noqa: E402
from compositor.mosaic import native_zoom  # noqa: E402
from compositor.stack import Stack  # noqa: E402
from compositor.tiling import MASK_CACHE  # noqa: E402

WORK = ROOT / "bench" / ".data" / "export"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_crawl(data: Path, tiles: list, percentile: str, clients: int = 2) -> dict:
    """Tiles/s fetching ``tiles`` from a fresh `clearsky serve` with ``clients`` at once."""
    port = free_port()
    log = open(WORK / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "compositor.cli", "serve", "--port", str(port), "--data", str(data)],
        env={**os.environ, "CLEARSKY_DATA_DIR": str(data)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError("server did not start")
        with httpx.Client(timeout=300) as client:

            def get(t: tuple[int, int, int]) -> int:
                z, x, y = t
                r = client.get(
                    f"{url}/cells/{SYNTH_CELL}/tiles/WebMercatorQuad/{z}/{x}/{y}.png",
                    params={"percentile": percentile},
                )
                return len(r.content) if r.status_code == 200 else 0

            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(get, tiles))
            sec = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    return {"tiles": len(tiles), "seconds": sec, "tiles_per_s": len(tiles) / sec}


def export_run(
    data: Path,
    zooms: tuple[int, int],
    percentile: str,
    workers: int | None = None,
    scheduler: str | None = None,
) -> dict:
    """One cold export of the synthetic cell; end-to-end and steady tiles/s."""
    MASK_CACHE.resize(MASK_CACHE._cache.maxsize)  # empty: no run reuses another's masks
    out = Path(tempfile.mkdtemp(dir=WORK))
    plan = plan_export(data, [SYNTH_CELL], None, *zooms, {"percentile": percentile}, out)
    marks: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    rep = run_export(
        plan,
        workers,
        scheduler,
        progress=lambda done, total: marks.append((time.perf_counter(), done)),
    )
    sec = time.perf_counter() - t0
    shutil.rmtree(out)
    # marks[0]: before the work (the size-estimate tiles done); marks[1]: the first chunk.
    steady = None
    if len(marks) > 2:
        (t1, d1), (t2, d2) = marks[1], marks[-1]
        steady = (d2 - d1) / (t2 - t1) if t2 > t1 else None
    return {
        "tiles": rep.tiles,
        "seconds": sec,
        "tiles_per_s": rep.tiles / sec,
        "steady_tiles_per_s": steady,
        "bytes": rep.bytes,
    }


def bytes_per_km2(data: Path) -> list[dict]:
    rows = []
    for cid in (REAL_CELL, SYNTH_CELL):
        st = Stack.open(data / f"{cid}.zarr")
        km2 = st.width * st.height * st.resolution**2 / 1e6
        z = native_zoom(st)
        for fmt in ("png", "webp", "jpg"):
            out = Path(tempfile.mkdtemp(dir=WORK))
            plan = plan_export(data, [cid], None, z, z, {}, out, fmt=fmt)
            rep = run_export(plan)
            size = plan.archive.stat().st_size
            shutil.rmtree(out)
            rows.append(
                {
                    "cell": cid,
                    "km2": km2,
                    "zoom": z,
                    "format": fmt,
                    "tiles": rep.stored,
                    "archive_bytes": size,
                    "bytes_per_km2": size / km2,
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/demo"))
    ap.add_argument("--zooms", default="10,15", help="zoom range of the throughput export")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    build_demo(args.data)  # reuses what is built
    data = args.data.resolve()
    zooms = tuple(int(z) for z in args.zooms.split(","))
    plan = plan_export(data, [SYNTH_CELL], None, *zooms, {}, WORK / "plan")
    # Warm-up, not timed: kernels loaded, the stack's files in the page cache for every run.
    render_chunk((str(plan.cells[0][1]),), plan.tiles, plan.view, "png")

    res: dict = {"zooms": list(zooms), "cores": os.cpu_count()}
    res["server_2_clients"] = server_crawl(data, plan.tiles, "26")
    res["export_1_thread"] = export_run(data, zooms, "27", workers=1)
    res["export_threads"] = export_run(data, zooms, "30")
    res["export_2_workers"] = export_run(data, zooms, "28", workers=2)
    from dask.distributed import LocalCluster

    t0 = time.perf_counter()
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    ) as cluster:
        res["local_cluster_start_s"] = time.perf_counter() - t0
        res["export_scheduler"] = export_run(data, zooms, "29", scheduler=cluster.scheduler_address)
    res["size"] = bytes_per_km2(data)

    base = res["server_2_clients"]["tiles_per_s"]
    print(
        f"\n{SYNTH_CELL}: {len(plan.tiles)} tiles, zooms {zooms[0]}-{zooms[1]}, "
        f"{res['cores']} cores"
    )
    print(f"{'path':52} {'tiles/s':>8} {'steady':>8} {'vs server':>10}")
    for key, label in (
        ("server_2_clients", "clearsky serve, 2 concurrent HTTP clients (baseline)"),
        ("export_1_thread", "export --workers 1 (one thread)"),
        ("export_threads", f"export ({res['cores']} threads, default under 256 tiles)"),
        ("export_2_workers", "export --workers 2 (LocalCluster, start counted)"),
        ("export_scheduler", "export --scheduler (same cluster, running already)"),
    ):
        r = res[key]
        steady = r.get("steady_tiles_per_s")
        print(
            f"{label:52} {r['tiles_per_s']:>8.1f} "
            f"{(f'{steady:.1f}' if steady else '-'):>8} {r['tiles_per_s'] / base:>9.2f}x"
        )
    print(f"(a LocalCluster of 2 workers took {res['local_cluster_start_s']:.1f} s to start)")
    print(
        f"\n{'cell':6} {'km²':>7} {'zoom':>4} {'format':6} {'tiles':>5} {'bytes':>10} "
        f"{'bytes/km²':>10}"
    )
    for r in res["size"]:
        print(
            f"{r['cell']:6} {r['km2']:>7.2f} {r['zoom']:>4} {r['format']:6} {r['tiles']:>5} "
            f"{r['archive_bytes']:>10,} {r['bytes_per_km2']:>10,.0f}"
        )
    if args.json:
        print(json.dumps({"export": res}))


if __name__ == "__main__":
    main()
