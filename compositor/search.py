"""STAC search for the Sentinel-2 L2A scenes of one MGRS cell (Earth Search v1 by default).

The search asks the API for the cell's lon/lat box, one date window per run of wanted months (so
a June-September search over five years moves five windows' worth of items, not five years'),
in every collection asked for (by default both of Earth Search's L2A collections: Collection-1
has years missing that only the legacy collection holds), and keeps only the items of the cell's
own MGRS tile: neighbouring tiles overlap every cell by ~10 km, more along UTM zone edges. The
same acquisition found twice (in both collections, or reprocessed within one) is kept once
(compositor.acquisitions). From what is left it takes at most ``limit`` scenes, the least
cloudy first but round-robin over the years, so a hundred scenes are spread over five summers
rather than all taken from the clearest one; the result says per year what each collection gave
and whether the request could be met.

Cloud cover and the tile are checked here on every item even when the API could filter on them
(the STAC ``query`` extension is used when the server conforms to it, to move fewer items):
servers differ in what they honour, and a filter that a server silently ignores must not let
wrong scenes into a stack.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pystac
from pystac_client import Client
from pystac_client.stac_api_io import StacApiIO
from urllib3.util.retry import Retry

from compositor.acquisitions import (
    YearCount,
    item_datetime,
    merge,
    processing_baseline,
    year_report,
)
from compositor.grid import (
    Cell,
    CellError,
    cell,
    cells_in_bbox,
    normalize_cell_id,
    transform_bounds_to_lonlat,
)

log = logging.getLogger(__name__)

DEFAULT_STAC_URL = "https://earth-search.aws.element84.com/v1"
# Earth Search's two L2A collections, the preferred copy of an acquisition first.
DEFAULT_COLLECTIONS = ("sentinel-2-c1-l2a", "sentinel-2-l2a")
DEFAULT_LIMIT = 100
DEFAULT_YEARS = 5
# Items asked for per page: Earth Search allows up to 1000 pages of 100 items at most anyway.
PAGE_SIZE = 100
# An upper bound on items pulled for one cell, so a wide-open search cannot page forever.
MAX_ITEMS = 5000

# Sentinel-2 item ids that carry the tile: S2A_29RKH_20200219_0_L2A, S2B_T43QDB_20200110T..._L2A,
# S2A_MSIL2A_20200219T112111_N0214_R037_T29RKH_20200219T123947.
_ID_TILE_RE = re.compile(r"(?:^|_)T?(\d{1,2}[C-HJ-NP-X][A-HJ-NP-Z][A-HJ-NP-V])(?:_|$)")


class SearchError(RuntimeError):
    """The STAC API could not be searched (unreachable, refused, or malformed answers)."""


def stac_url(url: str | None = None) -> str:
    """The STAC API to use: an explicit URL, else $CLEARSKY_STAC_URL, else Earth Search v1."""
    return (url or os.environ.get("CLEARSKY_STAC_URL") or DEFAULT_STAC_URL).rstrip("/")


_SECRET_KEYS = re.compile(r"(sig|signature|token|key|secret|credential|password|auth)", re.I)


def mask_url(url: str) -> str:
    """A URL safe to print: no user:password, and query values that look secret replaced.

    Signed URLs (S3 presigned, Planetary Computer SAS tokens) carry credentials in the query
    string; logs and error reports must never show them.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unprintable url>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if _SECRET_KEYS.search(k) or len(v) > 40 else v) for k, v in pairs],
            safe="*",
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_URL_IN_TEXT = re.compile(r"(?:https?|s3)://[^\s'\"<>]+")


def mask_text(text: str) -> str:
    """Mask every URL inside a message (GDAL and requests errors quote the URL they failed on)."""
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), str(text))


class _MaskUrls(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        record.msg = mask_text(str(record.msg))
        return True


def mask_logged_urls() -> None:
    """Mask URLs in every record the root handlers print: GDAL's own retry warnings (through
    rasterio's loggers) quote the full URL, signed query string included."""
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, _MaskUrls) for f in h.filters):
            h.addFilter(_MaskUrls())


@dataclass(frozen=True)
class SearchQuery:
    """What to search for. ``bbox`` (lon/lat) narrows the search to part of the cell."""

    cell: str
    start: dt.date
    end: dt.date
    months: tuple[int, ...] | None = None
    max_cloud: float | None = None
    limit: int = DEFAULT_LIMIT
    collections: tuple[str, ...] = DEFAULT_COLLECTIONS  # most preferred first
    bbox: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cell", normalize_cell_id(self.cell))
        if self.start > self.end:
            raise ValueError(f"start {self.start} is after end {self.end}")
        if self.months is not None:
            bad = [m for m in self.months if not 1 <= int(m) <= 12]
            if bad or not self.months:
                raise ValueError(f"months must be 1..12, got {list(self.months)}")
            object.__setattr__(self, "months", tuple(sorted({int(m) for m in self.months})))
        if self.max_cloud is not None and not 0 <= self.max_cloud <= 100:
            raise ValueError(f"max cloud cover must be 0..100 %, got {self.max_cloud}")
        if self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        colls = tuple(dict.fromkeys(str(c).strip() for c in self.collections))
        if not colls or not all(colls):
            raise ValueError("give at least one collection, e.g. sentinel-2-c1-l2a")
        object.__setattr__(self, "collections", colls)


