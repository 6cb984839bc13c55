"""`clearsky ...` command line."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="ClearSky: cloud-free Sentinel-2 basemap tiles composited on demand.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data", help="Data directory of stacks (default: $CLEARSKY_DATA_DIR or data/demo)"
    ),
]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def demo(
    data: DataDir = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the demo data exists")] = False,
) -> None:
    """Build the embedded demo data (a real Romania cell and a synthetic cloudy cell)."""
    from compositor.demo import build_demo, default_data_dir
    from compositor.stack import Stack

    _setup_logging()
    target = data or default_data_dir()
    try:
        built = build_demo(target, force=force)
    except (RuntimeError, FileNotFoundError) as exc:
        _fail(str(exc))
    for cid, path in built.items():
        s = Stack.open(path)
        typer.echo(
            f"{cid}: {len(s.complete_indices())} scenes, {s.width}x{s.height} px, "
            f"{s.nbytes_on_disk() / 1e6:.1f} MB at {path}"
        )


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,
    data: DataDir = None,
    workers: Annotated[int, typer.Option(help="Server worker processes")] = 1,
) -> None:
    """Serve tiles of every stack in the data directory (and the viewer at /)."""
    import uvicorn

    from compositor.demo import default_data_dir

    _setup_logging()
    data_dir = (data or default_data_dir()).resolve()
    if not data_dir.is_dir():
        _fail(f"data directory {data_dir} does not exist (run `clearsky demo` first?)")
    os.environ["CLEARSKY_DATA_DIR"] = str(data_dir)
    typer.echo(f"ClearSky viewer: http://{host}:{port}/  (data: {data_dir})")
    uvicorn.run("tileserver.main:app", host=host, port=port, workers=workers, log_level="info")


@app.command()
def mask(
    cell: Annotated[str, typer.Argument(help="Cell id (a stack in --data) or a stack path")],
    data: DataDir = None,
    level: Annotated[
        int | None, typer.Option(help="Stack level to predict at (default: the 20 m level)")
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="Model .safetensors (default: the shipped one)")
    ] = None,
    force: Annotated[bool, typer.Option(help="Redo scenes already masked")] = False,
) -> None:
    """Write SegFormer cloud/shadow probabilities into a stack's scenes (for mask=segformer)."""
    from compositor.demo import default_data_dir
    from compositor.masks.model import MaskModelError, load_model
    from compositor.masks.predict import mask_stack
    from compositor.stack import StackError, list_stacks

    _setup_logging()
    path = Path(cell)
    if not (path / "zarr.json").exists():
        data_dir = data or default_data_dir()
        stacks = {k.upper(): v for k, v in list_stacks(data_dir).items()}
        if cell.upper() not in stacks:
            _fail(f"no stack for cell {cell} in {data_dir} (have: {', '.join(stacks) or 'none'})")
        path = stacks[cell.upper()]
    try:
        m = load_model(model)
        rep = mask_stack(path, level=level, model=m, force=force)
    except (MaskModelError, StackError) as exc:
        _fail(str(exc))
    typer.echo(
        f"{path.name}: masked {rep.done} scenes at level {rep.level} ({rep.megapixels:.1f} Mpx, "
        f"{rep.seconds:.1f} s), {rep.skipped} already done"
    )


@app.command()
def train(
    stacks: Annotated[
        list[Path] | None, typer.Argument(help="Stacks (.zarr) to train on", show_default=False)
    ] = None,
    synthetic_seeds: Annotated[
        str, typer.Option(help="Also build synthetic cells of these seeds, e.g. 101-108")
    ] = "",
    synthetic_size: Annotated[int, typer.Option(help="Synthetic cell size (px)")] = 512,
    synthetic_dates: Annotated[int, typer.Option(help="Synthetic cell dates")] = 32,
    real: Annotated[
        bool, typer.Option(help="Also build the real Romania cell ($CLEARSKY_ROMANIA_NC or PyPI)")
    ] = False,
    workdir: Annotated[
        Path | None, typer.Option(help="Where built training stacks go (default: temporary)")
    ] = None,
    out: Annotated[Path, typer.Option(help="Model to write (.safetensors + .json)")] = Path(
        "segformer.safetensors"
    ),
    steps: Annotated[int, typer.Option(help="Optimiser steps")] = 2000,
    batch: Annotated[int, typer.Option(help="Patches per step")] = 8,
    patch: Annotated[int, typer.Option(help="Patch side (px)")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate")] = 2e-3,
    levels: Annotated[str, typer.Option(help="Stack levels to sample, e.g. 0,1,2")] = "0,1,2",
    labels: Annotated[str, typer.Option(help="auto (truth where a stack has it) | scl | truth")] = (
        "auto"
    ),
    scl_share: Annotated[
        float, typer.Option(help="Share of patches from SCL-labelled stacks when mixed")
    ] = 0.25,
    seed: Annotated[int, typer.Option(help="Random seed (data sampling, init)")] = 0,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint file (default: OUT with .ckpt)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint")] = False,
) -> None:
    """Train the cloud/shadow SegFormer on stacks (SCL labels, or synthetic truth where present)."""
    import shlex
    import sys
    import tempfile

    from compositor.masks.train import (
        TrainConfig,
        build_training_stacks,
        parse_seeds,
        train_and_save,
    )
    from compositor.stack import StackError

    _setup_logging()
    lv = tuple(int(v) for v in levels.split(",") if v.strip())
    try:
        cfg = TrainConfig(
            steps=steps,
            batch=batch,
            patch=patch,
            lr=lr,
            levels=lv,
            level_weights={(0, 1, 2): (0.3, 0.5, 0.2)}.get(lv, tuple(1.0 for _ in lv)),
            labels=labels,
            scl_share=scl_share,
            seed=seed,
        )
    except ValueError as exc:
        _fail(str(exc))
    work = workdir or Path(tempfile.mkdtemp(prefix="clearsky-train-"))
    try:
        paths = list(stacks or []) + build_training_stacks(
            work, parse_seeds(synthetic_seeds), synthetic_size, synthetic_dates, real
        )
    except (RuntimeError, FileNotFoundError, StackError) as exc:
        _fail(str(exc))
    if not paths:
        _fail("nothing to train on: give stacks, --synthetic-seeds or --real")
    ckpt = checkpoint or out.with_suffix(".ckpt")
    command = shlex.join(["clearsky", *sys.argv[1:]])
    try:
        res = train_and_save(paths, out, cfg, ckpt, resume, command=command)
    except (StackError, ValueError) as exc:
        _fail(str(exc))
    for kind, s in res.val.items():
        typer.echo(
            f"held-out {kind:9} cloud F1 {s['cloud_f1']:.3f}  shadow F1 {s['shadow_f1']:.3f}  "
            f"balanced acc {s['balanced_accuracy']:.3f}"
        )
    typer.echo(f"wrote {out.with_suffix('.safetensors')} in {res.seconds / 60:.1f} min")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
