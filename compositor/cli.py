"""`clearsky ...` command line.

Every command checks all of its arguments first (compositor.cliargs), before any network or
disk work. A bad argument gives one line ``error: ...`` and exit status 2, a partial failure 3;
no command prints a traceback (``--verbose`` shows one for an unexpected error). The group adds
``--verbose`` and ``--quiet`` to every command, including ones added later, and commands show
a progress bar for any step that takes seconds (``--quiet`` hides them).

Imports of the heavy modules stay inside the commands: ``clearsky --help`` is fast, and the
commands that need PyTorch (mask, train) say so in one line where it is not installed.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from compositor import cliargs
from compositor.cliargs import BadInput

try:  # typer >= 0.22 carries its own click (exceptions as click's)
    import typer._click.exceptions as click_errors
except ImportError:  # pragma: no cover - older typer
    import click.exceptions as click_errors  # type: ignore[no-redef]


class Output:
    """What --verbose / --quiet asked for (set once per command run)."""

    verbose = False
    quiet = False


# ---------------------------------------------------------------- output: logs and bars
class _BarSafeHandler(logging.StreamHandler):
    """Log lines printed above a running progress bar, not through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # never let logging break a command
            self.handleError(record)


def _output(verbose: bool, quiet: bool) -> None:
    Output.verbose, Output.quiet = verbose, quiet
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _BarSafeHandler):
            root.removeHandler(h)
    h = _BarSafeHandler()
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    # Libraries that talk a lot at INFO: their lines only with --verbose (Dask's scheduler and
    # nanny chatter, urllib3's "Retrying" before a STAC error we report ourselves).
    for name, level in (
        ("distributed", logging.WARNING),
        ("urllib3", logging.ERROR),
        ("rasterio", logging.WARNING),
        ("numba", logging.WARNING),
        ("httpx", logging.WARNING),
    ):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else level)


def progress_bar(**kw: Any):  # -> tqdm.tqdm
    """A tqdm bar on stderr, hidden by --quiet."""
    from tqdm import tqdm

    return tqdm(disable=Output.quiet, file=sys.stderr, **kw)


def _error(msg: str, code: int) -> int:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    return code


def fail(msg: str, code: int = 2) -> None:
    """End the command with one line ``error: msg`` and exit status ``code``."""
    _error(msg, code)
    raise typer.Exit(code)


@functools.cache
def _output_params() -> list:
    """--verbose and --quiet as typer builds options (from a function's signature)."""
    holder = typer.Typer(add_completion=False)

    @holder.command()
    def _options(
        verbose: Annotated[
            bool,
            typer.Option("--verbose", "-v", help="Debug logs (and a traceback on a crash)"),
        ] = False,
        quiet: Annotated[
            bool,
            typer.Option("--quiet", "-q", help="Only warnings, errors and results: no bars"),
        ] = False,
    ) -> None: ...

    return [p for p in typer.main.get_command(holder).params if p.name in ("verbose", "quiet")]


def _with_output_options(cmd: Any) -> None:
    """Give a command --verbose / --quiet, applied before its body runs."""
    if any(p.name == "verbose" for p in cmd.params) or cmd.callback is None:
        return
    cmd.params += _output_params()
    inner = cmd.callback

    @functools.wraps(inner)
    def callback(*args: Any, verbose: bool = False, quiet: bool = False, **kwargs: Any) -> Any:
        if verbose and quiet:
            raise BadInput("--verbose and --quiet exclude each other")
        _output(verbose, quiet)
        return inner(*args, **kwargs)

    cmd.callback = callback


