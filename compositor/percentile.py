"""Masked temporal percentile of a Sentinel-2 tile stack.

``masked_percentile(stack, mask, q)`` reduces a ``(T, B, H, W)`` uint16 stack along time,
ignoring observations where ``mask`` (``(T, H, W)``, True = excluded) is set, and returns
float32 ``(B, H, W)`` equal bit for bit to::

    x = stack.astype(np.float64); x[masked] = np.nan
    np.nanpercentile(x, q, axis=0, method="linear").astype(np.float32)

``q`` follows numpy's dtype rules (a np.float32 q is divided and scaled in float32, as
numpy does). At most 32000 observations per pixel (int16 counters).

How the kernel is fast: blocks of 128 neighbouring pixels of one image row are the unit of
work (spread over numba's threads), one SIMD lane per pixel. A block's observations are
copied once into a small ``(time, 128)`` int16 buffer (masked -> sentinel; scenes masked
over the whole block are skipped: clouds are spatially correlated), then the k-th smallest
value of every lane is found by bisection on the value: each step counts, for all lanes
together, how many values exceed the lane's midpoint (compare + subtract, 16 lanes per AVX2
instruction, contiguous loads from L1). One more pass gives the (k+1)-th value, then
numpy's linear interpolation is replayed in float64 with numpy's exact operation order.
The input is read once, in its (T, B, H, W) layout: rows of one pixel column are far apart
in memory, so the copy loop prefetches a few rows ahead.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "SOURCE_MIN_WIDTH",
    "Source",
    "kersten_percentile",
    "masked_percentile",
    "masked_percentile_many",
    "quantile_fraction",
    "run_source",
]

# Pixels per block: a multiple of LLVM's vectorised loop body (4 x 16 int16 lanes) so the
# hot loops have no scalar remainder; 128 amortises the per-block work best.
_LANES = 128
SOURCE_MIN_WIDTH = _LANES  # a Source window is at least one block wide
# Rows of the buffer counted per inner iteration (amortises the counter load/store).
_UNROLL = 4
# Rows prefetched ahead in the copy loop.
_PF = 8
# Counters are int16 lanes: keep the padded time length well inside int16.
_MAX_T = 32000

# Values are stored as int16 after flipping the top bit (v ^ 0x8000): signed order equals
# the uint16 order, and AVX2 has a signed 16-bit compare but no unsigned one.
_FLIP = np.uint16(0x8000)
_SENT = np.int16(32767)  # 65535 flipped: masked / padding entries, never below a value
_NEG = np.int16(-32768)  # 0 flipped

_u = np.uint64  # unsigned indices: numba emits no negative-index wraparound, loops vectorise

# Slots of the per-lane state array. One allocation, constant offsets: LLVM can prove the
# lane loops free of aliasing and vectorises them without runtime checks (with separate
# arrays it gives up past 8 pointer checks and emits scalar code).
# _RAW holds the current row's values as copied in (uint16 bits), _MSK its mask (0/1).
_N, _LO, _HI, _VA, _VB, _MID, _CNT, _LIM, _RAW, _MSK = (_u(i * _LANES) for i in range(10))
_SLOTS = 10


def _emit_prefetch(builder, ptr) -> None:
    """llvm.prefetch(ptr: i8*, read, keep in all cache levels, data cache)."""
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    # Intrinsic name differs between opaque (LLVM >= 15) and typed pointer llvmlite.
    name = "llvm.prefetch.p0" if str(i8p) == "ptr" else "llvm.prefetch.p0i8"
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    builder.call(fn, [ptr, i32(0), i32(3), i32(1)])


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Software prefetch of ``arr[idx]`` (llvm.prefetch: read, keep in all cache levels)."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        _emit_prefetch(builder, builder.bitcast(builder.gep(ary.data, [args[1]]), i8p))
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


@intrinsic
def _copy_in(typingctx, dst, start, addr, count):
    """``dst[start : start + count] = ((uint16 *) addr)[:count]`` as one llvm.memcpy: the
    source is memory the caller keeps alive (see Source). A memcpy, not a loop of loads, so
    LLVM knows the source aliases nothing and the lane loops around stay vectorised."""
    if not isinstance(dst, types.Array) or not all(
        isinstance(a, types.Integer) for a in (start, addr, count)
    ):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        d = builder.gep(ary.data, [args[1]])
        s = builder.inttoptr(args[2], d.type)
        cgutils.raw_memcpy(builder, d, s, args[3], context.get_constant(types.intp, 2))
        return context.get_dummy_value()

    return types.void(dst, start, addr, count), codegen


@intrinsic
def _prefetch_at(typingctx, addr):
    """Software prefetch of the cache line at byte address ``addr``."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        _emit_prefetch(builder, builder.inttoptr(args[0], ir.IntType(8).as_pointer()))
        return context.get_dummy_value()

    return types.void(addr), codegen


