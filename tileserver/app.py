"""The ClearSky tile server: a titiler factory over the Stack reader, plus cells and the viewer."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal

import anyio.to_thread
import morecantile
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from morecantile import TileMatrixSet
from morecantile.defaults import TileMatrixSets
from pyproj import Transformer
from rio_tiler.errors import TileOutsideBounds
from rio_tiler.models import ImageData
from titiler.core.dependencies import DefaultDependency
from titiler.core.factory import TilerFactory
from titiler.core.resources.enums import ImageType
from titiler.core.utils import render_image

from compositor.alloc import limit_arenas, retain_freed_memory
from compositor.grid import transform_bounds_to_lonlat
from compositor.memory import HEAP_BASE_MB, RENDER_BUDGET, TRIMS, keep_heap_under
from compositor.render import encode_tile
from compositor.stack import Stack
from compositor.tiling import MASK_CACHE, NoData, ViewParams
from tileserver import timing
from tileserver.cache import RequestGuard, TileCache
from tileserver.params import (
    MAX_QUERY_BYTES,
    MAX_TILESIZE,
    MIN_TILESIZE,
    ViewQuery,
    invalid,
    single_values,
)
from tileserver.reader import CellsMosaicReader, StackReader
from tileserver.registry import Registry, UnknownCell
from tileserver.settings import Settings, get_settings
from tileserver.tiles import RenderQueue, TileService, lower_thread_priority
from tileserver.wmts import capabilities

log = logging.getLogger("clearsky.tileserver")
ATTRIBUTION = "Contains modified Copernicus Sentinel data"


async def cell_stack(
    request: Request,
    cell: Annotated[str, Path(description="Sentinel-2 MGRS cell id, e.g. 34TER")],
) -> Stack:
    """The path dependency: a cell id resolves to a known stack or 404s. No path, no URL."""
    try:
        return request.app.state.registry.get(cell)
    except UnknownCell as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None


@dataclass
class NoParams(DefaultDependency):
    """Replaces titiler's band/expression/nodata options, which do not apply to composites."""


def render_tile(
    image: ImageData, output_format: ImageType | None = None, **kwargs: Any
) -> tuple[bytes, str]:
    """PNG, JPEG and WebP through compositor.render.encode_tile, the encoder exports use too
    (tiles are rendered uint8 RGB already); other formats through titiler's renderer."""
    t0 = time.perf_counter()
    fmt = (output_format or ImageType.png).value
    if fmt in ("png", "jpg", "jpeg", "webp") and kwargs.get("add_mask", True):
        valid = ~np.ma.getmaskarray(image.array)[0]
        media = {"png": "image/png", "webp": "image/webp"}.get(fmt, "image/jpeg")
        out = encode_tile(np.asarray(image.array.data), valid, fmt), media
    else:
        body, media = render_image(image, output_format=output_format, **kwargs)
        # titiler's name for JPEG; the registered media type is image/jpeg
        out = body, "image/jpeg" if media == "image/jpg" else media
    timing.record({"encode": time.perf_counter() - t0})
    return out


class SharedTileMatrixSets(TileMatrixSets):
    """morecantile's registry without its deep copy of the TMS on every request (3.6 ms of a
    cold tile, measured): the tile routes only read it."""

    def get(self, identifier: str) -> TileMatrixSet:
        hit = _TMS_CACHE.get(identifier)
        if hit is None:
            hit = _TMS_CACHE[identifier] = super().get(identifier)
        return hit


_TMS_CACHE: dict[str, TileMatrixSet] = {}
# The matrix sets web clients use: XYZ / WMTS in Web Mercator, and the geographic one.
TMS_IDS = ("WebMercatorQuad", "WorldCRS84Quad")
SHARED_TMS = SharedTileMatrixSets({k: morecantile.tms.tilematrixsets[k] for k in TMS_IDS})


class TileFormat(StrEnum):
    png = "png"
    jpg = "jpg"
    jpeg = "jpeg"
    webp = "webp"


ERROR_MODEL = {
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"detail": {"type": "string"}}}
        }
    }
}
TILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
        "description": "The tile (PNG with alpha by default).",
    },
    304: {"description": "Not modified (If-None-Match matched the ETag)."},
    404: {"description": "Unknown cell, or a tile outside every served cell.", **ERROR_MODEL},
    503: {"description": "Too many tiles waiting to render; see Retry-After.", **ERROR_MODEL},
}


