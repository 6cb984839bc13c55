"""Per-pixel clear-sky composite of a stack window: mask, dilate, percentile, fallback, count."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow a (T, H, W) mask by ``pixels`` in each scene with a square structuring element.

    Separable: OR of shifted views along x, then along y — 4 x ``pixels`` byte-wise ORs over
    the array, several times faster than scipy's generic maximum_filter on tile-sized stacks.
    """
    if pixels <= 0:
        return mask
    out = mask.copy()
    for axis in (-1, -2):
        src = out.copy()
        n = src.shape[axis]
        for k in range(1, min(pixels, n - 1) + 1):
            lo = [slice(None)] * src.ndim
            hi = [slice(None)] * src.ndim
            lo[axis], hi[axis] = slice(k, None), slice(None, n - k)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


_BAD_LUT = np.zeros(256, bool)
_BAD_LUT[list(SCL_CLOUD + SCL_SHADOW)] = True
_NODATA_LUT = np.zeros(256, bool)
_NODATA_LUT[list(SCL_NODATA)] = True


def scl_masks(scl: np.ndarray, dilate_px: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(cloud_or_shadow, nodata) masks from SCL. Only cloud/shadow is dilated: nodata edges are
    exact, clouds have soft edges that SCL draws too tight."""
    return dilate(_BAD_LUT[scl], dilate_px), _NODATA_LUT[scl]


def prob_masks(cloudprob: np.ndarray, threshold: float, dilate_px: int = 0) -> np.ndarray:
    """Cloud-or-shadow mask from stored probabilities (T, 2, H, W) uint8; unset counts as clear
    only where nothing was predicted — callers check ``cloudprob_missing`` first."""
    t = int(round(threshold * CLOUDPROB_SCALE))
    p = cloudprob.max(axis=1)
    bad = (p > t) & (p != CLOUDPROB_UNSET)
    return dilate(bad, dilate_px)


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
    nodata_mask = reflectance[:, 0] == nodata
    excl = exclude | nodata_mask
    count = (~excl).sum(axis=0).astype(np.uint16)
    values = masked_percentile(reflectance, excl, q)
    has_data = ~nodata_mask.all(axis=0)
    need = (count < min_clear) & has_data
    fallback = need.copy()
    for loose in ([fallback_exclude] if fallback_exclude is not None else []) + [None]:
        if not need.any():
            break
        ys, xs = np.nonzero(need)
        sub = reflectance[:, :, ys, xs][:, :, None, :]  # (T, B, 1, N)
        m = nodata_mask[:, ys, xs]
        if loose is not None:
            m = m | loose[:, ys, xs]
        enough = (~m).sum(axis=0) >= (min_clear if loose is not None else 1)
        v = masked_percentile(sub, m[:, None, :], q)[:, 0, :]
        ok = ys[enough], xs[enough]
        values[:, ok[0], ok[1]] = v[:, enough]
        need[ok] = False
    return CompositeResult(values=values, count=count, fallback=fallback)
