"""DEM hillshade and its blend into the composite for a basemap look.

Slopes use the true ground size of a pixel at the level being read (UTM metres), so relief keeps
the same strength at every zoom; callers pass a window with a halo of at least one pixel so that
tiles share edge slopes and show no seams.
"""

from __future__ import annotations

import numpy as np
from numba import njit

SUN_AZIMUTH = 315.0  # degrees clockwise from north: light from the north-west, as maps expect
SUN_ALTITUDE = 45.0


@njit(cache=True, nogil=True)
def _shade(z, pixel_size, cz, sz, caz, saz, out):  # pragma: no cover - compiled
    H, W = out.shape
    k = 1.0 / (8.0 * pixel_size)
    for y in range(H):
        for x in range(W):
            # Horn (1981): weighted differences over the 3x3 neighbourhood (z is padded by 1).
            dzdx = (
                (z[y, x + 2] + 2 * z[y + 1, x + 2] + z[y + 2, x + 2])
                - (z[y, x] + 2 * z[y + 1, x] + z[y + 2, x])
            ) * k
            dzdy = (
                (z[y + 2, x] + 2 * z[y + 2, x + 1] + z[y + 2, x + 2])
                - (z[y, x] + 2 * z[y, x + 1] + z[y, x + 2])
            ) * k
            # cos(zen)cos(slope) + sin(zen)sin(slope)cos(az - aspect) with aspect =
            # atan2(dzdy, -dzdx), written with the surface normal: no trigonometry per pixel.
            s = (cz + sz * (-caz * dzdx + saz * dzdy)) / np.sqrt(1.0 + dzdx * dzdx + dzdy * dzdy)
            out[y, x] = min(max(s, 0.0), 1.0)


def hillshade(
    dem: np.ndarray,
    pixel_size: float,
    azimuth: float = SUN_AZIMUTH,
    altitude: float = SUN_ALTITUDE,
    z_factor: float = 1.0,
) -> np.ndarray:
    """Lambertian shading (H, W) in 0..1 of a DEM in metres, Horn's 3x3 gradient.

    NaN in the DEM gives NaN shading there; the outermost ring uses edge-replicated neighbours.
    Rows run south, so a positive dz/dy means the ground rises towards the south.
    """
    z = np.pad(dem.astype(np.float64) * z_factor, 1, mode="edge")
    zen = np.radians(90.0 - altitude)
    az = np.radians(360.0 - azimuth + 90.0)
    out = np.empty(dem.shape, np.float32)
    _shade(z, float(pixel_size), np.cos(zen), np.sin(zen), np.cos(az), np.sin(az), out)
    return out


def blend(
    rgb: np.ndarray, shade: np.ndarray, strength: float, altitude: float = SUN_ALTITUDE
) -> np.ndarray:
    """Shade a display image (3, H, W) float 0..1.

    Shading is normalised by its value on flat ground, so flat areas keep their true colour and
    only relief darkens or brightens: a multiply that does not dim the whole map."""
    if strength <= 0:
        return rgb
    flat = np.sin(np.radians(altitude))
    factor = np.where(np.isfinite(shade), shade / flat, 1.0)
    factor = np.clip(factor, 0.0, 1.6)
    out = rgb * (1.0 - strength + strength * factor)[None]
    return np.clip(out, 0.0, 1.0)
