import numpy as np

from compositor.composite import LOOSE, STRICT, composite, scl_bits


def test_count_fallback_and_every_pixel_gets_a_value():
    rng = np.random.default_rng(0)
    t, h, w = 12, 20, 20
    refl = rng.integers(500, 3000, (t, 3, h, w), dtype=np.uint16)
    excl = rng.random((t, h, w)) < 0.5
    excl[:, 0, 0] = True  # never clear: must fall back, not stay empty
    refl[:, :, 1, 1] = 0  # no data at all: stays NaN
    res = composite(refl, excl, q=25)
    assert res.count[0, 0] == 0 and res.fallback[0, 0]
    assert np.isfinite(res.values[:, 0, 0]).all()
    assert np.isnan(res.values[:, 1, 1]).all()
    valid = ~(refl[:, 0] == 0)
    assert np.array_equal(res.count, (~excl & valid).sum(axis=0))
    # A clear pixel is exactly the masked percentile of its clear looks.
    y, x = 5, 7
    looks = refl[~excl[:, y, x] & valid[:, y, x], :, y, x].astype(float)
    assert np.allclose(res.values[:, y, x], np.percentile(looks, 25, axis=0))


def test_fallback_prefers_the_looser_mask_over_everything():
    refl = np.full((4, 1, 1, 1), 1000, np.uint16)
    refl[:, 0, 0, 0] = [9000, 1200, 8000, 7000]  # two clouds, one clear-ish, one hazy
    strict = np.array([True, True, True, True])[:, None, None]
    loose = np.array([True, False, True, False])[:, None, None]
    res = composite(refl, strict, q=0, fallback_exclude=loose)
    assert res.fallback[0, 0]
    assert res.values[0, 0, 0] == 1200


def test_scl_bits_dilate_clouds_but_not_nodata():
    scl = np.full((1, 9, 9), 4, np.uint8)
    scl[0, 4, 4] = 9
    scl[0, 0, 0] = 0
    bits = scl_bits(scl, 2)
    strict, loose = (bits & STRICT) != 0, (bits & LOOSE) != 0
    assert strict[0, 2:7, 2:7].all() and strict[0, 0, 0] and strict.sum() == 26
    assert loose[0, 4, 4] and loose[0, 0, 0] and loose.sum() == 2
    assert np.array_equal((scl_bits(scl, 0) & STRICT) != 0, loose)


def test_png_encoder_roundtrips_exactly():
    import io

    from PIL import Image

    from compositor.render import encode_png

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (3, 37, 53), dtype=np.uint8)
    valid = rng.random((37, 53)) > 0.3
    img = np.asarray(Image.open(io.BytesIO(encode_png(rgb, valid))))
    assert np.array_equal(img[..., :3], rgb.transpose(1, 2, 0))
    assert np.array_equal(img[..., 3], valid * 255)
    img = np.asarray(Image.open(io.BytesIO(encode_png(rgb))))
    assert img.shape == (37, 53, 3) and np.array_equal(img, rgb.transpose(1, 2, 0))


def test_scl_bits_equal_scipy_dilation_of_clouds_plus_nodata():
    from scipy.ndimage import binary_dilation

    rng = np.random.default_rng(3)
    scl = rng.choice(
        np.array([0, 1, 3, 4, 5, 8, 9, 10], np.uint8),
        (5, 31, 43),
        p=[0.05, 0.02, 0.01, 0.57, 0.28, 0.03, 0.02, 0.02],
    )
    bad = np.isin(scl, [3, 8, 9, 10])
    nodata = scl <= 1
    for r in (0, 1, 2, 5, 30):
        want = np.stack([binary_dilation(m, np.ones((2 * r + 1,) * 2, bool)) for m in bad])
        bits = scl_bits(scl, r)
        assert np.array_equal((bits & STRICT) != 0, want | nodata), r
        assert np.array_equal((bits & LOOSE) != 0, bad | nodata), r


