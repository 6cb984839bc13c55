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
    from compositor.demo import default_data_dir

    _setup_logging()
    data_dir = (data or default_data_dir()).resolve()
    if not data_dir.is_dir():
        _fail(f"data directory {data_dir} does not exist (run `clearsky demo` first?)")
    os.environ["CLEARSKY_DATA_DIR"] = str(data_dir)
    from tileserver.http import run

    typer.echo(f"ClearSky: starting on {host}:{port} (data: {data_dir}); URL once it is ready")
    run(host, port, workers)


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
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default)")] = 0,
    segformer: Annotated[
        str, typer.Option(help="SegformerConfig overrides as JSON, e.g. '{\"depths\": [1,1,2,2]}'")
    ] = "",
) -> None:
    """Train the cloud/shadow SegFormer on stacks (SCL labels, or synthetic truth where present)."""
    import json
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
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
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
            segformer=json.loads(segformer) if segformer else {},
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
