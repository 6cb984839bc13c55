"""Five summers from both Earth Search collections, against real servers on 127.0.0.1.

The catalogue (tests/stac_servers.py COLLECTION_PLAN) holds one place over 2018-2022 as Earth
Search serves it: years only the legacy ``sentinel-2-l2a`` has (Collection-1's backfill gap),
acquisitions in both collections under different ids and restamped datetimes, reprocessings side
by side within the legacy collection, an item published before its COGs, a second datastrip the
same day, and every radiometric convention (no offset, +1000 declared by baseline, flag or
raster:bands, and a flag that contradicts the COG). The stack must hold each acquisition once,
harmonised: pixel for pixel the synthetic surface, whichever copy it came from.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import stac_servers as ss
from typer.testing import CliRunner

import compositor.prefetch as pf
from compositor.cli import app
from compositor.grid import transform_bounds_to_lonlat
from compositor.prefetch import gdal_path, with_retries
from compositor.search import SearchQuery, open_client, search
from compositor.stack import Stack

SIZE = 256  # bands above GDAL's 32 KB first read, so the cut test cuts tile data
FAST = ("--retries", "1", "--backoff", "0.05", "--no-progress", "--no-dem")
WINDOW = ("--start", "2018-01-01", "--end", "2022-12-31", "--months", "6-9")
C1, OLD = ss.S2_C1, ss.S2_OLD

# Which copy of each acquisition the merge must keep (collection, legacy sequence).
KEPT = {
    "2018-06": (OLD, 0),
    "2018-07": (OLD, 0),
    "2019-06": (OLD, 1),  # the reprocessing (05.00) over the original (02.12)
    "2019-08": (OLD, 0),  # the reprocessing's assets are not readable yet
    "2020-06": (C1, None),
    "2020-07": (C1, None),
    "2020-08": (C1, None),
    "2020-08 second datastrip": (OLD, 1),  # same day, another datastrip: its own acquisition
    "2021-06": (C1, None),
    "2021-09": (OLD, 0),
    "2022-06": (C1, None),
    "2022-07": (OLD, 0),
    "2022-08 flag wrong": (OLD, 0),
}


@dataclass
class Catalogue:
    root: Path
    files: ss.FileServer
    stac: ss.StacServer
    items: dict[str, dict]
    syn: object
    index: dict[str, int]  # acquisition label -> synthetic date

    def copy(self, label: str, collection: str, seq: int | None = None) -> str:
        """The id of one copy of an acquisition."""
        t = self.index[label]
        day = ss.COLLECTION_PLAN[t][1]
        for i in self.items.values():
            if i["collection"] != collection:
                continue
            if collection == OLD and i["id"] == f"S2B_49NDB_{day.replace('-', '')}_{seq}_L2A":
                return i["id"]
            if collection == C1 and i["id"].startswith(f"S2B_T49NDB_{day.replace('-', '')}"):
                return i["id"]
        raise KeyError((label, collection, seq))

    def kept(self) -> dict[str, str]:
        return {lab: self.copy(lab, *KEPT[lab]) for lab in KEPT}


@pytest.fixture(scope="module")
def cat(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("collections")
    files = root / "files"
    files.mkdir()
    port = ss.free_port()
    items, syn, index = ss.build_collections(files, f"http://127.0.0.1:{port}", size=SIZE)
    fs = ss.FileServer(files, port)
    st = ss.StacServer(ss.write_catalogue(root / "catalogue", items), ss.free_port(), root)
    fs.start()
    try:
        st.start()
        yield Catalogue(root, fs, st, {i["id"]: i for i in items}, syn, index)
    finally:
        st.stop()
        fs.stop()


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args))
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def _bbox() -> str:
    c, _, bounds = ss.synth_grid(SIZE)
    return ",".join(f"{v:.6f}" for v in transform_bounds_to_lonlat(c.epsg, bounds))


def _query(**kw: object) -> SearchQuery:
    c, _, bounds = ss.synth_grid(SIZE)
    return SearchQuery(
        cell=ss.COLLECTION_CELL,
        start=dt.date(2018, 1, 1),
        end=dt.date(2022, 12, 31),
        months=(6, 7, 8, 9),
        bbox=transform_bounds_to_lonlat(c.epsg, bounds),
        **kw,  # type: ignore[arg-type]
    )


def _expected(cat: Catalogue, label: str) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic surface of one acquisition as the stack must hold it (DN, no offset)."""
    t = cat.index[label]
    scl = np.repeat(np.repeat(cat.syn.scl[t, ::2, ::2], 2, 0), 2, 1)[:SIZE, :SIZE]
    refl = cat.syn.reflectance[t].copy()
    bad = (scl == 0) | np.any(refl == 0, axis=0)
    refl[:, bad] = 0
    return refl, np.where(bad, 0, scl)