def _reference(refl, strict, loose, q, min_clear, nodata=0):
    """The fallback rule pixel by pixel with nanpercentile."""
    t, b, h, w = refl.shape
    out = np.full((b, h, w), np.nan, np.float32)
    count = np.zeros((h, w), int)
    for y in range(h):
        for x in range(w):
            data = refl[:, 0, y, x] != nodata
            count[y, x] = (data & ~strict[:, y, x]).sum()
            for use, need in (
                (~strict[:, y, x], min_clear),
                (~loose[:, y, x], min_clear),
                (np.ones(t, bool), 1),
            ):
                ok = use & data
                if ok.sum() >= need:
                    v = refl[ok, :, y, x].astype(np.float64)
                    out[:, y, x] = np.percentile(v, q, axis=0).astype(np.float32)
                    break
    return out, count


def test_composite_equals_the_fallback_rule_pixel_by_pixel():
    rng = np.random.default_rng(8)
    for w in (50, 140):  # narrower than one kernel block (padded), and overlapping blocks
        refl = rng.integers(1, 4000, (12, 3, 6, w)).astype(np.uint16)
        refl = np.where(rng.random((12, 1, 6, w)) < 0.2, 0, refl).astype(np.uint16)  # nodata
        loose = rng.random((12, 6, w)) < 0.6
        strict = loose | (rng.random((12, 6, w)) < 0.3)
        for min_clear in (1, 3):
            res = composite(refl, strict, 30, min_clear, loose)
            want, count = _reference(refl, strict, loose, 30, min_clear)
            assert np.array_equal(res.count, count)
            assert np.array_equal(np.isnan(res.values), np.isnan(want))
            assert np.array_equal(np.nan_to_num(res.values), np.nan_to_num(want))
            assert np.array_equal(res.fallback, (count < min_clear) & ~np.isnan(want[0]))


def test_masks_repeat_from_the_coarse_level():
    from compositor.tiling import repeat_window

    rng = np.random.default_rng(2)
    a = rng.integers(0, 4, (3, 20, 21), dtype=np.uint8)
    big = a.repeat(2, axis=1).repeat(2, axis=2)
    for oy, ox, h, w in [(0, 0, 40, 42), (1, 3, 30, 33), (2, 1, 17, 40)]:
        assert np.array_equal(repeat_window(a, 2, (oy, ox, h, w)), big[:, oy : oy + h, ox : ox + w])
    assert np.array_equal(repeat_window(a, 1, (1, 2, 5, 6)), a[:, 1:6, 2:8])


def test_last_resort_takes_the_least_cloudy_looks_not_all():
    from compositor.composite import (
        LEAST,
        LOOSE,
        SCL_BADNESS,
        STRICT,
        composite_source,
        mark_least_cloudy,
    )

    scl = np.array([9, 9, 10, 8, 0], np.uint8)[:, None, None].repeat(3, 1).repeat(140, 2)
    refl = np.array([9000, 8000, 3000, 7000, 0], np.uint16)[:, None, None, None]
    refl = np.broadcast_to(refl, (5, 2, 3, 140)).copy()
    bits = np.full(scl.shape, STRICT | LOOSE, np.uint8)  # every look cloudy
    mark_least_cloudy(bits, scl, SCL_BADNESS)
    assert np.array_equal(bits, mark_least_cloudy(bits.copy(), SCL_BADNESS[scl]))
    assert (bits[2] & LEAST == 0).all() and (bits[[0, 1, 3, 4]] & LEAST != 0).all()
    res = composite_source(refl, bits, 75, 1, 0, (LOOSE, LEAST))
    assert (res.values == 3000).all() and res.fallback.all()  # the thin-cirrus look
    res = composite_source(refl, bits, 75, 1, 0, (LOOSE,))  # without it: all looks
    assert (res.values == np.percentile([9000, 8000, 3000, 7000], 75)).all()


