"""The ClearSky tile server: a titiler factory over the Stack reader, plus cells and the viewer."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Annotated, Any

import morecantile
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Path, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from morecantile import TileMatrixSet
from morecantile.defaults import TileMatrixSets
from pyproj import Transformer
from rio_tiler.models import ImageData
from titiler.core.dependencies import DefaultDependency
from titiler.core.errors import DEFAULT_STATUS_CODES, add_exception_handlers
from titiler.core.factory import TilerFactory
from titiler.core.resources.enums import ImageType
from titiler.core.utils import render_image

from compositor.alloc import retain_freed_memory
from compositor.grid import transform_bounds_to_lonlat
from compositor.render import encode_png, encode_tile
from compositor.stack import Stack
from compositor.tiling import MASK_CACHE, NoData, ViewParams, render_area
from tileserver import timing
from tileserver.cache import TileCacheMiddleware
from tileserver.params import ViewQuery
from tileserver.reader import CellsMosaicReader, StackReader
from tileserver.registry import Registry, UnknownCell
from tileserver.settings import Settings, get_settings
from tileserver.wmts import capabilities

log = logging.getLogger("clearsky.tileserver")
ATTRIBUTION = "Contains modified Copernicus Sentinel data"


def cell_stack(
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
        media = "image/png" if fmt == "png" else (output_format or ImageType.png).mediatype
        out = encode_tile(np.asarray(image.array.data), valid, fmt), media
    else:
        out = render_image(image, output_format=output_format, **kwargs)
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
SHARED_TMS = SharedTileMatrixSets(dict(morecantile.tms.tilematrixsets))


class StackTilerFactory(TilerFactory):
    """titiler's TilerFactory with only the routes that make sense for a composited stack."""

    def register_routes(self) -> None:
        if self.name != "all":
            self.info()
        self.tile()
        self.tilejson()


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
        "start": dates[0] if dates else None,
        "end": dates[-1] if dates else None,
        "dates": dates,
        "has_dem": stack.has_dem,
    }


def warm_up(registry: Registry) -> None:
    """Render one tile per layer kind before serving: the numba kernels compile (or load from
    their on-disk cache) here, not inside a user's first tile request."""
    stacks = registry.stacks()
    if not stacks:
        return
    t0 = time.perf_counter()
    st = stacks[0]
    tms = morecantile.tms.get("WebMercatorQuad")
    lon, lat = cell_summary(st)["center"]
    tile = tms.tile(lon, lat, 13)
    bounds = tuple(tms.xy_bounds(tile))
    for layer in ("composite", "count"):
        try:
            r = render_area(st, tms.rasterio_crs, bounds, 256, 256, ViewParams(layer=layer))
            encode_png(r.rgb, r.valid)
        except NoData:
            pass
    log.info("kernels ready in %.1f s", time.perf_counter() - t0)


def create_app(settings: Settings | None = None, warm: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if warm:
            await asyncio.to_thread(warm_up, app.state.registry)
        yield

    app = FastAPI(
        lifespan=lifespan,
        title="ClearSky",
        description="Cloud-free Sentinel-2 tiles composited on demand. " + ATTRIBUTION + ".",
        version="0.1.0",
    )
    app.state.settings = settings
    retain_freed_memory()  # tiles reuse freed buffers instead of faulting fresh pages in
    MASK_CACHE.resize(settings.mask_cache_mb * 2**20)
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
            "docker run -v \"$PWD/data/demo:/data:ro\" ...",
            settings.data_dir,
        )

    # Same dependencies for both layers: composite options in, no titiler band/expression ones.
    common = dict(
        reader_dependency=ViewQuery,
        layer_dependency=NoParams,
        dataset_dependency=NoParams,
        tile_dependency=NoParams,
        process_dependency=lambda: None,
        colormap_dependency=lambda: None,
        render_func=render_tile,
        supported_tms=SHARED_TMS,
        add_viewer=False,
        add_preview=False,
        add_part=False,
    )
    factory = StackTilerFactory(
        reader=StackReader, path_dependency=cell_stack, router_prefix="/cells/{cell}", **common
    )
    app.include_router(factory.router, prefix="/cells/{cell}", tags=["cells"])
    mosaic = StackTilerFactory(
        name="all", reader=CellsMosaicReader, path_dependency=all_stacks, **common
    )
    app.include_router(mosaic.router, tags=["all cells"])
    add_exception_handlers(app, DEFAULT_STATUS_CODES)

    @app.get("/cells.geojson", tags=["cells"])
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

    @app.get("/WMTSCapabilities.xml", tags=["OGC"])
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
        reg: Registry = request.app.state.registry
        return JSONResponse([cell_summary(s) for s in reg.stacks()])

    @app.get("/health", tags=["ops"])
    def health(request: Request) -> dict:
        reg: Registry = request.app.state.registry
        if not reg.ids():
            reg.refresh()  # stacks prefetched or mounted since start-up
        if not reg.ids():  # up, but nothing to serve: say so (the log says where it looked)
            return {
                "status": "no data",
                "cells": [],
                "message": "no stacks in the data directory: mount or prefetch some",
            }
        return {"status": "ok", "cells": reg.ids()}

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
    def metrics(request: Request) -> dict:
        cache = getattr(request.app.state, "tile_cache", None)
        return cache.stats.as_dict(cache.cache) if cache else {}

    app.add_middleware(
        TileCacheMiddleware, max_bytes=settings.tile_cache_mb * 2**20, state=app.state
    )
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET"],
        allow_headers=["*"],
        expose_headers=["ETag"],
    )
    return app
