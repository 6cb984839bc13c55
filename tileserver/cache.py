"""The rendered-tile cache (keys, ETags, 304s) and the request guard in front of the app.

A tile is keyed by its validated parameters (cell, matrix set, z/x/y, format, size and the
ViewParams every pixel depends on), never by the raw query string: unknown or repeated
parameters cannot grow the cache or serve one tile under another's URL. The byte bound counts a
fixed overhead per entry (key, ETag, bookkeeping) besides the image, so many tiny entries cannot
outgrow it. Only 200 responses are stored: an error is never served later as if it were a tile.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

from cachetools import LRUCache

TILE_MAX_AGE = 3600  # tiles change only when a stack gains scenes or masks
ENTRY_OVERHEAD = 1024  # bytes per cached tile besides its image: key tuple, ViewParams, ETag, LRU


@dataclass
class Stats:
    tiles: int = 0
    hits: int = 0
    not_modified: int = 0
    errors: int = 0
    rejected: int = 0  # 503: the render queue was full
    render_seconds: float = 0.0
    rendered: int = 0
    started: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Entry:
    body: bytes
    media_type: str
    etag: str


class TileCache:
    """LRU of rendered tiles bounded in bytes (image + ENTRY_OVERHEAD each); 0 disables it."""

    def __init__(self, max_bytes: int):
        self.enabled = max_bytes > 0
        self._lru: LRUCache = LRUCache(
            maxsize=max(max_bytes, 1), getsizeof=lambda e: len(e.body) + ENTRY_OVERHEAD
        )
        self._lock = threading.Lock()
        self.stats = Stats()

    def get(self, key: Hashable) -> Entry | None:
        if not self.enabled:
            return None
        with self._lock:
            return self._lru.get(key)

    def put(self, key: Hashable, entry: Entry) -> None:
        if self.enabled and len(entry.body) + ENTRY_OVERHEAD <= self._lru.maxsize:
            with self._lock:
                self._lru[key] = entry

    def as_dict(self) -> dict:
        s = self.stats
        with self._lock:
            size, entries = int(self._lru.currsize), len(self._lru)
        return {
            "tiles_served": s.tiles,
            "cache_hits": s.hits,
            "not_modified": s.not_modified,
            "errors": s.errors,
            "rejected_overload": s.rejected,
            "tiles_rendered": s.rendered,
            "mean_render_ms": round(1000 * s.render_seconds / s.rendered, 2)
            if s.rendered
            else None,
            "cache_bytes": size,
            "cache_max_bytes": int(self._lru.maxsize) if self.enabled else 0,
            "cache_entries": entries,
            "uptime_s": round(time.time() - s.started, 1),
        }


def etag_of(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison, as If-None-Match uses: ``W/"x"`` matches ``"x"``; ``*`` any."""
    if not if_none_match:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


_RETINA = re.compile(
    r"^(?P<head>.*/tiles/[^/]+/[^/]+/[^/]+/[^/@]+)@(?P<scale>[12])x(?P<ext>\.\w+)?$"
)


class RequestGuard:
    """Plain ASGI middleware in front of everything (cheap: no per-request Python objects):

    - a query string longer than MAX_QUERY_BYTES is a 414 naming the limit;
    - ``.../{y}@2x.png`` becomes ``.../{y}.png?tilesize=512``;
    - HEAD is answered as GET without the body, for every GET route (tiles cached or not).
    """

    def __init__(self, app, max_query_bytes: int):
        self.app = app
        self.max_query = max_query_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        q = scope.get("query_string", b"")
        if len(q) > self.max_query:
            return await _json(
                send,
                414,
                b'{"detail":"query string too long: %d bytes, at most %d"}'
                % (len(q), self.max_query),
            )
        m = _RETINA.match(scope["path"])
        if m:
            size = 256 * int(m["scale"])
            q = (q + b"&" if q else b"") + f"tilesize={size}".encode()
            path = m["head"] + (m["ext"] or "")
            scope = {**scope, "path": path, "raw_path": path.encode(), "query_string": q}
        if scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def no_body(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        return await self.app({**scope, "method": "GET"}, receive, no_body)


async def _json(send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