def _scenes(path: Path) -> dict[str, tuple[object, np.ndarray]]:
    """Scene id -> (Scene, reflectance over the synthetic area) of every complete scene."""
    s = Stack.open(path)
    _, t, _ = ss.synth_grid(SIZE)
    row, col = round((s.transform.f - t.f) / 10), round((t.c - s.transform.c) / 10)
    out = {}
    for i in s.complete_indices():
        got = s.read(0, (row, col, SIZE, SIZE), np.array([i]))["reflectance"][0]
        out[s.scenes[i].id] = (s.scenes[i], got)
    return out


# --------------------------------------------------------------------------- search
def test_search_merges_both_collections_per_acquisition(cat: Catalogue):
    client = open_client(cat.stac.url)
    r = search(_query(limit=100), client)
    kept = cat.kept()
    assert [i.id for i in r.items] == sorted(
        kept.values(), key=lambda i: pystac.Item.from_dict(cat.items[i]).datetime
    )
    assert r.acquisitions == len(KEPT) == 13 and r.of_tile == 19
    # Every copy dropped names the copy kept for it: across collections and within one.
    assert r.duplicates == {
        cat.copy("2019-06", OLD, 0): kept["2019-06"],
        cat.copy("2019-08", OLD, 1): kept["2019-08"],
        cat.copy("2020-06", OLD, 0): kept["2020-06"],
        cat.copy("2020-08", OLD, 0): kept["2020-08"],
        cat.copy("2021-06", OLD, 0): kept["2021-06"],
        cat.copy("2022-06", OLD, 0): kept["2022-06"],
    }
    years = {y.year: y for y in r.years}
    assert sorted(years) == [2018, 2019, 2020, 2021, 2022]
    assert [(years[y].found[C1], years[y].found[OLD]) for y in sorted(years)] == [
        (0, 2),
        (0, 4),
        (3, 3),
        (1, 2),
        (1, 3),
    ]
    assert [years[y].duplicates for y in sorted(years)] == [0, 2, 2, 1, 1]
    assert [years[y].acquisitions for y in sorted(years)] == [2, 2, 4, 2, 3]
    warnings = r.warnings()
    assert any("only 13 scenes" in w and "asked for 100" in w for w in warnings), warnings
    assert any(f"2018 has no items in {C1}" in w for w in warnings), warnings
    assert any(f"2019 has no items in {C1}" in w for w in warnings), warnings

    # One collection only: the legacy one lacks the Collection-1-only acquisition.
    old = search(_query(collections=(OLD,)), client)
    assert old.acquisitions == 12 and len(old.duplicates) == 2
    assert cat.copy("2020-07", C1) not in {i.id for i in old.items}
    assert all(i.collection_id == OLD for i in old.items)
    # Preference follows the order given: legacy first keeps the legacy copies.
    rev = search(_query(collections=(OLD, C1)), client)
    assert rev.acquisitions == 13
    assert {i.id for i in rev.items} >= {cat.copy("2020-06", OLD, 0), cat.copy("2022-06", OLD, 0)}

    # A limit below what exists: one scene per year first, least cloudy first, no warning.
    five = search(_query(limit=5), client)
    assert sorted(i.datetime.year for i in five.items) == [2018, 2019, 2020, 2021, 2022]
    assert not any("only" in w for w in five.warnings())


