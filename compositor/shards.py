"""Reading the scene shards of a local Stack: memory maps, checked, that may shrink safely.

A shard (Zarr v3 sharding, index at the end) holds one scene at one level as uncompressed
256 x 256 inner chunks, so a chunk is a fixed-size run of bytes at an offset the index gives.
Each shard is memory-mapped once; the percentile kernel reads a tile's observations in place
(a table of chunk addresses) and other reads copy just their window, in one compiled call per
scene: no copy of a tile's ~40 MB of observations, no per-chunk Python.

Before a shard is mapped its index is read and checked (CRC32C; every entry whole and inside the
file): a damaged file never makes a compiled reader touch memory past its mapping. A file that
shrinks after it was mapped (truncated by another process, a failing disk) would raise SIGBUS at
the next touch of a lost page and kill the process; compositor/sigbus.py turns that into pages of
zeros and a count, :meth:`ShardReader.shrunk` then finds the file, and its scene is left out.
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
from numba import njit

from compositor import sigbus
from compositor.percentile import Source

_ABSENT = 2**64 - 1  # index entry of a chunk never written (Zarr v3 sharding)
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # a FIFO never blocks


class ShardDamaged(Exception):
    """A shard that cannot be read whole; ``str()`` says why, without the absolute path."""


@dataclass(frozen=True)
class ShardIndex:
    """A shard's index, valid while the file keeps its inode, size and mtime."""

    ino: int
    size: int
    mtime_ns: int
    offsets: np.ndarray  # int64 (gy, gx): byte offset of each inner chunk, -1 = never written


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


def _open(path: str) -> tuple[int, os.stat_result]:
    """An open descriptor of a regular file and its stat, or ShardDamaged."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise ShardDamaged("missing") from None
    except OSError as exc:
        raise ShardDamaged(f"cannot be opened ({exc.strerror or exc})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ShardDamaged("is not a regular file")
    return fd, st


def read_index(fd: int, st: os.stat_result, grid: tuple[int, int], chunk_nbytes: int) -> ShardIndex:
    """The shard's chunk offsets, checked: CRC32C of the index, every written chunk whole
    (``chunk_nbytes``) and inside the file. Raises ShardDamaged."""
    n = grid[0] * grid[1]
    nidx = 16 * n + 4
    if st.st_size < nidx:
        raise ShardDamaged(f"is truncated ({st.st_size} bytes, the index alone is {nidx})")
    raw = os.pread(fd, nidx, st.st_size - nidx)
    if len(raw) != nidx:
        raise ShardDamaged("is truncated (its index cannot be read)")
    if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise ShardDamaged("has a corrupt index (checksum mismatch)")
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(*grid, 2)
    absent = (index[..., 0] == _ABSENT) & (index[..., 1] == _ABSENT)
    whole = (index[..., 1] == chunk_nbytes) & (index[..., 0] + chunk_nbytes <= st.st_size - nidx)
    if not np.all(absent | whole):
        raise ShardDamaged("has index entries outside the file or of the wrong size")
    offs = np.where(absent, -1, index[..., 0].astype(np.int64))
    return ShardIndex(st.st_ino, st.st_size, st.st_mtime_ns, np.ascontiguousarray(offs))


@dataclass(frozen=True)
class ArrayLayout:
    """What the reader needs to know of one array at one level."""

    name: str
    level: int
    lead: tuple[int, ...]  # leading axes between time and (y, x): (bands,), (2,) or ()
    dtype: np.dtype
    fill: int
    grid: tuple[int, int]  # inner chunks per shard (rows, cols)
    chunk: int

    @property
    def planes(self) -> int:
        return int(np.prod(self.lead, dtype=np.int64))

    @property
    def chunk_nbytes(self) -> int:
        return self.planes * self.chunk * self.chunk * self.dtype.itemsize


@dataclass(eq=False)
class Mapped:
    """One mapped shard: its data as a flat typed array and each chunk's item offset."""

    rel: str
    t: int
    ino: int
    size: int
    mtime_ns: int
    data: np.ndarray
    offs: np.ndarray  # int64 (gy, gx): item offset of each inner chunk in data, -1 = absent
    region: sigbus.Region  # registered with the SIGBUS guard while this object lives


