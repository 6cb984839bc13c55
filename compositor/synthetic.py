"""A synthetic Sentinel-2 L2A time series with ground truth, for a cell where clouds never leave.

The scene is a lowland Borneo-like landscape (rainforest on the hills, oil palm, rice and
shifting cultivation in a river valley, a small town, laterite clearings) seen by a 5-day revisit
over a few years, under tropical cloud: thick cumulus with soft edges and sun-cast shadows, thin
cloud / cirrus, and orographic cloud that sits on the hills in most dates. Sen2Cor's Scene
Classification (SCL) is emulated from the observed reflectance with Sen2Cor-like rules at 20 m,
so it makes the errors Sen2Cor makes (thin cloud and cloud edges missed, bright roofs and soil
flagged, shadow found only where dark and geometrically plausible), not random label noise.

Everything is deterministic from ``seed``: the landscape comes from one random stream, each
date's atmosphere, surface noise and SCL thresholds from streams keyed by (seed, purpose, date),
so :func:`surface_at` can rebuild the true clear surface of any one date on its own.

Units: ``reflectance`` and ``truth_composite`` are L2A DN (reflectance x 10000, offset already
removed) so they compare directly with composites made from the stack; :func:`surface_at` returns
reflectance 0..1.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft

BANDS = ("B02", "B03", "B04", "B08")
SCALE = 10000.0  # DN per unit reflectance
PERCENTILE = 25.0  # the percentile truth_composite is taken at

# Land cover classes of the synthetic truth (``SyntheticCell.land_cover``).
LC_FOREST, LC_PLANTATION, LC_CROP, LC_GRASS, LC_BARE, LC_URBAN, LC_WATER = range(1, 8)
LAND_COVER_NAMES = {
    LC_FOREST: "forest",
    LC_PLANTATION: "oil palm",
    LC_CROP: "cropland",
    LC_GRASS: "grass/shrub",
    LC_BARE: "bare soil",
    LC_URBAN: "built-up",
    LC_WATER: "water",
}

# Sen2Cor Scene Classification codes.
SCL_NODATA, SCL_DARK, SCL_SHADOW, SCL_VEGETATION, SCL_BARE, SCL_WATER = 0, 2, 3, 4, 5, 6
SCL_UNCLASSIFIED, SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS = 7, 8, 9, 10
SCL_CLOUD_CLASSES = (SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS)

LATITUDE = 1.3  # degrees N: cell 49NDB, Sarawak
OVERPASS_HOUR = 10.4  # local solar time of the descending node (10:30 mean, 110.6 E at 03:00 UTC)
CLOUD_HEIGHT_RANGE = (1000.0, 3000.0)  # metres, the shadow-casting height of cumulus
MAX_SUN_ZENITH = 40.0  # bound for this latitude and overpass; sizes the padding for shadows

# Spectra (B02, B03, B04, B08), reflectance.
_CLOUD_SPEC = np.array([1.0, 0.97, 0.95, 0.92], np.float32)  # flat, bluest: Rayleigh + Mie
_THIN_SPEC = np.array([0.15, 0.14, 0.13, 0.11], np.float32)  # whitish layer at full thin amount
_THIN_TRANSMIT = 0.4  # fraction of the surface signal a full thin layer removes
_SHADOW_BANDS = np.array([0.85, 0.9, 0.95, 1.0], np.float32)  # blue skylight fills shadows a bit
_WATER = np.array([0.045, 0.05, 0.035, 0.012], np.float32)
_TURBID = np.array([0.015, 0.035, 0.045, 0.012], np.float32)  # sediment at full turbidity
_DRY_VEG = np.array([0.075, 0.105, 0.145, 0.24], np.float32)
_SOIL = np.array([0.085, 0.115, 0.17, 0.22], np.float32)  # lateritic: red > green > blue
_BARE = np.array([0.13, 0.17, 0.25, 0.29], np.float32)  # cleared laterite, quarries
_WHITE_SAND = np.array([0.2, 0.23, 0.26, 0.3], np.float32)  # kerangas podzol: flat and bright
_ROAD = np.array([0.12, 0.15, 0.21, 0.25], np.float32)
# Built-up materials: concrete, bright metal roofs, red tiles, asphalt, a park.
_URBAN = np.array(
    [
        [0.17, 0.18, 0.19, 0.23],
        [0.26, 0.27, 0.28, 0.30],
        [0.10, 0.12, 0.19, 0.24],
        [0.07, 0.08, 0.09, 0.11],
        [0.06, 0.08, 0.09, 0.20],
    ],
    np.float32,
)
_URBAN_P = [0.34, 0.18, 0.22, 0.16, 0.10]

# Random-stream keys: the landscape, the calendar, and per date (key, t).
_K_LAND, _K_DATES, _K_ATMOS, _K_SURF, _K_SCL = range(5)

# (g0, g1, d0, d1): green and dry vegetation abundance = x0 + x1 * season for non-crop classes.
_PHENO = {
    LC_FOREST: (0.86, 0.06, 0.02, 0.0),
    LC_PLANTATION: (0.62, 0.10, 0.05, 0.03),
    LC_GRASS: (0.30, 0.45, 0.08, 0.40),
    LC_BARE: (0.02, 0.08, 0.02, 0.05),
    LC_URBAN: (0.0, 0.0, 0.0, 0.03),  # plus the block's trees, set per block
    LC_WATER: (0.0, 0.0, 0.0, 0.0),
    LC_CROP: (0.0, 0.0, 0.0, 0.0),  # per parcel, see _crop_state
}


@dataclass
class _Landscape:
    """Everything static that :func:`surface_at` needs to rebuild a date's clear surface."""

    size: int
    pixel_size: float
    pad: int
    dem_padded: np.ndarray  # float32 (P, P) metres; the cloud model needs terrain off-image too
    land_cover: np.ndarray  # uint8 (H, W)
    green: np.ndarray  # float32 (4, H, W) green canopy spectrum per pixel
    soil: np.ndarray  # float32 (4, H, W) background (soil, roof, understorey) spectrum
    g0: np.ndarray  # float32 (H, W) phenology coefficients, see _PHENO
    g1: np.ndarray
    d0: np.ndarray
    d1: np.ndarray
    lag: np.ndarray  # float32 (H, W) days: green-up lag so the season is not one flat front
    water_frac: np.ndarray  # float32 (H, W) sub-pixel river / pond fraction
    road_frac: np.ndarray  # float32 (H, W)
    normal: np.ndarray  # float32 (3, H, W) terrain unit normal (east, north, up)
    crop_idx: np.ndarray  # int64 flat indices of crop pixels
    crop_parcel: np.ndarray  # int32 parcel of each crop pixel
    parcels: dict[str, np.ndarray]  # per-parcel crop calendar