def test_search_cli_reports_years_and_warns_when_short(cat: Catalogue):
    code, out = _cli(
        "search", "49NDB", "--bbox", _bbox(), *WINDOW, "--limit", "20", "--stac-url", cat.stac.url
    )
    assert code == 0, out
    assert "49NDB: 13 scenes chosen of 13 acquisitions (19 matching items, 6 duplicates" in out
    head = next(line for line in out.splitlines() if line.startswith("year"))
    assert C1 in head and OLD in head and "duplicates" in head and "chosen" in head
    row = next(line for line in out.splitlines() if line.startswith("2019"))
    assert row.split() == ["2019", "0", "4", "2", "2", "2"]
    assert "warning: 49NDB: only 13 scenes match" in out and "asked for 20" in out
    assert f"2018 has no items in {C1}" in out
    for iid in cat.kept().values():
        assert iid in out
    # Repeatable --collection; the table names each scene's collection.
    code, out = _cli(
        "search", "49NDB", "--bbox", _bbox(), *WINDOW, "--collection", C1, "--limit", "3",
        "--stac-url", cat.stac.url,
    )  # fmt: skip
    assert code == 0 and "3 scenes chosen of 5 acquisitions" in out, out
    assert OLD not in out.split("cloud %")[1]


# --------------------------------------------------------------------------- prefetch
def test_prefetch_of_both_collections_is_one_harmonised_stack(cat: Catalogue, tmp_path: Path):
    args = ("prefetch", "49NDB", "--bbox", _bbox(), *WINDOW, "--stac-url", cat.stac.url, *FAST)
    code, out = _cli(*args, "--data", str(tmp_path / "both"))
    assert code == 0, out
    assert "13 scenes written" in out and "only 13 scenes match" in out
    got = _scenes(tmp_path / "both" / "49NDB.zarr")
    kept = cat.kept()
    assert set(got) == set(kept.values())
    for label, iid in kept.items():
        scene, refl = got[iid]
        exp, _ = _expected(cat, label)
        # Pixel for pixel the surface, whatever the copy's collection and convention: no
        # brightness step between years or collections.
        assert np.array_equal(refl, exp), (label, scene.extra)
        assert scene.extra["collection"] == KEPT[label][0]
        assert scene.extra["acquisition"].startswith("49NDB/")
    rules = {lab: got[kept[lab]][0].extra for lab in kept}
    assert rules["2018-06"]["boa_offset_removed"] == 0
    assert rules["2019-06"]["boa_offset_removed"] == 1000  # the 05.00 legacy reprocessing
    assert rules["2020-06"]["offset_rule"] == "raster:bands offset"  # Collection-1
    assert rules["2022-06"]["boa_offset_removed"] == 1000
    assert rules["2022-07"]["boa_offset_removed"] == 1000
    wrong = rules["2022-08 flag wrong"]
    assert wrong["boa_offset_removed"] == 0 and wrong["offset_rule"].startswith("pixels:")


def test_same_place_from_both_conventions_gives_the_same_stack(cat: Catalogue, tmp_path: Path):
    args = ("prefetch", "49NDB", "--bbox", _bbox(), *WINDOW, "--stac-url", cat.stac.url, *FAST)
    code, out = _cli(*args, "--collection", OLD, "--data", str(tmp_path / "old"))
    assert code == 0 and "12 scenes written" in out, out
    code, out = _cli(*args, "--collection", C1, "--data", str(tmp_path / "c1"))
    assert code == 0 and "5 scenes written" in out, out
    old = _scenes(tmp_path / "old" / "49NDB.zarr")
    c1 = _scenes(tmp_path / "c1" / "49NDB.zarr")
    both = [lab for lab, (coll, _) in KEPT.items() if coll == C1 and lab != "2020-07"]
    assert len(both) == 4
    for label in both:
        a = old[cat.copy(label, OLD, 0)]
        b = c1[cat.copy(label, C1)]
        # 02.14 / 03.00 / 04.00-with-flag without offset against 05.xx with +1000: same pixels.
        assert a[0].extra["acquisition"] == b[0].extra["acquisition"]
        assert np.array_equal(a[1], b[1]), label
        assert a[0].extra["boa_offset_removed"] == 0 and b[0].extra["boa_offset_removed"] == 1000

    # The legacy-only stack, prefetched again from both: acquisitions already there are not
    # fetched a second time from Collection-1; only the one the legacy collection lacks is.
    code, out = _cli(*args, "--data", str(tmp_path / "old"))
    assert code == 0, out
    assert "1 scenes written, 12 already there" in out
    s = Stack.open(tmp_path / "old" / "49NDB.zarr")
    keys = [s.scenes[i].extra["acquisition"] for i in s.complete_indices()]
    assert len(keys) == len(set(keys)) == 13


