"""Cells -> cloud-free composite COGs, on Dask distributed.

Each cell is composited block by block in its own UTM grid (blocks with a halo so the mask
dilation sees across block edges) and written as a Cloud-Optimised GeoTIFF: the bands of the
stack as float32 reflectance DN (NaN where no data) plus the clear-observation count. A cell is
one Dask task.

Workers open the stacks and write the COGs themselves, so every path they get is absolute and
checked, on every worker, before any cell is sent (a worker on another machine, or started in
another directory, must see the same data and output folders at the same paths). An output is
written under a hidden temporary name next to its final one and renamed when complete; a cell
whose COG already records the same stack state and parameters is skipped unless ``force``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from rasterio.windows import Window

from compositor.stack import Stack
from compositor.tiling import ViewParams, composite_window, effective_mask, mask_dilation

if TYPE_CHECKING:
    from dask.distributed import Client

log = logging.getLogger(__name__)
BLOCK = 1024
PARTIAL = ".partial-"  # hidden work files: .<name>.partial-<host>-<pid>-<random>.{work,cog}


class BatchError(RuntimeError):
    """A batch that cannot run: no scheduler there, or workers that cannot see the paths."""


def _provenance(stack: Stack, idx: Sequence[int], params: ViewParams, level: int) -> dict:
    """What a COG records about its inputs, to tell whether a rerun would change it."""
    return {
        "cell": stack.cell_id,
        "scenes": str(len(idx)),
        "scene_ids": hashlib.sha1(" ".join(stack.scenes[i].id for i in idx).encode()).hexdigest(),
        "level": str(level),
        "masks": str(stack.mask_version(np.asarray(idx))),
        **{k: str(v) for k, v in asdict(params).items()},
    }


def _clear_partials(out_path: Path) -> None:
    """Remove work files a killed earlier run left for this output."""
    for p in out_path.parent.glob(f".{out_path.name}{PARTIAL}*"):
        try:
            p.unlink()
        except OSError:
            pass


def is_done(
    stack_path: str | Path, out_path: str | Path, params: ViewParams, level: int = 0
) -> bool:
    """Whether ``out_path`` is a finished composite of this stack, as it is now, with these
    parameters (a rerun would write the same file)."""
    out_path = Path(out_path)
    if not out_path.is_file():
        return False
    stack = Stack.open(stack_path)
    idx = stack.complete_indices(params.start, params.end, params.months)
    want = _provenance(stack, idx, params, level)
    try:
        with rasterio.open(out_path) as ds:
            tags = ds.tags()
    except rasterio.errors.RasterioIOError:
        return False
    return all(tags.get(k) == v for k, v in want.items())


def composite_cell(
    stack_path: str | Path,
    out_path: str | Path,
    params: ViewParams | None = None,
    level: int = 0,
    block: int = BLOCK,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write the composite of one stack as a COG. Returns a summary (path, size, fallback).
    ``progress(done, total)`` is called after each block."""
    params = params or ViewParams()
    stack = Stack.open(stack_path)
    lv = stack.levels[level]
    idx = stack.complete_indices(params.start, params.end, params.months)
    if len(idx) == 0:
        raise ValueError(f"cell {stack.cell_id}: no scene matches the date filters")
    dilate = mask_dilation(effective_mask(stack, idx, params.mask), params.dilate)
    halo = math.ceil(dilate / lv.factor) + 1 if dilate > 0 else 1
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _clear_partials(out_path)
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
    blocks = [(r, c) for r in range(0, lv.height, block) for c in range(0, lv.width, block)]
    # Write a tiled GeoTIFF block by block, then copy it to a COG (overviews + layout) and
    # rename: readers never see a half-written file, and a killed run leaves only hidden work
    # files, removed by the next run of this cell.
    tag = f"{PARTIAL}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    work = out_path.parent / f".{out_path.name}{tag}.work.tif"
    cog = out_path.parent / f".{out_path.name}{tag}.cog.tif"
    try:
        with rasterio.open(work, "w", **profile) as dst:
            for k, (r, c) in enumerate(blocks):
                h, w = min(block, lv.height - r), min(block, lv.width - c)
                win = (r - halo, c - halo, h + 2 * halo, w + 2 * halo)
                res = composite_window(stack, level, win, params, idx)
                core = (slice(halo, halo + h), slice(halo, halo + w))
                vals = res.values[:, core[0], core[1]]
                count = res.count[core].astype(np.float32)
                count[np.isnan(vals[0])] = np.nan
                dst.write(np.concatenate([vals, count[None]]), window=Window(c, r, w, h))
                fallback += int(res.fallback[core].sum())
                if progress:
                    progress(k + 1, len(blocks))
            dst.descriptions = (*stack.bands, "clear_count")
            dst.update_tags(
                attribution="Contains modified Copernicus Sentinel data",
                **_provenance(stack, idx, params, level),
            )
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
    finally:
        for p in (work, cog):
            p.unlink(missing_ok=True)
    return {
        "cell": stack.cell_id,
        "path": str(out_path),
        "width": lv.width,
        "height": lv.height,
        "scenes": len(idx),
        "fallback_pixels": fallback,
    }


