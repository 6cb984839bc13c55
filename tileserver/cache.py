"""Tile cache, ETag / 304 and Cache-Control, as a plain ASGI middleware.

A rendered tile is keyed by its path and its canonical (sorted) query string, so every query
parameter that changes pixels is part of the key. Only 200 responses are stored: an error is
never served later as if it were a tile. Plain ASGI (not BaseHTTPMiddleware) because a cache hit
should cost well under a millisecond of Python.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode

from cachetools import LRUCache

from tileserver import timing

TILE_MAX_AGE = 3600  # tiles change only when a stack gains scenes or masks


@dataclass
class Stats:
    tiles: int = 0
    hits: int = 0
    not_modified: int = 0
    errors: int = 0
    render_seconds: float = 0.0
    rendered: int = 0
    started: float = field(default_factory=time.time)

    def as_dict(self, cache: LRUCache) -> dict:
        return {
            "tiles_served": self.tiles,
            "cache_hits": self.hits,
            "not_modified": self.not_modified,
            "errors": self.errors,
            "tiles_rendered": self.rendered,
            "mean_render_ms": round(1000 * self.render_seconds / self.rendered, 2)
            if self.rendered
            else None,
            "cache_bytes": int(cache.currsize),
            "cache_max_bytes": int(cache.maxsize),
            "cache_entries": len(cache),
            "uptime_s": round(time.time() - self.started, 1),
        }


def _is_tile(path: str) -> bool:
    return "/tiles/" in path


_RETINA = re.compile(r"^(?P<head>.*/tiles/[^/]+/\d+/\d+/\d+)@(?P<scale>[1-4])x(?P<ext>\.\w+)?$")


def retina_rewrite(scope: dict) -> dict:
    """`.../{y}@2x.png` -> `.../{y}.png?tilesize=512` (titiler's routes know tilesize only)."""
    m = _RETINA.match(scope["path"])
    if not m:
        return scope
    q = scope.get("query_string", b"")
    size = 256 * int(m["scale"])
    q = (q + b"&" if q else b"") + f"tilesize={size}".encode()
    path = m["head"] + (m["ext"] or "")
    return {**scope, "path": path, "raw_path": path.encode(), "query_string": q}


def canonical_key(path: str, query: bytes) -> str:
    pairs = sorted(parse_qsl(query.decode("latin-1"), keep_blank_values=True))
    return path + "?" + urlencode(pairs)


def etag_of(body: bytes) -> bytes:
    return b'"' + hashlib.blake2b(body, digest_size=12).hexdigest().encode() + b'"'


class TileCacheMiddleware:
    def __init__(self, app, max_bytes: int, state=None):
        self.app = app
        self.cache: LRUCache = LRUCache(maxsize=max(max_bytes, 1), getsizeof=lambda v: len(v[0]))
        self.enabled = max_bytes > 0
        self.stats = Stats()
        if state is not None:
            state.tile_cache = self  # so /metrics can report it

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        if not _is_tile(scope["path"]):
            return await self.app(scope, receive, send)
        scope = retina_rewrite(scope)
        self.stats.tiles += 1
        key = canonical_key(scope["path"], scope.get("query_string", b""))
        inm = dict(scope["headers"]).get(b"if-none-match")
        hit = self.cache.get(key) if self.enabled else None
        if hit is not None:
            self.stats.hits += 1
            body, ctype, etag = hit
            return await self._reply(send, scope, body, ctype, etag, inm, timing=b"cache;desc=hit")

        t0 = time.perf_counter()
        stages, token = timing.open_record()
        captured: dict = {"status": 0, "headers": [], "body": []}

        async def capture(message):
            if message["type"] == "http.response.start":
                captured["status"] = message["status"]
                captured["headers"] = message.get("headers", [])
            elif message["type"] == "http.response.body":
                captured["body"].append(message.get("body", b""))

        try:
            await self.app(scope, receive, capture)
        finally:
            timing.close_record(token)
        body = b"".join(captured["body"])
        status = captured["status"]
        if status != 200:
            self.stats.errors += 1
            await send(
                {"type": "http.response.start", "status": status, "headers": captured["headers"]}
            )
            await send({"type": "http.response.body", "body": body})
            return
        self.stats.rendered += 1
        elapsed = time.perf_counter() - t0
        self.stats.render_seconds += elapsed
        ctype = dict(captured["headers"]).get(b"content-type", b"application/octet-stream")
        if ctype == b"image/jpg":  # titiler's name; the registered media type is image/jpeg
            ctype = b"image/jpeg"
        etag = etag_of(body)
        if self.enabled:  # the event loop is the only thread touching the cache
            self.cache[key] = (body, ctype, etag)
        await self._reply(
            send, scope, body, ctype, etag, inm, captured["headers"], timing.header(stages, elapsed)
        )

    async def _reply(self, send, scope, body, ctype, etag, inm, extra=(), timing=b""):
        headers = [
            (k, v)
            for k, v in extra
            if k.lower() not in (b"content-length", b"content-type", b"etag", b"cache-control")
        ]
        headers += [
            (b"content-type", ctype),
            (b"etag", etag),
            (b"cache-control", f"public, max-age={TILE_MAX_AGE}".encode()),
        ]
        if timing:  # stage times for the browser's network panel, readable from any origin
            headers += [(b"server-timing", timing), (b"timing-allow-origin", b"*")]
        if inm is not None and etag in [t.strip() for t in inm.split(b",")]:
            self.stats.not_modified += 1
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )
