"""Shared fixtures: small demo stacks built once per session, and a real server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CLEARSKY_SHARED_DATA", ROOT.parent / "shared" / "data"))
ROMANIA_NC = SHARED_DATA / "nrt-romania" / "sentinel2_cube_subset_romania_10m.nc"

# Small enough to build in seconds, big enough to span several tiles and levels.
TEST_SYNTH_SIZE = 384
TEST_SYNTH_DATES = 24


def needs_shared(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not path.exists(),
        reason=f"real sample data {path} is absent (../shared/data exists on CI, not on a "
        "user machine)",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def static_server(directory: Path) -> Iterator[str]:
    """Python's plain http.server (no Range support) over ``directory`` on 127.0.0.1: its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--directory", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"http.server over {directory} did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with the synthetic cell (small) and, where ../shared has it, the real
    Romania cell — built by the project's own demo code."""
    from compositor.demo import build_real, build_synthetic

    d = tmp_path_factory.mktemp("demo")
    build_synthetic(d, seed=7, size=TEST_SYNTH_SIZE, n_dates=TEST_SYNTH_DATES)
    if ROMANIA_NC.exists():
        os.environ["CLEARSKY_ROMANIA_NC"] = str(ROMANIA_NC)
        build_real(d, d / ".cache")
    return d


@contextmanager
def running_server(data_dir: Path, log_path: Path, **env: str) -> Iterator[str]:
    """`clearsky serve` as a real process on 127.0.0.1 over ``data_dir`` (extra CLEARSKY_*
    settings in ``env``), its output in ``log_path``; yields its base URL, stops it after."""
    port = free_port()
    full_env = {**os.environ, "CLEARSKY_DATA_DIR": str(data_dir), **env}
    log = open(log_path, "w")  # a file, not a pipe nobody drains
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "compositor.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data",
            str(data_dir),
        ],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    # First start in a fresh checkout compiles the numba kernels (warm-up) before serving.
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 300 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def serve(data_dir: Path, **env: str):  # -> a context manager yielding the base URL
    """`clearsky serve` of ``data_dir``, its log beside the stacks."""
    return running_server(data_dir, data_dir / f"server-{free_port()}.log", **env)


@pytest.fixture(scope="session")
def server(demo_dir: Path) -> Iterator[str]:
    """`clearsky serve` as a real process on 127.0.0.1; yields its base URL."""
    with running_server(demo_dir, demo_dir / "server.log") as url:
        yield url
