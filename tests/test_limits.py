"""Bad input, odd clients and overload: a 4xx naming the problem (never a 500), a cache that junk
cannot grow, connections that cannot be held open, and load shed with 503 + Retry-After."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import morecantile
import numpy as np
import pytest
from conftest import running_server
from PIL import Image

TMS = morecantile.tms.get("WebMercatorQuad")


@pytest.fixture(scope="module")
def tile(server) -> str:
    c = {c["id"]: c for c in httpx.get(f"{server}/cells").json()}["49NDB"]
    t = TMS.tile(*c["center"], 14)
    return f"{server}/cells/49NDB/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}"


def _metrics(server: str) -> dict:
    return httpx.get(f"{server}/metrics").json()


def _names(r: httpx.Response, name: str) -> None:
    """A 422 in FastAPI's documented shape whose location names the parameter."""
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    assert name in detail[0]["loc"] and detail[0]["msg"], detail


@pytest.mark.parametrize(
    "path, params, name",
    [
        ("/14/0/0.png", {"tilesize": 6144}, "tilesize"),
        ("/14/0/0.png", {"tilesize": 2**63}, "tilesize"),
        ("/14/0/0.png", {"tilesize": 1}, "tilesize"),
        ("/-1/0/0.png", {}, "z"),
        ("/25/0/0.png", {}, "z"),  # WebMercatorQuad has zooms 0-24
        ("/99999999999999999999/0/0.png", {}, "z"),
        ("/3/8/0.png", {}, "x"),
        ("/3/0/8.png", {}, "y"),
        ("/14/0/0.png", {"percentile": "nan"}, "percentile"),
        ("/14/0/0.png", {"gamma": "inf"}, "gamma"),
    ],
)
def test_out_of_range_is_422_naming_it(server, path, params, name):
    for base in (f"{server}/cells/49NDB/tiles/WebMercatorQuad", f"{server}/tiles/WebMercatorQuad"):
        _names(httpx.get(base + path, params=params), name)


def test_other_matrix_set_zooms_are_checked(server):
    _names(httpx.get(f"{server}/tiles/WorldCRS84Quad/30/0/0.png"), "z")
    _names(httpx.get(f"{server}/tiles/WorldCRS84Quad/1/4/0.png"), "x")  # 4 x 2 tiles at z1
    assert httpx.get(f"{server}/tiles/CanadianNAD83_LCC/1/0/0.png").status_code == 422


def test_repeated_parameter_is_422_and_cannot_poison_the_cache(tile):
    _names(httpx.get(f"{tile}.png?percentile=90&percentile=10"), "percentile")
    assert httpx.get(f"{tile}.png?percentile=10").status_code == 200


def test_cache_key_is_the_validated_parameters(server, tile):
    first = httpx.get(f"{tile}.png", params={"percentile": 33})
    assert first.status_code == 200
    entries = _metrics(server)["cache_entries"]
    # the same tile spelt differently, and with junk parameters: one entry, served as a hit
    for q in ("percentile=33.0", "percentile=33&junk=" + "x" * 1500, "mask=auto&percentile=33"):
        r = httpx.get(f"{tile}.png?{q}")
        assert r.status_code == 200 and r.headers["server-timing"] == "cache;desc=hit", q
        assert r.content == first.content
    for i in range(40):  # junk cannot grow the cache
        assert httpx.get(f"{tile}.png?percentile=33&j{i}={'y' * 1800}").status_code == 200
    assert _metrics(server)["cache_entries"] == entries


def test_long_query_is_414(tile):
    r = httpx.get(f"{tile}.png?junk={'z' * 3000}")
    assert r.status_code == 414 and "at most 2048" in r.json()["detail"]


def test_jpeg_and_webp_are_stretched_once(tile):
    def mean(ext: str) -> float:
        r = httpx.get(f"{tile}.{ext}", params={"rescale": "0,3000"})
        assert r.status_code == 200, r.text
        img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=float)
        return float(img.mean())

    png = mean("png")
    assert png > 30  # not black
    for ext in ("jpg", "webp"):
        assert abs(mean(ext) - png) < 0.1 * png, ext


