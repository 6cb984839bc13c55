"""rio-tiler reader over a Stack: every read composites on demand (compositor.tiling)."""

from __future__ import annotations

from typing import Any

import attr
import numpy as np
from morecantile import Tile
from rasterio.crs import CRS
from rio_tiler.errors import TileOutsideBounds
from rio_tiler.io.base import BaseReader
from rio_tiler.models import BandStatistics, ImageData, Info, PointData

from compositor.mosaic import OutsideCells, render_tile, tile_touches
from compositor.stack import Stack
from compositor.tiling import NoData, ViewParams, render_area
from tileserver import timing


class _TilesOnly:
    """rio-tiler's abstract reads that no route of ours calls (only tile and info are routed)."""

    def statistics(self, *args: Any, **kwargs: Any) -> dict[str, BandStatistics]:
        raise NotImplementedError

    def part(self, *args: Any, **kwargs: Any) -> ImageData:
        raise NotImplementedError

    def preview(self, *args: Any, **kwargs: Any) -> ImageData:
        raise NotImplementedError

    def point(self, *args: Any, **kwargs: Any) -> PointData:
        raise NotImplementedError

    def feature(self, *args: Any, **kwargs: Any) -> ImageData:
        raise NotImplementedError


@attr.s
class StackReader(_TilesOnly, BaseReader):
    """``input`` is an open :class:`Stack` (resolved from a known cell id, never a path)."""

    input: Stack

    params: ViewParams = attr.ib(factory=ViewParams)

    def __attrs_post_init__(self) -> None:
        s = self.input
        self.bounds = s.bounds
        self.crs = CRS.from_epsg(s.epsg)
        self.transform = s.transform
        self.height, self.width = s.height, s.width

    @property
    def minzoom(self) -> int:
        return max(self._minzoom - 4, 0)  # coarse levels keep a cell visible zoomed far out

    @property
    def maxzoom(self) -> int:
        return self._maxzoom + 2  # over-zoom a little past 10 m, as basemaps do

    def tile_exists(self, tile_x: int, tile_y: int, tile_z: int) -> bool:
        return tile_touches(self.input, self.tms, Tile(x=tile_x, y=tile_y, z=tile_z))

    def tile(
        self, tile_x: int, tile_y: int, tile_z: int, tilesize: int | None = None, **kwargs: Any
    ) -> ImageData:
        if not self.tile_exists(tile_x, tile_y, tile_z):
            raise TileOutsideBounds(
                f"tile {tile_z}/{tile_x}/{tile_y} is outside cell {self.input.cell_id}"
            )
        size = tilesize or 256
        bounds = tuple(self.tms.xy_bounds(Tile(x=tile_x, y=tile_y, z=tile_z)))
        try:
            r = render_area(self.input, self.tms.rasterio_crs, bounds, size, size, self.params)
        except NoData as exc:
            raise TileOutsideBounds(str(exc)) from None
        timing.record(r.timings)
        mask = np.broadcast_to(~r.valid, r.rgb.shape)
        return ImageData(
            np.ma.MaskedArray(r.rgb, mask=mask),
            bounds=bounds,
            crs=self.tms.rasterio_crs,
            band_names=["red", "green", "blue"],
        )

    def info(self) -> Info:
        s = self.input
        return Info(
            bounds=self.bounds,
            crs=f"EPSG:{s.epsg}",
            band_metadata=[(b, {}) for b in s.bands],
            band_descriptions=[(b, b) for b in s.bands],
            dtype="uint16",
            nodata_type="Nodata",
            width=s.width,
            height=s.height,
            count=len(s.bands),
            overviews=[lv.factor for lv in s.levels[1:]],
        )


@attr.s
class CellsMosaicReader(_TilesOnly, BaseReader):
    """Every served cell as one layer: each tile is the union of the cells it touches
    (compositor.mosaic.render_tile: the first cell by id that has a pixel gives it)."""

    input: list[Stack]
    params: ViewParams = attr.ib(factory=ViewParams)

    def __attrs_post_init__(self) -> None:
        self.readers = [StackReader(s, tms=self.tms, params=self.params) for s in self.input]
        self.crs = self.tms.rasterio_geographic_crs
        if self.readers:
            bs = [r.get_geographic_bounds(self.crs) for r in self.readers]
            self.bounds = (
                min(b[0] for b in bs),
                min(b[1] for b in bs),
                max(b[2] for b in bs),
                max(b[3] for b in bs),
            )
        else:
            self.bounds = (-180.0, -85.0, 180.0, 85.0)

    @property
    def minzoom(self) -> int:
        return min((r.minzoom for r in self.readers), default=0)

    @property
    def maxzoom(self) -> int:
        return max((r.maxzoom for r in self.readers), default=18)

    def tile(
        self, tile_x: int, tile_y: int, tile_z: int, tilesize: int | None = None, **kwargs: Any
    ) -> ImageData:
        # compositor.mosaic joins the cells (clearsky export renders through it too). A tile
        # inside a cell's bounds without a valid pixel (an edge) is a transparent tile, not an
        # error: browsers log every 404.
        tile = Tile(x=tile_x, y=tile_y, z=tile_z)
        try:
            r = render_tile(self.input, self.tms, tile, self.params, tilesize or 256)
        except OutsideCells as exc:
            raise TileOutsideBounds(str(exc)) from None
        timing.record(r.timings)
        mask = np.broadcast_to(~r.valid, r.rgb.shape)
        return ImageData(
            np.ma.MaskedArray(r.rgb, mask=mask),
            bounds=tuple(self.tms.xy_bounds(tile)),
            crs=self.tms.rasterio_crs,
            band_names=["red", "green", "blue"],
        )

    def info(self) -> Info:
        return Info(
            bounds=self.bounds,
            crs="EPSG:4326",
            band_metadata=[],
            band_descriptions=[],
            dtype="uint8",
            nodata_type="Mask",
        )
