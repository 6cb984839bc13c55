"""The cells a server knows: the stacks in its data directory. A request names a cell id, never a
path, and only ids found here resolve to a store."""

from __future__ import annotations

import threading
from pathlib import Path

from compositor.grid import CellError, normalize_cell_id
from compositor.stack import Stack, StackError, list_stacks


class UnknownCell(LookupError):
    pass


class Registry:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self._stacks: dict[str, Stack] = {}
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        found: dict[str, Stack] = {}
        for cid, path in list_stacks(self.data_dir).items():
            try:
                found[normalize_cell_id(cid)] = Stack.open(path)
            except (CellError, StackError):
                continue  # not a cell store; ignore rather than expose it
        with self._lock:
            self._stacks = found

    def ids(self) -> list[str]:
        return sorted(self._stacks)

    def stacks(self) -> list[Stack]:
        return [self._stacks[c] for c in self.ids()]

    def get(self, cell_id: str) -> Stack:
        try:
            cid = normalize_cell_id(cell_id)
        except CellError as exc:
            raise UnknownCell(str(exc)) from None
        stack = self._stacks.get(cid)
        if stack is None:
            self.refresh()  # a stack prefetched after start-up
            stack = self._stacks.get(cid)
        if stack is None:
            raise UnknownCell(
                f"unknown cell {cid!r}; known cells: {', '.join(self.ids()) or 'none'}"
            )
        return stack
