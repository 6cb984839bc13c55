"""DEM hillshade and its blend into the composite for a basemap look.

Slopes use the true ground size of a pixel at the level being read (UTM metres), so relief keeps
the same strength at every zoom; callers pass a window with a halo of at least one pixel so that
tiles share edge slopes and show no seams.
"""

from __future__ import annotations

import numpy as np

SUN_AZIMUTH = 315.0  # degrees clockwise from north: light from the north-west, as maps expect
SUN_ALTITUDE = 45.0


def hillshade(
    dem: np.ndarray,
    pixel_size: float,
    azimuth: float = SUN_AZIMUTH,
    altitude: float = SUN_ALTITUDE,
    z_factor: float = 1.0,
) -> np.ndarray:
    """Lambertian shading (H, W) in 0..1 of a DEM in metres, Horn's 3x3 gradient.

    NaN in the DEM gives NaN shading there; the outermost ring uses edge-replicated neighbours.
    """
    z = np.pad(dem.astype(np.float64) * z_factor, 1, mode="edge")
    # Horn (1981): weighted differences over the 3x3 neighbourhood.
    dzdx = (
        (z[:-2, 2:] + 2 * z[1:-1, 2:] + z[2:, 2:]) - (z[:-2, :-2] + 2 * z[1:-1, :-2] + z[2:, :-2])
    ) / (8 * pixel_size)
    dzdy = (
        (z[2:, :-2] + 2 * z[2:, 1:-1] + z[2:, 2:]) - (z[:-2, :-2] + 2 * z[:-2, 1:-1] + z[:-2, 2:])
    ) / (8 * pixel_size)
    # Rows run south, so a positive dzdy means the ground rises towards the south.
    slope = np.arctan(np.hypot(dzdx, dzdy))
    aspect = np.arctan2(dzdy, -dzdx)
    zen = np.radians(90.0 - altitude)
    az = np.radians(360.0 - azimuth + 90.0)
    shade = np.cos(zen) * np.cos(slope) + np.sin(zen) * np.sin(slope) * np.cos(az - aspect)
    return np.clip(shade, 0.0, 1.0).astype(np.float32)


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
