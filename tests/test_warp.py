import morecantile
import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject
from scipy import ndimage

from compositor.warp import warp

TMS = morecantile.tms.get("WebMercatorQuad")


def test_matches_gdal_bilinear_and_keeps_nodata():
    src_crs = CRS.from_epsg(32634)  # Romania's zone, well away from the equator
    rng = np.random.default_rng(0)
    src = ndimage.gaussian_filter(rng.random((3, 300, 300)).astype(np.float32) * 3000, 3)
    src[:, :40, :] = np.nan
    st = Affine(10, 0, 588000, 0, -10, 5008000)
    tile = TMS.tile(22.15, 45.20, 14)
    b = tuple(TMS.xy_bounds(tile))
    ours = warp(src, st, src_crs, TMS.rasterio_crs, b, 256, 256)
    gdal = np.full_like(ours, np.nan)
    reproject(
        src,
        gdal,
        src_transform=st,
        src_crs=src_crs,
        src_nodata=np.nan,
        dst_transform=Affine((b[2] - b[0]) / 256, 0, b[0], 0, -(b[3] - b[1]) / 256, b[3]),
        dst_crs=TMS.rasterio_crs,
        dst_nodata=np.nan,
        resampling=Resampling.bilinear,
    )
    both = np.isfinite(ours) & np.isfinite(gdal)
    assert both.sum() > 0.3 * both.size
    assert np.abs(ours - gdal)[both].max() < 1.0  # DN, out of ~1500
    # Same footprint within a one-pixel rim.
    assert abs(int(np.isfinite(ours).sum()) - int(np.isfinite(gdal).sum())) < 3 * 256 * 3


def test_nearest_keeps_values():
    src = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    crs = CRS.from_epsg(32634)
    st = Affine(10, 0, 500000, 0, -10, 5000000)
    out = warp(src, st, crs, crs, (500000, 4999900, 500100, 5000000), 10, 10, "nearest")
    assert np.array_equal(out, src)


def test_lattice_upsampling_is_linear_interpolation():
    """The separable upsampling equals interpolation matrices applied to the lattice."""
    from compositor.warp import _upsample

    rng = np.random.default_rng(1)
    iy, jx = np.linspace(0.5, 255.5, 17), np.linspace(0.5, 199.5, 14)
    v = rng.normal(size=(17, 14)) * 1e5
    py, px = np.arange(256) + 0.5, np.arange(200) + 0.5

    def matrix(p, nodes):
        m = np.array([np.interp(p, nodes, np.eye(len(nodes))[i]) for i in range(len(nodes))])
        return m.T

    want = matrix(py, iy) @ v @ matrix(px, jx).T
    assert np.allclose(_upsample(v, iy, jx, py, px), want, rtol=0, atol=1e-6)
