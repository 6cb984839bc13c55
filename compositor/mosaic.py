"""Web-map tiles over one or many cells: which cells a tile touches, and their seamless union.

The server's global layer and `clearsky export` both render tiles here, so an exported tile has
the pixels the server sends for the same z/x/y and parameters (seams between cells included).
Each cell is rendered by :func:`compositor.tiling.render_area`."""

from __future__ import annotations

from collections.abc import Sequence

import morecantile
import numpy as np
from morecantile import Tile, TileMatrixSet
from rasterio.crs import CRS
from rasterio.warp import calculate_default_transform, transform_bounds

from compositor.stack import Stack
from compositor.tiling import NoData, Rendered, ViewParams, render_area

WEB_MERCATOR = morecantile.tms.get("WebMercatorQuad")


class OutsideCells(NoData):
    """The tile touches none of the cells."""


def tile_touches(stack: Stack, tms: TileMatrixSet, tile: Tile) -> bool:
    """Whether ``tile`` overlaps the stack's footprint, tested in the stack's own CRS (the rule
    rio-tiler's ``tile_exists`` applies): a UTM cell is not a rectangle in Web Mercator."""
    b = transform_bounds(
        tms.rasterio_crs, CRS.from_epsg(stack.epsg), *tms.xy_bounds(tile), densify_pts=21
    )
    if not all(np.isfinite(b)):
        return True  # not projectable: let the renderer decide
    left, bottom, right, top = stack.bounds
    return b[0] < right and b[2] > left and b[3] > bottom and b[1] < top


def render_tile(
    stacks: Sequence[Stack],
    tms: TileMatrixSet,
    tile: Tile,
    params: ViewParams,
    size: int = 256,
) -> Rendered:
    """The tile over every cell it touches, each pixel from the first cell (by id) that has it.

    Neighbouring Sentinel-2 cells overlap by ~10 km and hold the same acquisitions there, so the
    first valid pixel gives one seamless picture. A tile inside a cell but without a valid pixel
    (an edge, or no scene passes the filters) comes back all transparent; a tile that touches no
    cell raises :class:`OutsideCells`. Stage timings are summed over the cells."""
    bounds = tuple(tms.xy_bounds(tile))
    rgb = np.zeros((3, size, size), np.uint8)
    valid = np.zeros((size, size), bool)
    timings: dict[str, float] = {}
    touched = False
    for stack in sorted(stacks, key=lambda s: s.cell_id):
        if not tile_touches(stack, tms, tile):
            continue
        touched = True
        try:
            r = render_area(stack, tms.rasterio_crs, bounds, size, size, params)
        except NoData:
            continue
        for k, v in r.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        fill = ~valid & r.valid
        rgb[:, fill] = r.rgb[:, fill]
        valid |= fill
        if valid.all():
            break
    if not touched:
        raise OutsideCells(f"tile {tile.z}/{tile.x}/{tile.y} touches no served cell")
    return Rendered(rgb=rgb, valid=valid, timings=timings)


def native_zoom(stack: Stack, tms: TileMatrixSet = WEB_MERCATOR) -> int:
    """The zoom whose pixels match the stack's finest level (rio-tiler's maxzoom rule)."""
    src = CRS.from_epsg(stack.epsg)
    affine, _, _ = calculate_default_transform(
        src, tms.rasterio_crs, stack.width, stack.height, *stack.bounds
    )
    return tms.zoom_for_res(max(abs(affine.a), abs(affine.e)))
