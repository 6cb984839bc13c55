"""Procedural clear-sky surfaces for the cloud model: the land covers of the world, not one cell's.

Real clear looks at hand cover a forest, a desert and a semi-arid plain; real scenes also hold
field mosaics (green, ripe, ploughed, stubble), cities, water, bright soils and rock, and terrain
shading. Each surface here draws a biome, a cadastre of parcels (jittered Voronoi), forest and
water bodies from fractal fields, towns of roof materials, roads, and shading by a fractal DEM
under a random sun, with spectra (B02, B03, B04, B08 surface reflectance) from ranges typical of
each cover. No clouds: :mod:`compositor.masks.cloudsim` adds the sky.
"""

from __future__ import annotations

import math

import numpy as np

from compositor.synthetic import _noise, _voronoi

# (B02, B03, B04, B08) surface reflectance ranges: (low, high) per band.
SPECTRA: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "green_crop": ((0.022, 0.05, 0.02, 0.30), (0.045, 0.095, 0.055, 0.55)),
    "ripe_crop": ((0.05, 0.08, 0.10, 0.22), (0.09, 0.125, 0.17, 0.33)),
    "stubble": ((0.07, 0.10, 0.13, 0.20), (0.12, 0.155, 0.20, 0.30)),
    "soil_dark": ((0.035, 0.05, 0.065, 0.09), (0.065, 0.085, 0.11, 0.17)),
    "soil": ((0.06, 0.09, 0.12, 0.16), (0.10, 0.135, 0.19, 0.26)),
    "soil_bright": ((0.11, 0.15, 0.19, 0.24), (0.19, 0.24, 0.30, 0.36)),
    "soil_red": ((0.045, 0.075, 0.13, 0.18), (0.08, 0.115, 0.21, 0.29)),
    "grass": ((0.025, 0.055, 0.035, 0.24), (0.05, 0.09, 0.07, 0.42)),
    "dry_grass": ((0.05, 0.075, 0.09, 0.18), (0.085, 0.115, 0.14, 0.29)),
    "broadleaf": ((0.015, 0.035, 0.015, 0.26), (0.035, 0.065, 0.04, 0.42)),
    "conifer": ((0.01, 0.025, 0.012, 0.13), (0.03, 0.05, 0.032, 0.26)),
    "shrub": ((0.05, 0.07, 0.085, 0.16), (0.09, 0.115, 0.145, 0.26)),
    "sand": ((0.14, 0.2, 0.27, 0.33), (0.26, 0.33, 0.43, 0.50)),
    "rock_dark": ((0.04, 0.05, 0.06, 0.08), (0.08, 0.095, 0.11, 0.15)),
    "rock_light": ((0.13, 0.16, 0.18, 0.21), (0.26, 0.29, 0.31, 0.35)),
    "water": ((0.02, 0.025, 0.008, 0.003), (0.06, 0.065, 0.035, 0.025)),
    "water_turbid": ((0.04, 0.06, 0.05, 0.015), (0.09, 0.11, 0.11, 0.06)),
    "concrete": ((0.09, 0.10, 0.11, 0.13), (0.17, 0.18, 0.19, 0.24)),
    "asphalt": ((0.04, 0.05, 0.055, 0.07), (0.075, 0.085, 0.095, 0.13)),
    "roof_red": ((0.05, 0.06, 0.11, 0.17), (0.09, 0.10, 0.19, 0.27)),
    "roof_bright": ((0.22, 0.24, 0.25, 0.27), (0.45, 0.47, 0.48, 0.50)),
}

