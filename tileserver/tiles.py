"""Serving one tile: the cache, the bounded render queue, and the response with its headers.

Renders run in a pool of ``render_threads`` threads, never in the event loop or the general
thread pool: memory a render frees is kept by its thread's malloc arena for the next one
(compositor/alloc.py), so the number of render threads, not the number of clients, bounds it.
At most ``render_queue`` more tiles wait for a thread; past that a request gets 503 with
Retry-After at once, and cached tiles, /health and the other routes stay fast.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from rio_tiler.errors import TileOutsideBounds

from compositor.memory import after_render
from compositor.tiling import NoData
from tileserver import timing
from tileserver.cache import TILE_MAX_AGE, Entry, TileCache, etag_matches, etag_of

log = logging.getLogger("clearsky.tileserver")


class Overloaded(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"too many tiles waiting; retry in {retry_after} s")
        self.retry_after = retry_after


def lower_thread_priority(by: int) -> None:
    """Lower the calling thread's scheduling priority by ``by`` (Linux: nice is per thread;
    threads it starts, such as numba's TBB workers, inherit it). A no-op where that is not
    possible or ``by`` is 0."""
    if by <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + by, 19))
    except (AttributeError, OSError):
        pass


class RenderQueue:
    """At most ``threads`` renders at once and ``depth`` waiting; 503 past that."""

    def __init__(self, threads: int, depth: int, nice: int = 0):
        self.threads, self.depth = threads, depth
        self._pool = ThreadPoolExecutor(
            threads,
            thread_name_prefix="clearsky-render",
            initializer=lower_thread_priority,
            initargs=(nice,),
        )
        self.pending = 0  # running + waiting; touched on the event loop only
        self._mean_s = 0.1  # moving mean of a render's duration, for Retry-After

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_s * (self.pending + 1) / self.threads))

    async def run(self, fn: Callable[[], object]) -> object:
        if self.pending >= self.threads + self.depth:
            raise Overloaded(self.retry_after())
        loop = asyncio.get_running_loop()
        gone = threading.Event()  # the client left before a thread was free: skip the work

        def job():
            if gone.is_set():
                return None
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                self._mean_s += 0.1 * (time.perf_counter() - t0 - self._mean_s)
                after_render()  # the heap bound is checked now, in its own thread

        self.pending += 1
        fut = self._pool.submit(job)
        fut.add_done_callback(lambda _: loop.call_soon_threadsafe(self._done))
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            gone.set()
            raise

    def _done(self) -> None:
        self.pending -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RenderError(Exception):
    """A tile that cannot be rendered for a reason the client may see (status, detail)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _guarded(render: Callable[[], tuple[bytes, str]]) -> Callable[[], tuple]:
    """Run ``render`` in a render thread with its own Server-Timing record; map what it raises
    to a client-facing (status, detail) without paths or tracebacks."""

    def job() -> tuple:
        stages, token = timing.open_record()
        t0 = time.perf_counter()
        try:
            body, media_type = render()
            return 200, body, media_type, stages, time.perf_counter() - t0
        except (TileOutsideBounds, NoData) as exc:
            return 404, str(exc), None, stages, 0.0
        except RenderError as exc:
            return exc.status, exc.detail, None, stages, 0.0
        except Exception:
            log.exception("tile render failed")
            return 500, "internal error while rendering the tile (logged)", None, stages, 0.0
        finally:
            timing.close_record(token)

    return job


async def _unless_client_leaves(request: Request, work: Awaitable[tuple]) -> tuple | None:
    """``await work``, or cancel it and return None if the client disconnects first: a tile
    still waiting for a render thread is then never rendered (browsers drop the tiles a map
    no longer shows by closing their connections)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if job.done():
        return job.result()
    job.cancel()
    return None


class TileService:
    def __init__(self, cache: TileCache, queue: RenderQueue):
        self.cache, self.queue = cache, queue

    async def respond(
        self, request: Request, key: Hashable, render: Callable[[], tuple[bytes, str]]
    ) -> Response:
        stats = self.cache.stats
        stats.tiles += 1
        inm = request.headers.get("if-none-match")
        hit = self.cache.get(key)
        if hit is not None:
            stats.hits += 1
            return self._reply(hit, inm, b"cache;desc=hit")
        try:
            out = await _unless_client_leaves(request, self.queue.run(_guarded(render)))
            if out is None:  # the client went away (a map panned past the tile): nothing to send
                return Response(status_code=499)
            status, body, media_type, stages, elapsed = out
        except Overloaded as exc:
            stats.rejected += 1
            return JSONResponse(
                {"detail": str(exc)}, 503, headers={"Retry-After": str(exc.retry_after)}
            )
        if status != 200:
            stats.errors += 1
            return JSONResponse({"detail": body}, status)
        stats.rendered += 1
        stats.render_seconds += elapsed
        entry = Entry(body, media_type, etag_of(body))
        self.cache.put(key, entry)
        return self._reply(entry, inm, timing.header(stages, elapsed))

    def _reply(self, e: Entry, inm: str | None, server_timing: bytes) -> Response:
        headers = {
            "ETag": e.etag,
            "Cache-Control": f"public, max-age={TILE_MAX_AGE}",
            # Stage times for the browser's network panel, readable from any origin.
            "Server-Timing": server_timing.decode(),
            "Timing-Allow-Origin": "*",
        }
        if etag_matches(inm, e.etag):
            self.cache.stats.not_modified += 1
            return Response(status_code=304, headers=headers)
        return Response(e.body, media_type=e.media_type, headers=headers)