def test_a_retry_rereads_a_transfer_cut_short(cat: Catalogue, tmp_path: Path):
    """The first data read of every Collection-1 COG is cut mid-body by the server. GDAL keeps
    the short block; a retry that let it use its cache would fail the same way without asking
    the server again. The prefetch's retries re-read and the stack is exact."""
    port = ss.free_port()
    base = f"http://127.0.0.1:{port}"
    cut = ss.FileServer(cat.files.root, port, truncate=("/c1/", 1))
    items, _, _ = ss.build_collections(cat.files.root, base, size=SIZE)  # same COGs, new URLs
    c1_items = [i for i in items if i["collection"] == C1]
    stac = ss.StacServer(ss.write_catalogue(tmp_path / "cat", c1_items), ss.free_port(), tmp_path)
    cut.start()
    stac.start()
    try:
        code, out = _cli(
            "prefetch", "49NDB", "--bbox", _bbox(), *WINDOW, "--stac-url", stac.url, *FAST,
            "--collection", C1, "--workers", "1", "--data", str(tmp_path / "d"),
        )  # fmt: skip
        assert code == 0 and "5 scenes written" in out, out
        log = cut.log_path.read_text().splitlines()
        cuts = [line.split()[1] for line in log if line.startswith("CUT ")]
        # Every band COG of every scene, once (the 20 m SCL fits in GDAL's first read).
        assert len(cuts) == len(set(cuts)) == 5 * 4 and all("/scl.tif" not in c for c in cuts)
        for c in cuts:  # each cut path was asked for again after its cut
            k = next(k for k, line in enumerate(log) if line.startswith(f"CUT {c} "))
            assert any(line.startswith(f"SENT {c} ") for line in log[k + 1 :]), c
        got = _scenes(tmp_path / "d" / "49NDB.zarr")
        for label in ("2020-06", "2020-07", "2020-08", "2021-06", "2022-06"):
            assert np.array_equal(got[cat.copy(label, C1)][1], _expected(cat, label)[0]), label

        # The same cut with GDAL's caches left on for the retry: the retry is served the short
        # block from the cache and fails identically (what the fresh retry avoids).
        c1 = next(i for i in c1_items if i["id"] == cat.copy("2020-07", C1))
        href = c1["assets"]["red"]["href"] + "?again=1"  # a URL not read before: cut again

        def read() -> np.ndarray:
            with rasterio.open(gdal_path(href)) as src:
                return src.read(1)

        real_env = pf.gdal_env
        pf.gdal_env = lambda fresh=False: real_env(False)
        try:
            with pytest.raises(pf.SceneFailed, match=r"got \d+ bytes, expected \d+"):
                with_retries(read, "cached retry", retries=2, backoff=0.01)
        finally:
            pf.gdal_env = real_env
        log = cut.log_path.read_text().splitlines()
        again = [line.split()[0] for line in log if "?again" in line]
        assert again == ["SENT", "CUT"]  # header, the cut read, and then the retries sent nothing
    finally:
        stac.stop()
        cut.stop()


def test_collection_option_is_checked(cat: Catalogue):
    code, out = _cli("search", "49NDB", "--collection", " ", "--stac-url", cat.stac.url)
    assert code == 2 and "collection" in out
    assert json.loads(json.dumps(ss.COLLECTION_PLAN))  # the plan stays plain data