class ClearSkyGroup(TyperGroup):
    """Every command gets --verbose/--quiet; every error ends as one line and an exit code."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for cmd in self.commands.values():
            _with_output_options(cmd)

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(
                args=argv,
                prog_name=prog_name or "clearsky",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
            code = rv if isinstance(rv, int) else 0
        except BadInput as exc:
            code = _error(str(exc), 2)
        except click_errors.NoArgsIsHelpError as exc:
            typer.echo(exc.format_message(), err=True)
            code = 2
        except click_errors.UsageError as exc:
            where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
            code = _error(where + " ".join(exc.format_message().split()), 2)
        except click_errors.ClickException as exc:
            code = _error(" ".join(exc.format_message().split()), exc.exit_code)
        except typer.Abort:
            code = _error("aborted", 130)
        except Exception as exc:  # a bug or an environment problem: one line unless asked
            if "--verbose" in argv or "-v" in argv:
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            code = _error(
                f"unexpected {type(exc).__name__}: {first} (--verbose shows the traceback)", 1
            )
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=ClearSkyGroup,
    help="ClearSky: cloud-free Sentinel-2 basemap tiles composited on demand.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("clearsky")
        except PackageNotFoundError:  # run from a source tree that is not installed
            v = "unknown (not installed)"
        typer.echo(f"clearsky {v}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version"),
    ] = False,
) -> None:
    """ClearSky: cloud-free Sentinel-2 basemap tiles composited on demand."""


DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data", help="Data directory of stacks (default: $CLEARSKY_DATA_DIR or data/demo)"
    ),
]


def _data_dir(data: Path | None, create: bool = False) -> Path:
    from compositor.demo import default_data_dir

    d = data or default_data_dir()
    if create:
        return cliargs.writable_dir(d, "--data")
    return cliargs.existing_dir(d, "--data", " (run `clearsky demo` or give --data)")


MASKS_EXTRA = (
    "needs PyTorch and transformers, which are not installed: pip install 'clearsky[masks]' "
    "(README: Install, for the CPU-only build of torch)"
)


def _masks_available() -> bool:
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) for m in ("torch", "transformers", "safetensors"))
    except (ImportError, ValueError):  # a broken or blocked install counts as none
        return False


def _need_masks(what: str) -> None:
    if not _masks_available():
        raise BadInput(f"{what} {MASKS_EXTRA}")


# ---------------------------------------------------------------- demo / serve / cells
@app.command()
def demo(
    data: DataDir = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the demo data exists")] = False,
    masks: Annotated[
        bool, typer.Option(help="Also write the shipped model's cloud masks (mask=segformer)")
    ] = True,
) -> None:
    """Build the embedded demo data (a real Romania cell and a synthetic cloudy cell)."""
    data_dir = _data_dir(data, create=True)
    if masks and not _masks_available():
        typer.secho(
            f"warning: the model's cloud masks {MASKS_EXTRA}; building the demo without them",
            fg=typer.colors.YELLOW,
            err=True,
        )
        masks = False
    from compositor.demo import build_demo
    from compositor.stack import Stack

    bars: dict[str, Any] = {}

    def advance(step: str, done: int, total: int) -> None:
        bar = bars.get(step)
        if bar is None:
            bar = bars[step] = progress_bar(total=total, desc=step, unit="scene")
        if not bar.disable and bar.n < done:
            bar.update(done - bar.n)
        if done >= total:
            bar.close()  # one step's bar at a time

    try:
        built = build_demo(data_dir, force=force, progress=advance)
    except (RuntimeError, FileNotFoundError) as exc:
        fail(str(exc))
    finally:
        for bar in bars.values():
            bar.close()
    for cid, path in built.items():
        s = Stack.open(path)
        typer.echo(
            f"{cid}: {len(s.complete_indices())} scenes, {s.width}x{s.height} px, "
            f"{s.nbytes_on_disk() / 1e6:.1f} MB at {path}"
        )
    if masks:
        from compositor.masks.model import MaskModelError, load_model

        try:
            model = load_model()
        except MaskModelError as exc:
            fail(str(exc))
        for cid, path in built.items():
            rep = _mask_one(path, model, None, False)
            typer.echo(f"{cid}: model masks for {rep.done} scenes ({rep.skipped} already done)")


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(envvar="CLEARSKY_HOST", help="Interface to listen on")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="CLEARSKY_PORT", min=1, max=65535, help="Port (1-65535)")
    ] = 8000,
    data: DataDir = None,
    workers: Annotated[
        int, typer.Option(envvar="CLEARSKY_WORKERS", min=1, help="Server worker processes")
    ] = 1,
) -> None:
    """Serve tiles of every stack in the data directory (and the viewer at /)."""
    from compositor.stack import list_stacks

    data_dir = _data_dir(data)
    if not list_stacks(data_dir):
        typer.secho(
            f"warning: no stacks in {data_dir}: the server starts with no cells (run "
            "`clearsky demo`, or give --data a folder of <CELL>.zarr stacks)",
            fg=typer.colors.YELLOW,
            err=True,
        )
    os.environ["CLEARSKY_DATA_DIR"] = str(data_dir)
    from tileserver.http import run

    typer.echo(f"ClearSky: starting on {host}:{port} (data: {data_dir}); URL once it is ready")
    run(host, port, workers)


@app.command()
def cells(data: DataDir = None) -> None:
    """List the stacks of a data directory: scenes, dates, size on disk, model masks."""
    from compositor.stack import Stack, StackError, list_stacks

    data_dir = _data_dir(data)
    have = list_stacks(data_dir)
    if not have:
        typer.echo(f"no stacks in {data_dir} (run `clearsky demo` or `clearsky prefetch`)")
        return
    head = f"{'cell':<6} {'scenes':>6}  {'first':<10}  {'last':<10}  {'size':>9}  masks"
    typer.echo(head)
    typer.echo("-" * len(head))
    for cid, path in have.items():
        try:
            s = Stack.open(path)
        except StackError as exc:
            typer.echo(f"{cid:<6} unreadable: {exc}")
            continue
        done = [s.scenes[i] for i in s.complete_indices()]
        masked = sum(1 for sc in done if sc.extra.get("cloudprob"))
        first = done[0].date.isoformat() if done else "-"
        last = done[-1].date.isoformat() if done else "-"
        size = s.nbytes_on_disk()
        size_text = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
        typer.echo(
            f"{cid:<6} {len(done):>6}  {first:<10}  {last:<10}  {size_text:>9}  "
            f"{masked}/{len(done)} scenes"
        )


# ---------------------------------------------------------------- masks (PyTorch)
def _mask_one(path: Path, model: Any, level: int | None, force: bool):  # -> MaskReport
    """Masks for one stack, with a progress bar only when there is work."""
    from compositor.masks.predict import default_level, mask_stack, model_tag
    from compositor.stack import Stack

    s = Stack.open(path)
    lv = default_level(s) if level is None else level
    tag = model_tag(model)
    todo = [
        i
        for i in s.complete_indices()
        if force
        or (s.scenes[i].extra.get("cloudprob") or {}).get("level") != lv
        or (s.scenes[i].extra.get("cloudprob") or {}).get("model") != tag
    ]
    return mask_stack(
        path, level=level, model=model, force=force, progress=bool(todo) and not Output.quiet
    )


@app.command()
def mask(
    cell: Annotated[str, typer.Argument(help="Cell id (a stack in --data) or a stack path")],
    data: DataDir = None,
    level: Annotated[
        int | None,
        typer.Option(min=0, help="Stack level to predict at (default: the 20 m level)"),
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="Model .safetensors (default: the shipped one)")
    ] = None,
    force: Annotated[bool, typer.Option(help="Redo scenes already masked")] = False,
) -> None:
    """Write SegFormer cloud/shadow probabilities into a stack's scenes (for mask=segformer)."""
    _need_masks("`clearsky mask`")
    path = Path(cell)
    if not (path / "zarr.json").exists():
        _, path = cliargs.stack_of(cell, _data_dir(data))
    if model is not None:
        model = cliargs.existing_file(model, "--model")
    from compositor.masks.model import MaskModelError, load_model
    from compositor.stack import Stack, StackError

    try:
        levels = len(Stack.open(path).levels)
        if level is not None and level >= levels:
            raise BadInput(f"--level {level}: stack {path} has levels 0..{levels - 1}")
        rep = _mask_one(path, load_model(model), level, force)
    except (MaskModelError, StackError) as exc:
        fail(str(exc))
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
    synthetic_size: Annotated[int, typer.Option(min=64, help="Synthetic cell size (px)")] = 512,
    synthetic_dates: Annotated[int, typer.Option(min=2, help="Synthetic cell dates")] = 32,
    procedural: Annotated[
        int, typer.Option(min=0, help="Procedural clear landscapes to put simulated skies over")
    ] = 0,
    workdir: Annotated[
        Path | None,
        typer.Option(help="Work folder for the real export (kept; default: a temporary folder)"),
    ] = None,
    out: Annotated[Path, typer.Option(help="Model to write (.safetensors + .json)")] = Path(
        "segformer.safetensors"
    ),
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps")] = 2000,
    batch: Annotated[int, typer.Option(min=1, help="Patches per step")] = 8,
    patch: Annotated[
        int, typer.Option(min=64, help="Patch side (px), a multiple of 16, at least 64")
    ] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (> 0)")] = 2e-3,
    levels: Annotated[str, typer.Option(help="Levels of labelled stacks, e.g. 0,1,2")] = "0,1,2",
    sim_share: Annotated[
        float,
        typer.Option(
            min=0, max=1, help="Share of patches that are clear surfaces with simulated skies"
        ),
    ] = 0.6,
    scl_share: Annotated[
        float,
        typer.Option(min=0, max=1, help="Among labelled patches, the share labelled by SCL"),
    ] = 0.6,
    features: Annotated[str, typer.Option(help="Model input: linear+log | linear")] = (
        "linear+log"
    ),
    seed: Annotated[int, typer.Option(help="Random seed (data, simulation, init)")] = 0,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint file (default: OUT with .ckpt)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint")] = False,
    threads: Annotated[
        int, typer.Option(min=0, help="CPU threads for torch (0: torch's default)")
    ] = 0,
    workers: Annotated[
        int, typer.Option(min=0, help="Processes building the data (0: all cores)")
    ] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    max_minutes: Annotated[
        float, typer.Option(min=0, help="Stop early (and save) after this many minutes (0: never)")
    ] = 0.0,
    segformer: Annotated[
        str, typer.Option(help="SegformerConfig overrides as JSON, e.g. '{\"depths\": [1,1,2,2]}'")
    ] = "",
    sky: Annotated[
        str, typer.Option(help="Sky scenario weights as JSON, e.g. '{\"overcast\": 0.2}'")
    ] = "",
    init: Annotated[
        Path | None,
        typer.Option(help="Fine-tune: start from this model (.safetensors) instead of scratch"),
    ] = None,
) -> None:
    """Train the cloud/shadow SegFormer: clear surfaces under simulated skies (exact labels) and
    labelled scenes (SCL, or a synthetic cell's truth)."""
    import json
    import shlex
    import shutil
    import tempfile

    # Every argument first.
    if not lr > 0:
        raise BadInput(f"--lr must be above 0, got {lr}")
    if patch % 16:
        raise BadInput(f"--patch must be a multiple of 16, got {patch}")
    if features not in ("linear+log", "linear"):
        raise BadInput(f"--features must be linear+log or linear, got {features!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise BadInput(f"--device must be auto, cpu or cuda, got {device!r}")
    seeds = cliargs.seeds(synthetic_seeds)
    lv = cliargs.int_list(levels, "--levels")
    json_opts = {}
    for name, text in (("--segformer", segformer), ("--sky", sky)):
        try:
            value = json.loads(text) if text else {}
        except ValueError as exc:
            raise BadInput(f"{name} must be a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise BadInput(f"{name} must be a JSON object like '{{\"key\": value}}'")
        json_opts[name] = value
    paths = [cliargs.existing_dir(p, "stack") for p in stacks or []]
    for p in paths:
        if not (p / "zarr.json").is_file():
            raise BadInput(f"{p} is not a stack (no zarr.json)")
    if real_npz is not None:
        real_npz = cliargs.existing_file(real_npz, "--real-npz")
    if init is not None:
        init = cliargs.existing_file(init, "--init")
    from compositor.masks.samples import shared_data_dir

    root = shared_data_dir()
    if (real or export_real) and real_npz is None and not root.is_dir():
        raise BadInput(f"--real needs the real samples at {root} (set CLEARSKY_SHARED_DATA)")
    if export_real is not None:
        export_real = cliargs.output_file(export_real, "--export-real", (".npz",))
    elif not (paths or seeds or real or real_npz or procedural):
        raise BadInput(
            "nothing to train on: give stacks, --real, --synthetic-seeds or --procedural"
        )
    out_file = cliargs.output_file(out, "--out", (".safetensors",))
    ckpt = cliargs.output_file(checkpoint or out_file.with_suffix(".ckpt"), "--checkpoint")
    if resume and not ckpt.is_file():
        raise BadInput(f"--resume: no checkpoint at {ckpt}")
    if workdir is not None:
        workdir = cliargs.writable_dir(workdir, "--workdir")
    _need_masks("`clearsky train`")
    if init is not None:
        from compositor.masks.model import MaskModelError, load_model

        try:
            load_model(init)
        except MaskModelError as exc:
            raise BadInput(f"--init: {exc}") from None
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BadInput("--device cuda: no CUDA device here")

    from compositor.masks.train import TrainConfig, train_and_save
    from compositor.masks.trainset import build_bank
    from compositor.masks.trainset import export_real as do_export

    try:
        from compositor.stack import StackError
    except ImportError:  # a GPU box with only numpy and torch trains from --real-npz
        StackError = RuntimeError  # noqa: N806

    try:
        cfg = TrainConfig(
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
            segformer=json_opts["--segformer"],
            sky=json_opts["--sky"],
            init=str(init) if init else "",
        )
    except (ValueError, TypeError) as exc:
        raise BadInput(str(exc)) from None
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    work = workdir or Path(tempfile.mkdtemp(prefix="clearsky-train-"))
    try:
        try:
            if export_real is not None:
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
                paths,
                lv,
                seed,
                workers=workers or None,
            )
        except (RuntimeError, FileNotFoundError, StackError, OSError) as exc:
            fail(str(exc))
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        command = shlex.join(["clearsky", *sys.argv[1:]])
        try:
            res = train_and_save(
                bank,
                out_file,
                cfg,
                ckpt,
                resume,
                progress=not Output.quiet,
                command=command,
                device=None if device == "auto" else device,
                max_minutes=max_minutes or None,
            )
        except (StackError, ValueError) as exc:
            fail(str(exc))
    finally:
        if workdir is None:  # ours: only inputs to this run
            shutil.rmtree(work, ignore_errors=True)
    for kind, sc in res.val.items():
        typer.echo(
            f"held-out {kind:10} cloud F1 {sc['cloud_f1']:.3f}  shadow F1 {sc['shadow_f1']:.3f}  "
            f"balanced acc {sc['balanced_accuracy']:.3f}"
        )
    typer.echo(f"wrote {out_file} in {res.seconds / 60:.1f} min")


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


def _stac_url(url: str | None) -> str | None:
    if url is not None and not url.startswith(("http://", "https://")):
        raise BadInput(f"--stac-url must be an http(s) URL, got {url!r}")
    return url


def _search_kwargs(
    start: str | None,
    end: str | None,
    months: str | None,
    max_cloud: float | None,
    limit: int,
    collections: list[str] | None,
) -> dict[str, Any]:
    from compositor.search import DEFAULT_COLLECTIONS, default_dates

    s, e = default_dates(*cliargs.date_range(start, end))
    if s > e:
        raise BadInput(f"--start {s} is after the end of the window ({e})")
    return {
        "start": s,
        "end": e,
        "months": cliargs.months(months),
        "max_cloud": max_cloud,
        "limit": limit,
        "collections": tuple(collections or DEFAULT_COLLECTIONS),
    }


def _scene_query(cell_id: str, bbox: str | None, **kwargs: Any):  # -> search.SearchQuery
    """A checked query of one cell (and part of it, with a bbox that must overlap it)."""
    from compositor.grid import CellError, cell
    from compositor.search import SearchQuery, area_lonlat

    cid = cliargs.cell(cell_id)
    box = cliargs.bbox(bbox)
    try:
        q = SearchQuery(cell=cid, bbox=box, **kwargs)
        area_lonlat(cell(cid), box)  # a bbox beside the cell is an error now, not after a search
    except (ValueError, CellError) as exc:
        raise BadInput(str(exc)) from None
    return q


SearchBbox = Annotated[str | None, typer.Option(help="Area W,S,E,N in degrees")]
SearchStart = Annotated[
    str | None, typer.Option(help="First date YYYY-MM-DD (default: 5 years before the end)")
]
SearchEnd = Annotated[str | None, typer.Option(help="Last date YYYY-MM-DD (default: today)")]
SearchMonths = Annotated[str | None, typer.Option(help="Months of the year, e.g. 6,7,8,9 or 6-9")]
SearchCloud = Annotated[
    float | None, typer.Option(min=0, max=100, help="Maximum scene cloud cover (%)")
]
SearchLimit = Annotated[
    int, typer.Option(min=1, help="At most this many scenes (least cloudy first)")
]
SearchCollection = Annotated[
    list[str] | None,
    typer.Option(
        "--collection",
        help="STAC collection, repeatable, most preferred first (default: sentinel-2-c1-l2a, "
        "then sentinel-2-l2a for the years Collection-1 lacks; one acquisition is kept once)",
        show_default=False,
    ),
]


def _report_search(result, client_url: str) -> None:  # result: compositor.search.SearchResult
    """The per-year table and the warnings a short or gappy search must not hide."""
    from compositor.search import format_years

    r = result
    typer.echo(
        f"{r.query.cell}: {len(r.items)} scenes chosen of {r.acquisitions} acquisitions "
        f"({r.of_tile} matching items, {len(r.duplicates)} duplicates dropped; {r.found} items "
        f"returned by {client_url} {' + '.join(r.query.collections)}, "
        f"{len(r.dropped_other_tiles)} of other tiles)"
    )
    typer.echo(format_years(r))
    for w in r.warnings():
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)


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
    collection: SearchCollection = None,
    stac_url: StacUrl = None,
) -> None:
    """List the Sentinel-2 L2A scenes a prefetch would take (by cell, or every cell of a bbox)."""
    from compositor.grid import CellError, cells_in_bbox
    from compositor.search import SearchError, format_table, mask_url, open_client
    from compositor.search import search as run_search

    # Every argument first: the STAC API is asked nothing until all are known good.
    url = _stac_url(stac_url)
    kwargs = _search_kwargs(start, end, months, max_cloud, limit, collection)
    if cell_id:
        queries = [_scene_query(cell_id, bbox, **kwargs)]
    elif bbox:
        box = cliargs.bbox(bbox)
        cids = cells_in_bbox(box)
        if not cids:
            raise BadInput(f"--bbox {bbox} touches no Sentinel-2 cell")
        _scene_query(cids[0], None, **kwargs)  # the shared options, checked once
        from compositor.search import SearchQuery

        queries = [SearchQuery(cell=c, bbox=box, **kwargs) for c in cids]
    else:
        raise BadInput("give a CELL or --bbox W,S,E,N")
    try:
        client = open_client(url)
        results = []
        for q in queries:
            try:
                results.append(run_search(q, client))
            except CellError:
                if len(queries) == 1:
                    raise
                continue  # a square of the lattice that only grazes the bbox
    except (SearchError, CellError) as exc:
        fail(str(exc))
    for r in results:
        _report_search(r, mask_url(client.self_href or ""))
        typer.echo(format_table(r))


