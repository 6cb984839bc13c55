"""Download Sentinel-2 L2A bands + SCL (and the Copernicus DEM) of one cell into its Stack.

Every band is read with HTTP range requests straight from the COGs (GDAL /vsicurl/), only the
window of the cell or sub-area, at the stack's resolution: a 20 m stack reads the COGs' first
overview, a 60 m stack a coarser one, so a coarse prefetch moves a fraction of the bytes.

Safety, in order of what goes wrong in practice:
- a scene is read completely into memory before anything is written, and the Stack marks a scene
  complete only after all its levels are on disk, so an interrupted run never shows half a scene;
- a rerun skips scenes already complete and rewrites incomplete ones (Stack.append_scene);
- network errors are retried with exponential backoff; GDAL remembers failed URLs, so retries
  open them uncached; a scene that still fails, or whose COG is corrupt, is reported and skipped;
- free disk is checked against an estimate before the first byte is written.

Reflectance is harmonised here, once: the stack holds DN = reflectance x 10000 with no offset
(see :func:`dn_offset` for how the +1000 of processing baseline >= 04.00 is detected, and
:func:`scene_offset` for the check against the pixels themselves).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from compositor.acquisitions import acquisition_key, baseline_tuple, processing_baseline
from compositor.grid import cell, transform_bounds_to_lonlat
from compositor.search import item_tile, mask_text, mask_url
from compositor.stack import DEFAULT_BANDS, Scene, Stack, StackError

log = logging.getLogger(__name__)

# Asset keys per stack band: Earth Search v1 common names first, then the older band ids.
BAND_ASSETS: dict[str, tuple[str, ...]] = {
    "B02": ("blue", "B02", "b02"),
    "B03": ("green", "B03", "b03"),
    "B04": ("red", "B04", "b04"),
    "B08": ("nir", "B08", "b08"),
}
SCL_ASSETS = ("scl", "SCL")
DEM_COLLECTION = "cop-dem-glo-30"
DEM_ASSETS = ("data", "elevation", "dem")
BOA_OFFSET_DN = 1000  # the BOA_ADD_OFFSET of baseline 04.00+, in DN
OFFSET_BASELINE = (4, 0)
OFFSET_START = dt.date(2022, 1, 25)  # first day of baseline 04.00, for items that name none
# The pixel check of a +1000 the metadata claims: with the offset in the COG, DN below 800 would
# be a reflectance below -0.02, which Sen2Cor hardly ever writes; without it, every vegetated or
# water pixel is there (red/blue ~0.02-0.05). Earth Search's legacy collection has items whose
# flags say "not applied" for COGs it already shifted (earth-search#66, #71): a share of valid
# pixels this large below 800 means the COG has no offset, whatever the metadata says.
OFFSET_CHECK_DN = 800
OFFSET_CHECK_SHARE = 0.02
# Stored bytes / raw bytes of a stack's scene shards, for the disk estimate. The Stack keeps
# scene shards uncompressed (tiles read just their window), so 1.0; bench/prefetch.py measures it.
STACK_COMPRESSION = 1.0

# GDAL settings for cloud-optimised GeoTIFFs over HTTP: open without listing the "directory"
# (S3 has none), only ever try .tif, fetch several ranges of a tile read at once and merge
# neighbours, keep a block cache, and retry throttled/5xx answers inside GDAL too.
GDAL_COG_ENV: dict[str, Any] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_VERSION": "2TLS",
    "GDAL_INGESTED_BYTES_AT_OPEN": 32768,
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": 50_000_000,
    "CPL_VSIL_CURL_CACHE_SIZE": 200_000_000,
    # Block cache: a prefetch reads each block once (a downsampled read needs one row of
    # 1024 px blocks per band at a time), so more only holds memory: 128 MB, not 512.
    "GDAL_CACHEMAX": 128,
    # Not GDAL_NUM_THREADS: GDAL 3.10's multi-threaded GTiff reads shifted rasterio.merge()
    # windows by a pixel here (tests/test_prefetch.py checks the DEM), and scenes are already
    # read in parallel by the thread pool.
    "GDAL_HTTP_MAX_RETRY": 3,
    "GDAL_HTTP_RETRY_DELAY": 1,
    "GDAL_HTTP_TIMEOUT": 120,
    "GDAL_HTTP_CONNECTTIMEOUT": 15,
    "AWS_NO_SIGN_REQUEST": "YES",  # the Sentinel-2 and DEM buckets are public
}

# Errors worth retrying: the network, not the file. Anything else (a corrupt or truncated COG,
# a 404) gets one more try at most, since a cut connection can surface as a TIFF decode error.
# "got N bytes, expected M": libtiff read fewer bytes than a tile holds (a transfer cut short).
_TRANSIENT = re.compile(
    r"curl|couldn'?t connect|could not connect|connection|timed? ?out|reset by peer|"
    r"empty reply|recv failure|send failure|temporar|HTTP response code: (?:0|408|429|5\d\d)\b|"
    r"got \d+ bytes, expected \d+",
    re.I,
)


class PrefetchError(RuntimeError):
    """A prefetch that cannot start (stack mismatch, no disk space, bad arguments)."""


class SceneFailed(RuntimeError):
    """A scene that could not be read after its retries; reported and skipped."""


@dataclass(frozen=True)
class TargetGrid:
    """The stack's pixel grid: the cell (or a snapped sub-area of it) at one resolution."""

    cell: str
    epsg: int
    transform: Affine
    width: int
    height: int

    @property
    def res(self) -> float:
        return self.transform.a

    @property
    def crs(self) -> CRS:
        return CRS.from_epsg(self.epsg)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        return (t.c, t.f - self.height * self.res, t.c + self.width * self.res, t.f)

    def lonlat_bounds(self) -> tuple[float, float, float, float]:
        return transform_bounds_to_lonlat(self.epsg, self.bounds)


