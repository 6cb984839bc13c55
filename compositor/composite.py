"""Per-pixel clear-sky composite of a stack window: mask, dilate, percentile, fallback, count."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from compositor.percentile import masked_percentile
from compositor.stack import CLOUDPROB_SCALE, CLOUDPROB_UNSET

# Sentinel-2 L2A Scene Classification codes.
SCL_NODATA = (0, 1)  # no data, saturated/defective
SCL_CLOUD = (8, 9, 10)  # cloud medium, cloud high, thin cirrus
SCL_SHADOW = (3,)
MASK_METHODS = ("scl", "segformer", "none")


@dataclass
class CompositeResult:
    values: np.ndarray  # float32 (B, H, W) DN; NaN where the stack has no data at all
    count: np.ndarray  # uint16 (H, W) clear (unmasked, with data) observations
    fallback: np.ndarray  # bool (H, W) pixels that had fewer than min_clear clear observations


@njit(parallel=True, cache=True)
def _dilate_lut(codes, lut, pixels, out, loose, nodata_max):  # pragma: no cover - compiled
    """out[t] = square dilation (radius ``pixels``) of lut[codes[t]], scene-parallel.

    Sliding-window counts make the cost independent of the radius: a horizontal pass per row,
    then a vertical pass that keeps one running count per column (inner loop contiguous)."""
    T, H, W = codes.shape
    r = pixels
    for t in prange(T):
        horiz = np.zeros((H, W), np.uint8)
        for y in range(H):
            run = 0
            for x in range(min(r, W)):
                run += lut[codes[t, y, x]]
            for x in range(W):
                if x + r < W:
                    run += lut[codes[t, y, x + r]]
                if x - r - 1 >= 0:
                    run -= lut[codes[t, y, x - r - 1]]
                horiz[y, x] = run > 0
        col = np.zeros(W, np.int32)
        for y in range(min(r, H)):
            col += horiz[y]
        for y in range(H):
            if y + r < H:
                col += horiz[y + r]
            if y - r - 1 >= 0:
                col -= horiz[y - r - 1]
            if nodata_max < 0:
                for x in range(W):
                    out[t, y, x] = col[x] > 0
            else:  # also the exclusion masks: nodata codes, and the undilated (loose) mask
                for x in range(W):
                    c = codes[t, y, x]
                    nd = c <= nodata_max
                    out[t, y, x] = (col[x] > 0) | nd
                    loose[t, y, x] = (lut[c] > 0) | nd


def _lut_mask(codes: np.ndarray, lut: np.ndarray, pixels: int) -> np.ndarray:
    out = np.empty(codes.shape, bool)
    c = np.ascontiguousarray(codes, dtype=np.uint8)
    _dilate_lut(c, lut, max(int(pixels), 0), out, out, -1)
    return out


_IDENTITY = np.zeros(256, np.uint8)
_IDENTITY[1:] = 1


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow a (T, H, W) mask by ``pixels`` in each scene (square structuring element)."""
    if pixels <= 0:
        return mask
    return _lut_mask(mask.view(np.uint8), _IDENTITY, pixels)


_BAD_LUT = np.zeros(256, np.uint8)
_BAD_LUT[list(SCL_CLOUD + SCL_SHADOW)] = 1