RESOLUTIONS = (10.0, 20.0, 60.0, 100.0)


@app.command()
def prefetch(
    cell_id: Annotated[str, typer.Argument(metavar="CELL", help="MGRS cell, e.g. 54SUE")],
    bbox: Annotated[
        str | None, typer.Option(help="Only this part of the cell: W,S,E,N in degrees")
    ] = None,
    resolution: Annotated[
        float,
        typer.Option(help="Stack base resolution in metres: 10, 20, 60 (or 100 for a quick look)"),
    ] = 10.0,
    data: DataDir = None,
    start: SearchStart = None,
    end: SearchEnd = None,
    months: SearchMonths = None,
    max_cloud: SearchCloud = None,
    limit: SearchLimit = 100,
    collection: SearchCollection = None,
    stac_url: StacUrl = None,
    dem: Annotated[bool, typer.Option(help="Also warp the Copernicus DEM onto the grid")] = True,
    dem_collection: Annotated[str, typer.Option(help="STAC collection of the DEM")] = (
        "cop-dem-glo-30"
    ),
    workers: Annotated[int, typer.Option(min=1, help="Scenes read at once")] = 3,
    retries: Annotated[int, typer.Option(min=0, help="Retries of a failing read")] = 4,
    backoff: Annotated[float, typer.Option(min=0, help="First retry delay (s), doubling")] = 1.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
    check_disk: Annotated[bool, typer.Option(help="Refuse when the disk looks too small")] = True,
) -> None:
    """Download scenes (4 bands + SCL) and the DEM of a cell into its stack; safe to rerun.

    Exit status 0: every scene is in the stack.
    3: some scenes failed and were skipped; run the same command again to retry just those.
    2: nothing was done (bad arguments, no scenes, the search failed).
    """
    from compositor.prefetch import PrefetchError, prefetch, search_dem, target_grid
    from compositor.search import SearchError, mask_logged_urls, mask_text, mask_url, open_client
    from compositor.search import search as run_search

    url = _stac_url(stac_url)
    cliargs.choice(resolution, RESOLUTIONS, "--resolution")
    kwargs = _search_kwargs(start, end, months, max_cloud, limit, collection)
    q = _scene_query(cell_id, bbox, **kwargs)
    data_dir = _data_dir(data, create=True)
    try:
        grid = target_grid(q.cell, resolution, q.bbox)
    except PrefetchError as exc:
        fail(str(exc))
    mask_logged_urls()
    try:
        client = open_client(url)
        found = run_search(q, client)
        if not found.items:
            fail(
                f"no {' or '.join(q.collections)} scenes of {q.cell} match ({found.found} items "
                f"returned, {len(found.dropped_other_tiles)} of other tiles): widen dates, "
                "months or cloud"
            )
        _report_search(found, mask_url(client.self_href or ""))
        dem_items = None
        if dem:
            try:
                dem_items = search_dem(client, grid, dem_collection)
            except Exception as exc:  # a catalogue without the DEM collection
                typer.secho(f"warning: no DEM: {mask_text(exc)}", fg=typer.colors.YELLOW, err=True)
        typer.echo(
            f"{q.cell}: {len(found.items)} scenes to the stack, grid {grid.width}x{grid.height} "
            f"px at {grid.res:g} m"
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
                "source": f"{mask_url(client.self_href or '')} {' + '.join(q.collections)}",
                "resolution": grid.res,
            },
            progress=progress and not Output.quiet,
            check_disk=check_disk,
        )
    except (PrefetchError, SearchError) as exc:
        fail(str(exc))
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
    mask: str | None,
    months: str | None,
    start: str | None = None,
    end: str | None = None,
    dilate: int | None = None,
):  # -> compositor.tiling.ViewParams
    """Composite parameters, checked; unset ones take the tile server's defaults."""
    from compositor.tiling import ViewParams

    s, e = cliargs.date_range(start, end)
    kw: dict[str, Any] = {"percentile": percentile, "months": cliargs.months(months)}
    optional = (("mask", mask), ("start", s), ("end", e), ("dilate", dilate))
    kw.update({k: v for k, v in optional if v is not None})
    try:
        return ViewParams(**kw)
    except ValueError as exc:
        raise BadInput(f"{exc}") from None


