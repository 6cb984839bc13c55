"""What the cloud model learns from: clear surfaces (clouds are added by :mod:`cloudsim`) and
labelled scenes (real clouds with Sen2Cor's SCL, synthetic cells with their truth, users' stacks).

A :class:`Bank` holds both in memory. The parts that need this project's readers (stacks, the
real samples in ``../shared/data``) are exported once to an ``.npz`` (:func:`export_real`), so a
training run elsewhere (a GPU machine with only numpy and torch) needs that file and this code.

Real surfaces: the clear dates of the Romania cube (forest, snow-free; its held-out dates left
out), the clear dates of the wright stack (bright semi-arid soil) and the western half of 29RKH
(desert at 100 m; SCL clouds and shadows cut out). Never: T31TDH, the wright ``clear`` scene, the
eo-learn reference scenes, Luxembourg, the eastern half of 29RKH (the evaluation samples).
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compositor.masks.scl import IGNORE, scl_to_labels, truth_to_labels

log = logging.getLogger(__name__)

DN_SCALE = 10000.0
NODATA = 0
BANK_FORMAT = "clearsky-maskbank/1"
# Seeds the benchmark (0, the demo cell) and the tests (7) evaluate on: never trained on.
EVAL_SEEDS = (0, 7)
# SCL classes that are trusted as clear surface (vegetation, bare soil, water); snow (11),
# dark area (2) and unclassified (7) are not used as clear surfaces.
SCL_SURFACE = (4, 5, 6)


@dataclass
class Surface:
    """A clear surface: clouds are rendered over random crops of it."""

    name: str
    x: np.ndarray  # float16 (4, H, W) reflectance 0..1 of B02, B03, B04, B08; NaN = unusable
    pixel_size: float  # metres
    group: str  # "real", "procedural" or "synthetic": sampling shares are per group


@dataclass
class Labelled:
    """Scenes with per-pixel labels (real clouds), split by whole dates into train and val."""

    name: str
    kind: str  # "truth" or "scl"
    pixel_size: float
    train_x: np.ndarray  # uint16 (T, 4, H, W) DN
    train_y: np.ndarray  # uint8 (T, H, W) labels (IGNORE where unknown)
    val_x: np.ndarray
    val_y: np.ndarray
    val_dates: list[str] = field(default_factory=list)


@dataclass
class Bank:
    surfaces: list[Surface]
    labelled: list[Labelled]
    described: list[dict[str, Any]]


# --------------------------------------------------------------------------- pooling


def pool_mean(refl: np.ndarray) -> np.ndarray:
    """2x2 mean of valid (non-zero) DN; nodata only where all four are nodata."""
    h, w = refl.shape[-2:]
    a = np.pad(refl, [(0, 0)] * (refl.ndim - 2) + [(0, h % 2), (0, w % 2)]).astype(np.uint32)
    v = (a != NODATA).astype(np.uint32)
    s = a[..., ::2, ::2] + a[..., 1::2, ::2] + a[..., ::2, 1::2] + a[..., 1::2, 1::2]
    n = v[..., ::2, ::2] + v[..., 1::2, ::2] + v[..., ::2, 1::2] + v[..., 1::2, 1::2]
    return ((s + np.maximum(n, 1) // 2) // np.maximum(n, 1)).astype(np.uint16)


def pool_any(a: np.ndarray) -> np.ndarray:
    """2x2 OR-pool of booleans (coarse pixels keep every cloud, like the stack's masks)."""
    h, w = a.shape[-2:]
    p = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, h % 2), (0, w % 2)])
    return p[..., ::2, ::2] | p[..., 1::2, ::2] | p[..., ::2, 1::2] | p[..., 1::2, 1::2]


def heldout(ident: str, n: int, seed: int, fraction: float) -> np.ndarray:
    """bool (n,): dates held out for validation, a seeded choice keyed by what the data is."""
    rng = np.random.default_rng([seed, zlib.crc32(ident.encode())])
    n_val = min(max(1, round(fraction * n)), n - 1)
    is_val = np.zeros(n, bool)
    is_val[rng.choice(n, n_val, replace=False)] = True
    return is_val


def _split(
    name: str, kind: str, px: float, x: np.ndarray, y: np.ndarray, is_val: np.ndarray, dates
) -> Labelled:
    return Labelled(
        name,
        kind,
        px,
        np.ascontiguousarray(x[~is_val]),
        np.ascontiguousarray(y[~is_val]),
        np.ascontiguousarray(x[is_val]),
        np.ascontiguousarray(y[is_val]),
        [str(d) for d, v in zip(dates, is_val, strict=True) if v],
    )


