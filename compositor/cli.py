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
    masks: Annotated[
        bool, typer.Option(help="Also write the shipped model's cloud masks (mask=segformer)")
    ] = True,
) -> None:
    """Build the embedded demo data (a real Romania cell and a synthetic cloudy cell)."""
    from compositor.demo import build_demo, default_data_dir
    from compositor.masks.model import MaskModelError, load_model
    from compositor.masks.predict import mask_stack
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
    if masks:
        try:
            model = load_model()
        except MaskModelError as exc:
            _fail(str(exc))
        for cid, path in built.items():
            rep = mask_stack(path, model=model)  # scenes already masked are skipped
            typer.echo(f"{cid}: model masks for {rep.done} scenes ({rep.skipped} already done)")


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(envvar="CLEARSKY_HOST", help="Interface to listen on")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="CLEARSKY_PORT", help="Port")] = 8000,
    data: DataDir = None,
    workers: Annotated[
        int, typer.Option(envvar="CLEARSKY_WORKERS", min=1, help="Server worker processes")
    ] = 1,
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
        list[Path] | None,
        typer.Argument(help="Your stacks (.zarr) to learn from with their SCL", show_default=False),
    ] = None,
    real: Annotated[
        bool,
        typer.Option(
            help="Learn from the real samples in $CLEARSKY_SHARED_DATA (default ../shared/data): "
            "Romania cube (SCL) and clear surfaces of wright and 29RKH west"
        ),
    ] = False,
    real_npz: Annotated[
        Path | None,
        typer.Option(help="Use this export of the real samples instead (--export-real)"),
    ] = None,
    export_real: Annotated[
        Path | None, typer.Option(help="Only write the real samples to this .npz and exit")
    ] = None,
    synthetic_seeds: Annotated[
        str, typer.Option(help="Synthetic cells (truth labels) of these seeds, e.g. 101-108")
    ] = "",
    synthetic_size: Annotated[int, typer.Option(help="Synthetic cell size (px)")] = 512,
    synthetic_dates: Annotated[int, typer.Option(help="Synthetic cell dates")] = 32,
    procedural: Annotated[
        int, typer.Option(help="Procedural clear landscapes to put simulated skies over")
    ] = 0,
    workdir: Annotated[
        Path | None, typer.Option(help="Work folder for the real export (default: temporary)")
    ] = None,
    out: Annotated[Path, typer.Option(help="Model to write (.safetensors + .json)")] = Path(
        "segformer.safetensors"
    ),
    steps: Annotated[int, typer.Option(help="Optimiser steps")] = 2000,
    batch: Annotated[int, typer.Option(help="Patches per step")] = 8,
    patch: Annotated[int, typer.Option(help="Patch side (px, a multiple of 16, >= 64)")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate")] = 2e-3,
    levels: Annotated[str, typer.Option(help="Levels of labelled stacks, e.g. 0,1,2")] = "0,1,2",
    sim_share: Annotated[
        float, typer.Option(help="Share of patches that are clear surfaces with simulated skies")
    ] = 0.7,
    scl_share: Annotated[
        float, typer.Option(help="Among labelled patches, the share labelled by SCL")
    ] = 0.5,
    features: Annotated[str, typer.Option(help="Model input: linear+log | linear")] = (
        "linear+log"
    ),
    seed: Annotated[int, typer.Option(help="Random seed (data, simulation, init)")] = 0,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint file (default: OUT with .ckpt)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint")] = False,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default)")] = 0,
    workers: Annotated[int, typer.Option(help="Processes building the data (0: all cores)")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    max_minutes: Annotated[
        float, typer.Option(help="Stop early (and save) after this many minutes (0: never)")
    ] = 0.0,
    segformer: Annotated[
        str, typer.Option(help="SegformerConfig overrides as JSON, e.g. '{\"depths\": [1,1,2,2]}'")
    ] = "",
    sky: Annotated[
        str, typer.Option(help="Sky scenario weights as JSON, e.g. '{\"overcast\": 0.2}'")
    ] = "",
) -> None:
    """Train the cloud/shadow SegFormer: clear surfaces under simulated skies (exact labels) and
    labelled scenes (SCL, or a synthetic cell's truth)."""
    import json
    import shlex
    import shutil
    import sys
    import tempfile

    from compositor.masks.model import FEATURES
    from compositor.masks.samples import shared_data_dir
    from compositor.masks.train import TrainConfig, parse_seeds

    _setup_logging()
    # Every argument is checked before any data is built.
    try:
        seeds = parse_seeds(synthetic_seeds)
    except ValueError as exc:
        _fail(f"--synthetic-seeds: {exc}")
    try:
        lv = tuple(int(v) for v in levels.split(",") if v.strip())
    except ValueError:
        _fail(f"--levels are integers separated by commas, got {levels!r}")
    if not lv or any(not 0 <= v <= 6 for v in lv):
        _fail(f"--levels must be 0..6, got {levels!r}")
    if patch < 64 or patch % 16:
        _fail(f"--patch must be a multiple of 16 and >= 64, got {patch}")
    if features not in FEATURES:
        _fail(f"--features must be one of {', '.join(FEATURES)}, got {features!r}")
    if device not in ("auto", "cpu", "cuda"):
        _fail(f"--device must be auto, cpu or cuda, got {device!r}")
    if synthetic_size < 64 or synthetic_dates < 2 or procedural < 0:
        _fail("--synthetic-size must be >= 64, --synthetic-dates >= 2, --procedural >= 0")
    try:
        overrides = json.loads(segformer) if segformer else {}
        if not isinstance(overrides, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        _fail(f"--segformer must be a JSON object: {exc}")
    try:
        sky_overrides = json.loads(sky) if sky else {}
        if not isinstance(sky_overrides, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        _fail(f"--sky must be a JSON object: {exc}")
    try:
        cfg = TrainConfig(
            sky=sky_overrides,
            steps=steps,
            batch=batch,
            patch=patch,
            lr=lr,
            levels=lv,
            level_weights={(0, 1, 2): (0.3, 0.5, 0.2)}.get(lv, tuple(1.0 for _ in lv)),
            sim_share=sim_share,
            scl_share=scl_share,
            features=features,
            seed=seed,
            segformer=overrides,
        )
    except ValueError as exc:
        _fail(str(exc))
    for s in stacks or []:
        if not (s / "zarr.json").is_file():
            _fail(f"{s} is not a stack (no zarr.json)")
    if real_npz is not None and not real_npz.is_file():
        _fail(f"--real-npz {real_npz} is not a file")
    root = shared_data_dir()
    if (real or export_real) and real_npz is None and not root.is_dir():
        _fail(f"--real needs the real samples at {root} (set CLEARSKY_SHARED_DATA)")
    if not (stacks or real or real_npz or seeds or procedural or export_real):
        _fail("nothing to train on: give stacks, --real, --synthetic-seeds or --procedural")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _fail("--device cuda: no CUDA device here")

    from compositor.masks.trainset import build_bank
    from compositor.masks.trainset import export_real as do_export

    try:
        from compositor.stack import StackError
    except ImportError:  # a GPU box with only numpy and torch trains from --real-npz
        StackError = RuntimeError  # noqa: N806

    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    temp = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="clearsky-train-"))
    try:
        try:
            if export_real:
                do_export(export_real, work, seed=seed, root=root)
                typer.echo(f"wrote {export_real}")
                return
            npz = real_npz
            if real and npz is None:
                npz = do_export(work / "real.npz", work, seed=seed, root=root)
            bank = build_bank(
                npz,
                seeds,
                synthetic_size,
                synthetic_dates,
                procedural,
                stacks or [],
                lv,
                seed,
                workers=workers or None,
            )
        except (RuntimeError, FileNotFoundError, StackError, ValueError, OSError) as exc:
            _fail(str(exc))
        from compositor.masks.train import train_and_save

        ckpt = checkpoint or out.with_suffix(".ckpt")
        command = shlex.join(["clearsky", *sys.argv[1:]])
        try:
            res = train_and_save(
                bank,
                out,
                cfg,
                ckpt,
                resume,
                command=command,
                device=None if device == "auto" else device,
                max_minutes=max_minutes or None,
            )
        except (StackError, ValueError) as exc:
            _fail(str(exc))
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)
    for kind, sc in res.val.items():
        typer.echo(
            f"held-out {kind:10} cloud F1 {sc['cloud_f1']:.3f}  shadow F1 {sc['shadow_f1']:.3f}  "
            f"balanced acc {sc['balanced_accuracy']:.3f}"
        )
    typer.echo(f"wrote {out.with_suffix('.safetensors')} in {res.seconds / 60:.1f} min")


