"""OGC WMTS 1.0.0 capabilities (RESTful) for QGIS, GDAL and other desktop clients."""

from __future__ import annotations

import math
from xml.sax.saxutils import escape, quoteattr

import morecantile

TMS_ID = "WebMercatorQuad"


def _limits(
    tms: morecantile.TileMatrixSet, bounds: tuple[float, ...], minzoom: int, maxzoom: int
) -> str:
    """TileMatrixSetLimits so clients only ask for tiles that exist."""
    w, s, e, n = bounds
    rows = []
    for z in range(minzoom, maxzoom + 1):
        ul = tms.tile(w, n, z)
        lr = tms.tile(math.nextafter(e, w), math.nextafter(s, n), z)
        rows.append(
            f"<TileMatrixLimits><TileMatrix>{z}</TileMatrix>"
            f"<MinTileRow>{ul.y}</MinTileRow><MaxTileRow>{lr.y}</MaxTileRow>"
            f"<MinTileCol>{ul.x}</MinTileCol><MaxTileCol>{lr.x}</MaxTileCol></TileMatrixLimits>"
        )
    return "<TileMatrixSetLimits>" + "".join(rows) + "</TileMatrixSetLimits>"


def _matrix_set(tms: morecantile.TileMatrixSet, maxzoom: int) -> str:
    out = [
        f"<TileMatrixSet><ows:Identifier>{TMS_ID}</ows:Identifier>"
        "<ows:SupportedCRS>urn:ogc:def:crs:EPSG::3857</ows:SupportedCRS>"
        "<WellKnownScaleSet>urn:ogc:def:wkss:OGC:1.0:GoogleMapsCompatible</WellKnownScaleSet>"
    ]
    for z in range(0, maxzoom + 1):
        m = tms.matrix(z)
        x0, y0 = m.pointOfOrigin
        out.append(
            f"<TileMatrix><ows:Identifier>{z}</ows:Identifier>"
            f"<ScaleDenominator>{m.scaleDenominator!r}</ScaleDenominator>"
            f"<TopLeftCorner>{x0!r} {y0!r}</TopLeftCorner>"
            f"<TileWidth>{m.tileWidth}</TileWidth><TileHeight>{m.tileHeight}</TileHeight>"
            f"<MatrixWidth>{m.matrixWidth}</MatrixWidth>"
            f"<MatrixHeight>{m.matrixHeight}</MatrixHeight></TileMatrix>"
        )
    out.append("</TileMatrixSet>")
    return "".join(out)


def capabilities(base_url: str, layers: list[dict], query: str = "") -> str:
    """``layers``: dicts with id, title, bounds (lon/lat), minzoom, maxzoom, path (URL path of
    the layer's tiles up to and excluding ``/tiles/...``)."""
    tms = morecantile.tms.get(TMS_ID)
    maxzoom = max((lyr["maxzoom"] for lyr in layers), default=18)
    qs = ("?" + query) if query else ""
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<Capabilities xmlns="http://www.opengis.net/wmts/1.0" '
        'xmlns:ows="http://www.opengis.net/ows/1.1" xmlns:xlink="http://www.w3.org/1999/xlink" '
        'version="1.0.0">',
        "<ows:ServiceIdentification><ows:Title>ClearSky</ows:Title>"
        "<ows:Abstract>Cloud-free Sentinel-2 composites. Contains modified Copernicus Sentinel "
        "data.</ows:Abstract><ows:ServiceType>OGC WMTS</ows:ServiceType>"
        "<ows:ServiceTypeVersion>1.0.0</ows:ServiceTypeVersion></ows:ServiceIdentification>",
        "<Contents>",
    ]
    for lyr in layers:
        w, s, e, n = lyr["bounds"]
        template = (
            f"{base_url}{lyr['path']}/tiles/{TMS_ID}/{{TileMatrix}}/{{TileCol}}/{{TileRow}}.png{qs}"
        )
        parts.append(
            f"<Layer><ows:Title>{escape(lyr['title'])}</ows:Title>"
            f"<ows:Identifier>{escape(lyr['id'])}</ows:Identifier>"
            f'<ows:WGS84BoundingBox crs="urn:ogc:def:crs:OGC:2:84">'
            f"<ows:LowerCorner>{w!r} {s!r}</ows:LowerCorner>"
            f"<ows:UpperCorner>{e!r} {n!r}</ows:UpperCorner></ows:WGS84BoundingBox>"
            '<Style isDefault="true"><ows:Identifier>default</ows:Identifier></Style>'
            "<Format>image/png</Format>"
            f"<TileMatrixSetLink><TileMatrixSet>{TMS_ID}</TileMatrixSet>"
            f"{_limits(tms, lyr['bounds'], lyr['minzoom'], lyr['maxzoom'])}</TileMatrixSetLink>"
            f'<ResourceURL format="image/png" resourceType="tile" '
            f"template={quoteattr(template)}/></Layer>"
        )
    parts.append(_matrix_set(tms, maxzoom))
    parts.append("</Contents>")
    parts.append(
        f"<ServiceMetadataURL xlink:href={quoteattr(base_url + '/WMTSCapabilities.xml' + qs)}/>"
    )
    parts.append("</Capabilities>")
    return "".join(parts)
