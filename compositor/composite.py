"""Per-pixel clear-sky composite of a stack window: mask, dilate, percentile, fallback, count."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from compositor.percentile import SOURCE_MIN_WIDTH, Source, quantile_fraction, run_source
from compositor.stack import CLOUDPROB_SCALE, CLOUDPROB_UNSET

# Sentinel-2 L2A Scene Classification codes.
SCL_NODATA = (0, 1)  # no data, saturated/defective
SCL_CLOUD = (8, 9, 10)  # cloud medium, cloud high, thin cirrus
SCL_SHADOW = (3,)
MASK_METHODS = ("auto", "scl", "segformer", "none")  # auto: the model where it ran, else SCL


@dataclass
class CompositeResult:
    values: np.ndarray  # float32 (B, H, W) DN; NaN where the stack has no data at all
    count: np.ndarray  # uint16 (H, W) clear (unmasked, with data) observations
    fallback: np.ndarray  # bool (H, W) pixels that had fewer than min_clear clear observations


# Bits of a packed mask: the exclusion mask, the fallback's looser one, and "not among the least
# cloudy looks of this pixel" (the last fallback before using every look).
STRICT, LOOSE, LEAST = 1, 2, 4
# How bad an SCL class is as a last resort (0 = clear classes): thin cirrus is mostly
# transparent, medium-probability cloud and shadow keep some surface, high-probability cloud none.
SCL_BADNESS = np.zeros(256, np.uint8)
SCL_BADNESS[[10]] = 1
SCL_BADNESS[[8, 3]] = 2
SCL_BADNESS[[9]] = 3
SCL_BADNESS[list(SCL_NODATA)] = 255  # never chosen
NO_LOOK = 255


@njit(parallel=True, cache=True, nogil=True)
def _mask_bits(codes, badbits, r, nodata_max, out):  # pragma: no cover - compiled
    """Packed exclusion masks per scene, from class codes (T, H, W) uint8:

    bad = bit ``code`` of ``badbits`` (codes >= 31 are never bad), nd = code <= nodata_max;
    out = STRICT * (bad dilated by a (2r+1)^2 square | nd) + LOOSE * (bad | nd).
    The dilation is separable, each pass an OR of 2r+1 shifted rows, loops over x innermost
    so they vectorise."""
    T, H, W = codes.shape
    n = 2 * r + 1
    for t in prange(T):
        bad = np.zeros((H, W + 2 * r), np.uint8)  # zero-padded left and right
        horiz = np.zeros((H + 2 * r, W), np.uint8)  # zero-padded top and bottom
        for y in range(H):
            for x in range(W):
                c = np.uint32(min(codes[t, y, x], 31))
                bad[y, x + r] = np.uint8((badbits >> c) & 1)
            for d in range(n):
                for x in range(W):
                    horiz[y + r, x] |= bad[y, x + d]
        acc = np.empty(W, np.uint8)
        for y in range(H):
            acc[:] = 0
            for d in range(n):
                for x in range(W):
                    acc[x] |= horiz[y + d, x]
            for x in range(W):
                nd = np.uint8(np.int64(codes[t, y, x]) <= nodata_max)
                out[t, y, x] = (acc[x] | nd) | ((bad[y, x + r] | nd) << 1)


def _bits(codes: np.ndarray, bad_codes: tuple[int, ...], pixels: int, nodata_max: int):
    out = np.empty(codes.shape, np.uint8)
    badbits = np.uint32(sum(1 << c for c in bad_codes if c < 31))
    c = np.ascontiguousarray(codes, dtype=np.uint8)
    _mask_bits(c, badbits, max(int(pixels), 0), nodata_max, out)
    return out


@njit(parallel=True, cache=True, nogil=True)
def _least(codes, lut, margin, bits):  # pragma: no cover - compiled
    T, H, W = codes.shape
    for y in prange(H):
        best = np.full(W, NO_LOOK, np.int16)
        for t in range(T):
            for x in range(W):
                best[x] = min(best[x], np.int16(lut[codes[t, y, x]]))
        for t in range(T):
            for x in range(W):
                b = np.int16(lut[codes[t, y, x]])
                worse = (b > best[x] + margin) | (b == NO_LOOK)
                bits[t, y, x] |= np.uint8(worse) * np.uint8(LEAST)


_IDENTITY = np.arange(256, dtype=np.uint8)


def mark_least_cloudy(
    bits: np.ndarray, codes: np.ndarray, lut: np.ndarray | None = None, margin: int = 0
) -> np.ndarray:
    """Set the LEAST bit on every look whose badness (``lut[codes]``, or ``codes`` itself;
    uint8 (T, H, W), NO_LOOK = no data) exceeds the pixel's best look by more than ``margin``:
    the fallback for pixels no mask leaves clear takes its percentile over the least cloudy
    looks, not over all of them."""
    table = _IDENTITY if lut is None else np.asarray(lut, np.uint8)
    _least(np.ascontiguousarray(codes, dtype=np.uint8), table, int(margin), bits)
    return bits


def scl_bits(scl: np.ndarray, dilate_px: int) -> np.ndarray:
    """Packed exclusion masks from SCL in one pass: STRICT = cloud/shadow dilated by
    ``dilate_px`` or nodata; LOOSE = the same undilated (the fallback's mask). Only
    cloud/shadow is dilated: nodata edges are exact, clouds have soft edges that SCL draws
    too tight."""
    assert SCL_NODATA == (0, 1)  # so nodata is one comparison, not a table look-up
    return _bits(scl, SCL_CLOUD + SCL_SHADOW, dilate_px, max(SCL_NODATA))


# Model probabilities (0..250) within this of a pixel's least cloudy look count as least cloudy.
LEAST_MARGIN = 25
# SCL badness (0..3) on the probability scale, for looks the model has not seen.
_SCL_AS_PROB = np.array([0, 100, 175, 250], np.uint8)
_SCL_PROB_RANK = _SCL_AS_PROB[np.minimum(SCL_BADNESS, 3)]  # per SCL code
_SCL_IS_BAD = np.zeros(256, np.uint8)
_SCL_IS_BAD[list(SCL_CLOUD + SCL_SHADOW)] = 1
_CLEAR, _BAD = 2, 3  # codes handed to _mask_bits (0 = nodata)


@njit(parallel=True, cache=True, nogil=True)
def _prob_codes(scl, cp, thr, scl_bad, scl_rank, codes, badness):  # pragma: no cover
    """Per look: the model's verdict where it predicted the scene, SCL's elsewhere."""
    T, H, W = scl.shape
    for t in prange(T):
        for y in range(H):
            for x in range(W):
                c = scl[t, y, x]
                a = cp[t, 0, y, x]
                p = max(a, cp[t, 1, y, x])
                if c <= 1:  # SCL nodata / defective
                    codes[t, y, x] = 0
                    badness[t, y, x] = NO_LOOK
                elif a != CLOUDPROB_UNSET:
                    codes[t, y, x] = _BAD if p > thr else _CLEAR
                    badness[t, y, x] = p
                else:
                    codes[t, y, x] = _BAD if scl_bad[c] else _CLEAR
                    badness[t, y, x] = scl_rank[c]


def prob_bits(
    scl: np.ndarray, cloudprob: np.ndarray, threshold: float, dilate_px: int
) -> np.ndarray:
    """Packed exclusion masks (STRICT, LOOSE, LEAST) from the model's probabilities (T, 2, H,
    W) uint8, and SCL for scenes (pixels) the model has not seen; nodata from SCL."""
    scl = np.ascontiguousarray(scl, dtype=np.uint8)
    codes = np.empty(scl.shape, np.uint8)
    badness = np.empty(scl.shape, np.uint8)
    thr = int(round(threshold * CLOUDPROB_SCALE))
    cp = np.ascontiguousarray(cloudprob)
    _prob_codes(scl, cp, thr, _SCL_IS_BAD, _SCL_PROB_RANK, codes, badness)
    bits = _bits(codes, (_BAD,), dilate_px, 0)
    return mark_least_cloudy(bits, badness, None, LEAST_MARGIN)


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
    masks = pack_masks(exclude, fallback_exclude)
    fallbacks = (LOOSE,) if fallback_exclude is not None else ()
    return composite_source(reflectance, masks, q, min_clear, nodata, fallbacks)


def pack_masks(exclude: np.ndarray, fallback_exclude: np.ndarray | None = None) -> np.ndarray:
    """One uint8 (T, H, W) array of mask bits (STRICT, LOOSE): one pass over it per kernel run."""
    bits = np.ascontiguousarray(exclude, dtype=bool).view(np.uint8).copy()
    if fallback_exclude is not None:
        bits |= np.ascontiguousarray(fallback_exclude, dtype=bool).view(np.uint8) << 1
    return bits


def composite_source(
    src: Source | np.ndarray,
    masks: np.ndarray,
    q: float = 25.0,
    min_clear: int = 1,
    nodata: int = 0,
    fallbacks: tuple[int, ...] = (LOOSE,),
) -> CompositeResult:
    """``composite`` of observations read in place (a Source: no copy of the stack window)
    or of a uint16 (T, B, H, W) array.

    ``masks``: uint8 (T, H, W) bits: STRICT = excluded; the bits in ``fallbacks`` (LOOSE: the
    looser mask, LEAST: not among the least cloudy looks) are tried in that order for pixels
    with fewer than ``min_clear`` clear observations (LEAST needs one look), and only on them;
    last, every observation with data. Observations equal to ``nodata`` count as missing in
    every pass."""
    if isinstance(src, np.ndarray):
        w = src.shape[-1]
        if w < SOURCE_MIN_WIDTH:  # narrower than the kernel's block: pad with nodata, crop
            pad = ((0, 0), (0, 0), (0, 0), (0, SOURCE_MIN_WIDTH - w))
            refl = np.pad(src, pad, constant_values=nodata)
            m = np.pad(masks, pad[1:], constant_values=STRICT | LOOSE | LEAST)
            r = composite_source(refl, m, q, min_clear, nodata, fallbacks)
            return CompositeResult(r.values[..., :w], r.count[..., :w], r.fallback[..., :w])
        src = Source.from_array(np.ascontiguousarray(src, dtype=np.uint16))
    qf = [quantile_fraction(q)]
    vals, count = run_source(src, masks, qf, nodata=nodata, count=True, mask_bits=STRICT)
    values = vals[0]
    need = count < min_clear
    fallback = np.zeros(need.shape, bool)
    passes = [(b, 1 if b == LEAST else min_clear) for b in fallbacks] + [(0, 1)]
    for bits, enough in passes:
        if not need.any():
            break
        v, c = run_source(src, masks, qf, nodata, active=need, count=True, mask_bits=bits)
        ok = need & (c >= enough)
        values[:, ok] = v[0][:, ok]
        fallback |= ok
        need &= ~ok
    return CompositeResult(values=values, count=count, fallback=fallback)