# ---------------------------------------------------------------- search / prefetch (STAC)
StacUrl = Annotated[
    str | None,
    typer.Option(
        "--stac-url",
        envvar="CLEARSKY_STAC_URL",
        help="STAC API (default: $CLEARSKY_STAC_URL or Earth Search v1)",
        show_default=False,
    ),
]


def _date(text: str | None):  # -> datetime.date | None
    import datetime as dt

    try:
        return dt.date.fromisoformat(text) if text else None
    except ValueError:
        _fail(f"dates are YYYY-MM-DD, got {text!r}")


def _scene_query(
    cell_id: str,
    bbox: str | None,
    start: str | None,
    end: str | None,
    months: str | None,
    max_cloud: float | None,
    limit: int,
    collection: str,
):  # -> compositor.search.SearchQuery (imported lazily: keeps `clearsky --help` fast)
    from compositor.grid import CellError
    from compositor.search import SearchQuery, default_dates, parse_bbox, parse_months

    try:
        s, e = default_dates(_date(start), _date(end))
        return SearchQuery(
            cell=cell_id,
            start=s,
            end=e,
            months=parse_months(months),
            max_cloud=max_cloud,
            limit=limit,
            collection=collection,
            bbox=parse_bbox(bbox) if bbox else None,
        )
    except (ValueError, CellError) as exc:
        _fail(str(exc))


