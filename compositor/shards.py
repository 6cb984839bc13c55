"""Reading the scene shards of a local Stack with positioned reads (pread) of just the window.

A shard (Zarr v3 sharding, index at the end) holds one scene at one level as uncompressed
256 x 256 inner chunks, so a chunk is a fixed-size run of bytes at an offset the index gives, and
a window of it is a few runs of whole chunk rows. They are read with pread, in one compiled,
parallel call per window (no GIL, no per-chunk Python), and the window's columns copied out.

Why not memory maps: on current kernels (6.18 here, ext4 with large folios) touching one byte
of a mapped file maps its whole page-cache folio, up to 2 MB: one 256 px tile of a 100-scene
stack mapped ~0.85-1.5 GB of shard pages into the process for ~40-80 MB of pixels. Reads copy
only what the window needs, the process's memory is its own (bounded by compositor/memory.py),
and a file that shrinks while in use gives a short read (that scene is left out), not SIGBUS.

Before a shard is first read its index is read and checked (CRC32C; every entry whole and inside
the file). Open files are kept (an LRU of descriptors, closed when no read holds them).
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
from numba import njit, prange, types

_ABSENT = 2**64 - 1  # index entry of a chunk never written (Zarr v3 sharding)
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # a FIFO never blocks

# libc's pread, linked by name (so the compiled readers can be cached); the buffer address goes
# in as an integer, as the ABI passes a pointer.
_pread = types.ExternalFunction(
    "pread", types.intp(types.intc, types.uintp, types.uintp, types.int64)
)


class ShardDamaged(Exception):
    """A shard that cannot be read whole; ``str()`` says why, without the absolute path."""


@dataclass(frozen=True)
class ShardIndex:
    """A shard's index, valid while the file keeps its inode, size and mtime."""

    ino: int
    size: int
    mtime_ns: int
    offsets: np.ndarray  # int64 (gy, gx): byte offset of each inner chunk, -1 = never written


@njit(nogil=True, cache=True)
def _pread_all(fd, addr, n, off):  # pragma: no cover - compiled
    """pread until n bytes came; False on end of file (the shard shrank) or an I/O error."""
    done = 0
    while done < n:
        r = _pread(fd, addr + done, n - done, off + done)
        if r <= 0:
            return False
        done += r
    return True


