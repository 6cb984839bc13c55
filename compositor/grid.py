"""Sentinel-2 / MGRS cell geometry: cell id -> UTM CRS, bounds and the 10 m grid.

A Sentinel-2 tile covers 109.8 km x 109.8 km. Its upper-left corner is the upper-left corner of
its MGRS 100 km square snapped outwards to the 60 m grid (so 10, 20 and 60 m pixels all align):
e.g. 29RKH -> origin (199980, 2800020).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import mgrs
from affine import Affine
from pyproj import CRS, Transformer

TILE_SIZE_M = 109_800.0
BASE_RESOLUTION = 10.0

_CELL_RE = re.compile(r"^(\d{1,2})([C-HJ-NP-X])([A-HJ-NP-Z])([A-HJ-NP-V])$")


class CellError(ValueError):
    """A cell id that is not a valid Sentinel-2 / MGRS tile id."""


@dataclass(frozen=True)
class Cell:
    id: str
    zone: int
    north: bool
    bounds: tuple[float, float, float, float]  # left, bottom, right, top in the UTM CRS

    @property
    def epsg(self) -> int:
        return (32600 if self.north else 32700) + self.zone

    @property
    def crs(self) -> CRS:
        return CRS.from_epsg(self.epsg)

    def transform(self, resolution: float = BASE_RESOLUTION) -> Affine:
        return Affine(resolution, 0.0, self.bounds[0], 0.0, -resolution, self.bounds[3])

    def lonlat_bounds(self) -> tuple[float, float, float, float]:
        return transform_bounds_to_lonlat(self.epsg, self.bounds)


def normalize_cell_id(cell_id: str) -> str:
    """'T54SUE', '54sue' -> '54SUE'; raises CellError naming the bad id."""
    s = str(cell_id).strip().upper()
    if s.startswith("T") and len(s) >= 5 and s[1].isdigit():
        s = s[1:]
    m = _CELL_RE.match(s)
    if not m or not 1 <= int(m.group(1)) <= 60:
        raise CellError(
            f"invalid Sentinel-2 cell id {cell_id!r}: expected zone 1-60, latitude band and "
            "two 100 km square letters, e.g. '54SUE'"
        )
    return f"{int(m.group(1)):02d}{m.group(2)}{m.group(3)}{m.group(4)}"


def cell(cell_id: str) -> Cell:
    """The Sentinel-2 tile geometry of an MGRS cell id."""
    cid = normalize_cell_id(cell_id)
    try:
        zone, hemi, e_center, n_center = mgrs.MGRS().MGRSToUTM(cid)
    except Exception as exc:  # the C library raises bare errors for impossible letter combos
        raise CellError(f"invalid Sentinel-2 cell id {cell_id!r}: {exc}") from None
    # MGRSToUTM at 100 km precision gives the square's centre.
    west = e_center - 50_000.0
    north_edge = n_center + 50_000.0
    left = math.floor(west / 60.0) * 60.0
    top = math.ceil(north_edge / 60.0) * 60.0
    return Cell(
        id=cid,
        zone=int(zone),
        north=(hemi == "N"),
        bounds=(left, top - TILE_SIZE_M, left + TILE_SIZE_M, top),
    )


def cell_at(lon: float, lat: float) -> str:
    """The MGRS cell id whose 100 km square holds (lon, lat)."""
    if not (-180 <= lon <= 180 and -80 <= lat <= 84):
        raise CellError(f"({lon}, {lat}) is outside the MGRS/UTM area (lat -80..84)")
    return normalize_cell_id(mgrs.MGRS().toMGRS(lat, lon, MGRSPrecision=0))


def cells_in_bbox(bbox: tuple[float, float, float, float], step_deg: float = 0.25) -> list[str]:
    """Cell ids whose 100 km squares intersect a lon/lat bbox (sampled on a fine lattice)."""
    w, s, e, n = bbox
    if not (w < e and s < n):
        raise CellError(
            f"bbox {bbox} must be (west, south, east, north) with west<east, south<north"
        )
    nx = max(2, int(math.ceil((e - w) / step_deg)) + 1)
    ny = max(2, int(math.ceil((n - s) / step_deg)) + 1)
    out: set[str] = set()
    for i in range(nx):
        for j in range(ny):
            lon = w + (e - w) * i / (nx - 1)
            lat = s + (n - s) * j / (ny - 1)
            out.add(cell_at(lon, lat))
    return sorted(out)


def transform_bounds_to_lonlat(
    epsg: int, bounds: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    t = Transformer.from_crs(epsg, 4326, always_xy=True)
    return tuple(t.transform_bounds(*bounds, densify_pts=21))  # type: ignore[return-value]


def utm_epsg_for(lon: float, lat: float) -> int:
    zone = min(60, int((lon + 180) // 6) + 1)
    return (32600 if lat >= 0 else 32700) + zone
