"""Real Sentinel-2 samples (``../shared/data``) as the cloud model sees them: B02, B03, B04, B08
reflectance 0..1, NaN where there is no data.

Each sample records its processing level (L1C top-of-atmosphere or L2A surface reflectance), its
pixel size, what is known about it (``clear``, ``overcast``, or an ``scl`` reference) and whether
it may be trained on. The evaluation samples (T31TDH, the wright ``clear`` scene, the eo-learn
reference scenes, Luxembourg) are never trained on: they tell whether the model generalises.
29RKH is split: its western half may lend clear desert surfaces to training, its eastern half is
only evaluated.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

L1C_13 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
# Digital Earth Australia order of the wright arrays (the source does not state it).
WRIGHT_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
MODEL_BANDS = ("B02", "B03", "B04", "B08")
# Dates of the wright stack that are clear by eye and by their spectra (blue < 0.15, no bright
# blobs); the overcast and partly cloudy dates are left out of the surface library.
WRIGHT_CLEAR_DATES = (6, 7, 8, 10, 11, 12, 14, 15, 16, 19, 20, 22, 23, 24, 27, 28)
RKH_SPLIT_COL = 549  # 29RKH at 100 m: columns < this may be trained on, the rest only evaluated


def shared_data_dir() -> Path:
    """``$CLEARSKY_SHARED_DATA``, else ``../shared/data`` beside the checkout."""
    env = os.environ.get("CLEARSKY_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass
class RealSample:
    name: str
    title: str
    level: str  # "L1C" (top of atmosphere) or "L2A" (surface reflectance)
    pixel_size: float  # metres (approximate for geographic grids)
    bands: np.ndarray  # float32 (4, H, W) reflectance of B02, B03, B04, B08; NaN = no data
    expect: str  # "clear", "overcast" or "scl" (Sen2Cor's classes as the reference)
    trainable: bool = False
    l1c13: np.ndarray | None = None  # float32 (13, H, W) all L1C bands (s2cloudless baseline)
    scl: np.ndarray | None = None  # uint8 (H, W) on the same grid
    extra: dict = field(default_factory=dict)

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.bands).all(axis=0) & (np.nan_to_num(self.bands) > 0).any(axis=0)


def _read_band(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        return src.read(1)


def _zoom_to(a: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    """Resample a 2-D band onto ``shape`` (an integer factor finer): nearest or bilinear."""
    from scipy import ndimage

    fy, fx = shape[0] / a.shape[0], shape[1] / a.shape[1]
    if order == 0:
        ry = (np.arange(shape[0]) / fy).astype(int)
        rx = (np.arange(shape[1]) / fx).astype(int)
        return a[np.ix_(ry, rx)]
    return ndimage.zoom(a.astype(np.float32), (fy, fx), order=order, mode="nearest", grid_mode=True)


def t31tdh(root: Path) -> RealSample:
    d = root / "s2cloudless-optimized-T31TDH"
    bands = {b: _read_band(next(d.glob(f"*_{b}.jp2"))) for b in L1C_13}
    shape = bands["B02"].shape
    full = np.stack([_zoom_to(bands[b], shape, 1) for b in L1C_13]).astype(np.float32) / 1e4
    x = np.stack([bands[b] for b in MODEL_BANDS]).astype(np.float32) / 1e4
    return RealSample(
        "t31tdh",
        "T31TDH L1C, farmland near Toulouse (clear)",
        "L1C",
        10.0,
        x,
        "clear",
        l1c13=full,
    )


def wright_clear(root: Path) -> RealSample:
    w = np.load(root / "s2cloudmask-wright" / "wright.npz")
    c = w["clear"].astype(np.float32) / 1e4  # (H, W, 10)
    x = np.stack([c[..., WRIGHT_BANDS.index(b)] for b in MODEL_BANDS])
    return RealSample(
        "wright-clear",
        "wright clear, bright semi-arid soil, Australia (surface refl.)",
        "L2A",
        10.0,
        x,
        "clear",
    )


def wright_stack(root: Path) -> np.ndarray:
    """float32 (T, 4, H, W) reflectance of the wright stack's 30 dates (trainable)."""
    w = np.load(root / "s2cloudmask-wright" / "wright.npz")
    s = w["stack"].astype(np.float32) / 1e4  # (H, W, 10, T)
    return np.stack([s[:, :, WRIGHT_BANDS.index(b)] for b in MODEL_BANDS]).transpose(3, 0, 1, 2)


