"""The embedded demo dataset: two cells that build with no network beyond PyPI.

1. ``34TER`` (real): the JRC ``nrt`` package's Sentinel-2 L2A cube of a forest in the Banat
   mountains, Romania (140 dates 2015-2021, B02/B03/B04/B08 + SCL, 1 km x 1 km), shipped on PyPI
   in ``nrt==0.2.1`` and reprojected here from ETRS89-LAEA onto the cell's UTM 10 m grid.
2. ``49NDB`` (synthetic, Borneo): a persistently cloudy stack with its ground truth (clear-sky
   composite, true cloud and shadow masks) kept in the store under ``truth/``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject, transform_bounds

from compositor.grid import cell
from compositor.stack import Scene, Stack, StackError, list_stacks

log = logging.getLogger(__name__)
# progress(step, done, total): e.g. ("34TER: write scenes", 12, 140); called as work advances.
Progress = Callable[[str, int, int], None]

REAL_CELL = "34TER"
SYNTH_CELL = "49NDB"
NRT_VERSION = "0.2.1"
NRT_MEMBER = "nrt/data/sentinel2_cube_subset_romania_10m.nc"
# EPSG:3035 (ETRS89 / LAEA Europe): the cube stores the WKT but no code.
LAEA_EUROPE = CRS.from_epsg(3035)
# Where the synthetic sub-area sits inside 49NDB (metres from the cell's upper-left corner).
SYNTH_OFFSET = (40_000.0, 40_000.0)


def default_data_dir() -> Path:
    return Path(os.environ.get("CLEARSKY_DATA_DIR", "data/demo"))


def romania_cube(cache_dir: Path) -> Path:
    """Path to the Romania NetCDF cube, fetched once from PyPI (``pip download nrt``)."""
    override = os.environ.get("CLEARSKY_ROMANIA_NC")
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"CLEARSKY_ROMANIA_NC={override} is not a file")
        return Path(override)
    target = cache_dir / "sentinel2_cube_subset_romania_10m.nc"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob(f"nrt-{NRT_VERSION}-*.whl"))
    if not wheels:
        log.info("downloading nrt==%s from PyPI for the Romania cube", NRT_VERSION)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            f"nrt=={NRT_VERSION}",
            "-d",
            str(cache_dir),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache_dir.glob(f"nrt-{NRT_VERSION}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch nrt=={NRT_VERSION} from PyPI for the real demo cell "
                f"({proc.stderr.strip()[-300:]}); set CLEARSKY_ROMANIA_NC to the cube file"
            )
    with (
        zipfile.ZipFile(wheels[0]) as zf,
        tempfile.NamedTemporaryFile(dir=cache_dir, delete=False) as tmp,
    ):
        tmp.write(zf.read(NRT_MEMBER))
    os.replace(tmp.name, target)  # atomic: a half-extracted cube is never picked up
    return target


def build_real(data_dir: Path, cache_dir: Path, progress: Progress | None = None) -> Path:
    """The Romania cube on the 34TER UTM grid as a stack."""
    import xarray as xr

    nc = romania_cube(cache_dir)
    path = data_dir / f"{REAL_CELL}.zarr"
    ds = xr.open_dataset(nc, engine="h5netcdf", mask_and_scale=False)
    x, y = ds.x.values, ds.y.values
    res = float(x[1] - x[0])
    src_transform = Affine(res, 0, x[0] - res / 2, 0, -res, y[0] + res / 2)
    src_bounds = (x[0] - res / 2, y[-1] - res / 2, x[-1] + res / 2, y[0] + res / 2)
    c = cell(REAL_CELL)
    dst_crs = c.crs
    b = transform_bounds(LAEA_EUROPE, dst_crs, *src_bounds)
    # Snap to the cell's 10 m grid so the stack lines up with real Earth Search data of 34TER.
    left = c.bounds[0] + np.floor((b[0] - c.bounds[0]) / 10) * 10
    top = c.bounds[3] - np.floor((c.bounds[3] - b[3]) / 10) * 10
    width = int(np.ceil((b[2] - left) / 10))
    height = int(np.ceil((top - b[1]) / 10))
    dst_transform = Affine(10, 0, left, 0, -10, top)
    stack = Stack.create(
        path,
        REAL_CELL,
        c.epsg,
        dst_transform,
        width,
        height,
        overwrite=True,
        meta={
            "source": f"PyPI nrt=={NRT_VERSION} {NRT_MEMBER} (EU JRC, EUPL-1.2)",
            "kind": "real",
            "title": "Banat mountains, Romania (real Sentinel-2 L2A)",
        },
    )
    bands = ["B2", "B3", "B4", "B8"]
    times = ds.time.values
    for t in range(len(times)):
        if progress:
            progress(f"{REAL_CELL}: write scenes", t, len(times))
        src = np.stack([ds[b].values[t] for b in bands] + [ds["SCL"].values[t]]).astype(np.uint16)
        dst = np.zeros((5, height, width), np.uint16)
        reproject(
            src,
            dst,
            src_transform=src_transform,
            src_crs=LAEA_EUROPE,
            src_nodata=0,
            dst_transform=dst_transform,
            dst_crs=dst_crs,
            dst_nodata=0,
            resampling=Resampling.nearest,
        )
        refl, scl = dst[:4], dst[4].astype(np.uint8)
        refl[:, scl == 0] = 0
        scl[refl[0] == 0] = 0
        date = np.datetime_as_string(times[t], unit="s")
        data = scl > 0
        cc = float(np.isin(scl, (3, 8, 9, 10)).sum() / max(data.sum(), 1) * 100)
        # Acquisitions before 2022 (processing baseline < 04.00) carry no +1000 DN offset.
        stack.append_scene(
            Scene(
                id=f"S2_{REAL_CELL}_{date[:10].replace('-', '')}",
                datetime=date + "Z",
                cloud_cover=round(cc, 2),
                processing_baseline="<04.00",
            ),
            refl,
            scl,
        )
    ds.close()
    if progress:
        progress(f"{REAL_CELL}: write scenes", len(times), len(times))
    stack.set_meta(built=True)
    return path


def build_synthetic(
    data_dir: Path,
    seed: int = 0,
    size: int = 1024,
    n_dates: int = 64,
    progress: Progress | None = None,
) -> Path:
    """The persistent-cloud synthetic cell with its ground truth."""
    import threading

    from compositor.synthetic import make_synthetic

    made, lock = [0], threading.Lock()

    def one_made() -> None:
        with lock:
            made[0] += 1
            if progress:
                progress(f"{SYNTH_CELL}: simulate scenes", made[0], n_dates)

    syn = make_synthetic(seed=seed, size=size, n_dates=n_dates, progress=one_made)
    c = cell(SYNTH_CELL)
    left, top = c.bounds[0] + SYNTH_OFFSET[0], c.bounds[3] - SYNTH_OFFSET[1]
    path = data_dir / f"{SYNTH_CELL}.zarr"
    stack = Stack.create(
        path,
        SYNTH_CELL,
        c.epsg,
        Affine(10, 0, left, 0, -10, top),
        size,
        size,
        overwrite=True,
        meta={
            "source": f"synthetic (compositor.synthetic, seed={seed})",
            "kind": "synthetic",
            "title": "Persistent cloud, Borneo (synthetic, with ground truth)",
            "seed": seed,
        },
    )
    for t, date in enumerate(syn.dates):
        if progress:
            progress(f"{SYNTH_CELL}: write scenes", t, len(syn.dates))
        stack.append_scene(
            Scene(
                id=f"SYN_{SYNTH_CELL}_{date:%Y%m%d}",
                datetime=f"{date.isoformat()}T03:00:00Z",
                cloud_cover=float(syn.cloud_cover[t]),
                platform="synthetic",
            ),
            syn.reflectance[t],
            syn.scl[t],
        )
    if progress:
        progress(f"{SYNTH_CELL}: write scenes", len(syn.dates), len(syn.dates))
    stack.set_dem(syn.dem)
    stack.set_meta(has_dem=True)
    write_truth(path, syn.truth_composite, syn.truth_cloud, syn.truth_shadow)
    stack.set_meta(built=True)  # last: a build cut short is rebuilt by the next `clearsky demo`
    return path


def write_truth(path: Path, composite: np.ndarray, cloud: np.ndarray, shadow: np.ndarray) -> None:
    g = zarr.open_group(str(path), mode="r+").require_group("truth")
    g.create_array("composite", data=composite.astype(np.float32), overwrite=True)
    g.create_array("cloud", data=cloud.astype(bool), overwrite=True)
    g.create_array("shadow", data=shadow.astype(bool), overwrite=True)


def read_truth(path: Path) -> dict[str, np.ndarray]:
    try:
        g = zarr.open_group(str(path), mode="r")["truth"]
    except KeyError:
        raise StackError(f"stack {path} has no ground truth") from None
    return {k: g[k][...] for k in ("composite", "cloud", "shadow")}


def build_demo(
    data_dir: Path | None = None, force: bool = False, progress: Progress | None = None
) -> dict[str, Path]:
    """Build whatever demo cell is missing (or all with ``force``); returns cell -> path."""
    data_dir = Path(data_dir or default_data_dir())
    data_dir.mkdir(parents=True, exist_ok=True)
    have = list_stacks(data_dir)
    started = dt.datetime.now()
    for cid, build in (
        (REAL_CELL, lambda: build_real(data_dir, data_dir / ".cache", progress)),
        (SYNTH_CELL, lambda: build_synthetic(data_dir, progress=progress)),
    ):
        if cid in have and not force and _complete(have[cid]):
            log.info("demo cell %s already built at %s", cid, have[cid])
            continue
        log.info("building demo cell %s ...", cid)
        have[cid] = build()
        log.info("built %s in %.0f s", cid, (dt.datetime.now() - started).total_seconds())
    return have


def _complete(path: Path) -> bool:
    try:
        s = Stack.open(path)
    except StackError:
        return False
    return bool(s.scenes) and all(x.complete for x in s.scenes) and bool(s.meta.get("built"))
