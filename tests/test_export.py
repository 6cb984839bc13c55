"""`clearsky export`: a region as a PMTiles archive (+ MBTiles, or a {z}/{x}/{y} folder) and a
static web map. Real clients only: the `pmtiles` package and GDAL (rasterio) read the files, the
tiles are compared with the real tile server's PNGs, headless Chromium opens the page served by
a static web server (RangeHTTPServer, and Python's http.server for the folder layout) with no
request allowed anywhere else, and an export killed midway finishes correctly on a rerun."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pytest
from affine import Affine
from conftest import free_port, serve, static_server
from PIL import Image

from compositor.demo import SYNTH_CELL
from compositor.stack import Scene, Stack

TMS = morecantile.tms.get("WebMercatorQuad")
PARAMS = {"percentile": "30", "hillshade": "0.4"}
ZOOMS = (12, 15)


def clearsky(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "compositor.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_params(params: dict[str, str]) -> list[str]:
    return [a for k, v in params.items() for a in (f"--{k.replace('_', '-')}", v)]


def rgba(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))


def archive_tiles(path: Path) -> dict[tuple[int, int, int], bytes]:
    from pmtiles.reader import MmapSource, all_tiles

    with open(path, "rb") as f:
        return dict(all_tiles(MmapSource(f)))


@pytest.fixture(scope="module")
def exported(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The synthetic cell exported as a user would: the CLI, rendering on two threads."""
    out = tmp_path_factory.mktemp("site") / "map"
    r = clearsky(
        "export",
        SYNTH_CELL,
        "--data",
        str(demo_dir),
        "--minzoom",
        str(ZOOMS[0]),
        "--maxzoom",
        str(ZOOMS[1]),
        "--out",
        str(out),
        "--mbtiles",
        "--workers",
        "2",
        "--no-progress",
        *cli_params(PARAMS),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


# ------------------------------------------------------------------------ files and pixels
def test_archive_reads_back_and_equals_the_server(exported, server):
    from pmtiles.reader import MmapSource, Reader
    from pmtiles.tile import TileType

    out, stdout = exported
    archive = out / f"{SYNTH_CELL}.pmtiles"
    with open(archive, "rb") as f:
        reader = Reader(MmapSource(f))
        header, meta = reader.header(), reader.metadata()
    assert header["tile_type"] == TileType.PNG
    assert (header["min_zoom"], header["max_zoom"]) == ZOOMS
    assert meta["attribution"] == "Contains modified Copernicus Sentinel data"
    given = meta["clearsky"]["parameters"]
    assert {k: float(v) for k, v in given.items()} == {k: float(v) for k, v in PARAMS.items()}
    cells = {c["id"]: c for c in httpx.get(f"{server}/cells").json()}
    lon, lat = cells[SYNTH_CELL]["center"]
    assert header["min_lon_e7"] / 1e7 < lon < header["max_lon_e7"] / 1e7
    assert header["min_lat_e7"] / 1e7 < lat < header["max_lat_e7"] / 1e7

    tiles = archive_tiles(archive)
    assert {z for z, _, _ in tiles} == set(range(ZOOMS[0], ZOOMS[1] + 1))
    # Every tile of the cell's box: the archive holds exactly those the server draws pixels in,
    # with the server's pixels.
    w, s, e, n = cells[SYNTH_CELL]["bounds"]
    for t in TMS.tiles(w, s, e, n, zooms=list(range(ZOOMS[0], ZOOMS[1] + 1))):
        url = f"{server}/cells/{SYNTH_CELL}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png"
        r = httpx.get(url, params=PARAMS, timeout=120)
        drawn = r.status_code == 200 and rgba(r.content)[..., 3].any()
        key = (t.z, t.x, t.y)
        assert drawn == (key in tiles), key
        if drawn:
            assert np.array_equal(rgba(tiles[key]), rgba(r.content)), key
    assert "wrote" in stdout and '<iframe src="map/index.html"' in stdout


def test_mbtiles_opens_in_gdal_with_the_same_pixels(exported, server):
    import rasterio
    from rasterio.windows import Window

    out, _ = exported
    tiles = archive_tiles(out / f"{SYNTH_CELL}.pmtiles")
    with rasterio.open(out / f"{SYNTH_CELL}.mbtiles") as ds:
        assert ds.driver == "MBTiles" and ds.count == 4
        assert ds.overviews(1)  # the coarser zooms
        assert ds.tags()["attribution"] == "Contains modified Copernicus Sentinel data"
        # The finest zoom is GDAL's full resolution: a tile there is a window of the dataset.
        z, x, y = max(
            (k for k in tiles if k[0] == ZOOMS[1]),
            key=lambda k: int((rgba(tiles[k])[..., 3] > 0).sum()),
        )
        b = TMS.xy_bounds(morecantile.Tile(x, y, z))
        col, row = ~ds.transform @ (b.left, b.top)
        win = Window(round(col), round(row), 256, 256)
        got = ds.read(window=win, boundless=True).transpose(1, 2, 0)
    url = f"{server}/cells/{SYNTH_CELL}/tiles/WebMercatorQuad/{z}/{x}/{y}.png"
    want = rgba(httpx.get(url, params=PARAMS, timeout=120).content)
    inside = got[..., 3] > 0  # GDAL's extent is the metadata bounds, inside the tile
    assert inside.sum() > 1000
    assert np.array_equal(got[inside], want[inside])


def _neighbour(data: Path, seed: int = 11, size: int = 256) -> None:
    """A second synthetic cell overlapping the demo's: its east half lies over the demo cell."""
    from compositor.synthetic import make_synthetic

    demo = Stack.open(data / f"{SYNTH_CELL}.zarr")
    syn = make_synthetic(seed=seed, size=size, n_dates=8)
    t = demo.transform
    st = Stack.create(
        data / "49NDA.zarr",
        "49NDA",
        demo.epsg,
        Affine(10, 0, t.c - size * 5, 0, -10, t.f - 1000),
        size,
        size,
        meta={"kind": "synthetic", "title": "overlapping neighbour"},
    )
    for i, d in enumerate(syn.dates):
        sc = Scene(id=f"N_{d:%Y%m%d}", datetime=f"{d.isoformat()}T03:00:00Z", cloud_cover=50.0)
        st.append_scene(sc, syn.reflectance[i], syn.scl[i])


@pytest.fixture
def dask_scheduler() -> Iterator[str]:
    """A real Dask cluster (scheduler and two worker processes) on 127.0.0.1."""
    from dask.distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    ) as cluster:
        yield cluster.scheduler_address


