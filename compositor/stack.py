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
written, so an interrupted write never shows half a scene.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from affine import Affine
from cachetools import LRUCache
from numba import njit
from zarr.codecs import BloscCodec

from compositor.percentile import SOURCE_MIN_WIDTH, Source

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
        # Local stores read scene shards through memory maps (see ShardReader); anything else
        # (an object store) goes through zarr-python.
        self._shards = ShardReader(self.path, self) if self.path.is_dir() else None
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
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
            return cls(path, group)
        except (KeyError, TypeError, ValueError) as exc:
            raise StackError(f"stack {path} is malformed: {exc}") from None

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
        """Indices of complete scenes in a date range / set of months, in time order."""
        idx = []
        for i, s in enumerate(self.scenes):
            if not s.complete:
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
                    self._shards.read(level, name, indices, sel, (rr0, rr1, cc0, cc1), dst)
                else:
                    mid = (sel if sel is not None else slice(None),) * (arr.ndim - 3)
                    t_sel = _as_selection(indices)
                    dst[...] = arr.get_orthogonal_selection(
                        (t_sel, *mid, slice(rr0, rr1), slice(cc0, cc1))
                    )
            out[name] = buf
        return out

    def source(
        self, level: int, window: tuple[int, int, int, int], indices: np.ndarray, bands: list[int]
    ) -> Source | None:
        """The reflectance window for the percentile kernel to read in place, or None where
        that is not possible (a store that is not a local directory, a window narrower than the
        kernel's block): then read() it."""
        if self._shards is None or window[3] < SOURCE_MIN_WIDTH:
            return None
        return self._shards.source(level, indices, bands, window)

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
                    chunk = arr[cy * ch : (cy + 1) * ch, cx * cw : (cx + 1) * cw]
                    with self._lock:
                        self._dem_chunks[key] = chunk
                y0, y1 = max(rr0, cy * ch), min(rr1, (cy + 1) * ch)
                x0, x1 = max(cc0, cx * cw), min(cc1, (cx + 1) * cw)
                dst[y0 - rr0 : y1 - rr0, x0 - cc0 : x1 - cc0] = chunk[
                    y0 - cy * ch : y1 - cy * ch, x0 - cx * cw : x1 - cx * cw
                ]

    def nbytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


