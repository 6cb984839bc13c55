"""masked_percentile / kersten_percentile must equal numpy.nanpercentile bit for bit."""

from __future__ import annotations

import warnings

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compositor.percentile import (
    kersten_percentile,
    masked_percentile,
    masked_percentile_many,
)

IMPLS = [masked_percentile, kersten_percentile]
QS = [0, 100, 50, 25, 75, 12.5, 33.3, 66.7, 99.99, 0.001, 1e-12, 100 - 1e-12, 49.99999999999999]


def reference(stack: np.ndarray, mask: np.ndarray, q) -> np.ndarray:
    x = stack.astype(np.float64)
    x[np.broadcast_to(mask[:, None], x.shape)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
        return np.nanpercentile(x, q, axis=0, method="linear").astype(np.float32)


def make_case(seed: int, shape, density: float, vmax: int = 65536):
    rng = np.random.default_rng(seed)
    t, _, h, w = shape
    stack = rng.integers(0, vmax, size=shape, dtype=np.uint16)
    mask = rng.random((t, h, w)) < density
    return stack, mask


def with_sparse_pixels(stack: np.ndarray, mask: np.ndarray, seed: int = 0):
    """Force some pixels to exactly 0, 1 and 2 valid observations."""
    rng = np.random.default_rng(seed)
    t, _, h, w = stack.shape
    mask = mask.copy()
    for i in range(h * w):
        y, x = divmod(i, w)
        nvalid = i % 6  # half the pixels keep their random mask
        if nvalid < 3:
            mask[:, y, x] = True
            mask[rng.choice(t, size=min(nvalid, t), replace=False), y, x] = False
    return stack, mask


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert got.shape == want.shape
    # Bit-level: same NaN positions and identical float32 values elsewhere.
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok].view(np.uint32), want[ok].view(np.uint32))


@pytest.mark.parametrize(
    "shape",
    # The kernel works on blocks of 128 pixels of a row: exact blocks, an overlapping last
    # block (130, 257), and narrow rows (padded to one block).
    [(20, 2, 3, 128), (17, 1, 2, 130), (9, 2, 1, 257), (12, 2, 3, 5), (1, 1, 2, 70), (2, 1, 1, 1)],
)
def test_matches_nanpercentile_fixed(shape):
    stack, mask = with_sparse_pixels(*make_case(sum(shape), shape, 0.6))
    for q in QS:
        want = reference(stack, mask, q)
        for impl in IMPLS:
            assert_same(impl(stack, mask, q), want)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
def test_pixels_with_0_1_2_valid(impl):
    t = 10
    stack = np.arange(t * 2 * 1 * 3, dtype=np.uint16).reshape(t, 2, 1, 3)[::-1].copy()
    mask = np.ones((t, 1, 3), dtype=bool)
    mask[4, 0, 1] = False  # one valid
    mask[[2, 7], 0, 2] = False  # two valid
    for q in QS:
        got = impl(stack, mask, q)
        assert np.isnan(got[:, 0, 0]).all()
        np.testing.assert_array_equal(got[:, 0, 1], stack[4, :, 0, 1].astype(np.float32))
        assert_same(got, reference(stack, mask, q))


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
def test_extreme_values_and_ties(impl):
    # 0 and 65535 (the kernel's sentinel value) as valid data, many ties.
    rng = np.random.default_rng(3)
    stack = rng.choice(np.array([0, 1, 65534, 65535], dtype=np.uint16), size=(25, 2, 2, 133))
    mask = rng.random((25, 2, 133)) < 0.5
    stack, mask = with_sparse_pixels(stack, mask)
    for q in QS:
        assert_same(impl(stack, mask, q), reference(stack, mask, q))


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
def test_no_observations(impl):
    stack = np.zeros((0, 2, 3, 4), dtype=np.uint16)
    mask = np.zeros((0, 3, 4), dtype=bool)
    got = impl(stack, mask, 50.0)
    assert got.shape == (2, 3, 4) and got.dtype == np.float32 and np.isnan(got).all()
    stack = np.ones((5, 2, 3, 170), dtype=np.uint16)
    got = impl(stack, np.ones((5, 3, 170), dtype=bool), 10.0)
    assert np.isnan(got).all()


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
def test_q_types(impl):
    # numpy keeps float32 q in float32 for the virtual index; we follow its dtype rules.
    stack, mask = with_sparse_pixels(*make_case(5, (31, 2, 2, 128), 0.4))
    qs = [50, np.int64(30), np.float64(33.3), np.float32(33.3), np.float32(71.7), np.float16(12.3)]
    for q in qs + [0.1]:
        assert_same(impl(stack, mask, q), reference(stack, mask, q))


