"""search + prefetch against real servers on 127.0.0.1 (rustac STAC API, RangeHTTPServer COGs).

Nothing here is faked: the code under test opens the STAC API with pystac-client and reads the
COGs with GDAL range requests exactly as it does against Earth Search and S3; only the hosts are
local. Data: the real 29RKH item and COGs, the real Romania cube as items, synthetic scenes for
the offset conventions and a corrupt COG, and a smooth synthetic DEM as Copernicus-like tiles.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import stac_servers as ss
from conftest import needs_shared
from rasterio.enums import Resampling
from typer.testing import CliRunner

from compositor.cli import app
from compositor.grid import transform_bounds_to_lonlat
from compositor.prefetch import (
    PrefetchError,
    dn_offset,
    estimate_disk,
    prefetch,
    target_grid,
)
from compositor.search import (
    SearchQuery,
    item_tile,
    mask_text,
    mask_url,
    month_windows,
    open_client,
    processing_baseline,
    search,
    select_scenes,
)
from compositor.stack import Stack

SYN_SIZE = 192
SYN_DATES = 10
ALL_DATES = ("--start", "2015-01-01", "--end", "2025-12-31")
FAST_RETRY = ("--retries", "1", "--backoff", "0.05", "--no-progress")


@dataclass
class Servers:
    root: Path
    files: ss.FileServer
    stac: ss.StacServer
    items: dict[str, dict]
    syn: object  # compositor.synthetic.SyntheticCell

    def syn_items(self) -> list[dict]:
        return [i for i in self.items.values() if ss.SYNTH_CELL in i["id"]]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("stac")
    files = root / "files"
    files.mkdir()
    port = ss.free_port()
    base = f"http://127.0.0.1:{port}"
    items: list[dict] = []
    boxes = []
    if ss.RKH_ITEM.exists():
        items.append(ss.build_rkh(files, base))
        boxes.append(tuple(items[-1]["bbox"]))
    if ss.ROMANIA_NC.exists():
        ro = ss.build_romania(files, base, every=2)
        items += ro
        boxes.append(tuple(ro[0]["bbox"]))
    syn_items, syn = ss.build_synthetic(files, base, size=SYN_SIZE, n_dates=SYN_DATES)
    items += syn_items
    boxes.append(tuple(syn_items[0]["bbox"]))
    items += ss.build_dem(files, base, boxes)
    fs = ss.FileServer(files, port)
    fs.start()
    st = ss.StacServer(ss.write_catalogue(root / "catalogue", items), ss.free_port(), root)
    try:
        st.start()
        yield Servers(root, fs, st, {i["id"]: i for i in items}, syn)
    finally:
        st.stop()
        fs.stop()


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args))
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def _syn_bbox() -> tuple[float, float, float, float]:
    c, _, bounds = ss.synth_grid(SYN_SIZE)
    return transform_bounds_to_lonlat(c.epsg, bounds)


def _bbox_arg(b: tuple[float, ...]) -> str:
    return ",".join(f"{v:.6f}" for v in b)


def _valid(refl: np.ndarray, scl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The prefetch's one validity rule, applied to expected arrays."""
    refl, scl = refl.copy(), scl.copy()
    bad = (scl == 0) | np.any(refl == 0, axis=0)
    refl[:, bad] = 0
    scl[bad] = 0
    return refl, scl


def _cog(href_root: Path, item: dict, key: str) -> Path:
    return href_root / item["assets"][key]["href"].split("/", 3)[3]


