"""The Leaflet viewer in a real browser (Debian's Chromium through Playwright) against a real
`clearsky serve` process: tiles load and show imagery, the controls (layers, percentile,
hillshade, dates, months) re-request tiles, the XYZ / embed snippets are right, the permalink
restores the view, and nothing errors on the way. The iframe embed is in test_embed.py."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

CHROMIUM = os.environ.get("CLEARSKY_CHROMIUM", "/usr/bin/chromium")
if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"browser tests need Debian's Chromium at {CHROMIUM} (`apt-get install chromium`, or "
        "`make browser` as root); Playwright's downloaded browsers are never used",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is absent")

pytestmark = pytest.mark.browser

CELL = "49NDB"  # the synthetic cell, always built by the `server` fixture
TILE_PATH = f"/cells/{CELL}/tiles/WebMercatorQuad/"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

# Every loaded tile of the page: its size, how many pixels are opaque and the spread of their
# grey levels (a blank or single-colour tile has none).
TILE_PIXELS_JS = """() => [...document.querySelectorAll('img.leaflet-tile-loaded')]
  .filter((img) => img.src.includes('/tiles/')).map((img) => {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d');
    g.drawImage(img, 0, 0);
    const d = g.getImageData(0, 0, c.width, c.height).data;
    let n = 0, s = 0, s2 = 0;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i + 3] === 0) continue;
      const v = (d[i] + d[i + 1] + d[i + 2]) / 3;
      n += 1; s += v; s2 += v * v;
    }
    const mean = n ? s / n : 0;
    return {src: img.src, width: img.naturalWidth, height: img.naturalHeight, opaque: n,
            std: n ? Math.sqrt(Math.max(s2 / n - mean * mean, 0)) : 0};
  })"""

TILES_SETTLED_JS = f"""() => {{
  const layer = window.clearsky.layers['{CELL}'];
  return layer && !layer.isLoading()
    && document.querySelectorAll('img.leaflet-tile-loaded[src*="/tiles/"]').length > 0;
}}"""


@dataclass
class Viewer:
    """A viewer page with everything that went wrong in it recorded."""

    page: sync_api.Page
    base: str
    errors: list[str] = field(default_factory=list)
    tiles: list[sync_api.Response] = field(default_factory=list)

    def open(self, hash_: str = "") -> None:
        self.page.goto(f"{self.base}/{hash_}")
        self.page.wait_for_function("() => document.body.dataset.ready === '1'")
        self.settle()

    def settle(self) -> None:
        self.page.wait_for_function(TILES_SETTLED_JS)

    def js(self, expr: str):
        return self.page.evaluate(expr)

    def assert_clean(self) -> None:
        assert not self.errors, "\n".join(self.errors)


def _ignored(url: str) -> bool:
    return url.endswith("/favicon.ico")


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def viewer(server: str, browser: sync_api.Browser) -> Iterator[Viewer]:
    ctx = browser.new_context(viewport={"width": 1000, "height": 700})
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    v = Viewer(page, server)

    def on_console(msg: sync_api.ConsoleMessage) -> None:
        if msg.type == "error" and not _ignored(msg.location.get("url", "")):
            v.errors.append(f"console: {msg.text} ({msg.location.get('url')})")

    def on_failed(req: sync_api.Request) -> None:
        # Leaflet cancels tiles it no longer needs (zoom, setUrl): an abort is not a failure.
        if not _ignored(req.url) and "ERR_ABORTED" not in (req.failure or ""):
            v.errors.append(f"request failed: {req.url} {req.failure}")

    def on_response(resp: sync_api.Response) -> None:
        if resp.status >= 400 and not _ignored(resp.url):
            v.errors.append(f"HTTP {resp.status}: {resp.url}")
        if "/tiles/" in resp.url:
            v.tiles.append(resp)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: v.errors.append(f"page error: {exc}"))
    page.on("requestfailed", on_failed)
    page.on("response", on_response)
    yield v
    ctx.close()


@pytest.fixture(scope="module")
def cell(server: str) -> dict:
    cells = {c["id"]: c for c in httpx.get(f"{server}/cells", timeout=30).json()}
    return cells[CELL]


def test_viewer_shows_composite_tiles(viewer: Viewer, cell: dict) -> None:
    viewer.open(f"#cell={CELL}")
    assert viewer.js("window.clearsky.state.layer") == "composite"
    assert viewer.js("window.clearsky.state.percentile") == 25

    # Tile requests went to the cell's tile endpoint and came back as PNGs.
    tiles = [r for r in viewer.tiles if TILE_PATH in r.url]
    assert tiles, "no tile of the cell was requested"
    for r in tiles:
        assert r.status == 200, r.url
        assert r.headers["content-type"] == "image/png", r.url
        assert "layer=composite" in r.url and "percentile=25" in r.url
    assert tiles[0].body()[:8] == b"\x89PNG\r\n\x1a\n"

    # ... and at least one shows imagery, not a blank or flat tile.
    pixels = viewer.js(TILE_PIXELS_JS)
    assert pixels and all(p["width"] == p["height"] == 256 for p in pixels)
    assert max(p["opaque"] for p in pixels) > 1000, pixels
    assert max(p["std"] for p in pixels) > 5, pixels

    # The furniture: attribution, scale bar, the cell outline (its true footprint from
    # /cells.geojson) with its tooltip and its label.
    page = viewer.page
    attribution = page.inner_text(".leaflet-control-attribution")
    assert "Contains modified Copernicus Sentinel data" in attribution
    assert page.is_visible(".leaflet-control-scale")
    tooltip = viewer.js(f"window.clearsky.outlines['{CELL}'].getTooltip().getContent()")
    assert cell["title"] in tooltip and f"{cell['scene_count']} scenes" in tooltip
    assert cell["start"] in tooltip and cell["end"] in tooltip
    assert viewer.js(f"window.clearsky.outlines['{CELL}'].getLatLngs()[0].length") > 4
    assert page.is_visible(f".cell-label:has-text('{CELL} · {cell['scene_count']} scenes')")

    # The XYZ template for QGIS is the global layer (every cell) and it serves this very tile.
    xyz = page.input_value("#xyz")
    assert xyz == (
        f"{viewer.base}/tiles/WebMercatorQuad/{{z}}/{{x}}/{{y}}.png"
        "?layer=composite&percentile=25"
    )
    z, x, y = tiles[0].url.split("?")[0].removesuffix(".png").split("/")[-3:]
    r = httpx.get(xyz.format(z=z, x=x, y=y), timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    page.check("#xyz-cell")
    assert page.input_value("#xyz").startswith(f"{viewer.base}{TILE_PATH}{{z}}/{{x}}/{{y}}.png?")
    wmts = page.get_attribute("#wmts", "href")
    assert wmts == f"{viewer.base}/WMTSCapabilities.xml?layer=composite&percentile=25"
    assert "<Capabilities" in httpx.get(wmts, timeout=30).text

    # The embed snippet: an iframe of /embed with the current view in its hash.
    embed = page.input_value("#embed")
    hash_ = page.evaluate("location.hash")
    assert embed.startswith(f'<iframe src="{viewer.base}/embed{hash_.replace("&", "&amp;")}"')
    assert embed.endswith("></iframe>")
    page.click("#copy-embed")
    # The copy is asynchronous (clipboard promise, then the status line).
    page.wait_for_function(
        "() => document.querySelector('#status').innerText.includes('Embed code copied')"
    )
    viewer.assert_clean()


def test_controls_request_new_tiles(viewer: Viewer, cell: dict) -> None:
    viewer.open(f"#cell={CELL}")
    page = viewer.page

    def is_tile(*params: str):
        return lambda r: TILE_PATH in r.url and all(p in r.url for p in params)

    with page.expect_request(is_tile("layer=count")):
        page.check("input[name=layer][value=count]")
    viewer.settle()
    assert "layer=count" in page.evaluate("location.hash")
    assert page.is_visible("#legend")

    with page.expect_request(is_tile("layer=composite", "percentile=60")):
        page.check("input[name=layer][value=composite]")
        page.fill("#percentile", "60")
        page.dispatch_event("#percentile", "change")
    viewer.settle()
    assert viewer.js("window.clearsky.state.percentile") == 60
    assert "percentile=60" in page.evaluate("location.hash")
    assert "percentile=60" in page.input_value("#xyz")

    with page.expect_request(is_tile("mask=none", "months=6,7,8")):
        page.select_option("#mask", "none")
        for m in range(1, 13):
            if m not in (6, 7, 8):
                page.uncheck(f"#months input[value='{m}']")
    viewer.settle()

    # A date range; the XYZ URL and the permalink follow.
    start, end = cell["dates"][2], cell["dates"][-3]
    with page.expect_request(is_tile(f"start={start}", f"end={end}", "months=6,7,8")):
        page.fill("#start", start)
        page.fill("#end", end)
        page.dispatch_event("#end", "change")
    viewer.settle()
    assert f"start={start}&end={end}" in page.input_value("#xyz")
    assert f"start={start}&end={end}" in page.evaluate("location.hash")

    # Composite + hillshade: the composite with the DEM's relief, its strength on a slider.
    assert not page.is_visible("#hillshade-row")
    with page.expect_request(is_tile("layer=composite", "percentile=60", "hillshade=0.5")):
        page.check("input[name=layer][value=hillshade]")
    assert page.is_visible("#hillshade-row") and not page.is_visible("#no-dem")  # 49NDB has one
    with page.expect_request(is_tile("layer=composite", "hillshade=0.8", f"start={start}")):
        page.fill("#hillshade", "0.8")
        page.dispatch_event("#hillshade", "change")
    viewer.settle()
    assert "layer=hillshade&percentile=60&hillshade=0.8" in page.evaluate("location.hash")
    assert "hillshade=0.8" in page.input_value("#xyz")

    first = cell["dates"][0]
    with page.expect_request(is_tile("layer=date", f"date={cell['end']}")):
        page.check("input[name=layer][value=date]")
    with page.expect_request(is_tile("layer=date", f"date={first}")):
        page.select_option("#date", first)
    viewer.settle()
    assert f"date={first}" in page.evaluate("location.hash")
    assert "hillshade" not in page.evaluate("location.hash")

    # One scene's cloud probability: a one-cell layer, so is its XYZ URL.
    with page.expect_request(is_tile("layer=cloud", f"date={first}")):
        page.check("input[name=layer][value=cloud]")
    viewer.settle()
    assert page.is_visible("#cloud-legend") and not page.is_visible("#legend")
    assert page.input_value("#xyz").startswith(f"{viewer.base}{TILE_PATH}")
    assert page.is_checked("#xyz-cell") and page.is_disabled("#xyz-cell")
    assert all(r.status == 200 for r in viewer.tiles)
    viewer.assert_clean()


def test_permalink_restores_view(viewer: Viewer, cell: dict) -> None:
    lon, lat = cell["center"]
    viewer.open(
        f"#map=15/{lat:.5f}/{lon:.5f}&cell={CELL}&layer=count&mask=none&percentile=40&months=1,2,3"
    )
    assert viewer.js("window.clearsky.map.getZoom()") == 15
    center = viewer.js("window.clearsky.map.getCenter()")
    assert math.isclose(center["lat"], lat, abs_tol=1e-4)
    assert math.isclose(center["lng"], lon, abs_tol=1e-4)
    state = viewer.js("window.clearsky.state")
    assert (state["cell"], state["layer"], state["mask"], state["percentile"]) == (
        CELL,
        "count",
        "none",
        40,
    )
    assert state["months"] == "1,2,3"
    assert viewer.page.is_checked("input[name=layer][value=count]")
    assert viewer.page.input_value("#mask") == "none"
    assert not viewer.page.is_checked("#months input[value='4']")
    assert viewer.tiles and all("layer=count" in r.url for r in viewer.tiles)

    # A pasted permalink with the hillshade layer and its strength.
    n = len(viewer.tiles)
    with viewer.page.expect_request(lambda r: "hillshade=0.3" in r.url):
        viewer.page.evaluate(
            f"location.hash = '#map=15/{lat:.5f}/{lon:.5f}&layer=hillshade&hillshade=0.3'"
        )
    viewer.settle()
    assert viewer.js("[window.clearsky.state.layer, window.clearsky.state.hillshade]") == [
        "hillshade",
        0.3,
    ]
    assert viewer.page.input_value("#hillshade") == "0.3"
    assert all("layer=composite" in r.url for r in viewer.tiles[n:])

    # Panning writes the new view back into the hash (a shareable permalink).
    viewer.js(f"window.clearsky.map.setView([{lat + 0.001}, {lon}], 16)")
    viewer.page.wait_for_function("() => location.hash.startsWith('#map=16/')")
    viewer.settle()

    # A pasted permalink (hashchange) far out: the cell becomes a dot, and no tile is asked for
    # below the cell's minzoom (Leaflet's redraw on setUrl would, and such tiles are expensive).
    n = len(viewer.tiles)
    viewer.page.evaluate(f"location.hash = '#map=5/{lat:.5f}/{lon:.5f}&cell={CELL}'")
    viewer.page.wait_for_function("() => window.clearsky.map.getZoom() === 5")
    assert viewer.js("window.clearsky.state.layer") == "composite"
    viewer.page.wait_for_selector(".cell-dot", state="attached")
    viewer.page.wait_for_timeout(500)
    assert len(viewer.tiles) == n, [r.url for r in viewer.tiles[n:]]
    viewer.assert_clean()
