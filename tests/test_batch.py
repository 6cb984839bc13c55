"""Cells -> COGs on Dask: a LocalCluster, and a scheduler and workers started as their own
processes; and the CLI around it."""

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from compositor.batch import run_batch
from compositor.cli import app
from compositor.demo import SYNTH_CELL
from compositor.stack import Stack, list_stacks
from compositor.tiling import ViewParams, composite_window


def test_batch_writes_cogs_equal_to_the_composite(demo_dir, tmp_path):
    stacks = sorted(list_stacks(demo_dir).items())
    results = run_batch(stacks, tmp_path, ViewParams(), workers=2)
    assert [r["cell"] for r in results] == [c for c, _ in stacks]
    assert all("error" not in r for r in results), results
    stack = Stack.open(demo_dir / f"{SYNTH_CELL}.zarr")
    with rasterio.open(tmp_path / f"{SYNTH_CELL}.tif") as ds:
        assert ds.count == len(stack.bands) + 1
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.crs.to_epsg() == stack.epsg and ds.transform == stack.transform
        got = ds.read()
    ref = composite_window(stack, 0, (0, 0, stack.height, stack.width), ViewParams())
    assert np.allclose(got[:-1], ref.values, equal_nan=True)
    assert np.array_equal(np.nan_to_num(got[-1]), ref.count)


def test_cli_names_a_missing_cell(demo_dir, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "compositor.cli",
            "composite",
            "54SUE",
            "--out",
            str(tmp_path / "x.tif"),
            "--data",
            str(demo_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "no stack for cell 54SUE" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- a real cluster
DASK = str(Path(sys.executable).parent / "dask")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """`dask scheduler` and `dask worker` as their own processes, started in another folder
    than the client's (a worker resolving relative paths there would miss the data)."""

    def __init__(self, cwd: Path, nworkers: int = 2, wrap: list[str] | None = None):
        self.cwd, self.procs = cwd, []
        port = _port()
        self.address = f"tcp://127.0.0.1:{port}"
        log = open(cwd / "cluster.log", "a")
        self.procs.append(
            subprocess.Popen(
                [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        worker = [DASK, "worker", self.address, "--nworkers", str(nworkers), "--nthreads", "1",
                  "--no-dashboard", "--local-directory", str(cwd)]  # fmt: skip
        self.procs.append(
            subprocess.Popen(
                [*(wrap or []), *worker], cwd=cwd, stdout=log, stderr=subprocess.STDOUT
            )
        )
        from dask.distributed import Client

        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(self.address, timeout=5) as c:
                    if len(c.scheduler_info()["workers"]) >= nworkers:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.stop()
                raise RuntimeError((cwd / "cluster.log").read_text()[-3000:])
            time.sleep(0.5)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)


def test_batch_on_a_cluster_of_separate_processes(demo_dir, tmp_path, monkeypatch):
    """Relative --data/--out-dir from the client's folder work on workers started elsewhere;
    a rerun keeps up-to-date COGs, --force redoes them, and work files a killed run left are
    cleared."""
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    client_cwd = tmp_path / "client"
    client_cwd.mkdir()
    shutil.copytree(demo_dir / f"{SYNTH_CELL}.zarr", client_cwd / "data" / f"{SYNTH_CELL}.zarr")
    monkeypatch.chdir(client_cwd)
    cluster = Cluster(elsewhere)
    try:
        args = ["batch", "--scheduler", cluster.address, "--data", "data", "--out-dir", "out"]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        out = client_cwd / "out" / f"{SYNTH_CELL}.tif"
        assert f"{SYNTH_CELL}: {out}" in r.stdout
        assert not (elsewhere / "out").exists() and not (elsewhere / "data").exists()
        with rasterio.open(out) as ds:
            assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            assert ds.tags()["cell"] == SYNTH_CELL
        first = out.stat().st_mtime_ns

        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0 and "up to date" in r.stdout, r.output
        assert out.stat().st_mtime_ns == first

        stale = out.parent / f".{out.name}.partial-otherhost-123-abcdef.work.tif"
        stale.write_bytes(b"left by a killed task")
        r = CliRunner().invoke(app, [*args, "--force"])
        assert r.exit_code == 0 and "up to date" not in r.stdout, r.output
        assert out.stat().st_mtime_ns != first
        assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # nothing hidden left
        # Another composite (other parameters) is not "up to date".
        r = CliRunner().invoke(app, [*args, "--percentile", "50"])
        assert r.exit_code == 0 and "up to date" not in r.stdout, r.output
    finally:
        cluster.stop()


def _can_hide_folders() -> bool:
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    shutil.which("unshare") is None or not _can_hide_folders(),
    reason="needs unshare (mount namespaces) to start a worker that cannot see the data",
)
def test_batch_says_when_workers_cannot_see_the_paths(demo_dir, tmp_path):
    """A worker whose filesystem lacks the data folder (here: its own mount namespace with an
    empty tmpfs over it, as a machine without the shared filesystem): one line, exit 2."""
    shared = tmp_path / "shared"
    shutil.copytree(demo_dir / f"{SYNTH_CELL}.zarr", shared / f"{SYNTH_CELL}.zarr")
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs none "{shared}" && exec "$@"', "hide"]  # fmt: skip
    cluster = Cluster(elsewhere, nworkers=1, wrap=hide)
    try:
        r = CliRunner().invoke(
            app,
            ["batch", "--scheduler", cluster.address, "--data", str(shared),
             "--out-dir", str(tmp_path / "out")],
        )  # fmt: skip
    finally:
        cluster.stop()
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot see" in lines[0] and "shared filesystem" in lines[0]
    assert not (tmp_path / "out" / f"{SYNTH_CELL}.tif").exists()


def test_local_batch_keeps_dask_logs_off_the_bar(demo_dir, tmp_path):
    r = CliRunner().invoke(
        app, ["batch", SYNTH_CELL, "--data", str(demo_dir), "--out-dir", str(tmp_path)]
    )
    assert r.exit_code == 0, r.output
    assert "INFO distributed" not in r.stderr, r.stderr  # no nanny/scheduler chatter
    assert "cells" in r.stderr  # the bar