# Parcel covers per biome with their weights.
BIOMES: dict[str, dict[str, float]] = {
    "temperate_farmland": {
        "green_crop": 0.34,
        "ripe_crop": 0.14,
        "stubble": 0.1,
        "soil": 0.12,
        "soil_dark": 0.08,
        "grass": 0.14,
        "broadleaf": 0.05,
        "soil_bright": 0.03,
    },
    "mediterranean": {
        "dry_grass": 0.22,
        "ripe_crop": 0.12,
        "stubble": 0.12,
        "soil_bright": 0.14,
        "soil_red": 0.1,
        "shrub": 0.14,
        "green_crop": 0.1,
        "rock_light": 0.06,
    },
    "semi_arid": {
        "soil_bright": 0.25,
        "soil_red": 0.15,
        "shrub": 0.25,
        "dry_grass": 0.2,
        "sand": 0.1,
        "green_crop": 0.05,
    },
    "desert": {"sand": 0.45, "rock_dark": 0.15, "rock_light": 0.2, "soil_bright": 0.2},
    "forest_mosaic": {
        "broadleaf": 0.3,
        "conifer": 0.3,
        "grass": 0.2,
        "green_crop": 0.1,
        "soil_dark": 0.1,
    },
    "tropical": {
        "broadleaf": 0.45,
        "green_crop": 0.2,
        "soil_red": 0.15,
        "grass": 0.15,
        "water_turbid": 0.05,
    },
}
BIOME_P = {
    "temperate_farmland": 0.32,
    "mediterranean": 0.14,
    "semi_arid": 0.12,
    "desert": 0.08,
    "forest_mosaic": 0.18,
    "tropical": 0.16,
}


def _draw(rng: np.random.Generator, name: str, n: int = 1) -> np.ndarray:
    """(n, 4) spectra of cover ``name``: one draw along the range (bands move together, as
    brightness and moisture do) plus a little per-band freedom."""
    lo, hi = (np.asarray(v, np.float32) for v in SPECTRA[name])
    t = rng.uniform(0, 1, (n, 1)) * 0.8 + rng.uniform(0, 1, (n, 4)) * 0.2
    return (lo + (hi - lo) * t).astype(np.float32)


