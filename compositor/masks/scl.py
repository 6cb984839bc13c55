"""Sentinel-2 L2A Scene Classification (SCL) -> training labels for the cloud mask model.

SCL codes: 0 no data, 1 saturated/defective, 2 dark area, 3 cloud shadow, 4 vegetation,
5 bare soil, 6 water, 7 unclassified, 8 cloud medium probability, 9 cloud high probability,
10 thin cirrus, 11 snow/ice.
"""

from __future__ import annotations

import numpy as np

CLEAR, CLOUD, SHADOW = 0, 1, 2
IGNORE = 255
CLASSES = ("clear", "cloud", "shadow")

SCL_CLEAR = (2, 4, 5, 6, 7, 11)
SCL_CLOUD = (8, 9, 10)
SCL_SHADOW = (3,)
SCL_IGNORE = (0, 1)

# One lookup table for all 256 byte values: anything not a documented code is ignored too, so a
# corrupt SCL value never becomes a training label.
_LUT = np.full(256, IGNORE, dtype=np.uint8)
_LUT[list(SCL_CLEAR)] = CLEAR
_LUT[list(SCL_CLOUD)] = CLOUD
_LUT[list(SCL_SHADOW)] = SHADOW


def scl_to_labels(scl: np.ndarray) -> np.ndarray:
    """Map an SCL array (any shape, integer) to uint8 labels 0 clear, 1 cloud, 2 shadow,
    255 ignore."""
    a = np.asarray(scl)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"SCL must be an integer array, got {a.dtype}")
    # Values outside 0..255 (e.g. a uint16 fill value) are ignored rather than wrapped.
    safe = np.where((a >= 0) & (a <= 255), a, 0).astype(np.uint8)
    return _LUT[safe]


def truth_to_labels(cloud: np.ndarray, shadow: np.ndarray) -> np.ndarray:
    """Labels from boolean truth masks; cloud wins where both are set (a shadow under a cloud is
    invisible)."""
    labels = np.zeros(np.shape(cloud), dtype=np.uint8)
    labels[np.asarray(shadow, bool)] = SHADOW
    labels[np.asarray(cloud, bool)] = CLOUD
    return labels
