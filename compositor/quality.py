"""Composite quality against a reference (the synthetic truth, or held-out clear dates)."""

from __future__ import annotations

import numpy as np

# DN thresholds (reflectance x 10000). A pixel counts as residual cloud when its blue is this much
# brighter than the reference (clouds are bright, bluest in B02), and as residual shadow when its
# NIR is this much darker (shadows darken every band, NIR most in absolute terms).
CLOUD_BRIGHT_DN = 300
SHADOW_DARK_FRACTION = 0.25
SHADOW_DARK_MIN_DN = 300


def residual_masks(
    values: np.ndarray, reference: np.ndarray, bands: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """(cloud-bright, shadow-dark) pixel masks of a composite (B, H, W) DN vs the reference."""
    b02, b08 = bands.index("B02"), bands.index("B08")
    bright = values[b02] - reference[b02] > CLOUD_BRIGHT_DN
    drop = reference[b08] - values[b08]
    dark = drop > np.maximum(SHADOW_DARK_FRACTION * reference[b08], SHADOW_DARK_MIN_DN)
    return bright, dark & ~bright


def composite_scores(values: np.ndarray, reference: np.ndarray, bands: tuple[str, ...]) -> dict:
    """Residual cloud/shadow fractions, RMSE and bias per band (reflectance units)."""
    ok = np.isfinite(values).all(axis=0) & np.isfinite(reference).all(axis=0)
    bright, dark = residual_masks(np.nan_to_num(values), np.nan_to_num(reference), bands)
    n = max(int(ok.sum()), 1)
    diff = (values - reference)[:, ok] / 10000.0
    return {
        "residual_cloud": float((bright & ok).sum() / n),
        "residual_shadow": float((dark & ok).sum() / n),
        "residual_total": float(((bright | dark) & ok).sum() / n),
        "rmse": {b: float(np.sqrt(np.mean(diff[i] ** 2))) for i, b in enumerate(bands)},
        "bias": {b: float(np.mean(diff[i])) for i, b in enumerate(bands)},
        "pixels": n,
    }