def check_tile_address(tms: TileMatrixSet, z: int, x: int, y: int) -> None:
    """z within the matrix set's zooms and x, y within that zoom's matrix, else a 422."""
    if not tms.minzoom <= z <= tms.maxzoom:
        raise invalid(("path", "z"), f"{tms.id} has zooms {tms.minzoom}-{tms.maxzoom}", z)
    m = tms.matrix(z)
    if x >= m.matrixWidth:
        raise invalid(("path", "x"), f"0-{m.matrixWidth - 1} at zoom {z} of {tms.id}", x)
    if y >= m.matrixHeight:
        raise invalid(("path", "y"), f"0-{m.matrixHeight - 1} at zoom {z} of {tms.id}", y)


def _media(fmt: TileFormat | None) -> ImageType | None:
    return None if fmt in (None, TileFormat.png) else ImageType(fmt.value)


class StackTilerFactory(TilerFactory):
    """titiler's TilerFactory with only the routes that make sense for a composited stack, and
    its own tile route: bounded parameters, the tile cache keyed by the validated ones, and the
    render queue."""

    def register_routes(self) -> None:
        if self.name != "all":
            self.info()
        self.tile()
        self.tilejson()

    def info(self) -> None:
        """The stack's info (bounds, CRS, bands, levels). Our own route: titiler's declares a
        response model whose OpenAPI schema is not valid OpenAPI 3.1 (tuple items)."""
        factory = self

        @self.router.get(
            "/info",
            response_class=JSONResponse,
            operation_id=f"{self.operation_prefix}getInfo",
            responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}},
        )
        def info(src=Depends(self.path_dependency)) -> JSONResponse:  # noqa: B008
            """Stack info: bounds, CRS, bands, data type, size, overview factors."""
            with factory.reader(src) as r:
                return JSONResponse(r.info().model_dump(mode="json", exclude_none=True))

    def tile(self) -> None:
        factory = self
        kind = self.name or "cell"

        @self.router.get(
            "/tiles/{tileMatrixSetId}/{z}/{x}/{y}",
            operation_id=f"{self.operation_prefix}getTile",
            response_class=Response,
            responses=TILE_RESPONSES,
        )
        @self.router.get(
            "/tiles/{tileMatrixSetId}/{z}/{x}/{y}.{format}",
            operation_id=f"{self.operation_prefix}getTileWithFormat",
            response_class=Response,
            responses=TILE_RESPONSES,
        )
        async def tile(
            request: Request,
            z: Annotated[int, Path(ge=0, le=30, description="Zoom level of the matrix set")],
            x: Annotated[int, Path(ge=0, description="Column (0 .. matrix width - 1)")],
            y: Annotated[int, Path(ge=0, description="Row (0 .. matrix height - 1)")],
            tileMatrixSetId: Annotated[
                Literal[TMS_IDS], Path(description="Tile matrix set (WebMercatorQuad for XYZ)")
            ],
            view: Annotated[ViewQuery, Depends()],
            format: TileFormat | None = None,
            tilesize: Annotated[
                int,
                Query(ge=MIN_TILESIZE, le=MAX_TILESIZE, description="Tile width = height, px"),
            ] = 256,
            src=Depends(self.path_dependency),  # noqa: B008 - the factory's own dependency
        ) -> Response:
            """A composited tile (PNG with alpha; .jpg and .webp opaque)."""
            tms = factory.supported_tms.get(tileMatrixSetId)
            check_tile_address(tms, z, x, y)
            stacks = src if isinstance(src, list) else [src]
            # The key: the validated parameters (and which stores, as they are now), never
            # the raw query string.
            key = (
                kind,
                tuple((s.cell_id, str(s.path), len(s.damaged)) for s in stacks),
                tileMatrixSetId,
                z,
                x,
                y,
                format,
                tilesize,
                view.view,
            )

            def render() -> tuple[bytes, str]:
                for _ in range(3):  # again if a scene was found damaged meanwhile
                    before = sum(len(s.damaged) for s in stacks)
                    with factory.reader(src, tms=tms, params=view.view) as r:
                        image = r.tile(x, y, z, tilesize=tilesize)
                    if sum(len(s.damaged) for s in stacks) == before:
                        break
                return render_tile(image, _media(format))

            return await request.app.state.tiles.respond(request, key, render)