def test_head_weak_etags_and_304(tile):
    url = f"{tile}.png?percentile=41"
    head = httpx.head(url)  # not cached yet
    assert head.status_code == 200 and head.headers["content-type"] == "image/png"
    assert head.content == b""
    get = httpx.get(url)
    assert get.status_code == 200 and int(head.headers["content-length"]) == len(get.content)
    etag = get.headers["etag"]
    assert httpx.head(url).headers["etag"] == etag
    for inm in (etag, f"W/{etag}", f'"nope", W/{etag}', "*"):
        assert httpx.get(url, headers={"If-None-Match": inm}).status_code == 304, inm
    assert httpx.get(url, headers={"If-None-Match": '"other"'}).status_code == 200


def test_openapi_documents_what_the_server_does(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    text = str(spec)
    assert "color_formula" not in text and "return_mask" not in text
    tile = spec["paths"]["/cells/{cell}/tiles/{tileMatrixSetId}/{z}/{x}/{y}.{format}"]["get"]
    assert {"200", "304", "404", "422", "503"} <= set(tile["responses"])
    size = next(p for p in tile["parameters"] if p["name"] == "tilesize")["schema"]
    assert (size["minimum"], size["maximum"]) == (64, 512)
    wmts = spec["paths"]["/WMTSCapabilities.xml"]["get"]["responses"]["200"]["content"]
    assert "application/xml" in wmts
    geo = spec["paths"]["/cells.geojson"]["get"]["responses"]["200"]["content"]
    assert "application/geo+json" in geo
    assert httpx.get(f"{server}/cells.geojson").headers["content-type"] == "application/geo+json"


def _closed_by_server(sock: socket.socket, wait_s: float) -> bool:
    """True if the server closes the connection within wait_s (recv gives b"")."""
    sock.settimeout(wait_s)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture(scope="module")
def strict_server(demo_dir, tmp_path_factory):
    """A server with one render thread, no queue and short connection timeouts."""
    log = tmp_path_factory.mktemp("strict") / "server.log"
    with running_server(
        demo_dir,
        log,
        CLEARSKY_RENDER_THREADS="1",
        CLEARSKY_RENDER_QUEUE="0",
        CLEARSKY_TILE_CACHE_MB="0",
        CLEARSKY_HEADER_TIMEOUT_S="1",
        CLEARSKY_IDLE_TIMEOUT_S="1",
    ) as url:
        yield url


def test_idle_and_partial_header_connections_are_closed(strict_server):
    host, port = strict_server.removeprefix("http://").split(":")
    silent = socket.create_connection((host, int(port)))
    partial = socket.create_connection((host, int(port)))
    partial.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    try:
        assert _closed_by_server(silent, 30)
        assert _closed_by_server(partial, 30)
    finally:
        silent.close()
        partial.close()
    assert httpx.get(f"{strict_server}/health").status_code == 200


def test_overload_is_shed_with_503_and_health_answers(strict_server):
    c = {c["id"]: c for c in httpx.get(f"{strict_server}/cells").json()}["49NDB"]
    t = TMS.tile(*c["center"], 14)
    base = f"{strict_server}/cells/49NDB/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png"
    health: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            health.append(httpx.get(f"{strict_server}/health", timeout=30).status_code)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            urls = [f"{base}?percentile={p}&tilesize=512" for p in range(2, 98, 6)]
            rs = list(pool.map(lambda u: httpx.get(u, timeout=120), urls))
    finally:
        stop.set()
        prober.join()
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    busy = next(r for r in rs if r.status_code == 503)
    assert int(busy.headers["retry-after"]) >= 1 and "retry" in busy.json()["detail"]
    assert health and set(health) == {200}
    assert _metrics(strict_server)["rejected_overload"] == codes.count(503)


def test_url_is_printed_once_the_server_answers(demo_dir):
    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "compositor.cli", "serve", "--port", str(port)],
        env={**os.environ, "CLEARSKY_DATA_DIR": str(demo_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in proc.stdout:  # bounded by the test timeout
            if line.startswith("ClearSky viewer:"):
                assert line.split()[-1] == f"http://127.0.0.1:{port}/"
                # printed only once it answers: the port is open now, no retry needed
                assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
                break
        else:
            pytest.fail("the server exited without printing its URL")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