# --------------------------------------------------------------------------- metadata rules
@needs_shared(ss.RKH_ITEM)
def test_real_item_tile_baseline_and_offset_rules():
    d = json.loads(ss.RKH_ITEM.read_text())
    item = pystac.Item.from_dict(d)
    assert item_tile(item) == "29RKH"
    assert processing_baseline(item) == "02.14"
    assert dn_offset(item, item.assets["blue"])[0] == 0

    def variant(**props: object) -> pystac.Item:
        v = json.loads(json.dumps(d))
        v["properties"].update(props)
        v["assets"]["blue"]["raster:bands"][0]["offset"] = -0.1
        return pystac.Item.from_dict(v)

    # Earth Search says it removed the offset, raster:bands still declares -0.1: trust the flag.
    assert (
        dn_offset(
            variant(**{"s2:processing_baseline": "05.00", "earthsearch:boa_offset_applied": True})
        )[0]
        == 0
    )
    v = variant(**{"s2:processing_baseline": "05.10", "earthsearch:boa_offset_applied": False})
    assert dn_offset(v, v.assets["blue"]) == (1000, "raster:bands offset")
    # Only the baseline (or only the date) tells.
    bare = json.loads(json.dumps(d))
    bare["properties"]["s2:processing_baseline"] = "04.00"
    del bare["properties"]["earthsearch:boa_offset_applied"]
    assert dn_offset(pystac.Item.from_dict(bare))[0] == 1000
    del bare["properties"]["s2:processing_baseline"]
    assert dn_offset(pystac.Item.from_dict(bare))[0] == 0  # product_uri says N0214
    del bare["properties"]["s2:product_uri"]
    bare["properties"]["datetime"] = "2023-05-01T10:00:00Z"
    assert dn_offset(pystac.Item.from_dict(bare))[0] == 1000
    # Other tile naming styles.
    assert item_tile({"id": "S2B_T43QDB_20200110T053549_L2A", "properties": {}}) == "43QDB"
    assert item_tile({"id": "x", "properties": {"s2:mgrs_tile": "54SUE"}}) == "54SUE"


def test_month_windows_and_year_spread():
    w = month_windows(dt.date(2019, 1, 1), dt.date(2023, 12, 31), (6, 7, 8, 9))
    assert len(w) == 5 and all(a.month == 6 and b.month == 9 and b.day == 30 for a, b in w)
    wrap = month_windows(dt.date(2020, 1, 1), dt.date(2021, 12, 31), (12, 1, 2))
    assert [(a.date().isoformat(), b.date().isoformat()) for a, b in wrap] == [
        ("2020-01-01", "2020-02-29"),
        ("2020-12-01", "2021-02-28"),
        ("2021-12-01", "2021-12-31"),
    ]
    items = [
        pystac.Item(
            f"i{y}{k}",
            None,
            None,
            dt.datetime(y, 6, 1 + k, tzinfo=dt.UTC),
            {"eo:cloud_cover": float(10 * k + (y % 3))},
        )
        for y in (2019, 2020, 2021)
        for k in range(5)
    ]
    chosen = select_scenes(items, 7)
    years = Counter(i.datetime.year for i in chosen)
    assert sorted(years.values()) == [2, 2, 3]
    assert [i.datetime for i in chosen] == sorted(i.datetime for i in chosen)
    for y in years:  # the least cloudy of each year
        mine = sorted(
            (i for i in items if i.datetime.year == y), key=lambda i: i.properties["eo:cloud_cover"]
        )
        assert {i.id for i in chosen if i.datetime.year == y} == {i.id for i in mine[: years[y]]}


def test_urls_never_show_secrets():
    url = "https://user:pw@bucket.s3.amazonaws.com/a/B02.tif?X-Amz-Signature=abc&X-Amz-Date=1"
    m = mask_url(url)
    assert "pw" not in m and "abc" not in m and "X-Amz-Date=1" in m
    assert "abc" not in mask_text(f"GDAL: HTTP response code: 403 for {url} (retrying)")


