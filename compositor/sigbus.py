"""Survive a memory-mapped file that shrinks: SIGBUS on its lost pages reads zeros instead.

Reading a mapped page past the end of a file that was truncated after it was mapped raises
SIGBUS, which kills the process (numpy and numba cannot catch it). Local stacks are read through
memory maps (no copy of a tile's ~40 MB of observations), so a shard cut short by another
process while the server runs would take the server down. Here a native SIGBUS handler (a numba
``cfunc``: no Python, no GIL in the handler) checks whether the faulting address lies in a
registered mapping; if so it maps a page of zeros over it (zeros are nodata), counts the fault
and returns, and the read goes on. The reader then sees the count change, finds the shrunk
files, leaves their scenes out and renders again: no tile shows the zeros. A SIGBUS anywhere
else gets the default action, as before.

Linux / glibc only (x86-64 and aarch64 share the ``struct sigaction`` and ``siginfo_t`` layout
used here); elsewhere :func:`install` returns False and nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading

import numpy as np
from llvmlite import ir
from numba import cfunc, types
from numba.core import cgutils
from numba.extending import intrinsic

log = logging.getLogger(__name__)

CAPACITY = 1 << 16  # mapped regions at once (a stack maps one file per scene, level, array)
_SIGBUS = 7  # Linux, x86-64 and aarch64
_SA_SIGINFO, _SA_NODEFER = 0x4, 0x40000000
_SI_ADDR = 16  # offset of si_addr in siginfo_t on 64-bit Linux
_PAGE = 4096  # patched in pages of this size (the smallest page size of these platforms)

# [faults, last faulting address, (start, end) x CAPACITY]; the handler reads it by address.
_TABLE = np.zeros(2 + 2 * CAPACITY, np.uint64)
_T = int(_TABLE.ctypes.data)
_lock = threading.Lock()
_free = list(range(CAPACITY - 1, -1, -1))
_installed = False


@intrinsic
def _load(typingctx, addr):
    def codegen(context, builder, sig, args):
        p = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load_atomic(p, "monotonic", 8)

    return types.uint64(addr), codegen


@intrinsic
def _store(typingctx, addr, val):
    def codegen(context, builder, sig, args):
        p = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        v = context.cast(builder, args[1], sig.args[1], types.uint64)
        builder.store_atomic(v, p, "monotonic", 8)
        return context.get_dummy_value()

    return types.void(addr, val), codegen


@intrinsic
def _zero_page(typingctx, addr):
    """mmap(addr, PAGE, PROT_READ, MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS, -1, 0)."""

    def codegen(context, builder, sig, args):
        i64, i32, i8p = ir.IntType(64), ir.IntType(32), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(i8p, [i8p, i64, i32, i32, i32, i64])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "mmap")
        c = [
            ir.Constant(i64, _PAGE),
            ir.Constant(i32, 0x1),
            ir.Constant(i32, 0x02 | 0x10 | 0x20),
            ir.Constant(i32, -1),
            ir.Constant(i64, 0),
        ]
        builder.call(fn, [builder.inttoptr(args[0], i8p), *c])
        return context.get_dummy_value()

    return types.void(addr), codegen


@intrinsic
def _default_action(typingctx, signum):
    """signal(signum, SIG_DFL): the fault repeats on return and kills the process as usual."""

    def codegen(context, builder, sig, args):
        i32, i8p = ir.IntType(32), ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i8p, [i32, i8p]), "signal"
        )
        builder.call(fn, [builder.trunc(args[0], i32), ir.Constant(i8p, None)])
        return context.get_dummy_value()

    return types.void(signum), codegen


def _handler(signum, info, context):  # pragma: no cover - runs as a signal handler
    addr = _load(info + _SI_ADDR)
    for k in range(CAPACITY):
        start = _load(_T + 16 + 16 * k)
        if start != 0 and start <= addr and addr < _load(_T + 24 + 16 * k):
            _zero_page(addr & ~np.uint64(_PAGE - 1))
            _store(_T + 8, addr)
            _store(_T, _load(_T) + 1)
            return
    _default_action(signum)


class _SigAction(ctypes.Structure):
    _fields_ = [
        ("handler", ctypes.c_void_p),
        ("mask", ctypes.c_ubyte * 128),
        ("flags", ctypes.c_int),
        ("restorer", ctypes.c_void_p),
    ]


_compiled = None  # keeps the handler's machine code alive


def install() -> bool:
    """Install the handler (once per process). True if SIGBUS on registered maps is survived."""
    global _installed, _compiled
    if _installed:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        # The table's address is baked into the handler: compiled here, per process, uncached.
        _compiled = cfunc(types.void(types.int32, types.uint64, types.uint64))(_handler)
        sa = _SigAction()
        sa.handler = _compiled.address
        sa.flags = _SA_SIGINFO | _SA_NODEFER
        if libc.sigaction(_SIGBUS, ctypes.byref(sa), None) != 0:
            return False
    except (OSError, AttributeError) as exc:
        log.warning("no SIGBUS guard (%s): a mapped shard that shrinks would crash", exc)
        return False
    _installed = True
    return True


def faults() -> int:
    """How many lost pages were read as zeros so far (changes: go and find the shrunk file)."""
    return int(_TABLE[0])


class Region:
    """A registered mapping [start, end); unregistered when collected (before the map it
    covers is unmapped: hold the Region as long as the memory is read)."""

    def __init__(self, start: int, end: int, owner: object):
        self.owner = owner  # the mapping itself: it outlives the registration
        with _lock:
            self.slot = _free.pop() if _free else -1
        if self.slot >= 0:
            _TABLE[3 + 2 * self.slot] = end
            _TABLE[2 + 2 * self.slot] = start

    def __del__(self) -> None:
        if self.slot >= 0:
            _TABLE[2 + 2 * self.slot] = 0
            _TABLE[3 + 2 * self.slot] = 0
            with _lock:
                _free.append(self.slot)