# --------------------------------------------------------------------------- real data export


def export_real(
    out: str | Path,
    workdir: str | Path,
    seed: int = 0,
    val_fraction: float = 0.15,
    root: str | Path | None = None,
) -> Path:
    """Write the real training data to ``out`` (.npz): the Romania cube (on the 34TER grid, as
    the demo builds it) with SCL labels and its clear dates, the wright stack's clear dates and
    29RKH's western half."""
    from compositor.demo import build_real
    from compositor.masks import samples
    from compositor.stack import Stack

    root = Path(root) if root else samples.shared_data_dir()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "34TER.zarr"
    from compositor.demo import _complete

    if not (path.exists() and _complete(path)):
        import os

        # The cube is in ../shared/data too; else the demo fetches it from PyPI (nrt==0.2.1).
        nc = root / "nrt-romania" / "sentinel2_cube_subset_romania_10m.nc"
        if nc.is_file() and not os.environ.get("CLEARSKY_ROMANIA_NC"):
            os.environ["CLEARSKY_ROMANIA_NC"] = str(nc)
        path = build_real(work, work / ".cache")
    stack = Stack.open(path)
    idx = stack.complete_indices()
    data = stack.read(0, (0, 0, stack.height, stack.width), idx, ("reflectance", "scl"))
    ident = f"{stack.cell_id}:{stack.meta.get('seed')}:{stack.width}x{stack.height}"
    arrays: dict[str, np.ndarray] = {
        "romania_x": data["reflectance"][:, [stack.bands.index(b) for b in samples.MODEL_BANDS]],
        "romania_scl": data["scl"],
        "romania_dates": np.array([stack.scenes[i].datetime[:10] for i in idx]),
        "romania_val": heldout(ident, len(idx), seed, val_fraction),
        "wright": samples.wright_stack(root)[list(samples.WRIGHT_CLEAR_DATES)].astype(np.float16),
    }
    rkh = samples.rkh29(root, "train")
    from scipy import ndimage

    bad = ndimage.binary_dilation(np.isin(rkh.scl, (3, 8, 9, 10)), iterations=3)
    x = rkh.bands.copy()
    x[:, bad] = np.nan
    arrays["rkh"] = x.astype(np.float16)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, format=np.array(BANK_FORMAT), **arrays)
    tmp.replace(out)
    return out


def load_real(
    path: str | Path, levels: Sequence[int] = (0, 1, 2)
) -> tuple[list[Surface], list[Labelled], list[dict[str, Any]]]:
    """Surfaces and labelled scenes from an :func:`export_real` file."""
    z = np.load(path)
    if str(z["format"]) != BANK_FORMAT:
        raise ValueError(f"{path}: not a {BANK_FORMAT} file")
    x, scl, dates, is_val = z["romania_x"], z["romania_scl"], z["romania_dates"], z["romania_val"]
    labelled = []
    y0 = scl_to_labels(scl)
    y0[(x[:, 0] == NODATA) | (scl == 0)] = IGNORE
    for lv in levels:
        xl, sl = x, scl
        for _ in range(lv):
            xl = pool_mean(xl)
            sl = _pool_scl(sl)
        y = scl_to_labels(sl)
        y[(xl[:, 0] == NODATA) | (sl == 0)] = IGNORE
        labelled.append(_split(f"romania/L{lv}", "scl", 10.0 * 2**lv, xl, y, is_val, dates))
    # Clear looks: >= 99 % of the valid pixels vegetation / soil / water, not held out.
    valid = scl > 0
    surf_share = np.isin(scl, SCL_SURFACE).sum(axis=(1, 2)) / np.maximum(valid.sum(axis=(1, 2)), 1)
    clear = np.nonzero((surf_share >= 0.99) & ~is_val & (valid.mean(axis=(1, 2)) > 0.5))[0]
    surfaces = []
    for t in clear:
        s = x[t].astype(np.float32) / DN_SCALE
        s[:, x[t, 0] == NODATA] = np.nan
        surfaces.append(Surface(f"romania/{dates[t]}", s.astype(np.float16), 10.0, "real"))
    for i, s in enumerate(z["wright"]):
        surfaces.append(Surface(f"wright/{i}", s, 10.0, "real"))
    surfaces.append(Surface("29rkh-west", z["rkh"], 100.0, "real"))
    described = [
        {
            "name": "romania",
            "kind": "real",
            "labels": "scl",
            "source": "PyPI nrt==0.2.1 Romania cube on the 34TER grid (EU JRC, EUPL-1.2)",
            "scenes": int(len(dates)),
            "val_dates": [str(d) for d in dates[is_val]],
            "clear_surfaces": int(len(clear)),
        },
        {
            "name": "wright",
            "kind": "real",
            "labels": "clouds simulated",
            "source": "s2cloudmask tests (Apache-2.0), clear dates of the stack",
            "surfaces": int(len(z["wright"])),
        },
        {
            "name": "29rkh-west",
            "kind": "real",
            "labels": "clouds simulated",
            "source": "rio-tiler-pds fixture (BSD-3), 29RKH western half at 100 m",
        },
    ]
    return surfaces, labelled, described