def test_seams_between_cells_equal_the_global_layer(demo_dir, tmp_path, dask_scheduler):
    """Two overlapping cells rendered on a Dask cluster: the exported tiles are the server's
    global layer, tile by tile, the seam included (the first cell by id gives a pixel both
    have)."""
    from compositor.mosaic import tile_touches

    data = tmp_path / "data"
    data.mkdir()
    os.symlink(demo_dir / f"{SYNTH_CELL}.zarr", data / f"{SYNTH_CELL}.zarr")
    _neighbour(data)
    out = tmp_path / "seam"
    r = clearsky(
        "export", "--bbox", "-180,-80,180,80", "--data", str(data), "--out", str(out),
        "--minzoom", "14", "--maxzoom", "15", "--scheduler", dask_scheduler, "--no-progress",
        "--percentile", "40",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    tiles = archive_tiles(out / "49NDA-49NDB.pmtiles")
    stacks = [Stack.open(data / "49NDA.zarr"), Stack.open(data / f"{SYNTH_CELL}.zarr")]
    both = [
        k
        for k in tiles
        if all(tile_touches(s, TMS, morecantile.Tile(k[1], k[2], k[0])) for s in stacks)
    ]
    assert both, "no exported tile spans the two cells"
    # A small --bbox inside the demo cell just east of the neighbour: only the demo cell
    # overlaps it, but its westernmost tiles reach into the neighbour, as in the global layer.
    from compositor.grid import transform_bounds_to_lonlat

    east = transform_bounds_to_lonlat(stacks[0].epsg, stacks[0].bounds)[2]
    _, s_, _, n_ = transform_bounds_to_lonlat(stacks[1].epsg, stacks[1].bounds)
    bbox = f"{east + 0.001},{s_ + 0.005},{east + 0.01},{n_ - 0.005}"
    small = tmp_path / "small"
    r = clearsky(
        "export", "--bbox", bbox, "--data", str(data), "--out", str(small), "--minzoom", "14",
        "--maxzoom", "14", "--workers", "1", "--no-progress", "--percentile", "40",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    edge = archive_tiles(small / f"{SYNTH_CELL}.pmtiles")
    assert any(tile_touches(stacks[0], TMS, morecantile.Tile(k[1], k[2], k[0])) for k in edge)
    with serve(data) as url:
        for got in (tiles, edge):
            for z, x, y in got:
                want = httpx.get(
                    f"{url}/tiles/WebMercatorQuad/{z}/{x}/{y}.png",
                    params={"percentile": "40"},
                    timeout=120,
                )
                assert np.array_equal(rgba(got[(z, x, y)]), rgba(want.content)), (z, x, y)


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "args, name",
    [
        (["--percentile", "101"], "percentile"),
        (["--months", "1,13"], "months"),
        (["--mask", "magic"], "mask"),
        (["--layer", "date"], "date"),
        (["--start", "2022-13-01"], "start"),
        (["--start", "2022-05-01", "--end", "2022-01-01"], "start"),
        (["--rescale", "5,1"], "rescale"),
        (["--hillshade", "1.5"], "hillshade"),
        (["--maxzoom", "19"], "zoom"),
        (["--minzoom", "15", "--maxzoom", "12"], "empty zoom range"),
        (["--format", "gif"], "format"),
        (["--layout", "tar"], "layout"),
        (["--start", "1990-01-01", "--end", "1990-02-01"], "no cell"),
        (["--layer", "date", "--date", "1990-01-01"], "no cell"),
        (["--name", "../up"], "name"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(demo_dir, tmp_path, args, name):
    """The server's parameter rules (a 422 there, see test_api), and the export's own."""
    from typer.testing import CliRunner

    from compositor.cli import app

    out = tmp_path / "out"
    r = CliRunner().invoke(
        app, ["export", SYNTH_CELL, "--data", str(demo_dir), "--out", str(out), *args]
    )
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], r.stderr
    assert not out.exists()  # nothing written


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give CELL ids or --bbox"),
        (["54SUE"], "no stack for cell 54SUE"),
        (["--bbox", "0,0,1,1"], "no cell in"),
        (["nonsense"], "invalid Sentinel-2 cell id"),
        (["--bbox", "10,0,5,1"], "bbox"),
    ],
)
def test_bad_region_is_one_line_and_exit_2(demo_dir, tmp_path, args, message):
    from typer.testing import CliRunner

    from compositor.cli import app

    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["export", *args, "--data", str(demo_dir), "--out", str(out)])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not out.exists()


