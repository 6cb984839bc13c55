import datetime as dt
import errno
import os

import numpy as np
import pytest
from affine import Affine

from compositor.stack import Scene, Stack, StackError, downsample_scl


def _stack(tmp_path, w=600, h=520):
    return Stack.create(
        tmp_path / "54SUE.zarr", "54SUE", 32654, Affine(10, 0, 300000, 0, -10, 4000020), w, h
    )


def _scene(i, h, w, seed=0):
    rng = np.random.default_rng(seed + i)
    refl = rng.integers(1, 5000, (4, h, w), dtype=np.uint16)
    scl = rng.choice(np.array([4, 5, 8, 3], np.uint8), (h, w))
    return (
        Scene(id=f"S{i}", datetime=f"2021-0{i % 9 + 1}-10T10:00:00Z", cloud_cover=10.0),
        refl,
        scl,
    )


def test_roundtrip_levels_and_windows(tmp_path):
    st = _stack(tmp_path)
    assert [lv.factor for lv in st.levels] == [1, 2, 4]  # 600 -> 300 -> 150 (<= one chunk)
    scenes = [_scene(i, 520, 600) for i in range(3)]
    for s, r, c in scenes:
        st.append_scene(s, r, c)
    st2 = Stack.open(st.path)
    idx = st2.complete_indices()
    assert list(idx) == [0, 1, 2]
    d = st2.read(0, (100, 200, 64, 80), idx)
    assert np.array_equal(d["reflectance"][1], scenes[1][1][:, 100:164, 200:280])
    assert np.array_equal(d["scl"][2], scenes[2][2][100:164, 200:280])
    # A window hanging off the edge comes back padded with nodata.
    d = st2.read(0, (-10, 590, 20, 20), idx[:1])
    assert (d["reflectance"][0, :, :10, :] == 0).all()
    assert np.array_equal(d["reflectance"][0, :, 10:, :10], scenes[0][1][:, :10, 590:600])
    # Level 1 is the 2x2 valid mean.
    l1 = st2.read(1, (0, 0, 2, 2), idx[:1])["reflectance"][0, 0]
    blk = scenes[0][1][0, :2, :2].astype(float)
    assert abs(int(l1[0, 0]) - blk.mean()) <= 0.5


def test_incomplete_scene_is_invisible_and_rerun_is_idempotent(tmp_path):
    st = _stack(tmp_path, 64, 64)
    s, r, c = _scene(0, 64, 64)
    st.append_scene(s, r, c)
    # Simulate a writer that died after reserving scene 1.
    st._reserve(Scene(id="S1", datetime="2021-02-10T10:00:00Z"))
    st2 = Stack.open(st.path, mode="r+")
    assert list(st2.complete_indices()) == [0]
    assert st2.append_scene(s, r, c) == 0  # already complete: left alone
    s1, r1, c1 = _scene(1, 64, 64)
    assert st2.append_scene(Scene(id="S1", datetime="2021-02-10T10:00:00Z"), r1, c1) == 1
    assert list(Stack.open(st.path).complete_indices()) == [0, 1]


def test_date_filters(tmp_path):
    st = _stack(tmp_path, 32, 32)
    for i in range(6):
        s, r, c = _scene(i, 32, 32)
        st.append_scene(s, r, c)
    assert [st.scenes[i].date.month for i in st.complete_indices(months=(2, 3))] == [2, 3]
    got = st.complete_indices(start=dt.date(2021, 3, 1), end=dt.date(2021, 4, 30))
    assert [st.scenes[i].date.month for i in got] == [3, 4]


def test_bad_inputs(tmp_path):
    st = _stack(tmp_path, 32, 32)
    with pytest.raises(StackError, match="uint16"):
        st.append_scene(
            Scene(id="x", datetime="2021-01-01T00:00:00Z"),
            np.zeros((4, 32, 32), np.float32),
            np.zeros((32, 32), np.uint8),
        )
    with pytest.raises(StackError, match="no stack"):
        Stack.open(tmp_path / "nothing.zarr")
    with pytest.raises(StackError, match="already exists"):
        _stack(tmp_path, 32, 32)


def test_scl_downsample_keeps_clouds():
    scl = np.array([[4, 4, 0, 0], [4, 9, 0, 0]], np.uint8)
    assert downsample_scl(scl).tolist() == [[9, 0]]