def target_grid(
    cell_id: str, resolution: float = 10.0, bbox: Sequence[float] | None = None
) -> TargetGrid:
    """The cell's grid at ``resolution``, or the part of it covering a lon/lat ``bbox`` snapped
    outwards to whole pixels of the cell's own lattice (so sub-area stacks line up with the
    full-cell grid and with each other)."""
    if not resolution or resolution <= 0:
        raise PrefetchError(f"resolution must be a positive number of metres, got {resolution}")
    c = cell(cell_id)
    left, bottom, right, top = c.bounds
    x0, y0, x1, y1 = left, bottom, right, top
    if bbox is not None:
        t = Transformer.from_crs(4326, c.epsg, always_xy=True)
        bx0, by0, bx1, by1 = t.transform_bounds(*bbox, densify_pts=21)
        x0, y0, x1, y1 = max(bx0, left), max(by0, bottom), min(bx1, right), min(by1, top)
        if x0 >= x1 or y0 >= y1:
            raise PrefetchError(f"bbox {tuple(bbox)} does not overlap cell {c.id}")
        x0 = left + math.floor((x0 - left) / resolution) * resolution
        y1 = top - math.floor((top - y1) / resolution) * resolution
    width = max(1, math.ceil((x1 - x0) / resolution - 1e-9))
    height = max(1, math.ceil((y1 - y0) / resolution - 1e-9))
    return TargetGrid(c.id, c.epsg, Affine(resolution, 0, x0, 0, -resolution, y1), width, height)


# ------------------------------------------------------------------------------- GDAL access
@contextmanager
def gdal_env(fresh: bool = False) -> Iterator[None]:
    """rasterio.Env with the COG settings. ``fresh``: bypass GDAL's /vsicurl/ caches, which
    remember failed opens and keep the short block of a transfer cut mid-body, so a retry
    with caching on replays the same truncated tile without a single request
    (tests/test_prefetch.py cuts transfers on a real server to check that a retry re-reads).
    rasterio's config options are thread-local, so every worker thread enters its own."""
    opts = dict(GDAL_COG_ENV)
    if fresh:
        opts["CPL_VSIL_CURL_NON_CACHED"] = "/vsicurl/:/vsis3/"
    with rasterio.Env(**opts):
        yield