def check_paths(paths: Sequence[str], out_dir: str) -> list[str]:
    """Run on a worker: what of ``paths`` (to read) and ``out_dir`` (to write) it cannot use."""
    problems = [f"cannot see {p}" for p in paths if not os.path.exists(p)]
    d = Path(out_dir)
    while not d.exists() and d != d.parent:
        d = d.parent
    if not os.access(d, os.W_OK | os.X_OK):
        problems.append(f"cannot write {out_dir}")
    return problems


def connect(scheduler: str | None, workers: int, verbose: bool = False):
    """A Dask client: of the cluster at ``scheduler``, or of a new LocalCluster."""
    from dask.distributed import Client, LocalCluster

    # Dask configures its own stderr handler at import: its records go to ours instead (the
    # CLI prints them above the progress bar), and below WARNING only when asked.
    dlog = logging.getLogger("distributed")
    for h in list(dlog.handlers):
        dlog.removeHandler(h)
    dlog.propagate = True
    dlog.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if scheduler:
        try:
            return Client(scheduler, timeout=10), None
        except (OSError, TimeoutError) as exc:
            raise BatchError(
                f"cannot reach the Dask scheduler at {scheduler} within 10 s "
                f"({type(exc).__name__}): is `dask scheduler` running there and its port open?"
            ) from None
    # Processes, one thread each: the kernels use their own threads. Their logs only from
    # WARNING up (INFO lines about nannies and ports would run over the progress bar).
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # any free port: never a clash with another cluster's 8787
        host="127.0.0.1",
        silence_logs=logging.DEBUG if verbose else logging.WARNING,
    )
    return Client(cluster), cluster


def run_batch(
    stacks: Sequence[tuple[str, Path]],
    out_dir: Path,
    params: ViewParams | None = None,
    scheduler: str | None = None,
    workers: int = 2,
    level: int = 0,
    progress: Callable[[dict], None] | None = None,
    force: bool = False,
    verbose: bool = False,
) -> list[dict]:
    """Composite every (cell, stack path) on Dask: a LocalCluster by default, or the cluster at
    ``scheduler`` (tcp://host:port). Paths are made absolute and checked on every worker first
    (:class:`BatchError` if one cannot see them); cells whose COG is up to date are skipped
    (``{"skipped": True}`` in their result) unless ``force``. A failing cell is reported in its
    result, not fatal."""
    from dask.distributed import as_completed

    params = params or ViewParams()
    out_dir = Path(out_dir).expanduser().resolve()
    stacks = [(cid, Path(p).expanduser().resolve()) for cid, p in stacks]
    results: list[dict] = []
    todo = []
    for cid, path in stacks:
        out = out_dir / f"{cid}.tif"
        if not force and is_done(path, out, params, level):
            res = {"cell": cid, "path": str(out), "skipped": True}
            results.append(res)
            if progress:
                progress(res)
        else:
            todo.append((cid, path))
    if not todo:
        return sorted(results, key=lambda r: r["cell"])
    client, cluster = connect(scheduler, workers, verbose)
    try:
        seen = client.run(check_paths, [str(p) for _, p in todo], str(out_dir))
        if not seen:
            raise BatchError(f"the Dask cluster at {scheduler} has no workers")
        bad = {w: p for w, p in seen.items() if p}
        if bad:
            w, problems = next(iter(bad.items()))
            raise BatchError(
                f"{len(bad)} of {len(seen)} Dask workers cannot use the paths (worker {w}: "
                f"{problems[0]}): workers need the data and output folders on a shared "
                "filesystem at the same absolute paths"
            )
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
            for cid, path in todo
        }
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
    finally:
        client.close()
        if cluster is not None:
            if not verbose:  # "worker still alive after 4 s, killing" at shutdown is routine
                logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
            cluster.close()


@contextmanager
def dask_client(
    scheduler: str | None = None, workers: int = 2, verbose: bool = False
) -> Iterator[Client]:
    """A Dask client (:func:`connect`) that is closed, with its LocalCluster, on exit."""
    client, cluster = connect(scheduler, workers, verbose)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            if not verbose:  # "worker still alive after 4 s, killing" at shutdown is routine
                logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
            cluster.close()

