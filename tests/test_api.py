"""The tile server over HTTP, as a real process (see conftest.server)."""

import io

import httpx
import morecantile
import numpy as np
import pytest
from PIL import Image

TMS = morecantile.tms.get("WebMercatorQuad")


@pytest.fixture(scope="module")
def cells(server):
    r = httpx.get(f"{server}/cells")
    assert r.status_code == 200
    return {c["id"]: c for c in r.json()}


def _center_tile(cell, z):
    lon, lat = cell["center"]
    return TMS.tile(lon, lat, z)


def _png(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(resp.content)))


def test_cells_lists_the_demo(cells):
    syn = cells["49NDB"]
    assert syn["scene_count"] == 24
    assert syn["start"] < syn["end"]
    w, s, e, n = syn["bounds"]
    assert 109 < w < e < 111 and 0 < s < n < 2  # Borneo


def test_composite_tile_is_a_png_with_content(server, cells):
    t = _center_tile(cells["49NDB"], 14)
    img = _png(httpx.get(f"{server}/cells/49NDB/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png"))
    assert img.shape == (256, 256, 4)
    assert img[..., 3].max() == 255  # some opaque pixels
    assert img[..., :3].std() > 5  # not a flat colour


def test_layers_differ(server, cells):
    t = _center_tile(cells["49NDB"], 13)
    base = f"{server}/cells/49NDB/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png"
    comp = _png(httpx.get(base))
    count = _png(httpx.get(base, params={"layer": "count"}))
    date = cells["49NDB"]["dates"][3]
    one = _png(httpx.get(base, params={"layer": "date", "date": date}))
    assert not np.array_equal(comp, count) and not np.array_equal(comp, one)
    p75 = _png(httpx.get(base, params={"percentile": 75}))
    assert p75[..., :3].astype(int).mean() > comp[..., :3].astype(int).mean()


@pytest.mark.parametrize(
    "path",
    [
        "/cells/49NDB/tiles/WebMercatorQuad/14/0/0.png",  # far outside the cell
        "/cells/54SUE/tiles/WebMercatorQuad/14/0/0.png",  # valid id, not served here
        "/cells/nonsense/tiles/WebMercatorQuad/14/0/0.png",
    ],
)
def test_outside_or_unknown_is_404(server, path):
    r = httpx.get(server + path)
    assert r.status_code == 404
    assert "detail" in r.json()


@pytest.mark.parametrize(
    "params, name",
    [
        ({"percentile": 101}, "percentile"),
        ({"months": "1,13"}, "months"),
        ({"mask": "magic"}, "mask"),
        ({"layer": "date"}, "date"),
        ({"start": "2022-13-01"}, "start"),
        ({"start": "2022-05-01", "end": "2022-01-01"}, "start"),
        ({"rescale": "5,1"}, "rescale"),
    ],
)
def test_bad_parameter_is_422_naming_it(server, cells, params, name):
    t = _center_tile(cells["49NDB"], 14)
    r = httpx.get(
        f"{server}/cells/49NDB/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png", params=params
    )
    assert r.status_code == 422
    assert name in r.text


def test_no_path_or_url_reaches_a_reader(server):
    # titiler's url= parameter is not exposed, and path tricks cannot name a file.
    r = httpx.get(
        f"{server}/cells/49NDB/tiles/WebMercatorQuad/14/0/0.png", params={"url": "/etc/passwd"}
    )
    assert r.status_code == 404
    for evil in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "49NDB.zarr"):
        r = httpx.get(f"{server}/cells/{evil}/WebMercatorQuad/tilejson.json")
        assert r.status_code == 404
    spec = httpx.get(f"{server}/openapi.json").json()
    for path, ops in spec["paths"].items():
        for op in ops.values():
            assert "url" not in [p["name"] for p in op.get("parameters", [])], path


def test_tilejson(server, cells):
    r = httpx.get(f"{server}/cells/49NDB/WebMercatorQuad/tilejson.json", params={"percentile": 40})
    assert r.status_code == 200
    tj = r.json()
    assert tj["tiles"][0].startswith(
        f"{server}/cells/49NDB/tiles/WebMercatorQuad/{{z}}/{{x}}/{{y}}"
    )
    assert "percentile=40" in tj["tiles"][0]
    assert tj["minzoom"] <= 12 <= tj["maxzoom"]


