"""README.md runs as written: its commands parse, its URLs answer, its paths exist.

Everything the README shows in a code block or in the command table is checked here where it
can be without the network or Docker: every `clearsky ...` command parses with the real CLI
(options, values, required arguments), `make` targets exist, `pip install` extras exist, the
Docker commands mount the folder `make demo` fills where the image serves from, every
`http://127.0.0.1:8000/...` URL answers on a real server, and the embed example points at the
demo's 49NDB cell.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import httpx
import morecantile
from typer.main import get_command

from compositor.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```[a-z]*\n(.*?)```", README, re.S)
TMS = morecantile.tms.get("WebMercatorQuad")


def _lines(prefix: str) -> list[str]:
    """Command lines in code blocks that start with ``prefix`` (comments and ``\\``
    continuations handled)."""
    out = []
    for block in BLOCKS:
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(prefix):
                out.append(line)
    return out


def _parse(words: list[str]) -> None:
    """Parse a `clearsky` command line as the CLI would, without running it."""
    group = get_command(app)
    name, args = words[0], words[1:]
    assert name in group.commands, f"README names an unknown command: clearsky {name}"
    cmd = group.commands[name]
    cmd.make_context(name, list(args))  # raises on an unknown option or a bad value


def test_clearsky_commands_in_code_blocks_parse():
    lines = _lines("clearsky ")
    assert len(lines) >= 8, lines
    for line in lines:
        words = shlex.split(line)[1:]
        if words == ["--version"]:
            continue
        _parse(words)


def test_command_table_names_real_commands_and_options():
    group = get_command(app)
    rows = re.findall(r"^\| `clearsky ([a-z]+)([^`]*)` \|", README, re.M)
    assert {r[0] for r in rows} >= set(group.commands), rows
    for name, rest in rows:
        cmd = group.commands[name]
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for opt in re.findall(r"--[a-z][a-z-]*", rest):
            assert opt in known, f"README: clearsky {name} has no option {opt}"


def test_make_targets_pip_extras_and_bench_scripts_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    for line in _lines("make "):
        for target in shlex.split(line)[1:]:
            if "=" not in target:
                assert target in targets, line
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(project["optional-dependencies"])
    for line in _lines("pip install") + _lines(".venv/bin/pip install"):
        for m in re.finditer(r"\[([a-z,]+)\]", line):
            assert set(m.group(1).split(",")) <= extras, line
    for script in re.findall(r"python (bench/[a-z_]+\.py)", README):
        assert (ROOT / script).is_file(), script


def test_docker_commands_mount_what_make_demo_builds():
    dockerfile = (ROOT / "Dockerfile").read_text()
    served = re.search(r'"--data", "([^"]+)"', dockerfile).group(1)
    demo_dir = re.search(r"^DATA \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    runs = [line for line in _lines("docker run")]
    assert runs, "README shows no docker run"
    mounts = 0
    for line in runs:
        words = shlex.split(line.replace("$PWD", "PWD"))
        for i, w in enumerate(words):
            if w in ("-v", "--volume"):
                host, container = words[i + 1].split(":")[:2]
                assert container == served, line
                assert host == f"PWD/{demo_dir}", line  # the folder `make demo` fills
                mounts += 1
    assert mounts >= 1
    assert "--start-period" in dockerfile and "HEALTHCHECK" in dockerfile
    assert "[masks]" not in dockerfile.split("pip install")[-1].split("\n")[0]


def _urls() -> list[str]:
    return sorted(set(re.findall(r"http://127\.0\.0\.1:8000(/[^\s`\"'<>)]*)", README)))


def test_readme_urls_answer_on_a_real_server(server: str):
    cells = {c["id"]: c for c in httpx.get(f"{server}/cells").json()}
    checked = skipped = 0
    for path in _urls():
        if "/embed#" in path:
            continue  # the next test
        m = re.search(r"/cells/([^/]+)/", path)
        cell = m.group(1) if m else "49NDB"
        if cell not in cells:
            skipped += 1  # the test data has no such cell (../shared/data absent)
            continue
        lon, lat = cells[cell]["center"]
        t = TMS.tile(lon, lat, 14)
        url = path.replace("{z}", str(t.z)).replace("{x}", str(t.x)).replace("{y}", str(t.y))
        r = httpx.get(server + url.split("#")[0], timeout=120)
        assert r.status_code == 200, (url, r.status_code, r.text[:300])
        checked += 1
    assert checked + skipped >= 4 and checked >= 3


def test_embed_example_shows_the_demo_cell(server: str):
    """The README's iframe centres on the demo's 49NDB area (the full-size demo's footprint, as
    compositor.demo builds it), and /embed serves."""
    from compositor.demo import SYNTH_CELL, SYNTH_OFFSET
    from compositor.grid import cell, transform_bounds_to_lonlat

    embeds = [u for u in _urls() if "/embed#" in u]
    assert embeds
    c = cell(SYNTH_CELL)
    x0, y1 = c.bounds[0] + SYNTH_OFFSET[0], c.bounds[3] - SYNTH_OFFSET[1]
    w, s, e, n = transform_bounds_to_lonlat(c.epsg, (x0, y1 - 10240, x0 + 10240, y1))
    for url in embeds:
        z, lat, lon = (
            float(v) for v in re.search(r"map=([\d.]+)/([-\d.]+)/([-\d.]+)", url).groups()
        )
        assert w < lon < e and s < lat < n, (url, (w, s, e, n))
        # Near the middle: the map at that zoom is mostly the cell.
        assert abs(lon - (w + e) / 2) < 0.01 and abs(lat - (s + n) / 2) < 0.01, url
        assert httpx.get(server + url.split("#")[0]).status_code == 200
