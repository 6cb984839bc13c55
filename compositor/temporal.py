"""Multi-temporal cloud and shadow test: a look is judged against the pixel's own clear state.

A single-scene mask (SCL or the model) misses thin cloud, cloud edges and shadows now and then.
The stack holds every look of the pixel, and a clear surface changes slowly compared with what a
cloud (brighter in blue) or a shadow (darker in NIR) does to it, so (as MAJA and Tmask do):

1. The pixel's clear reference starts from the looks the single-scene mask calls clear
   (undilated). Only they can be vetoed: a look the mask drops stays dropped.
2. Twice: reference NIR = median NIR of the kept looks; reference blue = 25th percentile of
   their blue, leaving out NIR-dark ones; the kept looks are those within a tolerance of the
   reference: blue not above it by more than ``BLUE_DN + BLUE_REL * ref`` (cloud), and not
   both NIR below ``(1 - NIR_DROP) * ref`` and blue below ``(1 - BLUE_DROP) *`` the median
   clear blue (shadow: darker in every band; a season's falling NIR alone is not a shadow).
3. Looks not kept are excluded (STRICT and LOOSE bits) on top of the single-scene mask.

Computed at the mask level (20 m for a 10 m window) with the masks, and cached with them.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from compositor.composite import LOOSE, STRICT

BLUE_DN = 250.0  # blue above the clear reference by more than this (+ BLUE_REL x ref): cloud
BLUE_REL = 0.15
NIR_DROP = 0.25  # NIR below (1 - NIR_DROP) x the reference, and blue below
BLUE_DROP = 0.1  # (1 - BLUE_DROP) x the median clear blue: shadow (shadows darken blue too;
# a crop or forest whose NIR falls with the season does not, and must not be called shadow)
NIR_REF_KEEP = 0.7  # looks below this x the reference NIR do not set the blue reference
ROUNDS = 2


@njit(cache=True, nogil=True)
def _select(a, n, k):  # pragma: no cover - compiled
    """The k-th smallest of a[:n] (reorders a[:n]); Hoare's selection, O(n) on average:
    a sort per quantile cost 7x more in the tile path."""
    lo, hi = 0, n - 1
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


@njit(cache=True, nogil=True)
def _quantile(a, n, q):  # pragma: no cover - compiled
    """Linear-interpolated quantile q of a[:n] (reorders a[:n])."""
    pos = q * (n - 1)
    lo = int(pos)
    v = _select(a, n, lo)
    if lo + 1 >= n or pos == lo:
        return v
    # The next order statistic is the smallest of what the selection left above lo.
    nxt = a[lo + 1]
    for i in range(lo + 2, n):
        if a[i] < nxt:
            nxt = a[i]
    return v + (nxt - v) * (pos - lo)


@njit(parallel=True, cache=True, nogil=True)
def _veto(
    bits,
    blue,
    nir,
    gain_b,
    gain_n,
    nodata,
    blue_dn,
    blue_rel,
    nir_drop,
    blue_drop,
    ref_keep,
    rounds,
    out,
):
    # pragma: no cover - compiled
    """out[t] = STRICT | LOOSE for looks the single-scene mask calls clear (LOOSE unset) that
    are inconsistent with the clear reference of those looks. Only they can change the
    composite: a look the mask already drops stays dropped, so the work is O(clear looks)."""
    T, H, W = blue.shape
    for y in prange(H):
        # Gather each pixel's clear looks row by row (x innermost: contiguous reads; a loop
        # over t innermost strides by a whole scene and was 3x slower).
        cnt = np.zeros(W, np.int64)
        idx = np.empty((W, T), np.int64)
        bb = np.empty((W, T), np.float32)
        nn = np.empty((W, T), np.float32)
        sb = np.empty((W, T), np.float32)  # blue and NIR over the look's scene-wide level
        sn = np.empty((W, T), np.float32)
        for t in range(T):
            for x in range(W):
                out[t, y, x] = 0
                if (bits[t, y, x] & 2) == 0 and blue[t, y, x] != nodata:  # 2 = LOOSE
                    c = cnt[x]
                    idx[x, c] = t
                    bb[x, c] = blue[t, y, x]
                    nn[x, c] = nir[t, y, x]
                    sb[x, c] = blue[t, y, x] / gain_b[t]
                    sn[x, c] = nir[t, y, x] / gain_n[t]
                    cnt[x] = c + 1
        tmp = np.empty(T, np.float32)
        keep = np.empty(T, np.bool_)
        for x in range(W):
            nc = cnt[x]
            if nc < 2:
                continue  # nothing to compare against
            b = bb[x]
            n = nn[x]
            nb = sb[x]
            nnn = sn[x]
            for i in range(nc):
                keep[i] = True
            for _ in range(rounds):
                k = 0
                for i in range(nc):
                    if keep[i]:
                        tmp[k] = n[i]
                        k += 1
                nref = _quantile(tmp, k, 0.5)
                k = 0
                for i in range(nc):
                    if keep[i] and n[i] >= ref_keep * nref:
                        tmp[k] = b[i]
                        k += 1
                if k == 0:
                    for i in range(nc):
                        if keep[i]:
                            tmp[k] = b[i]
                            k += 1
                bref = _quantile(tmp, k, 0.25)
                hi_b = bref + blue_dn + blue_rel * bref
                # The shadow test compares each look relative to its own scene-wide level, so a
                # season or a processing version that darkens the whole scene is not a shadow.
                k = 0
                for i in range(nc):
                    if keep[i]:
                        tmp[k] = nnn[i]
                        k += 1
                lo_n = (1 - nir_drop) * _quantile(tmp, k, 0.5)
                k = 0
                for i in range(nc):
                    if keep[i]:
                        tmp[k] = nb[i]
                        k += 1
                lo_b = (1 - blue_drop) * _quantile(tmp, k, 0.5)
                nk = 0
                for i in range(nc):
                    if b[i] <= hi_b and (nnn[i] >= lo_n or nb[i] >= lo_b):
                        nk += 1
                if nk == 0:
                    break
                for i in range(nc):
                    keep[i] = b[i] <= hi_b and (nnn[i] >= lo_n or nb[i] >= lo_b)
            for i in range(nc):
                if not keep[i]:
                    out[idx[x, i], y, x] = 3  # STRICT | LOOSE


@njit(parallel=True, cache=True, nogil=True)
def _medians(bits, band, nodata, out):  # pragma: no cover - compiled
    """Per pixel: the median of ``band`` over the looks the mask calls clear (NaN if none)."""
    T, H, W = band.shape
    for y in prange(H):
        cnt = np.zeros(W, np.int64)
        vals = np.empty((W, T), np.float32)
        for t in range(T):
            for x in range(W):
                if (bits[t, y, x] & 2) == 0 and band[t, y, x] != nodata:
                    vals[x, cnt[x]] = band[t, y, x]
                    cnt[x] += 1
        for x in range(W):
            out[y, x] = _quantile(vals[x], cnt[x], 0.5) if cnt[x] > 0 else np.nan


def scene_levels(bits: np.ndarray, band: np.ndarray, nodata: int = 0) -> np.ndarray:
    """float32 (T,): each look's level relative to the pixels' clear medians (the median over
    its clear pixels of band / median), 1 where it has too few clear pixels to tell."""
    ref = np.empty(band.shape[1:], np.float32)
    _medians(np.ascontiguousarray(bits), np.ascontiguousarray(band), nodata, ref)
    sub = (slice(None), slice(None, None, 2), slice(None, None, 2))  # every 4th pixel: enough
    ok = ((bits[sub] & LOOSE) == 0) & (band[sub] != nodata) & (ref[sub[1:]] > 0)[None]
    ratio = np.where(ok, band[sub] / np.where(ref[sub[1:]] > 0, ref[sub[1:]], 1)[None], np.nan)
    enough = ok.sum(axis=(1, 2)) >= 16
    out = np.ones(len(band), np.float32)
    if enough.any():
        med = np.nanmedian(ratio[enough].reshape(int(enough.sum()), -1), axis=1)
        out[enough] = np.where(np.isfinite(med) & (med > 0), med, 1.0)
    return out


def temporal_veto(
    bits: np.ndarray,
    blue: np.ndarray,
    nir: np.ndarray,
    nodata: int = 0,
    blue_dn: float = BLUE_DN,
    blue_rel: float = BLUE_REL,
    nir_drop: float = NIR_DROP,
    levels: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Add the temporal test to packed mask ``bits`` (uint8 (T, H, W): STRICT, LOOSE, ...):
    looks inconsistent with the pixel's clear reference get STRICT | LOOSE. ``blue``, ``nir``:
    uint16 (T, H, W) DN of B02 and B08 on the same grid. ``levels``: each look's scene-wide
    (blue, NIR) level (:func:`scene_levels`); a tile passes the whole cell's, so that the result
    does not depend on the window (default: measured on these arrays). Returns a new array."""
    assert STRICT == 1 and LOOSE == 2  # the kernel writes them as 3 and reads LOOSE as 2
    if bits.shape != blue.shape or blue.shape != nir.shape:
        raise ValueError(f"shapes differ: bits {bits.shape}, blue {blue.shape}, nir {nir.shape}")
    bits, blue, nir = (np.ascontiguousarray(a) for a in (bits, blue, nir))
    extra = np.empty(bits.shape, np.uint8)
    _veto(
        bits,
        blue,
        nir,
        *(levels or (scene_levels(bits, blue, nodata), scene_levels(bits, nir, nodata))),
        nodata,
        np.float32(blue_dn),
        np.float32(blue_rel),
        np.float32(nir_drop),
        np.float32(BLUE_DROP),
        np.float32(NIR_REF_KEEP),
        ROUNDS,
        extra,
    )
    return bits | extra