def all_stacks(request: Request) -> list[Stack]:
    """Path dependency of the global layer: every served cell."""
    return request.app.state.registry.stacks()


def cell_footprint(stack: Stack) -> dict:
    """GeoJSON polygon of a stack's UTM footprint in lon/lat (densified edges)."""
    t = Transformer.from_crs(stack.epsg, 4326, always_xy=True)
    left, bottom, right, top = stack.bounds
    n = 16
    xs = [left + (right - left) * i / n for i in range(n)]
    ys = [top - (top - bottom) * i / n for i in range(n)]
    ring = (
        [(x, top) for x in xs]
        + [(right, y) for y in ys]
        + [(x, bottom) for x in reversed([*xs[1:], right])]
        + [(left, y) for y in reversed([*ys[1:], bottom])]
    )
    lon, lat = t.transform([p[0] for p in ring], [p[1] for p in ring])
    coords = [[round(a, 7), round(b, 7)] for a, b in zip(lon, lat, strict=True)]
    coords.append(coords[0])
    return {"type": "Polygon", "coordinates": [coords]}


def layer_zooms(stack: Stack) -> tuple[int, int]:
    r = StackReader(stack)
    return r.minzoom, r.maxzoom


def cell_summary(stack: Stack) -> dict:
    idx = stack.complete_indices()
    dates = [stack.scenes[i].date.isoformat() for i in idx]
    w, s, e, n = transform_bounds_to_lonlat(stack.epsg, stack.bounds)
    return {
        "id": stack.cell_id,
        "title": stack.meta.get("title", stack.cell_id),
        "kind": stack.meta.get("kind"),
        "bounds": [w, s, e, n],
        "center": [(w + e) / 2, (s + n) / 2],
        "crs": f"EPSG:{stack.epsg}",
        "resolution": stack.resolution,
        "width": stack.width,
        "height": stack.height,
        "scene_count": len(idx),
        "warnings": list(stack.warnings),
        "start": dates[0] if dates else None,
        "end": dates[-1] if dates else None,
        "dates": dates,
        "has_dem": stack.has_dem,
    }


WARM_CELLS = 8  # cells whose shard indexes and first pages are read before serving