Percentile = Annotated[float, typer.Option(min=0, max=100, help="Percentile over time")]
MaskOpt = Annotated[
    str | None,
    typer.Option(help="Cloud mask, as the tiles' mask parameter (default: the tiles' default)"),
]


@app.command()
def composite(
    cell: Annotated[str, typer.Argument(help="Cell id, e.g. 34TER")],
    out: Annotated[Path, typer.Option("--out", help="Output COG path (.tif)")],
    data: DataDir = None,
    percentile: Percentile = 25.0,
    mask: MaskOpt = None,
    months: Annotated[str | None, typer.Option(help="e.g. 6,7,8,9")] = None,
    start: Annotated[str | None, typer.Option(help="YYYY-MM-DD")] = None,
    end: Annotated[str | None, typer.Option(help="YYYY-MM-DD")] = None,
    dilate: Annotated[int | None, typer.Option(min=0, help="Mask dilation, 10 m pixels")] = None,
) -> None:
    """Write one cell's composite (bands + clear count) as a Cloud-Optimised GeoTIFF."""
    out_path = cliargs.output_file(out, "--out", (".tif", ".tiff"))
    params = _view(percentile, mask, months, start, end, dilate)
    cid, path = cliargs.stack_of(cell, _data_dir(data))
    from compositor.batch import composite_cell

    bars: list[Any] = []

    def advance(done: int, total: int) -> None:
        if not bars:
            bars.append(progress_bar(total=total, desc=f"{cid} composite", unit="block"))
        bars[0].update(done - bars[0].n)

    try:
        res = composite_cell(path, out_path, params, progress=advance)
    except ValueError as exc:
        fail(str(exc))
    finally:
        for bar in bars:
            bar.close()
    typer.echo(
        f"{cid}: {res['width']}x{res['height']} px from {res['scenes']} scenes -> {out_path}"
    )


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
        str | None,
        typer.Option(
            help="Dask scheduler, tcp://HOST:PORT (default: a LocalCluster); its workers must "
            "see --data and --out-dir at the same absolute paths (a shared filesystem)"
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="LocalCluster worker processes")] = 2,
    percentile: Percentile = 25.0,
    mask: MaskOpt = None,
    months: Annotated[str | None, typer.Option(help="e.g. 6,7,8,9")] = None,
    force: Annotated[bool, typer.Option(help="Redo cells whose COG is already up to date")] = False,
) -> None:
    """Composite many cells to COGs on Dask distributed; up-to-date COGs are kept.

    Exit status 3 when some cells failed (the others are written; rerun to retry them).
    """
    out = cliargs.writable_dir(out_dir, "--out-dir")
    sched = cliargs.scheduler(scheduler)
    params = _view(percentile, mask, months)
    todo = cliargs.stacks_of(cells or [], _data_dir(data))
    from compositor.batch import BatchError, run_batch

    bars: list[Any] = []

    def advance(result: dict) -> None:
        if not bars:
            bars.append(progress_bar(total=len(todo), desc="cells", unit="cell"))
        bars[0].update(1)

    try:
        results = run_batch(
            todo,
            out,
            params,
            sched,
            workers,
            progress=advance,
            force=force,
            verbose=Output.verbose,
        )
    except BatchError as exc:
        fail(str(exc))
    finally:
        for bar in bars:
            bar.close()
    failed = [r for r in results if "error" in r]
    for r in results:
        if "error" in r:
            typer.echo(f"{r['cell']}: FAILED {r['error']}")
        elif r.get("skipped"):
            typer.echo(f"{r['cell']}: {r['path']} (up to date; --force redoes it)")
        else:
            typer.echo(f"{r['cell']}: {r['path']}")
    if failed:
        raise typer.Exit(3)


