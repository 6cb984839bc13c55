"""The viewer embedded in someone else's page: a blog post on another origin (a second real HTTP
server) with the iframe snippet from the viewer's "Copy embed code", opened in Debian's
Chromium. The iframe must show a bare map (no panel) with tiles, attribution and an "Open in
ClearSky" link, and nothing may error in either frame."""

from __future__ import annotations

import html
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import static_server
from test_viewer import ARGS, CHROMIUM, TILE_PIXELS_JS, _ignored

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is absent")

pytestmark = pytest.mark.browser

CELL = "49NDB"
ATTRIBUTION = "Contains modified Copernicus Sentinel data"

BLOG = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>A blog post</title>
<link rel="icon" href="data:,"></head>
<body style="font-family: serif; max-width: 760px; margin: 20px auto">
<h1>Borneo without clouds</h1>
<p>Twenty-four Sentinel-2 scenes, one cloud-free picture:</p>
{snippet}
<p>Made with ClearSky.</p>
</body></html>
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    if not Path(CHROMIUM).exists():  # test_viewer skips the module too; be explicit
        pytest.skip(f"browser tests need Debian's Chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def blog_dir(tmp_path: Path) -> Path:
    d = tmp_path / "blog"
    d.mkdir()
    return d


@pytest.fixture
def blog(blog_dir: Path) -> Iterator[str]:
    """A plain static site on another port (so another origin) than the tile server."""
    with static_server(blog_dir) as url:
        yield url


def record_errors(page: sync_api.Page) -> list[str]:
    """Console errors, page errors, failed requests and HTTP errors of the page and its frames."""
    errors: list[str] = []

    def on_console(msg: sync_api.ConsoleMessage) -> None:
        if msg.type == "error" and not _ignored(msg.location.get("url", "")):
            errors.append(f"console: {msg.text} ({msg.location.get('url')})")

    def on_failed(req: sync_api.Request) -> None:
        if not _ignored(req.url) and "ERR_ABORTED" not in (req.failure or ""):
            errors.append(f"request failed: {req.url} {req.failure}")

    def on_response(resp: sync_api.Response) -> None:
        if resp.status >= 400 and not _ignored(resp.url):
            errors.append(f"HTTP {resp.status}: {resp.url}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("requestfailed", on_failed)
    page.on("response", on_response)
    return errors


def embed_snippet(browser: sync_api.Browser, server: str, hash_: str) -> str:
    """The iframe snippet as a user gets it: from the viewer's "Copy embed code" box."""
    ctx = browser.new_context(viewport={"width": 1000, "height": 700})
    try:
        page = ctx.new_page()
        errors = record_errors(page)
        page.goto(f"{server}/{hash_}")
        page.wait_for_function("() => document.body.dataset.ready === '1'")
        snippet = page.input_value("#embed")
        assert not errors, errors
        return snippet
    finally:
        ctx.close()


def test_iframe_on_another_origin_shows_the_map(
    server: str, browser: sync_api.Browser, blog: str, blog_dir: Path, tmp_path: Path
) -> None:
    cell = {c["id"]: c for c in httpx.get(f"{server}/cells", timeout=30).json()}[CELL]
    lon, lat = cell["center"]
    view = f"#map=14/{lat:.5f}/{lon:.5f}&cell={CELL}&layer=hillshade&hillshade=0.6"
    snippet = embed_snippet(browser, server, view)
    src = html.unescape(snippet.split('src="')[1].split('"')[0])
    assert src.startswith(f"{server}/embed#map=14/") and "hillshade=0.6" in src
    (blog_dir / "post.html").write_text(BLOG.format(snippet=snippet))
    assert blog.split(":")[-1] != server.split(":")[-1]  # another origin

    # A HiDPI reader: the embedded map asks for @2x (512 px) tiles.
    ctx = browser.new_context(viewport={"width": 900, "height": 700}, device_scale_factor=2)
    try:
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        errors = record_errors(page)
        tiles: list[sync_api.Response] = []
        page.on("response", lambda r: tiles.append(r) if "/tiles/" in r.url else None)
        page.goto(f"{blog}/post.html")

        iframe = page.frame_locator("iframe")
        iframe.locator("img.leaflet-tile-loaded").first.wait_for()
        frame = next(f for f in page.frames if "/embed" in f.url)
        frame.wait_for_function("() => document.body.dataset.ready === '1'")
        frame.wait_for_function(
            f"() => !window.clearsky.layers['{CELL}'].isLoading()"
            " && document.querySelectorAll('img.leaflet-tile-loaded').length > 0"
        )
        assert frame.evaluate("window.clearsky.embed") is True
        assert frame.evaluate("[window.clearsky.state.layer, window.clearsky.state.hillshade]") == [
            "hillshade",
            0.6,
        ]

        # Tiles came from the tile server, with the view's parameters, as HiDPI PNGs...
        assert tiles and all(r.status == 200 for r in tiles)
        assert all(r.url.startswith(f"{server}/cells/{CELL}/tiles/") for r in tiles)
        assert all("@2x.png?layer=composite" in r.url and "hillshade=0.6" in r.url for r in tiles)
        # ... and show imagery.
        pixels = frame.evaluate(TILE_PIXELS_JS)
        assert pixels and all(p["width"] == p["height"] == 512 for p in pixels)
        assert max(p["opaque"] for p in pixels) > 4000, pixels
        assert max(p["std"] for p in pixels) > 5, pixels

        # A bare map: no panel; attribution, scale bar and the way back to the full viewer.
        assert not iframe.locator("#panel").is_visible()
        assert ATTRIBUTION in iframe.locator(".leaflet-control-attribution").inner_text()
        assert iframe.locator(".leaflet-control-scale").is_visible()
        link = iframe.locator("#open-link")
        assert link.is_visible() and link.get_attribute("target") == "_blank"
        href = link.get_attribute("href")
        assert href.startswith(f"{server}/#map=14/") and "layer=hillshade" in href
        assert httpx.get(href, timeout=10).status_code == 200

        # The whole iframe shows map, not the surrounding page.
        box = page.locator("iframe").bounding_box()
        assert box and box["width"] > 600 and 400 < box["height"] < 500
        page.screenshot(path=str(tmp_path / "blog.png"))
        assert not errors, "\n".join(errors)
    finally:
        ctx.close()


def test_embed_query_flag_hides_the_panel(server: str, browser: sync_api.Browser) -> None:
    """`/?embed=1` is the same bare map as `/embed` (for servers behind a fixed path)."""
    ctx = browser.new_context(viewport={"width": 600, "height": 400})
    try:
        page = ctx.new_page()
        errors = record_errors(page)
        page.goto(f"{server}/?embed=1#cell={CELL}&layer=count")
        page.wait_for_function("() => document.body.dataset.ready === '1'")
        assert page.evaluate("window.clearsky.embed") is True
        assert not page.is_visible("#panel")
        assert page.is_visible("#open-link") and page.is_visible("#legend")  # count legend
        page.wait_for_selector("img.leaflet-tile-loaded[src*='layer=count']")
        assert not errors, "\n".join(errors)
    finally:
        ctx.close()