@dataclass
class SearchResult:
    query: SearchQuery
    items: list[pystac.Item]  # the chosen scenes, in time order
    found: int = 0  # items the API returned
    of_tile: int = 0  # of those, items of the cell's tile matching dates, months, cloud
    dropped_other_tiles: list[str] = field(default_factory=list)
    duplicates: dict[str, str] = field(default_factory=dict)  # dropped id -> kept id
    acquisitions: int = 0  # unique acquisitions among the matching items
    years: list[YearCount] = field(default_factory=list)

    @property
    def short(self) -> bool:
        """Fewer scenes than asked for exist in the window."""
        return len(self.items) < self.query.limit

    def warnings(self) -> list[str]:
        """What a user must hear: the request cannot be met, a year has no scenes, or one of
        the collections gave nothing in a year another one covers."""
        q = self.query
        out = []
        if self.short:
            out.append(
                f"{q.cell}: only {len(self.items)} scenes match in {q.start}..{q.end} (asked for "
                f"{q.limit}): widen dates, months or --max-cloud, or add a collection"
            )
        empty = [str(y.year) for y in self.years if y.acquisitions == 0]
        if empty and len(empty) < len(self.years):
            out.append(f"{q.cell}: no scenes at all in {', '.join(empty)}")
        if len(q.collections) > 1:
            for y in self.years:
                gaps = [c for c in q.collections if y.found[c] == 0]
                if y.acquisitions and gaps:
                    out.append(f"{q.cell}: {y.year} has no items in {', '.join(gaps)}")
        return out


def default_dates(
    start: dt.date | None, end: dt.date | None, years: int = DEFAULT_YEARS
) -> tuple[dt.date, dt.date]:
    """Missing ends default to today and ``years`` years before the end."""
    end = end or dt.date.today()
    if start is None:
        try:
            start = end.replace(year=end.year - years)
        except ValueError:  # 29 February
            start = end.replace(year=end.year - years, day=28)
    return start, end


def month_windows(
    start: dt.date, end: dt.date, months: Sequence[int] | None = None
) -> list[tuple[dt.datetime, dt.datetime]]:
    """Datetime intervals (UTC, end inclusive to the microsecond) covering the wanted months.

    Consecutive wanted months are merged into one window, and December-January runs across the
    new year, so ``6,7,8,9`` over five years gives five windows.
    """
    utc = dt.UTC
    lo = dt.datetime.combine(start, dt.time.min, tzinfo=utc)
    hi = dt.datetime.combine(end, dt.time.max, tzinfo=utc)
    if not months:
        return [(lo, hi)]
    wanted = set(months)
    windows: list[tuple[dt.datetime, dt.datetime]] = []
    y, m = start.year, start.month
    while (y, m) <= (end.year, end.month):
        if m in wanted:
            m_lo = dt.datetime(y, m, 1, tzinfo=utc)
            ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
            m_hi = dt.datetime(ny, nm, 1, tzinfo=utc) - dt.timedelta(microseconds=1)
            m_lo, m_hi = max(m_lo, lo), min(m_hi, hi)
            if windows and windows[-1][1] + dt.timedelta(microseconds=1) >= m_lo:
                windows[-1] = (windows[-1][0], m_hi)
            else:
                windows.append((m_lo, m_hi))
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return windows


def item_tile(item: pystac.Item | dict) -> str | None:
    """The MGRS tile of an item, from whichever property this catalogue version has.

    Earth Search v1 has ``grid:code`` = "MGRS-29RKH" and ``mgrs:utm_zone`` /
    ``mgrs:latitude_band`` / ``mgrs:grid_square``; older catalogues ``sentinel:utm_zone`` ...;
    Planetary Computer ``s2:mgrs_tile``. Last resort: the tile inside the item id.
    """
    props = item.properties if isinstance(item, pystac.Item) else item.get("properties", {})
    item_id = item.id if isinstance(item, pystac.Item) else item.get("id", "")
    candidates: list[str] = []
    code = props.get("grid:code")
    if isinstance(code, str) and code.upper().startswith("MGRS-"):
        candidates.append(code[5:])
    for pre in ("mgrs", "sentinel"):
        zone = props.get(f"{pre}:utm_zone")
        band = props.get(f"{pre}:latitude_band")
        square = props.get(f"{pre}:grid_square")
        if zone is not None and band and square:
            candidates.append(f"{int(zone):02d}{band}{square}")
    if props.get("s2:mgrs_tile"):
        candidates.append(str(props["s2:mgrs_tile"]))
    m = _ID_TILE_RE.search(str(item_id))
    if m:
        candidates.append(m.group(1))
    for c in candidates:
        try:
            return normalize_cell_id(c)
        except CellError:
            continue
    return None