# --------------------------------------------------------------------------- search
@needs_shared(ss.ROMANIA_NC)
def test_search_filters_on_a_real_stac_api(servers: Servers):
    client = open_client(servers.stac.url)
    q = SearchQuery(
        cell="34TER",
        start=dt.date(2016, 1, 1),
        end=dt.date(2020, 12, 31),
        months=(6, 7, 8, 9),
        max_cloud=30,
        limit=7,
        collections=(ss.S2_OLD,),
    )
    r = search(q, client)
    # What should match, decided from the items as written.
    want = {
        i["id"]
        for i in servers.items.values()
        if i["collection"] == ss.S2_OLD
        and i["properties"].get("grid:code") == "MGRS-34TER"
        and "2016-01-01" <= i["properties"]["datetime"][:10] <= "2020-12-31"
        and int(i["properties"]["datetime"][5:7]) in (6, 7, 8, 9)
        and i["properties"]["eo:cloud_cover"] <= 30
    }
    got = {i.id for i in r.items}
    assert len(want) > 7 and len(got) == 7 and got <= want
    assert r.of_tile == len(want)
    assert r.dropped_other_tiles and all(ss.ROMANIA_NEIGHBOUR in x for x in r.dropped_other_tiles)
    # Spread over the years, least cloudy first within each year.
    years = Counter(i.datetime.year for i in r.items)
    assert set(years) == {2016, 2017, 2018, 2019, 2020} and max(years.values()) == 2
    for y, n in years.items():
        ccs = sorted(
            servers.items[i]["properties"]["eo:cloud_cover"]
            for i in want
            if servers.items[i]["properties"]["datetime"].startswith(str(y))
        )
        assert (
            sorted(i.properties["eo:cloud_cover"] for i in r.items if i.datetime.year == y)
            == ccs[:n]
        )
    # The other collection holds other items of the same tile.
    c1 = search(
        SearchQuery(
            cell="34TER",
            start=dt.date(2015, 1, 1),
            end=dt.date(2021, 12, 31),
            collections=(ss.S2_C1,),
        ),
        client,
    )
    assert c1.items and all(i.collection_id == ss.S2_C1 for i in c1.items)
    # Both (the default): these items name no datastrip, so the same day, platform and orbit
    # make one acquisition; each Collection-1 copy replaces its legacy twin.
    both = search(
        SearchQuery(cell="34TER", start=dt.date(2015, 1, 1), end=dt.date(2021, 12, 31)), client
    )
    twins = {i.id: i.id.replace("S2A_T", "S2A_") for i in c1.items}
    assert both.duplicates == {old: new for new, old in twins.items()}
    assert {i.id for i in c1.items} <= {i.id for i in both.items}
    assert not set(twins.values()) & {i.id for i in both.items}

    code, out = _cli(
        "search",
        "34TER",
        "--stac-url",
        servers.stac.url,
        "--start",
        "2016-01-01",
        "--end",
        "2020-12-31",
        "--months",
        "6-9",
        "--max-cloud",
        "30",
        "--limit",
        "7",
        "--collection",
        ss.S2_OLD,
    )
    assert code == 0, out
    assert "date" in out and "cloud %" in out and "baseline" in out
    assert all(i in out for i in got) and "02.14" in out
    code, out = _cli(
        "search",
        "--bbox",
        _bbox_arg(tuple(ro_bbox(servers))),
        "--stac-url",
        servers.stac.url,
        *ALL_DATES,
        "--collection",
        ss.S2_OLD,
        "--limit",
        "3",
    )
    assert code == 0 and "34TER: 3 scenes chosen" in out, out


def ro_bbox(servers: Servers) -> list[float]:
    return next(i for i in servers.items.values() if "34TER" in i["id"])["bbox"]


def test_stac_url_comes_from_the_environment(servers: Servers):
    r = CliRunner().invoke(
        app,
        ["search", ss.SYNTH_CELL, *ALL_DATES, "--limit", "3"],
        env={"CLEARSKY_STAC_URL": servers.stac.url},
    )
    assert r.exit_code == 0, r.output
    assert f"{ss.SYNTH_CELL}: 3 scenes chosen" in r.output and servers.stac.url in r.output


def test_search_rejects_bad_input(servers: Servers):
    code, out = _cli("search", "99ZZZ", "--stac-url", servers.stac.url)
    assert code == 2 and "invalid Sentinel-2 cell id" in out
    code, out = _cli("search", "--stac-url", servers.stac.url)
    assert code == 2 and "CELL or --bbox" in out
    code, out = _cli("search", "34TER", "--months", "13", "--stac-url", servers.stac.url)
    assert code == 2 and "months" in out
    code, out = _cli("search", "34TER", "--stac-url", "http://127.0.0.1:9/")  # nothing there
    assert code == 2 and "STAC" in out


# --------------------------------------------------------------------------- prefetch
def _check_synthetic_stack(servers: Servers, path: Path, resolution: float) -> int:
    """Every complete scene equals its source COG pixels minus the offset its metadata implies,
    read at the stack's resolution; returns the number of scenes checked."""
    s = Stack.open(path)
    c, t, _ = ss.synth_grid(SYN_SIZE)
    row = round((s.transform.f - t.f) / resolution)
    col = round((t.c - s.transform.c) / resolution)
    n = round(SYN_SIZE * 10 / resolution)
    checked = 0
    for i in s.complete_indices():
        sc = s.scenes[i]
        item = servers.items[sc.id]
        k = [f"{d:%Y%m%d}" for d in servers.syn.dates].index(sc.id.split("_")[2])
        add = ss.OFFSET_CASES[k % len(ss.OFFSET_CASES)][3]
        assert sc.extra["boa_offset_removed"] == add
        exp = np.zeros((4, n, n), np.uint16)
        for b, key in enumerate(("blue", "green", "red", "nir")):
            with rasterio.open(_cog(servers.files.root, item, key)) as src:
                dn = src.read(1, out_shape=(n, n), resampling=Resampling.average).astype(int)
            exp[b] = np.where(dn > 0, np.clip(dn - add, 1, None), 0)
        with rasterio.open(_cog(servers.files.root, item, "scl")) as src:
            scl20 = src.read(1)
        f = round(20 / resolution)
        scl = np.repeat(np.repeat(scl20, f, 0), f, 1) if f >= 1 else scl20
        exp, scl = _valid(exp, scl[:n, :n])
        got = s.read(0, (row, col, n, n), np.array([i]))
        assert np.array_equal(got["reflectance"][0], exp), sc.id
        assert np.array_equal(got["scl"][0], scl), sc.id
        if resolution == 10:  # and at 10 m the source is the synthetic DN itself
            truth = servers.syn.reflectance[k].copy()
            truth[:, scl == 0] = 0
            assert np.array_equal(got["reflectance"][0], truth), sc.id
        checked += 1
    return checked


