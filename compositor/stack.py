"""The on-disk Stack: every scene of one cell (or a sub-area of it) at several resolution levels.

Layout (Zarr v3 group, one per cell, ``<data_dir>/<CELL>.zarr``)::

    zarr.json                 attrs: cell, epsg, transform, bands, nodata, levels, scenes
    L0/reflectance            (T, B, H, W) uint16, 0 = nodata, chunks (1, B, 256, 256)
    L0/scl                    (T, H, W) uint8 Scene Classification, chunks (1, 256, 256)
    L0/cloudprob              (T, 2, H, W) uint8 cloud / shadow probability x 250, 255 = not set
    L0/dem                    (H, W) float32 metres (NaN = unknown)
    L1/...                    the same at half the resolution, and so on up to one chunk

A chunk holds one scene and a 256 x 256 block, so a tile read at the level that matches its
resolution touches at most four chunks per scene whatever the zoom. Scenes are appended; a
scene is only visible to readers once its ``complete`` flag is set, after all its levels are
written, so an interrupted write never shows half a scene. A scene whose shards turn out to be
damaged (checked by :meth:`Stack.verify`, or found short while reading) is left out from then on,
with one warning naming it.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from affine import Affine
from cachetools import LRUCache
from zarr.codecs import BloscCodec

from compositor.shards import ArrayLayout, ShardDamaged, ShardReader

log = logging.getLogger(__name__)

CHUNK = 256
DEM_CACHE_BYTES = 64 * 2**20  # decoded DEM chunks kept per open stack
NODATA = 0
CLOUDPROB_UNSET = 255
CLOUDPROB_SCALE = 250.0
DEFAULT_BANDS = ("B02", "B03", "B04", "B08")
_COMPRESSORS = [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]

# SCL classes that win when four pixels are merged into one at a coarser level: nodata loses to
# anything, cloud and shadow win over surface so coarse levels never hide a cloud.
_SCL_PRIORITY = np.zeros(256, dtype=np.uint8)
for _rank, _cls in enumerate([0, 1, 7, 2, 4, 5, 6, 11, 3, 10, 8, 9], start=1):
    _SCL_PRIORITY[_cls] = _rank


class StackError(ValueError):
    """A stack that is missing, malformed, or asked for something it does not hold."""


@dataclass
class Scene:
    id: str
    datetime: str  # ISO 8601, UTC
    cloud_cover: float | None = None
    platform: str | None = None
    processing_baseline: str | None = None
    complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def date(self) -> dt.date:
        return dt.datetime.fromisoformat(self.datetime.replace("Z", "+00:00")).date()


@dataclass(frozen=True)
class Level:
    index: int
    factor: int
    width: int
    height: int
    transform: Affine

    @property
    def resolution(self) -> float:
        return self.transform.a


def _levels_for(width: int, height: int, transform: Affine) -> list[Level]:
    levels = []
    factor, w, h, i = 1, width, height, 0
    while True:
        levels.append(Level(i, factor, w, h, transform @ Affine.scale(factor)))
        if max(w, h) <= CHUNK:
            return levels
        factor *= 2
        i += 1
        w, h = -(-width // factor), -(-height // factor)


class Stack:
    """One cell's stack. Open with :meth:`open`, make with :meth:`create`."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self._group = group
        self._lock = threading.Lock()
        attrs = dict(group.attrs)
        self.cell_id: str = attrs["cell"]
        self.epsg: int = int(attrs["epsg"])
        self.transform = Affine(*attrs["transform"][:6])
        self.width: int = int(attrs["width"])
        self.height: int = int(attrs["height"])
        self.bands: tuple[str, ...] = tuple(attrs["bands"])
        self.nodata: int = int(attrs.get("nodata", NODATA))
        self.levels = _levels_for(self.width, self.height, self.transform)
        self.scenes: list[Scene] = [Scene(**s) for s in attrs.get("scenes", [])]
        self.meta: dict[str, Any] = dict(attrs.get("meta", {}))
        self._arrays: dict[str, zarr.Array] = {}
        # Local stores read scene shards with pread (compositor/shards.py); anything else (an
        # object store) goes through zarr-python.
        self._shards = ShardReader(self.path) if self.path.is_dir() else None
        self._layouts: dict[tuple[int, str], ArrayLayout] = {}
        self.damaged: dict[int, str] = {}  # scene index -> why it is left out
        self.warnings: list[str] = []  # what is wrong with this stack, for /cells
        # Decoded DEM chunks (the DEM is compressed; zarr-python takes ~2 ms per chunk): a
        # hillshaded tile needs ~4, and its neighbours mostly the same ones.
        self._dem_chunks: LRUCache = LRUCache(maxsize=DEM_CACHE_BYTES, getsizeof=lambda a: a.nbytes)

    # ---------------------------------------------------------------- create / open
    @classmethod
    def create(
        cls,
        path: str | Path,
        cell_id: str,
        epsg: int,
        transform: Affine,
        width: int,
        height: int,
        bands: Sequence[str] = DEFAULT_BANDS,
        meta: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Stack:
        path = Path(path)
        if path.exists() and not overwrite:
            raise StackError(f"stack {path} already exists")
        group = zarr.open_group(str(path), mode="w" if overwrite else "w-", zarr_format=3)
        group.attrs.update(
            {
                "cell": cell_id,
                "epsg": int(epsg),
                "transform": list(transform)[:6],
                "width": int(width),
                "height": int(height),
                "bands": list(bands),
                "nodata": NODATA,
                "scenes": [],
                "meta": meta or {},
                "format": "clearsky-stack/1",
            }
        )
        nb = len(bands)
        for lv in _levels_for(width, height, transform):
            g = group.create_group(f"L{lv.index}")
            hw = (lv.height, lv.width)
            # One shard = one scene at this level, made of 256 x 256 inner chunks.
            sh = (-(-lv.height // CHUNK) * CHUNK, -(-lv.width // CHUNK) * CHUNK)
            for name, lead, dtype, fill, dims in (
                ("reflectance", (nb,), "uint16", NODATA, ("time", "band", "y", "x")),
                ("scl", (), "uint8", 0, ("time", "y", "x")),
                ("cloudprob", (2,), "uint8", CLOUDPROB_UNSET, ("time", "class", "y", "x")),
            ):
                g.create_array(
                    name,
                    shape=(0, *lead, *hw),
                    chunks=(1, *lead, CHUNK, CHUNK),
                    shards=(1, *lead, *sh),
                    dtype=dtype,
                    fill_value=fill,
                    compressors=None,
                    dimension_names=dims,
                    config={"write_empty_chunks": True},
                )
            g.create_array(
                "dem",
                shape=hw,
                chunks=(min(CHUNK, lv.height), min(CHUNK, lv.width)),
                dtype="float32",
                fill_value=float("nan"),
                compressors=_COMPRESSORS,
                dimension_names=("y", "x"),
            )
        return cls(path, zarr.open_group(str(path), mode="r+"))

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> Stack:
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise StackError(f"no stack at {path}")
        if not (path / "zarr.json").is_file():  # a FIFO or a folder: reading it would hang/fail
            raise StackError(f"stack {path} is malformed: zarr.json is not a regular file")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
            return cls(path, group)
        except Exception as exc:  # any failure to parse what is on disk: a malformed store
            raise StackError(
                f"stack {path} is malformed: {type(exc).__name__}: {str(exc)[:200]}"
            ) from None

    def verify(self) -> list[str]:
        """Check the store before serving it: every array's metadata (StackError if one is
        unreadable or does not fit the stack: the whole cell is unusable), then every complete
        scene's shards (size, index checksum, chunk entries). Scenes with a damaged shard are
        left out, one warning each; returns the warnings."""
        for lv in self.levels:
            for name in ("reflectance", "scl", "cloudprob", "dem"):
                try:
                    if name != "dem":
                        self._layout(lv.index, name)
                    else:
                        self._array(lv.index, name)
                except Exception as exc:
                    raise StackError(
                        f"L{lv.index}/{name}/zarr.json is unreadable or does not fit the stack "
                        f"({type(exc).__name__}: {str(exc)[:120]})"
                    ) from None
        if self._shards is None:
            return list(self.warnings)
        for t, s in enumerate(self.scenes):
            if not s.complete or t in self.damaged:
                continue
            for lv in self.levels:
                why = self._check_scene(lv.index, t)
                if why:
                    self._mark_damaged({t: why})
                    break
        return list(self.warnings)

    def _check_scene(self, level: int, t: int) -> str | None:
        for name in ("reflectance", "scl", "cloudprob"):
            a = self._layout(level, name)
            if name == "cloudprob" and not self._shards.exists(a, t):
                continue  # model masks not written (yet): normal
            try:
                self._shards.check(a, t)
            except ShardDamaged as exc:
                return f"{self._shards.relpath(a, t)} {exc}"
        return None

    def _mark_damaged(self, bad: dict[int, str]) -> None:
        """Leave scenes out from now on, with one warning each (a scene found damaged by
        several reads at once is reported once)."""
        with self._lock:
            new = {t: why for t, why in bad.items() if t not in self.damaged}
            self.damaged.update(new)
            for t, why in new.items():
                msg = f"scene {self.scenes[t].id} ({self.scenes[t].date}) left out: {why}"
                self.warnings.append(msg)
                log.warning("cell %s: %s", self.cell_id, msg)

    def _layout(self, level: int, name: str) -> ArrayLayout:
        """The shard layout of array ``name`` at ``level``, checked against the stack."""
        key = (level, name)
        lay = self._layouts.get(key)
        if lay is None:
            arr = self._array(level, name)
            lv = self.levels[level]
            lead = {"reflectance": (len(self.bands),), "scl": (), "cloudprob": (2,)}[name]
            if tuple(arr.shape[1:]) != (*lead, lv.height, lv.width):
                raise StackError(f"shape {arr.shape} does not fit the level")
            if arr.shape[0] < len(self.scenes):
                raise StackError(f"{arr.shape[0]} scenes in the array, {len(self.scenes)} listed")
            if tuple(arr.chunks[1:]) != (*lead, CHUNK, CHUNK):
                raise StackError(f"chunks {arr.chunks} are not scene x {CHUNK} x {CHUNK}")
            grid = (-(-lv.height // CHUNK), -(-lv.width // CHUNK))
            if arr.shards is None or tuple(arr.shards[-2:]) != (grid[0] * CHUNK, grid[1] * CHUNK):
                raise StackError(f"shards {arr.shards} are not one scene per shard")
            fill = int(arr.fill_value)
            lay = ArrayLayout(name, level, lead, np.dtype(arr.dtype), fill, grid, CHUNK)
            self._layouts[key] = lay
        return lay

    # ---------------------------------------------------------------- geometry
    @property
    def bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        return (t.c, t.f + t.e * self.height, t.c + t.a * self.width, t.f)

    @property
    def resolution(self) -> float:
        return self.transform.a

    def level_for_resolution(self, resolution: float) -> Level:
        """The coarsest level still at least as fine as ``resolution`` (metres per pixel)."""
        best = self.levels[0]
        for lv in self.levels:
            if lv.resolution <= resolution * 1.0001:
                best = lv
        return best

    # ---------------------------------------------------------------- scenes
    def complete_indices(
        self,
        start: dt.date | None = None,
        end: dt.date | None = None,
        months: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Indices of complete (and undamaged) scenes in a date range / set of months, in time
        order."""
        idx = []
        for i, s in enumerate(self.scenes):
            if not s.complete or i in self.damaged:
                continue
            d = s.date
            if start and d < start or end and d > end or months and d.month not in months:
                continue
            idx.append(i)
        return np.asarray(sorted(idx, key=lambda i: self.scenes[i].datetime), dtype=np.int64)

    def scene_index(self, scene_id: str) -> int | None:
        for i, s in enumerate(self.scenes):
            if s.id == scene_id:
                return i
        return None

    def _array(self, level: int, name: str) -> zarr.Array:
        key = f"L{level}/{name}"
        arr = self._arrays.get(key)
        if arr is None:
            arr = self._group[key]
            self._arrays[key] = arr
        return arr

    def _save_scenes(self) -> None:
        self._group.attrs["scenes"] = [asdict(s) for s in self.scenes]

    def set_meta(self, **meta: Any) -> None:
        self.meta.update(meta)
        self._group.attrs["meta"] = self.meta

    def append_scene(self, scene: Scene, reflectance: np.ndarray, scl: np.ndarray) -> int:
        """Write one scene at every level, then mark it complete. Returns its index.

        A scene id already present and complete is left alone (idempotent reruns); one present
        but incomplete (an interrupted write) is overwritten in place.
        """
        nb = len(self.bands)
        if reflectance.shape != (nb, self.height, self.width) or reflectance.dtype != np.uint16:
            raise StackError(
                f"scene {scene.id}: reflectance must be uint16 {(nb, self.height, self.width)}, "
                f"got {reflectance.dtype} {reflectance.shape}"
            )
        if scl.shape != (self.height, self.width):
            raise StackError(f"scene {scene.id}: scl must be {(self.height, self.width)}")
        i, done = self._reserve(scene)
        if done:
            return i
        refl, cls = reflectance, scl.astype(np.uint8, copy=False)
        for lv in self.levels:
            if lv.index > 0:
                refl = downsample_reflectance(refl, self.nodata)
                cls = downsample_scl(cls)
            self._array(lv.index, "reflectance")[i] = refl
            self._array(lv.index, "scl")[i] = cls
        with self._lock:
            self.scenes[i].complete = True
            self._save_scenes()
        return i

    def _reserve(self, scene: Scene) -> tuple[int, bool]:
        """Index for ``scene`` (appending an incomplete entry if new), and whether it is done."""
        with self._lock:
            i = self.scene_index(scene.id)
            if i is not None:
                return i, self.scenes[i].complete
            i = len(self.scenes)
            scene.complete = False
            self.scenes.append(scene)
            for lv in self.levels:
                for name in ("reflectance", "scl", "cloudprob"):
                    arr = self._array(lv.index, name)
                    arr.resize((i + 1, *arr.shape[1:]))
            self._save_scenes()
            return i, False

    def set_dem(self, dem: np.ndarray) -> None:
        if dem.shape != (self.height, self.width):
            raise StackError(f"dem must be {(self.height, self.width)}, got {dem.shape}")
        d = dem.astype(np.float32)
        self._dem_chunks.clear()
        for lv in self.levels:
            if lv.index > 0:
                d = downsample_mean(d)
            self._array(lv.index, "dem")[...] = d

    @property
    def has_dem(self) -> bool:
        return bool(self.meta.get("has_dem", False))

    def write_cloudprob(self, index: int, prob: np.ndarray, level: int = 0) -> None:
        """Write (2, h, w) uint8 cloud/shadow probability of scene ``index`` at ``level`` and
        every coarser level (max-pooled so coarse levels keep every cloud)."""
        p = prob
        for lv in self.levels[level:]:
            if lv.index > level:
                p = downsample_max(p)
            self._array(lv.index, "cloudprob")[index] = p
        for lv in self.levels[:level]:
            # Finer levels than the prediction: nearest-neighbour upsample.
            f = 2 ** (level - lv.index)
            up = np.repeat(np.repeat(prob, f, axis=1), f, axis=2)[:, : lv.height, : lv.width]
            self._array(lv.index, "cloudprob")[index] = up

    def mask_version(self, indices: np.ndarray) -> int:
        """Changes whenever the cloud probabilities of any of ``indices`` are rewritten (by
        another process, e.g. `clearsky mask`): keys caches of masks derived from them."""
        h = 0
        for t in indices:
            p = self.path / "L0" / "cloudprob" / "c" / str(int(t)) / "0" / "0" / "0"
            try:
                h = hash((h, p.stat().st_mtime_ns))
            except FileNotFoundError:
                h = hash((h, 0))
        return h

    # ---------------------------------------------------------------- reading
    def read(
        self,
        level: int,
        window: tuple[int, int, int, int],
        indices: np.ndarray,
        what: Sequence[str] = ("reflectance", "scl"),
        bands: Sequence[int] | None = None,
    ) -> dict[str, np.ndarray]:
        """Read a window (row, col, height, width) of scenes ``indices`` at ``level``
        (``bands``: band indices of the reflectance to read, default all).

        Parts of the window outside the stack come back as nodata (0 / NaN / unset)."""
        lv = self.levels[level]
        r0, c0, h, w = window
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r0 + h, lv.height), min(c0 + w, lv.width)
        inside = rr1 > rr0 and cc1 > cc0
        out: dict[str, np.ndarray] = {}
        for name in what:
            arr = self._array(level, name)
            if name == "dem":
                buf = np.full((h, w), np.nan, np.float32)
                if inside:
                    self._read_dem(level, arr, (rr0, rr1, cc0, cc1), buf[rr0 - r0 :, cc0 - c0 :])
                out[name] = buf
                continue
            sel = list(bands) if name == "reflectance" and bands is not None else None
            lead = (len(indices), *((len(sel),) if sel is not None else arr.shape[1:-2]))
            whole = rr0 == r0 and cc0 == c0 and rr1 == r0 + h and cc1 == c0 + w
            # Inside the stack every pixel is written below: skip pre-filling 10s of MB.
            shape = (*lead, h, w)
            buf = np.empty(shape, arr.dtype) if whole else np.full(shape, arr.fill_value, arr.dtype)
            if inside and len(indices):
                dst = buf[..., rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]
                if self._shards is not None:
                    self._read_shards(level, name, indices, sel, (rr0, rr1, cc0, cc1), dst)
                else:
                    mid = (sel if sel is not None else slice(None),) * (arr.ndim - 3)
                    t_sel = _as_selection(indices)
                    dst[...] = arr.get_orthogonal_selection(
                        (t_sel, *mid, slice(rr0, rr1), slice(cc0, cc1))
                    )
            out[name] = buf
        return out

    def _read_shards(
        self,
        level: int,
        name: str,
        indices: np.ndarray,
        bands: list[int] | None,
        box: tuple[int, int, int, int],
        dst: np.ndarray,
    ) -> None:
        """Local read of box (rr0, rr1, cc0, cc1) into dst (a view of the output buffer).
        Scenes found damaged come back as fill (no data) and are left out from now on."""
        a = self._layout(level, name)
        planes = np.asarray(bands if bands is not None else range(a.planes), dtype=np.int64)
        rr0, rr1, cc0, cc1 = box
        # The compiled reader writes plain rows: go through a contiguous buffer if dst is not.
        work = dst if dst.flags.c_contiguous else np.empty(dst.shape, dst.dtype)
        w4 = work.reshape(len(indices), len(planes), rr1 - rr0, cc1 - cc0)
        bad = self._shards.read(a, indices, planes, box, w4, self._must_exist(name))
        if work is not dst:
            dst[...] = work
        if bad:
            self._mark_damaged(bad)

    def _must_exist(self, name: str) -> Callable[[int], bool]:
        """Whether scene t must have a shard of ``name``: complete scenes have reflectance
        and SCL; model masks and scenes still being written may have none (fill)."""
        if name == "cloudprob":
            return lambda t: False
        n = len(self.scenes)
        return lambda t: t < n and self.scenes[t].complete

    def _read_dem(
        self, level: int, arr: zarr.Array, box: tuple[int, int, int, int], dst: np.ndarray
    ) -> None:
        """DEM rows rr0:rr1, cols cc0:cc1 into dst[0:, 0:], chunk by chunk through the cache."""
        rr0, rr1, cc0, cc1 = box
        ch, cw = arr.chunks
        for cy in range(rr0 // ch, (rr1 - 1) // ch + 1):
            for cx in range(cc0 // cw, (cc1 - 1) // cw + 1):
                key = (level, cy, cx)
                with self._lock:
                    chunk = self._dem_chunks.get(key)
                if chunk is None:
                    try:
                        chunk = arr[cy * ch : (cy + 1) * ch, cx * cw : (cx + 1) * cw]
                    except Exception as exc:  # a damaged DEM chunk: no relief there, not a 500
                        chunk = np.full((ch, cw), np.nan, np.float32)
                        with self._lock:
                            msg = f"DEM chunk L{level} {cy},{cx} unreadable: {type(exc).__name__}"
                            if msg not in self.warnings:
                                self.warnings.append(msg)
                                log.warning("cell %s: %s", self.cell_id, msg)
                    with self._lock:
                        self._dem_chunks[key] = chunk
                y0, y1 = max(rr0, cy * ch), min(rr1, (cy + 1) * ch)
                x0, x1 = max(cc0, cx * cw), min(cc1, (cx + 1) * cw)
                dst[y0 - rr0 : y1 - rr0, x0 - cc0 : x1 - cc0] = chunk[
                    y0 - cy * ch : y1 - cy * ch, x0 - cx * cw : x1 - cx * cw
                ]

    def nbytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def _as_selection(indices: np.ndarray) -> slice | np.ndarray:
    """A contiguous run of indices reads as one slice (much faster in zarr)."""
    if len(indices) and np.all(np.diff(indices) == 1):
        return slice(int(indices[0]), int(indices[-1]) + 1)
    return np.asarray(indices)


def _pad_even(a: np.ndarray, fill: float | int) -> np.ndarray:
    h, w = a.shape[-2:]
    ph, pw = h % 2, w % 2
    if not (ph or pw):
        return a
    pad = [(0, 0)] * (a.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(a, pad, constant_values=fill)


def downsample_reflectance(refl: np.ndarray, nodata: int = NODATA) -> np.ndarray:
    """2x2 mean of valid pixels; nodata only where all four are nodata. Band by band, in
    place: a whole 10 m cell (4 x 10980 x 10980) needs ~0.5 GB of temporaries, not ~5 GB."""
    a = _pad_even(refl, nodata)
    planes = a.reshape(-1, *a.shape[-2:])
    out = np.empty((planes.shape[0], a.shape[-2] // 2, a.shape[-1] // 2), np.uint16)
    for k, b in enumerate(planes):
        q = (b[::2, ::2], b[1::2, ::2], b[::2, 1::2], b[1::2, 1::2])
        s = q[0].astype(np.uint32)
        n = (q[0] != nodata).astype(np.uint8)
        for x in q[1:]:
            s += x
            n += x != nodata
        np.maximum(n, 1, out=n)
        s += n // 2
        s //= n
        out[k] = s
    return out.reshape(*a.shape[:-2], *out.shape[-2:])


def downsample_scl(scl: np.ndarray) -> np.ndarray:
    """2x2 merge by class priority (cloud > shadow > surface > nodata)."""
    a = _pad_even(scl, 0)
    blocks = np.stack([a[::2, ::2], a[1::2, ::2], a[::2, 1::2], a[1::2, 1::2]])
    pick = np.argmax(_SCL_PRIORITY[blocks], axis=0)
    return np.take_along_axis(blocks, pick[None], axis=0)[0]


def downsample_mean(a: np.ndarray) -> np.ndarray:
    p = _pad_even(a, np.nan)
    blocks = np.stack([p[..., ::2, ::2], p[..., 1::2, ::2], p[..., ::2, 1::2], p[..., 1::2, 1::2]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN
        return np.nanmean(blocks, axis=0).astype(a.dtype)


def downsample_max(a: np.ndarray) -> np.ndarray:
    # Unset (255) must not win over a real probability, so treat it as -1 while pooling.
    p = _pad_even(a, CLOUDPROB_UNSET).astype(np.int16)
    p[p == CLOUDPROB_UNSET] = -1
    m = np.maximum.reduce(
        [p[..., ::2, ::2], p[..., 1::2, ::2], p[..., ::2, 1::2], p[..., 1::2, 1::2]]
    )
    m[m < 0] = CLOUDPROB_UNSET
    return m.astype(np.uint8)


def list_stacks(data_dir: str | Path) -> dict[str, Path]:
    """Cell id -> stack path for every stack in a data directory."""
    d = Path(data_dir)
    if not d.is_dir():
        return {}
    return {
        p.name[: -len(".zarr")]: p for p in sorted(d.glob("*.zarr")) if (p / "zarr.json").exists()
    }