def cloud_cover(item: pystac.Item) -> float | None:
    v = item.properties.get("eo:cloud_cover")
    return None if v is None else float(v)


def select_scenes(items: Iterable[pystac.Item], limit: int) -> list[pystac.Item]:
    """At most ``limit`` items: least cloudy first, round-robin over the years; time order.

    Items with no cloud cover sort last within their year.
    """
    by_year: dict[int, list[pystac.Item]] = defaultdict(list)
    for it in items:
        by_year[_item_datetime(it).year].append(it)
    queues = []
    for year in sorted(by_year):
        q = sorted(
            by_year[year],
            key=lambda i: (cloud_cover(i) is None, cloud_cover(i) or 0.0, _item_datetime(i), i.id),
        )
        queues.append(q)
    chosen: list[pystac.Item] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(chosen) < limit:
                chosen.append(q[depth])
        depth += 1
    return sorted(chosen, key=lambda i: (_item_datetime(i), i.id))


def _item_datetime(item: pystac.Item) -> dt.datetime:
    try:
        return item_datetime(item)
    except ValueError as exc:
        raise SearchError(str(exc)) from None


def open_client(url: str | None = None, timeout: float = 60.0, retries: int = 5) -> Client:
    """A pystac-client Client whose HTTP calls retry 429/5xx and dropped connections with
    exponential backoff (urllib3 Retry), so a busy API does not end a long search."""
    retry = Retry(
        total=retries,
        connect=min(retries, 3),  # refused thrice in 3.5 s: the host is down, say so
        backoff_factor=0.5,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=None,  # POST /search is safe to repeat
        raise_on_status=False,
    )
    io = StacApiIO(timeout=timeout, max_retries=retry)
    target = stac_url(url)
    try:
        return Client.open(target, stac_io=io)
    except ValueError as exc:  # JSONDecodeError: a web page or anything else than STAC JSON
        raise SearchError(
            f"cannot open STAC API {mask_url(target)}: it did not answer JSON ({exc}); is "
            "this the API's root URL?"
        ) from None
    except Exception as exc:  # requests / pystac-client raise many kinds
        raise SearchError(f"cannot open STAC API {mask_url(target)}: {_short_error(exc)}") from None


def area_lonlat(c: Cell, bbox: tuple[float, float, float, float] | None) -> tuple[float, ...]:
    """The lon/lat box to search: the cell's, or its intersection with ``bbox``."""
    w, s, e, n = transform_bounds_to_lonlat(c.epsg, c.bounds)
    if bbox is None:
        return (w, s, e, n)
    bw, bs, be, bn = bbox
    out = (max(w, bw), max(s, bs), min(e, be), min(n, bn))
    if out[0] >= out[2] or out[1] >= out[3]:
        raise CellError(
            f"bbox {bbox} does not overlap cell {c.id} ({w:.3f},{s:.3f},{e:.3f},{n:.3f})"
        )
    return out


def search(query: SearchQuery, client: Client | None = None) -> SearchResult:
    """Scenes of one cell matching ``query`` (see the module docstring for the rules)."""
    c = cell(query.cell)
    client = client or open_client()
    area = area_lonlat(c, query.bbox)
    server_query = None
    if query.max_cloud is not None and _conforms_to_query(client):
        server_query = {"eo:cloud_cover": {"lte": query.max_cloud}}
    seen: dict[tuple[str, str], pystac.Item] = {}  # (collection, id): ids repeat across them
    tiles: dict[str, str | None] = {}
    found = 0
    other_tiles: list[str] = []
    for collection in query.collections:
        n_coll = 0
        for lo, hi in month_windows(query.start, query.end, query.months):
            try:
                s = client.search(
                    collections=[collection],
                    bbox=list(area),
                    datetime=(lo, hi),
                    query=server_query,
                    limit=PAGE_SIZE,
                    max_items=MAX_ITEMS,
                )
                page_items = list(s.items())
            except Exception as exc:
                raise SearchError(f"STAC search failed: {_short_error(exc)}") from None
            for it in page_items:
                found += 1
                n_coll += 1
                if it.collection_id and it.collection_id != collection:
                    continue  # a server that ignored the collections filter
                it.collection_id = it.collection_id or collection
                if (collection, it.id) in seen:
                    continue
                tile = item_tile(it)
                if tile is not None and tile != c.id:
                    other_tiles.append(it.id)
                    continue
                if tile is None:
                    log.warning("item %s names no MGRS tile; kept: it covers the area", it.id)
                seen[(collection, it.id)] = it
                tiles[it.id] = tile or c.id
            if n_coll >= MAX_ITEMS:
                log.warning("stopped at %d items of %s; narrow the dates", MAX_ITEMS, collection)
                break
    candidates = []
    for it in seen.values():
        d = _item_datetime(it).date()
        if not query.start <= d <= query.end:
            continue
        if query.months and d.month not in query.months:
            continue
        cc = cloud_cover(it)
        if query.max_cloud is not None and (cc is None or cc > query.max_cloud):
            continue
        candidates.append(it)
    merged = merge(candidates, tiles, query.collections)
    chosen = select_scenes(merged.items, query.limit)
    # The years the wanted months touch (a June-September window never reports its winters).
    windows = month_windows(query.start, query.end, query.months)
    years = sorted({y for lo, hi in windows for y in range(lo.year, hi.year + 1)})
    return SearchResult(
        query,
        chosen,
        found,
        len(candidates),
        other_tiles,
        merged.dropped,
        len(merged.items),
        year_report(years, candidates, merged, chosen),
    )