def _check_dem(path: Path, tol: float = 0.2) -> None:
    from pyproj import Transformer

    s = Stack.open(path)
    assert s.has_dem
    dem = s.read(0, (0, 0, s.height, s.width), np.array([], int), what=("dem",))["dem"]
    cols, rows = np.meshgrid(np.arange(s.width) + 0.5, np.arange(s.height) + 0.5)
    x = s.transform.c + cols * s.resolution
    y = s.transform.f - rows * s.resolution
    lon, lat = Transformer.from_crs(s.epsg, 4326, always_xy=True).transform(x, y)
    assert not np.isnan(dem).any()
    assert np.abs(dem - ss.dem_function(lon, lat)).max() < tol


def test_prefetch_equals_source_pixels_and_skips_a_corrupt_cog(servers: Servers, tmp_path: Path):
    data = tmp_path / "data"
    args = (
        "prefetch",
        "49NDB",
        "--bbox",
        _bbox_arg(_syn_bbox()),
        "--data",
        str(data),
        "--stac-url",
        servers.stac.url,
        *ALL_DATES,
        *FAST_RETRY,
    )
    code, out = _cli(*args)
    corrupt = [i["id"] for i in servers.syn_items() if i["id"].endswith("_1_L2A")]
    assert code == 3, out  # finished, with one scene reported failed
    assert f"failed {corrupt[0]}" in out and "unreadable" in out and "Decod" in out
    assert f"{SYN_DATES} scenes written" in out and "1 failed" in out
    path = data / "49NDB.zarr"
    assert _check_synthetic_stack(servers, path, 10) == SYN_DATES
    _check_dem(path)
    s = Stack.open(path)
    assert corrupt[0] not in {s.scenes[i].id for i in s.complete_indices()}
    assert {s.scenes[i].extra["offset_rule"].split()[0] for i in s.complete_indices()} == {
        "baseline",
        "raster:bands",
        "earthsearch:boa_offset_applied",
    }
    # A rerun fetches nothing again (only retries the corrupt one).
    code, out = _cli(*args)
    assert code == 3 and "0 scenes written" in out and f"{SYN_DATES} already there" in out
    assert len(Stack.open(path).complete_indices()) == SYN_DATES


def test_prefetch_at_20m_reads_reduced_pixels(servers: Servers, tmp_path: Path):
    c, _, _ = ss.synth_grid(SYN_SIZE)
    items = [pystac.Item.from_dict(i) for i in servers.syn_items() if i["id"].endswith("0_L2A")]
    grid = target_grid("49NDB", 20, _syn_bbox())
    assert grid.res == 20 and (grid.transform.c - c.bounds[0]) % 20 == 0
    rep = prefetch(items[:4], grid, tmp_path, workers=2, retries=1, backoff=0.05, progress=False)
    assert rep.ok and len(rep.written) == 4
    # The estimate covers what was written (and the cloud probabilities still to come).
    assert 0.6 * rep.estimate_bytes < Stack.open(rep.path).nbytes_on_disk() < rep.estimate_bytes
    assert _check_synthetic_stack(servers, rep.path, 20) == 4