_SCL_PRIORITY = np.zeros(256, np.int8)
_SCL_PRIORITY[[2, 4, 5, 6, 7, 11]] = 1
_SCL_PRIORITY[3] = 2
_SCL_PRIORITY[[8, 9, 10]] = 3


def _pool_scl(scl: np.ndarray) -> np.ndarray:
    """2x2 merge of (T, H, W) SCL by priority (cloud > shadow > surface > nodata)."""
    h, w = scl.shape[-2:]
    a = np.pad(scl, [(0, 0), (0, h % 2), (0, w % 2)])
    blocks = np.stack([a[:, ::2, ::2], a[:, 1::2, ::2], a[:, ::2, 1::2], a[:, 1::2, 1::2]])
    pick = np.argmax(_SCL_PRIORITY[blocks], axis=0)
    return np.take_along_axis(blocks, pick[None], axis=0)[0]


# --------------------------------------------------------------------------- generated data


def _synthetic_cell(
    args: tuple[int, int, int, tuple[int, ...], int, float],
) -> tuple[list[Labelled], list[Surface], dict[str, Any]]:
    from compositor.synthetic import make_synthetic, surface_at

    seed, size, n_dates, levels, split_seed, val_fraction = args
    syn = make_synthetic(seed=seed, size=size, n_dates=n_dates, workers=1)
    is_val = heldout(f"49NDB:{seed}:{size}x{size}", n_dates, split_seed, val_fraction)
    dates = [d.isoformat() for d in syn.dates]
    labelled = []
    refl, cloud, shadow = syn.reflectance, syn.truth_cloud, syn.truth_shadow
    nodata = syn.scl == 0
    for lv in range(max(levels) + 1):
        if lv in levels:
            y = truth_to_labels(cloud, shadow)
            y[nodata | (refl[:, 0] == NODATA)] = IGNORE
            labelled.append(
                _split(f"synthetic-{seed}/L{lv}", "truth", 10.0 * 2**lv, refl, y, is_val, dates)
            )
        refl, cloud, shadow, nodata = (
            pool_mean(refl),
            pool_any(cloud),
            pool_any(shadow),
            ~pool_any(~nodata),
        )
    # Two clear surfaces per cell (dates not held out): its landscape under simulated skies.
    rng = np.random.default_rng(seed)
    picks = rng.choice(np.nonzero(~is_val)[0], 2, replace=False)
    surfaces = [
        Surface(
            f"synthetic-{seed}/{dates[t]}",
            surface_at(syn, int(t)).astype(np.float16),
            10.0,
            "synthetic",
        )
        for t in picks
    ]
    desc = {
        "name": f"synthetic-{seed}",
        "kind": "synthetic",
        "labels": "truth",
        "source": f"synthetic (compositor.synthetic, seed={seed})",
        "size": [size, size],
        "scenes": n_dates,
        "val_dates": [d for d, v in zip(dates, is_val, strict=True) if v],
    }
    return labelled, surfaces, desc


# (size px, pixel size m) of the procedural surfaces, cycled over seeds: most at 10-20 m, some
# coarse with a large extent for 60 m-1 km inputs.
PROCEDURAL_SHAPES = ((512, 10.0), (512, 10.0), (384, 20.0), (256, 60.0), (256, 200.0))


def _procedural(seed: int) -> Surface:
    from compositor.masks.landscape import make_surface

    size, px = PROCEDURAL_SHAPES[seed % len(PROCEDURAL_SHAPES)]
    return Surface(
        f"procedural-{seed}", make_surface(seed, size, px).astype(np.float16), px, "procedural"
    )


def _pool(workers: int | None):
    import multiprocessing as mp
    import os

    n = workers or os.cpu_count() or 1
    return ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"))