@njit(parallel=True, nogil=True, cache=True)
def _read_window(fds, offs, planes, box, c, fill, dst, ok):  # pragma: no cover - compiled
    """For read(): dst[k] (P, h, w) = window ``box`` (rr0, rr1, cc0, cc1) of scene k, whose
    chunks covering the box start at byte offsets offs[k] (-1: absent, written as fill); scenes
    with fds[k] < 0 are left alone. Whole chunk rows are read, then the box's columns copied
    (row slices: LLVM makes them memcpy). ok[k]: every read of scene k came whole."""
    rr0, rr1, cc0, cc1 = box[0], box[1], box[2], box[3]
    cy0, cx0 = rr0 // c, cc0 // c
    size = dst.itemsize
    for k in prange(dst.shape[0]):
        ok[k] = True
        if fds[k] < 0:
            continue
        scratch = np.empty(c * c, dst.dtype)
        addr = scratch.ctypes.data
        for cy in range(cy0, (rr1 - 1) // c + 1):
            y0, y1 = max(rr0, cy * c), min(rr1, (cy + 1) * c)
            for cx in range(cx0, (cc1 - 1) // c + 1):
                x0, x1 = max(cc0, cx * c), min(cc1, (cx + 1) * c)
                o = offs[k, cy - cy0, cx - cx0]
                for j in range(planes.shape[0]):
                    if o < 0:
                        dst[k, j, y0 - rr0 : y1 - rr0, x0 - cc0 : x1 - cc0] = fill
                        continue
                    at = o + (planes[j] * c * c + (y0 - cy * c) * c) * size
                    if ok[k] and not _pread_all(fds[k], addr, (y1 - y0) * c * size, at):
                        ok[k] = False
                    if not ok[k]:
                        continue
                    for r in range(y1 - y0):
                        q = r * c + x0 - cx * c
                        dst[k, j, y0 - rr0 + r, x0 - cc0 : x1 - cc0] = scratch[q : q + x1 - x0]


def _open(path: str) -> tuple[int, os.stat_result]:
    """An open descriptor of a regular file and its stat, or ShardDamaged."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise ShardDamaged("missing") from None
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise  # this process's limit, not the file's fault: never mark the scene damaged
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


class _Open:
    """One shard, open and checked: its descriptor and each inner chunk's byte offset. The
    descriptor is closed when the last reader of it lets go (never under a read in flight)."""

    __slots__ = ("ino", "size", "mtime_ns", "fd", "offs")

    def __init__(self, fd: int, index: ShardIndex):
        self.fd = fd
        self.ino, self.size, self.mtime_ns = index.ino, index.size, index.mtime_ns
        self.offs = index.offsets

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _raise_open_files_limit() -> int:
    """The soft limit on open files, raised to the hard one (a stack keeps one descriptor per
    shard in use: scenes x levels x arrays). Returns the soft limit now in force."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            want = 65536 if hard == resource.RLIM_INFINITY else hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        return int(soft)
    except (OSError, ValueError):
        return 1024


# Open shards of every reader in the process, least recently used first: half the descriptors
# this process may hold (the rest for sockets, libraries and the stores' other files).
_MAX_OPEN = max(64, _raise_open_files_limit() // 2)
_OPEN: OrderedDict[tuple[str, str], _Open] = OrderedDict()
_OPEN_LOCK = threading.Lock()


def _remember(key: tuple[str, str], opened: _Open) -> None:
    with _OPEN_LOCK:
        _OPEN[key] = opened
        while len(_OPEN) > _MAX_OPEN:
            _OPEN.popitem(last=False)  # closed once no read holds it


def _forget_half() -> None:
    """Out of descriptors anyway (other files, another cap): let go of the older half."""
    with _OPEN_LOCK:
        for _ in range(len(_OPEN) // 2):
            _OPEN.popitem(last=False)


class ShardReader:
    """Reads windows of scene shards under ``root`` (``L{level}/{name}/c/{t}/0/...``)."""

    def __init__(self, root: Path):
        self._root = str(root)

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

    def _opened(self, a: ArrayLayout, t: int) -> _Open:
        """Scene t's shard of ``a``, open and checked (ShardDamaged: missing or damaged).

        Reflectance and SCL of a complete scene are never rewritten: an open shard is reused
        without a stat. Model masks are (by `clearsky mask`, write + rename): a newer file is
        opened anew."""
        rel = self.relpath(a, t)
        key = (self._root, rel)
        with _OPEN_LOCK:
            hit = _OPEN.get(key)
            if hit is not None:
                _OPEN.move_to_end(key)
        if hit is not None and a.name != "cloudprob":
            return hit
        try:
            fd, st = _open(os.path.join(self._root, rel))
        except OSError:  # too many open files: fewer kept, then once more (else the tile fails)
            _forget_half()
            fd, st = _open(os.path.join(self._root, rel))
        if hit is not None and (hit.ino, hit.size, hit.mtime_ns) == (
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
        ):
            os.close(fd)
            return hit
        try:
            opened = _Open(fd, read_index(fd, st, a.grid, a.chunk_nbytes))
        except BaseException:
            os.close(fd)
            raise
        _remember(key, opened)
        return opened

    def _get(
        self, a: ArrayLayout, t: int, must_exist: Callable[[int], bool], bad: dict[int, str]
    ) -> _Open | None:
        try:
            return self._opened(a, t)
        except ShardDamaged as exc:
            if str(exc) != "missing" or must_exist(t):
                bad[t] = f"{self.relpath(a, t)} {exc}"
            return None

    def _scenes(
        self,
        a: ArrayLayout,
        indices: np.ndarray,
        chunks: tuple[int, int, int, int],
        must_exist: Callable[[int], bool],
        bad: dict[int, str],
    ) -> tuple[list, np.ndarray, np.ndarray]:
        """Open shards of scenes ``indices``: (the _Open objects, their descriptors (-1: none),
        byte offsets of chunks rows cy0:cy1, cols cx0:cx1 (-1: absent or outside the stack))."""
        cy0, cy1, cx0, cx1 = chunks
        held = []
        fds = np.full(len(indices), -1, np.int64)
        offs = np.full((len(indices), cy1 - cy0, cx1 - cx0), -1, np.int64)
        ys = slice(max(cy0, 0), min(cy1, a.grid[0]))
        xs = slice(max(cx0, 0), min(cx1, a.grid[1]))
        for k, t in enumerate(indices.tolist()):
            m = self._get(a, t, must_exist, bad)
            if m is None:
                continue
            held.append(m)
            fds[k] = m.fd
            offs[k, ys.start - cy0 : ys.stop - cy0, xs.start - cx0 : xs.stop - cx0] = m.offs[ys, xs]
        return held, fds, offs

    def _short(self, a: ArrayLayout, indices: np.ndarray, ok: np.ndarray, bad: dict) -> None:
        """Scenes whose reads came back short: the shard shrank while in use (or an I/O
        error). Their descriptors are dropped; each goes into ``bad`` with the reason."""
        for k in np.flatnonzero(~ok).tolist():
            t = int(indices[k])
            rel = self.relpath(a, t)
            with _OPEN_LOCK:
                m = _OPEN.pop((self._root, rel), None)
            try:
                now = os.stat(os.path.join(self._root, rel)).st_size
                was = f"{m.size} -> " if m is not None else ""
                bad[t] = f"{rel} was truncated while in use ({was}{now} bytes)"
            except OSError:
                bad[t] = f"{rel} could not be read"

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

        A scene whose shard is missing, damaged or read short is filled with the fill value
        (no data) and returned in {t: reason}; a missing shard of a scene for which
        ``must_exist(t)`` is False is just unwritten (fill), not damage."""
        c = a.chunk
        rr0, rr1, cc0, cc1 = box
        chunks = (rr0 // c, (rr1 - 1) // c + 1, cc0 // c, (cc1 - 1) // c + 1)
        bad: dict[int, str] = {}
        held, fds, offs = self._scenes(a, indices, chunks, must_exist, bad)
        ok = np.empty(len(indices), np.bool_)
        fill = dst.dtype.type(a.fill)
        _read_window(fds, offs, np.asarray(planes, np.int64), np.asarray(box, np.int64), c,
                     fill, dst, ok)  # fmt: skip
        if not ok.all():
            self._short(a, indices, ok, bad)
        dst[fds < 0] = fill
        dst[~ok] = fill  # never half a scene
        del held  # (the descriptors stay open while the reads run)
        return bad
