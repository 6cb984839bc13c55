"""Real servers on 127.0.0.1 for the prefetch tests and bench: a STAC API and a COG web server.

- STAC API: ``rustac serve`` (PyPI ``rustac``, in-memory backend: starts in well under a second
  and needs no network), loaded with collections and items written to JSON files.
- COGs: RangeHTTPServer (PyPI ``rangehttpserver``), i.e. Python's http.server with HTTP Range
  support, as a separate process that can be killed and restarted on the same port. Run as
  ``python tests/stac_servers.py files DIR PORT [--latency MS]``; it logs one line per request
  with the bytes sent, which the bench reads to measure throughput.

Item builders write real COGs with rasterio: the real 29RKH item with its COGs (hrefs rewritten
to the local server), the real Romania cube (JRC ``nrt`` package) as one item per date, synthetic
scenes (compositor.synthetic) with every processing-baseline/offset convention Earth Search uses,
and a smooth synthetic DEM as Copernicus-DEM-like 1-degree tiles.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CLEARSKY_SHARED_DATA", ROOT.parent / "shared" / "data"))
RKH_DIR = SHARED_DATA / "s2-29RKH-20200219-cogs"
RKH_ITEM = RKH_DIR / "S2A_29RKH_20200219_0_L2A.json"
ROMANIA_NC = SHARED_DATA / "nrt-romania" / "sentinel2_cube_subset_romania_10m.nc"

S2_OLD = "sentinel-2-l2a"
S2_C1 = "sentinel-2-c1-l2a"
DEM = "cop-dem-glo-30"
SYNTH_CELL = "49NDB"
ROMANIA_CELL = "34TER"
ROMANIA_NEIGHBOUR = "34TFR"  # overlaps the same ground in the real grid; search must drop it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.05)


class _Process:
    """A server subprocess with its log in a file (never a pipe nobody drains)."""

    def __init__(self, cmd: list[str], log: Path, probe: str, cwd: Path | None = None):
        self.cmd, self.log_path, self.probe, self.cwd = cmd, log, probe, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd, start_new_session=True
        )
        log.close()
        _wait_http(self.probe, self.proc, self.log_path)

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-response, as a crashed host or a cut link would."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class FileServer(_Process):
    """RangeHTTPServer over ``root`` on 127.0.0.1:``port``."""

    def __init__(
        self,
        root: Path,
        port: int,
        latency_ms: float = 0.0,
        truncate: tuple[str, int] | None = None,
    ):
        self.root, self.port = Path(root), port
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, str(Path(__file__).resolve()), "files", str(root), str(port)]
        if latency_ms:
            cmd += ["--latency", str(latency_ms)]
        if truncate:
            cmd += ["--truncate", truncate[0], "--truncate-times", str(truncate[1])]
        super().__init__(cmd, self.root.parent / f"files-{port}.log", self.url + "/")

    def requests(self) -> list[tuple[str, int]]:
        """(path, bytes sent) of every request served so far (from the log)."""
        out = []
        if self.log_path.exists():
            for line in self.log_path.read_text().splitlines():
                if line.startswith("SENT "):
                    _, path, n = line.split(" ", 2)
                    out.append((path, int(n)))
        return out


class StacServer(_Process):
    """``rustac serve`` with the given collection and item-collection JSON files."""

    def __init__(self, files: list[Path], port: int, workdir: Path):
        exe = shutil.which("rustac", path=str(Path(sys.executable).parent)) or shutil.which(
            "rustac"
        )
        if exe is None:
            raise RuntimeError("rustac is not installed (pip install rustac: the dev extras)")
        self.url = f"http://127.0.0.1:{port}"
        cmd = [exe, "serve", "--addr", f"127.0.0.1:{port}", *map(str, files)]
        super().__init__(cmd, workdir / f"stac-{port}.log", self.url + "/")


# ------------------------------------------------------------------------------- catalogue
def collection(cid: str, description: str) -> dict[str, Any]:
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": cid,
        "description": description,
        "license": "proprietary",
        "extent": {
            "spatial": {"bbox": [[-180.0, -90.0, 180.0, 90.0]]},
            "temporal": {"interval": [[None, None]]},
        },
        "links": [],
    }


def write_catalogue(workdir: Path, items: list[dict]) -> list[Path]:
    """Collections + one item collection as files for ``rustac serve``."""
    workdir.mkdir(parents=True, exist_ok=True)
    files = []
    for cid in sorted({it["collection"] for it in items}):
        p = workdir / f"collection-{cid}.json"
        p.write_text(json.dumps(collection(cid, f"local copy for tests: {cid}")))
        files.append(p)
    p = workdir / "items.json"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    files.append(p)
    return files


def _polygon(w: float, s: float, e: float, n: float) -> dict:
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def _mgrs_props(tile: str) -> dict[str, Any]:
    return {
        "grid:code": f"MGRS-{tile}",
        "mgrs:utm_zone": int(tile[:2]),
        "mgrs:latitude_band": tile[2],
        "mgrs:grid_square": tile[3:],
    }


def s2_ids(
    platform: str,
    tile: str,
    sensing: dt.datetime,
    baseline: str,
    generated: dt.datetime,
    centre: str = "SGS_",
    orbit: int = 32,
    datatake: dt.datetime | None = None,
) -> dict[str, Any]:
    """The ESA identifiers Earth Search items carry, spelled as ESA spells them: the datastrip
    (its sensing start names the acquisition; the generation time and baseline change when ESA
    reprocesses), the datatake, the granule and the product."""
    p = platform[-1].upper()  # sentinel-2b -> B
    n = baseline.replace(".", "")
    take = datatake or sensing - dt.timedelta(minutes=9, seconds=21)
    f = "%Y%m%dT%H%M%S"
    return {
        "platform": platform,
        "s2:processing_baseline": baseline,
        "s2:datastrip_id": (
            f"S2{p}_OPER_MSI_L2A_DS_{centre}_{generated:{f}}_S{sensing:{f}}_N{baseline}"
        ),
        "s2:datatake_id": f"GS2{p}_{take:{f}}_0{orbit:02d}123_N{baseline}",
        "s2:granule_id": (
            f"S2{p}_OPER_MSI_L2A_TL_{centre}_{generated:{f}}_A0{orbit:02d}123_T{tile}_N{baseline}"
        ),
        "s2:product_uri": f"S2{p}_MSIL2A_{take:{f}}_N{n}_R{orbit:03d}_T{tile}_{generated:{f}}.SAFE",
        "s2:generation_time": generated.strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
        "sat:relative_orbit": orbit,
    }


def _band_asset(href: str, name: str, gsd: float, offset: float | None = None) -> dict:
    rb: dict[str, Any] = {"nodata": 0, "data_type": "uint16", "spatial_resolution": gsd}
    if offset is not None:
        rb.update(scale=0.0001, offset=offset)
    return {
        "href": href,
        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
        "title": name,
        "roles": ["data", "reflectance"],
        "raster:bands": [rb],
    }


def _scl_asset(href: str) -> dict:
    return {
        "href": href,
        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
        "title": "Scene classification map (SCL)",
        "roles": ["data"],
        "raster:bands": [{"nodata": 0, "data_type": "uint8", "spatial_resolution": 20}],
    }


def write_cog(
    path: Path,
    data: np.ndarray,
    crs: Any,
    transform: Any,
    nodata: float | None = 0,
    blocksize: int = 256,
    resampling: str = "average",
) -> None:
    """A real COG (GDAL's COG driver: tiled, deflate, internal overviews)."""
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = data[None] if data.ndim == 2 else data
    profile = {
        "driver": "COG",
        "width": arr.shape[2],
        "height": arr.shape[1],
        "count": arr.shape[0],
        "dtype": str(arr.dtype),
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "compress": "deflate",
        "blocksize": blocksize,
        "overview_resampling": resampling,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(arr)


# ------------------------------------------------------------------------------- 29RKH (real)
def build_rkh(files: Path, base_url: str) -> dict:
    """The real 29RKH item; its COGs are linked under ``files/rkh`` and hrefs rewritten."""
    item = json.loads(RKH_ITEM.read_text())
    d = files / "rkh"
    d.mkdir(parents=True, exist_ok=True)
    for tif in RKH_DIR.glob("*.tif"):
        link = d / tif.name
        if not link.exists():
            link.symlink_to(tif)
    for asset in item["assets"].values():
        name = asset["href"].rsplit("/", 1)[-1]
        if asset["href"].startswith("https://") and (d / name).exists():
            asset["href"] = f"{base_url}/rkh/{name}"
    item["links"] = []
    return item


# ------------------------------------------------------------------------------- Romania (real)
def build_romania(files: Path, base_url: str, every: int = 1) -> list[dict]:
    """The real JRC Romania cube (EPSG:3035 10 m, 2015-2021) as one item per date.

    Written in its own LAEA grid, so prefetch must warp it (WarpedVRT) onto 34TER; asset keys are
    the older B02/SCL style. A few copies carry the neighbouring tile 34TFR (search must drop
    them) and a few sit in the c1 collection (the collection option must tell them apart)."""
    import xarray as xr
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.warp import transform_bounds

    ds = xr.open_dataset(ROMANIA_NC, engine="h5netcdf", mask_and_scale=False)
    x, y = ds.x.values, ds.y.values
    res = float(x[1] - x[0])
    transform = Affine(res, 0, x[0] - res / 2, 0, -res, y[0] + res / 2)
    crs = CRS.from_epsg(3035)
    bounds = (x[0] - res / 2, y[-1] - res / 2, x[-1] + res / 2, y[0] + res / 2)
    w, s, e, n = transform_bounds(crs, "EPSG:4326", *bounds)
    items = []
    times = ds.time.values
    bands = {"B02": "B2", "B03": "B3", "B04": "B4", "B08": "B8"}
    cube = {k: ds[v].values for k, v in bands.items()}
    scl_all = ds["SCL"].values
    for t in range(0, len(times), every):
        date = np.datetime_as_string(times[t], unit="s")
        day = date[:10].replace("-", "")
        iid = f"S2A_{ROMANIA_CELL}_{day}_0_L2A"
        d = files / "romania" / day
        assets = {}
        for key, arr in cube.items():
            write_cog(d / f"{key}.tif", arr[t].astype(np.uint16), crs, transform, blocksize=128)
            assets[key] = _band_asset(f"{base_url}/romania/{day}/{key}.tif", key, 10, 0.0)
        scl = scl_all[t].astype(np.uint8)
        write_cog(d / "SCL.tif", scl, crs, transform, blocksize=128, resampling="nearest")
        assets["SCL"] = _scl_asset(f"{base_url}/romania/{day}/SCL.tif")
        valid = scl > 0
        cc = float(np.isin(scl, (3, 8, 9, 10)).sum() / max(valid.sum(), 1) * 100)
        item = {
            "type": "Feature",
            "stac_version": "1.0.0",
            "id": iid,
            "collection": S2_OLD,
            "geometry": _polygon(w, s, e, n),
            "bbox": [w, s, e, n],
            "properties": {
                "datetime": date + "Z",
                "platform": "sentinel-2a",
                "eo:cloud_cover": round(cc, 3),
                "s2:processing_baseline": "02.14",
                "earthsearch:boa_offset_applied": False,
                **_mgrs_props(ROMANIA_CELL),
            },
            "assets": assets,
            "links": [],
        }
        items.append(item)
    ds.close()
    extra = []
    for it in items[::10]:  # the neighbouring tile, same ground, same dates
        nb = json.loads(json.dumps(it))
        nb["id"] = it["id"].replace(ROMANIA_CELL, ROMANIA_NEIGHBOUR)
        nb["properties"].update(_mgrs_props(ROMANIA_NEIGHBOUR))
        extra.append(nb)
    for it in items[5::20]:  # Collection 1 copies: new ids (as Earth Search c1 names them)
        c1 = json.loads(json.dumps(it))
        c1["id"] = "S2A_T" + it["id"][4:]
        c1["collection"] = S2_C1
        extra.append(c1)
    return items + extra


# ------------------------------------------------------------------------------- synthetic
# The offset conventions of Earth Search (see compositor.prefetch.dn_offset), one per scene in
# turn: (processing baseline, earthsearch:boa_offset_applied, raster:bands offset, +DN in COG).
OFFSET_CASES = [
    ("02.14", False, 0.0, 0),  # before 2022: no offset anywhere
    ("04.00", False, -0.1, 1000),  # sentinel-2-l2a after 2022-01-25, offset not removed
    ("05.00", True, -0.1, 0),  # Earth Search removed it; raster:bands still says -0.1
    ("05.10", None, -0.1, 1000),  # c1: declared in raster:bands only
    ("04.00", None, None, 1000),  # only the baseline tells
]


def synth_grid(size: int, offset_m: float = 40_000.0):
    """The synthetic sub-area of 49NDB on the cell's 10 m lattice."""
    from affine import Affine

    from compositor.grid import cell

    c = cell(SYNTH_CELL)
    left, top = c.bounds[0] + offset_m, c.bounds[3] - offset_m
    return c, Affine(10, 0, left, 0, -10, top), (left, top - size * 10, left + size * 10, top)


def build_synthetic(
    files: Path,
    base_url: str,
    size: int = 256,
    n_dates: int = 10,
    seed: int = 11,
    corrupt: bool = True,
) -> tuple[list[dict], Any]:
    """Synthetic scenes of 49NDB as COGs on the cell's UTM lattice (bands 10 m, SCL 20 m), with
    the DN offset each item's metadata implies added back in. Returns (items, the SyntheticCell).
    ``corrupt``: one more item whose green COG has its tile data scrambled."""
    from affine import Affine
    from rasterio.crs import CRS

    from compositor.grid import transform_bounds_to_lonlat
    from compositor.synthetic import make_synthetic

    syn = make_synthetic(seed=seed, size=size, n_dates=n_dates)
    c, transform, bounds = synth_grid(size)
    crs = CRS.from_epsg(c.epsg)
    w, s, e, n = transform_bounds_to_lonlat(c.epsg, bounds)
    t20 = transform @ Affine.scale(2)
    items = []
    for t, date in enumerate(syn.dates):
        baseline, applied, roff, add = OFFSET_CASES[t % len(OFFSET_CASES)]
        iid = f"S2B_{SYNTH_CELL}_{date:%Y%m%d}_0_L2A"
        d = files / "synthetic" / iid
        assets = {}
        for b, key in enumerate(("blue", "green", "red", "nir")):
            dn = syn.reflectance[t, b].astype(np.uint32)
            dn = np.where(dn > 0, dn + add, 0).astype(np.uint16)
            write_cog(d / f"{key}.tif", dn, crs, transform)
            assets[key] = _band_asset(f"{base_url}/synthetic/{iid}/{key}.tif", key, 10, roff)
        # SCL is a 20 m product: the synthetic one is made at 20 m and repeated, so every
        # other pixel is the real 20 m grid.
        write_cog(d / "scl.tif", syn.scl[t, ::2, ::2], crs, t20, resampling="nearest")
        assets["scl"] = _scl_asset(f"{base_url}/synthetic/{iid}/scl.tif")
        sensed = dt.datetime.combine(date, dt.time(2, 58, 41))
        props: dict[str, Any] = {
            "datetime": f"{date.isoformat()}T03:00:00Z",
            "eo:cloud_cover": round(float(syn.cloud_cover[t]), 3),
            **s2_ids("sentinel-2b", SYNTH_CELL, sensed, baseline, sensed + dt.timedelta(hours=2)),
            **_mgrs_props(SYNTH_CELL),
        }
        if applied is not None:
            props["earthsearch:boa_offset_applied"] = applied
        items.append(
            {
                "type": "Feature",
                "stac_version": "1.0.0",
                "id": iid,
                "collection": S2_C1,
                "geometry": _polygon(w, s, e, n),
                "bbox": [w, s, e, n],
                "properties": props,
                "assets": assets,
                "links": [],
            }
        )
    if corrupt:
        bad = json.loads(json.dumps(items[0]))
        bad["id"] = bad["id"].replace("_0_L2A", "_1_L2A")  # a second datastrip the same day
        ds = bad["properties"]["s2:datastrip_id"]
        bad["properties"]["s2:datastrip_id"] = ds.replace("T025841_N", "T030212_N")
        src = files / "synthetic" / items[0]["id"]
        dst = files / "synthetic" / bad["id"]
        shutil.copytree(src, dst, dirs_exist_ok=True)
        scramble_tiles(dst / "green.tif")
        for a in bad["assets"].values():
            a["href"] = a["href"].replace(items[0]["id"], bad["id"])
        items.append(bad)
    return items, syn


# ------------------------------------------------------------------------------- two collections
# Five summers of one place as Earth Search serves them (see compositor/acquisitions.py): each
# acquisition under the legacy collection, Collection-1, or both, in each one's own format, with
# the radiometric convention of its processing baseline. Per acquisition: (label, date, legacy
# copies, Collection-1 copy). A legacy copy: (sequence, baseline, earthsearch:boa_offset_applied,
# raster:bands offset, DN added in the COG, readable); a Collection-1 copy: (baseline, flag).
# The DN added is what the data really holds: for "2022-08 flag wrong" the flag says the offset
# is still in but the COG has none (Earth Search issues #66/#71), which only the pixels tell.
COLLECTION_PLAN: list[tuple[str, str, list[tuple], tuple | None]] = [
    ("2018-06", "2018-06-10", [(0, "02.06", False, 0.0, 0, True)], None),  # Collection-1 gap
    ("2018-07", "2018-07-20", [(0, "02.06", False, 0.0, 0, True)], None),
    (  # reprocessed within the legacy collection: _1_ (05.00, offset in the COG) is preferred
        "2019-06",
        "2019-06-15",
        [(0, "02.12", False, 0.0, 0, True), (1, "05.00", False, -0.1, 1000, True)],
        None,
    ),
    (  # _1_ published before its COGs (requester-pays JP2 hrefs): the readable _0_ is kept
        "2019-08",
        "2019-08-04",
        [(0, "02.13", False, 0.0, 0, True), (1, "05.00", False, -0.1, 1000, False)],
        None,
    ),
    ("2020-06", "2020-06-19", [(0, "02.14", False, 0.0, 0, True)], ("05.00", None)),
    ("2020-07", "2020-07-29", [], ("05.00", None)),
    ("2020-08", "2020-08-23", [(0, "02.14", False, 0.0, 0, True)], ("05.00", False)),
    ("2020-08 second datastrip", "2020-08-23", [(1, "02.14", False, 0.0, 0, True)], None),
    ("2021-06", "2021-06-24", [(0, "03.00", False, 0.0, 0, True)], ("05.00", None)),
    ("2021-09", "2021-09-02", [(0, "03.01", False, 0.0, 0, True)], None),
    ("2022-06", "2022-06-09", [(0, "04.00", True, -0.1, 0, True)], ("05.09", None)),
    ("2022-07", "2022-07-14", [(0, "04.00", False, -0.1, 1000, True)], None),
    ("2022-08 flag wrong", "2022-08-18", [(0, "04.00", False, -0.1, 0, True)], None),
]
COLLECTION_CELL = SYNTH_CELL
_ASSET_KEYS = ("blue", "green", "red", "nir")


def build_collections(
    files: Path, base_url: str, size: int = 96, seed: int = 5
) -> tuple[list[dict], Any, dict[str, int]]:
    """Items of both Earth Search collections for COLLECTION_PLAN over the synthetic sub-area of
    49NDB. Returns (items, the SyntheticCell, acquisition label -> its synthetic date index)."""
    from affine import Affine
    from rasterio.crs import CRS

    from compositor.grid import transform_bounds_to_lonlat
    from compositor.synthetic import make_synthetic

    syn = make_synthetic(seed=seed, size=size, n_dates=len(COLLECTION_PLAN))
    c, transform, bounds = synth_grid(size)
    crs = CRS.from_epsg(c.epsg)
    w, s, e, n = transform_bounds_to_lonlat(c.epsg, bounds)
    t20 = transform @ Affine.scale(2)
    tile = COLLECTION_CELL
    items: list[dict] = []
    index: dict[str, int] = {}

    def cogs(folder: str, t: int, add: int) -> None:
        d = files / folder
        if (d / "scl.tif").exists():
            return
        for b, key in enumerate(_ASSET_KEYS):
            dn = syn.reflectance[t, b].astype(np.uint32)
            write_cog(
                d / f"{key}.tif", np.where(dn > 0, dn + add, 0).astype(np.uint16), crs, transform
            )
        write_cog(d / "scl.tif", syn.scl[t, ::2, ::2], crs, t20, resampling="nearest")

    def item(iid: str, coll: str, when: dt.datetime, props: dict, assets: dict, t: int) -> dict:
        return {
            "type": "Feature",
            "stac_version": "1.0.0",
            "id": iid,
            "collection": coll,
            "geometry": _polygon(w, s, e, n),
            "bbox": [w, s, e, n],
            "properties": {
                "datetime": when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                "constellation": "sentinel-2",
                "instruments": ["msi"],
                "eo:cloud_cover": round(float(syn.cloud_cover[t]), 3),
                "proj:epsg": c.epsg,
                **_mgrs_props(tile),
                **props,
            },
            "assets": assets,
            "links": [],
        }

    for t, (label, day, legacy, c1) in enumerate(COLLECTION_PLAN):
        index[label] = t
        # The datastrip's sensing start names the acquisition; a second datastrip the same day
        # starts later. The granule's own time (legacy ``datetime``) follows it by ~2 min, and
        # Collection-1 restamps it, ~4.5 min earlier (as Earth Search does).
        sensed = dt.datetime.fromisoformat(f"{day}T03:11:52") + dt.timedelta(
            minutes=7 * ("second" in label)
        )
        granule = sensed + dt.timedelta(minutes=2, seconds=7, milliseconds=431)
        take = sensed - dt.timedelta(minutes=9, seconds=21)
        for seq, baseline, flag, roff, add, ok in legacy:
            iid = f"S2B_{tile}_{day.replace('-', '')}_{seq}_L2A"
            gen = granule + dt.timedelta(hours=3) + dt.timedelta(days=400 * seq)
            folder = f"legacy/{iid}"
            s3 = (
                f"s3://sentinel-s2-l2a/tiles/49/N/DB/{day[:4]}/{int(day[5:7])}/{int(day[8:])}/{seq}"
            )
            assets = {}
            for key, jp2 in zip(
                (*_ASSET_KEYS, "scl"), ("B02", "B03", "B04", "B08", "SCL"), strict=True
            ):
                gsd = 20 if key == "scl" else 10
                href = f"{base_url}/{folder}/{key}.tif" if ok else f"{s3}/R{gsd}m/{jp2}.jp2"
                a = _scl_asset(href) if key == "scl" else _band_asset(href, key, gsd, roff)
                assets[key] = a
                assets[f"{key}-jp2"] = {**a, "href": f"{s3}/R{gsd}m/{jp2}.jp2", "type": "image/jp2"}
            if ok:
                cogs(folder, t, add)
            props = {
                **s2_ids(
                    "sentinel-2b",
                    tile,
                    sensed,
                    baseline,
                    gen,
                    "SGS_" if seq == 0 else "S2RP",
                    datatake=take,
                ),
                "s2:sequence": str(seq),
                "earthsearch:boa_offset_applied": flag,
                "earthsearch:s3_path": f"s3://sentinel-cogs/sentinel-s2-l2a-cogs/49/N/DB/{iid}",
            }
            items.append(item(iid, S2_OLD, granule, props, assets, t))
        if c1 is not None:
            baseline, flag = c1
            iid = f"S2B_T{tile}_{take:%Y%m%dT%H%M%S}_L2A"
            folder = f"c1/{iid}"
            cogs(folder, t, 1000)  # Collection-1 keeps ESA's +1000 and declares it
            assets = {
                key: _band_asset(f"{base_url}/{folder}/{key}.tif", key, 10, -0.1)
                for key in _ASSET_KEYS
            }
            assets["scl"] = _scl_asset(f"{base_url}/{folder}/scl.tif")
            gen = dt.datetime(2023, 7, 8, 13, 48, 57) + dt.timedelta(days=t)
            props = s2_ids("sentinel-2b", tile, sensed, baseline, gen, "S2RP", datatake=take)
            if flag is not None:
                props["earthsearch:boa_offset_applied"] = flag
            restamped = granule - dt.timedelta(minutes=4, seconds=26)
            items.append(item(iid, S2_C1, restamped, props, assets, t))
    return items, syn, index


def scramble_tiles(path: Path) -> None:
    """Keep a COG's header and size but overwrite its compressed tiles with noise: the file
    opens, every read of pixel data fails to decode (as a bit-rotted or half-copied file)."""
    import rasterio

    with rasterio.open(path) as src:
        offsets = [int(v) for v in src.tags(1, ns="TIFF").get("BLOCK_OFFSET_0_0", "0").split()]
    raw = bytearray(path.read_bytes())
    first = offsets[0] if offsets and offsets[0] else 4096
    rng = np.random.default_rng(0)
    raw[first:] = rng.integers(0, 256, len(raw) - first, dtype=np.uint8).tobytes()
    path.chmod(0o644)
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------------------- DEM
def dem_function(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """A smooth synthetic terrain in metres (so a warp of it can be checked analytically)."""
    return (600 + 400 * np.sin(lon * 3.1) * np.cos(lat * 2.3) + 50 * lat).astype(np.float32)


def build_dem(
    files: Path, base_url: str, boxes: list[tuple[float, ...]], px_per_deg: int = 600
) -> list[dict]:
    """Copernicus-DEM-like 1-degree COG tiles (EPSG:4326, float32, pixel-is-area) over the
    lon/lat boxes, named and shaped as Earth Search's cop-dem-glo-30 items (asset ``data``)."""
    from affine import Affine

    tiles = set()
    for w, s, e, n in boxes:
        for lon in range(math.floor(w), math.ceil(e)):
            for lat in range(math.floor(s), math.ceil(n)):
                tiles.add((lon, lat))
    items = []
    for lon, lat in sorted(tiles):
        ns = f"{'N' if lat >= 0 else 'S'}{abs(lat):02d}_00"
        ew = f"{'E' if lon >= 0 else 'W'}{abs(lon):03d}_00"
        iid = f"Copernicus_DSM_COG_10_{ns}_{ew}_DEM"
        step = 1.0 / px_per_deg
        centres = np.arange(px_per_deg) * step + step / 2
        lons = lon + centres
        lats = lat + 1 - centres
        z = dem_function(lons[None, :], lats[:, None])
        transform = Affine(step, 0, lon, 0, -step, lat + 1)
        write_cog(
            files / "dem" / f"{iid}.tif",
            z,
            "EPSG:4326",
            transform,
            nodata=None,
            resampling="bilinear",
        )
        items.append(
            {
                "type": "Feature",
                "stac_version": "1.0.0",
                "id": iid,
                "collection": DEM,
                "geometry": _polygon(lon, lat, lon + 1, lat + 1),
                "bbox": [lon, lat, lon + 1, lat + 1],
                "properties": {"datetime": "2021-04-22T00:00:00Z", "gsd": 30},
                "assets": {
                    "data": {
                        "href": f"{base_url}/dem/{iid}.tif",
                        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                        "roles": ["data"],
                    }
                },
                "links": [],
            }
        )
    return items


# ------------------------------------------------------------------------------- file server
class _CutShort(ConnectionAbortedError):
    """Raised inside the file server to drop a connection mid-body (a cut link)."""


def _serve_files(
    root: str, port: int, latency_ms: float, truncate: str = "", truncate_times: int = 0
) -> None:
    """RangeHTTPServer's handler on a threading server, logging bytes sent per request.

    ``truncate``: the first ``truncate_times`` range answers for paths containing this text
    send their headers and half their body, then the connection drops (as a cut link or a
    proxy timeout does mid-transfer). Logged as ``CUT path bytes``."""
    import http.server
    import threading

    from RangeHTTPServer import RangeRequestHandler

    cuts: dict[str, int] = {}
    lock = threading.Lock()

    class Counting:
        def __init__(self, raw: Any, limit: int | None = None):
            self.raw, self.n, self.limit = raw, 0, limit

        def write(self, b: bytes) -> int:
            if self.limit is not None and self.n + len(b) > self.limit:
                b = b[: self.limit - self.n]
                self.raw.write(b)
                self.n += len(b)
                raise _CutShort
            self.n += len(b)
            return self.raw.write(b)

    class Handler(RangeRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 and CDNs do

        def _cut_this(self) -> bool:
            if not truncate or truncate not in self.path or not getattr(self, "range", None):
                return False
            if self.range[0] < 32768:  # GDAL's header read at open: it re-reads that itself
                return False
            with lock:
                n = cuts.get(self.path, 0)
                if n >= truncate_times:
                    return False
                cuts[self.path] = n + 1
                return True

        def copyfile(self, source: Any, outputfile: Any) -> None:
            limit = None
            if self._cut_this():
                first, last = self.range
                size = os.fstat(source.fileno()).st_size
                last = size - 1 if last is None or last >= size else last
                limit = (last - first + 1) // 2
            out = Counting(outputfile, limit)
            try:
                super().copyfile(source, out)
            except _CutShort:
                sys.stdout.write(f"CUT {self.path} {out.n}\n")
                sys.stdout.flush()
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            sys.stdout.write(f"SENT {self.path} {out.n}\n")
            sys.stdout.flush()

        def send_head(self) -> Any:
            if latency_ms:
                time.sleep(latency_ms / 1000)
            return super().send_head()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # the SENT lines are the log

    os.chdir(root)
    http.server.ThreadingHTTPServer.allow_reuse_address = True
    http.server.ThreadingHTTPServer.daemon_threads = True
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler) as httpd:
        httpd.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("files", help="serve a directory with HTTP Range support")
    f.add_argument("root")
    f.add_argument("port", type=int)
    f.add_argument("--latency", type=float, default=0.0, help="ms added before each answer")
    f.add_argument("--truncate", default="", help="cut range answers for paths with this text")
    f.add_argument("--truncate-times", type=int, default=1, help="cut the first N per path")
    a = p.parse_args(argv)
    if a.cmd == "files":
        _serve_files(a.root, a.port, a.latency, a.truncate, a.truncate_times)


if __name__ == "__main__":
    main()
