"""Render any target grid (a web-map tile, a COG block) from a Stack.

Data flow: target bounds -> the Stack level whose pixels match the target resolution -> a window
(with a halo for resampling) -> composite in the cell's native UTM grid -> warp the
three display bands to the target grid -> render. Compositing happens before warping so that
100 scenes are never reprojected, only the 3-band result.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from affine import Affine
from cachetools import LRUCache
from numba import njit, prange
from rasterio.crs import CRS
from rasterio.warp import transform_bounds

from compositor.composite import (
    LEAST,
    LOOSE,
    MASK_METHODS,
    SCL_BADNESS,
    SCL_SHADOW,
    CompositeResult,
    composite_source,
    mark_least_cloudy,
    prob_bits,
    scl_bits,
)
from compositor.hillshade import hillshade
from compositor.memory import RENDER_BUDGET, render_bytes
from compositor.render import (
    DEFAULT_GAMMA,
    DEFAULT_RESCALE,
    colorize_count,
    colorize_probability,
    to_rgb8,
)
from compositor.stack import CLOUDPROB_SCALE, CLOUDPROB_UNSET, Stack
from compositor.temporal import scene_levels, temporal_veto
from compositor.warp import warp

LAYERS = ("composite", "count", "date", "cloud")
RGB_BANDS = ("B04", "B03", "B02")
# Default dilation (10 m pixels) per mask: Sen2Cor draws cloud and shadow tight, so SCL needs
# a margin; the model was trained on soft cloud edges and is dilated less (see bench/quality.py).
DILATE_SCL = 3
DILATE_MODEL = 1
HALO = 2  # extra native pixels around a window so bilinear warping has neighbours at edges


@dataclass(frozen=True)
class ViewParams:
    """Everything that changes a rendered pixel (so also the tile cache key)."""

    layer: str = "composite"
    percentile: float = 25.0
    start: dt.date | None = None
    end: dt.date | None = None
    months: tuple[int, ...] | None = None
    mask: str = "auto"
    cloud_threshold: float = 0.4
    # In 10 m pixels, converted per level so the look does not change with zoom; None: the
    # mask's own default (DILATE_SCL or DILATE_MODEL).
    dilate: int | None = None
    temporal: bool = True  # the multi-temporal test (compositor.temporal) on top of the mask
    min_clear: int = 1
    rescale: tuple[float, float] = DEFAULT_RESCALE
    gamma: float = DEFAULT_GAMMA
    date: dt.date | None = None  # the 'date' and 'cloud' layers show one scene
    hillshade: float = 0.0  # blend strength 0..1 of the DEM hillshade (composite and date)

    def __post_init__(self) -> None:
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {', '.join(LAYERS)}, not {self.layer!r}")
        if self.mask not in MASK_METHODS:
            raise ValueError(f"mask must be one of {', '.join(MASK_METHODS)}, not {self.mask!r}")
        if not 0 <= self.percentile <= 100:
            raise ValueError(f"percentile must be within 0..100, not {self.percentile}")
        if self.layer in ("date", "cloud") and self.date is None:
            raise ValueError(f"layer={self.layer} needs date=YYYY-MM-DD")
        if not 0 <= self.hillshade <= 1:
            raise ValueError(f"hillshade must be within 0..1, not {self.hillshade}")


@dataclass
class Rendered:
    rgb: np.ndarray  # uint8 (3, H, W)
    valid: np.ndarray  # bool (H, W): False = transparent
    timings: dict[str, float] = field(default_factory=dict)


class NoData(LookupError):
    """The target does not touch the stack, or no scene matches the filters."""


def scene_for_date(stack: Stack, date: dt.date) -> int:
    for i in stack.complete_indices():
        if stack.scenes[i].date == date:
            return int(i)
    raise NoData(f"cell {stack.cell_id} has no scene on {date.isoformat()}")


def render_area(
    stack: Stack,
    dst_crs: CRS,
    dst_bounds: tuple[float, float, float, float],
    width: int,
    height: int,
    params: ViewParams,
) -> Rendered:
    """Render ``params.layer`` of ``stack`` onto a (height, width) grid over ``dst_bounds``."""
    timings: dict[str, float] = {}
    clock = _Clock(timings)
    src_crs = CRS.from_epsg(stack.epsg)
    nb = transform_bounds(dst_crs, src_crs, *dst_bounds, densify_pts=21)
    res = min((nb[2] - nb[0]) / width, (nb[3] - nb[1]) / height)
    # A level up to 25 % coarser than the target is visually the same and reads 4x less.
    level = stack.level_for_resolution(res * 1.25)
    inv = ~level.transform
    c0, r0 = inv @ (nb[0], nb[3])
    c1, r1 = inv @ (nb[2], nb[1])
    # Masks are dilated on their own, wider window (composite_window): only the warp needs a
    # halo here, and a 256 px tile then stays within two 128 px kernel blocks per row.
    halo = HALO
    if not all(map(math.isfinite, (c0, r0, c1, r1))):
        raise NoData("the area cannot be projected onto the stack's grid")
    # Clip to the level (plus halo): a zoomed-out tile spans far more than the stack, and the
    # window must never grow with the request (memory), only with the stack.
    col, row = max(math.floor(c0), 0) - halo, max(math.floor(r0), 0) - halo
    col1 = min(math.ceil(c1), level.width) + halo
    row1 = min(math.ceil(r1), level.height) + halo
    w, h = col1 - col, row1 - row
    if c1 <= 0 or r1 <= 0 or c0 >= level.width or r0 >= level.height:
        raise NoData("the area does not intersect the stack")
    window = (row, col, h, w)
    win_transform = level.transform @ Affine.translation(col, row)

    if params.layer in ("date", "cloud"):
        idx = np.asarray([scene_for_date(stack, params.date)])
    else:
        idx = stack.complete_indices(params.start, params.end, params.months)
        if len(idx) == 0:
            raise NoData(f"cell {stack.cell_id} has no scene matching the date filters")

    band_idx = [stack.bands.index(b) for b in RGB_BANDS]
    if params.layer == "cloud":
        cp = stack.read(level.index, window, idx, ("cloudprob",))["cloudprob"][0]
        p = cp.max(axis=0).astype(np.float32)
        p[cp[0] == CLOUDPROB_UNSET] = np.nan
        native = (p / CLOUDPROB_SCALE)[None]
        clock.lap("read")
    elif params.layer == "date":
        refl = stack.read(level.index, window, idx, ("reflectance",))["reflectance"][0]
        native = refl[band_idx].astype(np.float32)
        native[:, refl[0] == stack.nodata] = np.nan
        clock.lap("read")
    else:
        clock.lap("setup")
        res_c = composite_window(stack, level.index, window, params, idx, RGB_BANDS, timings)
        clock.restart()
        if params.layer == "count":
            native = res_c.count.astype(np.float32)[None]
            native[:, np.isnan(res_c.values[0])] = np.nan
        else:
            native = res_c.values

    resampling = "nearest" if params.layer == "count" else "bilinear"
    shaded = params.hillshade > 0 and params.layer in ("composite", "date") and stack.has_dem
    if shaded:
        dem = stack.read(level.index, window, idx[:0], ("dem",))["dem"]
        shade = hillshade(dem, level.resolution)
        native = np.concatenate([native, shade[None]])
        clock.lap("hillshade")
    out = warp(native, win_transform, src_crs, dst_crs, dst_bounds, width, height, resampling)
    valid = ~np.isnan(out[0])
    clock.lap("warp")
    if params.layer == "count":
        rgb = colorize_count(np.nan_to_num(out[0]).astype(np.uint16), vmax=max(len(idx), 1))
    elif params.layer == "cloud":
        rgb = colorize_probability(out[0])
    else:
        rgb = to_rgb8(
            out[:3],
            params.rescale,
            params.gamma,
            shade=out[3] if shaded else None,
            shade_strength=params.hillshade,
        )
    clock.lap("render")
    return Rendered(rgb=rgb, valid=valid, timings=timings)


def composite_window(
    stack: Stack,
    level: int,
    window: tuple[int, int, int, int],
    params: ViewParams,
    indices: np.ndarray | None = None,
    bands: tuple[str, ...] | None = None,
    timings: dict[str, float] | None = None,
) -> CompositeResult:
    """Composite of a window (row, col, height, width) at ``level`` in the stack's own grid.

    ``timings``, if given, receives seconds spent per stage (read, mask, percentile). Renders
    in flight share RENDER_BUDGET (compositor/memory.py): this one waits for its share."""
    if indices is None:
        indices = stack.complete_indices(params.start, params.end, params.months)
    ml = mask_level(stack, level)
    f = stack.levels[ml].factor // stack.levels[level].factor  # mask pixel = f x f window pixels
    need = render_bytes(len(indices), window[2], window[3], f)
    t0 = time.perf_counter()
    with RENDER_BUDGET.reserve(need):
        if timings is not None:
            timings["wait"] = timings.get("wait", 0.0) + time.perf_counter() - t0
        return _composite_window(stack, level, ml, f, window, params, indices, bands, timings)


def _composite_window(
    stack: Stack,
    level: int,
    ml: int,
    f: int,
    window: tuple[int, int, int, int],
    params: ViewParams,
    indices: np.ndarray,
    bands: tuple[str, ...] | None,
    timings: dict[str, float] | None,
) -> CompositeResult:
    clock = _Clock(timings)
    band_idx = [stack.bands.index(b) for b in (bands or stack.bands)]
    method = effective_mask(stack, indices, params.mask)
    dilate = mask_dilation(method, params.dilate)
    dil = math.ceil(dilate / stack.levels[ml].factor) if dilate > 0 else 0
    temporal = params.temporal and method != "none" and _has_bands(stack, TEMPORAL_BANDS)
    # Masks depend on the window, the scenes and the mask options, not on the percentile or
    # the display: a user dragging the percentile slider re-uses them.
    key = (
        str(stack.path),
        level,
        window,
        indices.tobytes(),
        method,
        params.cloud_threshold if method == "segformer" else None,
        dil,
        temporal,
        stack.mask_version(indices) if method == "segformer" else None,
    )
    masks = MASK_CACHE.get(key)
    # Just the window's pixels (not whole chunk rows): what a render holds is T x window.
    refl = stack.read(level, window, indices, ("reflectance",), band_idx)["reflectance"]
    clock.lap("read")
    if masks is None:
        masks = _coarse_masks(stack, ml, f, window, indices, params, method, dil, temporal, clock)
        MASK_CACHE.put(key, masks)
    coarse, offset, fallbacks = masks
    # Cached at the mask level (4x smaller); repeated per request into short-lived memory,
    # which the allocator reuses (fresh pages cost ~4 us each to fault in here).
    bits = repeat_window(coarse, f, (*offset, window[2], window[3]))
    clock.lap("mask")
    res = composite_source(
        refl,
        bits,
        params.percentile,
        params.min_clear,
        stack.nodata,
        fallbacks,
    )
    clock.lap("percentile")
    return res


MASK_RESOLUTION = 20.0  # m: SCL and the cloud model are 20 m products, so masks are made there


TEMPORAL_BANDS = ("B02", "B08")  # blue rises under cloud, NIR falls in shadow
_LEVELS: LRUCache = LRUCache(maxsize=64)
_LEVELS_LOCK = threading.Lock()
LEVELS_MIN_SIDE = 64  # px: the scene-wide levels are measured on the coarsest level this big


def look_levels(
    stack: Stack, indices: np.ndarray, method: str, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Each look's scene-wide (blue, NIR) level for the temporal test, measured once on the
    whole cell at a coarse level (cached): a tile's result must not depend on its window."""
    key = (
        str(stack.path),
        indices.tobytes(),
        method,
        threshold if method == "segformer" else None,
        stack.mask_version(indices) if method == "segformer" else None,
    )
    with _LEVELS_LOCK:
        hit = _LEVELS.get(key)
    if hit is not None:
        return hit
    lv = 0
    while (
        lv + 1 < len(stack.levels)
        and min(stack.levels[lv + 1].width, stack.levels[lv + 1].height) >= LEVELS_MIN_SIDE
    ):
        lv += 1
    L = stack.levels[lv]
    win = (0, 0, L.height, L.width)
    what = ("scl",) + (("cloudprob",) if method == "segformer" else ())
    data = stack.read(lv, win, indices, what)
    tb = [stack.bands.index(b) for b in TEMPORAL_BANDS]
    refl = stack.read(lv, win, indices, ("reflectance",), tb)["reflectance"]
    bits, _ = _exclusion(data, method, threshold, 0)
    levels = (
        scene_levels(bits, refl[:, 0], stack.nodata),
        scene_levels(bits, refl[:, 1], stack.nodata),
    )
    with _LEVELS_LOCK:
        _LEVELS[key] = levels
    return levels