def eolearn(root: Path, i: int) -> RealSample:
    r = np.load(root / "eolearn-testeopatch" / "REFERENCE_SCENES.npy")[i]  # (H, W, 13) TOA
    full = np.ascontiguousarray(r.transpose(2, 0, 1)).astype(np.float32)
    x = np.stack([full[L1C_13.index(b)] for b in MODEL_BANDS])
    expect = "overcast" if i in (0, 1) else "clear"
    return RealSample(
        f"eolearn-{i}",
        f"eo-learn reference scene {i}, L1C, Slovenia ({expect})",
        "L1C",
        10.0,
        x,
        expect,
        l1c13=full,
    )


def luxembourg(root: Path) -> RealSample:
    import rasterio

    with rasterio.open(root / "dem" / "terra_sent2_L2A_2024-08-24_luxembourg.tif") as src:
        a = src.read().astype(np.float32)
        lat = (src.bounds.top + src.bounds.bottom) / 2
        res = src.res
    # Processing baseline 05.x: DN = 10000 x reflectance + 1000 (the offset is not removed in
    # the file: its darkest blue pixel is 1127).
    x = (a - 1000.0) / 1e4
    px = float(np.sqrt(res[0] * 111_320 * np.cos(np.radians(lat)) * res[1] * 110_540))
    return RealSample(
        "luxembourg", "Luxembourg L2A 2024-08-24, ~0.8 km pixels (clear)", "L2A", px, x, "clear"
    )


def rkh29(root: Path, part: str = "all") -> RealSample:
    """The whole 29RKH cell (Sahara) at 100 m with its SCL; ``part`` = all | train | eval."""
    d = root / "s2-29RKH-20200219-cogs"
    x = np.stack([_read_band(d / f"{b}.tif") for b in MODEL_BANDS]).astype(np.float32)
    nodata = (x == 0).all(axis=0)
    x /= 1e4  # processing baseline 02.14: no offset
    x[:, nodata] = np.nan
    scl = _zoom_to(_read_band(d / "SCL.tif"), x.shape[1:], 0).astype(np.uint8)
    sl = {"all": slice(None), "train": slice(0, RKH_SPLIT_COL)}.get(
        part, slice(RKH_SPLIT_COL, None)
    )
    return RealSample(
        "29rkh" if part == "all" else f"29rkh-{part}",
        f"29RKH L2A 2020-02-19, Sahara, whole cell at 100 m ({part})",
        "L2A",
        100.0,
        np.ascontiguousarray(x[:, :, sl]),
        "scl",
        trainable=part == "train",
        scl=np.ascontiguousarray(scl[:, sl]),
    )


EVAL_NAMES = (
    "t31tdh",
    "wright-clear",
    "eolearn-2",
    "eolearn-3",
    "eolearn-4",
    "luxembourg",
    "eolearn-0",
    "eolearn-1",
    "29rkh",
    "29rkh-eval",
)


def load(name: str, root: Path | None = None) -> RealSample:
    root = root or shared_data_dir()
    if name.startswith("eolearn-"):
        return eolearn(root, int(name.split("-")[1]))
    if name.startswith("29rkh"):
        return rkh29(root, name.split("-")[1] if "-" in name else "all")
    return {"t31tdh": t31tdh, "wright-clear": wright_clear, "luxembourg": luxembourg}[name](root)


def evaluation_samples(root: Path | None = None) -> Iterator[RealSample]:
    """Every evaluation sample whose files are present."""
    root = root or shared_data_dir()
    for name in EVAL_NAMES:
        try:
            yield load(name, root)
        except (FileNotFoundError, StopIteration, OSError):
            continue


def downsample(x: np.ndarray, f: int) -> np.ndarray:
    """Mean-pool (C, H, W) reflectance by ``f`` (NaN where any input pixel is NaN)."""
    c, h, w = x.shape
    h2, w2 = h // f, w // f
    return x[:, : h2 * f, : w2 * f].reshape(c, h2, f, w2, f).mean(axis=(2, 4))