SearchBbox = Annotated[str | None, typer.Option(help="Area W,S,E,N in degrees")]
SearchStart = Annotated[
    str | None, typer.Option(help="First date YYYY-MM-DD (default: 5 years before the end)")
]
SearchEnd = Annotated[str | None, typer.Option(help="Last date YYYY-MM-DD (default: today)")]
SearchMonths = Annotated[str | None, typer.Option(help="Months of the year, e.g. 6,7,8,9 or 6-9")]
SearchCloud = Annotated[float | None, typer.Option(help="Maximum scene cloud cover (%)")]
SearchLimit = Annotated[int, typer.Option(help="At most this many scenes (least cloudy first)")]
SearchCollection = Annotated[
    str, typer.Option(help="STAC collection: sentinel-2-c1-l2a or sentinel-2-l2a")
]


@app.command()
def search(
    cell_id: Annotated[
        str | None, typer.Argument(metavar="[CELL]", help="MGRS cell, e.g. 54SUE")
    ] = None,
    bbox: SearchBbox = None,
    start: SearchStart = None,
    end: SearchEnd = None,
    months: SearchMonths = None,
    max_cloud: SearchCloud = None,
    limit: SearchLimit = 100,
    collection: SearchCollection = "sentinel-2-c1-l2a",
    stac_url: StacUrl = None,
) -> None:
    """List the Sentinel-2 L2A scenes a prefetch would take (by cell, or every cell of a bbox)."""
    from compositor.grid import CellError
    from compositor.search import (
        SearchError,
        default_dates,
        format_table,
        mask_url,
        open_client,
        parse_bbox,
        parse_months,
        search_bbox,
    )
    from compositor.search import search as run_search

    _setup_logging()
    if not cell_id and not bbox:
        _fail("give a CELL or --bbox W,S,E,N")
    try:
        client = open_client(stac_url)
        if cell_id:
            q = _scene_query(cell_id, bbox, start, end, months, max_cloud, limit, collection)
            results = [run_search(q, client)]
        else:  # every cell of the bbox, each searched over its part of the bbox
            results = search_bbox(
                parse_bbox(bbox or ""),
                *default_dates(_date(start), _date(end)),
                client,
                months=parse_months(months),
                max_cloud=max_cloud,
                limit=limit,
                collection=collection,
            )
    except (SearchError, CellError, ValueError) as exc:
        _fail(str(exc))
    for r in results:
        typer.echo(
            f"{r.query.cell}: {len(r.items)} scenes chosen of {r.of_tile} matching "
            f"({r.found} items returned by {mask_url(client.self_href or '')} "
            f"{r.query.collection}, {len(r.dropped_other_tiles)} of other tiles)"
        )
        typer.echo(format_table(r))