_READERS: weakref.WeakSet = weakref.WeakSet()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def mapped_resident() -> int:
    """Bytes of file-backed memory resident in this process (mapped shards, libraries)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[2]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def trim_mapped(limit_bytes: int) -> bool:
    """If more than ``limit_bytes`` of mapped files are resident, let go of the shard pages:
    they stay in the page cache (a later read faults them back in, cheaply) but leave this
    process's RSS. True if it trimmed."""
    if mapped_resident() <= limit_bytes:
        return False
    for r in list(_READERS):
        for m in list(r._maps.values()):
            try:
                m.region.owner.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError, AttributeError):
                pass
    return True


_WAKE = threading.Event()


def after_render() -> None:
    """A render thread says a tile is done: the checking thread looks now rather than at its
    next period (renders fault in up to ~1 GB of shard pages within one 0.1 s period, so a
    periodic check alone bounds only the average). Costs the render nothing."""
    _WAKE.set()


def keep_mapped_under(limit_bytes: int, every_s: float = 0.1) -> threading.Thread:
    """Check every ``every_s`` seconds and after every render (:func:`after_render`), in a
    thread of its own (off the tiles' path), that at most ``limit_bytes`` of mapped files are
    resident; let go of the shard pages past it."""

    def loop() -> None:
        while True:
            _WAKE.wait(every_s)
            _WAKE.clear()
            trim_mapped(limit_bytes)

    t = threading.Thread(target=loop, name="clearsky-mapped-trim", daemon=True)
    t.start()
    return t


