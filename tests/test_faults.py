"""Damaged data: the server starts whatever the data directory holds, logs one warning per bad
cell or scene, serves every intact cell and scene, and never crashes or shows a half-read scene.

Each case is a small stack (6 scenes, 320 x 320 px, two levels) damaged on disk the way a full
disk, a killed copy or a stray file would; one real server serves them all at once.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pytest
from conftest import running_server
from PIL import Image

from compositor.grid import cell as mgrs_cell
from compositor.stack import Scene, Stack
from tileserver.registry import Registry

TMS = morecantile.tms.get("WebMercatorQuad")
N, SIZE = 6, 320


def build(d: Path, cid: str, folder: str | None = None) -> Stack:
    """A small stack of ``cid`` (top-left 320 x 320 px of the cell): 6 dates, a few clouds."""
    c = mgrs_cell(cid)
    st = Stack.create(d / f"{folder or cid}.zarr", cid, c.epsg, c.transform(), SIZE, SIZE)
    rng = np.random.default_rng(len(cid) + ord(cid[-1]))
    base = rng.integers(300, 2500, (4, SIZE, SIZE), dtype=np.uint16)
    for i in range(N):
        refl = (base + rng.integers(0, 200, base.shape)).astype(np.uint16)
        scl = np.full((SIZE, SIZE), 4, np.uint8)
        scl[i * 40 : i * 40 + 60, 100:200] = 9  # a cloud, somewhere else each date
        refl[:, scl == 9] = 6000
        scene = Scene(id=f"S2A_{cid}_{i}", datetime=f"2021-0{i + 3}-15T10:00:00Z")
        st.append_scene(scene, refl, scl)
    return st


def shard(d: Path, cid: str, level: int, name: str, t: int) -> Path:
    lead = {"reflectance": 1, "scl": 0, "cloudprob": 1}[name]
    return d / f"{cid}.zarr" / f"L{level}" / name / "c" / str(t) / Path(*["0"] * (lead + 2))


# cell -> (scene index, level, array, damage, what the warning says)
SCENE_DAMAGE = {
    "31UDP": (1, 0, "reflectance", "empty", "truncated"),
    "31UCQ": (2, 1, "scl", "half", "truncated|corrupt index"),
    "31UCP": (0, 0, "scl", "deleted", "missing"),
    "31UEQ": (3, 0, "reflectance", "index bytes", "corrupt index"),
    "31UEP": (4, 1, "reflectance", "fifo", "not a regular file"),
}
BAD_CELLS = {
    "31TDN": "L1/reflectance/zarr.json",  # an array's metadata: the whole cell is unusable
    "31TCN": "malformed",  # the root metadata is not JSON
    "31TEN": "malformed",  # the root metadata is a FIFO: must not hang the start
}


def damage(path: Path, how: str) -> None:
    if how == "empty":
        path.write_bytes(b"")
    elif how == "half":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "deleted":
        path.unlink()
    elif how == "index bytes":
        with open(path, "r+b") as f:
            f.seek(-40, os.SEEK_END)
            f.write(bytes(range(7, 43)))
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("damaged")
    stacks = {cid: build(d, cid) for cid in ["31UDQ", *SCENE_DAMAGE, *BAD_CELLS]}
    for cid, (t, level, name, how, _) in SCENE_DAMAGE.items():
        damage(shard(d, cid, level, name, t), how)
    (d / "31TDN.zarr" / "L1" / "reflectance" / "zarr.json").write_text('{"zarr_format": 3, ')
    (d / "31TCN.zarr" / "zarr.json").write_text("not json at all")
    (d / "31TEN.zarr" / "zarr.json").unlink()
    os.mkfifo(d / "31TEN.zarr" / "zarr.json")
    shutil.copytree(d / "31UDP.zarr", d / "31udq.zarr")  # a stray copy naming 31UDQ
    return d, stacks


@pytest.fixture(scope="module")
def damaged_server(damaged) -> tuple[str, Path]:
    d, _ = damaged
    log = d.parent / "damaged-server.log"
    with running_server(d, log) as url:
        yield url, log


def _png(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


def _tile_url(url: str, cell: dict, z: int = 14) -> str:
    lon, lat = cell["center"]
    t = TMS.tile(lon, lat, z)
    return f"{url}/cells/{cell['id']}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png"


def test_server_starts_serving_every_intact_cell(damaged_server, damaged):
    url, log = damaged_server
    d, _ = damaged
    health = httpx.get(f"{url}/health").json()
    assert health["cells"] == sorted(["31UDQ", *SCENE_DAMAGE])
    text = "\n".join(health["warnings"])
    for cid, why in BAD_CELLS.items():
        assert re.search(f"cell {cid} not served: .*{re.escape(why)}", text), text
    assert "31UDQ: 2 folders name it (31UDQ.zarr, 31udq.zarr); serving 31UDQ.zarr" in text
    log_text = log.read_text()
    assert re.search(r"ERROR .*cell 31UDQ: 2 folders name it", log_text), log_text[-3000:]
    for cid in BAD_CELLS:
        assert len(re.findall(f"WARNING .*cell {cid} not served", log_text)) == 1
    # no absolute path leaks into what clients see
    for path in ("/health", "/cells"):
        assert str(d) not in httpx.get(url + path).text


def test_the_served_duplicate_is_the_real_cell(damaged_server):
    url, _ = damaged_server
    cells = {c["id"]: c for c in httpx.get(f"{url}/cells").json()}
    assert cells["31UDQ"]["scene_count"] == N and cells["31UDQ"]["warnings"] == []
    assert np.asarray(_png(httpx.get(_tile_url(url, cells["31UDQ"]))))[..., 3].max() == 255


@pytest.mark.parametrize("cid", list(SCENE_DAMAGE))
def test_damaged_scene_left_out_with_one_warning(damaged_server, cid):
    url, log = damaged_server
    t, level, name, how, why = SCENE_DAMAGE[cid]
    cells = {c["id"]: c for c in httpx.get(f"{url}/cells").json()}
    c = cells[cid]
    scene = f"S2A_{cid}_{t}"
    # /cells tells the truth: what is served, and what was left out and why
    assert c["scene_count"] == N - 1
    assert len(c["dates"]) == N - 1 and f"2021-0{t + 3}-15" not in c["dates"]
    assert len(c["warnings"]) == 1
    assert scene in c["warnings"][0] and f"L{level}/{name}/c/{t}/" in c["warnings"][0]
    assert re.search(why, c["warnings"][0]), c["warnings"][0]
    # the intact scenes render, at both levels
    for z in (14, 13):
        img = _png(httpx.get(_tile_url(url, c, z)))
        assert img[..., 3].max() == 255 and img[..., :3].std() > 3
    for k in range(N):
        r = httpx.get(_tile_url(url, c), params={"layer": "date", "date": f"2021-0{k + 3}-15"})
        assert r.status_code == (404 if k == t else 200), (k, r.text)
    assert len(re.findall(f"WARNING .*cell {cid}: scene {scene} .* left out", log.read_text())) == 1


def test_registry_keeps_open_stacks_and_rescans_at_most_every_few_seconds(tmp_path):
    build(tmp_path, "31UDQ")
    reg = Registry(tmp_path)
    first = reg.get("31UDQ")
    build(tmp_path, "31UDP")  # prefetched after start
    with pytest.raises(LookupError):
        reg.get("31UDP")  # just scanned: not again yet
    reg._scanned -= 60
    assert reg.get("31UDP").cell_id == "31UDP"
    assert reg.get("31UDQ") is first  # unchanged store: same open stack


def test_shard_truncated_while_serving(tmp_path):
    """The last scene's 10 m reflectance shard, open in the server, is cut to its first page
    while the server runs: the read comes back short. The process lives, says so once, and the
    tile is exactly the composite without that scene."""
    build(tmp_path, "31UDQ")
    log = tmp_path / "server.log"
    with running_server(tmp_path, log, CLEARSKY_TILE_CACHE_MB="0") as url:
        cell = httpx.get(f"{url}/cells").json()[0]
        tile = _tile_url(url, cell)
        before = _png(httpx.get(tile))
        without_last = _png(httpx.get(tile, params={"end": cell["dates"][-2]}))
        assert not np.array_equal(before, without_last)
        path = shard(tmp_path, "31UDQ", 0, "reflectance", N - 1)
        os.truncate(path, 4096)
        after = _png(httpx.get(tile))
        assert np.array_equal(after, without_last)  # never half a scene
        assert httpx.get(f"{url}/health").status_code == 200
        c = httpx.get(f"{url}/cells").json()[0]
        assert c["scene_count"] == N - 1 and f"S2A_31UDQ_{N - 1}" in c["warnings"][0]
        _png(httpx.get(_tile_url(url, c, 15)))
    assert len(re.findall(r"WARNING .*scene S2A_31UDQ_5 .* left out", log.read_text())) == 1