# ------------------------------------------------------------------------ interrupted exports
def test_killed_export_leaves_nothing_complete_and_a_rerun_finishes(demo_dir, tmp_path):
    from compositor.export import plan_export, render_chunk

    out = tmp_path / "killed"
    args = [
        "export", SYNTH_CELL, "--data", str(demo_dir), "--out", str(out), "--minzoom", "10",
        "--maxzoom", "16", "--workers", "1", "--no-progress", "--percentile", "35",
    ]  # fmt: skip
    work = out / f".{SYNTH_CELL}.work.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "compositor.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        stored = 0
        while stored < 30:  # the size-estimate samples and at least one chunk are in
            assert proc.poll() is None, "the export ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
            if work.exists():
                try:
                    with sqlite3.connect(work, timeout=1) as db:
                        stored = db.execute("SELECT count(*) FROM tiles").fetchone()[0]
                except sqlite3.OperationalError:  # created but no table yet
                    continue
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (out / f"{SYNTH_CELL}.pmtiles").exists()
    assert not (out / "index.html").exists()

    r = clearsky(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = int(r.stdout.split(" done by an earlier run")[0].rsplit(", ", 1)[1])
    assert resumed >= 30
    assert not work.exists()
    # The archive holds every tile, each equal to one rendered now in one go.
    plan = plan_export(demo_dir, [SYNTH_CELL], None, 10, 16, {"percentile": "35"}, out)
    want = {
        k: v
        for k, v in render_chunk((str(plan.cells[0][1]),), plan.tiles, plan.view, "png")
        if v is not None
    }
    assert archive_tiles(out / f"{SYNTH_CELL}.pmtiles") == want


# ------------------------------------------------------------------------ in a browser
CHROMIUM = os.environ.get("CLEARSKY_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
# The map's tiles as the page shows them: loaded, with opaque pixels and some contrast.
TILES_JS = """() => [...document.querySelectorAll('.leaflet-tile-container img')]
  .filter((img) => img.complete && img.naturalWidth > 0 && img.style.display !== 'none')
  .map((img) => {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d');
    g.drawImage(img, 0, 0);
    const d = g.getImageData(0, 0, c.width, c.height).data;
    let n = 0, s = 0, s2 = 0;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i + 3] === 0) continue;
      const v = (d[i] + d[i + 1] + d[i + 2]) / 3;
      n += 1; s += v; s2 += v * v;
    }
    const mean = n ? s / n : 0;
    return {opaque: n, std: n ? Math.sqrt(Math.max(s2 / n - mean * mean, 0)) : 0};
  })"""
READY_JS = """() => {
  const x = window.clearskyExport;
  if (!x || x.layer.isLoading()) return false;
  const imgs = [...document.querySelectorAll('.leaflet-tile-container img')];
  return imgs.length > 0 && imgs.every((i) => i.style.display === 'none' || i.complete);
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser tests need Debian's Chromium at {CHROMIUM} (`make browser`)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is absent")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_confined(browser, origin: str, url: str) -> tuple:
    """A page at ``url`` that may only talk to ``origin``: anything else is refused and noted.
    Returns (page, problems, requests)."""
    ctx = browser.new_context(viewport={"width": 900, "height": 600})
    page = ctx.new_page()
    page.set_default_timeout(60_000)
    problems: list[str] = []
    requests: list[str] = []

    def route(r) -> None:
        u = r.request.url
        if u.startswith(origin + "/") or u.startswith(("data:", "blob:")):
            r.continue_()
        else:
            problems.append(f"request outside the static server: {u}")
            r.abort()

    ctx.route("**/*", route)
    page.on("request", lambda req: requests.append(req.url))
    page.on(
        "console",
        lambda m: m.type == "error" and problems.append(f"console: {m.text}"),
    )
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("requestfailed", lambda req: problems.append(f"failed: {req.url} {req.failure}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status} {r.url}"))
    page.goto(url)
    return page, problems, requests


def check_map(frame) -> None:
    frame.wait_for_function(READY_JS)
    tiles = frame.evaluate(TILES_JS)
    assert tiles, "no tile shown"
    assert any(t["opaque"] > 1000 and t["std"] > 3 for t in tiles), tiles  # imagery, not blank
    attribution = frame.inner_text(".leaflet-control-attribution")
    assert "Contains modified Copernicus Sentinel data" in attribution
    assert frame.locator(".leaflet-control-scale").count() == 1


def test_page_shows_the_archive_from_a_static_range_server(exported, browser):
    """No ClearSky server involved: the folder on RangeHTTPServer, the map in a blog post's
    iframe (the printed snippet) and on its own; no request leaves that server."""
    import stac_servers as ss

    out, stdout = exported
    site = out.parent
    snippet = next(line for line in stdout.splitlines() if line.startswith("<iframe"))
    (site / "post.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
        f"</head><body><h1>A post</h1>{snippet}</body></html>"
    )
    files = ss.FileServer(site, free_port())
    files.start()
    try:
        page, problems, requests = open_confined(browser, files.url, f"{files.url}/post.html")
        frame = page.frame_locator("iframe")  # wait for the iframe, then use its frame
        frame.locator("#map").wait_for()
        check_map(next(f for f in page.frames if f.url.endswith("/map/index.html")))
        page.goto(f"{files.url}/map/index.html")
        check_map(page)
        page.evaluate("() => window.clearskyExport.map.zoomIn()")
        check_map(page)
        page.context.close()
        assert not problems, "\n".join(problems)
        assert any(u.endswith("/map/map.pmtiles") or u.endswith(".pmtiles") for u in requests)
        # The archive was read in ranges, never whole.
        size = (out / f"{SYNTH_CELL}.pmtiles").stat().st_size
        reads = [n for path, n in files.requests() if path.endswith(".pmtiles")]
        assert reads and max(reads) < size, (reads, size)
    finally:
        files.stop()


def test_xyz_folder_works_without_range_support(demo_dir, tmp_path, browser):
    """--layout xyz (here WebP; one rendering thread per core, the default) on Python's
    http.server, which has no Range support."""
    out = tmp_path / "xyz"
    r = clearsky(
        "export", SYNTH_CELL, "--data", str(demo_dir), "--out", str(out), "--minzoom", "13",
        "--maxzoom", "14", "--layout", "xyz", "--format", "webp", "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(out.glob("*.pmtiles"))
    assert list((out / "tiles").glob("14/*/*.webp"))
    with static_server(out) as origin:
        page, problems, requests = open_confined(browser, origin, f"{origin}/index.html")
        check_map(page)
        page.evaluate("() => window.clearskyExport.map.zoomIn()")
        check_map(page)
        page.context.close()
        assert not problems, "\n".join(problems)  # no 404: every tile asked for is there
        assert any("/tiles/14/" in u and u.endswith(".webp") for u in requests)
