"""Tile latency through the real HTTP server, and the stock titiler-ecosystem mosaic beside it.

    python bench/tiles.py [--tiles 60] [--json]

Builds (once, reused from bench/.data/) a synthetic 100-scene stack of 2048 x 2048 px at 10 m
(20.5 km x 20.5 km) with SCL and the shipped model's cloud masks, and the same scenes as 100 RGB
COGs. Then, in one run:
- ClearSky through `clearsky serve` on 127.0.0.1: cold tiles at the native zoom, cold tiles at a
  low zoom where one tile covers the whole stack (cold = a percentile never asked before, so the
  tile cache cannot answer), the same native tiles again (cached), and, in a fresh server
  process, the native tiles with mask=segformer;
- rio-tiler's `mosaic_reader` with `MedianMethod` over the 100 COGs for the same native tiles
  (in-process, so it pays no HTTP: the comparison favours the baseline);
- a per-stage breakdown of ClearSky's cold tiles, as the server reports it in Server-Timing
  (plain, with the DEM hillshade blended in, and with mask=segformer);
- in a fresh server process, the first tile of each kind (composite, mask=segformer,
  hillshade, count, date, @2x) against later tiles of that kind: what the warm-up misses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import morecantile  # noqa: E402
import rasterio  # noqa: E402
from rio_tiler.io import Reader  # noqa: E402
from rio_tiler.mosaic import mosaic_reader  # noqa: E402
from rio_tiler.mosaic.methods import MedianMethod  # noqa: E402

from compositor.demo import SYNTH_CELL, build_synthetic  # noqa: E402
from compositor.grid import transform_bounds_to_lonlat  # noqa: E402
from compositor.masks.model import load_model  # noqa: E402
from compositor.masks.predict import mask_stack  # noqa: E402
from compositor.stack import Stack, StackError  # noqa: E402
from tileserver.timing import parse as parse_server_timing  # noqa: E402

TMS = morecantile.tms.get("WebMercatorQuad")
DATA = ROOT / "bench" / ".data" / "tiles"
SIZE, DATES, SEED = 2048, 100, 11


def build_stack() -> Stack:
    """The bench stack with SCL and the shipped model's cloud masks (both built once)."""
    path = DATA / f"{SYNTH_CELL}.zarr"
    try:
        st = Stack.open(path)
        built = st.meta.get("built") and len(st.complete_indices()) == DATES
    except StackError:
        built = False
    if not built:
        print(f"building the {DATES}-scene {SIZE}x{SIZE} bench stack (once) ...", flush=True)
        build_synthetic(DATA, seed=SEED, size=SIZE, n_dates=DATES)
    mask_stack(path, model=load_model())  # scenes already masked are skipped
    return Stack.open(path)


def build_cogs(stack: Stack) -> list[str]:
    """The same scenes as RGB COGs (deflate, 512 px blocks, overviews): the standard way."""
    out = DATA / "cogs"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    band_idx = [stack.bands.index(b) for b in ("B04", "B03", "B02")]
    for t in stack.complete_indices():
        p = out / f"{stack.scenes[t].id}.tif"
        paths.append(str(p))
        if p.exists():
            continue
        refl = stack.read(
            0, (0, 0, stack.height, stack.width), np.array([t]), ("reflectance",), bands=band_idx
        )["reflectance"][0]
        profile = dict(
            driver="COG",
            width=stack.width,
            height=stack.height,
            count=3,
            dtype="uint16",
            nodata=0,
            crs=f"EPSG:{stack.epsg}",
            transform=stack.transform,
            compress="DEFLATE",
            blocksize=512,
            overview_resampling="average",
        )
        tmp = p.with_suffix(".tmp.tif")
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(refl)
        tmp.rename(p)
    return paths


def native_tiles(stack: Stack, n: int, rng: np.random.Generator) -> tuple[int, list]:
    w, s, e, nn = transform_bounds_to_lonlat(stack.epsg, stack.bounds)
    z = TMS.zoom_for_res(stack.resolution)  # the zoom whose pixels match 10 m
    inner = [t for t in TMS.tiles(w, s, e, nn, [z]) if _inside(TMS.bounds(t), (w, s, e, nn))]
    pick = rng.choice(len(inner), size=min(n, len(inner)), replace=False)
    return z, [inner[i] for i in pick]


