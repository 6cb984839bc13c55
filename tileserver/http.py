"""Running the server: uvicorn with connection timeouts, and the URL printed once it answers.

uvicorn closes a keep-alive connection idle after a response (``timeout_keep_alive``), but
not one that never sends a request, nor one that sends part of its headers and stalls: each
would hold a socket (and a slot of the process's file descriptors) forever. The protocol here
closes a connection whose request headers are not complete ``header_timeout`` seconds after
it opened or after its last response.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tileserver.settings import get_settings


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a deadline for each request's headers."""

    _header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(
            get_settings().header_timeout_s, self._header_timeout
        )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def _announce(url: str, probe: str, deadline_s: float = 600.0) -> None:
    """Print the viewer's URL once the server answers /health (not before it listens)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(probe, timeout=2) as r:
                if r.status == 200:
                    print(f"ClearSky viewer: {url}", flush=True)
                    return
        except OSError:
            time.sleep(0.2)


def run(host: str, port: int, workers: int = 1) -> None:
    """Serve ``tileserver.main:app`` (settings from CLEARSKY_* variables) until stopped."""
    import uvicorn

    settings = get_settings()
    local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    netloc = f"[{local}]:{port}" if ":" in local else f"{local}:{port}"
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    threading.Thread(
        target=_announce,
        args=(f"http://{shown}/", f"http://{netloc}/health"),
        daemon=True,
    ).start()
    uvicorn.run(
        "tileserver.main:app",
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        http=GuardedHttpToolsProtocol,
        timeout_keep_alive=max(1, round(settings.idle_timeout_s)),
    )
