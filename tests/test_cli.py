"""The command line as a new user meets it: every command with bad input, the extras, listing.

Bad input must give exactly one line ``error: ...`` naming the problem and exit status 2, before
any network or disk work (the STAC URL here points at a port nobody listens on: a command that
went to the network first would report that instead of the argument).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import stac_servers as ss
from typer.testing import CliRunner

from compositor.cli import app

NOWHERE = "http://127.0.0.1:9/"  # nothing listens on port 9


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def assert_one_line(r, *fragments: str, code: int = 2) -> str:
    """Exit ``code``, and the error is one line naming the problem, with no traceback."""
    err = r.stderr.strip()
    assert r.exit_code == code, (r.exit_code, r.stdout, err)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in r.output and "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture
def data(demo_dir: Path) -> list[str]:
    return ["--data", str(demo_dir)]


# Every command, with bad inputs; (args, text the one line must contain).
BAD = [
    # search: all checked before the STAC API is asked anything
    (["search", "99ZZZ"], "invalid Sentinel-2 cell id"),
    (["search", "34TER", "--start", "2020-02-30"], "--start must be a date"),
    (["search", "34TER", "--end", "20-1-1"], "--end must be a date"),
    (["search", "34TER", "--start", "2021-01-01", "--end", "2020-01-01"], "after --end"),
    (["search", "34TER", "--months", "13"], "--months must be months 1-12"),
    (["search", "34TER", "--months", "abc"], "--months must be months 1-12"),
    (["search", "--bbox", "1,2,3"], "--bbox must be W,S,E,N"),
    (["search", "--bbox", "3,2,1,4"], "west < east"),
    (["search", "34TER", "--bbox", "10,10,11,11"], "does not overlap cell 34TER"),
    (["search", "34TER", "--limit", "0"], "--limit"),
    (["search", "34TER", "--max-cloud", "150"], "--max-cloud"),
    (["search", "34TER", "--collection", " "], "collection"),
    (["search"], "give a CELL or --bbox"),
    (["search", "34TER", "--stac-url", "ftp://x"], "--stac-url must be an http(s) URL"),
    # prefetch
    (["prefetch", "34TER", "--resolution", "15"], "--resolution must be one of 10, 20, 60"),
    (["prefetch", "99ZZZ"], "invalid Sentinel-2 cell id"),
    (["prefetch", "34TER", "--workers", "0"], "--workers"),
    (["prefetch", "34TER", "--retries", "-1"], "--retries"),
    (["prefetch", "34TER", "--months", "0"], "--months"),
    (["prefetch", "34TER", "--data", "/proc/clearsky"], "cannot be written"),
    # serve
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--port", "0"], "--port"),
    (["serve", "--workers", "0"], "--workers"),
    (["serve", "--data", "/nonexistent/clearsky"], "does not exist"),
    # cells, demo
    (["cells", "--data", "/nonexistent/clearsky"], "does not exist"),
    (["demo", "--data", "/proc/clearsky"], "cannot be written"),
    # mask, train
    (["mask", "54SUE"], "no stack for cell 54SUE"),
    (["mask", "49NDB", "--level", "-1"], "--level"),
    (["mask", "49NDB", "--level", "99"], "--level 99"),
    (["mask", "49NDB", "--model", "/nonexistent.safetensors"], "--model"),
    (["train", "--synthetic-seeds", "abc"], "--synthetic-seeds must be seeds"),
    (["train", "--synthetic-seeds", "1", "--levels", "x"], "--levels must be whole numbers"),
    (["train", "--synthetic-seeds", "1", "--steps", "0"], "--steps"),
    (["train", "--synthetic-seeds", "1", "--lr", "0"], "--lr must be above 0"),
    (["train", "--synthetic-seeds", "1", "--patch", "32"], "--patch"),
    (["train", "--synthetic-seeds", "1", "--scl-share", "2"], "--scl-share"),
    (["train", "--synthetic-seeds", "1", "--segformer", "{bad"], "--segformer must be a JSON"),
    (["train"], "nothing to train on"),
    (["train", "/nonexistent.zarr"], "does not exist"),
    (["train", "--synthetic-seeds", "1", "--out", "/tmp"], "is a directory"),
    # composite, batch
    (["composite", "54SUE", "--out", "x.tif"], "no stack for cell 54SUE"),
    (["composite", "49NDB", "--out", "/tmp"], "--out /tmp is a directory"),
    (["composite", "49NDB", "--out", "/proc/clearsky/x.tif"], "cannot be written"),
    (["composite", "49NDB", "--out", "x.png"], "must end with .tif"),
    (["composite", "49NDB", "--out", "x.tif", "--percentile", "101"], "--percentile"),
    (["composite", "49NDB", "--out", "x.tif", "--mask", "foo"], "mask must be one of"),
    (["composite", "49NDB", "--out", "x.tif", "--months", "abc"], "--months"),
    (["composite", "49NDB", "--out", "x.tif", "--start", "2021-13-01"], "--start"),
    (["batch", "--scheduler", "notanaddress"], "--scheduler must be an address"),
    (["batch", "--scheduler", "tcp://host:99999"], "--scheduler must be an address"),
    (["batch", "54SUE"], "no stack for cell 54SUE"),
    (["batch", "--out-dir", "/proc/clearsky"], "cannot be written"),
    (["batch", "--workers", "0"], "--workers"),
    (["batch", "--mask", "foo"], "mask must be one of"),
    # export (test_export.py has more)
    (["export", "54SUE", "--out", "o"], "54SUE"),
    (["export", "49NDB", "--out", "o", "--maxzoom", "19"], "18"),
    (["export", "--bbox", "1,2,3", "--out", "o"], "--bbox must be W,S,E,N"),
    (["export", "49NDB", "--out", "o", "--scheduler", "nowhere"], "--scheduler must be an address"),
    (["export", "49NDB", "--out", "o", "--percentile", "101"], "percentile"),
    (["export", "49NDB", "--out", "o", "--temporal", "maybe"], "temporal"),
    # the group itself
    (["nosuchcommand"], "No such command"),
    (["cells", "--verbose", "--quiet"], "exclude each other"),
]


@pytest.mark.parametrize("args,fragment", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(args: list[str], fragment: str, data, tmp_path: Path):
    cmd = args[0]
    extra = []
    if cmd in ("search", "prefetch"):
        extra = ["--stac-url", NOWHERE] if "--stac-url" not in args else []
    if cmd in ("prefetch",) and "--data" not in args:
        extra += ["--data", str(tmp_path / "d")]
    if cmd in ("mask", "composite", "batch", "cells", "export") and "--data" not in args:
        extra += data
    os.chdir(tmp_path)  # relative outputs (x.tif) land here, if anything were written
    r = run(*args, *extra)
    assert_one_line(r, fragment)
    assert not list(tmp_path.glob("*.tif"))


def test_every_command_is_covered():
    from typer.main import get_command

    commands = set(get_command(app).commands)
    assert commands <= {args[0] for args, _ in BAD}, commands - {args[0] for args, _ in BAD}


def test_an_unreachable_scheduler_is_one_line(data, tmp_path: Path):
    where = f"tcp://127.0.0.1:{ss.free_port()}"
    r = run("batch", "--scheduler", where, *data, "--out-dir", str(tmp_path))
    assert_one_line(r, "cannot reach the Dask scheduler")


def test_a_stac_api_answering_html_is_one_line(tmp_path: Path):
    """A web server that is not a STAC API (here a directory listing): one line, no page."""
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "index.html").write_text(
        "<!doctype html><html><head><title>Welcome to nginx!</title></head><body>"
        + "<p>hello</p>" * 200
        + "</body></html>"
    )
    port = ss.free_port()
    fs = ss.FileServer(tmp_path / "files", port)
    fs.start()
    try:
        r = run("search", "34TER", "--stac-url", f"http://127.0.0.1:{port}/")
    finally:
        fs.stop()
    line = assert_one_line(r, "STAC")
    assert len(line) < 400 and "<p>" not in line


def test_version_and_cells(data, demo_dir: Path):
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.startswith("clearsky ")
    r = run("cells", *data)
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[2:]}
    assert "49NDB" in rows and rows["49NDB"].split()[1] == "24"  # the test demo's 24 scenes
    assert "MB" in rows["49NDB"] and "/24 scenes" in rows["49NDB"]
    empty = demo_dir.parent / "empty-data"
    empty.mkdir(exist_ok=True)
    r = run("cells", "--data", str(empty))
    assert r.exit_code == 0 and "no stacks in" in r.stdout


def test_quiet_and_verbose(data, tmp_path: Path):
    r = run("composite", "49NDB", "--out", str(tmp_path / "q.tif"), *data, "--quiet")
    assert r.exit_code == 0, r.output
    assert "composite" not in r.stderr  # no bar
    r = run("composite", "49NDB", "--out", str(tmp_path / "v.tif"), *data)
    assert r.exit_code == 0 and "49NDB composite" in r.stderr and "block" in r.stderr


# A module finder that makes torch, transformers and safetensors look uninstalled.
BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "safetensors"):
                raise ModuleNotFoundError(f"No module named {name!r}")
    sys.meta_path.insert(0, NoTorch())
    """
)


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_server_and_cli_run_without_torch(demo_dir: Path, tmp_path: Path):
    """The tile server and every command but mask/train work with no PyTorch installed; those
    two say in one line what to install."""
    p = _python(
        f"""
        import io, sys
        from fastapi.testclient import TestClient
        import morecantile
        from tileserver.app import create_app
        from tileserver.settings import Settings
        client = TestClient(create_app(Settings(data_dir={str(demo_dir)!r})))
        cells = {{c["id"]: c for c in client.get("/cells").json()}}
        lon, lat = cells["49NDB"]["center"]
        t = morecantile.tms.get("WebMercatorQuad").tile(lon, lat, 14)
        url = f"/cells/49NDB/tiles/WebMercatorQuad/14/{{t.x}}/{{t.y}}.png"
        for mask in ("scl", "none"):
            r = client.get(url + "?mask=" + mask)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        assert client.get("/health").json()["cells"]
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
        print("SERVER OK")
        """,
        tmp_path,
    )
    assert p.returncode == 0 and "SERVER OK" in p.stdout, p.stderr[-3000:]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return _python(
            f"""
            import sys
            sys.argv = ["clearsky", *{list(args)!r}]
            from compositor.cli import main
            main()
            """,
            tmp_path,
        )

    p = cli("cells", "--data", str(demo_dir))
    assert p.returncode == 0 and "49NDB" in p.stdout, p.stderr
    p = cli("composite", "49NDB", "--out", str(tmp_path / "c.tif"), "--data", str(demo_dir), "-q")
    assert p.returncode == 0 and (tmp_path / "c.tif").is_file(), p.stderr
    for args in (["mask", "49NDB", "--data", str(demo_dir)], ["train", "--synthetic-seeds", "1"]):
        p = cli(*args)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install 'clearsky[masks]'" in lines[0], p.stderr
    p = cli("demo", "--data", str(tmp_path / "demo-without-torch"), "--help")
    assert p.returncode == 0