@needs_shared(ss.ROMANIA_NC)
def test_prefetch_warps_a_foreign_grid_onto_the_cell(servers: Servers, tmp_path: Path):
    """The Romania COGs are in ETRS89-LAEA: prefetch warps them (WarpedVRT) onto 34TER."""
    import xarray as xr
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.warp import reproject

    code, out = _cli(
        "prefetch",
        "34TER",
        "--bbox",
        _bbox_arg(tuple(ro_bbox(servers))),
        "--data",
        str(tmp_path),
        "--stac-url",
        servers.stac.url,
        "--collection",
        ss.S2_OLD,
        "--start",
        "2018-01-01",
        "--end",
        "2018-12-31",
        "--months",
        "5-9",
        "--limit",
        "4",
        "--no-dem",
        *FAST_RETRY,
    )
    assert code == 0, out
    s = Stack.open(tmp_path / "34TER.zarr")
    assert len(s.complete_indices()) == 4 and s.resolution == 10
    ds = xr.open_dataset(ss.ROMANIA_NC, engine="h5netcdf", mask_and_scale=False)
    x, y = ds.x.values, ds.y.values
    src_t = Affine(10, 0, x[0] - 5, 0, -10, y[0] + 5)
    times = [np.datetime_as_string(t, unit="D").replace("-", "") for t in ds.time.values]
    for i in s.complete_indices():
        t = times.index(s.scenes[i].id.split("_")[2])
        exp = np.zeros((4, s.height, s.width), np.uint16)
        for b, v in enumerate(("B2", "B3", "B4", "B8")):
            reproject(
                ds[v].values[t].astype(np.uint16),
                exp[b],
                src_transform=src_t,
                src_crs=CRS.from_epsg(3035),
                src_nodata=0,
                dst_transform=s.transform,
                dst_crs=CRS.from_epsg(s.epsg),
                dst_nodata=0,
                resampling=Resampling.average,
            )
        scl = np.zeros((s.height, s.width), np.uint8)
        reproject(
            ds["SCL"].values[t].astype(np.uint8),
            scl,
            src_transform=src_t,
            src_crs=CRS.from_epsg(3035),
            src_nodata=0,
            dst_transform=s.transform,
            dst_crs=CRS.from_epsg(s.epsg),
            dst_nodata=0,
            resampling=Resampling.nearest,
        )
        exp, scl = _valid(exp, scl)
        got = s.read(0, (0, 0, s.height, s.width), np.array([i]))
        assert (got["scl"][0] > 0).sum() > 5000  # the cube's ~1 km2 is in there
        assert np.mean(got["scl"][0] == scl) > 0.999
        close = np.abs(got["reflectance"][0].astype(int) - exp) <= 1
        assert close.mean() > 0.999, s.scenes[i].id
    ds.close()


