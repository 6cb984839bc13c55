import numpy as np

from compositor.composite import composite, dilate, scl_masks


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


def test_scl_masks_and_dilation():
    scl = np.full((1, 9, 9), 4, np.uint8)
    scl[0, 4, 4] = 9
    scl[0, 0, 0] = 0
    bad, nodata = scl_masks(scl, dilate_px=2)
    assert bad[0, 2:7, 2:7].all() and bad.sum() == 25
    assert nodata[0, 0, 0] and nodata.sum() == 1
    assert np.array_equal(dilate(bad, 0), bad)


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


def test_fused_scl_exclusion_equals_the_parts():
    from compositor.composite import scl_exclusion

    rng = np.random.default_rng(3)
    scl = rng.choice(np.array([0, 1, 3, 4, 5, 8, 9, 10], np.uint8), (5, 31, 29),
                     p=[0.05, 0.02, 0.05, 0.5, 0.28, 0.04, 0.03, 0.03])
    for d in (0, 2):
        strict, loose = scl_exclusion(scl, d)
        bad, nodata = scl_masks(scl, d)
        assert np.array_equal(strict, bad | nodata)
        assert np.array_equal(loose, scl_masks(scl, 0)[0] | nodata)