@dataclass
class SyntheticCell:
    """A synthetic stack and its truth. Arrays are (T, ...) in date order."""

    reflectance: np.ndarray  # uint16 (T, 4, H, W) DN, BANDS order; 0 = nodata
    # uint8 (T, H, W) Sen2Cor-like Scene Classification with its errors; made at 20 m and
    # repeated 2 x 2 like the real product on the 10 m grid (nodata edges are at 10 m)
    scl: np.ndarray
    dem: np.ndarray  # float32 (H, W) metres
    dates: list[dt.date]
    cloud_cover: np.ndarray  # float32 (T,) percent of valid pixels under true cloud
    # float32 (4, H, W) DN: 25th percentile over all T dates of the true clear surface (no
    # cloud, no shadow, no gaps) - what a perfect mask would aim at
    truth_composite: np.ndarray
    truth_cloud: np.ndarray  # bool (T, H, W) thick or thin cloud (False where nodata)
    truth_shadow: np.ndarray  # bool (T, H, W) cloud shadow not under cloud (False where nodata)
    sun_azimuth: np.ndarray  # float32 (T,) degrees clockwise from north
    sun_zenith: np.ndarray  # float32 (T,) degrees
    truth_thin_cloud: np.ndarray  # bool (T, H, W) the thin / cirrus part of truth_cloud
    cloud_height: np.ndarray  # float32 (T,) metres: the height the shadows were cast from
    land_cover: np.ndarray  # uint8 (H, W) LC_* codes
    pixel_size: float
    seed: int
    bands: tuple[str, ...] = BANDS
    _land: _Landscape | None = field(default=None, repr=False)

    @property
    def valid(self) -> np.ndarray:
        """bool (T, H, W): observed (not an orbit-edge / data-loss gap)."""
        return self.scl != SCL_NODATA


# --------------------------------------------------------------------------- random fields


def _rng(seed: int, *key: int) -> np.random.Generator:
    # Independent streams per purpose and date: adding a date or a field never shifts another.
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _noise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    scale_px: float,
    beta: float = 3.0,
    aniso: float = 1.0,
    angle: float = 0.0,
) -> np.ndarray:
    """Zero-mean unit-std fractal noise: power ~ (k^2 + k0^2)^(-beta/2), k0 = 1/scale_px (the
    largest structures), optionally stretched ``aniso`` times along ``angle`` (cirrus streaks).
    One FFT, much cheaper than summing octaves of zoomed noise."""
    ny, nx = sfft.next_fast_len(shape[0], real=True), sfft.next_fast_len(shape[1], real=True)
    ky = sfft.fftfreq(ny).astype(np.float32)[:, None]
    kx = sfft.rfftfreq(nx).astype(np.float32)[None, :]
    if aniso != 1.0:
        c, s = math.cos(angle), math.sin(angle)
        ka, kb = kx * c + ky * s, -kx * s + ky * c
        k2 = (ka * aniso) ** 2 + (kb / aniso) ** 2
    else:
        k2 = kx**2 + ky**2
    amp = k2 + np.float32(1.0 / scale_px) ** 2
    np.log(amp, out=amp)  # exp(log(x) * p): float32 power without the slow scalar pow
    amp *= np.float32(-beta / 4)
    np.exp(amp, out=amp)
    amp[0, 0] = 0.0
    # Uniform real and imaginary parts: a sum over ~10^6 of them is Gaussian all the same, and
    # uniform draws cost a tenth of normal ones.
    spec = np.empty(amp.shape, np.complex64)
    spec.real = rng.random(amp.shape, dtype=np.float32)
    spec.imag = rng.random(amp.shape, dtype=np.float32)
    spec -= np.complex64(0.5 + 0.5j)
    spec *= amp
    f = sfft.irfft2(spec, s=(ny, nx), workers=1)[: shape[0], : shape[1]]
    f -= f.mean()
    f /= f.std() + 1e-12
    return f.astype(np.float32, copy=False)


def _voronoi(
    rng: np.random.Generator, shape: tuple[int, int], cell: tuple[float, float], angle: float
) -> np.ndarray:
    """Parcel ids (int32) of a jittered-grid Voronoi tessellation in a frame rotated by
    ``angle``, cells ~cell[0] x cell[1] px: straight, sharp field edges, roughly aligned like a
    cadastre. Only the 3x3 neighbouring seeds can be nearest, so no KD-tree is needed."""
    h, w = shape
    c, s = math.cos(angle), math.sin(angle)
    yy = np.arange(h, dtype=np.float32)[:, None] - h / 2
    xx = np.arange(w, dtype=np.float32)[None, :] - w / 2
    u = (xx * c + yy * s) / cell[0]
    v = (-xx * s + yy * c) / cell[1]
    half = math.hypot(h, w) / 2
    nu, nv = int(half / cell[0]) + 3, int(half / cell[1]) + 3
    ju = rng.uniform(0.1, 0.9, (2 * nv, 2 * nu)).astype(np.float32)
    jv = rng.uniform(0.1, 0.9, (2 * nv, 2 * nu)).astype(np.float32)
    iu = np.floor(u).astype(np.int32) + nu
    iv = np.floor(v).astype(np.int32) + nv
    best = np.full(shape, np.inf, np.float32)
    label = np.zeros(shape, np.int32)
    for dv in (-1, 0, 1):
        for du in (-1, 0, 1):
            a, b = np.clip(iv + dv, 0, 2 * nv - 1), np.clip(iu + du, 0, 2 * nu - 1)
            d = (b - nu + ju[a, b] - u) ** 2 + (a - nv + jv[a, b] - v) ** 2
            closer = d < best
            best[closer] = d[closer]
            label[closer] = (a * 2 * nu + b)[closer]
    return label


def _ramp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------- landscape


def _pad_px(pixel_size: float) -> int:
    """Margin around the scene where clouds are simulated too, so shadows can come from clouds
    outside it (even: the 20 m SCL grid stays aligned)."""
    d = CLOUD_HEIGHT_RANGE[1] * math.tan(math.radians(MAX_SUN_ZENITH)) / pixel_size
    return 2 * math.ceil(d / 2)