@njit(cache=True, fastmath=False, nogil=True, inline="always")
def _prefetch_row(a, n, a2):  # pragma: no cover - compiled
    """Prefetch one block row: ``n`` uint16 at byte address a, the rest of the lanes at a2."""
    for k in range(_u(0), n * _u(2), _u(64)):  # one 64-byte cache line per step
        _prefetch_at(a + k)
    _prefetch_at(a + n * _u(2) - _u(1))  # block rows need not start on a line boundary
    for k in range(_u(0), (_u(_LANES) - n) * _u(2), _u(64)):
        _prefetch_at(a2 + k)


@njit(cache=True, fastmath=False, nogil=True)
def _block(
    addr, geo, planes, m1, mbit, act, nd, T, H, W, kk, tt, o1, cnt, h, cb
):  # pragma: no cover
    """Pixels ``cb .. cb + _LANES`` of window row ``h``: every band, every quantile.

    Observations are read where they lie (``addr``/``geo``, see Source); the mask is flat
    (T, H, W); ``act`` (flat (H, W), or empty) limits the work to active pixels; ``nd`` is a
    value that counts as missing (-1: none). Flat arrays and uint64 offsets throughout (see
    ``_u``); the lane loops run over constants so LLVM vectorises them.
    """
    L = _u(_LANES)
    U = _u(_UNROLL)
    PF = _u(_PF)
    Q = _u(kk.shape[0])
    B = _u(planes.shape[0])
    use_act = act.shape[0] > 0
    Tp = (T + U - _u(1)) // U * U
    buf = np.empty(Tp * L, dtype=np.int16)  # (row, lane) values of the current band
    rows = np.empty(T, dtype=np.uint64)  # scenes with an unmasked pixel in the block
    ls = np.empty(_SLOTS * _LANES, dtype=np.int16)  # per-lane state, slots _N.._MSK
    use_nd = nd >= 0
    ndr = np.int16(np.uint16(nd if use_nd else 0))  # nodata as the raw int16 bits
    # The last block of a row overlaps the previous one instead of being partial (W >=
    # _LANES is ensured by the caller); overlapping pixels are just computed twice.
    c0 = min(cb, W - L)
    ao = h * W + c0
    if use_act:
        nact = 0
        for j in range(L):
            nact += act[ao + j]
        if nact == 0:
            return

    # Where the block's row lies: chunk (cy, cx), element offset ``ry`` of the row and ``ix``
    # of its first pixel in the chunk; the first ``n`` lanes are in that chunk, the rest in
    # chunk cx + 1 (chunks are at least _LANES wide). Scene t, plane p: the lanes start at
    # addr[t, cy, cx] + 2 * (p * plane + ry + ix), the rest at addr[t, cy, cx + 1] + ....
    ch, cw, plane = geo[0], geo[1], geo[2]
    yy = h + geo[3]
    xx = c0 + geo[4]
    cy = yy // ch
    cx = xx // cw
    ry = (yy - cy * ch) * cw
    ix = xx - cx * cw
    n = min(L, cw - ix)
    cx2 = cx + _u(1) if n < L else cx  # (no second chunk: a2 is never read)

    # Keep only scenes with at least one unmasked pixel here.
    R = _u(0)
    for t in range(T):
        if t + PF < T:
            mo = ((t + PF) * H + h) * W + c0
            _prefetch(m1, mo)
            _prefetch(m1, mo + L - _u(1))
        mo = (t * H + h) * W + c0
        nv = 0
        if use_act:
            for j in range(L):
                nv += ((m1[mo + j] & mbit) == 0) & (act[ao + j] != 0)
        else:
            for j in range(L):
                nv += (m1[mo + j] & mbit) == 0
        if nv > 0:
            rows[R] = t
            R += _u(1)
    for r in range(min(R, PF)):
        po = planes[0] * plane + ry
        _prefetch_row(
            addr[rows[r], cy, cx] + _u(2) * (po + ix), n, addr[rows[r], cy, cx2] + _u(2) * po
        )
    # Pad to a multiple of the unroll with sentinel rows (they never count as <= v).
    Rp = (R + U - _u(1)) // U * U
    for r in range(R, Rp):
        for j in range(L):
            buf[r * L + j] = _SENT

    for b in range(B):
        # Copy the band into buf (flipped to int16, masked/nodata -> sentinel), counting
        # valid values and the per-lane min / max as the bisection's starting interval.
        for j in range(L):
            ls[_N + j] = 0
            ls[_LO + j] = _SENT
            ls[_HI + j] = _NEG
        for r in range(R):
            # Rows of a pixel column are far apart (hardware prefetch does not follow
            # them): fetch PF rows ahead, running on into the next band.
            rn = r + PF
            bn = b
            if rn >= R:
                rn -= R
                bn += _u(1)
            if bn < B and rn < R:
                po = planes[bn] * plane + ry
                tn = rows[rn]
                _prefetch_row(
                    addr[tn, cy, cx] + _u(2) * (po + ix), n, addr[tn, cy, cx2] + _u(2) * po
                )
            t = rows[r]
            mo = (t * H + h) * W + c0
            if use_act:
                for j in range(L):
                    ls[_MSK + j] = ((m1[mo + j] & mbit) != 0) | (act[ao + j] == 0)
            else:
                for j in range(L):
                    ls[_MSK + j] = (m1[mo + j] & mbit) != 0
            po = planes[b] * plane + ry
            _copy_in(ls, _RAW, addr[t, cy, cx] + _u(2) * (po + ix), n)
            if n < L:
                _copy_in(ls, _RAW + n, addr[t, cy, cx2] + _u(2) * po, L - n)
            if use_nd:
                for j in range(L):
                    ls[_MSK + j] |= ls[_RAW + j] == ndr
            bo = r * L
            for j in range(L):
                raw = ls[_RAW + j]
                x = raw ^ _NEG  # flip the top bit: uint16 order as int16 order
                bad = ls[_MSK + j] != 0
                y = _SENT if bad else x
                buf[bo + j] = y
                ls[_N + j] += np.int16(not bad)
                ls[_LO + j] = min(ls[_LO + j], y)
                ls[_HI + j] = max(ls[_HI + j], _NEG if bad else x)
        if b == 0 and cnt.shape[0] > 0:
            for j in range(L):
                cnt[ao + j] = np.uint16(ls[_N + j])

        for qi in range(Q):
            # Bisection for v_k = smallest v with #(x <= v) > k, k = kk[n] per lane.
            # Sentinels/padding exceed every v tried (< 65535), so over all Rp rows
            # #(x <= v) = Rp - #(x > v): the test is #(x > v) < Rp - k =: lim.
            for j in range(L):
                nj = np.uint16(ls[_N + j])
                ls[_LIM + j] = np.int16(np.int64(Rp) - np.int64(kk[qi, nj]))
                loj = ls[_LO + j]
                hij = ls[_HI + j]
                ls[_VA + j] = loj if nj > 0 else _NEG
                ls[_VB + j] = hij if nj > 0 else _NEG
            while True:
                busy = False
                for j in range(L):
                    busy |= ls[_VA + j] < ls[_VB + j]
                if not busy:
                    break
                for j in range(L):
                    ls[_MID + j] = (np.int32(ls[_VA + j]) + np.int32(ls[_VB + j])) >> 1
                    ls[_CNT + j] = 0
                for r in range(_u(0), Rp, U):
                    o0 = r * L
                    o1_ = o0 + L
                    o2 = o1_ + L
                    o3 = o2 + L
                    for j in range(L):
                        mj = ls[_MID + j]
                        # pairwise sum: short dependency chain per counter
                        ls[_CNT + j] += ((buf[o0 + j] > mj) + (buf[o1_ + j] > mj)) + (
                            (buf[o2 + j] > mj) + (buf[o3 + j] > mj)
                        )
                for j in range(L):
                    below = ls[_CNT + j] < ls[_LIM + j]
                    mj = ls[_MID + j]
                    vaj = ls[_VA + j]
                    vbj = ls[_VB + j]
                    # Arithmetic select: a ternary here compiles to per-lane branches.
                    # Converged lanes (va == vb == v_k) always take "below": stable.
                    ls[_VB + j] = vbj + below * (mj - vbj)
                    ls[_VA + j] = mj + np.int16(1) + below * (vaj - mj - np.int16(1))

            # v_{k+1} is v_k again if more than k+1 values are <= v_k, else the
            # smallest value above v_k: one pass for both.
            for j in range(L):
                ls[_CNT + j] = 0
                ls[_VB + j] = _SENT
            for r in range(Rp):
                o = r * L
                for j in range(L):
                    y = buf[o + j]
                    gt = y > ls[_VA + j]
                    ls[_CNT + j] += gt
                    ls[_VB + j] = min(ls[_VB + j], y if gt else _SENT)

            # numpy's _lerp in float64: a + d*g, or b - d*(1-g) where g >= 0.5. The
            # table has g = 0 where numpy takes the last value (and for n == 0): the
            # result is then a exactly, whichever b was picked.
            oo = ((qi * B + b) * H + h) * W + c0
            for j in range(L):
                nj = np.uint16(ls[_N + j])
                a = np.float64(np.int32(ls[_VA + j]) + 32768)
                nxt = np.float64(np.int32(ls[_VB + j]) + 32768)
                bv = a if ls[_CNT + j] < ls[_LIM + j] - np.int16(1) else nxt
                g = tt[qi, nj]
                d = bv - a
                lerp_lo = a + d * g
                lerp_hi = bv - d * (1.0 - g)
                res = np.float32(lerp_hi if g >= 0.5 else lerp_lo)
                o1[oo + j] = res if nj > 0 else np.float32(np.nan)


@njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _kernel(
    addr, geo, planes, m1, mbit, act, nd, T, H, W, kk, tt, o1, cnt, order
):  # pragma: no cover
    nb = (W + _u(_LANES - 1)) // _u(_LANES)
    for i in prange(order.shape[0]):
        task = order[i]
        h = task // nb
        _block(
            addr,
            geo,
            planes,
            m1,
            mbit,
            act,
            nd,
            T,
            H,
            W,
            kk,
            tt,
            o1,
            cnt,
            h,
            task % nb * _u(_LANES),
        )


@dataclass
class Source:
    """Where the kernel finds observation (t, band, y, x) of a (T, B, H, W) uint16 window,
    so that it reads the data where the reader put it (chunk by chunk) instead of a copy.

    The window's pixels lie in chunks of ``chunk`` = (height, width) pixels; chunk (cy, cx) of
    scene t starts at byte address ``addr[t, cy, cx]`` and holds the bands as planes
    ``plane`` elements apart; window pixel (0, 0) is pixel ``origin`` of chunk (0, 0).
    ``planes`` picks, per output band, the plane to read. ``keep`` holds the objects that own
    the memory: the addresses are valid only while it is alive.
    """

    addr: np.ndarray  # uint64 (T, GY, GX)
    chunk: tuple[int, int]
    plane: int
    origin: tuple[int, int]
    planes: np.ndarray  # int64 (B,)
    height: int
    width: int
    keep: tuple = ()

    def __post_init__(self) -> None:
        if self.width < SOURCE_MIN_WIDTH:
            raise ValueError(f"a Source must be at least {_LANES} pixels wide")
        if min(self.chunk[1], self.chunk[0]) < 1 or self.chunk[1] < _LANES:
            raise ValueError(f"chunks must be at least {_LANES} pixels wide")
        gy, gx = self.addr.shape[1:]
        oy, ox = self.origin
        if oy + self.height > gy * self.chunk[0] or ox + self.width > gx * self.chunk[1]:
            raise ValueError("the chunk table does not cover the window")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.addr.shape[0], len(self.planes), self.height, self.width)

    @classmethod
    def from_array(cls, stack: np.ndarray) -> Source:
        """A C-contiguous uint16 (T, B, H, W) array as one chunk per scene."""
        stack = np.ascontiguousarray(stack)
        t, b, h, w = stack.shape
        step = b * h * w * stack.itemsize
        addr = (stack.ctypes.data + step * np.arange(t, dtype=np.uint64)).reshape(t, 1, 1)
        return cls(addr.astype(np.uint64), (h, w), h * w, (0, 0), np.arange(b), h, w, (stack,))


