"""Real desktop-GIS clients: GDAL (as QGIS uses it) through WMTS and through XYZ/TMS."""

import io

import httpx
import morecantile
import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.windows import Window

TMS = morecantile.tms.get("WebMercatorQuad")


@pytest.fixture(scope="module")
def syn(server):
    cells = {c["id"]: c for c in httpx.get(f"{server}/cells").json()}
    return cells["49NDB"]


def _server_png(url: str) -> np.ndarray:
    r = httpx.get(url)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGBA"))


def test_wmts_capabilities_open_in_gdal_and_pixels_match(server, syn):
    z = 14
    t = TMS.tile(*syn["center"], z)  # a tile well inside the cell
    caps = f"{server}/WMTSCapabilities.xml?percentile=30"
    with rasterio.open(f"WMTS:{caps},layer=49NDB,tilematrix={z}") as ds:
        assert ds.crs.to_epsg() == 3857
        assert ds.count == 4
        tb = TMS.xy_bounds(t)
        col = round((tb.left - ds.bounds.left) / ds.res[0])
        row = round((ds.bounds.top - tb.top) / ds.res[1])
        # GDAL's grid is the tile matrix's own pixel grid (no resampling), cut to the layer
        # bbox: compare the part of the tile inside it.
        c0, r0 = max(col, 0), max(row, 0)
        c1, r1 = min(col + 256, ds.width), min(row + 256, ds.height)
        assert c1 - c0 > 100 and r1 - r0 > 100
        gdal_px = ds.read(window=Window(c0, r0, c1 - c0, r1 - r0))
    ours = _server_png(
        f"{server}/cells/49NDB/tiles/WebMercatorQuad/{z}/{t.x}/{t.y}.png?percentile=30"
    )[r0 - row : r1 - row, c0 - col : c1 - col]
    assert np.array_equal(np.moveaxis(gdal_px, 0, -1), ours)


def test_wmts_lists_every_cell_and_the_global_layer(server):
    xml = httpx.get(f"{server}/WMTSCapabilities.xml").text
    for layer in ("<ows:Identifier>all</ows:Identifier>", "<ows:Identifier>49NDB</ows:Identifier>"):
        assert layer in xml
    assert "TileMatrixSetLimits" in xml and "GoogleMapsCompatible" in xml
    assert httpx.get(f"{server}/WMTSCapabilities.xml", params={"months": "0"}).status_code == 422


def test_xyz_url_through_gdal_wms_tms_driver(server, syn, tmp_path):
    z = 14
    t = TMS.tile(*syn["center"], z)
    url = f"{server}/tiles/WebMercatorQuad/${{z}}/${{x}}/${{y}}.png"  # the global XYZ layer
    xml = f"""<GDAL_WMS>
  <Service name="TMS"><ServerUrl>{url}</ServerUrl></Service>
  <DataWindow>
    <UpperLeftX>-20037508.342789244</UpperLeftX><UpperLeftY>20037508.342789244</UpperLeftY>
    <LowerRightX>20037508.342789244</LowerRightX><LowerRightY>-20037508.342789244</LowerRightY>
    <TileLevel>{z}</TileLevel><TileCountX>1</TileCountX><TileCountY>1</TileCountY>
    <YOrigin>top</YOrigin>
  </DataWindow>
  <Projection>EPSG:3857</Projection>
  <BlockSizeX>256</BlockSizeX><BlockSizeY>256</BlockSizeY><BandsCount>4</BandsCount>
  <ZeroBlockHttpCodes>404</ZeroBlockHttpCodes>
</GDAL_WMS>"""
    path = tmp_path / "xyz.xml"
    path.write_text(xml)
    with rasterio.open(path) as ds:
        gdal_px = ds.read(window=Window(t.x * 256, t.y * 256, 256, 256))
    ours = _server_png(f"{server}/tiles/WebMercatorQuad/{z}/{t.x}/{t.y}.png")
    assert np.array_equal(np.moveaxis(gdal_px, 0, -1), ours)
