"""A region -> a PMTiles archive (or MBTiles, or an XYZ folder) and a static web map.

For maps in pages with no server: the folder works behind any static web server. Tiles come
from compositor.mosaic.render_tile, the renderer of the server's global layer, and are encoded
by compositor.render.encode_tile as the server does: an exported tile is the server's tile.

Work: tiles are rendered in chunks on one thread per core here, or on a Dask cluster given by
its scheduler's address (as `clearsky batch` can). Every finished chunk is committed
to a work store in the output folder (`.NAME.work.sqlite`), so a killed export continues where
it stopped; the archive, MBTiles file, tile folder and page appear only once complete (written
under a temporary name, then renamed).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import itertools
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import morecantile
import numpy as np

from compositor.alloc import retain_freed_memory
from compositor.grid import CellError, normalize_cell_id, transform_bounds_to_lonlat
from compositor.mosaic import WEB_MERCATOR, OutsideCells, native_zoom, render_tile
from compositor.params import ParamError, TileQuery, view_params
from compositor.render import TILE_FORMATS, encode_tile
from compositor.stack import Stack, StackError, list_stacks
from compositor.tiling import NoData, ViewParams, scene_for_date

log = logging.getLogger(__name__)

ATTRIBUTION = "Contains modified Copernicus Sentinel data"
MAX_ZOOM = 18
TILE_SIZE = 256
CHUNK = 8  # tiles per task and per commit: ~0.5 s of work at native zoom
LAYOUTS = ("pmtiles", "xyz")
SAMPLES = 6  # tiles rendered up front to estimate the archive size
STATIC_FILES = {  # npm files the page needs (static/package.json) -> name next to index.html
    "node_modules/leaflet/dist/leaflet.js": "leaflet.js",
    "node_modules/leaflet/dist/leaflet.css": "leaflet.css",
    "node_modules/leaflet/LICENSE": "LICENSE.leaflet",
    "node_modules/pmtiles/dist/pmtiles.js": "pmtiles.js",
    "export/map.js": "map.js",
}


class ExportError(ValueError):
    """Bad input or a region with nothing to export: one line for the user."""


class ExportIncomplete(RuntimeError):
    """Some tiles failed to render; the finished ones are kept for the next run."""


TileKey = tuple[int, int, int]  # z, x, y


@dataclass
class ExportPlan:
    """What an export renders and writes; made (and checked) by :func:`plan_export`."""

    name: str
    out_dir: Path
    cells: list[tuple[str, Path]]  # (cell id, stack path) rendered, by id: pixels' priority
    bounds: tuple[float, float, float, float]  # lon/lat of the whole region
    boxes: list[tuple[float, float, float, float]]  # lon/lat: each cell's part of the region
    minzoom: int
    maxzoom: int
    query: TileQuery
    view: ViewParams
    fmt: str = "png"
    layout: str = "pmtiles"
    mbtiles: bool = False
    tiles: list[TileKey] = field(default_factory=list)  # every tile overlapping the region
    region_cells: list[str] = field(default_factory=list)  # the cells whose boxes these are

    @property
    def archive(self) -> Path:
        return self.out_dir / f"{self.name}.pmtiles"

    @property
    def mbtiles_path(self) -> Path:
        return self.out_dir / f"{self.name}.mbtiles"

    @property
    def tile_dir(self) -> Path:
        return self.out_dir / "tiles"

    @property
    def work_path(self) -> Path:
        return self.out_dir / f".{self.name}.work.sqlite"

    def key(self) -> str:
        """What the tiles depend on: a work store made for another key is started over."""
        stacks = []
        for cid, path in self.cells:
            st = Stack.open(path)
            idx = st.complete_indices()
            ids = [st.scenes[i].id for i in idx]
            mv = st.mask_version(idx) if self.view.mask == "segformer" else 0
            stacks.append([cid, str(Path(path).resolve()), ids, mv])
        doc = {
            "stacks": stacks,
            "boxes": self.boxes,
            "zooms": [self.minzoom, self.maxzoom],
            "format": self.fmt,
            "size": TILE_SIZE,
            "view": {k: str(v) for k, v in asdict(self.view).items()},
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def center(self) -> tuple[float, float, int]:
        w, s, e, n = self.bounds
        return (w + e) / 2, (s + n) / 2, max(self.minzoom, min(self.maxzoom, self.fit_zoom()))

    def fit_zoom(self) -> int:
        """The zoom at which the region spans about one tile."""
        w, s, e, n = self.bounds
        left, bottom = WEB_MERCATOR.xy(w, s)
        right, top = WEB_MERCATOR.xy(e, n)
        return WEB_MERCATOR.zoom_for_res(max(right - left, top - bottom) / TILE_SIZE)

    def metadata(self) -> dict:
        """TileJSON-like metadata, as PMTiles and MBTiles readers expect it."""
        lon, lat, z = self.center()
        return {
            "name": self.name,
            "description": "Cloud-free Sentinel-2 composite made with ClearSky "
            f"({', '.join(self.region_cells)})",
            "attribution": ATTRIBUTION,
            "type": "baselayer",
            "format": self.fmt,
            "version": "1",
            "bounds": list(self.bounds),
            "center": [lon, lat, z],
            "minzoom": self.minzoom,
            "maxzoom": self.maxzoom,
            "tilesize": TILE_SIZE,
            "clearsky": {
                "cells": self.region_cells,
                "parameters": self.query.given(),
                "layer": self.view.layer,
                "exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
        }


# ------------------------------------------------------------------------ planning (validation)
def plan_export(
    data_dir: Path,
    cells: Sequence[str] = (),
    bbox: tuple[float, float, float, float] | None = None,
    minzoom: int | None = None,
    maxzoom: int | None = None,
    params: Mapping[str, str | None] | None = None,
    out_dir: Path = Path("export"),
    name: str | None = None,
    fmt: str = "png",
    layout: str = "pmtiles",
    mbtiles: bool = False,
) -> ExportPlan:
    """Check everything before any work: parameters (the server's rules), cells, region, zooms,
    format. Raises ExportError naming the problem."""
    try:
        query, view = view_params(params or {})
    except ParamError as exc:
        raise ExportError(str(exc)) from None
    if fmt not in TILE_FORMATS:
        raise ExportError(f"invalid 'format': {fmt!r}; use one of {', '.join(TILE_FORMATS)}")
    if layout not in LAYOUTS:
        raise ExportError(f"invalid 'layout': {layout!r}; use one of {', '.join(LAYOUTS)}")
    chosen = _choose_cells(Path(data_dir), cells, bbox)
    stacks = [Stack.open(p) for _, p in chosen]
    # Named cells are rendered alone; a --bbox region is the global layer: tiles along its
    # edges take pixels from any served cell they touch, as the server's do.
    render = chosen if cells else sorted(list_stacks(data_dir).items())
    # Tiles cover each cell's box, not the box around all of them: two cells far apart must
    # not export the ocean between them.
    boxes = [transform_bounds_to_lonlat(s.epsg, s.bounds) for s in stacks]
    if bbox is not None:
        boxes = [
            (max(b[0], bbox[0]), max(b[1], bbox[1]), min(b[2], bbox[2]), min(b[3], bbox[3]))
            for b in boxes
        ]
    boxes = [tuple(round(v, 7) for v in b) for b in boxes]  # type: ignore[misc]
    region = (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )
    _check_scenes(stacks, view)
    plan = ExportPlan(
        name=name or "-".join(c for c, _ in chosen),
        out_dir=Path(out_dir),
        cells=[(c.upper(), p) for c, p in render],
        bounds=region,
        boxes=boxes,  # type: ignore[arg-type]
        region_cells=[c for c, _ in chosen],
        minzoom=0,
        maxzoom=0,
        query=query,
        view=view,
        fmt=fmt,
        layout=layout,
        mbtiles=mbtiles,
    )
    if not _safe_name(plan.name):
        raise ExportError(f"invalid 'name': {plan.name!r}; use letters, digits, '-', '_', '.'")
    hi = max(native_zoom(s) for s in stacks) if maxzoom is None else maxzoom
    lo = min(plan.fit_zoom(), hi) if minzoom is None else minzoom
    if not 0 <= lo <= MAX_ZOOM or not 0 <= hi <= MAX_ZOOM:
        raise ExportError(f"zooms must be within 0..{MAX_ZOOM}, got --minzoom {lo} --maxzoom {hi}")
    if lo > hi:
        raise ExportError(f"empty zoom range: --minzoom {lo} is above --maxzoom {hi}")
    plan.minzoom, plan.maxzoom = lo, hi
    plan.tiles = region_tiles(plan.boxes, lo, hi)
    if not plan.tiles:
        raise ExportError(f"no tile of zooms {lo}-{hi} overlaps the region {plan.bounds}")
    if plan.out_dir.exists() and not plan.out_dir.is_dir():
        raise ExportError(f"--out {plan.out_dir} exists and is not a directory")
    return plan


def _safe_name(name: str) -> bool:
    return bool(name) and not name.startswith(".") and all(c.isalnum() or c in "-_." for c in name)


def _choose_cells(
    data_dir: Path, cells: Sequence[str], bbox: tuple[float, float, float, float] | None
) -> list[tuple[str, Path]]:
    have = {k.upper(): v for k, v in list_stacks(data_dir).items()}
    if not cells and bbox is None:
        raise ExportError("give CELL ids or --bbox W,S,E,N")
    chosen: dict[str, Path] = {}
    for c in cells:
        try:
            cid = normalize_cell_id(c)
        except CellError as exc:
            raise ExportError(str(exc)) from None
        if cid not in have:
            raise ExportError(
                f"no stack for cell {cid} in {data_dir} (have: {', '.join(have) or 'none'})"
            )
        chosen[cid] = have[cid]
    if bbox is not None:
        pool = chosen or have
        chosen = {}
        for cid, path in pool.items():
            try:
                st = Stack.open(path)
            except StackError:
                continue
            w, s, e, n = transform_bounds_to_lonlat(st.epsg, st.bounds)
            if w < bbox[2] and e > bbox[0] and s < bbox[3] and n > bbox[1]:
                chosen[cid] = path
        if not chosen:
            raise ExportError(
                f"no cell in {data_dir} overlaps the region {','.join(map(str, bbox))} "
                f"(have: {', '.join(have) or 'none'})"
            )
    return sorted(chosen.items())


def _check_scenes(stacks: Sequence[Stack], view: ViewParams) -> None:
    """At least one cell has a scene the parameters select; else every tile would be empty."""
    for st in stacks:
        if view.layer in ("date", "cloud"):
            try:
                scene_for_date(st, view.date)  # type: ignore[arg-type]
                return
            except NoData:
                continue
        elif len(st.complete_indices(view.start, view.end, view.months)):
            return
    what = (
        f"a scene on {view.date}"
        if view.layer in ("date", "cloud")
        else "a scene matching the date filters"
    )
    raise ExportError(f"no cell of {', '.join(s.cell_id for s in stacks)} has {what}")


def region_tiles(
    boxes: Sequence[tuple[float, float, float, float]], minzoom: int, maxzoom: int
) -> list[TileKey]:
    """Every Web Mercator tile overlapping one of ``boxes`` (lon/lat), in PMTiles tile-id order
    (a Hilbert curve per zoom: neighbours on the map are neighbours in the archive)."""
    from pmtiles.tile import zxy_to_tileid

    zooms = list(range(minzoom, maxzoom + 1))
    tiles = {(t.z, t.x, t.y) for b in boxes for t in WEB_MERCATOR.tiles(*b, zooms=zooms)}
    return sorted(tiles, key=lambda t: zxy_to_tileid(*t))


# ------------------------------------------------------------------------ rendering (workers)
_OPEN: dict[tuple[str, ...], list[Stack]] = {}  # stacks opened once per worker process


def render_chunk(
    stack_paths: tuple[str, ...],
    tiles: Sequence[TileKey],
    view: ViewParams,
    fmt: str,
) -> list[tuple[TileKey, bytes | None]]:
    """Render and encode tiles; None for a tile with no valid pixel (nothing to store)."""
    retain_freed_memory()  # as the server does: tiles reuse freed buffers, no fresh page faults
    stacks = _OPEN.get(stack_paths)
    if stacks is None:
        stacks = _OPEN[stack_paths] = [Stack.open(p) for p in stack_paths]
    out: list[tuple[TileKey, bytes | None]] = []
    for z, x, y in tiles:
        try:
            r = render_tile(stacks, WEB_MERCATOR, morecantile.Tile(x, y, z), view, TILE_SIZE)
        except OutsideCells:
            out.append(((z, x, y), None))
            continue
        out.append(((z, x, y), encode_tile(r.rgb, r.valid, fmt) if r.valid.any() else None))
    return out


# ------------------------------------------------------------------------ the work store
class WorkStore:
    """Rendered tiles of an unfinished export (SQLite in the output folder): a tile row with
    NULL data was rendered and is empty. Committed per chunk; a store made for other tiles
    (another key) is started over."""

    def __init__(self, path: Path, key: str):
        self.path = path
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS tiles (z INTEGER, x INTEGER, y INTEGER, data BLOB, "
            "PRIMARY KEY (z, x, y))"
        )
        row = self.db.execute("SELECT v FROM meta WHERE k = 'key'").fetchone()
        self.resumed = row is not None and row[0] == key
        if row is not None and not self.resumed:
            log.info("%s was made for other tiles or parameters: starting over", path.name)
            self.db.execute("DELETE FROM tiles")
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('key', ?)", (key,))
        self.db.commit()

    def done(self) -> set[TileKey]:
        return {tuple(r) for r in self.db.execute("SELECT z, x, y FROM tiles")}  # type: ignore[misc]

    def sizes(self, zoom: int) -> list[int]:
        """Bytes of each rendered tile of ``zoom`` (0 for an empty one)."""
        rows = self.db.execute("SELECT length(data) FROM tiles WHERE z = ?", (zoom,))
        return [r[0] or 0 for r in rows]

    def put(self, results: Sequence[tuple[TileKey, bytes | None]]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO tiles VALUES (?, ?, ?, ?)",
            [(z, x, y, data) for (z, x, y), data in results],
        )
        self.db.commit()

    def tiles(self) -> Iterator[tuple[TileKey, bytes]]:
        """Stored tiles with data, in PMTiles tile-id order."""
        from pmtiles.tile import zxy_to_tileid

        keys = [
            tuple(r) for r in self.db.execute("SELECT z, x, y FROM tiles WHERE data IS NOT NULL")
        ]
        keys.sort(key=lambda t: zxy_to_tileid(*t))
        for z, x, y in keys:
            (data,) = self.db.execute(
                "SELECT data FROM tiles WHERE z = ? AND x = ? AND y = ?", (z, x, y)
            ).fetchone()
            yield (z, x, y), data

    def close(self, remove: bool = False) -> None:
        self.db.close()
        if remove:
            self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------------ running
@dataclass
class ExportReport:
    plan: ExportPlan
    tiles: int  # tiles overlapping the region
    stored: int  # tiles with data (in the archive)
    rendered: int  # rendered by this run (the rest came from an interrupted one)
    bytes: int  # tile bytes stored
    estimate_bytes: int
    seconds: float
    outputs: list[Path]
    snippet: str


def estimate_bytes(plan: ExportPlan, store: WorkStore, stacks: Sequence[Stack]) -> int:
    """Archive size estimate: the mean size of a few tiles of the finest zoom (rendered now,
    spread over it, unless an earlier run did), times that zoom's tile count, times the pyramid
    above it (each coarser zoom holds a quarter of the pixels). The sampled tiles are kept."""
    finest = [t for t in plan.tiles if t[0] == plan.maxzoom]
    sizes = store.sizes(plan.maxzoom)
    if len(sizes) < SAMPLES:
        done = store.done()
        todo = [t for t in finest if t not in done]
        step = max(len(todo) // SAMPLES, 1)
        picks = todo[step // 2 :: step][: SAMPLES - len(sizes)]
        paths = tuple(str(p) for _, p in plan.cells)
        _OPEN.setdefault(paths, list(stacks))
        store.put(render_chunk(paths, picks, plan.view, plan.fmt))
        sizes = store.sizes(plan.maxzoom)
    pyramid = sum(4.0**-k for k in range(plan.maxzoom - plan.minzoom + 1))
    return int(np.mean(sizes) * len(finest) * pyramid) if sizes else 0


def run_export(
    plan: ExportPlan,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_estimate: Callable[[int, int, int], None] | None = None,
    base_url: str | None = None,
) -> ExportReport:
    """Render every tile of ``plan`` (resuming an interrupted run) and write the outputs.

    ``progress(done, total)`` is called as chunks finish; ``on_estimate(tiles, already_done,
    estimated_bytes)`` once before the work starts. Raises ExportIncomplete when tiles failed
    (the rest are kept: run again), ExportError when no tile has data."""
    t0 = time.perf_counter()
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    store = WorkStore(plan.work_path, plan.key())
    stacks = [Stack.open(p) for _, p in plan.cells]
    total = len(plan.tiles)
    earlier = len(store.done())
    est = estimate_bytes(plan, store, stacks)
    done = store.done()
    todo = [t for t in plan.tiles if t not in done]
    if on_estimate:
        on_estimate(total, earlier, est)
    if progress:
        progress(total - len(todo), total)
    failed: list[str] = []
    if todo:
        paths = tuple(str(p) for _, p in plan.cells)
        chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]
        finished = total - len(todo)

        def collect(results: list[tuple[TileKey, bytes | None]]) -> None:
            nonlocal finished
            store.put(results)
            finished += len(results)
            if progress:
                progress(finished, total)

        failed = _render_all(paths, chunks, plan, workers, scheduler, collect)
    if failed:
        store.close()
        raise ExportIncomplete(
            f"{len(failed)} chunks of tiles failed (first: {failed[0]}); the rest is kept in "
            f"{plan.work_path.name}: run the same command again to retry"
        )
    outputs, stored, nbytes = _write_outputs(plan, store)
    store.close(remove=True)
    return ExportReport(
        plan=plan,
        tiles=total,
        stored=stored,
        rendered=total - earlier,
        bytes=nbytes,
        estimate_bytes=est,
        seconds=time.perf_counter() - t0,
        outputs=outputs,
        snippet=embed_snippet(plan, base_url),
    )


def _render_all(
    paths: tuple[str, ...],
    chunks: list[list[TileKey]],
    plan: ExportPlan,
    workers: int | None,
    scheduler: str | None,
    collect: Callable[[list[tuple[TileKey, bytes | None]]], None],
) -> list[str]:
    """Render the chunks on ``workers`` threads here (default: one per core), or on the Dask
    cluster at ``scheduler``. Results are handed to ``collect`` in this thread (one writer).
    Returns the errors of failed chunks."""
    if scheduler is None:
        # Threads, as the server renders concurrent tiles: the kernels, GDAL and zlib release
        # the GIL. On two cores they do as well as a cluster of two worker processes
        # (bench/export.py) with nothing to start: a cluster is for more machines.
        n = workers or os.cpu_count() or 1
        with ThreadPoolExecutor(n) as pool:
            return _drain(
                lambda c: pool.submit(render_chunk, paths, c, plan.view, plan.fmt),
                chunks,
                2 * n,
                collect,
            )
    from compositor.batch import dask_client

    with dask_client(scheduler) as client:
        return _drain(
            lambda c: client.submit(render_chunk, paths, c, plan.view, plan.fmt, pure=False),
            chunks,
            4 * max(sum(client.nthreads().values()), 1),
            collect,
        )


def _drain(
    submit: Callable[[list[TileKey]], Any],
    chunks: list[list[TileKey]],
    window: int,
    collect: Callable[[list[tuple[TileKey, bytes | None]]], None],
) -> list[str]:
    """Keep ``window`` chunks in flight (results come back here: a big export must not hold
    all its tiles in memory), collect each as it finishes; one failing chunk is reported, the
    others go on. Futures are concurrent.futures' or Dask's (same interface)."""
    failed: list[str] = []
    pending = iter(chunks)
    running = {submit(c) for c in itertools.islice(pending, window)}
    while running:
        done = _first_done(running)
        running.discard(done)
        try:
            collect(done.result())
        except Exception as exc:  # reported; a rerun renders just the missing tiles
            failed.append(f"{type(exc).__name__}: {exc}")
        nxt = next(pending, None)
        if nxt is not None:
            running.add(submit(nxt))
    return failed


def _first_done(futures: set) -> Any:
    """One of ``futures`` that has finished, waiting for one if none has."""
    if isinstance(next(iter(futures)), Future):
        done, _ = wait(futures, return_when=FIRST_COMPLETED)
    else:
        from dask.distributed import wait as dask_wait

        done, _ = dask_wait(list(futures), return_when="FIRST_COMPLETED")
    return next(iter(done))


# ------------------------------------------------------------------------ writing
def _write_outputs(plan: ExportPlan, store: WorkStore) -> tuple[list[Path], int, int]:
    stored = store.db.execute("SELECT count(*), sum(length(data)) FROM tiles WHERE data NOT NULL")
    n, nbytes = stored.fetchone()
    if not n:
        raise ExportError(
            f"no tile of the region has data (zooms {plan.minzoom}-{plan.maxzoom}, cells "
            f"{', '.join(plan.region_cells)})"
        )
    outputs: list[Path] = []
    if plan.layout == "pmtiles":
        write_pmtiles(plan, store.tiles(), plan.archive)
        outputs.append(plan.archive)
    else:
        write_xyz(plan, store, plan.tile_dir)
        outputs.append(plan.tile_dir)
    if plan.mbtiles:
        write_mbtiles(plan, store.tiles(), plan.mbtiles_path)
        outputs.append(plan.mbtiles_path)
    outputs.append(write_page(plan))
    return outputs, int(n), int(nbytes or 0)


def _replace(tmp: Path, dst: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def write_pmtiles(plan: ExportPlan, tiles: Iterator[tuple[TileKey, bytes]], path: Path) -> None:
    """A PMTiles v3 archive of ``tiles`` (in tile-id order), written by the pmtiles package."""
    from pmtiles.tile import Compression, TileType, zxy_to_tileid
    from pmtiles.writer import Writer

    kinds = {"png": TileType.PNG, "jpg": TileType.JPEG, "webp": TileType.WEBP}
    lon, lat, z = plan.center()
    w, s, e, n = plan.bounds
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        writer = Writer(f)
        for key, data in tiles:
            writer.write_tile(zxy_to_tileid(*key), data)
        writer.finalize(
            {
                "tile_type": kinds[plan.fmt],
                "tile_compression": Compression.NONE,  # PNG/JPEG/WebP are compressed already
                "min_lon_e7": int(w * 1e7),
                "min_lat_e7": int(s * 1e7),
                "max_lon_e7": int(e * 1e7),
                "max_lat_e7": int(n * 1e7),
                "center_zoom": z,
                "center_lon_e7": int(lon * 1e7),
                "center_lat_e7": int(lat * 1e7),
            },
            plan.metadata(),
        )
    _replace(tmp, path)


def write_mbtiles(plan: ExportPlan, tiles: Iterator[tuple[TileKey, bytes]], path: Path) -> None:
    """The same tiles as MBTiles 1.3 (rows counted from the south, as the spec has it)."""
    tmp = path.with_name(path.name + ".part")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp)
    db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
    db.execute(
        "CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, "
        "tile_data BLOB)"
    )
    db.execute("CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)")
    meta = plan.metadata()
    rows = {
        "name": meta["name"],
        "description": meta["description"],
        "attribution": meta["attribution"],
        "type": meta["type"],
        "version": meta["version"],
        "format": "jpg" if plan.fmt == "jpg" else plan.fmt,
        "bounds": ",".join(str(v) for v in meta["bounds"]),
        "center": ",".join(str(v) for v in meta["center"]),
        "minzoom": str(meta["minzoom"]),
        "maxzoom": str(meta["maxzoom"]),
        "json": json.dumps({"clearsky": meta["clearsky"]}),
    }
    db.executemany("INSERT INTO metadata VALUES (?, ?)", list(rows.items()))
    db.executemany(
        "INSERT INTO tiles VALUES (?, ?, ?, ?)",
        (((z, x, (1 << z) - 1 - y, data)) for (z, x, y), data in tiles),
    )
    db.commit()
    db.close()
    _replace(tmp, path)


def write_xyz(plan: ExportPlan, store: WorkStore, path: Path) -> None:
    """A {z}/{x}/{y}.EXT folder. Tiles without data are written too (transparent): the page
    asks for every tile of the region, and a static server answers a missing one with a 404."""
    empty = encode_tile(
        np.zeros((3, TILE_SIZE, TILE_SIZE), np.uint8),
        np.zeros((TILE_SIZE, TILE_SIZE), bool),
        plan.fmt,
    )
    tmp = path.with_name(".tiles.part")
    shutil.rmtree(tmp, ignore_errors=True)

    def put(key: TileKey, data: bytes) -> None:
        z, x, y = key
        d = tmp / str(z) / str(x)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{y}.{plan.fmt}").write_bytes(data)

    written = set()
    for key, data in store.tiles():
        put(key, data)
        written.add(key)
    for key in plan.tiles:
        if key not in written:
            put(key, empty)
    old = path.with_name(".tiles.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def static_dir() -> Path:
    """The viewer's front-end folder with its npm packages ($CLEARSKY_STATIC_DIR, as the
    server reads it, else the checkout's static/)."""
    env = os.environ.get("CLEARSKY_STATIC_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "static"


def write_page(plan: ExportPlan) -> Path:
    """index.html and its assets (Leaflet and the PMTiles reader from npm, copied)."""
    src = static_dir()
    missing = [p for p in [*STATIC_FILES, "export/index.html"] if not (src / p).is_file()]
    if missing:
        raise ExportError(
            f"front-end files missing in {src}: {', '.join(missing)} (run `npm ci` in static/, "
            "or set CLEARSKY_STATIC_DIR)"
        )
    assets = plan.out_dir / "assets"
    assets.mkdir(exist_ok=True)
    for rel, name in STATIC_FILES.items():
        shutil.copyfile(src / rel, assets / name)
    images = src / "node_modules/leaflet/dist/images"
    shutil.copytree(images, assets / "images", dirs_exist_ok=True)
    config = {
        "name": plan.name,
        "bounds": list(plan.bounds),
        "boxes": [list(b) for b in plan.boxes],
        "minzoom": plan.minzoom,
        "maxzoom": plan.maxzoom,
        "tilesize": TILE_SIZE,
        "attribution": ATTRIBUTION,
        "archive": plan.archive.name if plan.layout == "pmtiles" else None,
        "tiles": f"tiles/{{z}}/{{x}}/{{y}}.{plan.fmt}" if plan.layout == "xyz" else None,
        "parameters": plan.query.given(),
    }
    title = f"{plan.name}: cloud-free Sentinel-2 (ClearSky)"
    page = (
        (src / "export/index.html")
        .read_text()
        .replace("{{TITLE}}", html.escape(title))
        .replace("{{CONFIG}}", json.dumps(config).replace("</", "<\\/"))
    )
    out = plan.out_dir / "index.html"
    tmp = out.with_name("index.html.part")
    tmp.write_text(page)
    _replace(tmp, out)
    return out


def embed_snippet(plan: ExportPlan, base_url: str | None = None) -> str:
    """The <iframe> for a blog post; ``base_url`` is where the folder will be published
    (default: the folder's name, relative to the post)."""
    where = (base_url.rstrip("/") if base_url else plan.out_dir.resolve().name) + "/index.html"
    return (
        f'<iframe src="{html.escape(where)}" width="100%" height="450" style="border:0" '
        'loading="lazy" title="ClearSky cloud-free Sentinel-2"></iframe>'
    )