def warm_up(registry: Registry, render_nice: int = 0) -> None:
    """Render, before serving, a tile of every kind through the same path as a request: the
    numba kernels compile (or load from their on-disk cache) here, not in a user's first
    tile. Kinds: the layers (composite, count, date, cloud), each mask method, the hillshade,
    native and coarse zooms (masks repeated 2 x 2 or not), every output format."""
    # numba's worker threads start here and inherit this thread's priority: below the event loop
    lower_thread_priority(render_nice)
    stacks = registry.stacks()
    if not stacks:
        return
    t0 = time.perf_counter()
    tms = SHARED_TMS.get("WebMercatorQuad")
    n = 0
    for i, st in enumerate(stacks[:WARM_CELLS]):
        reader = StackReader(st, tms=tms)
        lon, lat = cell_summary(st)["center"]
        native = min(max(tms.zoom_for_res(st.resolution), reader.minzoom), reader.maxzoom)
        idx = st.complete_indices()
        date = st.scenes[idx[len(idx) // 2]].date if len(idx) else None
        kinds: list[tuple[int, ViewParams, TileFormat | None]] = [(native, ViewParams(), None)]
        if i == 0:  # every stage once per process, on the first cell
            kinds += [
                (native - 1, ViewParams(), None),
                (native, ViewParams(mask="segformer"), None),
                (native - 1, ViewParams(mask="segformer"), None),
                (native, ViewParams(mask="none"), None),
                (native, ViewParams(mask="scl"), None),
                (native, ViewParams(hillshade=0.5), None),
                (native, ViewParams(layer="count"), None),
                (native, ViewParams(), TileFormat.jpg),
                (native, ViewParams(), TileFormat.webp),
            ]
            if date is not None:
                kinds += [
                    (native, ViewParams(layer="date", date=date), None),
                    (native, ViewParams(layer="date", date=date, hillshade=0.5), None),
                    (native, ViewParams(layer="cloud", date=date), None),
                ]
        for z, view, fmt in kinds:
            tile = tms.tile(lon, lat, z)
            try:
                with StackReader(st, tms=tms, params=view) as r:
                    render_tile(r.tile(tile.x, tile.y, tile.z), _media(fmt))
                n += 1
            except (NoData, TileOutsideBounds):
                pass
            except Exception:  # a damaged cell must not stop the server from starting
                log.exception("warm-up tile of cell %s failed", st.cell_id)
    log.info("%d warm-up tiles rendered in %.1f s", n, time.perf_counter() - t0)


def heap_bound_mb(settings: Settings) -> int:
    """The anonymous memory the server may keep: what it needs at rest, its caches and the
    renders in flight. Freed memory past it goes back to the kernel."""
    return HEAP_BASE_MB + settings.tile_cache_mb + settings.mask_cache_mb + settings.render_mb


def create_app(settings: Settings | None = None, warm: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Sync routes and dependencies run in anyio's pool; renders have their own (tiles.py).
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.http_threads
        if warm:
            await asyncio.to_thread(warm_up, app.state.registry, settings.render_nice)
        keep_heap_under(heap_bound_mb(settings) * 2**20)
        yield
        app.state.tiles.queue.shutdown()

    app = FastAPI(
        lifespan=lifespan,
        title="ClearSky",
        description="Cloud-free Sentinel-2 tiles composited on demand. " + ATTRIBUTION + ".",
        version="0.1.0",
        responses={
            414: {"description": "Query string too long.", **ERROR_MODEL},
            422: {"description": "A parameter is invalid; `detail` names it."},
        },
    )
    app.state.settings = settings
    # Render threads run Python between kernels; a 1 ms GIL switch interval (not 5) lets the
    # event loop answer /health and cached tiles promptly while they do.
    sys.setswitchinterval(0.001)
    retain_freed_memory()  # tiles reuse freed buffers instead of faulting fresh pages in
    limit_arenas(2)  # ... and the memory kept is what runs at once, not each thread's peak
    MASK_CACHE.resize(settings.mask_cache_mb * 2**20)
    RENDER_BUDGET.resize(settings.render_mb * 2**20)
    app.state.registry = Registry(settings.data_dir)
    log.info(
        "serving %d cells from %s: %s",
        len(app.state.registry.ids()),
        settings.data_dir,
        ", ".join(app.state.registry.ids()),
    )
    if not app.state.registry.ids():
        log.warning(
            "no stacks in %s: this server has no cells to show. Point CLEARSKY_DATA_DIR (or "
            "`clearsky serve --data`) at a folder of <CELL>.zarr stacks; in Docker, mount one: "
            'docker run -v "$PWD/data/demo:/data:ro" ...',
            settings.data_dir,
        )
    app.state.tile_cache = TileCache(settings.tile_cache_mb * 2**20)
    app.state.tiles = TileService(
        app.state.tile_cache,
        RenderQueue(settings.render_threads, settings.render_queue, settings.render_nice),
    )

    # Same dependencies for both layers: composite options in, no titiler band/expression or
    # rendering ones (their `rescale` would stretch our already rendered 8-bit tiles again).
    common = dict(
        reader_dependency=ViewQuery,
        layer_dependency=NoParams,
        dataset_dependency=NoParams,
        tile_dependency=NoParams,
        render_dependency=NoParams,
        process_dependency=lambda: None,
        colormap_dependency=lambda: None,
        render_func=render_tile,
        supported_tms=SHARED_TMS,
        add_viewer=False,
        add_preview=False,
        add_part=False,
    )
    once = [Depends(single_values)]
    not_found = {404: {"description": "Unknown cell.", **ERROR_MODEL}}
    factory = StackTilerFactory(
        reader=StackReader, path_dependency=cell_stack, router_prefix="/cells/{cell}", **common
    )
    app.include_router(
        factory.router,
        prefix="/cells/{cell}",
        tags=["cells"],
        dependencies=once,
        responses=not_found,
    )
    mosaic = StackTilerFactory(
        name="all", reader=CellsMosaicReader, path_dependency=all_stacks, **common
    )
    app.include_router(mosaic.router, tags=["all cells"], dependencies=once)

    @app.exception_handler(TileOutsideBounds)
    async def outside(request: Request, exc: TileOutsideBounds) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 404)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback; the client gets no path, no stack trace.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error (logged)"}, 500)

    @app.get(
        "/cells.geojson",
        tags=["cells"],
        response_class=JSONResponse,
        responses={200: {"content": {"application/geo+json": {"schema": {"type": "object"}}}}},
    )
    def cells_geojson(request: Request) -> JSONResponse:
        reg: Registry = request.app.state.registry
        features = []
        for st in reg.stacks():
            props = cell_summary(st)
            props.pop("dates")
            features.append(
                {
                    "type": "Feature",
                    "id": st.cell_id,
                    "properties": props,
                    "geometry": cell_footprint(st),
                }
            )
        return JSONResponse(
            {"type": "FeatureCollection", "features": features}, media_type="application/geo+json"
        )

    @app.get(
        "/WMTSCapabilities.xml",
        tags=["OGC"],
        response_class=Response,
        responses={200: {"content": {"application/xml": {"schema": {"type": "string"}}}}},
        dependencies=once,
    )
    def wmts(request: Request, view: Annotated[ViewQuery, Depends()]) -> Response:
        """WMTS for QGIS/GDAL: one layer over all cells ('all') and one per cell. Query
        parameters (percentile, months, ...) are validated and carried into the tile URLs."""
        reg: Registry = request.app.state.registry
        layers = []
        for st in reg.stacks():
            lo, hi = layer_zooms(st)
            layers.append(
                {
                    "id": st.cell_id,
                    "title": st.meta.get("title", st.cell_id),
                    "bounds": transform_bounds_to_lonlat(st.epsg, st.bounds),
                    "minzoom": lo,
                    "maxzoom": hi,
                    "path": f"/cells/{st.cell_id}",
                }
            )
        if layers:
            b = [lyr["bounds"] for lyr in layers]
            layers.insert(
                0,
                {
                    "id": "all",
                    "title": "ClearSky, all cells",
                    "bounds": (
                        min(x[0] for x in b),
                        min(x[1] for x in b),
                        max(x[2] for x in b),
                        max(x[3] for x in b),
                    ),
                    "minzoom": min(lyr["minzoom"] for lyr in layers),
                    "maxzoom": max(lyr["maxzoom"] for lyr in layers),
                    "path": "",
                },
            )
        base = str(request.base_url).rstrip("/")
        xml = capabilities(base, layers, request.url.query)
        return Response(xml, media_type="application/xml")

    @app.get("/cells", tags=["cells"])
    def list_cells(request: Request) -> JSONResponse:
        """Served cells; ``scene_count`` counts the scenes served, ``warnings`` says what was
        left out (damaged scenes) and why."""
        reg: Registry = request.app.state.registry
        return JSONResponse([cell_summary(s) for s in reg.stacks()])

    @app.get("/health", tags=["ops"])
    async def health(request: Request) -> dict:
        """Liveness, answered on the event loop (never queued behind renders); ``warnings``
        lists cells of the data directory that are not served, and why. Up with nothing to
        serve says so (the log says where it looked)."""
        reg: Registry = request.app.state.registry
        q = request.app.state.tiles.queue
        if not reg.ids():  # a cheap check of the folder, so this stays on the event loop
            return {
                "status": "no data",
                "cells": [],
                "warnings": list(reg.warnings),
                "message": "no stacks in the data directory: mount or prefetch some",
                "renders_pending": q.pending,
            }
        return {
            "status": "ok",
            "cells": reg.ids(),
            "warnings": list(reg.warnings),
            "renders_pending": q.pending,
        }

    static_dir = FsPath(settings.static_dir)
    if static_dir.is_dir():
        app.mount("/static", StaticFiles(directory=static_dir), name="static")

        @app.get("/", include_in_schema=False)
        def viewer() -> FileResponse:
            return FileResponse(static_dir / "index.html")

        @app.get("/embed", include_in_schema=False)
        def embed() -> FileResponse:
            """The viewer for an iframe: the page reads /embed and hides its panel."""
            return FileResponse(static_dir / "index.html")

    @app.get("/metrics", tags=["ops"])
    async def metrics(request: Request) -> dict:
        """Tiles served, cache hits, 304s, renders and their mean time, queue state, and how often
        the memory bound handed free heap pages back."""
        q = request.app.state.tiles.queue
        return {
            **request.app.state.tile_cache.as_dict(),
            "render_threads": q.threads,
            "render_queue": q.depth,
            "renders_pending": q.pending,
            "render_budget_bytes": RENDER_BUDGET.limit,
            "render_bytes_in_flight": RENDER_BUDGET.used,
            "heap_trims": TRIMS["heap"],
        }

    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET"],
        allow_headers=["*"],
        expose_headers=["ETag"],
    )
    app.add_middleware(RequestGuard, max_query_bytes=MAX_QUERY_BYTES)
    return app