def test_a_data_less_server_says_so(tmp_path: Path):
    """`clearsky serve` on a folder with no stacks (a container started without its volume):
    a warning on the console and in the log, and /health says there is no data."""
    import httpx

    empty = tmp_path / "data"
    empty.mkdir()
    port = ss.free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "compositor.cli", "serve", "--port", str(port),
             "--data", str(empty)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert health.status_code == 200
    assert health.json()["status"] == "no data" and health.json()["cells"] == []
    text = log.read_text()
    assert "warning: no stacks in" in text  # the command, before the server starts
    assert "WARNING" in text and "no cells to show" in text  # the server's own log


def test_train_removes_its_temporary_workdir(tmp_path: Path):
    """Without --workdir, the training stacks it builds live in a temporary folder that is gone
    after the run; the model is written."""
    pytest.importorskip("torch")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.run(
        [sys.executable, "-m", "compositor.cli", "train", "--synthetic-seeds", "3",
         "--synthetic-size", "64", "--synthetic-dates", "3", "--steps", "1", "--batch", "1",
         "--patch", "64", "--levels", "0", "--out", str(tmp_path / "m.safetensors"), "-q"],
        capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)}, timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "m.safetensors").is_file()
    assert not [d for d in tmp.iterdir() if d.name.startswith("clearsky-train-")]
