"""Prefetch throughput and memory from local servers, and a paper estimate for one real cell.

Throughput: serves the real 29RKH COGs (../shared/data; the whole 109.8 km cell downsampled to
100 m) from RangeHTTPServer on 127.0.0.1, each scene under its own URL so GDAL's caches cannot
help, and runs compositor.prefetch on them at the sample's native 100 m (full-resolution reads)
and at 200 m (first-overview reads). It reports bytes moved (counted by the server), MB/s,
scenes per minute, and where the time goes (reading vs writing the stack). From those it prints
a paper estimate for one real cell of 100 scenes at 10 m and 20 m over the network: bytes read,
disk used, and hours at a few link speeds. Without ../shared/data it uses synthetic COGs.

Memory: real-size COGs of the whole cell (10980 x 10980 px bands at 10 m, SCL at 20 m, tiled
and with overviews as Earth Search's are; made once into bench/.data/ from the 29RKH sample
upsampled x10), 100 scenes of them behind `rustac serve` and the Range server, fetched by the
real `clearsky prefetch` command in a child process: its peak RSS (the kernel's own count, from
wait4) and its RSS as the scenes go by, at 60 m (100 scenes) and at 10 m (a few scenes, each
1.1 GB in memory: what bounds the peak is the scenes in flight and the stack write, not how many
scenes were fetched).

    .venv/bin/python bench/prefetch.py [--scenes 12] [--workers 3] [--memory-scenes 100]
        [--memory-scenes-10m 4] [--memory-workers-10m 1,3] [--no-memory] [--no-throughput]
        [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
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


def rkh_items(files: Path, base: str, n: int, src: str = "rkh") -> list[dict]:
    """``n`` copies of the real 29RKH item, each under its own path (own URLs, no cache) and
    its own acquisition (date and datastrip), with the COGs of ``files/src``."""
    item = ss.build_rkh(files, base)
    out = []
    for k in range(n):
        d = files / f"{src}{k:03d}"
        d.mkdir(exist_ok=True)
        copy = json.loads(json.dumps(item))
        when = dt.datetime(2016, 1, 1, 11, 31, 5) + dt.timedelta(days=5 * k)
        copy["id"] = f"S2A_29RKH_{when:%Y%m%d}_0_L2A"
        copy["properties"]["datetime"] = f"{when + dt.timedelta(seconds=200):%Y-%m-%dT%H:%M:%S}Z"
        ds = copy["properties"]["s2:datastrip_id"]
        copy["properties"]["s2:datastrip_id"] = f"{ds[:-22]}_S{when:%Y%m%dT%H%M%S}_N02.14"
        for a in copy["assets"].values():
            if a["href"].startswith(base + "/rkh/"):
                name = a["href"].rsplit("/", 1)[1]
                if not (files / src / name).exists():
                    continue
                link = d / name
                if not link.exists():
                    link.symlink_to((files / src / name).resolve())
                a["href"] = f"{base}/{src}{k:03d}/{name}"
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


# ------------------------------------------------------------------------------- memory
REALSIZE = ROOT / "bench" / ".data" / "realsize-29RKH"


def realsize_cogs(out: Path = REALSIZE) -> Path:
    """The four 10 m bands (10980 x 10980) and the 20 m SCL (5490 x 5490) of a whole cell, as
    Earth Search's COGs are laid out (1024 px tiles, deflate, internal overviews): the real
    29RKH sample upsampled x10, bilinear (SCL nearest). Made once."""
    import numpy as np
    import rasterio
    from affine import Affine
    from scipy import ndimage

    if (out / "SCL.tif").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name, factor, order, nodata in (
        ("B02", 10, 1, 0),
        ("B03", 10, 1, 0),
        ("B04", 10, 1, 0),
        ("B08", 10, 1, 0),
        ("SCL", 10, 0, 0),
    ):
        with rasterio.open(ss.RKH_DIR / f"{name}.tif") as src:
            data = src.read(1)
            t = src.transform
            crs = src.crs
        if order:
            up = ndimage.zoom(data.astype(np.float32), factor, order=1, grid_mode=True,
                              mode="nearest")  # fmt: skip
            up = np.clip(np.rint(up), 1, 65535).astype(data.dtype)
        else:
            up = np.repeat(np.repeat(data, factor, 0), factor, 1)
        profile = {
            "driver": "COG",
            "width": up.shape[1],
            "height": up.shape[0],
            "count": 1,
            "dtype": str(up.dtype),
            "crs": crs,
            "transform": t * Affine.scale(1 / factor),
            "nodata": nodata,
            "compress": "deflate",
            "predictor": 2,
            "blocksize": 1024,
            "overview_resampling": "nearest" if name == "SCL" else "average",
            "num_threads": "all_cpus",
        }
        tmp = out / f".{name}.tif"
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(up, 1)
        tmp.rename(out / f"{name}.tif")
        del up
    return out


def _rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB: its resident memory now and at its peak so far."""
    out = {"VmRSS:": 0, "VmHWM:": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.split(":")[0] + ":" in out:
                out[line.split()[0]] = int(line.split()[1])
    except OSError:
        pass
    return out["VmRSS:"], out["VmHWM:"]


def _complete(path: Path) -> int:
    try:
        meta = json.loads((path / "zarr.json").read_text())["attributes"]["scenes"]
        return sum(1 for s in meta if s["complete"])
    except (OSError, ValueError, KeyError):
        return 0


def memory_run(scenes: int, resolution: float, workers: int) -> dict:
    """A real-size cell through `clearsky prefetch` in a child process: peak RSS and RSS as the
    scenes go by."""
    cogs = realsize_cogs()
    tmp = Path(tempfile.mkdtemp(prefix="clearsky-bench-memory-", dir=ROOT / "bench" / ".data"))
    files = tmp / "files"
    files.mkdir()
    (files / "real").symlink_to(cogs)
    port = ss.free_port()
    base = f"http://127.0.0.1:{port}"
    items = rkh_items(files, base, scenes, src="real")
    server = ss.FileServer(files, port)
    stac = ss.StacServer(ss.write_catalogue(tmp / "cat", items), ss.free_port(), tmp)
    data = tmp / "data"
    server.start()
    stac.start()
    try:
        cmd = [
            sys.executable, "-m", "compositor.cli", "prefetch", "29RKH",
            "--resolution", f"{resolution:g}", "--collection", ss.S2_OLD,
            "--start", "2016-01-01", "--end", f"{2016 + scenes * 5 // 365}-12-31",
            "--limit", str(scenes),
            "--stac-url", stac.url, "--data", str(data), "--workers", str(workers),
            "--no-dem", "--no-progress",
        ]  # fmt: skip
        log = open(tmp / "prefetch.log", "w")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        samples: list[tuple[float, int, int, int]] = []  # (s, scenes complete, RSS, HWM kB)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(
                    (time.perf_counter() - t0, _complete(data / "29RKH.zarr"), *_rss_kb(proc.pid))
                )
                stop.wait(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        stop.set()
        th.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.close()
        if proc.returncode != 0:
            raise RuntimeError((tmp / "prefetch.log").read_text()[-3000:])
        done = _complete(data / "29RKH.zarr")
        disk = sum(f.stat().st_size for f in (data / "29RKH.zarr").rglob("*") if f.is_file())
    finally:
        stac.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    from compositor.prefetch import target_grid

    g = target_grid("29RKH", resolution)
    scene_mb = g.width * g.height * 9 / 1e6  # 4 uint16 bands + SCL
    at = {}
    for q in (0.25, 0.5, 0.75, 1.0):  # the peak RSS (VmHWM) up to each share of the scenes
        upto = [hwm for _, n, _, hwm in samples if n <= max(1, round(q * scenes))]
        at[f"{int(q * 100)}%"] = max(upto, default=0) / 1024
    return {
        "resolution_m": resolution,
        "grid_px": [g.width, g.height],
        "scenes": done,
        "workers": workers,
        "seconds": seconds,
        "scene_mb_in_memory": scene_mb,
        # The kernel's peak for the child (wait4), and the highest VmHWM sampled while it ran.
        "peak_rss_mb": usage.ru_maxrss / 1024,  # kB on Linux
        "peak_hwm_sampled_mb": max((s[3] for s in samples), default=0) / 1024,
        "rss_mb_up_to": at,
        "disk_gb": disk / 1e9,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=12, help="scenes per resolution")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--source", choices=("rkh", "synthetic"), default=None)
    p.add_argument("--memory-scenes", type=int, default=100, help="60 m real-size run")
    p.add_argument("--memory-scenes-10m", type=int, default=4, help="10 m real-size runs")
    p.add_argument(
        "--memory-workers-10m", default="1,3", help="--workers of the 10 m runs, e.g. 1,3"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the real-size memory runs")
    p.add_argument("--no-throughput", action="store_true", help="only the memory runs")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    a = p.parse_args()
    source = a.source or ("rkh" if ss.RKH_ITEM.exists() else "synthetic")
    res: dict = {} if a.no_throughput else run(a.scenes, a.workers, source)
    if not a.no_memory and ss.RKH_ITEM.exists():
        runs = [(a.memory_scenes, 60.0, a.workers)] + [
            (a.memory_scenes_10m, 10.0, int(w)) for w in a.memory_workers_10m.split(",")
        ]
        res["memory"] = [memory_run(n, r, w) for n, r, w in runs if n > 0]
    if a.json:
        print(json.dumps(res, indent=2))
        return
    if res.get("memory"):
        print_memory(res["memory"])
    if a.no_throughput:
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


def print_memory(runs: list[dict]) -> None:
    print(
        "memory: `clearsky prefetch` of a real-size cell (10980 x 10980 px COGs at 10 m) from "
        "127.0.0.1, child process"
    )
    print(
        f"{'res m':>6} {'grid':>11} {'scenes':>6} {'workers':>7} {'s':>6} {'MB/scene':>8} "
        f"{'peak RSS MB':>11} {'peak RSS MB by 25/50/75/100 % of scenes':>41} {'disk GB':>7}"
    )
    for r in runs:
        g = f"{r['grid_px'][0]}x{r['grid_px'][1]}"
        by = " / ".join(f"{v:.0f}" for v in r["rss_mb_up_to"].values())
        print(
            f"{r['resolution_m']:>6g} {g:>11} {r['scenes']:>6} {r['workers']:>7} "
            f"{r['seconds']:>6.0f} {r['scene_mb_in_memory']:>8.0f} {r['peak_rss_mb']:>11.0f} "
            f"{by:>41} {r['disk_gb']:>7.2f}"
        )
    print()


if __name__ == "__main__":
    main()