def _prefetch_process(servers_url: str, data: Path, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "compositor.cli",
        "prefetch",
        "49NDB",
        "--bbox",
        _bbox_arg(_syn_bbox()),
        "--data",
        str(data),
        "--stac-url",
        servers_url,
        *ALL_DATES,
        "--workers",
        "1",
        "--no-dem",
        *FAST_RETRY,
    ]
    return subprocess.Popen(
        cmd,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _complete_count(path: Path) -> int:
    try:
        return sum(
            1
            for s in json.loads((path / "zarr.json").read_text())["attributes"]["scenes"]
            if s["complete"]
        )
    except (OSError, ValueError, KeyError):
        return 0


def test_killed_servers_and_killed_prefetch_leave_a_consistent_stack(
    servers: Servers, tmp_path: Path
):
    """The web server dies mid-prefetch, then the prefetch process itself is SIGKILLed mid-run:
    each time the stack shows only whole scenes, and a rerun completes it."""
    # Own servers (the COG server slowed a little, like a real network) over the same files.
    port = ss.free_port()
    slow = ss.FileServer(servers.files.root, port, latency_ms=10)
    url = f"http://127.0.0.1:{port}"
    items = [
        json.loads(json.dumps(i).replace(servers.files.url, url))
        for i in servers.syn_items()
        if i["id"].endswith("0_L2A")
    ]
    stac = ss.StacServer(ss.write_catalogue(tmp_path / "cat", items), ss.free_port(), tmp_path)
    data = tmp_path / "data"
    path = data / "49NDB.zarr"
    slow.start()
    stac.start()
    try:
        # 1. Kill the COG server once the first scene is in (it is then reading the next).
        p = _prefetch_process(stac.url, data, tmp_path / "run1.log")
        deadline = time.monotonic() + 60
        while _complete_count(path) < 1 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        slow.kill()
        assert p.wait(timeout=120) == 3, (tmp_path / "run1.log").read_text()
        log1 = (tmp_path / "run1.log").read_text()
        assert "network error" in log1 and "run the same command again" in log1
        done1 = _complete_count(path)
        assert 0 < done1 < SYN_DATES, log1
        assert _check_synthetic_stack(servers, path, 10) == done1
        # 2. Server back; this time the prefetch process is killed mid-run.
        slow.start()
        p = _prefetch_process(stac.url, data, tmp_path / "run2.log")
        deadline = time.monotonic() + 60
        while _complete_count(path) < done1 + 2 and p.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        done2 = len(Stack.open(path).complete_indices())
        assert done1 < done2 <= SYN_DATES
        assert _check_synthetic_stack(servers, path, 10) == done2
        # 3. A plain rerun finishes the stack.
        p = _prefetch_process(stac.url, data, tmp_path / "run3.log")
        assert p.wait(timeout=120) == 0, (tmp_path / "run3.log").read_text()
        assert f"{done2} already there" in (tmp_path / "run3.log").read_text()
        assert _check_synthetic_stack(servers, path, 10) == SYN_DATES
        s = Stack.open(path)
        assert len({sc.id for sc in s.scenes}) == len(s.scenes) == SYN_DATES  # no duplicates
    finally:
        stac.stop()
        slow.stop()


def test_disk_check_refuses_before_writing(servers: Servers, tmp_path: Path, monkeypatch):
    grid = target_grid("49NDB", 10)
    assert estimate_disk(grid, 100) > 100e9  # a whole cell, 100 scenes: ~180 GB
    monkeypatch.setattr("compositor.prefetch.free_disk", lambda _p: 10_000_000)
    items = [pystac.Item.from_dict(i) for i in servers.syn_items()][:3]
    with pytest.raises(PrefetchError, match="not enough disk"):
        prefetch(items, grid, tmp_path, progress=False)
    assert not (tmp_path / "49NDB.zarr").exists()


@needs_shared(ss.RKH_ITEM)
def test_whole_cell_29rkh_becomes_tiles(servers: Servers, tmp_path: Path):
    """The real whole-cell item at its 100 m sample resolution: stack pixels equal the COGs,
    the DEM covers the cell, and the tile server shows it at low zooms."""
    import morecantile
    from fastapi.testclient import TestClient
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.io import MemoryFile

    from tileserver.app import create_app
    from tileserver.settings import Settings

    code, out = _cli(
        "prefetch",
        "29RKH",
        "--resolution",
        "100",
        "--data",
        str(tmp_path),
        "--stac-url",
        servers.stac.url,
        "--collection",
        ss.S2_OLD,
        *ALL_DATES,
        *FAST_RETRY,
    )
    assert code == 0, out
    s = Stack.open(tmp_path / "29RKH.zarr")
    assert (s.width, s.height, s.resolution, s.epsg) == (1098, 1098, 100, 32629)
    [i] = s.complete_indices()
    got = s.read(0, (0, 0, 1098, 1098), np.array([i]))
    exp = np.stack([rasterio.open(ss.RKH_DIR / f"{b}.tif").read(1) for b in s.bands])
    scl = np.repeat(np.repeat(rasterio.open(ss.RKH_DIR / "SCL.tif").read(1), 2, 0), 2, 1)
    exp, scl = _valid(exp, scl)
    assert np.array_equal(got["reflectance"][0], exp) and np.array_equal(got["scl"][0], scl)
    assert s.scenes[i].processing_baseline == "02.14" and s.scenes[i].cloud_cover == 4.051854
    _check_dem(tmp_path / "29RKH.zarr")

    client = TestClient(create_app(Settings(data_dir=tmp_path)))
    cells = {c["id"]: c for c in client.get("/cells").json()}
    assert cells["29RKH"]["scene_count"] == 1 and cells["29RKH"]["has_dem"]
    lon, lat = cells["29RKH"]["center"]
    for z, share in ((6, 0.02), (8, 0.3)):  # the 110 km cell in a 626 km / 156 km tile
        t = morecantile.tms.get("WebMercatorQuad").tile(lon, lat, z)
        r = client.get(f"/cells/29RKH/tiles/WebMercatorQuad/{z}/{t.x}/{t.y}.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        with warnings.catch_warnings(), MemoryFile(r.content) as mf:
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a PNG has no CRS
            with mf.open() as img:
                px = img.read()
        opaque = px[-1] > 0 if px.shape[0] == 4 else np.ones(px.shape[1:], bool)
        assert opaque.mean() > share and px[:3, opaque].std() > 1  # desert texture, not blank
    assert math.isclose(lat, 24.8, abs_tol=0.2)