def _short_error(exc: BaseException) -> str:
    """One line of an error from the STAC API: an HTML error page or a long JSON body must not
    be printed whole."""
    text = mask_text(exc)
    if "<html" in text.lower() or "<!doctype" in text.lower():
        title = re.search(r"<title>(.*?)</title>", text, re.I | re.S)
        name = title.group(1).strip()[:80] if title else "no title"
        text = f"the server answered an HTML page ({name}), not STAC JSON"
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _conforms_to_query(client: Client) -> bool:
    try:
        return bool(client.conforms_to("QUERY"))
    except Exception:  # unknown conformance names differ between pystac-client versions
        return False


def search_bbox(
    bbox: tuple[float, float, float, float],
    start: dt.date,
    end: dt.date,
    client: Client | None = None,
    **kwargs: object,
) -> list[SearchResult]:
    """One :func:`search` per cell whose square intersects a lon/lat bbox."""
    client = client or open_client()
    out = []
    for cid in cells_in_bbox(bbox):
        q = SearchQuery(cell=cid, start=start, end=end, bbox=bbox, **kwargs)  # type: ignore[arg-type]
        try:
            out.append(search(q, client))
        except CellError:
            continue  # a square of the lattice that only grazes the bbox
    return out


def format_table(result: SearchResult, show_cell: bool = False) -> str:
    """date, id, collection, cloud cover, processing baseline: one line per chosen scene."""
    head = ("cell  " if show_cell else "") + (
        f"{'date':<10}  {'id':<44}  {'collection':<17}  {'cloud %':>7}  baseline"
    )
    lines = [head, "-" * len(head)]
    for it in result.items:
        cc = cloud_cover(it)
        pb = processing_baseline(it) or "?"
        pre = f"{result.query.cell} " if show_cell else ""
        lines.append(
            f"{pre}{_item_datetime(it).date().isoformat():<10}  {it.id:<44}  "
            f"{it.collection_id or '?':<17}  {'?' if cc is None else f'{cc:.1f}':>7}  {pb}"
        )
    return "\n".join(lines)


def format_years(result: SearchResult) -> str:
    """Per year: items each collection gave, duplicates dropped, acquisitions, chosen."""
    colls = list(result.query.collections)
    head = f"{'year':<4}  " + "  ".join(f"{c:>17}" for c in colls)
    head += f"  {'duplicates':>10}  {'acquisitions':>12}  {'chosen':>6}"
    lines = [head, "-" * len(head)]
    for y in result.years:
        lines.append(
            f"{y.year:<4}  "
            + "  ".join(f"{y.found[c]:>17}" for c in colls)
            + f"  {y.duplicates:>10}  {y.acquisitions:>12}  {sum(y.chosen.values()):>6}"
        )
    return "\n".join(lines)


def parse_months(text: str | None) -> tuple[int, ...] | None:
    """'6,7,8,9' or '6-9' -> (6, 7, 8, 9); '11-2' wraps the year."""
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = (int(x) for x in part.split("-", 1))
            rng = range(a, b + 1) if a <= b else [*range(a, 13), *range(1, b + 1)]
            out.extend(rng)
        else:
            out.append(int(part))
    return tuple(out)


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """'W,S,E,N' in degrees -> a checked tuple."""
    try:
        w, s, e, n = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"bbox must be W,S,E,N in degrees, got {text!r}") from None
    if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
        raise ValueError(f"bbox {text!r} must have west<east, south<north within lon/lat range")
    return (w, s, e, n)
