"""Cells -> cloud-free composite COGs, on Dask distributed.

Each cell is composited block by block in its own UTM grid (blocks with a halo so the mask
dilation sees across block edges) and written as a Cloud-Optimised GeoTIFF: the bands of the
stack as float32 reflectance DN (NaN where no data) plus the clear-observation count. A cell is
one Dask task; workers need the data directory and the output directory on a shared path.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from rasterio.windows import Window

from compositor.stack import Stack
from compositor.tiling import ViewParams, composite_window

if TYPE_CHECKING:
    from dask.distributed import Client

log = logging.getLogger(__name__)
BLOCK = 1024


def composite_cell(
    stack_path: str | Path,
    out_path: str | Path,
    params: ViewParams | None = None,
    level: int = 0,
    block: int = BLOCK,
) -> dict:
    """Write the composite of one stack as a COG. Returns a summary (path, size, fallback)."""
    params = params or ViewParams()
    stack = Stack.open(stack_path)
    lv = stack.levels[level]
    idx = stack.complete_indices(params.start, params.end, params.months)
    if len(idx) == 0:
        raise ValueError(f"cell {stack.cell_id}: no scene matches the date filters")
    halo = math.ceil(params.dilate / lv.factor) + 1 if params.dilate > 0 else 1
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nb = len(stack.bands)
    profile = {
        "driver": "GTiff",
        "width": lv.width,
        "height": lv.height,
        "count": nb + 1,
        "dtype": "float32",
        "crs": f"EPSG:{stack.epsg}",
        "transform": lv.transform,
        "nodata": float("nan"),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "predictor": 3,
    }
    fallback = 0
    # Write a tiled GeoTIFF block by block, then copy it to a COG (overviews + layout) and
    # rename: readers never see a half-written file.
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        work = Path(tmp) / "work.tif"
        with rasterio.open(work, "w", **profile) as dst:
            for r in range(0, lv.height, block):
                for c in range(0, lv.width, block):
                    h, w = min(block, lv.height - r), min(block, lv.width - c)
                    win = (r - halo, c - halo, h + 2 * halo, w + 2 * halo)
                    res = composite_window(stack, level, win, params, idx)
                    core = (slice(halo, halo + h), slice(halo, halo + w))
                    vals = res.values[:, core[0], core[1]]
                    count = res.count[core].astype(np.float32)
                    count[np.isnan(vals[0])] = np.nan
                    dst.write(np.concatenate([vals, count[None]]), window=Window(c, r, w, h))
                    fallback += int(res.fallback[core].sum())
            dst.descriptions = (*stack.bands, "clear_count")
            dst.update_tags(
                cell=stack.cell_id,
                scenes=len(idx),
                level=level,
                attribution="Contains modified Copernicus Sentinel data",
                **{k: str(v) for k, v in asdict(params).items()},
            )
        cog = Path(tmp) / "cog.tif"
        with rasterio.open(work) as src:
            cog_profile = {**src.profile, "driver": "COG", "overview_resampling": "average"}
            for k in ("tiled", "blockxsize", "blockysize", "interleave"):
                cog_profile.pop(k, None)
            cog_profile["blocksize"] = 512
            with rasterio.open(cog, "w", **cog_profile) as dst:
                dst.write(src.read())
                dst.descriptions = src.descriptions
                dst.update_tags(**src.tags())
        os.replace(cog, out_path)
    return {
        "cell": stack.cell_id,
        "path": str(out_path),
        "width": lv.width,
        "height": lv.height,
        "scenes": len(idx),
        "fallback_pixels": fallback,
    }


def run_batch(
    stacks: Sequence[tuple[str, Path]],
    out_dir: Path,
    params: ViewParams | None = None,
    scheduler: str | None = None,
    workers: int = 2,
    level: int = 0,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Composite every (cell, stack path) on Dask: a LocalCluster by default, or the cluster at
    ``scheduler`` (tcp://host:port). A failing cell is reported in its result, not fatal."""
    from dask.distributed import as_completed

    with dask_client(scheduler, workers) as client:
        futures = {
            client.submit(
                composite_cell,
                str(path),
                str(out_dir / f"{cid}.tif"),
                params,
                level,
                key=f"composite-{cid}",
                pure=False,
            ): cid
            for cid, path in stacks
        }
        results = []
        for fut in as_completed(futures):
            cid = futures[fut]
            try:
                res = fut.result()
            except Exception as exc:  # reported per cell: one bad stack must not sink the batch
                res = {"cell": cid, "error": f"{type(exc).__name__}: {exc}"}
            results.append(res)
            if progress:
                progress(res)
        return sorted(results, key=lambda r: r["cell"])


@contextmanager
def dask_client(scheduler: str | None = None, workers: int = 2) -> Iterator[Client]:
    """A Dask client: of the cluster at ``scheduler`` (tcp://host:port), or of a LocalCluster
    of ``workers`` processes on this machine, closed on exit."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        client = Client(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    # Processes, one thread each: the kernels use their own threads.
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
