"""Composite quality: residual cloud / shadow, RMSE and fallback share, per method and reference.

    python bench/quality.py [--data DIR] [--seeds 21,22] [--json]

References (what "right" means for each):
- **oracle** (synthetic cells): the same 25th percentile taken over the truly clear looks only
  (the stored true cloud/shadow masks): the best any mask could do with these dates. Scored on
  the pixels that have at least one truly clear look.
- **truth** (synthetic cells): the clear-sky 25th percentile of every date's true surface. It holds
  phenology no method can reach from the sampled dates (even the oracle misses it a little).
- **held-out** (34TER, real, June-September): the 25th percentile of the clearest dates (SCL
  >= 99 % clear), which the methods do not see.

Cells: the demo's 49NDB (synthetic seed 0) and 34TER, and more synthetic seeds (never used by
`clearsky train`: it trains on 101-108) built into --work with the shipped model's masks.
Residual cloud = B02 more than 300 DN above the reference; residual shadow = B08 more than 25 %
below it (compositor/quality.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compositor.composite import SCL_CLOUD, SCL_NODATA, SCL_SHADOW  # noqa: E402
from compositor.demo import (  # noqa: E402
    REAL_CELL,
    SYNTH_CELL,
    build_demo,
    build_synthetic,
    read_truth,
)
from compositor.percentile import masked_percentile  # noqa: E402
from compositor.quality import composite_scores  # noqa: E402
from compositor.stack import Stack  # noqa: E402
from compositor.tiling import ViewParams, composite_window  # noqa: E402

METHODS = {
    "default view": ViewParams(),
    "SCL + temporal (no model masks)": ViewParams(mask="scl"),
    "SCL (before: no temporal)": ViewParams(mask="scl", temporal=False, dilate=3),
    "SegFormer (before: no temporal)": ViewParams(mask="segformer", temporal=False, dilate=3),
    "p25, all looks (vanilla)": ViewParams(mask="none"),
    "median, all looks": ViewParams(mask="none", percentile=50),
}


def _has_model_masks(stack: Stack, idx: np.ndarray) -> bool:
    return any("cloudprob" in stack.scenes[int(i)].extra for i in idx)


def _rows(
    stack: Stack,
    idx: np.ndarray,
    refs: dict[str, tuple[np.ndarray, np.ndarray]],
    extra: dict[str, np.ndarray] | None = None,
) -> list[dict]:
    """Scores of every method against every reference (values, pixels scored)."""
    window = (0, 0, stack.height, stack.width)
    has_model = _has_model_masks(stack, idx)
    rows = []
    results: dict[str, tuple[np.ndarray, np.ndarray | None, float]] = {}
    for name, params in METHODS.items():
        if params.mask == "segformer" and not has_model:
            rows.append({"method": name, "skipped": "no model masks (run `clearsky mask`)"})
            continue
        t0 = time.perf_counter()
        res = composite_window(stack, 0, window, params, idx)
        results[name] = (res.values, res.fallback, time.perf_counter() - t0)
    for name, values in (extra or {}).items():
        results[name] = (values, None, 0.0)
    for name, (values, fallback, seconds) in results.items():
        for ref_name, (ref, ok) in refs.items():
            v = np.where(ok, values, np.nan)
            sc = composite_scores(v, ref, stack.bands)
            sc.update(
                method=name,
                reference=ref_name,
                seconds=round(seconds, 2),
                fallback=None if fallback is None else float(fallback[ok].mean()),
            )
            rows.append(sc)
    return rows


def synthetic(path: Path) -> dict:
    stack = Stack.open(path)
    idx = stack.complete_indices()
    truth = read_truth(path)
    refl = stack.read(0, (0, 0, stack.height, stack.width), idx, ("reflectance",))["reflectance"]
    bad = truth["cloud"][idx] | truth["shadow"][idx] | (refl[:, 0] == stack.nodata)
    oracle = masked_percentile(refl, bad, 25.0)
    has_clear = (~bad).sum(axis=0) >= 1
    everywhere = np.isfinite(truth["composite"]).all(axis=0)
    refs = {"oracle": (oracle, has_clear), "truth": (truth["composite"], everywhere)}
    return {
        "cell": f"{stack.cell_id} synthetic seed {stack.meta.get('seed')}",
        "dates": len(idx),
        "size": [stack.width, stack.height],
        "with_clear_look": float(has_clear.mean()),
        "rows": _rows(stack, idx, refs, {"oracle": oracle}),
    }


def real(data: Path, clear_threshold: float = 0.99, months: tuple[int, ...] = (6, 7, 8, 9)) -> dict:
    stack = Stack.open(data / f"{REAL_CELL}.zarr")
    # Summers only, as the product is used: a winter look is not a cloud but would read as one.
    idx = stack.complete_indices(months=months)
    window = (0, 0, stack.height, stack.width)
    scl = stack.read(0, window, idx, ("scl",))["scl"]
    data_px = ~np.isin(scl, SCL_NODATA)
    clear = data_px & ~np.isin(scl, SCL_CLOUD + SCL_SHADOW)
    frac = clear.sum(axis=(1, 2)) / np.maximum(data_px.sum(axis=(1, 2)), 1)
    full = data_px.mean(axis=(1, 2)) >= 0.9 * data_px.mean(axis=(1, 2)).max()
    held = idx[(frac >= clear_threshold) & full]
    keep = np.setdiff1d(idx, held)
    refl = stack.read(0, window, held, ("reflectance",))["reflectance"]
    reference = masked_percentile(refl, refl[:, 0] == 0, 25.0)
    ok = np.isfinite(reference).all(axis=0)
    return {
        "cell": f"{REAL_CELL} real, months {','.join(map(str, months))}",
        "dates": len(keep),
        "size": [stack.width, stack.height],
        "reference": f"p25 of {len(held)} held-out clear dates",
        "rows": _rows(Stack.open(stack.path), keep, {"held-out": (reference, ok)}),
    }


def extra_seed(work: Path, seed: int, size: int, dates: int) -> Path:
    """A synthetic cell of another seed with the shipped model's masks (built once)."""
    from compositor.demo import _complete
    from compositor.masks.predict import mask_stack

    d = work / f"synthetic-{seed}-{size}-{dates}"
    path = d / f"{SYNTH_CELL}.zarr"
    if not (path.exists() and _complete(path)):
        d.mkdir(parents=True, exist_ok=True)
        path = build_synthetic(d, seed=seed, size=size, n_dates=dates)
    mask_stack(path, progress=False)  # skips scenes masked with this model already
    return path