def test_model_masks_follow_the_model_where_it_ran_and_scl_elsewhere():
    from scipy.ndimage import binary_dilation

    from compositor.composite import (
        _SCL_AS_PROB,
        LEAST,
        LEAST_MARGIN,
        LOOSE,
        SCL_BADNESS,
        STRICT,
        prob_bits,
    )

    rng = np.random.default_rng(6)
    t, h, w = 6, 20, 24
    scl = rng.choice(np.array([0, 3, 4, 5, 8, 9, 10], np.uint8), (t, h, w))
    cp = rng.integers(0, 251, (t, 2, h, w)).astype(np.uint8)
    cp[3:] = 255  # scenes 3.. were not predicted: SCL decides there
    bits = prob_bits(scl, cp, 0.4, 1)
    nodata = scl <= 1
    have = cp[:, 0] != 255
    p = cp.max(axis=1)
    bad = np.where(have, p > 100, np.isin(scl, [3, 8, 9, 10])) & ~nodata
    square = np.ones((3, 3), bool)
    strict = np.stack([binary_dilation(b, square) for b in bad]) | nodata
    assert np.array_equal((bits & STRICT) != 0, strict)
    assert np.array_equal((bits & LOOSE) != 0, bad | nodata)
    badness = np.where(
        nodata, 255, np.where(have, p, _SCL_AS_PROB[np.minimum(SCL_BADNESS[scl], 3)])
    )
    best = badness.astype(int).min(axis=0)
    assert np.array_equal((bits & LEAST) != 0, (badness > best + LEAST_MARGIN) | (badness == 255))


def test_temporal_test_drops_bright_and_dark_outliers_only():
    """A pixel's looks the mask calls clear: a steady surface, one look much brighter in blue
    (a thin cloud the mask missed), one much darker in NIR and blue (a missed shadow), and one
    with only NIR lower (the season, not a shadow). Only the first two are dropped; looks the
    mask already drops are left alone; nodata is never touched."""
    from compositor.composite import LOOSE, STRICT
    from compositor.temporal import temporal_veto

    T = 8
    blue = np.full((T, 1, 1), 400, np.uint16)
    nir = np.full((T, 1, 1), 3000, np.uint16)
    blue[5], nir[5] = 1200, 3300  # thin cloud: blue +800
    blue[6], nir[6] = 250, 1500  # shadow: darker in both
    blue[7], nir[7] = 420, 2000  # autumn: NIR down, blue not
    bits = np.zeros((T, 1, 1), np.uint8)
    bits[0] = STRICT | LOOSE  # the mask already drops this one
    blue[1] = 0  # no data
    out = temporal_veto(bits, blue, nir)
    dropped = [t for t in range(T) if out[t, 0, 0] & STRICT and not bits[t, 0, 0]]
    assert dropped == [5, 6]
    assert out[0, 0, 0] == bits[0, 0, 0] and out[1, 0, 0] == 0
    assert (out[5] & LOOSE).all()  # also out of the fallback's looser mask


