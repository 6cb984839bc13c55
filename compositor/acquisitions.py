"""One item per acquisition: the same Sentinel-2 granule found several times is kept once.

Earth Search v1 serves Sentinel-2 L2A in two collections: Collection-1 (``sentinel-2-c1-l2a``,
everything reprocessed to baseline 05.00+, but with gaps: roughly Nov 2016 - Nov 2019 and parts
of 2022 are missing) and the legacy ``sentinel-2-l2a`` (the original processings, with its own
gaps). A user asking for five summers needs both, and then meets the same acquisition twice,
under different ids (``S2B_49NDB_20200715_0_L2A`` and ``S2B_T49NDB_20200715T031539_L2A``) and
even different ``datetime`` values (Collection-1 restamps the granule sensing time). The legacy
collection itself also holds reprocessings of one acquisition side by side (``_0_L2A`` at 02.13,
``_1_L2A`` at 05.00).

What names an acquisition: the MGRS tile plus the datastrip's sensing start, parsed from
``s2:datastrip_id`` (``..._S20200715T031539_N05.00``). Reprocessing changes the generation time
and the baseline in that id, never the sensing start, and two granules of one tile from two
datastrips on the same day keep different ones. Items without it fall back to the datatake's
sensing start (``s2:datatake_id``, ``GS2B_20200715T031539_...``) and last to tile + platform +
day + relative orbit.

Which copy is kept: one whose data assets are readable over HTTP (an item can be published
before its COGs exist, pointing at the requester-pays JP2 archive), then the collection the user
named first (Collection-1 by default), then the higher processing baseline, then the later
generation time.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pystac

_DATASTRIP_SENSING = re.compile(r"_S(\d{8}T\d{6})(?:_|$)")
_DATATAKE_SENSING = re.compile(r"^GS2[A-D]_(\d{8}T\d{6})_")
_ORBIT_IN_NAME = re.compile(r"_R(\d{3})_")
# Asset keys prefetch reads (bands and SCL), for the readability rule.
DATA_ASSET_KEYS = ("blue", "green", "red", "nir", "scl", "B02", "B03", "B04", "B08", "SCL")


def item_datetime(item: pystac.Item) -> dt.datetime:
    d = item.datetime or item.common_metadata.start_datetime
    if d is None:
        raise ValueError(f"item {item.id} has no datetime")
    return d if d.tzinfo else d.replace(tzinfo=dt.UTC)


def acquisition_key(item: pystac.Item, tile: str | None) -> str:
    """``TILE/SENSING`` naming the granule whatever the collection or id spelling."""
    props = item.properties
    ds = _DATASTRIP_SENSING.search(str(props.get("s2:datastrip_id") or ""))
    if ds:
        return f"{tile}/{ds.group(1)}"
    dtk = _DATATAKE_SENSING.search(str(props.get("s2:datatake_id") or ""))
    if dtk:
        return f"{tile}/datatake-{dtk.group(1)}"
    orbit = props.get("sat:relative_orbit")
    if orbit is None:
        m = _ORBIT_IN_NAME.search(str(props.get("s2:product_uri") or item.id))
        orbit = int(m.group(1)) if m else None
    platform = str(props.get("platform") or item.id[:3]).lower()
    day = item_datetime(item).strftime("%Y%m%d")
    return f"{tile}/{platform}-{day}-R{orbit if orbit is not None else '?'}"


def readable(item: pystac.Item) -> bool:
    """Whether the data assets are plain HTTP(S) (or local) files, not a requester-pays
    ``s3://`` archive that anonymous range reads cannot open."""
    hrefs = [a.href for k, a in item.assets.items() if k in DATA_ASSET_KEYS]
    return bool(hrefs) and all(not h.startswith("s3://") for h in hrefs)


def processing_baseline(item: pystac.Item) -> str | None:
    """The processing baseline ("05.10"), from whichever property this catalogue has."""
    props = item.properties
    v = props.get("s2:processing_baseline") or props.get("sentinel:processing_baseline")
    if v is None:
        # Planetary Computer / ESA product names carry it as _N0214_ (02.14).
        m = re.search(r"_N(\d{2})(\d{2})_", str(props.get("s2:product_uri", "")))
        if m:
            return f"{m.group(1)}.{m.group(2)}"
    return None if v is None else str(v)


def baseline_tuple(text: str | None) -> tuple[int, int] | None:
    """ "05.10" or "5.1" -> (5, 10) / (5, 1); None when there is none."""
    m = re.match(r"^\s*(\d+)(?:\.(\d+))?", str(text or ""))
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def _preferred_first(copies: list[pystac.Item], order: Sequence[str]) -> list[pystac.Item]:
    """Readable first, then the collection named first, the newest baseline, the latest
    generation time (two stable sorts: the last key first)."""

    def pref(it: pystac.Item) -> int:
        coll = it.collection_id or ""
        return order.index(coll) if coll in order else len(order)

    out = sorted(copies, key=lambda i: (str(i.properties.get("s2:generation_time") or ""), i.id))
    out.reverse()
    out.sort(
        key=lambda i: (
            not readable(i),
            pref(i),
            tuple(-v for v in baseline_tuple(processing_baseline(i)) or (0, 0)),
        )
    )
    return out


@dataclass
class Merged:
    """Unique acquisitions and what was dropped to get them."""

    items: list[pystac.Item]  # one per acquisition, in time order
    dropped: dict[str, str] = field(default_factory=dict)  # dropped id -> kept id


def merge(
    items: Iterable[pystac.Item], tiles: dict[str, str | None], order: Sequence[str]
) -> Merged:
    """Keep one item per acquisition (see the module docstring). ``tiles``: item id -> tile.
    ``order``: collections, most preferred first."""
    groups: dict[str, list[pystac.Item]] = defaultdict(list)
    for it in items:
        groups[acquisition_key(it, tiles.get(it.id))].append(it)
    kept: list[pystac.Item] = []
    dropped: dict[str, str] = {}
    for copies in groups.values():
        copies = _preferred_first(copies, order)
        kept.append(copies[0])
        for other in copies[1:]:
            dropped[other.id] = copies[0].id
    kept.sort(key=lambda i: (item_datetime(i), i.id))
    return Merged(kept, dropped)


@dataclass
class YearCount:
    """What one year of the search window gave."""

    year: int
    found: Counter = field(default_factory=Counter)  # collection -> matching items
    unique: Counter = field(default_factory=Counter)  # collection -> acquisitions kept from it
    duplicates: int = 0  # items dropped as copies of an acquisition already kept
    chosen: Counter = field(default_factory=Counter)  # collection -> scenes chosen

    @property
    def acquisitions(self) -> int:
        return sum(self.unique.values())


def year_report(
    years: Iterable[int],
    candidates: Sequence[pystac.Item],
    merged: Merged,
    chosen: Sequence[pystac.Item],
) -> list[YearCount]:
    """Per year: items per collection, duplicates dropped, acquisitions kept, scenes chosen."""
    out = {y: YearCount(y) for y in years}

    def row(it: pystac.Item) -> YearCount:
        y = item_datetime(it).year
        return out.setdefault(y, YearCount(y))

    for it in candidates:
        r = row(it)
        r.found[it.collection_id or "?"] += 1
        if it.id in merged.dropped:
            r.duplicates += 1
    for it in merged.items:
        row(it).unique[it.collection_id or "?"] += 1
    for it in chosen:
        row(it).chosen[it.collection_id or "?"] += 1
    return [out[y] for y in sorted(out)]
