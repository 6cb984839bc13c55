"""Prefetch throughput from local servers, and a paper estimate for one real cell.

Serves the real 29RKH COGs (../shared/data; the whole 109.8 km cell downsampled to 100 m) from
RangeHTTPServer on 127.0.0.1, each scene under its own URL so GDAL's caches cannot help, and
runs compositor.prefetch on them at the sample's native 100 m (full-resolution reads) and at
200 m (first-overview reads). It reports bytes moved (counted by the server), MB/s, scenes per
minute, and where the time goes (reading vs writing the stack). From those it prints a paper
estimate for one real cell of 100 scenes at 10 m and 20 m over the network: bytes read, disk
used, and hours at a few link speeds. Without ../shared/data it uses synthetic COGs instead.

    .venv/bin/python bench/prefetch.py [--scenes 12] [--workers 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pystac

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import stac_servers as ss  # noqa: E402  (the test helpers: same servers, same builders)

from compositor.prefetch import estimate_disk, prefetch, read_scene, target_grid  # noqa: E402
from compositor.stack import Stack  # noqa: E402

CELL_PX_10M = 10980 * 10980
LINKS_MB_S = {"home 100 Mbit/s": 12.5, "fibre 1 Gbit/s": 125.0, "in-region EC2": 300.0}
N_REAL = 100


def rkh_items(files: Path, base: str, n: int) -> list[dict]:
    """``n`` copies of the real 29RKH item, each under its own path (own URLs, no cache)."""
    item = ss.build_rkh(files, base)
    out = []
    for k in range(n):
        d = files / f"rkh{k:03d}"
        d.mkdir(exist_ok=True)
        copy = json.loads(json.dumps(item))
        copy["id"] = f"S2A_29RKH_{20200101 + k}_0_L2A"
        copy["properties"]["datetime"] = f"2020-{1 + k // 28:02d}-{1 + k % 28:02d}T11:34:25Z"
        for a in copy["assets"].values():
            if a["href"].startswith(base + "/rkh/"):
                name = a["href"].rsplit("/", 1)[1]
                link = d / name
                if not link.exists():
                    link.symlink_to((files / "rkh" / name).resolve())
                a["href"] = f"{base}/rkh{k:03d}/{name}"
        out.append(copy)
    return out


def synthetic_items(files: Path, base: str, n: int) -> list[dict]:
    items, _ = ss.build_synthetic(files, base, size=1024, n_dates=n, corrupt=False)
    return items


def run(scenes: int, workers: int, source: str) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="clearsky-bench-prefetch-"))
    files = tmp / "files"
    files.mkdir()
    port = ss.free_port()
    base = f"http://127.0.0.1:{port}"
    if source == "rkh":
        raw = rkh_items(files, base, scenes * 2 + 6)  # own copies per run: no cache hits
        cell_id, native = "29RKH", 100.0
    else:
        raw = synthetic_items(files, base, scenes * 2 + 6)
        cell_id, native = ss.SYNTH_CELL, 10.0
    items = [pystac.Item.from_dict(i) for i in raw]
    server = ss.FileServer(files, port)
    server.start()
    out: dict = {"source": source, "scenes": scenes, "workers": workers, "runs": []}
    grids = []
    try:
        bbox = None
        if source == "synthetic":
            c, _, b = ss.synth_grid(1024)
            from compositor.grid import transform_bounds_to_lonlat

            bbox = transform_bounds_to_lonlat(c.epsg, b)
        for k, res in enumerate((native, native * 2)):
            batch = items[k * scenes : (k + 1) * scenes]
            grid = target_grid(cell_id, res, bbox)
            grids.append(grid)
            # 1. the whole prefetch as the CLI runs it
            sent0 = sum(n for _, n in server.requests())
            data = tmp / f"data{k}"
            rep = prefetch(batch, grid, data, workers=workers, progress=False, check_disk=False)
            assert rep.ok, rep.failed
            sent = sum(n for _, n in server.requests()) - sent0
            disk = Stack.open(rep.path).nbytes_on_disk()
            # 2. reading alone, three scenes not read before
            fresh = items[2 * scenes + 3 * k : 2 * scenes + 3 * k + 3]
            t = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                read = list(pool.map(lambda it, g=grid: read_scene(it, g), fresh))
            read_s = (time.perf_counter() - t) / 3
            # 3. writing alone
            s = Stack.create(
                tmp / f"w{k}.zarr", cell_id, grid.epsg, grid.transform, grid.width, grid.height
            )
            t = time.perf_counter()
            for d in read:
                s.append_scene(d.scene, d.reflectance, d.scl)
            write_s = (time.perf_counter() - t) / len(read)
            px = grid.width * grid.height
            out["runs"].append(
                {
                    "resolution_m": res,
                    "grid_px": [grid.width, grid.height],
                    "seconds": rep.seconds,
                    "scenes_per_min": len(rep.written) / rep.seconds * 60,
                    "mb_read": sent / 1e6,
                    "mb_per_s": sent / 1e6 / rep.seconds,
                    "mpx_per_s": len(rep.written) * px * 4 / 1e6 / rep.seconds,
                    "bytes_read_per_scene": sent / len(rep.written),
                    "bytes_read_per_band_px": sent / len(rep.written) / (4 * px),
                    "disk_bytes_per_scene": disk / len(rep.written),
                    "disk_bytes_per_px_scene": disk / len(rep.written) / px,
                    "read_s_per_scene": read_s,
                    "write_s_per_scene": write_s,
                    "write_mpx_per_s": px * 4 / 1e6 / write_s,
                }
            )
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    out["estimate"] = paper_estimate(out["runs"], grids)
    return out


def paper_estimate(runs: list[dict], sample_grids: list) -> list[dict]:
    """One real cell, 100 scenes, at 10 m (full-resolution COG reads) and 20 m (first overview).

    Bytes read scale with pixels read, at the bytes per pixel measured on the real sample COGs
    (real 10 m COGs compress somewhat better than the 100 m sample, whose neighbouring pixels
    are 100 m apart, so this is an upper bound); disk with the Stack's padded level layout
    (estimate_disk), at the ratio measured here; local time (decode, levels, stack writes) at the
    end-to-end pixel rate measured here. Reading and writing overlap, so the wall time is about
    the larger of network and local time.
    """
    est = []
    for res, run_, sample in zip((10, 20), runs, sample_grids, strict=True):
        grid = target_grid("29RKH", res)
        px = grid.width * grid.height
        read_bytes = N_REAL * run_["bytes_read_per_band_px"] * 4 * px
        disk_ratio = run_["disk_bytes_per_scene"] / estimate_disk(sample, 1)
        disk = disk_ratio * estimate_disk(grid, N_REAL)
        # The end-to-end local rate of the largest run (least per-scene overhead): what this
        # machine sustains with the network out of the way.
        cpu_h = N_REAL * 4 * px / 1e6 / runs[0]["mpx_per_s"] / 3600
        net_h = {k: read_bytes / (v * 1e6) / 3600 for k, v in LINKS_MB_S.items()}
        est.append(
            {
                "resolution_m": res,
                "gb_read": read_bytes / 1e9,
                "gb_disk_now": disk / 1e9,
                "gb_disk_with_cloudprob": estimate_disk(grid, N_REAL) / 1e9,
                "local_hours": cpu_h,
                "network_hours": net_h,
                "wall_hours": {k: max(v, cpu_h) for k, v in net_h.items()},
            }
        )
    return est


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=12, help="scenes per resolution")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--source", choices=("rkh", "synthetic"), default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    a = p.parse_args()
    source = a.source or ("rkh" if ss.RKH_ITEM.exists() else "synthetic")
    res = run(a.scenes, a.workers, source)
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(
        f"prefetch from 127.0.0.1 ({source} COGs, {a.scenes} scenes per run, {a.workers} workers)"
    )
    print(
        f"{'res m':>6} {'grid':>11} {'s':>6} {'scenes/min':>10} {'MB read':>8} {'MB/s':>6} "
        f"{'Mpx/s':>6} {'read s/sc':>9} {'write s/sc':>10} {'disk MB/sc':>10}"
    )
    for r in res["runs"]:
        g = f"{r['grid_px'][0]}x{r['grid_px'][1]}"
        print(
            f"{r['resolution_m']:>6g} {g:>11} {r['seconds']:>6.1f} {r['scenes_per_min']:>10.1f} "
            f"{r['mb_read']:>8.1f} {r['mb_per_s']:>6.1f} {r['mpx_per_s']:>6.1f} "
            f"{r['read_s_per_scene']:>9.2f} {r['write_s_per_scene']:>10.2f} "
            f"{r['disk_bytes_per_scene'] / 1e6:>10.2f}"
        )
    print(f"\npaper estimate: one real cell (109.8 km), {N_REAL} scenes, 4 bands + SCL")
    links = list(LINKS_MB_S)
    print(
        f"{'res m':>6} {'GB read':>8} {'GB disk':>8} {'+cloudprob':>10} {'local h':>7} "
        + " ".join(f"{'net h ' + k:>24}" for k in links)
    )
    for e in res["estimate"]:
        print(
            f"{e['resolution_m']:>6} {e['gb_read']:>8.1f} {e['gb_disk_now']:>8.1f} "
            f"{e['gb_disk_with_cloudprob']:>10.1f} {e['local_hours']:>7.2f} "
            + " ".join(f"{e['network_hours'][k]:>24.2f}" for k in links)
        )
    print("wall time ~ max(network, local): reads and stack writes overlap (--workers)")


if __name__ == "__main__":
    main()
