"""Rendering any grid from a stack: seamless tiles, zoom-consistent look."""

import morecantile
import numpy as np

from compositor.demo import SYNTH_CELL
from compositor.grid import transform_bounds_to_lonlat
from compositor.stack import Stack
from compositor.tiling import ViewParams, render_area

TMS = morecantile.tms.get("WebMercatorQuad")


def _stack(demo_dir):
    return Stack.open(demo_dir / f"{SYNTH_CELL}.zarr")


def _center(stack):
    w, s, e, n = transform_bounds_to_lonlat(stack.epsg, stack.bounds)
    return (w + e) / 2, (s + n) / 2


def test_neighbouring_tiles_have_no_seam(demo_dir):
    stack = _stack(demo_dir)
    t = TMS.tile(*_center(stack), 14)
    right = morecantile.Tile(t.x + 1, t.y, t.z)
    params = ViewParams(hillshade=0.6)
    a = render_area(stack, TMS.rasterio_crs, tuple(TMS.xy_bounds(t)), 256, 256, params)
    b = render_area(stack, TMS.rasterio_crs, tuple(TMS.xy_bounds(right)), 256, 256, params)
    ba, bb = TMS.xy_bounds(t), TMS.xy_bounds(right)
    both = render_area(
        stack, TMS.rasterio_crs, (ba.left, ba.bottom, bb.right, ba.top), 512, 256, params
    )
    joined = np.concatenate([a.rgb, b.rgb], axis=2)
    ok = both.valid & np.concatenate([a.valid, b.valid], axis=1)
    diff = np.abs(joined.astype(int) - both.rgb.astype(int))[:, ok]
    assert diff.max() <= 1  # rounding only: the two tiles are one image


def test_hillshade_changes_relief_not_flat_colour(demo_dir):
    stack = _stack(demo_dir)
    t = TMS.tile(*_center(stack), 13)
    b = tuple(TMS.xy_bounds(t))
    plain = render_area(stack, TMS.rasterio_crs, b, 256, 256, ViewParams())
    shaded = render_area(stack, TMS.rasterio_crs, b, 256, 256, ViewParams(hillshade=0.8))
    d = shaded.rgb.astype(int) - plain.rgb.astype(int)
    assert np.abs(d).mean() > 1  # relief shows
    assert abs(d.mean()) < 0.25 * np.abs(d).mean() + 3  # no overall dimming


def test_outside_and_filters_raise_nodata(demo_dir):
    import datetime as dt

    import pytest

    from compositor.tiling import NoData

    stack = _stack(demo_dir)
    with pytest.raises(NoData):
        render_area(
            stack,
            TMS.rasterio_crs,
            tuple(TMS.xy_bounds(morecantile.Tile(0, 0, 14))),
            256,
            256,
            ViewParams(),
        )
    t = TMS.tile(*_center(stack), 14)
    with pytest.raises(NoData, match="no scene"):
        render_area(
            stack,
            TMS.rasterio_crs,
            tuple(TMS.xy_bounds(t)),
            256,
            256,
            ViewParams(start=dt.date(1990, 1, 1), end=dt.date(1990, 2, 1)),
        )


def test_zoomed_out_tile_reads_only_the_stack(demo_dir):
    # A zoom-4 tile spans thousands of km; the read must stay the size of the stack.
    stack = _stack(demo_dir)
    lon, lat = _center(stack)
    for z, visible in ((2, False), (4, False), (9, True)):
        t = TMS.tile(lon, lat, z)
        r = render_area(stack, TMS.rasterio_crs, tuple(TMS.xy_bounds(t)), 256, 256, ViewParams())
        assert r.valid.sum() < 256 * 256 and bool(r.valid.any()) == visible


def test_mask_cache_follows_rewritten_cloud_masks(tmp_path):
    from compositor.demo import build_synthetic
    from compositor.tiling import MASK_CACHE, composite_window

    st = Stack.open(build_synthetic(tmp_path, seed=3, size=64, n_dates=8), mode="r+")
    win = (0, 0, 64, 64)
    params = ViewParams(mask="segformer", dilate=0)
    idx = st.complete_indices()
    clear = np.zeros((2, 64, 64), np.uint8)
    for i in idx:
        st.write_cloudprob(int(i), clear)
    a = composite_window(st, 0, win, params).values
    assert composite_window(st, 0, win, params).values.tobytes() == a.tobytes()  # cached
    cloudy = np.full((2, 64, 64), 250, np.uint8)
    cloudy[:, :, :32] = 0  # half of every scene now masked by the model
    for i in idx[: len(idx) // 2]:
        st.write_cloudprob(int(i), cloudy)
    b = composite_window(st, 0, win, params).values
    assert not np.array_equal(a, b, equal_nan=True)
    assert MASK_CACHE.enabled