def test_shard_reads_match_zarr_python(tmp_path):
    st = _stack(tmp_path, 300, 280)
    for i in range(4):
        s, r, c = _scene(i, 280, 300)
        st.append_scene(s, r, c)
    prob = np.random.default_rng(5).integers(0, 250, (2, 280, 300), dtype=np.uint8)
    st.write_cloudprob(2, prob)
    fast = Stack.open(st.path)
    slow = Stack.open(st.path)
    slow._shards = None  # force zarr-python, the path object stores take
    assert fast._shards is not None
    idx = np.array([3, 0, 2])
    for window in [(0, 0, 280, 300), (250, 240, 64, 100), (-5, -7, 30, 30)]:
        a = fast.read(0, window, idx, ("reflectance", "scl", "cloudprob"), bands=[2, 0])
        b = slow.read(0, window, idx, ("reflectance", "scl", "cloudprob"), bands=[2, 0])
        for k in a:
            assert np.array_equal(a[k], b[k]), (k, window)
    # A rewritten shard (new cloud masks) is picked up by an open reader.
    fast.read(0, (0, 0, 8, 8), idx, ("cloudprob",))
    st.write_cloudprob(2, np.zeros_like(prob))
    assert (fast.read(0, (0, 0, 8, 8), np.array([2]), ("cloudprob",))["cloudprob"] == 0).all()


def test_shard_reads_with_few_descriptors_kept(tmp_path, monkeypatch):
    """The process keeps a bounded number of shards open (least recently used go, closed once
    no read holds them): reads over more scenes than that stay right, and no scene is marked
    damaged for it, also when the process runs out of descriptors altogether."""
    import compositor.shards as shards

    st = _stack(tmp_path, 300, 280)
    for i in range(6):
        s, r, c = _scene(i, 280, 300)
        st.append_scene(s, r, c)
    slow = Stack.open(st.path)
    slow._shards = None
    idx = np.arange(6)
    want = slow.read(0, (10, 20, 200, 250), idx, ("reflectance", "scl"))
    monkeypatch.setattr(shards, "_MAX_OPEN", 3)
    fast = Stack.open(st.path)
    for _ in range(2):
        got = fast.read(0, (10, 20, 200, 250), idx, ("reflectance", "scl"))
        for k in want:
            assert np.array_equal(got[k], want[k]), k
    assert len(shards._OPEN) <= 3
    real_open = os.open
    calls = {"n": 0}

    def emfile_once(path, flags, *args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *args)

    shards._OPEN.clear()
    monkeypatch.setattr(shards.os, "open", emfile_once)
    got = fast.read(0, (10, 20, 200, 250), idx, ("reflectance",))
    assert np.array_equal(got["reflectance"], want["reflectance"])
    assert not fast.damaged


def _nan_equal(a, b):
    return (
        a.shape == b.shape
        and np.array_equal(np.isnan(a), np.isnan(b))
        and np.array_equal(np.nan_to_num(a), np.nan_to_num(b))
    )


def test_kernel_on_shard_windows_leaves_nodata_out(tmp_path):
    """Windows read from the shards (whole level; crossing chunk rows and columns; partly
    outside the stack; a scene never written) give the same percentiles as masking nodata."""
    from compositor.percentile import Source, quantile_fraction, run_source

    st = _stack(tmp_path, 300, 280)
    for i in range(5):
        s, r, c = _scene(i, 280, 300)
        r[:, i * 20 : i * 20 + 15, :40] = 0  # nodata patches, different per scene
        st.append_scene(s, r, c)
    rng = np.random.default_rng(9)
    idx = np.array([4, 0, 2, 3, 7])  # 7: never written, reads as nodata
    qf = [quantile_fraction(25), quantile_fraction(90)]
    for window in [(0, 0, 280, 300), (200, 130, 70, 160), (-9, -20, 150, 140)]:
        copy = st.read(0, window, idx, ("reflectance",), bands=[2, 1, 0])["reflectance"]
        assert copy.shape == (5, 3, window[2], window[3])
        assert (copy[4] == 0).all()
        mask = rng.random((5, window[2], window[3])) < 0.4
        a, ca = run_source(Source.from_array(copy), mask, qf, nodata=0, count=True)
        ref, cr = run_source(Source.from_array(copy), mask | (copy[:, 0] == 0), qf, count=True)
        assert _nan_equal(a, ref), window
        assert np.array_equal(ca, cr)


def test_dem_windows_through_the_chunk_cache(tmp_path):
    st = _stack(tmp_path, 600, 520)
    dem = np.random.default_rng(3).normal(500, 50, (520, 600)).astype(np.float32)
    st.set_dem(dem)
    for window in [(0, 0, 520, 600), (250, 240, 30, 300), (-4, 590, 20, 20)]:
        r0, c0, h, w = window
        got = st.read(0, window, np.array([], int), ("dem",))["dem"]
        want = np.full((h, w), np.nan, np.float32)
        ys, xs = slice(max(r0, 0), min(r0 + h, 520)), slice(max(c0, 0), min(c0 + w, 600))
        want[ys.start - r0 : ys.stop - r0, xs.start - c0 : xs.stop - c0] = dem[ys, xs]
        assert np.array_equal(got, want, equal_nan=True), window
    st.set_dem(dem + 1)  # a new DEM is not served from stale cached chunks
    assert np.array_equal(
        st.read(0, (0, 0, 8, 8), np.array([], int), ("dem",))["dem"], dem[:8, :8] + 1
    )