def _check_inputs(stack: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(stack, np.ndarray) or not isinstance(mask, np.ndarray):
        raise ValueError("stack and mask must be numpy arrays")
    if stack.dtype != np.uint16:
        raise ValueError(f"stack must be uint16, got {stack.dtype}")
    if stack.ndim != 4:
        raise ValueError(f"stack must be (T, B, H, W), got shape {stack.shape}")
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be bool (True = excluded), got {mask.dtype}")
    t, _, h, w = stack.shape
    if mask.shape != (t, h, w):
        raise ValueError(f"mask shape {mask.shape} does not match stack (T, H, W) = {(t, h, w)}")
    if t > _MAX_T:
        raise ValueError(f"at most {_MAX_T} observations per pixel, got {t}")
    return stack, mask


def quantile_fraction(q: float) -> np.floating:
    """q / 100 with numpy's own dtype rules (np.float32 q stays float32, like nanpercentile)."""
    if isinstance(q, bool | np.bool_) or not isinstance(q, numbers.Real):
        raise ValueError(f"q must be a real number in [0, 100], got {q!r}")
    qf = np.true_divide(q, 100)
    if qf.dtype not in (np.float16, np.float32, np.float64):
        qf = np.true_divide(float(q), 100)  # e.g. longdouble: computed in float64
    if not 0.0 <= qf <= 1.0:  # also rejects NaN; same test as numpy (on q / 100)
        raise ValueError(f"q must be in [0, 100], got {q!r}")
    return qf


def _virtual_index(n: np.ndarray, qf: np.floating) -> tuple[np.ndarray, np.ndarray]:
    """numpy 'linear' method for n valid values: (lower rank, gamma as float64).

    Replays numpy's ``_quantile``: virtual index ``(n - 1) * q`` in q's dtype, floor and
    fractional part; at or past the last rank numpy takes the last value (we return rank
    n - 1 and gamma 0, which gives the same value). ``n == 0`` gives rank 0, gamma 0.
    """
    nm1 = (n.astype(np.int64) - 1).astype(qf.dtype)
    v = nm1 * qf
    prev = np.floor(v)
    last = v >= nm1
    k = np.where(last, nm1, prev)
    g = np.where(last, 0.0, (v - prev).astype(np.float64))
    empty = n == 0
    return np.where(empty, 0, k).astype(np.int64), np.where(empty, 0.0, g)


def _tables(qfs: list[np.floating], t: int) -> tuple[np.ndarray, np.ndarray]:
    n = np.arange(t + 1)
    kk = np.empty((len(qfs), t + 1), dtype=np.int16)
    tt = np.empty((len(qfs), t + 1), dtype=np.float64)
    for i, qf in enumerate(qfs):
        k, g = _virtual_index(n, qf)
        kk[i] = k
        tt[i] = g
    return kk, tt


def _run(stack: np.ndarray, mask: np.ndarray, qfs: list[np.floating]) -> np.ndarray:
    t, b, h, w = stack.shape
    out = np.empty((len(qfs), b, h, w), dtype=np.float32)
    if out.size == 0:
        return out
    if w < _LANES:
        # Narrow input: pad to one full block (masked) so the kernel keeps fixed-width loops.
        ps = np.zeros((t, b, h, _LANES), dtype=np.uint16)
        pm = np.ones((t, h, _LANES), dtype=np.bool_)
        ps[..., :w] = stack
        pm[..., :w] = mask
        return _run(ps, pm, qfs)[..., :w].copy()
    return run_source(Source.from_array(stack), mask, qfs)[0]


def run_source(
    src: Source,
    mask: np.ndarray,
    qfs: list[np.floating],
    nodata: int | None = None,
    active: np.ndarray | None = None,
    count: bool = False,
    mask_bits: int = 1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The kernel on a Source: float32 (len(qfs), B, H, W) and, with ``count``, the number of
    valid observations of the first band per pixel (uint16 (H, W)).

    ``mask``: bool (T, H, W), or uint8 flags of which ``mask_bits`` exclude an observation
    (several masks in one array; 0 excludes none). ``nodata``: a value that counts as missing,
    like a masked observation. ``active``: bool (H, W); only these pixels are computed (the
    others are left unset: callers select them)."""
    t, b, h, w = src.shape
    if mask.shape != (t, h, w) or mask.dtype not in (np.bool_, np.uint8):
        raise ValueError(f"mask must be bool/uint8 {(t, h, w)}, got {mask.dtype} {mask.shape}")
    if t > _MAX_T:
        raise ValueError(f"at most {_MAX_T} observations per pixel, got {t}")
    out = np.empty((len(qfs), b, h, w), dtype=np.float32)
    cnt = np.zeros((h, w) if count else (0, 0), dtype=np.uint16)
    if out.size == 0:
        return out, (cnt if count else None)
    mask = np.ascontiguousarray(mask)
    act = np.ascontiguousarray(active, dtype=np.bool_) if active is not None else np.empty(0, bool)
    kk, tt = _tables(qfs, t)
    # One task per block (row h, block j) = h * nb + j. prange hands each thread one
    # contiguous slice of ``order``: interleaving rows in groups of 16 spreads cloudy
    # (cheap) and clear (expensive) areas over the threads.
    nb = -(-w // _LANES)
    tasks = np.arange(h * nb, dtype=np.uint64)
    order = tasks[np.argsort((tasks // nb) % 16, kind="stable")]
    ch, cw = src.chunk
    oy, ox = src.origin
    geo = np.array([ch, cw, src.plane, oy, ox], dtype=np.uint64)
    _kernel(
        np.ascontiguousarray(src.addr, dtype=np.uint64),
        geo,
        np.asarray(src.planes, dtype=np.uint64),
        mask.reshape(-1).view(np.uint8),
        np.uint8(mask_bits),
        act.reshape(-1).view(np.uint8),
        np.int64(-1 if nodata is None else nodata),
        _u(t),
        _u(h),
        _u(w),
        kk,
        tt,
        out.reshape(-1),
        cnt.reshape(-1),
        order,
    )
    return out, (cnt if count else None)


def masked_percentile(stack: np.ndarray, mask: np.ndarray, q: float) -> np.ndarray:
    """q-th percentile over time of the unmasked observations.

    stack: uint16 (T, B, H, W); mask: bool (T, H, W), True = observation excluded;
    q in [0, 100]. Returns float32 (B, H, W), NaN where no observation is valid; equal to
    ``np.nanpercentile(x, q, axis=0, method="linear")`` cast to float32. Runs on numba's
    thread pool (``numba.set_num_threads`` / ``NUMBA_NUM_THREADS``).
    """
    stack, mask = _check_inputs(stack, mask)
    return _run(stack, mask, [quantile_fraction(q)])[0]


def masked_percentile_many(stack: np.ndarray, mask: np.ndarray, qs: list[float]) -> np.ndarray:
    """Several percentiles in one pass over the data: float32 (len(qs), B, H, W)."""
    stack, mask = _check_inputs(stack, mask)
    qfs = [quantile_fraction(q) for q in qs]
    if not qfs:
        raise ValueError("qs must hold at least one percentile")
    return _run(stack, mask, qfs)


def kersten_percentile(stack: np.ndarray, mask: np.ndarray, q: float) -> np.ndarray:
    """Reference in plain numpy (Kersten's sort-based method), same contract.

    Masked observations become 65535, which sorts after (or ties with) every valid value,
    so after sorting along time ranks 0..n-1 hold the n valid values in order. The
    fractional rank picks floor/ceil per pixel with take_along_axis, then numpy's lerp.
    """
    stack, mask = _check_inputs(stack, mask)
    qf = quantile_fraction(q)
    t, b, h, w = stack.shape
    if t == 0 or stack.size == 0:
        return np.full((b, h, w), np.nan, dtype=np.float32)
    s = np.where(mask[:, None], np.uint16(65535), stack)
    s.sort(axis=0)
    n = t - np.count_nonzero(mask, axis=0)
    k, g = _virtual_index(n, qf)
    k1 = np.minimum(k + 1, np.maximum(n - 1, 0))
    a = np.take_along_axis(s, np.broadcast_to(k, (1, b, h, w)), axis=0)[0].astype(np.float64)
    bv = np.take_along_axis(s, np.broadcast_to(k1, (1, b, h, w)), axis=0)[0].astype(np.float64)
    d = bv - a
    res = np.where(g >= 0.5, bv - d * (1.0 - g), a + d * g)
    return np.where(n == 0, np.nan, res).astype(np.float32)
