"""Multi-temporal cloud and shadow test: a look is judged against the pixel's own clear state.

A single-scene mask (SCL or the model) misses thin cloud, cloud edges and shadows now and then.
The stack holds every look of the pixel, and a clear surface changes slowly compared with what a
cloud (brighter in blue) or a shadow (darker in NIR) does to it, so (as MAJA and Tmask do):

1. The pixel's clear reference starts from the looks the single-scene mask calls clear
   (undilated), plus its "soft" verdicts (SCL's shadow class) where those are the majority:
   Sen2Cor calls dark water and terrain shadow, and then the missed thin clouds would be the
   only reference. Only clear looks can be vetoed: a look the mask drops stays dropped.
2. Twice: reference NIR = median NIR of the kept looks; reference blue = 25th percentile of
   their blue, leaving out NIR-dark ones; the kept looks are those within a tolerance of the
   reference: blue not above it by more than ``BLUE_DN + BLUE_REL * ref`` (cloud), and not
   both NIR below ``(1 - NIR_DROP) * ref`` and blue below ``(1 - BLUE_DROP) *`` the median
   clear blue (shadow: darker in every band; a season's falling NIR alone is not a shadow).
3. Looks not kept are excluded (STRICT and LOOSE bits) on top of the single-scene mask.
4. Looks given back: one dropped only by the dilation within ``RESTORE_DN + RESTORE_REL * ref``
   of the blue reference and not dark; a soft verdict whose look is within that and at least
   ``SOFT_KEEP`` x the pixel's median NIR and blue.
5. Where the mask leaves no clear look, the fallback's least bad looks are judged the same way
   against the looks the model is unsure of (``wide``): outliers leave the fallback.

Computed at the mask level (20 m for a 10 m window) with the masks, and cached with them.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from compositor.composite import LEAST, LOOSE, STRICT

BLUE_DN = 250.0  # blue above the clear reference by more than this (+ BLUE_REL x ref): cloud
BLUE_REL = 0.15
NIR_DROP = 0.25  # NIR below (1 - NIR_DROP) x the reference, and blue below
BLUE_DROP = 0.1  # (1 - BLUE_DROP) x the median clear blue: shadow (shadows darken blue too;
# a crop or forest whose NIR falls with the season does not, and must not be called shadow)
NIR_REF_KEEP = 0.7  # looks below this x the reference NIR do not set the blue reference
ROUNDS = 2
# A look dropped only by the dilation is given back when it sits this close to the clear
# reference (blue within RESTORE_DN + RESTORE_REL x ref, NIR not low): the dilation is a guess
# about cloud edges, the time series a measurement. Rare clear looks next to clouds survive.
RESTORE_DN = 100.0
RESTORE_REL = 0.05
# A soft verdict (SCL's shadow class) is overturned only for a look at least this x the
# pixel's median clear NIR and blue: a shadow's penumbra must not come back.
SOFT_KEEP = 0.9


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


@njit(cache=True, nogil=True)
def _quantile_where(vals, sel, n, q, tmp):  # pragma: no cover - compiled
    """Quantile q of vals[i] for i < n where sel[i] (gathered into tmp, in order)."""
    k = 0
    for i in range(n):
        if sel[i]:
            tmp[k] = vals[i]
            k += 1
    return _quantile(tmp, k, q)


@njit(cache=True, nogil=True)
def _clear_state(
    b,
    n,
    sb,
    sn,
    sft,
    nc,
    rounds,
    blue_dn,
    blue_rel,
    nir_drop,
    blue_drop,
    ref_keep,
    keep,
    ref,
    lit,
    tmp,
):  # pragma: no cover - compiled
    """Steps 1-2 for one pixel's looks i < nc (b, n: blue and NIR; sb, sn: the same over the
    look's scene-wide level; sft: soft verdicts): keep[i] = consistent with the clear
    reference. Returns (blue reference, median relative NIR, median relative blue, whether a
    round would have kept nothing: then keep is the previous round's)."""
    for i in range(nc):
        keep[i] = True
    bref = 0.0
    med_n = 0.0
    med_b = 0.0
    for _ in range(rounds):
        # The reference comes from the firm looks (not soft ones, which may be shadows) when
        # there are enough of them.
        firm = 0
        nsoft = 0
        for i in range(nc):
            if keep[i]:
                if sft[i]:
                    nsoft += 1
                else:
                    firm += 1
        use_all = firm < 3 or nsoft > firm
        for i in range(nc):
            ref[i] = keep[i] and (use_all or not sft[i])
        nref = _quantile_where(n, ref, nc, 0.5, tmp)
        for i in range(nc):
            lit[i] = ref[i] and n[i] >= ref_keep * nref
        bref = _quantile_where(b, lit if lit[:nc].any() else ref, nc, 0.25, tmp)
        hi_b = bref + blue_dn + blue_rel * bref
        # The shadow test compares each look relative to its own scene-wide level, so a season
        # or a processing version that darkens the whole scene is not a shadow.
        med_n = _quantile_where(sn, ref, nc, 0.5, tmp)
        lo_n = (1 - nir_drop) * med_n
        med_b = _quantile_where(sb, ref, nc, 0.5, tmp)
        lo_b = (1 - blue_drop) * med_b
        nk = 0
        for i in range(nc):
            if b[i] <= hi_b and (sn[i] >= lo_n or sb[i] >= lo_b):
                nk += 1
        if nk == 0:
            return bref, med_n, med_b, True
        for i in range(nc):
            keep[i] = b[i] <= hi_b and (sn[i] >= lo_n or sb[i] >= lo_b)
    return bref, med_n, med_b, False


@njit(cache=True, nogil=True)
def _check_fallback(
    bits,
    wide,
    blue,
    nir,
    gain_b,
    gain_n,
    nodata,
    y,
    x,
    blue_dn,
    blue_rel,
    nir_drop,
    blue_drop,
    ref_keep,
    rounds,
    restore_dn,
    restore_rel,
    tmp,
    keep,
    ref,
    lit,
    out,
):  # pragma: no cover - compiled
    """A pixel the mask leaves (almost) no clear look: its fallback takes the least bad looks
    (LEAST unset), as the single-scene mask ranks them. Test those against the clear state of
    the wider set of looks the mask is unsure about (``wide``): cloud or shadow outliers leave
    the fallback (out: 4, LEAST added); if none is left, the looks of the wider set closest to
    its clear state become the fallback (out: 32, LEAST cleared)."""
    T = blue.shape[0]
    idx = np.empty(T, np.int64)
    b = np.empty(T, np.float32)
    n = np.empty(T, np.float32)
    nb = np.empty(T, np.float32)
    nn = np.empty(T, np.float32)
    nc = 0
    for t in range(T):
        if wide[t, y, x] and blue[t, y, x] != nodata:
            idx[nc] = t
            b[nc] = blue[t, y, x]
            n[nc] = nir[t, y, x]
            nb[nc] = blue[t, y, x] / gain_b[t]
            nn[nc] = nir[t, y, x] / gain_n[t]
            nc += 1
    if nc < 3:
        return  # too few to tell an outlier
    firm = np.zeros(nc, np.bool_)  # no soft verdicts here
    bref, med_n, _, emptied = _clear_state(
        b, n, nb, nn, firm, nc, rounds, blue_dn, blue_rel, nir_drop, blue_drop, ref_keep, keep,
        ref, lit, tmp,
    )  # fmt: skip
    if emptied:
        return
    left = 0
    for i in range(nc):
        least = (bits[idx[i], y, x] & 4) == 0  # 4 = LEAST set: not among the least bad
        if least and keep[i]:
            left += 1
    if left > 0:
        for i in range(nc):
            if (bits[idx[i], y, x] & 4) == 0 and not keep[i]:
                out[idx[i], y, x] = 4
        return
    near_b = bref + restore_dn + restore_rel * bref
    placed = False
    for i in range(nc):
        if keep[i] and b[i] <= near_b and nn[i] >= (1 - nir_drop) * med_n:
            out[idx[i], y, x] = 32
            placed = True
    if placed:  # the old least bad looks leave the fallback only if new ones took their place
        for t in range(T):
            if (bits[t, y, x] & 4) == 0 and out[t, y, x] != 32:
                out[t, y, x] = 4


@njit(parallel=True, cache=True, nogil=True)
def _veto(
    bits,
    soft,
    has_soft,
    wide,
    has_wide,
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
    restore_dn,
    restore_rel,
    soft_keep,
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
        dil = np.empty((W, T), np.bool_)  # dropped by the dilation only
        sft = np.empty((W, T), np.bool_)  # a soft verdict the series may overturn
        for t in range(T):
            for x in range(W):
                out[t, y, x] = 0
                s_ = has_soft and soft[t, y, x] != 0
                if ((bits[t, y, x] & 2) == 0 or s_) and blue[t, y, x] != nodata:  # 2 = LOOSE
                    c = cnt[x]
                    idx[x, c] = t
                    bb[x, c] = blue[t, y, x]
                    nn[x, c] = nir[t, y, x]
                    sb[x, c] = blue[t, y, x] / gain_b[t]
                    sn[x, c] = nir[t, y, x] / gain_n[t]
                    dil[x, c] = (bits[t, y, x] & 1) != 0
                    sft[x, c] = s_
                    cnt[x] = c + 1
        tmp = np.empty(T, np.float32)
        keep = np.empty(T, np.bool_)
        ref = np.empty(T, np.bool_)  # the looks the reference is taken from
        lit = np.empty(T, np.bool_)  # reference looks not NIR-dark: the blue reference
        for x in range(W):
            nc = cnt[x]
            if nc < 2:
                if has_wide:
                    _check_fallback(bits, wide, blue, nir, gain_b, gain_n, nodata, y, x,
                                    blue_dn, blue_rel, nir_drop, blue_drop, ref_keep, rounds,
                                    restore_dn, restore_rel, tmp, keep, ref, lit,
                                    out)  # fmt: skip
                continue  # nothing else to compare against
            b = bb[x]
            n = nn[x]
            nb = sb[x]
            nnn = sn[x]
            bref, med_n, med_b, _ = _clear_state(
                b, n, nb, nnn, sft[x], nc, rounds, blue_dn, blue_rel, nir_drop, blue_drop,
                ref_keep, keep, ref, lit, tmp,
            )  # fmt: skip
            lo_n = (1 - nir_drop) * med_n
            near_b = bref + restore_dn + restore_rel * bref
            for i in range(nc):
                if sft[x, i]:
                    if (
                        keep[i]
                        and b[i] <= near_b
                        and nnn[i] >= soft_keep * med_n
                        and nb[i] >= soft_keep * med_b
                    ):
                        out[idx[x, i], y, x] = 24  # overturned: clear STRICT and LOOSE
                elif not keep[i]:
                    out[idx[x, i], y, x] = 3  # STRICT | LOOSE
                elif dil[x, i] and b[i] <= near_b and nnn[i] >= lo_n:
                    out[idx[x, i], y, x] = 8  # restore: clear STRICT


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
    soft: np.ndarray | None = None,
    wide: np.ndarray | None = None,
) -> np.ndarray:
    """Add the temporal test to packed mask ``bits`` (uint8 (T, H, W): STRICT, LOOSE, ...):
    looks inconsistent with the pixel's clear reference get STRICT | LOOSE. ``blue``, ``nir``:
    uint16 (T, H, W) DN of B02 and B08 on the same grid. ``levels``: each look's scene-wide
    (blue, NIR) level (:func:`scene_levels`); a tile passes the whole cell's, so that the result
    does not depend on the window (default: measured on these arrays). Returns a new array."""
    assert (STRICT, LOOSE, LEAST) == (1, 2, 4)  # the kernel writes and reads them as numbers
    if bits.shape != blue.shape or blue.shape != nir.shape:
        raise ValueError(f"shapes differ: bits {bits.shape}, blue {blue.shape}, nir {nir.shape}")
    bits, blue, nir = (np.ascontiguousarray(a) for a in (bits, blue, nir))
    extra = np.empty(bits.shape, np.uint8)
    has_soft = soft is not None
    if has_soft and soft.shape != bits.shape:
        raise ValueError(f"shapes differ: bits {bits.shape}, soft {soft.shape}")
    soft_ = (
        np.ascontiguousarray(soft, dtype=np.uint8) if has_soft else np.zeros((1, 1, 1), np.uint8)
    )
    has_wide = wide is not None
    if has_wide and wide.shape != bits.shape:
        raise ValueError(f"shapes differ: bits {bits.shape}, wide {wide.shape}")
    wide_ = (
        np.ascontiguousarray(wide, dtype=np.bool_) if has_wide else np.zeros((1, 1, 1), np.bool_)
    )
    _veto(
        bits,
        soft_,
        has_soft,
        wide_,
        has_wide,
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
        np.float32(RESTORE_DN),
        np.float32(RESTORE_REL),
        np.float32(SOFT_KEEP),
        extra,
    )
    # 3: vetoed (STRICT | LOOSE added); 8: dropped by the dilation only and given back;
    # 24: a soft verdict overturned (STRICT and LOOSE cleared); 4: out of the fallback (LEAST
    # added); 32: into the fallback (LEAST cleared).
    clear = (extra >> 3) & (STRICT | LOOSE | LEAST)
    return (bits | (extra & (STRICT | LOOSE | LEAST))) & ~clear.astype(np.uint8)