def scl_masks(scl: np.ndarray, dilate_px: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(cloud_or_shadow, nodata) masks from SCL. Only cloud/shadow is dilated: nodata edges are
    exact, clouds have soft edges that SCL draws too tight."""
    assert SCL_NODATA == (0, 1)  # so nodata is one comparison, not a table look-up
    return _lut_mask(scl, _BAD_LUT, dilate_px), scl <= 1


def scl_exclusion(scl: np.ndarray, dilate_px: int) -> tuple[np.ndarray, np.ndarray]:
    """(strict, loose) exclusion masks from SCL in one pass: strict = cloud/shadow dilated by
    ``dilate_px`` or nodata; loose = the same undilated (the fallback's mask)."""
    strict = np.empty(scl.shape, bool)
    loose = np.empty(scl.shape, bool)
    c = np.ascontiguousarray(scl, dtype=np.uint8)
    _dilate_lut(c, _BAD_LUT, max(int(dilate_px), 0), strict, loose, max(SCL_NODATA))
    return strict, loose


def prob_masks(cloudprob: np.ndarray, threshold: float, dilate_px: int = 0) -> np.ndarray:
    """Cloud-or-shadow mask from stored probabilities (T, 2, H, W) uint8; unset counts as clear
    only where nothing was predicted — callers check ``cloudprob_missing`` first."""
    t = int(round(threshold * CLOUDPROB_SCALE))
    p = cloudprob.max(axis=1)
    bad = (p > t) & (p != CLOUDPROB_UNSET)
    return dilate(bad, dilate_px)


@njit(parallel=True, cache=True)
def _prepare_kernel(band0, exclude, nodata, excl, count, has_data):  # pragma: no cover
    T, H, W = band0.shape
    for y in prange(H):
        n = np.zeros(W, np.uint16)
        d = np.zeros(W, np.uint8)
        for t in range(T):
            for x in range(W):
                nd = np.uint8(band0[t, y, x] == nodata)
                e = exclude[t, y, x] | nd
                excl[t, y, x] = e
                n[x] += np.uint16(1 - e)
                d[x] |= 1 - nd
        count[y] = n
        has_data[y] = d


def _prepare(reflectance: np.ndarray, exclude: np.ndarray, nodata: int):
    """One pass: (exclusion incl. nodata, clear count, has-any-data)."""
    T, _, H, W = reflectance.shape
    excl = np.empty((T, H, W), np.uint8)
    count = np.empty((H, W), np.uint16)
    has_data = np.empty((H, W), np.uint8)
    ex = np.ascontiguousarray(exclude).view(np.uint8)
    _prepare_kernel(reflectance[:, 0], ex, nodata, excl, count, has_data)
    return excl.view(bool), count, has_data.view(bool)


def composite(
    reflectance: np.ndarray,
    exclude: np.ndarray,
    q: float = 25.0,
    min_clear: int = 1,
    fallback_exclude: np.ndarray | None = None,
    nodata: int = 0,
) -> CompositeResult:
    """Masked q-th percentile over time, with a fallback so every pixel with data gets a value.

    reflectance: uint16 (T, B, H, W), ``nodata`` where there is no data.
    exclude: bool (T, H, W), True = cloudy/shadowed observation.
    fallback_exclude: a looser mask (e.g. undilated) tried where too few observations are clear;
    after it, all observations with data are used (the plain percentile), so clouds can only
    remain where no clear look exists at all.
    """
    if reflectance.ndim != 4 or exclude.shape != (reflectance.shape[0], *reflectance.shape[2:]):
        raise ValueError(
            f"reflectance (T,B,H,W) and exclude (T,H,W) disagree: {reflectance.shape} vs "
            f"{exclude.shape}"
        )
    excl, count, has_data = _prepare(reflectance, exclude, nodata)
    values = masked_percentile(reflectance, excl, q)
    need = (count < min_clear) & has_data
    fallback = need.copy()
    for loose in ([fallback_exclude] if fallback_exclude is not None else []) + [None]:
        if not need.any():
            break
        ys, xs = np.nonzero(need)
        sub = reflectance[:, :, ys, xs][:, :, None, :]  # (T, B, 1, N)
        m = sub[:, 0, 0, :] == nodata
        if loose is not None:
            m = m | loose[:, ys, xs]
        enough = (~m).sum(axis=0) >= (min_clear if loose is not None else 1)
        v = masked_percentile(sub, m[:, None, :], q)[:, 0, :]
        ok = ys[enough], xs[enough]
        values[:, ok[0], ok[1]] = v[:, enough]
        need[ok] = False
    return CompositeResult(values=values, count=count, fallback=fallback)