def _build_landscape(seed: int, size: int, px: float) -> _Landscape:
    rng = _rng(seed, _K_LAND)
    h = w = size
    pad = _pad_px(px)
    p = size + 2 * pad
    inner = (slice(pad, pad + h), slice(pad, pad + w))

    # Terrain: fractal hills, a meandering river in a flat-floored valley carved through them.
    e = _noise(rng, (p, p), 5000 / px, beta=3.6)
    lo, hi = np.percentile(e[::4, ::4], [1, 99.5])
    e = np.clip((e - lo) / (hi - lo), 0, 1)
    yy = (np.arange(p, dtype=np.float32)[:, None] - p / 2) * px  # metres, centred
    xx = (np.arange(p, dtype=np.float32)[None, :] - p / 2) * px
    th = rng.uniform(0, math.pi)
    u = xx * math.cos(th) + yy * math.sin(th)
    v = -xx * math.sin(th) + yy * math.cos(th)
    ext = size * px
    amps, lams, phs = (
        rng.uniform(0.03, 0.08, 2) * ext,
        rng.uniform(0.3, 0.7, 2) * ext,
        rng.uniform(0, 2 * math.pi, 2),
    )
    amps[1] *= 0.3
    lams[1] *= 0.3
    v0 = rng.uniform(-0.2, 0.2) * ext
    vc = v0 + sum(
        a * np.sin(2 * np.pi * u / lam + ph) for a, lam, ph in zip(amps, lams, phs, strict=True)
    )
    dvc = sum(
        a * 2 * np.pi / lam * np.cos(2 * np.pi * u / lam + ph)
        for a, lam, ph in zip(amps, lams, phs, strict=True)
    )
    dist = np.abs(v - vc) / np.sqrt(1 + dvc**2)  # metres to the river centre line
    valley = np.exp(-((dist / (0.08 * ext + 400)) ** 2))
    e = e * (1 - 0.9 * valley) + 0.02 * valley
    e = e ** np.float32(1.3)
    dem_padded = (90 + 720 * e).astype(np.float32)
    river_half = rng.uniform(15, 30)
    river = np.clip((river_half - dist[inner]) / px + 0.5, 0, 1)
    valley_i, e_i, dem = valley[inner], e[inner], dem_padded[inner]
    del yy, xx, u, v, vc, dvc, dist

    # Terrain normal (east, north, up) for illumination.
    dzdr, dzdc = np.gradient(dem, px)
    nrm = np.sqrt(dzdc**2 + dzdr**2 + 1)
    normal = np.stack([-dzdc / nrm, dzdr / nrm, 1 / nrm]).astype(np.float32)
    slope = np.degrees(np.arccos(normal[2]))

    # A cadastre of fields (jittered-grid Voronoi). Land use is decided per parcel, so clearings,
    # estates and fields have straight, sharp edges against the forest and each other.
    parcel = _voronoi(
        rng, (h, w), (rng.uniform(150, 250) / px, rng.uniform(80, 140) / px), rng.uniform(0, 3)
    )
    n_par = int(parcel.max()) + 1
    flat = parcel.ravel()
    count = np.maximum(np.bincount(flat, minlength=n_par), 1)

    def per_parcel(a: np.ndarray) -> np.ndarray:
        return np.bincount(flat, a.ravel(), n_par) / count

    # Where people farm: near the river, low and gentle; forest keeps the hills.
    human = _noise(rng, (h, w), 3000 / px, 3.4) + 2.2 * valley_i - 2.5 * e_i - 0.05 * slope
    farm = per_parcel(human) > np.quantile(human[::2, ::2], 0.55)
    estate = per_parcel(_noise(rng, (h, w), 1500 / px, 3.4)) > 0.35  # oil palm in big blocks
    # Smallholder use: paddy (two rice crops a year), hill rice (one), vegetables/maize (any
    # time, two short crops), fallow, pasture, cleared bare land. At any date some fields are
    # bare, some green, some just cut.
    ptype = rng.choice(6, n_par, p=[0.28, 0.22, 0.18, 0.1, 0.16, 0.06])
    use = np.full(n_par, LC_FOREST, np.uint8)
    use[farm] = np.array([LC_CROP, LC_CROP, LC_CROP, LC_CROP, LC_GRASS, LC_BARE], np.uint8)[
        ptype[farm]
    ]
    use[farm & estate] = LC_PLANTATION
    lc = use[parcel]
    managed = farm & ~estate & (ptype <= 4)  # parcels that follow a crop calendar
    sow1 = np.select(
        [ptype == 0, ptype == 1],
        [rng.normal(255, 12, n_par), rng.normal(280, 20, n_par)],
        rng.uniform(0, 365, n_par),
    )
    len1 = np.where(ptype == 2, rng.uniform(75, 100, n_par), rng.uniform(100, 135, n_par))
    sow2 = np.where(ptype == 2, sow1 + 182, sow1 + len1 + rng.uniform(15, 35, n_par))
    len2 = np.where(ptype == 2, len1, rng.uniform(95, 115, n_par))
    parcels = {
        "type": ptype.astype(np.int8),
        "sow1": sow1.astype(np.float32),
        "len1": len1.astype(np.float32),
        "sow2": sow2.astype(np.float32),
        "len2": len2.astype(np.float32),
        "peak": rng.uniform(0.75, 0.95, n_par).astype(np.float32),
    }
    soil_par = rng.uniform(0.75, 1.2, n_par).astype(np.float32)
    white = (ptype == 5) & (rng.random(n_par) < 0.5)

    # Natural openings: shrub on old clearings, bare slips and quarries.
    shrub = _noise(rng, (h, w), 600 / px, 3.4)
    lc[(lc == LC_FOREST) & (shrub > 1.6) & (e_i < 0.5)] = LC_GRASS
    slips = _noise(rng, (h, w), 300 / px, 3.4)
    lc[(slips > 2.6) & (e_i < 0.6) & (lc != LC_PLANTATION)] = LC_BARE

    # A town and a village on the river bank (the valley floor, off the water).
    cy, cx = np.nonzero((valley_i > 0.5) & (river < 0.5))
    if cy.size == 0:
        cy, cx = np.array([h // 2]), np.array([w // 2])
    rr = (np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :])
    edge = _noise(rng, (h, w), 250 / px, 3.4)
    town = np.zeros((h, w), bool)
    # Radii shrink with small windows so a 1 km test cell is not all town.
    town_r = np.array([rng.uniform(500, 800), rng.uniform(200, 350)]) * min(1.0, ext / 8000)
    for radius in town_r:
        k = rng.integers(cy.size)
        dd = np.hypot(rr[0] - cy[k], rr[1] - cx[k]) * px
        town |= dd + 120 * edge < radius
    blocks = np.zeros((h, w), np.int32)
    ty, tx = np.nonzero(town)
    if ty.size:  # street blocks, only where the town is (small cells are costly)
        box = (slice(ty.min(), ty.max() + 1), slice(tx.min(), tx.max() + 1))
        bshape = (box[0].stop - box[0].start, box[1].stop - box[1].start)
        blocks[box] = _voronoi(rng, bshape, (55 / px, 45 / px), rng.uniform(0, math.pi))
    nb = int(blocks.max()) + 1
    material = rng.choice(len(_URBAN), nb, p=_URBAN_P)
    trees = np.where(material == 4, 0.7, rng.uniform(0.0, 0.25, nb)).astype(np.float32)
    lc[town] = LC_URBAN

    # A laterite road from the town along the valley; sub-pixel width as a cover fraction.
    k = rng.integers(cy.size)
    ang = th + rng.uniform(-0.3, 0.3)
    dline = np.abs(-(rr[1] - cx[k]) * math.sin(ang) + (rr[0] - cy[k]) * math.cos(ang)) * px
    road = np.clip((4.0 - dline) / px + 0.5, 0, 1).astype(np.float32) * 0.9

    # Ponds and oxbows on the valley floor.
    pond = (_noise(rng, (h, w), 300 / px, 4.0) > 2.3) & (valley_i > 0.6)
    water = np.maximum(river, pond.astype(np.float32)).astype(np.float32)
    road[water > 0.5] = 0
    lc[water >= 0.5] = LC_WATER
    lc[(road >= 0.3) & (lc != LC_WATER)] = LC_URBAN
    crop_m = managed[parcel] & ((lc == LC_CROP) | (lc == LC_GRASS))

    # Per-pixel texture: canopy crowns and soil patchiness (multiplicative, a few per cent).
    fine = _noise(rng, (h, w), 40 / px, 2.0)
    mid = _noise(rng, (h, w), 400 / px, 2.6)

    # Endmember spectra per pixel: green canopy and background, by class.
    green = np.empty((4, h, w), np.float32)
    soil = np.empty((4, h, w), np.float32)
    tex = 1 + 0.12 * fine
    canopy = {
        LC_FOREST: ([0.028, 0.05, 0.028, 0.34], [0.025, 0.035, 0.03, 0.14]),
        LC_PLANTATION: ([0.028, 0.055, 0.030, 0.34], _SOIL * 0.8),
        LC_CROP: ([0.032, 0.072, 0.034, 0.42], _SOIL),
        LC_GRASS: ([0.038, 0.074, 0.048, 0.33], _SOIL),
        LC_BARE: ([0.038, 0.074, 0.048, 0.33], _BARE),
        LC_URBAN: ([0.025, 0.045, 0.025, 0.30], _URBAN[0]),
        LC_WATER: ([0.03, 0.06, 0.03, 0.30], _SOIL),
    }
    for cls, (g_spec, s_spec) in canopy.items():
        m = lc == cls
        for b in range(4):
            green[b][m] = g_spec[b] * tex[m] * (1 + 0.06 * mid[m])
            soil[b][m] = s_spec[b] * (1 + 0.1 * mid[m])
    soil[:, crop_m] *= soil_par[parcel[crop_m]]
    urb = lc == LC_URBAN
    soil[:, urb] = _URBAN[material[blocks[urb]]].T * (1 + 0.08 * fine[urb])
    bare_m = lc == LC_BARE
    soil[:, bare_m] *= 1 + 0.1 * fine[bare_m]
    # Half the cleared parcels are white sand: bright and grey, the surface Sen2Cor calls cloud.
    sand = bare_m & white[parcel]
    soil[:, sand] = _WHITE_SAND[:, None] * (1 + 0.08 * fine[sand])

    g0, g1, d0, d1 = (np.zeros((h, w), np.float32) for _ in range(4))
    for cls, coef in _PHENO.items():
        m = lc == cls
        for arr, val in zip((g0, g1, d0, d1), coef, strict=True):
            arr[m] = val
    g0[urb] = trees[blocks[urb]] * 0.85
    g1[urb] = trees[blocks[urb]] * 0.15
    lag = (20 * _noise(rng, (h, w), 800 / px, 3.0)).astype(np.float32)

    crop_idx = np.flatnonzero(crop_m)
    return _Landscape(
        size=size,
        pixel_size=px,
        pad=pad,
        dem_padded=dem_padded,
        land_cover=lc,
        green=green,
        soil=soil,
        g0=g0,
        g1=g1,
        d0=d0,
        d1=d1,
        lag=lag,
        water_frac=water,
        road_frac=road,
        normal=normal,
        crop_idx=crop_idx,
        crop_parcel=parcel.ravel()[crop_idx].astype(np.int32),
        parcels=parcels,
    )


def _season(doy: float | np.ndarray) -> np.ndarray:
    """Greenness 0..1 by day of year: greenest after the NE-monsoon rains, lowest in Aug-Sep."""
    return 0.5 + 0.5 * np.cos(2 * np.pi * (np.asarray(doy, np.float32) - 30) / 365)


def _rain(doy: int) -> float:
    """Relative wetness 0..1 (NE monsoon peaks around December)."""
    return float(0.5 + 0.5 * math.cos(2 * math.pi * (doy - 350) / 365))


def _crop_state(parcels: dict[str, np.ndarray], doy: int) -> tuple[np.ndarray, ...]:
    """Green, dry and flooded fractions per parcel on day-of-year ``doy``: sowing, logistic
    green-up, senescence, harvest, stubble, bare soil; paddies are flooded early in a season."""
    t, peak = parcels["type"], parcels["peak"]
    g = np.zeros(t.size, np.float32)
    d = np.zeros(t.size, np.float32)
    fl = np.zeros(t.size, np.float32)
    for sow, length, active in (
        (parcels["sow1"], parcels["len1"], t <= 2),
        (parcels["sow2"], parcels["len2"], (t == 0) | (t == 2)),
    ):
        tau = np.mod(doy - sow, 365.0)
        x = tau / length
        grow = active & (x < 1)
        gg = peak * _sig((x - 0.3) / 0.07) * (1 - _sig((x - 0.82) / 0.05))
        dd = peak * _sig((x - 0.8) / 0.05)
        stub = active & (x >= 1) & (tau < length + 45)
        g = np.where(grow, np.maximum(g, gg), g)
        d = np.where(grow, np.maximum(d, dd), d)
        d = np.where(stub, np.maximum(d, 0.3 * peak * (1 - (tau - length) / 45)), d)
        # Paddies are flooded from ~12 days before transplanting until the canopy closes.
        flood = (t == 0) & ((x < 0.35) | (tau > 353))
        amount = np.where(tau > 353, 0.8, np.clip(1 - x / 0.35, 0, 1) * 0.8)
        fl = np.where(flood, np.maximum(fl, amount), fl)
    s = _season(doy)
    fallow, pasture = t == 3, t == 4
    g = np.where(fallow, 0.1 + 0.25 * s, g)
    d = np.where(fallow, 0.15, d)
    g = np.where(pasture, 0.35 + 0.4 * s, g)
    d = np.where(pasture, 0.45 - 0.35 * s, d)
    return g.astype(np.float32), d.astype(np.float32), fl.astype(np.float32)


def _surface(
    land: _Landscape, seed: int, t: int, date: dt.date, azimuth: float, zenith: float
) -> np.ndarray:
    """True clear-sky L2A reflectance (4, H, W) float32 of date ``t``."""
    rng = _rng(seed, _K_SURF, t)
    doy = date.timetuple().tm_yday
    h = w = land.size
    s = _season(doy - land.lag)
    g = land.g0 + land.g1 * s
    d = land.d0 + land.d1 * (1 - s)
    fl = None
    if land.crop_idx.size:
        gc, dc, flc = _crop_state(land.parcels, doy)
        g.ravel()[land.crop_idx] = gc[land.crop_parcel]
        d.ravel()[land.crop_idx] = dc[land.crop_parcel]
        if flc.any():
            fl = np.zeros((h, w), np.float32)
            fl.ravel()[land.crop_idx] = flc[land.crop_parcel]
    bg = np.clip(1 - g - d, 0, 1)
    wet = 1 - 0.2 * _rain(doy) * rng.uniform(0.3, 1.0)  # moist soil is darker
    # In place with one scratch buffer: this runs once per date on (4, H, W).
    refl = land.green * g
    tmp = np.multiply(land.soil, bg * wet)
    refl += tmp
    refl += np.multiply(_DRY_VEG[:, None, None], d, out=tmp)
    if fl is not None:  # flooded paddies: soil replaced by water
        np.multiply(land.soil, -wet, out=tmp)
        tmp += _WATER[:, None, None]
        tmp *= bg * fl
        refl += tmp

    # Terrain illumination: sunlit slopes brighter, the rest darker (damped: diffuse light).
    za, aa = math.radians(zenith), math.radians(azimuth)
    sun = (math.sin(za) * math.sin(aa), math.sin(za) * math.cos(aa), math.cos(za))
    cos_i = land.normal[0] * sun[0] + land.normal[1] * sun[1] + land.normal[2] * sun[2]
    refl *= np.clip(1 + 0.6 * (cos_i / sun[2] - 1), 0.4, 1.6)

    turb = _rain(doy) * rng.uniform(0.4, 1.0)
    refl *= 1 - land.water_frac - land.road_frac
    refl += np.multiply((_WATER + turb * _TURBID)[:, None, None], land.water_frac, out=tmp)
    refl += np.multiply(_ROAD[:, None, None], land.road_frac, out=tmp)

    # Residual atmospheric-correction error (per-band gain, blue offset) and sensor noise
    # (triangular: close enough to Gaussian, a fraction of the cost).
    refl *= rng.normal(1.0, 0.015, 4).astype(np.float32)[:, None, None]
    refl[0] += np.float32(rng.normal(0, 0.003))
    u = rng.random(refl.shape, dtype=np.float32)
    u += rng.random(refl.shape, dtype=np.float32)
    u -= 1.0
    u *= np.float32(math.sqrt(6.0))
    np.multiply(refl, 0.01, out=tmp)
    tmp += 0.002
    tmp *= u
    refl += tmp
    return np.clip(refl, 1e-4, 1.0, out=refl)


def surface_at(cell: SyntheticCell, t: int) -> np.ndarray:
    """True clear-sky surface reflectance (0..1) of date ``t``: float32 (4, H, W), no cloud, no
    shadow, same noise as the observation. Lets later code compute other truths (another
    percentile, a median) without the stack keeping a (T, 4, H, W) copy."""
    if cell._land is None:
        raise ValueError("this SyntheticCell carries no landscape model")
    return _surface(
        cell._land,
        cell.seed,
        t,
        cell.dates[t],
        float(cell.sun_azimuth[t]),
        float(cell.sun_zenith[t]),
    )


# --------------------------------------------------------------------------- calendar & sun


def _sun(date: dt.date, hour: float) -> tuple[float, float]:
    """(azimuth, zenith) degrees at LATITUDE and local solar ``hour``."""
    doy = date.timetuple().tm_yday
    decl = math.radians(23.44) * math.sin(2 * math.pi * (284 + doy) / 365)
    lat = math.radians(LATITUDE)
    ha = math.radians(15 * (hour - 12))
    cz = math.sin(lat) * math.sin(decl) + math.cos(lat) * math.cos(decl) * math.cos(ha)
    z = math.acos(cz)
    saz = -math.cos(decl) * math.sin(ha) / math.sin(z)
    caz = (math.sin(decl) - math.sin(lat) * cz) / (math.cos(lat) * math.sin(z))
    return math.degrees(math.atan2(saz, caz)) % 360, math.degrees(z)


def _calendar(seed: int, n_dates: int, cloud_level: float) -> dict[str, np.ndarray | list]:
    rng = _rng(seed, _K_DATES)
    # A 5-day grid over one to three years; a random subset of acquisitions is in the archive.
    n_slots = max(n_dates, min(max(3 * n_dates, 80), 219))
    start = dt.date(2021, 1, 3)
    slots = np.sort(rng.choice(n_slots, n_dates, replace=False))
    dates = [start + dt.timedelta(days=5 * int(k)) for k in slots]
    doy = np.array([d.timetuple().tm_yday for d in dates])

    hours = OVERPASS_HOUR + rng.normal(0, 0.08, n_dates)
    sun = np.array([_sun(d, hr) for d, hr in zip(dates, hours, strict=True)], np.float32)

    # Cloud cover targets: logit-normal around a wetter-season mean, plus a few almost-clear
    # dates (picked in the drier months), then shifted in logit space so the mean is the level.
    wet = 0.5 + 0.5 * np.cos(2 * np.pi * (doy - 350) / 365)
    z = 1.1 * (wet - 0.5) + rng.normal(0, 1.0, n_dates)
    n_clear = max(1, round(n_dates / 16))
    clear = rng.choice(n_dates, n_clear, replace=False, p=(1.2 - wet) / (1.2 - wet).sum())
    clear_cover = rng.uniform(0.03, 0.15, n_clear)
    level = float(np.clip(cloud_level, 0.0, 0.97))
    lo, hi = -10.0, 10.0
    for _ in range(60):  # bisection: mean cover = level (the clear dates count too)
        mid = (lo + hi) / 2
        c = _sig(z + mid)
        c[clear] = np.minimum(clear_cover, c[clear])
        lo, hi = (mid, hi) if c.mean() < level else (lo, mid)
    c = np.clip(c, 0.0, 0.995)
    return {
        "dates": dates,
        "azimuth": sun[:, 0],
        "zenith": sun[:, 1],
        "cover": c.astype(np.float32),
        "height": rng.uniform(*CLOUD_HEIGHT_RANGE, n_dates).astype(np.float32),
    }


# --------------------------------------------------------------------------- atmosphere


def _shift_px(height: float, azimuth: float, zenith: float, px: float) -> tuple[int, int]:
    """(rows, cols) from a cloud to its shadow: length h*tan(zenith), away from the sun (rows
    grow southwards, columns eastwards)."""
    length = height * math.tan(math.radians(zenith)) / px
    a = math.radians(azimuth)
    return round(length * math.cos(a)), round(-length * math.sin(a))


@dataclass
class _Atmos:
    alpha: np.ndarray  # (H, W) thick cloud opacity
    bright: np.ndarray  # (H, W) thick cloud top reflectance in B02
    thin: np.ndarray  # (H, W) thin layer amount 0..1
    shadow: np.ndarray  # (H, W) shadowing cloud opacity
    depth: float  # darkening at full shadow
    thick_mask: np.ndarray  # truth: alpha >= 0.05
    thin_mask: np.ndarray  # truth: thin >= 0.15
    high_cirrus: bool  # the thin layer is high enough for the cirrus band (B10) to see it
    around: np.ndarray  # bool (P/2, P/2) dense cloud on the padded 20 m grid (Sen2Cor sees the
    # whole 110 km tile, so clouds just outside this window count for its shadow projection)


def _atmosphere(
    land: _Landscape,
    oro: np.ndarray,
    pers: np.ndarray,
    seed: int,
    t: int,
    cover: float,
    shift: tuple[int, int],
) -> _Atmos:
    rng = _rng(seed, _K_ATMOS, t)
    px, pad, h = land.pixel_size, land.pad, land.size
    pp = oro.shape
    inner = (slice(pad, pad + h), slice(pad, pad + h))
    share = rng.uniform(0.55, 0.9)  # of the cover that is thick cloud

    # Thick cloud: fractal field + terrain lift + a persistent convergence pattern, thresholded
    # at the quantile that gives this date's cover; opacity ramps up over a soft edge.
    f = _noise(rng, pp, rng.uniform(1500, 6000) / px, beta=rng.uniform(2.8, 3.4))
    f += rng.uniform(2.0, 3.2) * oro + rng.uniform(0.5, 1.0) * pers
    c_thick = cover * share
    if c_thick > 0.002:
        thr = float(np.quantile(f[::3, ::3], 1 - c_thick))
    else:
        thr = float(f.max()) + 1.0
    width = rng.uniform(0.35, 0.8)  # soft edges, in noise std units
    fi = f[inner]
    above = (fi - thr) / width
    alpha = np.where(
        above >= 0, 0.05 + 0.95 * np.clip(above, 0, 1), 0.05 * np.clip(1 + 4 * above, 0, 1)
    )
    bright = rng.uniform(0.3, 0.42) + 0.28 * np.clip(above / 2.5, 0, 1)
    # The shadow is the opacity of the cloud that sits up-sun: sample the padded field there.
    sy, sx = shift
    fs = f[pad - sy : pad - sy + h, pad - sx : pad - sx + h]
    a_s = (fs - thr) / width
    shadow = np.where(a_s >= 0, 0.05 + 0.95 * np.clip(a_s, 0, 1), 0.0).astype(np.float32)
    around = ((f[::2, ::2] - thr) / width) >= 0.35
    del f, fs

    # Thin cloud / cirrus: streaky, fills the rest of the cover among non-thick pixels.
    g = _noise(
        rng, (h, h), rng.uniform(2000, 8000) / px, 3.3, rng.uniform(1.2, 2.0), rng.uniform(0, 3)
    )
    thick_mask = above >= 0
    frac_thick = float(thick_mask.mean())
    need = (cover - frac_thick) / max(1 - frac_thick, 1e-6)
    need = max(need, cover * (1 - share) * 0.5)  # some thin cloud over clear patches regardless
    if need > 0.002 and (~thick_mask).any():
        thr_g = float(np.quantile(g[~thick_mask][::3], 1 - min(need, 0.999)))
    else:
        thr_g = float(g.max()) + 1.0
    wg = rng.uniform(0.4, 1.0)
    amp = rng.uniform(0.45, 1.0)
    ag = (g - thr_g) / wg
    thin = np.where(
        ag >= 0, 0.15 + (amp - 0.15) * np.clip(ag, 0, 1), 0.15 * np.clip(1 + 3 * ag, 0, 1)
    )
    return _Atmos(
        alpha=alpha.astype(np.float32),
        bright=bright.astype(np.float32),
        thin=thin.astype(np.float32),
        shadow=shadow,
        depth=float(rng.uniform(0.5, 0.8)),
        thick_mask=thick_mask,
        thin_mask=ag >= 0,
        high_cirrus=bool(rng.random() < 0.5),
        around=around,
    )


def _observe(surf: np.ndarray, a: _Atmos) -> np.ndarray:
    """Shadow on the ground, then cumulus, then a cirrus layer above everything (in place)."""
    obs = surf
    obs *= 1 - (a.depth * a.shadow) * _SHADOW_BANDS[:, None, None]
    obs *= 1 - a.alpha
    obs += (a.alpha * a.bright) * _CLOUD_SPEC[:, None, None]
    obs *= 1 - _THIN_TRANSMIT * a.thin
    obs += a.thin * _THIN_SPEC[:, None, None]
    return obs


# --------------------------------------------------------------------------- Sen2Cor-like SCL


def _scl(
    obs: np.ndarray,
    thin: np.ndarray,
    high_cirrus: bool,
    around: np.ndarray,
    azimuth: float,
    zenith: float,
    px: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Scene classification the way Sen2Cor makes it: at 20 m, from brightness/colour tests on
    the observed reflectance, with per-scene threshold jitter. Errors are emergent: dim cloud
    edges and thin cloud over vegetation fail the brightness/NDVI tests, bright flat roofs and
    soils pass them, shadow needs both darkness and a detected cloud up-sun."""
    _, h, w = obs.shape
    h2, w2 = -(-h // 2), -(-w // 2)
    if (h2 * 2, w2 * 2) != (h, w):
        obs = np.pad(obs, ((0, 0), (0, h2 * 2 - h), (0, w2 * 2 - w)), mode="edge")
        thin = np.pad(thin, ((0, h2 * 2 - h), (0, w2 * 2 - w)), mode="edge")
    # 2 x 2 means by strided sums: reshape().mean() over inner axes is ~10x slower.
    o = obs[:, 0::2, 0::2] + obs[:, 1::2, 0::2] + obs[:, 0::2, 1::2] + obs[:, 1::2, 1::2]
    o *= 0.25
    th = (thin[0::2, 0::2] + thin[1::2, 0::2] + thin[0::2, 1::2] + thin[1::2, 1::2]) * 0.25
    b2, b3, b4, b8 = o
    ndvi = (b8 - b4) / (b8 + b4 + 1e-6)
    j = rng.uniform(0.85, 1.15, 6)

    # Cloud probability: bright in red and blue, not vegetation-like, not red soil.
    p = _ramp(b4, 0.07 * j[0], 0.25 * j[0]) * _ramp(b2, 0.06, 0.18 * j[1])
    p *= 1 - _ramp(ndvi, 0.25 * j[2], 0.5 * j[2])
    p *= 1 - 0.45 * _ramp(b4 / (b2 + 1e-6), 1.4, 1.9)
    cloud_hi = p > 0.65 * j[3]
    cloud_med = (p > 0.35 * j[3]) & ~cloud_hi
    cloud = cloud_hi | cloud_med
    cirrus = (th > 0.4 * j[4]) & high_cirrus & ~cloud

    # Shadow: projection of the detected cloud over a range of heights Sen2Cor cannot know,
    # intersected with a darkness test.
    det = around.copy()
    m = (det.shape[0] - h2) // 2
    det[m : m + h2, m : m + w2] = cloud
    geom = np.zeros((h2, w2), bool)
    step = max(1.0, 1.5 * 2 * px / math.tan(math.radians(zenith)))  # <= 1.5 coarse px per step
    for hgt in np.arange(600.0, CLOUD_HEIGHT_RANGE[1] + step, step):
        dy, dx = _shift_px(float(hgt), azimuth, zenith, 2 * px)
        dy, dx = int(np.clip(dy, -m, m)), int(np.clip(dx, -m, m))
        geom |= det[m - dy : m - dy + h2, m - dx : m - dx + w2]
    vis = b2 + b3 + b4
    # Dark in every band, or NIR-black (water): Sen2Cor mixes up shadow and water.
    dark = ((b8 < 0.13 * j[5]) & (vis < 0.12 * j[5])) | (b8 < 0.02)
    shadow = geom & dark
    # Sen2Cor's shadow mask is blobby: grown by one 20 m pixel inside the projected zone, which
    # catches some penumbra and flags some sunlit ground next to it.
    grown = shadow.copy()
    grown[1:] |= shadow[:-1]
    grown[:-1] |= shadow[1:]
    grown[:, 1:] |= shadow[:, :-1]
    grown[:, :-1] |= shadow[:, 1:]
    shadow = grown & geom & ~cloud & ~cirrus

    water = (b8 < 0.05) & (b3 > b8) & (ndvi < 0)
    out = np.where(ndvi > 0.4, SCL_VEGETATION, SCL_BARE).astype(np.uint8)
    out[(vis + b8 < 0.12) & ~water] = SCL_DARK
    out[water] = SCL_WATER
    out[(p > 0.2) & ~cloud] = SCL_UNCLASSIFIED
    out[shadow] = SCL_SHADOW
    out[cirrus] = SCL_CIRRUS
    out[cloud_med] = SCL_CLOUD_MEDIUM
    out[cloud_hi] = SCL_CLOUD_HIGH
    return np.repeat(np.repeat(out, 2, axis=0), 2, axis=1)[:h, :w]


def _nodata(rng: np.random.Generator, h: int, w: int, stripe: bool) -> np.ndarray:
    """Valid-data mask of a scene cut by the swath edge (tilted ~12 deg like the ground track),
    optionally with a band of lost lines."""
    rows = np.arange(h, dtype=np.float32)[:, None]
    cols = np.arange(w, dtype=np.float32)[None, :]
    x = cols - math.tan(math.radians(12)) * (rows - h / 2)
    cut = rng.uniform(0.55, 0.85) * w
    valid = (x < cut) if rng.random() < 0.5 else (x > w - cut)
    if stripe:
        r0 = int(rng.integers(0, max(h - 1, 1)))
        valid = valid & ~((rows >= r0) & (rows < r0 + max(2, h // 40)))
    return np.broadcast_to(valid, (h, w)).copy()


# --------------------------------------------------------------------------- build


def make_synthetic(
    seed: int = 0,
    size: int = 1024,
    n_dates: int = 64,
    cloud_level: float = 0.75,
    pixel_size: float = 10.0,
    workers: int | None = None,
    progress: Callable[[], None] | None = None,
) -> SyntheticCell:
    """Build the cell scene by scene (float32 per scene, never (T, 4, H, W) floats).
    ``progress()`` is called once per scene built (from worker threads).

    cloud_level: the mean fraction of true cloud over the stack (0.75: three looks in four are
    cloudy). pixel_size: metres; structures are sized in metres, so a small ``size`` with a
    larger pixel shows the same kind of landscape at coarser resolution. workers: scenes built
    at once (threads; numpy releases the GIL); the result does not depend on it.
    """
    if size < 8 or n_dates < 1:
        raise ValueError(f"size must be >= 8 and n_dates >= 1, got {size}, {n_dates}")
    land = _build_landscape(seed, size, pixel_size)
    cal = _calendar(seed, n_dates, cloud_level)
    h = w = size
    pad = land.pad

    # Static cloud drivers: orographic lift over high ground, and a persistent pattern.
    dem = land.dem_padded
    oro = np.clip((dem - 250) / 450, 0, 1) ** np.float32(1.5)
    pers = _noise(_rng(seed, _K_LAND, 1), dem.shape, 8000 / pixel_size, 3.0)
    pers = np.clip(pers, -1.5, 1.5) / 1.5

    # Two scenes clipped by the swath edge, the later one also with lost lines.
    n_nd = 2 if n_dates >= 8 else 0
    nd_dates = sorted(_rng(seed, _K_DATES, 1).choice(n_dates, n_nd, replace=False).tolist())

    refl = np.empty((n_dates, 4, h, w), np.uint16)
    truth_dn = np.empty((n_dates, 4, h, w), np.uint16)
    scl = np.empty((n_dates, h, w), np.uint8)
    t_cloud = np.empty((n_dates, h, w), bool)
    t_thin = np.empty((n_dates, h, w), bool)
    t_shadow = np.empty((n_dates, h, w), bool)
    cover = np.empty(n_dates, np.float32)

    def scene(t: int) -> None:
        az, zen = float(cal["azimuth"][t]), float(cal["zenith"][t])
        shift = _shift_px(float(cal["height"][t]), az, zen, pixel_size)
        shift = (int(np.clip(shift[0], -pad, pad)), int(np.clip(shift[1], -pad, pad)))
        surf = _surface(land, seed, t, cal["dates"][t], az, zen)
        truth_dn[t] = np.clip(np.rint(surf * SCALE), 1, 65535)
        atm = _atmosphere(land, oro, pers, seed, t, float(cal["cover"][t]), shift)
        obs = _observe(surf, atm)
        s = _scl(
            obs, atm.thin, atm.high_cirrus, atm.around, az, zen, pixel_size, _rng(seed, _K_SCL, t)
        )
        cloud = atm.thick_mask | atm.thin_mask
        thin = atm.thin_mask & ~atm.thick_mask
        # A shadow counts when it darkens NIR by >= 10 %; under a cloud it is the cloud's pixel.
        shadow = (atm.depth * atm.shadow >= 0.10) & ~cloud
        dn = np.rint(obs * SCALE)
        np.clip(dn, 1, 65535, out=dn)
        n_valid = h * w
        if t in nd_dates:
            valid = _nodata(_rng(seed, _K_DATES, 2, t), h, w, stripe=t == nd_dates[-1])
            dn[:, ~valid] = 0
            s[~valid] = SCL_NODATA
            cloud &= valid
            thin &= valid
            shadow &= valid
            n_valid = max(int(valid.sum()), 1)
        refl[t] = dn
        scl[t] = s
        t_cloud[t] = cloud
        t_thin[t] = thin
        t_shadow[t] = shadow
        cover[t] = 100.0 * cloud.sum() / n_valid

    def scene_done(t: int) -> None:
        scene(t)
        if progress:
            progress()

    _parallel(scene_done, range(n_dates), workers)
    truth = _percentile_time(truth_dn, PERCENTILE, workers)
    return SyntheticCell(
        reflectance=refl,
        scl=scl,
        dem=land.dem_padded[pad : pad + h, pad : pad + w].copy(),
        dates=list(cal["dates"]),
        cloud_cover=cover,
        truth_composite=truth,
        truth_cloud=t_cloud,
        truth_shadow=t_shadow,
        sun_azimuth=cal["azimuth"],
        sun_zenith=cal["zenith"],
        truth_thin_cloud=t_thin,
        cloud_height=cal["height"],
        land_cover=land.land_cover,
        pixel_size=float(pixel_size),
        seed=seed,
        _land=land,
    )


def _parallel(fn: Callable[[int], None], items: Iterable[int], workers: int | None) -> None:
    n = workers or min(2, os.cpu_count() or 1)
    if n <= 1:
        for i in items:
            fn(i)
        return
    with ThreadPoolExecutor(n) as ex:
        for f in [ex.submit(fn, i) for i in items]:
            f.result()  # re-raise the first error


def _percentile_time(
    stack: np.ndarray, q: float, workers: int | None = None, rows: int = 32
) -> np.ndarray:
    """np.percentile(stack, q, axis=0) ('linear') of a (T, B, H, W) uint16 stack, in row
    blocks so temporaries stay small."""
    n = stack.shape[0]
    pos = q / 100 * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = np.float32(pos - lo)
    out = np.empty(stack.shape[1:], np.float32)

    def block(r: int) -> None:
        # Time last and contiguous: partitioning many short contiguous rows is ~3x faster.
        blk = np.ascontiguousarray(np.moveaxis(stack[:, :, r : r + rows], 0, -1))
        blk.partition(sorted({lo, hi}), axis=-1)
        a, b = blk[..., lo].astype(np.float32), blk[..., hi].astype(np.float32)
        out[:, r : r + rows] = a + (b - a) * frac

    _parallel(block, range(0, stack.shape[2], rows), workers)
    return out


# --------------------------------------------------------------------------- evaluation helpers


def residual_fractions(
    composite: np.ndarray, truth_composite: np.ndarray, cloud_dn: float = 300.0
) -> tuple[float, float]:
    """(residual cloud, residual shadow) fractions of a (4, H, W) DN composite against the truth:
    cloud = B02 brighter by more than ``cloud_dn``; shadow = B08 darker by more than 25 % (and
    300 DN) without being cloud-bright. NaN pixels are left out."""
    ok = np.isfinite(composite).all(axis=0)
    bright = composite[0] - truth_composite[0] > cloud_dn
    drop = truth_composite[3] - composite[3]
    dark = (drop > np.maximum(0.25 * truth_composite[3], 300.0)) & ~bright
    n = max(int(ok.sum()), 1)
    return float((bright & ok).sum() / n), float((dark & ok).sum() / n)


def scl_scores(cell: SyntheticCell) -> dict[str, float]:
    """Precision / recall / F1 of SCL cloud (8, 9, 10) and shadow (3) vs the truth, over valid
    pixels of all dates."""
    valid = cell.valid
    out: dict[str, float] = {}
    for name, pred, true in (
        ("cloud", np.isin(cell.scl, SCL_CLOUD_CLASSES), cell.truth_cloud),
        ("shadow", cell.scl == SCL_SHADOW, cell.truth_shadow),
    ):
        tp = float((pred & true & valid).sum())
        fp = float((pred & ~true & valid).sum())
        fn = float((~pred & true & valid).sum())
        prec = tp / max(tp + fp, 1.0)
        rec = tp / max(tp + fn, 1.0)
        out[f"{name}_precision"] = prec
        out[f"{name}_recall"] = rec
        out[f"{name}_f1"] = 2 * prec * rec / max(prec + rec, 1e-12)
    return out
