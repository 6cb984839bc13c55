import numpy as np

from compositor.hillshade import SUN_ALTITUDE, blend, hillshade


def _plane(slope_x: float, n: int = 32) -> np.ndarray:
    """Ground rising by slope_x metres per metre towards the east (10 m pixels)."""
    x = np.arange(n) * 10.0
    return np.tile(x * slope_x, (n, 1)).astype(np.float32)


def test_flat_ground_is_lit_by_the_sun_altitude():
    shade = hillshade(np.zeros((8, 8), np.float32), 10.0)
    assert np.allclose(shade, np.sin(np.radians(SUN_ALTITUDE)), atol=1e-6)


def test_slopes_facing_the_northwest_sun_are_brighter():
    west_facing = hillshade(_plane(0.5), 10.0)[5:-5, 5:-5]  # rises east: faces west
    east_facing = hillshade(_plane(-0.5), 10.0)[5:-5, 5:-5]
    flat = np.sin(np.radians(SUN_ALTITUDE))
    assert west_facing.mean() > flat > east_facing.mean()


def test_true_pixel_size_keeps_shading_across_levels():
    # The same terrain sampled at 10 m and at 20 m (every other pixel) shades the same.
    dem = _plane(0.3, 64)
    fine = hillshade(dem, 10.0)[4:-4, 4:-4].mean()
    coarse = hillshade(dem[::2, ::2], 20.0)[2:-2, 2:-2].mean()
    assert abs(fine - coarse) < 1e-4


def test_blend_keeps_flat_colours_and_darkens_shadowed_relief():
    rgb = np.full((3, 4, 4), 0.5)
    flat = np.full((4, 4), np.sin(np.radians(SUN_ALTITUDE)))
    assert np.allclose(blend(rgb, flat, 0.8), rgb)
    dark = blend(rgb, np.zeros((4, 4)), 0.5)
    assert np.allclose(dark, 0.25)
    assert np.array_equal(blend(rgb, flat * 0, 0.0), rgb)