def gdal_path(href: str) -> str:
    """An asset href as a GDAL path: http(s) through /vsicurl/, s3:// through /vsis3/."""
    if href.startswith(("http://", "https://")):
        return "/vsicurl/" + href
    if href.startswith("s3://"):
        return "/vsis3/" + href[5:]
    if href.startswith("file://"):
        return href[7:]
    return href


def _aligned(src: rasterio.DatasetReader, grid: TargetGrid) -> bool:
    """Whether the source pixels nest into the grid's (same CRS, integer size ratio, shared
    lattice), so a windowed read is exact and no warp is needed. Sentinel-2 COGs of a cell's own
    tile always are; anything else goes through WarpedVRT."""
    try:
        if src.crs is None or src.crs.to_epsg() != grid.epsg:
            return False
    except Exception:  # a CRS without an EPSG code
        return False
    st = src.transform
    if st.b or st.d or st.a <= 0 or st.e >= 0 or abs(st.a + st.e) > 1e-9 * st.a:
        return False
    fine = min(st.a, grid.res)
    ratio = max(st.a, grid.res) / fine
    if abs(ratio - round(ratio)) > 1e-6:
        return False
    offsets = ((grid.transform.c - st.c) / fine, (st.f - grid.transform.f) / fine)
    return all(abs(o - round(o)) < 1e-6 for o in offsets)


def _read_aligned(
    src: rasterio.DatasetReader, grid: TargetGrid, resampling: Resampling, out: np.ndarray
) -> np.ndarray:
    st, g = src.transform, grid.transform
    sres, gres = st.a, grid.res
    out[...] = 0
    eps = 1e-6
    if sres <= gres:
        # Same or coarser grid: each grid pixel is k x k whole source pixels; GDAL reduces them
        # (picking the matching COG overview when there is one).
        k = round(gres / sres)
        c0 = max(0, math.ceil((st.c - g.c) / gres - eps))
        c1 = min(grid.width, math.floor((st.c + src.width * sres - g.c) / gres + eps))
        r0 = max(0, math.ceil((g.f - st.f) / gres - eps))
        r1 = min(grid.height, math.floor((g.f - st.f + src.height * sres) / gres + eps))
        if c1 <= c0 or r1 <= r0:
            return out
        sc0 = round((g.c + c0 * gres - st.c) / sres)
        sr0 = round((st.f - (g.f - r0 * gres)) / sres)
        win = Window(sc0, sr0, (c1 - c0) * k, (r1 - r0) * k)
        part = out[r0:r1, c0:c1]
        if part.flags.c_contiguous:  # the usual whole-width read: no second copy of the band
            src.read(1, window=win, out=part, resampling=resampling)
        else:
            part[...] = src.read(1, window=win, out_shape=part.shape, resampling=resampling)
        return out
    # Finer grid (SCL's 20 m into a 10 m stack): repeat source pixels, exact nearest neighbour.
    k = round(sres / gres)
    sc0 = max(0, math.floor((g.c - st.c) / sres + eps))
    sc1 = min(src.width, math.ceil((g.c + grid.width * gres - st.c) / sres - eps))
    sr0 = max(0, math.floor((st.f - g.f) / sres + eps))
    sr1 = min(src.height, math.ceil((st.f - g.f + grid.height * gres) / sres - eps))
    if sc1 <= sc0 or sr1 <= sr0:
        return out
    data = src.read(1, window=Window(sc0, sr0, sc1 - sc0, sr1 - sr0))
    up = np.repeat(np.repeat(data, k, axis=0), k, axis=1)
    gc = round((st.c + sc0 * sres - g.c) / gres)  # where up[0, 0] lands in the grid
    gr = round((g.f - (st.f - sr0 * sres)) / gres)
    oc0, or0 = max(gc, 0), max(gr, 0)
    oc1, or1 = min(gc + up.shape[1], grid.width), min(gr + up.shape[0], grid.height)
    out[or0:or1, oc0:oc1] = up[or0 - gr : or1 - gr, oc0 - gc : oc1 - gc]
    return out