def test_non_contiguous_inputs():
    stack, mask = make_case(7, (12, 2, 3, 300), 0.5)
    s, m = stack[:, :, :, ::2], mask[:, :, ::2]
    assert_same(masked_percentile(s, m, 40.0), reference(s, m, 40.0))


def test_many_matches_single():
    stack, mask = with_sparse_pixels(*make_case(11, (15, 2, 2, 140), 0.5))
    got = masked_percentile_many(stack, mask, QS)
    assert got.shape == (len(QS), 2, 2, 140)
    for i, q in enumerate(QS):
        assert_same(got[i], reference(stack, mask, q))


def test_thread_count_does_not_change_result():
    stack, mask = with_sparse_pixels(*make_case(13, (30, 2, 16, 256), 0.6))
    before = numba.get_num_threads()
    try:
        results = []
        for k in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(k)
            results.append(masked_percentile(stack, mask, 37.5))
    finally:
        numba.set_num_threads(before)
    for r in results[1:]:
        assert_same(r, results[0])


@settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    seed=st.integers(0, 2**32 - 1),
    t=st.integers(0, 14),
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    w=st.sampled_from([1, 2, 7, 64, 127, 128, 129, 200]),
    density=st.sampled_from([0.0, 0.3, 0.6, 0.9, 1.0]),
    vmax=st.sampled_from([2, 10, 1000, 65536]),
    q=st.one_of(
        st.sampled_from([0, 100, 25, 50, 75, 0.0, 100.0]),
        st.floats(0, 100, allow_nan=False, allow_infinity=False),
    ),
)
def test_property_matches_nanpercentile(seed, t, b, h, w, density, vmax, q):
    stack, mask = make_case(seed, (t, b, h, w), density, vmax)
    want = reference(stack, mask, q)
    assert_same(masked_percentile(stack, mask, q), want)
    assert_same(kersten_percentile(stack, mask, q), want)


BAD_INPUTS = [
    (np.zeros((3, 1, 2, 2), np.float32), np.zeros((3, 2, 2), bool), 50, "uint16"),
    (np.zeros((3, 1, 2, 2), np.int16), np.zeros((3, 2, 2), bool), 50, "uint16"),
    (np.zeros((3, 2, 2), np.uint16), np.zeros((3, 2, 2), bool), 50, r"\(T, B, H, W\)"),
    (np.zeros((3, 1, 2, 2), np.uint16), np.zeros((3, 2, 2), np.uint8), 50, "bool"),
    (np.zeros((3, 1, 2, 2), np.uint16), np.zeros((3, 2, 3), bool), 50, "does not match"),
    (np.zeros((3, 1, 2, 2), np.uint16), np.zeros((2, 2, 2), bool), 50, "does not match"),
    (np.zeros((3, 1, 2, 2), np.uint16), np.zeros((3, 2, 2), bool), -1, r"\[0, 100\]"),
    (np.zeros((3, 1, 2, 2), np.uint16), np.zeros((3, 2, 2), bool), 100.5, r"\[0, 100\]"),
    (np.zeros((3, 1, 2, 2), np.uint16), np.zeros((3, 2, 2), bool), float("nan"), r"\[0, 100\]"),
    (np.zeros((3, 1, 2, 2), np.uint16), np.zeros((3, 2, 2), bool), "50", "real number"),
    (np.zeros((3, 1, 2, 2), np.uint16), np.zeros((3, 2, 2), bool), True, "real number"),
    ([[[[1]]]], np.zeros((1, 1, 1), bool), 50, "numpy arrays"),
]


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("stack,mask,q,msg", BAD_INPUTS)
def test_bad_input_raises(impl, stack, mask, q, msg):
    with pytest.raises(ValueError, match=msg):
        impl(stack, mask, q)


def test_many_bad_input_raises():
    stack, mask = make_case(0, (3, 1, 2, 2), 0.5)
    with pytest.raises(ValueError, match="at least one"):
        masked_percentile_many(stack, mask, [])
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        masked_percentile_many(stack, mask, [50, 101])


def test_kernels_run_on_tbb_threads():
    """Server threads launch kernels concurrently: TBB is safe for that (and fastest here)."""
    masked_percentile(np.ones((2, 1, 2, 130), np.uint16), np.zeros((2, 2, 130), bool), 50)
    assert numba.threading_layer() == "tbb"