def build_bank(
    real: str | Path | None = None,
    synthetic_seeds: Sequence[int] = (),
    synthetic_size: int = 512,
    synthetic_dates: int = 32,
    procedural: int = 0,
    stacks: Sequence[str | Path] = (),
    levels: Sequence[int] = (0, 1, 2),
    seed: int = 0,
    val_fraction: float = 0.15,
    workers: int | None = None,
) -> Bank:
    """Everything a training run samples from, generated in parallel processes."""
    surfaces: list[Surface] = []
    labelled: list[Labelled] = []
    described: list[dict[str, Any]] = []
    bad = sorted(set(synthetic_seeds) & set(EVAL_SEEDS))
    if bad:
        log.warning("training on synthetic seeds %s that the benchmark/tests evaluate on", bad)
    if real:
        s, lab, d = load_real(real, levels)
        surfaces += s
        labelled += lab
        described += d
    jobs = [
        (s, synthetic_size, synthetic_dates, tuple(levels), seed, val_fraction)
        for s in synthetic_seeds
    ]
    if jobs or procedural:
        with _pool(workers) as ex:
            proc = list(ex.map(_procedural, range(procedural)))
            for lab, surf, desc in ex.map(_synthetic_cell, jobs):
                labelled += lab
                surfaces += surf
                described.append(desc)
        surfaces += proc
        if procedural:
            described.append(
                {
                    "name": "procedural",
                    "kind": "procedural",
                    "labels": "clouds simulated",
                    "surfaces": procedural,
                    "source": f"compositor.masks.landscape seeds 0..{procedural - 1}",
                }
            )
    for p in stacks:
        lab, desc = stack_labelled(p, levels, seed, val_fraction)
        labelled += lab
        described.append(desc)
    if not surfaces and not labelled:
        raise ValueError("no training data: no surfaces and no labelled scenes")
    return Bank(surfaces, labelled, described)


def stack_labelled(
    path: str | Path, levels: Sequence[int], seed: int, val_fraction: float
) -> tuple[list[Labelled], dict[str, Any]]:
    """A user's stack (e.g. a prefetched cell) as labelled scenes: its SCL, or the synthetic
    truth where the stack has one."""
    from compositor.demo import read_truth
    from compositor.masks.model import BANDS
    from compositor.stack import Stack, StackError, downsample_reflectance, downsample_scl

    path = Path(path)
    stack = Stack.open(path)
    idx = stack.complete_indices()
    if len(idx) < 2:
        raise StackError(f"stack {path} has {len(idx)} complete scenes; need >= 2 to hold out")
    missing = [b for b in BANDS if b not in stack.bands]
    if missing:
        raise StackError(f"stack {path} lacks bands {missing} the cloud model needs")
    has_truth = (path / "truth").is_dir()
    ident = f"{stack.cell_id}:{stack.meta.get('seed')}:{stack.width}x{stack.height}"
    is_val = heldout(ident, len(idx), seed, val_fraction)
    band_idx = [stack.bands.index(b) for b in BANDS]
    dates = [stack.scenes[i].datetime[:10] for i in idx]
    out = []
    truth = read_truth(path) if has_truth else None
    for lv in levels:
        top = min(lv, len(stack.levels) - 1)
        L = stack.levels[top]
        d = stack.read(top, (0, 0, L.height, L.width), idx, ("reflectance", "scl"))
        refl, scl = d["reflectance"], d["scl"]
        for _ in range(lv - top):
            refl = downsample_reflectance(refl, stack.nodata)
            scl = np.stack([downsample_scl(s) for s in scl])
        x = refl[:, band_idx]
        if truth is not None:
            c, s = truth["cloud"][idx], truth["shadow"][idx]
            for _ in range(lv):
                c, s = pool_any(c), pool_any(s)
            y = truth_to_labels(c, s)
        else:
            y = scl_to_labels(scl)
        y[(x[:, 0] == stack.nodata) | (scl == 0)] = IGNORE
        px = float(stack.levels[0].resolution) * 2**lv
        out.append(
            _split(f"{path.name}/L{lv}", "truth" if has_truth else "scl", px, x, y, is_val, dates)
        )
    desc = {
        "name": path.name,
        "stack": str(path),
        "cell": stack.cell_id,
        "kind": stack.meta.get("kind"),
        "source": stack.meta.get("source"),
        "labels": "truth" if has_truth else "scl",
        "scenes": int(len(idx)),
        "val_dates": [d for d, v in zip(dates, is_val, strict=True) if v],
    }
    return out, desc


def bank_digest(bank: Bank) -> str:
    """A short id of the data (names and shapes), checked when a run resumes."""
    h = hashlib.sha256()
    for s in bank.surfaces:
        h.update(f"{s.name}:{s.x.shape}:{s.pixel_size}".encode())
    for lab in bank.labelled:
        h.update(f"{lab.name}:{lab.train_x.shape}:{lab.val_x.shape}".encode())
    return h.hexdigest()[:16]
