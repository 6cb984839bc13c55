"""Reading the scene shards of a local Stack with ``pread``, checked against the file as it is.

A shard (Zarr v3 sharding, index at the end) holds one scene at one level as uncompressed
256 x 256 inner chunks, so a chunk is a fixed-size run of bytes at an offset the index gives.
The window a tile needs is read with one ``preadv`` per chunk and band (the rows it needs, each
row's wanted columns straight into the output), in one compiled call per scene.

Why not a memory map: a mapped file that shrinks while the server runs (truncated by another
process, a failing disk) kills the whole process with SIGBUS at the next touch of a lost page.
``pread`` just returns fewer bytes: the scene is reported damaged and left out instead. The
index is read through ``pread`` too and checked (its CRC32C, every entry whole and inside the
file), so a damaged file never makes the compiled reader touch memory it does not own.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import google_crc32c
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

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


@intrinsic
def _preadv(typingctx, fd, iov, count, offset):
    """``preadv(fd, (struct iovec *) iov, count, offset)`` from libc (iov: the address of
    ``count`` (base, length) int64 pairs)."""
    if not all(isinstance(a, types.Integer) for a in (fd, iov, count, offset)):
        return None

    def codegen(context, builder, sig, args):
        i64, i32 = ir.IntType(64), ir.IntType(32)
        fnty = ir.FunctionType(i64, [i32, ir.IntType(8).as_pointer(), i32, i64])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "preadv")
        a = [context.cast(builder, v, t, types.int64) for v, t in zip(args, sig.args, strict=True)]
        return builder.call(
            fn,
            [
                builder.trunc(a[0], i32),
                builder.inttoptr(a[1], ir.IntType(8).as_pointer()),
                builder.trunc(a[2], i32),
                a[3],
            ],
        )

    return types.int64(fd, iov, count, offset), codegen


@njit(cache=True, nogil=True)
def _read_scene(fd, offs, planes, chunk, box, fill, dst, scratch, iov):  # pragma: no cover
    """Window ``box`` (rows rr0:rr1, cols cc0:cc1) of one scene shard into dst (B', h, w).

    ``offs`` (gy, gx): byte offset of each inner chunk (-1: never written, filled with
    ``fill``); ``planes``: the leading-axis planes to copy. One preadv per chunk plane: the
    wanted columns of each row go straight into dst, the others into ``scratch`` (one chunk
    row, stays in cache); ``iov``: room for 3 x chunk (base, length) pairs. Returns False as
    soon as the file gives fewer bytes than the index promised."""
    rr0, rr1, cc0, cc1 = box
    size = dst.itemsize
    plane = chunk * chunk * size
    h, w = dst.shape[1], dst.shape[2]
    base = dst.ctypes.data
    junk = scratch.ctypes.data
    for cy in range(rr0 // chunk, (rr1 - 1) // chunk + 1):
        y0, y1 = max(rr0, cy * chunk), min(rr1, (cy + 1) * chunk)
        for cx in range(cc0 // chunk, (cc1 - 1) // chunk + 1):
            x0, x1 = max(cc0, cx * chunk), min(cc1, (cx + 1) * chunk)
            off = offs[cy, cx]
            if off < 0:
                dst[:, y0 - rr0 : y1 - rr0, x0 - cc0 : x1 - cc0] = fill
                continue
            left = (x0 - cx * chunk) * size
            want = (x1 - x0) * size
            right = chunk * size - left - want
            n = (y1 - y0) * chunk * size
            for j in range(planes.shape[0]):
                k = 0
                for y in range(y0, y1):
                    if left > 0:
                        iov[k, 0] = junk
                        iov[k, 1] = left
                        k += 1
                    iov[k, 0] = base + ((j * h + y - rr0) * w + x0 - cc0) * size
                    iov[k, 1] = want
                    k += 1
                    if right > 0:
                        iov[k, 0] = junk
                        iov[k, 1] = right
                        k += 1
                start = off + planes[j] * plane + (y0 - cy * chunk) * chunk * size
                if _preadv(fd, iov.ctypes.data, k, start) != n:
                    return False
    return True


@njit(cache=True, nogil=True, parallel=True)
def _read_chunks(fds, offs, planes, chunk, ry0, ry1, buf, addr, ok):  # pragma: no cover
    """For each scene k (in parallel: the copy out of the page cache is CPU work), the chunks a
    window touches, rows ry0[i]:ry1[i] of chunk row i, into buf[k] (gy, gx, P, maxrows, chunk):
    one contiguous pread per chunk plane. ``offs`` (T, gy, gx): byte offset of each chunk in
    scene k's shard (-1: outside the grid or never written: its addr keeps pointing at zeros);
    addr[k, i, j] gets where the percentile kernel reads chunk (i, j) (row r of the chunk is
    row r - ry0[i] of buf). ok[k] is False where the file gave fewer bytes than its index
    promised (then addr[k] is left for the caller to reset)."""
    T, gy, gx = addr.shape
    size = buf.itemsize
    cplane = chunk * chunk * size  # a plane in the file
    bplane = buf.shape[4] * chunk * size  # a plane in buf
    for k in prange(T):
        if fds[k] < 0:
            continue
        iov = np.empty((1, 2), np.int64)
        good = True
        for i in range(gy):
            n = (ry1[i] - ry0[i]) * chunk * size
            for j in range(gx):
                off = offs[k, i, j]
                if off < 0 or not good:
                    continue
                dst = buf[k, i, j].ctypes.data
                for p in range(planes.shape[0]):
                    iov[0, 0] = dst + p * bplane
                    iov[0, 1] = n
                    start = off + planes[p] * cplane + ry0[i] * chunk * size
                    if _preadv(fds[k], iov.ctypes.data, 1, start) != n:
                        good = False
                        break
                addr[k, i, j] = dst - ry0[i] * chunk * size
        ok[k] = good


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


class ShardReader:
    """Reads windows of scene shards under ``root`` (``L{level}/{name}/c/{t}/0/...``)."""

    def __init__(self, root: Path):
        self._root = str(root)
        self._index: dict[str, ShardIndex] = {}
        self._zeros: np.ndarray | None = None

    def relpath(self, a: ArrayLayout, t: int) -> str:
        return "/".join([f"L{a.level}", a.name, "c", str(t), *["0"] * (len(a.lead) + 2)])

    def _index_of(self, fd: int, st: os.stat_result, a: ArrayLayout, rel: str) -> ShardIndex:
        hit = self._index.get(rel)
        if hit is not None and (hit.ino, hit.size, hit.mtime_ns) == (
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
        ):
            return hit
        idx = read_index(fd, st, a.grid, a.chunk_nbytes)
        self._index[rel] = idx
        return idx

    def check(self, a: ArrayLayout, t: int) -> None:
        """Raise ShardDamaged unless scene t's shard of ``a`` is readable and whole."""
        rel = self.relpath(a, t)
        fd, st = _open(os.path.join(self._root, rel))
        try:
            self._index_of(fd, st, a, rel)
        finally:
            os.close(fd)

    def exists(self, a: ArrayLayout, t: int) -> bool:
        return os.path.lexists(os.path.join(self._root, self.relpath(a, t)))

    def source(
        self,
        a: ArrayLayout,
        indices: np.ndarray,
        planes: np.ndarray,
        window: tuple[int, int, int, int],
        must_exist: Callable[[int], bool] = lambda t: True,
    ) -> tuple[Source, dict[int, str]]:
        """The window (row, col, height, width) of scenes ``indices`` as the percentile kernel's
        input: the rows it needs of every chunk it touches, read with one contiguous pread per
        chunk plane (faster than gathering the window's columns), scenes in parallel, and the
        table of where each chunk landed. Chunks outside the stack, never written or of a
        damaged scene (returned in {t: reason}) point at zeros: no data."""
        c = a.chunk
        r0, c0, h, w = window
        cy0, cx0 = r0 // c, c0 // c  # floor: windows may start outside the stack
        gy, gx = (r0 + h - 1) // c - cy0 + 1, (c0 + w - 1) // c - cx0 + 1
        ry0 = np.zeros(gy, np.int64)
        ry1 = np.full(gy, c, np.int64)
        ry0[0], ry1[-1] = r0 - cy0 * c, r0 + h - (cy0 + gy - 1) * c
        rows = int((ry1 - ry0).max())
        np_ = len(planes)
        if self._zeros is None or self._zeros.size < np_ * c * c:
            self._zeros = np.zeros(np_ * c * c, a.dtype)
        zeros = self._zeros
        buf = np.empty((len(indices), gy, gx, np_, rows, c), a.dtype)
        # zeros, offset like the chunks' rows, so row r of any chunk row reads inside them
        zero_at = zeros.ctypes.data - ry0 * c * a.dtype.itemsize
        addr = np.empty((len(indices), gy, gx), np.uint64)
        addr[...] = zero_at.astype(np.uint64)[None, :, None]
        fds = np.full(len(indices), -1, np.int64)
        offs = np.full((len(indices), gy, gx), -1, np.int64)
        # the window's chunks that lie in the shard grid: table rows ys, cols xs
        ys = slice(max(-cy0, 0), max(min(a.grid[0] - cy0, gy), 0))
        xs = slice(max(-cx0, 0), max(min(a.grid[1] - cx0, gx), 0))
        bad: dict[int, str] = {}
        try:
            for k, t in enumerate(indices.tolist()):
                rel = self.relpath(a, t)
                try:
                    fd, st = _open(os.path.join(self._root, rel))
                except ShardDamaged as exc:
                    if str(exc) != "missing" or must_exist(t):
                        bad[t] = f"{rel} {exc}"
                    continue
                fds[k] = fd
                try:
                    idx = self._index_of(fd, st, a, rel)
                except ShardDamaged as exc:
                    bad[t] = f"{rel} {exc}"
                    continue
                offs[k, ys, xs] = idx.offsets[
                    cy0 + ys.start : cy0 + ys.stop, cx0 + xs.start : cx0 + xs.stop
                ]
            for k in np.flatnonzero(fds >= 0):
                if int(indices[k]) in bad:
                    fds[k] = -fds[k] - 2  # opened but damaged: do not read (closed below)
            ok = np.ones(len(indices), np.bool_)
            _read_chunks(fds, offs, planes, c, ry0, ry1, buf, addr, ok)
        finally:
            for fd in fds.tolist():
                if fd != -1:
                    os.close(fd if fd >= 0 else -fd - 2)
        for k in np.flatnonzero(~ok):
            t = int(indices[k])
            rel = self.relpath(a, t)
            addr[k] = zero_at.astype(np.uint64)[:, None]
            self._index.pop(rel, None)
            bad[t] = f"{rel} is shorter than its index says (truncated while in use?)"
        src = Source(addr, (c, c), rows * c, (ry0[0], c0 - cx0 * c), np.arange(np_), h, w)
        return replace(src, keep=(buf, zeros)), bad

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

        A scene whose shard cannot be read whole is filled with the fill value (so it counts as
        no data) and returned in {t: reason}; a missing shard of a scene for which
        ``must_exist(t)`` is False is just unwritten (fill), not damage."""
        if not dst.flags.c_contiguous or dst.shape[1:] != (
            len(planes),
            box[1] - box[0],
            box[3] - box[2],
        ):
            raise ValueError("dst must be a C-contiguous (T, planes, h, w) array")  # raw writes
        scratch = np.empty(a.chunk, dst.dtype)
        iov = np.empty((3 * a.chunk, 2), np.int64)
        fill = dst.dtype.type(a.fill)
        bad: dict[int, str] = {}
        for k, t in enumerate(indices.tolist()):
            rel = self.relpath(a, t)
            try:
                fd, st = _open(os.path.join(self._root, rel))
            except ShardDamaged as exc:
                dst[k] = fill
                if str(exc) != "missing" or must_exist(t):
                    bad[t] = f"{rel} {exc}"
                continue
            try:
                idx = self._index_of(fd, st, a, rel)
                ok = _read_scene(fd, idx.offsets, planes, a.chunk, box, fill, dst[k], scratch, iov)
                if not ok:
                    raise ShardDamaged("is shorter than its index says (truncated while in use?)")
            except ShardDamaged as exc:
                dst[k] = fill
                self._index.pop(rel, None)
                bad[t] = f"{rel} {exc}"
            finally:
                os.close(fd)
        return bad