def test_cache_etag_304_and_cors(server, cells):
    t = _center_tile(cells["49NDB"], 14)
    url = f"{server}/cells/49NDB/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png"
    before = httpx.get(f"{server}/metrics").json()
    a = httpx.get(
        url, params={"percentile": 30, "mask": "scl"}, headers={"Origin": "https://blog.example"}
    )
    b = httpx.get(url, params={"mask": "scl", "percentile": 30})  # same key, other order
    assert a.status_code == b.status_code == 200 and a.content == b.content
    assert a.headers["etag"] == b.headers["etag"]
    assert "max-age" in a.headers["cache-control"]
    assert a.headers["access-control-allow-origin"] in ("*", "https://blog.example")
    r = httpx.get(
        url, params={"percentile": 30, "mask": "scl"}, headers={"If-None-Match": a.headers["etag"]}
    )
    assert r.status_code == 304 and r.content == b""
    other = httpx.get(url, params={"percentile": 31, "mask": "scl"})
    assert other.headers["etag"] != a.headers["etag"]  # parameters are part of the key
    after = httpx.get(f"{server}/metrics").json()
    assert after["cache_hits"] >= before["cache_hits"] + 2
    assert after["not_modified"] == before["not_modified"] + 1


def test_errors_are_not_cached(server):
    url = f"{server}/cells/49NDB/tiles/WebMercatorQuad/14/0/0.png"
    for _ in range(2):
        r = httpx.get(url)
        assert r.status_code == 404 and "etag" not in r.headers


def test_hillshade_parameter_changes_pixels(server, cells):
    t = _center_tile(cells["49NDB"], 13)
    url = f"{server}/cells/49NDB/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png"
    plain, shaded = _png(httpx.get(url)), _png(httpx.get(url, params={"hillshade": 0.8}))
    assert np.abs(plain[..., :3].astype(int) - shaded[..., :3].astype(int)).mean() > 1
    assert httpx.get(url, params={"hillshade": 1.5}).status_code == 422


def test_global_layer_and_formats(server, cells):
    t = _center_tile(cells["49NDB"], 14)
    one = _png(httpx.get(f"{server}/cells/49NDB/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png"))
    glob = _png(httpx.get(f"{server}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png"))
    assert np.array_equal(one, glob)  # inside one cell the global layer is that cell
    retina = httpx.get(f"{server}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}@2x.png")
    assert Image.open(io.BytesIO(retina.content)).size == (512, 512)
    for ext, ctype in (("jpg", "image/jpeg"), ("webp", "image/webp")):
        r = httpx.get(f"{server}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.{ext}")
        assert r.status_code == 200 and r.headers["content-type"] == ctype
    assert httpx.get(f"{server}/tiles/WebMercatorQuad/{t.z}/0/0.png").status_code == 404
    fc = httpx.get(f"{server}/cells.geojson").json()
    assert {f["id"] for f in fc["features"]} == set(cells)
    assert fc["features"][0]["geometry"]["type"] == "Polygon"


def test_concurrent_tiles_equal_a_single_threaded_render(server, cells, demo_dir):
    """Kernels read shards in place on TBB threads while other requests do the same: every
    tile must equal the same render done alone, in this process."""
    from concurrent.futures import ThreadPoolExecutor

    from compositor.render import encode_png
    from compositor.stack import Stack
    from compositor.tiling import ViewParams, render_area

    lon, lat = cells["49NDB"]["center"]
    tiles = [TMS.tile(lon + dx, lat + dy, 14) for dx in (-0.01, 0.01) for dy in (-0.01, 0.01)]
    jobs = [(t, q) for t in tiles for q in (21.5, 63.5)]

    def get(job):
        t, q = job
        url = f"{server}/cells/49NDB/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png"
        return httpx.get(url, params={"percentile": q}, timeout=120).content

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(get, jobs))
    stack = Stack.open(demo_dir / "49NDB.zarr")
    for (t, q), png in zip(jobs, got, strict=True):
        r = render_area(
            stack, TMS.rasterio_crs, tuple(TMS.xy_bounds(t)), 256, 256, ViewParams(percentile=q)
        )
        assert png == encode_png(r.rgb, r.valid), (t, q)


def test_server_timing_reports_the_stages(server, cells):
    from tileserver.timing import parse

    t = _center_tile(cells["49NDB"], 14)
    url = f"{server}/cells/49NDB/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png"
    cold = httpx.get(url, params={"percentile": 33.3, "hillshade": 0.4})
    stages = parse(cold.headers["server-timing"])
    for stage in ("read", "mask", "percentile", "hillshade", "warp", "render", "encode", "total"):
        assert stages[stage] >= 0, stage
    assert stages["total"] >= stages["percentile"] + stages["encode"]
    assert cold.headers["timing-allow-origin"] == "*"
    hit = httpx.get(url, params={"percentile": 33.3, "hillshade": 0.4})
    assert hit.headers["server-timing"] == "cache;desc=hit"
