"""The synthetic persistent-cloud cell: deterministic, plausible, and telling the product's story
(a plain 25th percentile fails under 75 % cloud, an SCL-masked one mostly works)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from compositor import synthetic as syn

SIZE, DATES = 128, 24


@pytest.fixture(scope="module")
def cell() -> syn.SyntheticCell:
    return syn.make_synthetic(seed=0, size=SIZE, n_dates=DATES)


def _arrays(c: syn.SyntheticCell) -> dict[str, np.ndarray]:
    return {
        k: getattr(c, k)
        for k in (
            "reflectance",
            "scl",
            "dem",
            "cloud_cover",
            "truth_composite",
            "truth_cloud",
            "truth_shadow",
            "truth_thin_cloud",
            "sun_azimuth",
            "sun_zenith",
            "cloud_height",
            "land_cover",
        )
    }


def _percentile(values: np.ndarray, exclude: np.ndarray, q: float = 25.0) -> np.ndarray:
    """q-th percentile ('linear', like np.percentile) over time of (T, 4, H, W) DN leaving out
    ``exclude`` (T, H, W); NaN where nothing is left. Sort-based: np.nanpercentile loops per
    pixel and takes a minute here."""
    v = values.astype(np.float32)
    v[np.broadcast_to(exclude[:, None], v.shape)] = np.nan
    v.sort(axis=0)  # NaN last
    n = (~exclude).sum(axis=0)[None]
    pos = np.maximum(n - 1, 0) * (q / 100)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
    a = np.take_along_axis(v, lo[:, None], axis=0)[0]
    b = np.take_along_axis(v, hi[:, None], axis=0)[0]
    out = a + (b - a) * (pos - lo)[0]
    out[:, n[0] == 0] = np.nan
    return out


def test_same_seed_same_cell_other_seed_other_cell():
    a = syn.make_synthetic(seed=5, size=48, n_dates=10)
    b = syn.make_synthetic(seed=5, size=48, n_dates=10, workers=1)  # threads change nothing
    c = syn.make_synthetic(seed=6, size=48, n_dates=10)
    for name, arr in _arrays(a).items():
        np.testing.assert_array_equal(arr, _arrays(b)[name], err_msg=name)
    assert a.dates == b.dates
    assert not np.array_equal(a.reflectance, c.reflectance)
    assert not np.array_equal(a.dem, c.dem)


def test_shapes_and_dtypes(cell):
    t, h, w = DATES, SIZE, SIZE
    assert cell.reflectance.shape == (t, 4, h, w) and cell.reflectance.dtype == np.uint16
    assert cell.scl.shape == (t, h, w) and cell.scl.dtype == np.uint8
    assert cell.dem.shape == (h, w) and cell.dem.dtype == np.float32
    assert cell.truth_composite.shape == (4, h, w) and cell.truth_composite.dtype == np.float32
    for m in (cell.truth_cloud, cell.truth_shadow, cell.truth_thin_cloud):
        assert m.shape == (t, h, w) and m.dtype == bool
    for v in (cell.cloud_cover, cell.sun_azimuth, cell.sun_zenith, cell.cloud_height):
        assert v.shape == (t,) and v.dtype == np.float32
    assert cell.bands == ("B02", "B03", "B04", "B08")
    assert len(cell.dates) == t and all(isinstance(d, dt.date) for d in cell.dates)


def test_odd_size_builds():
    c = syn.make_synthetic(seed=1, size=45, n_dates=3)
    assert c.reflectance.shape == (3, 4, 45, 45) and c.scl.shape == (3, 45, 45)


def test_scl_is_a_20m_product(cell):
    full = ~(cell.scl == syn.SCL_NODATA).any(axis=(1, 2))  # the 10 m swath edge aside
    scl = cell.scl[full]
    up = scl[:, ::2, ::2].repeat(2, axis=1).repeat(2, axis=2)[:, :SIZE, :SIZE]
    np.testing.assert_array_equal(up, scl)
    assert set(np.unique(scl)) <= {2, 3, 4, 5, 6, 7, 8, 9, 10}


def test_calendar_and_sun(cell):
    d = cell.dates
    assert d == sorted(d) and len(set(d)) == len(d)
    assert all((b - a).days % 5 == 0 for a, b in zip(d, d[1:], strict=False))  # 5-day revisit
    assert (d[-1] - d[0]).days >= 300
    assert 20 <= cell.sun_zenith.min() and cell.sun_zenith.max() <= 45
    assert 1000 <= cell.cloud_height.min() and cell.cloud_height.max() <= 3000


def test_cloudy_on_average_with_some_clear_dates(cell):
    assert cell.cloud_cover.mean() >= 70.0
    assert cell.cloud_cover.min() < 20.0  # a few almost-clear dates
    clear = (~cell.truth_cloud & ~cell.truth_shadow & cell.valid).sum(axis=0)
    assert (clear <= 3).mean() > 0.01  # some pixels are almost never seen
    # cloud_cover is the percent of valid pixels under true cloud
    frac = cell.truth_cloud.sum(axis=(1, 2)) / cell.valid.sum(axis=(1, 2))
    np.testing.assert_allclose(cell.cloud_cover, 100 * frac, rtol=1e-5)


def test_cloud_level_controls_cover():
    low = syn.make_synthetic(seed=1, size=48, n_dates=12, cloud_level=0.3)
    assert 20 <= low.cloud_cover.mean() <= 40


def test_surface_is_plausible(cell):
    surf = np.mean([syn.surface_at(cell, t) for t in range(0, DATES, 3)], axis=0)
    lc = cell.land_cover

    def mean_spectrum(*classes: int) -> np.ndarray:
        return surf[:, np.isin(lc, classes)].mean(axis=1)

    b02, b03, b04, b08 = mean_spectrum(syn.LC_FOREST)
    assert 0.015 < b02 < 0.04 and 0.03 < b03 < 0.06 and 0.015 < b04 < 0.04 and 0.24 < b08 < 0.36
    assert mean_spectrum(syn.LC_WATER)[3] < 0.03
    assert mean_spectrum(syn.LC_BARE, syn.LC_URBAN)[:3].mean() > 0.1
    assert 80 <= cell.dem.min() and cell.dem.max() <= 820 and np.ptp(cell.dem) > 100
    assert (cell.truth_composite > 0).all()


def test_vegetation_has_seasons():
    c = syn.make_synthetic(seed=2, size=64, n_dates=40)
    crop = c.land_cover == syn.LC_CROP
    nir = np.array([syn.surface_at(c, t)[3][crop].mean() for t in range(len(c.dates))])
    assert np.ptp(nir) > 0.03  # green-up and harvest move NIR


def test_truth_composite_is_percentile_of_surface_at(cell):
    surf = np.stack([syn.surface_at(cell, t) for t in range(DATES)])
    dn = np.clip(np.rint(surf * syn.SCALE), 1, 65535)
    np.testing.assert_allclose(cell.truth_composite, np.percentile(dn, 25, axis=0), atol=1e-3)


def test_clear_observations_show_the_surface(cell):
    t = int(np.argmin(cell.cloud_cover))
    surf = syn.surface_at(cell, t) * syn.SCALE
    clear = ~cell.truth_cloud[t] & ~cell.truth_shadow[t] & cell.valid[t]
    diff = np.abs(cell.reflectance[t].astype(np.float32) - surf)[:, clear]
    assert np.median(diff) <= 1.0  # only DN rounding, except faint haze/penumbra under threshold
    assert np.percentile(diff, 95) < 300


def test_clouds_are_bright_and_bluest(cell):
    thick = cell.truth_cloud & ~cell.truth_thin_cloud
    core = cell.reflectance.transpose(1, 0, 2, 3)[:, thick].astype(np.float32) / syn.SCALE
    core = core[:, core[0] > np.percentile(core[0], 50)]
    assert 0.3 < np.median(core[0]) < 0.75
    assert np.median(core[0] - core[2]) > 0  # B02 brighter than B04


def test_shadows_are_cast_away_from_the_sun_and_not_under_cloud(cell):
    assert not (cell.truth_shadow & cell.truth_cloud).any()
    hits: dict[int, list[float]] = {0: [], 90: [], 180: [], 270: []}
    for t in range(DATES):
        ys, xs = np.nonzero(cell.truth_shadow[t])
        if ys.size < 50:
            continue
        length = cell.cloud_height[t] * np.tan(np.radians(cell.sun_zenith[t])) / cell.pixel_size
        for turn in hits:
            # (row, col) of the anti-sun direction is (cos az, -sin az): north up, east right.
            # The cloud sits up-sun of its shadow; turned directions are the control.
            a = np.radians(cell.sun_azimuth[t] + turn)
            dy, dx = int(round(length * np.cos(a))), int(round(-length * np.sin(a)))
            sy, sx = ys - dy, xs - dx
            ok = (sy >= 0) & (sy < SIZE) & (sx >= 0) & (sx < SIZE)
            ok[ok] = cell.valid[t][sy[ok], sx[ok]]  # truth is blank where there is no data
            if ok.sum() >= 20:
                hits[turn].append(float(cell.truth_cloud[t][sy[ok], sx[ok]].mean()))
    assert len(hits[0]) >= 3
    assert min(hits[0]) == 1.0  # every shadow pixel has its cloud exactly up-sun
    for turn in (90, 180, 270):
        assert np.mean(hits[turn]) < 0.9


def test_shadows_darken(cell):
    nir = cell.reflectance[:, 3].astype(np.float32)
    ref = cell.truth_composite[3][None]
    ratio = (nir / ref)[cell.truth_shadow]
    assert np.median(ratio) < 0.75


def test_scl_has_omission_and_commission(cell):
    valid = cell.valid
    pred = np.isin(cell.scl, syn.SCL_CLOUD_CLASSES)
    omitted = (cell.truth_cloud & ~pred & valid).sum() / cell.truth_cloud.sum()
    thin_missed = (cell.truth_thin_cloud & ~pred).sum() / cell.truth_thin_cloud.sum()
    assert 0.03 < omitted < 0.45
    assert thin_missed > 0.2  # Sen2Cor misses a good part of the thin cloud
    bright = np.isin(cell.land_cover, (syn.LC_BARE, syn.LC_URBAN))[None]
    false_cloud = np.isin(cell.scl, (8, 9)) & ~cell.truth_cloud & valid
    assert (false_cloud & bright).sum() > 0  # bright ground called cloud
    assert (false_cloud & bright).sum() / bright.sum() > (false_cloud & ~bright).sum() / (
        ~bright
    ).sum()
    sh = cell.scl == syn.SCL_SHADOW
    assert (cell.truth_shadow & ~sh).any() and (sh & ~cell.truth_shadow & valid).any()
    s = syn.scl_scores(cell)
    assert 0.7 <= s["cloud_f1"] <= 0.97
    assert 0.4 <= s["shadow_f1"] <= 0.8


def test_nodata_scenes(cell):
    nodata = cell.scl == syn.SCL_NODATA
    scenes = np.flatnonzero(nodata.any(axis=(1, 2)))
    assert len(scenes) == 2
    np.testing.assert_array_equal(cell.reflectance[:, 0] == 0, nodata)
    assert (cell.reflectance.transpose(0, 2, 3, 1)[nodata] == 0).all()
    assert not (cell.truth_cloud & nodata).any() and not (cell.truth_shadow & nodata).any()


def test_scl_masked_percentile_beats_the_plain_one(cell):
    nodata = ~cell.valid
    plain = _percentile(cell.reflectance, nodata)
    masked = _percentile(cell.reflectance, nodata | np.isin(cell.scl, (3, 8, 9, 10)))
    none_left = np.isnan(masked[0])
    masked[:, none_left] = plain[:, none_left]
    perfect = _percentile(cell.reflectance, nodata | cell.truth_cloud | cell.truth_shadow)
    perfect[:, np.isnan(perfect[0])] = plain[:, np.isnan(perfect[0])]

    plain_cloud, _ = syn.residual_fractions(plain, cell.truth_composite)
    masked_cloud, masked_shadow = syn.residual_fractions(masked, cell.truth_composite)
    perfect_cloud, perfect_shadow = syn.residual_fractions(perfect, cell.truth_composite)
    assert plain_cloud > 0.3  # 75 % cover: the plain 25th percentile is often a cloud
    assert masked_cloud < 0.35 * plain_cloud
    assert masked_cloud + masked_shadow > perfect_cloud + perfect_shadow  # SCL is not perfect
    assert perfect_cloud + perfect_shadow < 0.1