@app.command()
def prefetch(
    cell_id: Annotated[str, typer.Argument(metavar="CELL", help="MGRS cell, e.g. 54SUE")],
    bbox: Annotated[
        str | None, typer.Option(help="Only this part of the cell: W,S,E,N in degrees")
    ] = None,
    resolution: Annotated[
        float, typer.Option(help="Stack base resolution in metres: 10, 20 or 60")
    ] = 10.0,
    data: DataDir = None,
    start: SearchStart = None,
    end: SearchEnd = None,
    months: SearchMonths = None,
    max_cloud: SearchCloud = None,
    limit: SearchLimit = 100,
    collection: SearchCollection = "sentinel-2-c1-l2a",
    stac_url: StacUrl = None,
    dem: Annotated[bool, typer.Option(help="Also warp the Copernicus DEM onto the grid")] = True,
    dem_collection: Annotated[str, typer.Option(help="STAC collection of the DEM")] = (
        "cop-dem-glo-30"
    ),
    workers: Annotated[int, typer.Option(help="Scenes read at once")] = 3,
    retries: Annotated[int, typer.Option(help="Retries of a failing read")] = 4,
    backoff: Annotated[float, typer.Option(help="First retry delay (s), doubling")] = 1.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
    check_disk: Annotated[bool, typer.Option(help="Refuse when the disk looks too small")] = True,
) -> None:
    """Download scenes (4 bands + SCL) and the DEM of a cell into its stack; safe to rerun.

    Exit status 0: every scene is in the stack.
    3: some scenes failed and were skipped; run the same command again to retry just those.
    2: nothing was done (bad arguments, no scenes, the search failed).
    """
    from compositor.demo import default_data_dir
    from compositor.prefetch import PrefetchError, prefetch, search_dem, target_grid
    from compositor.search import SearchError, mask_logged_urls, mask_text, mask_url, open_client
    from compositor.search import search as run_search

    _setup_logging()
    logging.getLogger("rasterio").setLevel(logging.WARNING)  # failures are reported per scene
    mask_logged_urls()
    q = _scene_query(cell_id, bbox, start, end, months, max_cloud, limit, collection)
    data_dir = data or default_data_dir()
    try:
        grid = target_grid(q.cell, resolution, q.bbox)
        client = open_client(stac_url)
        found = run_search(q, client)
        if not found.items:
            _fail(
                f"no {q.collection} scenes of {q.cell} match ({found.found} items returned, "
                f"{len(found.dropped_other_tiles)} of other tiles): widen dates, months or cloud"
            )
        dem_items = None
        if dem:
            try:
                dem_items = search_dem(client, grid, dem_collection)
            except Exception as exc:  # a catalogue without the DEM collection
                typer.secho(f"warning: no DEM: {mask_text(exc)}", fg=typer.colors.YELLOW, err=True)
        typer.echo(
            f"{q.cell}: {len(found.items)} scenes from {mask_url(client.self_href or '')} "
            f"{q.collection}, grid {grid.width}x{grid.height} px at {grid.res:g} m"
        )
        rep = prefetch(
            found.items,
            grid,
            data_dir,
            workers=workers,
            retries=retries,
            backoff=backoff,
            dem_items=dem_items,
            meta={
                "kind": "real",
                "title": f"{q.cell} (Sentinel-2 L2A)",
                "source": f"{mask_url(client.self_href or '')} {q.collection}",
                "resolution": grid.res,
            },
            progress=progress,
            check_disk=check_disk,
        )
    except (PrefetchError, SearchError) as exc:
        _fail(str(exc))
    typer.echo(
        f"{rep.path}: {len(rep.written)} scenes written, {len(rep.skipped)} already there, "
        f"{len(rep.failed)} failed; DEM: {rep.dem}; {rep.seconds:.1f} s "
        f"(estimated {rep.estimate_bytes / 1e9:.2f} GB, {rep.free_bytes / 1e9:.1f} GB free)"
    )
    for sid, reason in rep.failed.items():
        typer.secho(f"failed {sid}: {reason}", fg=typer.colors.YELLOW, err=True)
    if rep.failed:
        typer.secho("some scenes failed: run the same command again to retry them", err=True)
        raise typer.Exit(3)