def whole_stack_tile(stack: Stack):
    w, s, e, n = transform_bounds_to_lonlat(stack.epsg, stack.bounds)
    for z in range(16, -1, -1):
        tiles = list(TMS.tiles(w, s, e, n, [z]))
        if len(tiles) == 1:
            return tiles[0]
    raise RuntimeError("no single tile covers the stack")


def _inside(b, outer) -> bool:
    return b.left > outer[0] and b.bottom > outer[1] and b.right < outer[2] and b.top < outer[3]


def pct(values: list[float]) -> dict:
    a = np.asarray(values) * 1000
    return {
        "n": len(a),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
    }


def start_server(port: int) -> subprocess.Popen:
    env = {**os.environ, "CLEARSKY_DATA_DIR": str(DATA), "CLEARSKY_TILE_CACHE_MB": "512"}
    log = open(DATA / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "compositor.cli", "serve", "--port", str(port), "--data", str(DATA)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def timed_get(client: httpx.Client, url: str, params: dict, stages: list | None = None) -> float:
    """Seconds for one GET; the server's per-stage times (Server-Timing) go to ``stages``."""
    t0 = time.perf_counter()
    r = client.get(url, params=params)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{url} {params}: {r.status_code} {r.text[:200]}")
    if stages is not None:
        stages.append(parse_server_timing(r.headers.get("server-timing", "")))
    return dt


def stage_medians(stages: list[dict[str, float]]) -> dict[str, float]:
    names = dict.fromkeys(k for s in stages for k in s)
    return {k: float(np.median([s.get(k, 0.0) for s in stages])) for k in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=60, help="random native-zoom tiles")
    ap.add_argument("--baseline-tiles", type=int, default=12)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    stack = build_stack()
    cogs = build_cogs(stack)
    z, tiles = native_tiles(stack, args.tiles, rng)
    low = whole_stack_tile(stack)

    proc = start_server(args.port)
    base = f"http://127.0.0.1:{args.port}/cells/{SYNTH_CELL}/tiles/WebMercatorQuad"
    res: dict = {
        "stack": {
            "scenes": DATES,
            "size_px": SIZE,
            "resolution_m": 10,
            "native_zoom": z,
            "low_zoom": low.z,
        }
    }
    try:
        with httpx.Client(timeout=60) as client:
            # Warm-up: JIT-compiled kernels load from numba's cache in the server process.
            for t in tiles[:3]:
                timed_get(client, f"{base}/{t.z}/{t.x}/{t.y}.png", {"percentile": 1})
            cold_stages: list[dict[str, float]] = []
            cold = [
                timed_get(client, f"{base}/{t.z}/{t.x}/{t.y}.png", {}, cold_stages) for t in tiles
            ]
            cached = [timed_get(client, f"{base}/{t.z}/{t.x}/{t.y}.png", {}) for t in tiles]
            lowt = [
                timed_get(
                    client, f"{base}/{low.z}/{low.x}/{low.y}.png", {"percentile": 20 + i * 0.25}
                )
                for i in range(12)
            ]
            # The same tiles again with the DEM hillshade blended in (fresh percentiles: cold).
            shade_stages: list[dict[str, float]] = []
            for i, t in enumerate(tiles[:20]):
                params = {"hillshade": 0.5, "percentile": 26 + i * 0.01}
                timed_get(client, f"{base}/{t.z}/{t.x}/{t.y}.png", params, shade_stages)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # In a fresh server process: the first tile of each kind against later ones of that kind
    # (does the warm-up cover every stage a first tile uses?), then the same tiles with the
    # model's masks.
    proc = start_server(args.port)
    first_tiles: dict[str, dict] = {}
    try:
        with httpx.Client(timeout=60) as client:
            date = client.get(f"http://127.0.0.1:{args.port}/cells").json()[0]["dates"][40]
            kinds = {
                "composite": ({}, tiles[-8:-4]),
                "mask=segformer": ({"mask": "segformer"}, tiles[-12:-8]),
                "hillshade": ({"hillshade": 0.5}, tiles[-16:-12]),
                "count": ({"layer": "count"}, tiles[-20:-16]),
                "date": ({"layer": "date", "date": date}, tiles[-24:-20]),
                "@2x": ({"tilesize": 512}, tiles[-28:-24]),
            }
            for kind, (params, ts) in kinds.items():
                # each request a new percentile: never served from a cache
                times = [
                    timed_get(
                        client,
                        f"{base}/{t.z}/{t.x}/{t.y}.png",
                        {**params, "percentile": 30 + i * 0.37 + len(kind) * 0.01},
                    )
                    for i, t in enumerate(ts)
                ]
                later = float(np.median(times[1:]))
                first_tiles[kind] = {
                    "first_ms": times[0] * 1000,
                    "later_ms": later * 1000,
                    "ratio": times[0] / later,
                }
            seg_stages: list[dict[str, float]] = []
            seg = [
                timed_get(
                    client, f"{base}/{t.z}/{t.x}/{t.y}.png", {"mask": "segformer"}, seg_stages
                )
                for t in tiles
            ]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    res["clearsky_cold_native"] = pct(cold)
    res["clearsky_cold_native_segformer"] = pct(seg)
    res["clearsky_cold_whole_stack"] = pct(lowt)
    res["clearsky_cached"] = pct(cached)
    res["first_tile_of_each_kind"] = first_tiles

    # The stock mosaic: rio-tiler mosaic_reader + MedianMethod over 100 COGs.
    def cog_tile(asset, x, y, zz):
        with Reader(asset) as src:
            return src.tile(x, y, zz, resampling_method="bilinear")

    bt = []
    for t in tiles[: args.baseline_tiles]:
        t0 = time.perf_counter()
        mosaic_reader(cogs, cog_tile, t.x, t.y, t.z, pixel_selection=MedianMethod(), threads=2)
        bt.append(time.perf_counter() - t0)
    res["rio_tiler_mosaic_median"] = pct(bt)

    # Where a cold tile's time goes, as the server measured it (Server-Timing, ms).
    res["stages_ms"] = stage_medians(cold_stages)
    res["stages_hillshade_ms"] = stage_medians(shade_stages)
    res["stages_segformer_ms"] = stage_medians(seg_stages)
    res["speedup_vs_mosaic_p50"] = (
        res["rio_tiler_mosaic_median"]["p50"] / res["clearsky_cold_native"]["p50"]
    )

    print(
        f"\nstack: {DATES} scenes, {SIZE}x{SIZE} px at 10 m; native zoom {z}, whole-stack "
        f"tile at zoom {low.z}; 2 cores"
    )
    print(f"{'path':40} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for key, label in [
        ("clearsky_cold_native", "ClearSky cold, native zoom (HTTP)"),
        ("clearsky_cold_native_segformer", "  same, mask=segformer (HTTP)"),
        ("clearsky_cold_whole_stack", "ClearSky cold, whole-stack tile (HTTP)"),
        ("clearsky_cached", "ClearSky cached (HTTP)"),
        ("rio_tiler_mosaic_median", "rio-tiler mosaic_reader Median (in-proc)"),
    ]:
        p = res[key]
        print(f"{label:40} {p['n']:>4} {p['p50']:>8.1f} {p['p95']:>8.1f} {p['p99']:>8.1f}")
    print(
        f"\nClearSky cold native vs rio-tiler mosaic (p50): "
        f"{res['speedup_vs_mosaic_p50']:.1f}x faster"
    )
    for key, label in (
        ("stages_ms", "default"),
        ("stages_hillshade_ms", "hillshade 0.5"),
        ("stages_segformer_ms", "mask=segformer"),
    ):
        st = res[key]
        print(
            f"stage breakdown, {label} (median ms, cold native tiles, from Server-Timing): "
            + ", ".join(f"{k} {v:.1f}" for k, v in st.items())
            + f"; slowest: {max((k for k in st if k != 'total'), key=st.get)}"
        )
    print("\nfirst tile of each kind in a fresh server vs the median of 3 later ones (cold):")
    for kind, f in first_tiles.items():
        print(
            f"  {kind:16} first {f['first_ms']:7.1f} ms, later {f['later_ms']:7.1f} ms, "
            f"ratio {f['ratio']:.2f}"
        )
    if args.json:
        print(json.dumps({"tiles": res}))


if __name__ == "__main__":
    main()
