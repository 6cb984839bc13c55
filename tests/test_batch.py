"""Cells -> COGs on a real Dask LocalCluster, and the CLI around it."""

import subprocess
import sys

import numpy as np
import rasterio

from compositor.batch import run_batch
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