def _has_bands(stack: Stack, bands: tuple[str, ...]) -> bool:
    return all(b in stack.bands for b in bands)


def effective_mask(stack: Stack, indices: np.ndarray, mask: str) -> str:
    """``auto`` -> ``segformer`` where any of the looks has model masks (the model's verdict
    is used per look where it ran, SCL's elsewhere), else ``scl``."""
    if mask != "auto":
        return mask
    has_model = any("cloudprob" in stack.scenes[int(i)].extra for i in indices)
    return "segformer" if has_model else "scl"


def mask_dilation(method: str, dilate: int | None) -> int:
    """Dilation in 10 m pixels: the request's, else the mask's default."""
    if dilate is not None:
        return dilate
    return DILATE_MODEL if method == "segformer" else DILATE_SCL


def mask_level(stack: Stack, level: int) -> int:
    """The level masks for ``level`` are computed at: the coarsest one still as fine as
    MASK_RESOLUTION (20 m for a 10 m window: a quarter of the SCL reads and dilation work)."""
    ml = level
    while ml + 1 < len(stack.levels) and stack.levels[ml + 1].resolution <= MASK_RESOLUTION:
        ml += 1
    return ml


def _coarse_masks(
    stack: Stack,
    ml: int,
    f: int,
    window: tuple[int, int, int, int],
    indices: np.ndarray,
    params: ViewParams,
    method: str,
    dil: int,
    temporal: bool,
    clock: _Clock,
) -> tuple[np.ndarray, tuple[int, int], tuple[int, ...]]:
    """Exclusion mask bits (STRICT, LOOSE, LEAST) for ``window``, computed at level ``ml``
    whose pixels are f x f window pixels (dilation ``dil`` in ``ml`` pixels): (bits, offset
    of the window in them counted in window pixels, the fallback bits that apply)."""
    what = ("scl",) + (("cloudprob",) if method == "segformer" else ())
    r0, c0, h, w = window
    # The coarse window covers the fine one plus the dilation radius, so dilation near the
    # window's edges sees the clouds just outside it.
    mr0, mc0 = r0 // f - dil, c0 // f - dil
    mh, mw = -(-(r0 + h) // f) + dil - mr0, -(-(c0 + w) // f) + dil - mc0
    mwin = (mr0, mc0, mh, mw)
    data = stack.read(ml, mwin, indices, what)
    if temporal:
        tb = [stack.bands.index(b) for b in TEMPORAL_BANDS]
        data["temporal"] = stack.read(ml, mwin, indices, ("reflectance",), tb)["reflectance"]
    clock.lap("read")
    bits, fallbacks = _exclusion(data, method, params.cloud_threshold, dil)
    if temporal:
        levels = look_levels(stack, indices, method, params.cloud_threshold)
        blue, nir = data["temporal"][:, 0], data["temporal"][:, 1]
        # SCL's cloud shadow class is a weak verdict (Sen2Cor calls dark water and terrain
        # shadow): the time series may overturn it; the model's shadow calls it keeps.
        soft = np.isin(data["scl"], SCL_SHADOW) if method == "scl" else None
        wide = _unsure_looks(data, method)
        bits = temporal_veto(bits, blue, nir, stack.nodata, levels=levels, soft=soft, wide=wide)
        clock.lap("temporal")
    return bits, (r0 - mr0 * f, c0 - mc0 * f), fallbacks


# Model probabilities (0..250) up to this are unsure calls (0.8): where the mask leaves no clear
# look, the temporal test judges the fallback's looks against the pixel's looks up to it.
UNSURE_MAX = 200


def _unsure_looks(data: dict[str, np.ndarray], method: str) -> np.ndarray | None:
    """bool (T, H, W): the looks the model calls clear or is unsure of (cloud and shadow
    probability both at most UNSURE_MAX). On a surface unlike its training data the model may
    call every look of a pixel cloud at 0.4-0.7; the fallback then took the least unsure look,
    often a shadow, where the time series of these looks tells which are alike."""
    if method != "segformer":
        return None
    cp = data["cloudprob"]
    p = np.maximum(cp[:, 0], cp[:, 1])
    return (p <= UNSURE_MAX) & (cp[:, 0] != CLOUDPROB_UNSET) & (data["scl"] > 1)


@njit(parallel=True, cache=True, nogil=True)
def _repeat2(src, oy, ox, out):  # pragma: no cover - compiled
    """out = src repeated 2 x 2 from offset (oy, ox) in the repeated grid (uint8). A coarse
    row becomes uint16 pairs (b * 257) written contiguously, then copied to its fine rows."""
    T, H, W = out.shape
    o = ox % 2
    w2 = (W + o + 1) // 2
    for t in prange(T):
        pair = np.empty(w2, np.uint16)
        row = pair.view(np.uint8)
        prev = -1
        for y in range(H):
            sy = (y + oy) // 2
            if sy != prev:
                for x in range(w2):
                    pair[x] = np.uint16(src[t, sy, ox // 2 + x]) * np.uint16(257)
                prev = sy
            for x in range(W):
                out[t, y, x] = row[o + x]


def repeat_window(a: np.ndarray, f: int, window: tuple[int, int, int, int]) -> np.ndarray:
    """Window (row, col, h, w) of ``a`` (T, H, W) repeated f x f (nearest), in the repeated
    grid's pixels; f is 1 or 2 (masks are made one level coarser at most)."""
    oy, ox, h, w = window
    if f == 1:
        return np.ascontiguousarray(a[:, oy : oy + h, ox : ox + w])
    if f != 2:
        raise ValueError(f"repeat factor must be 1 or 2, not {f}")
    out = np.empty((a.shape[0], h, w), a.dtype)
    _repeat2(np.ascontiguousarray(a), oy, ox, out)
    return out


class MaskCache:
    """Thread-safe LRU of exclusion masks, bounded in bytes (0 disables it)."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.resize(max_bytes)

    def resize(self, max_bytes: int) -> None:
        self._lock = threading.Lock()
        self._cache: LRUCache = LRUCache(
            maxsize=max(max_bytes, 1),
            getsizeof=lambda v: v[0].nbytes,
        )
        self.enabled = max_bytes > 0

    def get(self, key: tuple) -> tuple[np.ndarray, tuple[int, int], tuple[int, ...]] | None:
        if not self.enabled:
            return None
        with self._lock:
            return self._cache.get(key)

    def put(self, key: tuple, masks: tuple[np.ndarray, tuple[int, int], tuple[int, ...]]) -> None:
        if self.enabled:
            with self._lock:
                self._cache[key] = masks


MASK_CACHE = MaskCache()


class _Clock:
    """Accumulates stage durations into a dict (or does nothing without one)."""

    def __init__(self, into: dict[str, float] | None):
        self.into = into
        self.t = time.perf_counter()

    def restart(self) -> None:
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.into is not None:
            now = time.perf_counter()
            self.into[stage] = self.into.get(stage, 0.0) + now - self.t
            self.t = now


def _exclusion(
    data: dict[str, np.ndarray], method: str, threshold: float, dil: int
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Packed exclusion masks (STRICT, LOOSE, LEAST bits) for the mask method (not auto), and
    the fallback bits that apply, in order."""
    scl = data["scl"]
    if method == "none":
        return np.zeros(scl.shape, np.uint8), ()
    if method == "scl":
        return mark_least_cloudy(scl_bits(scl, dil), scl, SCL_BADNESS), (LOOSE, LEAST)
    bits = prob_bits(scl, data["cloudprob"], threshold, dil)
    return bits, (LOOSE, LEAST)