def make_surface(seed: int, size: int = 512, pixel_size: float = 10.0) -> np.ndarray:
    """A clear surface: float32 (4, size, size) reflectance of B02, B03, B04, B08."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(77,)))
    h = w = size
    names = list(BIOME_P)
    biome = names[rng.choice(len(names), p=np.array([BIOME_P[k] for k in names]))]
    covers = BIOMES[biome]
    cnames = list(covers)
    cp = np.array([covers[k] for k in cnames])
    cp = cp / cp.sum()

    # Parcels: a rotated cadastre, field sizes from allotments to large estates.
    fy, fx = (rng.uniform(60, 600, 2) / pixel_size).clip(2, None)
    parcel = _voronoi(rng, (h, w), (fy, fx), rng.uniform(0, math.pi))
    n_par = int(parcel.max()) + 1
    kind = rng.choice(len(cnames), n_par, p=cp)
    spec = np.empty((n_par, 4), np.float32)
    for k, name in enumerate(cnames):
        m = kind == k
        if m.any():
            spec[m] = _draw(rng, name, int(m.sum()))
    x = spec[parcel].transpose(2, 0, 1).copy()

    # Within-field texture: moisture / vigour patches, and crop rows on some fields.
    tex = 1 + rng.uniform(0.03, 0.12) * _noise(rng, (h, w), 150 / pixel_size, 2.6)
    fine = 1 + rng.uniform(0.0, 0.08) * _noise(rng, (h, w), 20 / pixel_size, 1.8)
    x *= (tex * fine)[None]
    if pixel_size <= 20 and rng.random() < 0.5:
        ang = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        rows = np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * 2 * math.pi / rng.uniform(2, 4))
        striped = rng.random(n_par) < 0.3
        x *= 1 + 0.06 * rows[None] * striped[parcel][None]

    # Forest bodies with natural edges (override parcels), in most biomes.
    if biome not in ("desert",) and rng.random() < 0.8:
        f = _noise(rng, (h, w), rng.uniform(800, 4000) / pixel_size, 3.2)
        forest = f > np.quantile(f, 1 - rng.uniform(0.05, 0.5))
        fspec = _draw(rng, "conifer" if rng.random() < 0.4 else "broadleaf", 1)[0]
        crowns = 1 + 0.15 * _noise(rng, (h, w), 15 / pixel_size, 1.6)
        x[:, forest] = (fspec[:, None] * crowns[forest][None]).astype(np.float32)

    # Water: a lake or a river, sometimes turbid.
    if rng.random() < 0.45:
        wf = _noise(rng, (h, w), rng.uniform(500, 3000) / pixel_size, 3.6)
        water = wf > np.quantile(wf, 1 - rng.uniform(0.01, 0.2))
        if rng.random() < 0.5:  # a river: a thin band along a noise contour
            rv = np.abs(_noise(rng, (h, w), rng.uniform(2000, 8000) / pixel_size, 3.8))
            water = rv < rng.uniform(0.01, 0.05)
        wspec = _draw(rng, "water_turbid" if rng.random() < 0.35 else "water", 1)[0]
        x[:, water] = wspec[:, None] * (1 + 0.05 * _noise(rng, (h, w), 50 / pixel_size)[water])

    # Built-up: a town of blocks of roof materials, with streets and trees.
    if rng.random() < (0.7 if biome != "desert" else 0.3):
        tf = _noise(rng, (h, w), rng.uniform(500, 3000) / pixel_size, 3.4)
        town = tf > np.quantile(tf, 1 - rng.uniform(0.02, 0.35))
        blocks = _voronoi(rng, (h, w), (rng.uniform(20, 80) / pixel_size,) * 2, rng.uniform(0, 3))
        nb = int(blocks.max()) + 1
        mats = ["concrete", "asphalt", "roof_red", "roof_bright", "grass", "broadleaf"]
        mp = np.array([0.33, 0.16, 0.23, 0.03, 0.12, 0.13])
        if rng.random() < 0.5:  # towns differ: tiled roofs or concrete and metal
            mp = np.array([0.42, 0.2, 0.06, 0.07, 0.12, 0.13])
        bk = rng.choice(len(mats), nb, p=mp / mp.sum())
        bspec = np.empty((nb, 4), np.float32)
        for k, name in enumerate(mats):
            m = bk == k
            if m.any():
                bspec[m] = _draw(rng, name, int(m.sum()))
        x[:, town] = bspec[blocks[town]].T

    # Roads: a few straight lines, sub-pixel wide as a cover fraction.
    for _ in range(rng.integers(0, 4)):
        ang = rng.uniform(0, math.pi)
        c0 = rng.uniform(0, h), rng.uniform(0, w)
        yy, xx = np.ogrid[0:h, 0:w]
        d = np.abs(-(xx - c0[1]) * math.sin(ang) + (yy - c0[0]) * math.cos(ang)) * pixel_size
        frac = np.clip((rng.uniform(4, 15) - d) / pixel_size + 0.5, 0, 1).astype(np.float32)
        road = _draw(rng, "asphalt" if rng.random() < 0.6 else "concrete", 1)[0]
        x = x * (1 - frac[None]) + road[:, None, None] * frac[None]

    # Terrain shading: a fractal DEM scaled to a typical slope, lit by a random sun (direct
    # light ~0.8 of the total): dark slopes that are not cloud shadow.
    slope_deg = rng.choice([0.0, 2.0, 6.0, 14.0], p=[0.3, 0.3, 0.25, 0.15])
    if slope_deg > 0:
        dem = _noise(rng, (h, w), rng.uniform(2000, 10000) / pixel_size, 4.2)
        dzy, dzx = np.gradient(dem, pixel_size)
        k = math.tan(math.radians(slope_deg)) / (np.sqrt(np.mean(dzx**2 + dzy**2)) + 1e-12)
        dzy, dzx = dzy * k, dzx * k
        zen, az = math.radians(rng.uniform(20, 70)), rng.uniform(0, 2 * math.pi)
        sun = np.array([math.sin(zen) * math.sin(az), math.sin(zen) * math.cos(az), math.cos(zen)])
        nrm = np.sqrt(dzx**2 + dzy**2 + 1)
        cos_i = (-dzx * sun[0] + dzy * sun[1] + sun[2]) / nrm
        light = 0.2 + 0.8 * np.clip(cos_i, 0, None) / math.cos(zen)
        x *= np.clip(light, 0.1, 1.8)[None].astype(np.float32)
    return np.clip(x, 0.001, 1.2).astype(np.float32)