# ---------------------------------------------------------------- export (static maps)
TileParam = Annotated[
    str | None,
    typer.Option(help="Tile parameter, as the server's (README table)", show_default=False),
]


@app.command()
def export(
    cells: Annotated[
        list[str] | None,
        typer.Argument(metavar="[CELL]...", help="Cell ids (or --bbox)", show_default=False),
    ] = None,
    bbox: Annotated[str | None, typer.Option(help="Region W,S,E,N in degrees")] = None,
    minzoom: Annotated[
        int | None, typer.Option(help="Lowest zoom (default: the region in about one tile)")
    ] = None,
    maxzoom: Annotated[
        int | None, typer.Option(help="Highest zoom, at most 18 (default: the cells' native)")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder")] = Path("export"),
    name: Annotated[str | None, typer.Option(help="Archive name (default: the cell ids)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Tile format: png | webp | jpg")] = "png",
    layout: Annotated[
        str, typer.Option(help="pmtiles (one archive) | xyz ({z}/{x}/{y} files)")
    ] = "pmtiles",
    mbtiles: Annotated[bool, typer.Option(help="Also write NAME.mbtiles (QGIS, GDAL)")] = False,
    data: DataDir = None,
    workers: Annotated[
        int | None, typer.Option(help="Rendering threads (default: one per CPU core)")
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help="Render on this Dask cluster (tcp://HOST:PORT; stacks at same paths)"),
    ] = None,
    base_url: Annotated[
        str | None, typer.Option(help="Where the folder will be published (for the snippet)")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
    layer: TileParam = None,
    percentile: TileParam = None,
    start: TileParam = None,
    end: TileParam = None,
    months: TileParam = None,
    mask: TileParam = None,
    cloud_threshold: TileParam = None,
    dilate: TileParam = None,
    temporal: TileParam = None,
    min_clear: TileParam = None,
    rescale: TileParam = None,
    gamma: TileParam = None,
    date: TileParam = None,
    hillshade: TileParam = None,
) -> None:
    """Export a region as a PMTiles archive (or {z}/{x}/{y} files, or MBTiles) with a web map
    (index.html) that works on any static web server: maps for blog posts.

    Exit status 2: bad input (nothing written). 3: some tiles failed or it was interrupted: the
    same command continues.
    """
    from compositor.demo import default_data_dir
    from compositor.export import ExportError, ExportIncomplete, plan_export, run_export
    logging.getLogger("distributed").setLevel(logging.WARNING)  # the progress bar says enough
    params = {
        "layer": layer,
        "percentile": percentile,
        "start": start,
        "end": end,
        "months": months,
        "mask": mask,
        "cloud_threshold": cloud_threshold,
        "dilate": dilate,
        "temporal": temporal,
        "min_clear": min_clear,
        "rescale": rescale,
        "gamma": gamma,
        "date": date,
        "hillshade": hillshade,
    }
    if workers is not None and workers < 1:
        raise BadInput(f"--workers must be at least 1, got {workers}")
    region = cliargs.bbox(bbox)
    scheduler = cliargs.scheduler(scheduler)
    try:
        plan = plan_export(
            data or default_data_dir(),
            cells or [],
            region,
            minzoom,
            maxzoom,
            params,
            out,
            name,
            fmt,
            layout,
            mbtiles,
        )
    except (ExportError, ValueError) as exc:
        raise BadInput(str(exc)) from None
    bar = None

    def on_estimate(total: int, done: int, nbytes: int) -> None:
        nonlocal bar
        typer.echo(
            f"{plan.name}: {total} tiles at zooms {plan.minzoom}-{plan.maxzoom} over "
            f"{', '.join(plan.region_cells)}"
            + (f", {done} done by an earlier run" if done else "")
            + f"; archive about {nbytes / 1e6:.1f} MB"
        )
        if progress:
            bar = progress_bar(total=total, initial=done, unit="tile", desc="tiles")

    def on_progress(done: int, total: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)

    try:
        rep = run_export(plan, workers, scheduler, on_progress, on_estimate, base_url)
    except ExportIncomplete as exc:
        fail(str(exc), code=3)
    except ExportError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted: finished tiles are kept; run the same command again to go on", 3)
    finally:
        if bar is not None:
            bar.close()
    for p in rep.outputs:
        typer.echo(f"wrote {p}")
    typer.echo(
        f"{rep.stored} tiles with data of {rep.tiles} ({rep.bytes / 1e6:.1f} MB, estimated "
        f"{rep.estimate_bytes / 1e6:.1f} MB), {rep.rendered} rendered in {rep.seconds:.1f} s"
    )
    typer.echo("Publish the folder on any static host that answers Range requests; embed with:")
    typer.echo(rep.snippet)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