class ShardReader:
    """Reads windows of scene shards under ``root`` (``L{level}/{name}/c/{t}/0/...``)."""

    def __init__(self, root: Path):
        self._root = str(root)
        self._maps: dict[str, Mapped] = {}
        self._zeros: np.ndarray | None = None
        sigbus.install()
        _READERS.add(self)

    def relpath(self, a: ArrayLayout, t: int) -> str:
        return "/".join([f"L{a.level}", a.name, "c", str(t), *["0"] * (len(a.lead) + 2)])

    def check(self, a: ArrayLayout, t: int) -> None:
        """Raise ShardDamaged unless scene t's shard of ``a`` is readable and whole."""
        fd, st = _open(os.path.join(self._root, self.relpath(a, t)))
        try:
            read_index(fd, st, a.grid, a.chunk_nbytes)
        finally:
            os.close(fd)

    def exists(self, a: ArrayLayout, t: int) -> bool:
        return os.path.lexists(os.path.join(self._root, self.relpath(a, t)))

    def _mapped(self, a: ArrayLayout, t: int) -> Mapped:
        """Scene t's shard of ``a``, mapped and checked (ShardDamaged: missing or damaged).

        Reflectance and SCL of a complete scene are never rewritten: a mapping is reused
        without a stat. Model masks are (by `clearsky mask`, write + rename): a newer file is
        mapped anew."""
        rel = self.relpath(a, t)
        hit = self._maps.get(rel)
        if hit is not None and a.name != "cloudprob":
            return hit
        fd, st = _open(os.path.join(self._root, rel))
        try:
            if hit is not None and (hit.ino, hit.size, hit.mtime_ns) == (
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
            ):
                return hit
            idx = read_index(fd, st, a.grid, a.chunk_nbytes)
            mm = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        nbytes = st.st_size - (16 * a.grid[0] * a.grid[1] + 4)
        data = np.frombuffer(mm, dtype=a.dtype, count=nbytes // a.dtype.itemsize)
        start = data.ctypes.data
        offs = np.where(idx.offsets < 0, -1, idx.offsets // a.dtype.itemsize)
        region = sigbus.Region(start, start + st.st_size, mm)
        hit = Mapped(rel, t, st.st_ino, st.st_size, st.st_mtime_ns, data, offs, region)
        self._maps[rel] = hit
        return hit

    def shrunk(self) -> dict[int, str]:
        """Mapped shards whose file is now shorter than its mapping (the SIGBUS guard counted a
        lost page): {scene: reason}. They are unmapped; a file replaced meanwhile is re-mapped
        at its next read."""
        bad: dict[int, str] = {}
        for rel, m in list(self._maps.items()):
            try:
                st = os.stat(os.path.join(self._root, rel))
            except OSError:
                st = None
            if st is None or st.st_ino != m.ino:
                self._maps.pop(rel, None)
            elif st.st_size < m.size:
                self._maps.pop(rel, None)
                bad[m.t] = f"{rel} was truncated while in use ({m.size} -> {st.st_size} bytes)"
        return bad

    def _get(
        self, a: ArrayLayout, t: int, must_exist: Callable[[int], bool], bad: dict[int, str]
    ) -> Mapped | None:
        try:
            return self._mapped(a, t)
        except ShardDamaged as exc:
            if str(exc) != "missing" or must_exist(t):
                bad[t] = f"{self.relpath(a, t)} {exc}"
            return None

    def source(
        self,
        a: ArrayLayout,
        indices: np.ndarray,
        planes: np.ndarray,
        window: tuple[int, int, int, int],
        must_exist: Callable[[int], bool] = lambda t: True,
    ) -> tuple[Source, dict[int, str]]:
        """The window (row, col, height, width) of scenes ``indices``, read in place by the
        percentile kernel: a table of each chunk's address in the mapped shards. Chunks outside
        the stack, never written or of a damaged scene (returned in {t: reason}) point at a
        chunk of zeros (nodata)."""
        c = a.chunk
        r0, c0, h, w = window
        cy0, cx0 = r0 // c, c0 // c  # floor: windows may start outside the stack
        gy, gx = (r0 + h - 1) // c - cy0 + 1, (c0 + w - 1) // c - cx0 + 1
        plane = c * c
        if self._zeros is None or self._zeros.size < a.planes * plane:
            self._zeros = np.zeros(a.planes * plane, a.dtype)
        zero = self._zeros.ctypes.data
        addr = np.full((len(indices), gy, gx), zero, np.uint64)
        inside = [
            (i, j, cy0 + i, cx0 + j)
            for i in range(gy)
            for j in range(gx)
            if 0 <= cy0 + i < a.grid[0] and 0 <= cx0 + j < a.grid[1]
        ]
        keep: list = [self._zeros]
        bad: dict[int, str] = {}
        size = a.dtype.itemsize
        for k, t in enumerate(indices.tolist()):
            m = self._get(a, t, must_exist, bad)
            if m is None:
                continue
            keep.append(m)
            base = m.data.ctypes.data
            for i, j, y, x in inside:
                o = int(m.offs[y, x])
                if o >= 0:
                    addr[k, i, j] = base + o * size
        src = Source(addr, (c, c), plane, (r0 - cy0 * c, c0 - cx0 * c), planes, h, w, tuple(keep))
        return src, bad

    def read(
        self,
        a: ArrayLayout,
        indices: np.ndarray,
        planes: np.ndarray,
        box: tuple[int, int, int, int],
        dst: np.ndarray,
        must_exist: Callable[[int], bool] = lambda t: True,
    ) -> dict[int, str]:
        """Window ``box`` (rr0, rr1, cc0, cc1) of scenes ``indices`` into dst (T, P, h, w).

        A scene whose shard is missing or damaged is filled with the fill value (no data) and
        returned in {t: reason}; a missing shard of a scene for which ``must_exist(t)`` is
        False is just unwritten (fill), not damage."""
        fill = dst.dtype.type(a.fill)
        bad: dict[int, str] = {}
        for k, t in enumerate(indices.tolist()):
            m = self._get(a, t, must_exist, bad)
            if m is None:
                dst[k] = fill
            else:
                _copy_scene(m.data, m.offs, planes, a.chunk, box, fill, dst[k])
        return bad
