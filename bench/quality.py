"""Composite quality: residual cloud, RMSE and bias against a reference, per method.

    python bench/quality.py [--data DIR] [--json]

Synthetic cell (49NDB): the reference is the ground-truth clear-sky 25th percentile kept in the
store. Real cell (34TER, June-September): there is no truth, so the clearest dates (SCL >= 99 %
clear) are held out and their own 25th percentile is the reference; methods see only the others.
Methods: median of all looks, 25th percentile of all looks (the vanilla method), SCL-masked 25th
percentile, and model-masked (SegFormer) 25th percentile where the stack has model masks.
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
from compositor.demo import REAL_CELL, SYNTH_CELL, build_demo, read_truth  # noqa: E402
from compositor.percentile import masked_percentile  # noqa: E402
from compositor.quality import composite_scores  # noqa: E402
from compositor.stack import CLOUDPROB_UNSET, Stack  # noqa: E402
from compositor.tiling import ViewParams, composite_window  # noqa: E402

METHODS = {
    "median, all looks": ViewParams(mask="none", percentile=50),
    "p25, all looks (vanilla)": ViewParams(mask="none"),
    "p25, SCL-masked": ViewParams(mask="scl"),
    "p25, SegFormer-masked": ViewParams(mask="segformer"),
}


def _has_model_masks(stack: Stack, idx: np.ndarray) -> bool:
    cp = stack.read(stack.levels[-1].index, (0, 0, 4, 4), idx, ("cloudprob",))["cloudprob"]
    return bool((cp[:, 0] != CLOUDPROB_UNSET).any())


def evaluate(stack: Stack, reference: np.ndarray, idx: np.ndarray) -> list[dict]:
    rows = []
    window = (0, 0, stack.height, stack.width)
    for name, params in METHODS.items():
        if params.mask == "segformer" and not _has_model_masks(stack, idx):
            rows.append({"method": name, "skipped": "no model masks (run `clearsky mask`)"})
            continue
        t0 = time.perf_counter()
        res = composite_window(stack, 0, window, params, idx)
        sc = composite_scores(res.values, reference, stack.bands)
        sc.update(
            method=name,
            fallback=float(res.fallback.mean()),
            seconds=round(time.perf_counter() - t0, 2),
        )
        rows.append(sc)
    return rows


def synthetic(data: Path) -> dict:
    path = data / f"{SYNTH_CELL}.zarr"
    stack = Stack.open(path)
    truth = read_truth(path)["composite"]
    idx = stack.complete_indices()
    return {
        "cell": SYNTH_CELL,
        "reference": "ground truth",
        "dates": len(idx),
        "rows": evaluate(stack, truth, idx),
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
    return {
        "cell": REAL_CELL,
        "reference": f"p25 of {len(held)} held-out clear dates, months {months}",
        "dates": len(keep),
        "rows": evaluate(stack, reference, keep),
    }


def print_table(res: dict) -> None:
    print(f"\n{res['cell']}  ({res['dates']} dates; reference: {res['reference']})")
    print(
        f"{'method':28} {'resid.cloud':>11} {'resid.shadow':>12} {'fallback':>9} "
        f"{'RMSE B02':>9} {'RMSE B04':>9} {'RMSE B08':>9} {'bias B02':>9}"
    )
    for r in res["rows"]:
        if "skipped" in r:
            print(f"{r['method']:28} skipped: {r['skipped']}")
            continue
        print(
            f"{r['method']:28} {r['residual_cloud']:>11.2%} {r['residual_shadow']:>12.2%} "
            f"{r['fallback']:>9.2%} {r['rmse']['B02']:>9.4f} {r['rmse']['B04']:>9.4f} "
            f"{r['rmse']['B08']:>9.4f} {r['bias']['B02']:>+9.4f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/demo"))
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args()
    build_demo(args.data)  # reuses what is built
    results = [synthetic(args.data), real(args.data)]
    for r in results:
        print_table(r)
    if args.json:
        print(json.dumps({"quality": results}))


if __name__ == "__main__":
    main()