@njit(cache=True, nogil=True)
def _copy_scene(data, offs, bands, chunk, box, fill, dst):  # pragma: no cover - compiled
    """Copy window ``box`` (rows rr0:rr1, cols cc0:cc1) of one scene shard into dst (B', h, w).

    ``data`` is the shard as a flat typed array, ``offs`` (gy, gx) the item offset of each
    inner chunk (-1: absent, written as ``fill``), ``bands`` the leading-axis planes to copy.
    Row slices, not element loops: LLVM turns them into memcpy (2x faster measured)."""
    rr0, rr1, cc0, cc1 = box
    plane = chunk * chunk
    for cy in range(rr0 // chunk, (rr1 - 1) // chunk + 1):
        y0, y1 = max(rr0, cy * chunk), min(rr1, (cy + 1) * chunk)
        for cx in range(cc0 // chunk, (cc1 - 1) // chunk + 1):
            x0, x1 = max(cc0, cx * chunk), min(cc1, (cx + 1) * chunk)
            off = offs[cy, cx]
            if off < 0:
                dst[:, y0 - rr0 : y1 - rr0, x0 - cc0 : x1 - cc0] = fill
                continue
            n = x1 - x0
            for j in range(bands.shape[0]):
                base = off + bands[j] * plane
                for y in range(y0, y1):
                    s0 = base + (y - cy * chunk) * chunk + x0 - cx * chunk
                    dst[j, y - rr0, x0 - cc0 : x1 - cc0] = data[s0 : s0 + n]


class ShardReader:
    """Fast path for local stacks: memory-map each scene's shard and copy just the window.

    Shards hold uncompressed inner chunks, so a chunk is a fixed-size run of bytes whose offset
    the shard index (at the end of the file, Zarr v3 sharding spec) gives. zarr-python costs
    ~0.5 ms of Python per chunk, 200+ ms for a 100-scene tile; here one compiled call per scene
    copies the window straight out of the page cache.
    """

    def __init__(self, root: Path, stack: Stack):
        self.root = root
        self._root = str(root)
        self.stack = stack
        self._maps: dict[tuple[int, str, int], tuple[int, np.ndarray, np.ndarray]] = {}
        self._zeros: np.ndarray | None = None

    def _shard(self, level: int, name: str, t: int, arr: zarr.Array, grid: tuple[int, int]):
        """(mtime, data, chunk offsets, data address) of scene t's shard, or None if unwritten.

        Shards are replaced atomically (write + rename), so a mapping stays valid. Only cloud
        masks are rewritten in a complete scene: just those are checked for a newer file."""
        key = (level, name, t)
        hit = self._maps.get(key)
        if hit is not None and name != "cloudprob":
            return hit
        lead = arr.shape[1:-2]
        path = os.path.join(self._root, f"L{level}", name, "c", str(t), *["0"] * (len(lead) + 2))
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            self._maps.pop(key, None)
            return None
        if hit is not None and hit[0] == mtime:
            return hit
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        n = grid[0] * grid[1]
        index = np.frombuffer(mm[-(16 * n + 4) : -4], dtype="<u8").reshape(*grid, 2)
        itemsize = arr.dtype.itemsize
        nbytes = int(np.prod(lead, dtype=np.int64)) * CHUNK * CHUNK * itemsize
        data = np.frombuffer(mm, dtype=arr.dtype, count=(len(mm) - 16 * n - 4) // itemsize)
        # A chunk is used only if it is whole and inside the file: a damaged index must not
        # make a compiled reader touch memory past the mapping.
        ok = (index[..., 1] == nbytes) & (index[..., 0] + nbytes <= data.nbytes)
        offs = np.where(ok, index[..., 0] // itemsize, -1).astype(np.int64)
        hit = (mtime, data, offs, data.ctypes.data)
        self._maps[key] = hit
        return hit

    def source(
        self, level: int, indices: np.ndarray, bands: list[int], window: tuple[int, int, int, int]
    ) -> Source:
        """The reflectance window (row, col, height, width) of scenes ``indices`` at ``level``,
        read in place by the percentile kernel: a table of each chunk's address in the mapped
        shards. Chunks outside the stack or never written point at a chunk of zeros (nodata)."""
        arr = self.stack._array(level, "reflectance")
        lv = self.stack.levels[level]
        grid = (-(-lv.height // CHUNK), -(-lv.width // CHUNK))
        r0, c0, h, w = window
        cy0, cx0 = r0 // CHUNK, c0 // CHUNK  # floor: windows may start outside the stack
        gy, gx = (r0 + h - 1) // CHUNK - cy0 + 1, (c0 + w - 1) // CHUNK - cx0 + 1
        plane = CHUNK * CHUNK
        if self._zeros is None or self._zeros.size < arr.shape[1] * plane:
            self._zeros = np.zeros(arr.shape[1] * plane, arr.dtype)
        zero = self._zeros.ctypes.data
        addr = np.full((len(indices), gy, gx), zero, np.uint64)
        # (table, shard) chunk coordinates of the chunks inside the stack
        inside = [
            (i, j, cy0 + i, cx0 + j)
            for i in range(gy)
            for j in range(gx)
            if 0 <= cy0 + i < grid[0] and 0 <= cx0 + j < grid[1]
        ]
        keep: list = [self._zeros]
        size = arr.dtype.itemsize
        for k, t in enumerate(indices.tolist()):
            hit = self._shard(level, "reflectance", t, arr, grid)
            if hit is None:
                continue
            keep.append(hit[1])
            offs, base = hit[2], hit[3]
            for i, j, y, x in inside:
                o = int(offs[y, x])
                if o >= 0:
                    addr[k, i, j] = base + o * size
        return Source(
            addr,
            (CHUNK, CHUNK),
            plane,
            (r0 - cy0 * CHUNK, c0 - cx0 * CHUNK),
            np.asarray(bands, np.int64),
            h,
            w,
            tuple(keep),
        )

    def read(
        self,
        level: int,
        name: str,
        indices: np.ndarray,
        bands: list[int] | None,
        box: tuple[int, int, int, int],
        dst: np.ndarray,
    ) -> None:
        arr = self.stack._array(level, name)
        lead = tuple(arr.shape[1:-2])
        lv = self.stack.levels[level]
        grid = (-(-lv.height // CHUNK), -(-lv.width // CHUNK))
        nlead = int(np.prod(lead, dtype=np.int64))
        planes = np.asarray(bands if bands is not None else range(nlead), dtype=np.int64)
        rr0, rr1, cc0, cc1 = box
        # dst is a view (the window's part inside the stack); copy through a contiguous buffer
        # when it is not one, so the kernel can write plain rows.
        work = dst if dst.flags.c_contiguous else np.empty(dst.shape, dst.dtype)
        if not dst.flags.c_contiguous:
            work[...] = dst
        w3 = work.reshape(len(indices), len(planes), rr1 - rr0, cc1 - cc0)
        fill = arr.fill_value
        for k, t in enumerate(indices):
            hit = self._shard(level, name, int(t), arr, grid)
            if hit is None:  # never written
                w3[k] = fill
            else:
                _copy_scene(hit[1], hit[2], planes, CHUNK, box, fill, w3[k])
        if work is not dst:
            dst[...] = work


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
