"""The cells a server knows: the stacks in its data directory. A request names a cell id, never a
path, and only ids found here resolve to a store.

Whatever the data directory holds, the server starts: a cell whose store cannot be read is left
out, and a scene with a damaged shard is left out of its cell, each with one warning naming it
(in the log, and in /cells or /health). Two folders naming the same cell (``49NDB.zarr`` and
``49ndb.zarr``) are an error logged at start: the folder named exactly ``<ID>.zarr`` is served,
or none if no folder has that exact name, so a stray copy never silently replaces a cell.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from compositor.grid import CellError, normalize_cell_id
from compositor.stack import Stack, StackError

log = logging.getLogger("clearsky.tileserver")

RESCAN_INTERVAL_S = 10.0  # an unknown cell id rescans the data directory at most this often


class UnknownCell(LookupError):
    pass


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a store's root metadata is rewritten (new scenes, masks)."""
    try:
        st = os.stat(path / "zarr.json")
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Registry:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self._stacks: dict[str, Stack] = {}
        self._stamps: dict[str, tuple] = {}
        self.warnings: list[str] = []  # cells not served, and why (for /health)
        self._lock = threading.Lock()
        self._scanned = 0.0
        self._logged: set[str] = set()  # each problem is logged once, not at every rescan
        self.refresh()

    def _candidates(self) -> dict[str, list[Path]]:
        """Cell id -> the folders in the data directory that name it."""
        out: dict[str, list[Path]] = {}
        if not self.data_dir.is_dir():
            return out
        for p in sorted(self.data_dir.glob("*.zarr")):
            try:
                cid = normalize_cell_id(p.name[: -len(".zarr")])
            except CellError:
                continue  # not a cell store; ignore rather than expose it
            out.setdefault(cid, []).append(p)
        return out

    def refresh(self) -> None:
        """Scan the data directory. Stores whose root metadata did not change keep their open
        Stack (and what it learnt: damaged scenes, cached DEM chunks)."""
        found: dict[str, Stack] = {}
        stamps: dict[str, tuple] = {}
        warnings: list[str] = []
        for cid, paths in self._candidates().items():
            path = self._pick(cid, paths, warnings)
            if path is None:
                continue
            stamp = _stamp(path)
            old = self._stacks.get(cid)
            if old is not None and self._stamps.get(cid) == (str(path), stamp):
                found[cid], stamps[cid] = old, (str(path), stamp)
                continue
            try:
                st = Stack.open(path)
                st.verify()
            except StackError as exc:
                why = str(exc).replace(str(path), path.name)
                self._report(warnings, logging.WARNING, f"cell {cid} not served: {why}")
                continue
            if st.cell_id.upper() != cid:
                log.warning("cell %s: the store %s says it is cell %s", cid, path.name, st.cell_id)
            found[cid], stamps[cid] = st, (str(path), stamp)
        with self._lock:
            self._stacks, self._stamps, self.warnings = found, stamps, warnings
            self._scanned = time.monotonic()

    def _report(self, warnings: list[str], level: int, msg: str, hint: str = "") -> None:
        warnings.append(msg)
        if msg not in self._logged:
            self._logged.add(msg)
            log.log(level, "%s%s", msg, hint)

    def _pick(self, cid: str, paths: list[Path], warnings: list[str]) -> Path | None:
        if len(paths) == 1:
            return paths[0]
        names = ", ".join(p.name for p in paths)
        exact = [p for p in paths if p.name == f"{cid}.zarr"]
        if exact:
            msg = f"cell {cid}: {len(paths)} folders name it ({names}); serving {cid}.zarr only"
        else:
            msg = (
                f"cell {cid} not served: {len(paths)} folders name it ({names}), none is {cid}.zarr"
            )
        self._report(warnings, logging.ERROR, msg, "; rename or remove the others")
        return exact[0] if exact else None

    def ids(self) -> list[str]:
        return sorted(self._stacks)

    def stacks(self) -> list[Stack]:
        stacks = self._stacks
        return [stacks[c] for c in sorted(stacks)]

    def get(self, cell_id: str) -> Stack:
        try:
            cid = normalize_cell_id(cell_id)
        except CellError as exc:
            raise UnknownCell(str(exc)) from None
        stack = self._stacks.get(cid)
        if stack is None and time.monotonic() - self._scanned > RESCAN_INTERVAL_S:
            self.refresh()  # a stack prefetched after start-up (at most every few seconds)
            stack = self._stacks.get(cid)
        if stack is None:
            raise UnknownCell(
                f"unknown cell {cid!r}; known cells: {', '.join(self.ids()) or 'none'}"
            )
        return stack
