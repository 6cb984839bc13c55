"""Checking the command line's arguments, before any network or disk work.

Every `clearsky` command turns its raw options into checked values with these helpers first,
then works. A helper that rejects a value raises :class:`BadInput` with one line naming the
option and the problem; the CLI prints it as ``error: ...`` and exits with status 2 (see
compositor/cli.py), so a new command gets the same behaviour by calling them.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Sequence
from pathlib import Path


class BadInput(ValueError):
    """An argument the command cannot use. The message is the one line the user sees."""


def date(text: str | None, option: str) -> dt.date | None:
    """``YYYY-MM-DD`` (a real calendar day) or None."""
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise BadInput(f"{option} must be a date YYYY-MM-DD, got {text!r}") from None


def date_range(start: str | None, end: str | None) -> tuple[dt.date | None, dt.date | None]:
    s, e = date(start, "--start"), date(end, "--end")
    if s and e and s > e:
        raise BadInput(f"--start {s} is after --end {e}")
    return s, e


def months(text: str | None) -> tuple[int, ...] | None:
    """``6,7,8,9`` or ``6-9`` (``11-2`` wraps the year) -> sorted months, or None."""
    if not text:
        return None
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d{1,2})(?:-(\d{1,2}))?", part)
        if not m:
            raise BadInput(f"--months must be months 1-12 like 6,7,8,9 or 6-9, got {text!r}")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if not (1 <= a <= 12 and 1 <= b <= 12):
            raise BadInput(f"--months must be months 1-12, got {text!r}")
        out.update(range(a, b + 1) if a <= b else [*range(a, 13), *range(1, b + 1)])
    if not out:
        raise BadInput(f"--months names no month: {text!r}")
    return tuple(sorted(out))


def bbox(text: str | None) -> tuple[float, float, float, float] | None:
    """``W,S,E,N`` in degrees, west < east and south < north."""
    if text is None:
        return None
    try:
        w, s, e, n = (float(x) for x in text.split(","))
    except ValueError:
        raise BadInput(f"--bbox must be W,S,E,N in degrees, got {text!r}") from None
    if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
        raise BadInput(
            f"--bbox {text!r} must have west < east and south < north, within -180..180 and "
            "-90..90 degrees"
        )
    return (w, s, e, n)


def cell(text: str) -> str:
    """An MGRS cell id such as 34TER (normalised)."""
    from compositor.grid import CellError, normalize_cell_id

    try:
        return normalize_cell_id(text)
    except CellError as exc:
        raise BadInput(str(exc)) from None


def int_list(text: str, option: str, lo: int = 0) -> tuple[int, ...]:
    """``0,1,2`` -> (0, 1, 2), each at least ``lo``."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise BadInput(f"{option} must be whole numbers like 0,1,2, got {text!r}") from None
    if not values or min(values) < lo:
        raise BadInput(f"{option} must be whole numbers >= {lo} like 0,1,2, got {text!r}")
    return values


def seeds(text: str, option: str = "--synthetic-seeds") -> list[int]:
    """``101-104,110`` -> [101, 102, 103, 104, 110]."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or int(m.group(2) or m.group(1)) < int(m.group(1)):
            raise BadInput(f"{option} must be seeds like 101-108 or 1,5,9, got {text!r}")
        out.extend(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return out


def choice(value: float, allowed: Sequence[float], option: str) -> float:
    if value not in allowed:
        listed = ", ".join(f"{v:g}" for v in allowed)
        raise BadInput(f"{option} must be one of {listed}, got {value:g}")
    return value


def existing_dir(path: Path, option: str = "--data", hint: str = "") -> Path:
    """A directory that exists, as an absolute path."""
    p = Path(path).expanduser()
    if not p.is_dir():
        what = "is not a directory" if p.exists() else "does not exist"
        raise BadInput(f"{option} {p} {what}{hint}")
    return p.resolve()


def writable_dir(path: Path, option: str) -> Path:
    """A directory we can create (if missing) and write into, as an absolute path. Nothing is
    created: the deepest existing folder gets a probe file, created and removed at once
    (permission bits alone cannot tell: root passes them on read-only mounts and /proc)."""
    import tempfile

    p = Path(path).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise BadInput(f"{option} {p} exists and is not a directory")
    q = p
    while not q.exists():
        q = q.parent
    try:
        if not q.is_dir():
            raise NotADirectoryError(str(q))
        with tempfile.NamedTemporaryFile(dir=q, prefix=".clearsky-probe-"):
            pass
    except OSError as exc:
        raise BadInput(f"{option} {p} cannot be written ({q}: {exc.strerror or exc})") from None
    return p


def output_file(path: Path, option: str, suffixes: Sequence[str] = ()) -> Path:
    """A file we can (over)write (with one of ``suffixes`` when given), as an absolute path."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        example = p / f"out{suffixes[0] if suffixes else ''}"
        raise BadInput(f"{option} {p} is a directory; give a file name like {example}")
    if suffixes and p.suffix.lower() not in suffixes:
        raise BadInput(f"{option} {p} must end with {' or '.join(suffixes)}")
    writable_dir(p.parent, f"{option}'s folder")
    if p.exists() and not os.access(p, os.W_OK):
        raise BadInput(f"{option} {p} exists and cannot be overwritten")
    return p


def existing_file(path: Path, option: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise BadInput(f"{option} {p} {'is not a file' if p.exists() else 'does not exist'}")
    return p.resolve()


def stack_of(cell_text: str, data_dir: Path) -> tuple[str, Path]:
    """(cell id, stack path) of one cell's stack in a data directory."""
    from compositor.stack import list_stacks

    cid = cell(cell_text)
    have = list_stacks(data_dir)
    if cid not in have:
        raise BadInput(f"no stack for cell {cid} in {data_dir} (have: {', '.join(have) or 'none'})")
    return cid, have[cid].resolve()


def stacks_of(cells: Sequence[str], data_dir: Path) -> list[tuple[str, Path]]:
    """Every named cell's stack, or every stack of the directory when none is named."""
    from compositor.stack import list_stacks

    if not cells:
        have = sorted(list_stacks(data_dir).items())
        if not have:
            raise BadInput(f"no stacks in {data_dir} (run `clearsky demo` or `clearsky prefetch`)")
        return [(c, p.resolve()) for c, p in have]
    return [stack_of(c, data_dir) for c in dict.fromkeys(cells)]


_SCHEDULER = re.compile(r"^(tcp|tls|ucx|ws|wss)://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def scheduler(text: str | None) -> str | None:
    """A Dask scheduler address ``tcp://HOST:PORT`` (or tls/ucx/ws/wss), or None."""
    if text is None:
        return None
    m = _SCHEDULER.match(text.strip())
    if not m or not 1 <= int(m.group(3)) <= 65535:
        raise BadInput(f"--scheduler must be an address like tcp://10.0.0.5:8786, got {text!r}")
    return text.strip()