def read_to_grid(
    href: str,
    grid: TargetGrid,
    resampling: Resampling = Resampling.average,
    dtype: str | None = None,
    nodata: float | None = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """One band of one COG on the grid (into ``out`` when given). ``dtype`` checks what the
    asset must hold."""
    with rasterio.open(gdal_path(href)) as src:
        if dtype is not None and src.dtypes[0] != dtype:
            raise SceneFailed(f"{mask_url(href)} holds {src.dtypes[0]}, expected {dtype}")
        if out is None:
            out = np.empty((grid.height, grid.width), src.dtypes[0])
        if _aligned(src, grid):
            return _read_aligned(src, grid, resampling, out)
        with WarpedVRT(
            src,
            crs=grid.crs,
            transform=grid.transform,
            width=grid.width,
            height=grid.height,
            resampling=resampling,
            src_nodata=src.nodata if src.nodata is not None else nodata,
            nodata=nodata,
            dtype=dtype or src.dtypes[0],
        ) as vrt:
            return vrt.read(1, out=out)


def describe(exc: BaseException) -> str:
    """The messages of an exception and its causes (rasterio puts GDAL's own words, e.g.
    'HTTP response code: 404' or 'ZIPDecode: Decoding error', in the chained exception)."""
    parts: list[str] = []
    e: BaseException | None = exc
    while e is not None and len(parts) < 5:
        for msg in str(e).split("\n"):
            msg = msg.strip()
            if msg and msg not in parts and "See previous exception" not in msg:
                parts.append(msg)
        e = e.__cause__ or e.__context__
    return "; ".join(parts) or type(exc).__name__


def _is_transient(exc: BaseException) -> bool:
    return bool(_TRANSIENT.search(describe(exc)))


def with_retries(fn: Callable[[], Any], what: str, retries: int = 4, backoff: float = 1.0) -> Any:
    """Run ``fn`` inside the GDAL env, retrying with exponential backoff (and jitter).

    Network errors get ``retries`` more tries; other errors one more (a cut connection can look
    like a corrupt tile), then :class:`SceneFailed` names the cause with URLs masked."""
    attempt = 0
    while True:
        try:
            with gdal_env(fresh=attempt > 0):
                return fn()
        except SceneFailed:
            raise
        except Exception as exc:
            limit = retries if _is_transient(exc) else min(retries, 1)
            if attempt >= limit:
                kind = "network error" if _is_transient(exc) else "unreadable"
                raise SceneFailed(
                    f"{what}: {kind} after {attempt + 1} tries: {mask_text(describe(exc))}"
                ) from None
            delay = backoff * (2**attempt) * (1 + 0.25 * random.random())
            log.debug("%s failed (%s); retry in %.1f s", what, mask_text(describe(exc)), delay)
            time.sleep(delay)
            attempt += 1


# ------------------------------------------------------------------------------- items
def find_asset(item: pystac.Item, keys: Sequence[str]) -> pystac.Asset:
    for k in keys:
        if k in item.assets:
            return item.assets[k]
    raise SceneFailed(f"item {item.id} has none of the assets {list(keys)}")


def dn_offset(item: pystac.Item, asset: pystac.Asset | None = None) -> tuple[int, str]:
    """DN to subtract from this asset so that DN = reflectance x 10000, and why.

    1. ``earthsearch:boa_offset_applied`` true: Earth Search already removed it -> 0 (its
       raster:bands may still say -0.1, so the flag wins).
    2. A processing baseline below 04.00 never had the offset -> 0.
    3. ``raster:bands`` offset/scale (the c1 collection declares -0.1 / 0.0001) -> -offset/scale.
    4. Baseline 04.00 or later (or, with no baseline, acquired from 2022-01-25) -> 1000.
    """
    props = item.properties
    applied = props.get("earthsearch:boa_offset_applied", props.get("sentinel:boa_offset_applied"))
    if applied is True:
        return 0, "earthsearch:boa_offset_applied"
    baseline = baseline_tuple(processing_baseline(item))
    if baseline is not None and baseline < OFFSET_BASELINE:
        return 0, f"baseline {baseline[0]:02d}.{baseline[1]:02d} < 04.00"
    rb = (asset.extra_fields.get("raster:bands") or [{}])[0] if asset is not None else {}
    off, scale = rb.get("offset"), rb.get("scale")
    if off and scale:
        return int(round(-float(off) / float(scale))), "raster:bands offset"
    if baseline is not None:
        return BOA_OFFSET_DN, f"baseline {baseline[0]:02d}.{baseline[1]:02d} >= 04.00"
    if item.datetime is not None and item.datetime.date() >= OFFSET_START:
        return BOA_OFFSET_DN, "acquired after 2022-01-25"
    return 0, "no offset indicated"


def harmonise(dn: np.ndarray, offset: int) -> np.ndarray:
    """Subtract the offset in place (no int32 copy of a 120 Mpx band); nodata (0) stays 0 and
    valid pixels stay >= 1, so a very dark pixel never turns into nodata."""
    if offset == 0:
        return dn
    low = (dn != 0) & (dn <= offset)  # at or below the offset: becomes the darkest valid DN
    np.subtract(dn, offset, out=dn, where=dn > offset)
    dn[low] = 1
    return dn


def scene_offset(
    offsets: dict[str, tuple[int, str]], raw: np.ndarray, valid: np.ndarray
) -> dict[str, tuple[int, str]]:
    """The metadata's offsets per band, unless the pixels contradict a +1000 (see
    OFFSET_CHECK_DN): then no band of this scene gets one, and the rule says why."""
    if not any(off for off, _ in offsets.values()):
        return offsets
    n = int(valid.sum())
    if n == 0:
        return offsets
    dark = np.zeros(valid.shape, bool)
    for band in raw:
        dark |= (band < OFFSET_CHECK_DN) & (band > 0)
    share = float((dark & valid).sum()) / n
    if share <= OFFSET_CHECK_SHARE:
        return offsets
    why = (
        f"pixels: {100 * share:.1f} % of valid pixels below {OFFSET_CHECK_DN} DN, so no offset "
        f"in the COGs (metadata: {next(iter(offsets.values()))[1]})"
    )
    return {b: (0, why) for b in offsets}


def scene_record(
    item: pystac.Item, offsets: dict[str, tuple[int, str]], tile: str | None = None
) -> Scene:
    d = item.datetime or item.common_metadata.start_datetime
    if d is None:
        raise SceneFailed(f"item {item.id} has no datetime")
    d = d if d.tzinfo else d.replace(tzinfo=dt.UTC)
    cc = item.properties.get("eo:cloud_cover")
    first = next(iter(offsets.values()))
    tile = tile or item_tile(item)
    return Scene(
        id=item.id,
        datetime=d.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
        cloud_cover=None if cc is None else float(cc),
        platform=item.properties.get("platform"),
        processing_baseline=processing_baseline(item),
        extra={
            "collection": item.collection_id,
            "boa_offset_removed": first[0],
            "offset_rule": first[1],
            "tile": tile,
            "acquisition": acquisition_key(item, tile),
        },
    )


@dataclass
class SceneData:
    scene: Scene
    reflectance: np.ndarray  # uint16 (B, H, W), harmonised
    scl: np.ndarray  # uint8 (H, W)
    nbytes: int


def read_scene(
    item: pystac.Item,
    grid: TargetGrid,
    bands: Sequence[str] = DEFAULT_BANDS,
    retries: int = 4,
    backoff: float = 1.0,
) -> SceneData:
    """Every band and the SCL of one item on the grid, in memory, harmonised.

    Memory: the scene itself (4 bands + SCL: 1.1 GB for a whole cell at 10 m) and a few
    boolean planes; every step works band by band and in place."""
    refl = np.zeros((len(bands), grid.height, grid.width), np.uint16)
    offsets: dict[str, tuple[int, str]] = {}
    assets = {b: find_asset(item, BAND_ASSETS.get(b, (b,))) for b in bands}
    scl_asset = find_asset(item, SCL_ASSETS)
    for i, band in enumerate(bands):
        offsets[band] = dn_offset(item, assets[band])
        with_retries(
            lambda a=assets[band], o=refl[i]: read_to_grid(
                a.href, grid, Resampling.average, dtype="uint16", out=o
            ),
            f"{item.id} {band}",
            retries,
            backoff,
        )
    scl = with_retries(
        lambda: read_to_grid(scl_asset.href, grid, Resampling.nearest, dtype="uint8"),
        f"{item.id} SCL",
        retries,
        backoff,
    )
    # One validity for all layers: a pixel without SCL or without any band is nodata throughout.
    valid = scl != 0
    for band in refl:
        valid &= band != 0
    offsets = scene_offset(offsets, refl, valid)
    invalid = np.logical_not(valid, out=valid)
    for i, band in enumerate(bands):
        harmonise(refl[i], offsets[band][0])
        refl[i][invalid] = 0
    scl[invalid] = 0
    tile = item_tile(item) or grid.cell
    return SceneData(scene_record(item, offsets, tile), refl, scl, refl.nbytes + scl.nbytes)


# ------------------------------------------------------------------------------- DEM
def read_dem(
    items: Sequence[pystac.Item], grid: TargetGrid, retries: int = 4, backoff: float = 1.0
) -> np.ndarray:
    """The DEM items (Copernicus GLO-30 1-degree COGs in EPSG:4326) on the grid: float32 metres,
    NaN where no item covers (Copernicus has no ocean tiles).

    Tiles are first mosaicked on their shared pixel lattice (only the window around the cell is
    read from each), then warped once, bilinear: warping tile by tile would leave seams where
    the interpolation kernel crosses a tile edge. GLO-30 tiles get coarser in longitude above
    50 degrees, so tiles are grouped by pixel size and each group warped in turn."""
    from rasterio.warp import reproject

    hrefs = [find_asset(it, DEM_ASSETS).href for it in items]
    dem = np.full((grid.height, grid.width), np.nan, np.float32)
    w, s, e, n = grid.lonlat_bounds()
    pad = 0.01  # degrees: room for the bilinear kernel at the grid's edges

    def _mosaics() -> list[tuple[np.ndarray, Affine, CRS]]:
        srcs = [rasterio.open(gdal_path(h)) for h in hrefs]
        try:
            groups: dict[tuple[float, float], list] = {}
            for src in srcs:
                groups.setdefault((round(src.res[0], 12), round(src.res[1], 12)), []).append(src)
            return [
                _mosaic(group, (w - pad, s - pad, e + pad, n + pad)) for group in groups.values()
            ]
        finally:
            for src in srcs:
                src.close()

    if not hrefs:
        return dem
    for mosaic, transform, crs in with_retries(
        _mosaics, f"DEM ({len(hrefs)} tiles)", retries, backoff
    ):
        part = np.full_like(dem, np.nan)
        reproject(
            mosaic,
            part,
            src_transform=transform,
            src_crs=crs,
            src_nodata=np.nan,
            dst_transform=grid.transform,
            dst_crs=grid.crs,
            dst_nodata=np.nan,
            resampling=Resampling.bilinear,
        )
        fill = np.isnan(dem)
        dem[fill] = part[fill]
    return dem


def _mosaic(
    srcs: list, bounds: tuple[float, float, float, float]
) -> tuple[np.ndarray, Affine, CRS]:
    """Tiles of one pixel size, on the first one's lattice, over ``bounds`` (lon/lat)."""
    w, s, e, n = bounds
    t0 = srcs[0].transform
    rx, ry = t0.a, -t0.e
    c0 = math.floor((w - t0.c) / rx)
    r0 = math.floor((t0.f - n) / ry)
    width = math.ceil((e - t0.c) / rx) - c0
    height = math.ceil((t0.f - s) / ry) - r0
    out = np.full((height, width), np.nan, np.float32)
    for src in srcs:
        st = src.transform
        sc = round((st.c - t0.c) / rx) - c0  # the tile's offset on the shared lattice
        sr = round((t0.f - st.f) / ry) - r0
        a0, b0 = max(sr, 0), max(sc, 0)
        a1, b1 = min(sr + src.height, height), min(sc + src.width, width)
        if a1 <= a0 or b1 <= b0:
            continue
        win = Window(b0 - sc, a0 - sr, b1 - b0, a1 - a0)
        data = src.read(1, window=win, masked=True).astype(np.float32).filled(np.nan)
        part = out[a0:a1, b0:b1]
        fill = np.isnan(part)
        part[fill] = data[fill]
    return out, t0 @ Affine.translation(c0, r0), srcs[0].crs


def search_dem(client: Any, grid: TargetGrid, collection: str = DEM_COLLECTION) -> list:
    """DEM items intersecting the grid (a static collection: no dates)."""
    s = client.search(collections=[collection], bbox=list(grid.lonlat_bounds()), limit=100)
    return list(s.items())


# ------------------------------------------------------------------------------- the run
@dataclass
class PrefetchReport:
    cell: str
    path: Path
    grid: TargetGrid
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already complete
    failed: dict[str, str] = field(default_factory=dict)
    dem: str = "not requested"
    estimate_bytes: int = 0
    free_bytes: int = 0
    bytes_decoded: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def padded_pixels(grid: TargetGrid) -> int:
    """Pixels a Stack stores for one 2-D layer of this grid: every level, padded to whole
    256 x 256 chunks (its scene shards are uncompressed, so this is what the disk holds)."""
    from compositor.stack import CHUNK, _levels_for  # the Stack's own level layout

    return sum(
        -(-lv.width // CHUNK) * CHUNK * -(-lv.height // CHUNK) * CHUNK
        for lv in _levels_for(grid.width, grid.height, grid.transform)
    )


def estimate_disk(grid: TargetGrid, n_scenes: int, n_bands: int = len(DEFAULT_BANDS)) -> int:
    """Bytes a prefetch of ``n_scenes`` will add: reflectance, SCL and the cloud probabilities
    the mask step writes later."""
    per_pixel = n_bands * 2 + 1 + 2
    return int(padded_pixels(grid) * per_pixel * n_scenes * STACK_COMPRESSION)


def free_disk(path: Path) -> int:
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def open_or_create_stack(path: Path, grid: TargetGrid, meta: dict[str, Any]) -> Stack:
    """The stack for this grid: opened if it exists and matches, created otherwise."""
    if (path / "zarr.json").exists():
        try:
            stack = Stack.open(path, mode="r+")
        except StackError as exc:
            raise PrefetchError(str(exc)) from None
        same = (
            stack.epsg == grid.epsg
            and stack.width == grid.width
            and stack.height == grid.height
            and all(
                abs(a - b) < 1e-6 for a, b in zip(stack.transform, grid.transform, strict=False)
            )
        )
        if not same:
            raise PrefetchError(
                f"stack {path} has another grid ({stack.width}x{stack.height} at "
                f"{stack.resolution:g} m) than asked ({grid.width}x{grid.height} at "
                f"{grid.res:g} m); use another --data directory or delete it"
            )
        return stack
    path.parent.mkdir(parents=True, exist_ok=True)
    return Stack.create(
        path, grid.cell, grid.epsg, grid.transform, grid.width, grid.height, meta=meta
    )


def prefetch(
    items: Sequence[pystac.Item],
    grid: TargetGrid,
    data_dir: Path,
    *,
    workers: int = 3,
    retries: int = 4,
    backoff: float = 1.0,
    dem_items: Sequence[pystac.Item] | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    check_disk: bool = True,
) -> PrefetchReport:
    """Prefetch ``items`` of ``grid.cell`` into ``<data_dir>/<cell>.zarr``.

    ``workers`` scenes are read at once (network-bound threads; GDAL releases the GIL) while the
    main thread writes finished scenes, one at a time, into the stack. ``dem_items``: DEM items
    to warp onto the grid when the stack has no DEM yet (None: leave the DEM alone).
    """
    from tqdm import tqdm

    started = time.perf_counter()
    data_dir = Path(data_dir)
    path = data_dir / f"{grid.cell}.zarr"
    foreign = [it.id for it in items if item_tile(it) not in (None, grid.cell)]
    if foreign:
        raise PrefetchError(f"items of another tile than {grid.cell}: {foreign[:5]}")
    report = PrefetchReport(grid.cell, path, grid)
    existing, acquired = _complete(path)
    todo, report.skipped = [], []
    for it in items:
        # A rerun may choose another copy of an acquisition already in the stack (a
        # Collection-1 item that appeared since): the stack keeps the one it has.
        key = acquisition_key(it, item_tile(it) or grid.cell)
        (report.skipped if it.id in existing or key in acquired else todo).append(it)
    report.skipped = [it.id for it in report.skipped]
    report.estimate_bytes = estimate_disk(grid, len(todo))
    if dem_items:
        report.estimate_bytes += 4 * padded_pixels(grid)  # the float32 DEM, at most
    report.free_bytes = free_disk(data_dir)
    log.info(
        "%s: %d scenes to fetch (%d already complete), %dx%d px at %g m; estimated %.2f GB on "
        "disk, %.1f GB free",
        grid.cell,
        len(todo),
        len(report.skipped),
        grid.width,
        grid.height,
        grid.res,
        report.estimate_bytes / 1e9,
        report.free_bytes / 1e9,
    )
    if check_disk and report.estimate_bytes > report.free_bytes:
        raise PrefetchError(
            f"not enough disk at {data_dir}: about {report.estimate_bytes / 1e9:.1f} GB needed, "
            f"{report.free_bytes / 1e9:.1f} GB free (fewer scenes, a coarser --resolution or a "
            "--bbox sub-area need less)"
        )
    stack = open_or_create_stack(path, grid, meta or {})

    if dem_items is not None and not stack.has_dem:
        if dem_items:
            try:
                stack.set_dem(read_dem(dem_items, grid, retries, backoff))
                stack.set_meta(has_dem=True, dem_items=[it.id for it in dem_items])
                report.dem = f"{len(dem_items)} DEM items warped onto the grid"
            except Exception as exc:  # never worth losing the scenes over
                report.dem = f"failed: {mask_text(describe(exc))}"
                log.warning("DEM not written (a rerun retries it): %s", report.dem)
        else:
            report.dem = "no DEM items cover the cell"
    elif stack.has_dem:
        report.dem = "already present"

    bar = tqdm(total=len(todo), unit="scene", desc=grid.cell, disable=not progress)
    queue = iter(todo)
    running: dict[Future, pystac.Item] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="prefetch")

    def submit_next() -> None:
        it = next(queue, None)
        if it is not None:
            running[pool.submit(read_scene, it, grid, stack.bands, retries, backoff)] = it

    try:
        for _ in range(max(1, workers)):
            submit_next()
        while running:
            # One finished scene at a time, and a new read only once it is taken: at most
            # ``workers`` scenes read or waiting plus the one being written are in memory
            # (1.1 GB each for a whole cell at 10 m), however many scenes the run has.
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            fut = next(f for f in running if f in done)  # the oldest of them
            it = running.pop(fut)
            submit_next()  # keep the readers busy while this scene is written
            try:
                data = fut.result()
            except Exception as exc:  # SceneFailed, or a bug in one item's metadata
                reason = mask_text(describe(exc))
                report.failed[it.id] = reason
                log.warning("skipped %s: %s", it.id, reason)
            else:
                stack.append_scene(data.scene, data.reflectance, data.scl)
                report.written.append(it.id)
                report.bytes_decoded += data.nbytes
                del data
            bar.update(1)
            bar.set_postfix(failed=len(report.failed), refresh=False)
    except BaseException:
        # Ctrl-C or a write error: stop readers; scenes not marked complete stay invisible.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    stack.set_meta(**{"prefetched": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    report.seconds = time.perf_counter() - started
    return report


def _complete(path: Path) -> tuple[set[str], set[str]]:
    """Ids and acquisition keys of the scenes already complete in the stack at ``path``."""
    if not (path / "zarr.json").exists():
        return set(), set()
    try:
        done = [s for s in Stack.open(path).scenes if s.complete]
    except StackError:
        return set(), set()
    return {s.id for s in done}, {s.extra["acquisition"] for s in done if "acquisition" in s.extra}