# ---------------------------------------------------------------- composite / batch (COGs)
def _view(
    percentile: float,
    mask: str,
    months: str | None,
    start: str | None,
    end: str | None,
    dilate: int,
):  # -> compositor.tiling.ViewParams
    from compositor.tiling import ViewParams

    try:
        ms = tuple(int(m) for m in months.split(",")) if months else None
        return ViewParams(
            percentile=percentile,
            mask=mask,
            months=ms,
            start=_date(start),
            end=_date(end),
            dilate=dilate,
        )
    except ValueError as exc:
        _fail(str(exc))


def _stacks(cells: list[str], data_dir: Path) -> list[tuple[str, Path]]:
    from compositor.grid import CellError, normalize_cell_id
    from compositor.stack import list_stacks

    have = list_stacks(data_dir)
    if not cells:
        return sorted(have.items())
    out = []
    for c in cells:
        try:
            cid = normalize_cell_id(c)
        except CellError as exc:
            _fail(str(exc))
        if cid not in have:
            _fail(f"no stack for cell {cid} in {data_dir} (have: {', '.join(have) or 'none'})")
        out.append((cid, have[cid]))
    return out


Percentile = Annotated[float, typer.Option(min=0, max=100, help="Percentile over time")]
MaskOpt = Annotated[str, typer.Option(help="scl | segformer | none")]


@app.command()
def composite(
    cell: Annotated[str, typer.Argument(help="Cell id, e.g. 34TER")],
    out: Annotated[Path, typer.Option("--out", help="Output COG path")],
    data: DataDir = None,
    percentile: Percentile = 25.0,
    mask: MaskOpt = "scl",
    months: Annotated[str | None, typer.Option(help="e.g. 6,7,8,9")] = None,
    start: Annotated[str | None, typer.Option(help="YYYY-MM-DD")] = None,
    end: Annotated[str | None, typer.Option(help="YYYY-MM-DD")] = None,
    dilate: Annotated[int, typer.Option(min=0, help="Mask dilation, 10 m pixels")] = 3,
) -> None:
    """Write one cell's composite (bands + clear count) as a Cloud-Optimised GeoTIFF."""
    from compositor.batch import composite_cell
    from compositor.demo import default_data_dir

    _setup_logging()
    ((cid, path),) = _stacks([cell], data or default_data_dir())
    try:
        res = composite_cell(path, out, _view(percentile, mask, months, start, end, dilate))
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(f"{cid}: {res['width']}x{res['height']} px from {res['scenes']} scenes -> {out}")


@app.command()
def batch(
    cells: Annotated[
        list[str] | None, typer.Argument(help="Cell ids (default: every stack)")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Directory for the COGs")] = Path(
        "composites"
    ),
    data: DataDir = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Dask scheduler address (default: a LocalCluster)")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="LocalCluster worker processes")] = 2,
    percentile: Percentile = 25.0,
    mask: MaskOpt = "scl",
    months: Annotated[str | None, typer.Option(help="e.g. 6,7,8,9")] = None,
) -> None:
    """Composite many cells to COGs on Dask distributed."""
    from tqdm import tqdm

    from compositor.batch import run_batch
    from compositor.demo import default_data_dir

    _setup_logging()
    todo = _stacks(cells or [], data or default_data_dir())
    if not todo:
        _fail("no stacks to composite")
    params = _view(percentile, mask, months, None, None, 3)
    with tqdm(total=len(todo), desc="cells", unit="cell") as bar:
        results = run_batch(
            todo, out_dir, params, scheduler, workers, progress=lambda r: bar.update(1)
        )
    failed = [r for r in results if "error" in r]
    for r in results:
        typer.echo(f"{r['cell']}: " + (f"FAILED {r['error']}" if "error" in r else r["path"]))
    if failed:
        raise typer.Exit(3)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
