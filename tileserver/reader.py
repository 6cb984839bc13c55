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

from compositor.stack import Stack
from compositor.tiling import NoData, ViewParams, render_area


@attr.s
class StackReader(BaseReader):
    """``input`` is an open :class:`Stack` (resolved from a known cell id, never a path)."""

    input: Stack

    params: ViewParams = attr.ib(factory=ViewParams)
    minzoom: int = attr.ib(init=False)
    maxzoom: int = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        s = self.input
        self.bounds = s.bounds
        self.crs = CRS.from_epsg(s.epsg)
        self.transform = s.transform
        self.height, self.width = s.height, s.width
        self.minzoom = max(self._minzoom - 4, 0)  # coarse levels keep it visible zoomed out
        self.maxzoom = self._maxzoom + 2

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

    def statistics(self, *args: Any, **kwargs: Any) -> dict[str, BandStatistics]:
        raise NotImplementedError("statistics are not served for stacks")

    def part(self, *args: Any, **kwargs: Any) -> ImageData:
        raise NotImplementedError

    def preview(self, *args: Any, **kwargs: Any) -> ImageData:
        raise NotImplementedError

    def point(self, *args: Any, **kwargs: Any) -> PointData:
        raise NotImplementedError

    def feature(self, *args: Any, **kwargs: Any) -> ImageData:
        raise NotImplementedError
