"""Per-stage render times of a tile, reported in the standard ``Server-Timing`` header.

The tile cache middleware opens a record per request; the reader and the encoder add their stage
times to it from the worker thread (anyio copies the context into the thread, and the record is
a shared dict). Browsers show it in their network panel; bench/tiles.py reads it.
"""

from __future__ import annotations

from contextvars import ContextVar

_RECORD: ContextVar[dict[str, float] | None] = ContextVar("clearsky_stage_times", default=None)


def open_record() -> tuple[dict[str, float], object]:
    rec: dict[str, float] = {}
    return rec, _RECORD.set(rec)


def close_record(token: object) -> None:
    _RECORD.reset(token)  # type: ignore[arg-type]


def record(seconds: dict[str, float]) -> None:
    """Add stage durations (seconds) to the current request's record, if there is one."""
    rec = _RECORD.get()
    if rec is not None:
        for k, v in seconds.items():
            rec[k] = rec.get(k, 0.0) + v


def header(rec: dict[str, float], total: float | None = None) -> bytes:
    """``Server-Timing`` value, durations in milliseconds."""
    items = [f"{k};dur={v * 1000:.1f}" for k, v in rec.items()]
    if total is not None:
        items.append(f"total;dur={total * 1000:.1f}")
    return ", ".join(items).encode()


def parse(value: str) -> dict[str, float]:
    """Milliseconds per metric of a ``Server-Timing`` header (the inverse of ``header``)."""
    out: dict[str, float] = {}
    for item in value.split(","):
        name, *params = (p.strip() for p in item.split(";"))
        for p in params:
            if p.startswith("dur="):
                out[name] = float(p[4:])
    return out
