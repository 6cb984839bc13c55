"""Warp a small composite from the cell's UTM grid onto a target grid (a web-map tile).

GDAL's warper costs 10-50 ms of set-up per call for a 256 px tile; the mapping between UTM and
Web Mercator over one tile is so smooth that exact coordinates on a 17 x 17 lattice, bilinearly
interpolated (as GDAL's approximate transformer does), are exact to a tiny fraction of a pixel.
Sampling is then a numba loop. NaN is nodata: bilinear weights renormalise over valid neighbours
so edges are not eaten, and a pixel with no valid neighbour stays NaN.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from affine import Affine
from numba import njit, prange
from pyproj import Transformer
from rasterio.crs import CRS

LATTICE_STEP = 16  # target pixels between exactly transformed points


@lru_cache(maxsize=64)
def _transformer(dst_crs: CRS, src_crs: CRS) -> Transformer:
    return Transformer.from_crs(dst_crs.to_wkt(), src_crs.to_wkt(), always_xy=True)


def source_coords(
    src_transform: Affine,
    src_crs: CRS,
    dst_crs: CRS,
    dst_bounds: tuple[float, float, float, float],
    width: int,
    height: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Fractional source (col, row) of every target pixel centre, each float64 (height, width)."""
    left, bottom, right, top = dst_bounds
    nx = max(2, -(-width // LATTICE_STEP) + 1)
    ny = max(2, -(-height // LATTICE_STEP) + 1)
    # Lattice nodes at target pixel-centre positions spanning the whole tile.
    jx = np.linspace(0.5, width - 0.5, nx)
    iy = np.linspace(0.5, height - 0.5, ny)
    gx = left + jx * (right - left) / width
    gy = top - iy * (top - bottom) / height
    mx, my = np.meshgrid(gx, gy)
    tr = _transformer(dst_crs, src_crs)
    sx, sy = tr.transform(mx, my)
    inv = ~src_transform
    col = inv.a * sx + inv.b * sy + inv.c - 0.5
    row = inv.d * sx + inv.e * sy + inv.f - 0.5
    # Bilinear upsampling of the lattice to every pixel: separable, rows then columns.
    px = np.arange(width) + 0.5
    py = np.arange(height) + 0.5
    return _upsample(col, iy, jx, py, px), _upsample(row, iy, jx, py, px)


def _interp_weights(p: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation at ``p`` between sorted ``nodes``: the left node's index and the
    right node's weight, per point."""
    k = np.clip(np.searchsorted(nodes, p) - 1, 0, len(nodes) - 2)
    return k, (p - nodes[k]) / (nodes[k + 1] - nodes[k])


def _upsample(v: np.ndarray, iy: np.ndarray, jx: np.ndarray, py: np.ndarray, px: np.ndarray):
    """Lattice values ``v`` (len(iy), len(jx)) interpolated at rows ``py`` and columns ``px``,
    rows first. Two neighbours per point, written out: as matrix products the arithmetic is
    trivial but OpenBLAS's threads spin, 16 ms a call instead of 0.1 on the loaded 2-core VM
    (two calls per tile; measured with OPENBLAS_NUM_THREADS=2 and 1)."""
    ky, fy = _interp_weights(py, iy)
    kx, fx = _interp_weights(px, jx)
    rows = v[ky] * (1.0 - fy)[:, None] + v[ky + 1] * fy[:, None]
    return rows[:, kx] * (1.0 - fx) + rows[:, kx + 1] * fx


@njit(parallel=True, cache=True, nogil=True)
def _bilinear(src, col, row, out):  # pragma: no cover - compiled
    c_, h, w = src.shape
    H, W = col.shape
    for i in prange(H):
        for j in range(W):
            x = col[i, j]
            y = row[i, j]
            x0 = int(np.floor(x))
            y0 = int(np.floor(y))
            fx = x - x0
            fy = y - y0
            for c in range(c_):
                acc = 0.0
                wsum = 0.0
                for dy in range(2):
                    yy = y0 + dy
                    if yy < 0 or yy >= h:
                        continue
                    wy = fy if dy else 1.0 - fy
                    for dx in range(2):
                        xx = x0 + dx
                        if xx < 0 or xx >= w:
                            continue
                        v = src[c, yy, xx]
                        if np.isnan(v):
                            continue
                        wgt = wy * (fx if dx else 1.0 - fx)
                        acc += wgt * v
                        wsum += wgt
                # Pixels whose centre falls outside the valid data stay empty.
                out[c, i, j] = acc / wsum if wsum > 0.25 else np.nan


@njit(parallel=True, cache=True, nogil=True)
def _nearest(src, col, row, out):  # pragma: no cover - compiled
    c_, h, w = src.shape
    H, W = col.shape
    for i in prange(H):
        for j in range(W):
            x = int(np.floor(col[i, j] + 0.5))
            y = int(np.floor(row[i, j] + 0.5))
            for c in range(c_):
                if 0 <= x < w and 0 <= y < h:
                    out[c, i, j] = src[c, y, x]
                else:
                    out[c, i, j] = np.nan


def warp(
    src: np.ndarray,
    src_transform: Affine,
    src_crs: CRS,
    dst_crs: CRS,
    dst_bounds: tuple[float, float, float, float],
    width: int,
    height: int,
    resampling: str = "bilinear",
) -> np.ndarray:
    """(C, h, w) float32 (NaN = nodata) in ``src_crs`` -> (C, height, width) float32."""
    if resampling not in ("bilinear", "nearest"):
        raise ValueError(f"resampling must be bilinear or nearest, not {resampling!r}")
    col, row = source_coords(src_transform, src_crs, dst_crs, dst_bounds, width, height)
    out = np.empty((src.shape[0], height, width), np.float32)
    s = np.ascontiguousarray(src, dtype=np.float32)
    (_bilinear if resampling == "bilinear" else _nearest)(s, col, row, out)
    return out