def test_temporal_test_gives_back_looks_the_series_vouches_for():
    """Dilation drops a clear look next to a cloud: given back when it matches the pixel's clear
    state, not when it is a little brighter (a cloud edge). SCL's shadow class over dark water
    (most looks, the rest thin cloud it missed) is overturned, so the reference is the water and
    the missed clouds go; a real shadow (darker still) stays masked."""
    from compositor.composite import LOOSE, STRICT
    from compositor.temporal import temporal_veto

    T = 8
    blue = np.full((T, 1, 2), 400, np.uint16)
    nir = np.full((T, 1, 2), 3000, np.uint16)
    bits = np.zeros((T, 1, 2), np.uint8)
    bits[0, 0, 0] = STRICT  # dilated, matches: given back
    bits[1, 0, 0] = STRICT  # dilated, a faint edge (+200 in blue): stays dropped
    blue[1, 0, 0] = 600
    # Pixel 1: dark water that SCL calls shadow in looks 0-4, thin cloud it calls clear in 5-7,
    # and look 4 a real shadow on the water.
    blue[:, 0, 1], nir[:, 0, 1] = 450, 130
    blue[5:, 0, 1], nir[5:, 0, 1] = (1000, 1300, 1500), (600, 800, 900)
    blue[4, 0, 1], nir[4, 0, 1] = 220, 50
    soft = np.zeros((T, 1, 2), np.uint8)
    soft[:5, 0, 1] = 1
    bits[:5, 0, 1] = STRICT | LOOSE
    out = temporal_veto(bits, blue, nir, soft=soft)
    assert out[0, 0, 0] == 0 and out[1, 0, 0] & STRICT
    assert [t for t in range(T) if not out[t, 0, 1] & STRICT] == [0, 1, 2, 3]
    assert (out[5:, 0, 1] & LOOSE).all()
    # Without the soft verdicts the missed clouds are the pixel's only clear looks: kept.
    assert not (temporal_veto(bits, blue, nir)[5:, 0, 1] & STRICT).any()


def test_fallback_looks_are_checked_against_the_unsure_ones():
    """The model calls every look of a pixel cloud (0.4-0.7 on a surface it does not know),
    so the fallback takes the least unsure looks: here a shadow and two clear ones. The time
    series of the unsure looks drops the shadow from the fallback. Where the least unsure
    look is the only one and a shadow, the unsure looks closest to the pixel's clear state
    take its place. Without the unsure looks nothing changes."""
    from compositor.composite import LEAST, LOOSE, STRICT
    from compositor.temporal import temporal_veto

    T = 8
    blue = np.full((T, 1, 2), 530, np.uint16)
    nir = np.full((T, 1, 2), 1280, np.uint16)
    blue[0], nir[0] = 400, 780  # a shadow
    blue[7], nir[7] = 5000, 4800  # a thick cloud (sure, not among the unsure)
    bits = np.full((T, 1, 2), STRICT | LOOSE | LEAST, np.uint8)
    bits[[0, 1, 2], 0, 0] = STRICT | LOOSE  # pixel 0: least unsure looks 0 (shadow), 1, 2
    bits[0, 0, 1] = STRICT | LOOSE  # pixel 1: only the shadow
    wide = np.ones((T, 1, 2), bool)
    wide[7] = False
    out = temporal_veto(bits, blue, nir, wide=wide)
    least = [[t for t in range(T) if not out[t, 0, x] & LEAST] for x in (0, 1)]
    assert least[0] == [1, 2]
    assert least[1] == [1, 2, 3, 4, 5, 6]
    assert ((out & (STRICT | LOOSE)) == (STRICT | LOOSE)).all()  # still no clear look: count 0
    assert np.array_equal(temporal_veto(bits, blue, nir), bits)


def test_temporal_test_ignores_scene_wide_darkening():
    """Half the dates are 30 % darker everywhere (another processing version or season): not
    shadows. A local dark spot in one of them is."""
    from compositor.composite import STRICT
    from compositor.temporal import temporal_veto

    T, H, W = 10, 12, 12
    rng = np.random.default_rng(0)
    blue = rng.integers(380, 420, (T, H, W)).astype(np.uint16)
    nir = rng.integers(2900, 3100, (T, H, W)).astype(np.uint16)
    blue[5:] = (blue[5:] * 0.7).astype(np.uint16)
    nir[5:] = (nir[5:] * 0.7).astype(np.uint16)
    blue[7, 2:5, 2:5] //= 2
    nir[7, 2:5, 2:5] //= 3
    out = temporal_veto(np.zeros((T, H, W), np.uint8), blue, nir)
    dropped = (out & STRICT) != 0
    assert dropped[7, 2:5, 2:5].all()
    dropped[7, 2:5, 2:5] = False
    assert not dropped.any()