def print_table(res: dict) -> None:
    print(
        f"\n{res['cell']}  ({res['dates']} dates, {res['size'][0]}x{res['size'][1]} px"
        + (
            f", {res['with_clear_look']:.1%} of pixels with a truly clear look"
            if "with_clear_look" in res
            else ""
        )
        + ")"
    )
    print(
        f"{'method':34} {'reference':9} {'resid.cloud':>11} {'resid.shadow':>12} "
        f"{'fallback':>9} {'RMSE B02':>9} {'RMSE B04':>9} {'RMSE B08':>9}"
    )
    for r in res["rows"]:
        if "skipped" in r:
            print(f"{r['method']:34} skipped: {r['skipped']}")
            continue
        fb = "-" if r["fallback"] is None else f"{r['fallback']:.2%}"
        print(
            f"{r['method']:34} {r['reference']:9} {r['residual_cloud']:>11.2%} "
            f"{r['residual_shadow']:>12.2%} {fb:>9} {r['rmse']['B02']:>9.4f} "
            f"{r['rmse']['B04']:>9.4f} {r['rmse']['B08']:>9.4f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/demo"))
    ap.add_argument("--work", type=Path, default=Path("bench/.data/quality"))
    ap.add_argument("--seeds", default="21,22", help="more synthetic seeds ('' for none)")
    ap.add_argument("--size", type=int, default=512, help="their size (px)")
    ap.add_argument("--dates", type=int, default=64, help="their dates")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args()
    build_demo(args.data)  # reuses what is built
    results = [synthetic(args.data / f"{SYNTH_CELL}.zarr")]
    for s in filter(None, args.seeds.split(",")):
        results.append(synthetic(extra_seed(args.work, int(s), args.size, args.dates)))
    results.append(real(args.data))
    for r in results:
        print_table(r)
    if args.json:
        print(json.dumps({"quality": results}))


if __name__ == "__main__":
    main()
