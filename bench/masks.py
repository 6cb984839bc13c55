"""Cloud mask benchmark: the SegFormer on real scenes it never saw, vs baselines; on truth; speed.

    .venv/bin/python bench/masks.py [--model PATH] [--baseline-model PATH] [--json]

0. Real samples (../shared/data, never trained on; 29RKH's eastern half never trained on): share
   of pixels called cloud / shadow per scene, at its own resolution and, for 10 m scenes, at
   20 m too (2x2 mean), against what is known: clear scenes must get <= 1 % cloud and <= 2 %
   shadow, the overcast ones >= 95 % cloud; 29RKH is scored against its SCL. Baselines:
   s2cloudless (13 L1C bands, where the scene has them), SCL (where it exists), and
   --baseline-model (e.g. an earlier model file).
0b. Broken cumulus over the real evaluation surfaces (never trained on): the simulator's cumulus
   fields (compositor.masks.cloudsim, fixed seeds) rendered over crops of wright clear and
   eo-learn 2-4 (not T31TDH: its cirrus band shows a thin cirrus veil over the whole clip),
   keeping draws with 5-45 % labelled cloud (a fair-weather cumulus scene).
   Cloud and shadow P/R/F1 against the simulator's exact labels, and "far false cloud": the share
   of clear pixels more than 300 m from any labelled cloud that the model calls cloud. That last
   figure does not depend on where the labels put a cloud's faint edge: it says whether clear
   ground between clouds stays clear (a model that reads a scene with clouds as a deck fails).
1. Synthetic cell (seed 0, the demo cell; never trained on) against its true cloud and shadow
   masks: precision, recall, F1, IoU of the model and of the SCL, at 20 m (the level the mask
   step writes; truth OR-pooled like the stack pools SCL) and at 10 m (the stored 20 m
   probabilities as the composite sees them at 10 m, nearest-upsampled).
2. Real Romania cube, the dates the model held out: agreement with SCL (no truth exists there).
3. CPU speed: seconds per megapixel, and the time for a full 5490 x 5490 scene at 20 m,
   extrapolated from a smaller run unless --full-scene.
4. Composite residual cloud/shadow against the true clear-sky composite with mask=none/scl/
   segformer (compositor.quality.composite_scores).

Classes are the argmax of (clear, cloud, shadow) probabilities.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compositor.masks.scl import CLASSES, IGNORE, scl_to_labels, truth_to_labels  # noqa: E402
from compositor.masks.train import confusion, scores_from_confusion  # noqa: E402
from compositor.stack import CLOUDPROB_SCALE, Stack  # noqa: E402

SCENE_20M = 5490  # pixels per side of a 109.8 km Sentinel-2 tile at 20 m
DEFAULT_ROMANIA = ROOT.parent / "shared/data/nrt-romania/sentinel2_cube_subset_romania_10m.nc"


def labels_from_prob(cp: np.ndarray) -> np.ndarray:
    """uint8 stored probabilities (T, 2, H, W) -> argmax labels (T, H, W)."""
    c = cp[:, 0].astype(np.int16)
    s = cp[:, 1].astype(np.int16)
    clear = int(CLOUDPROB_SCALE) - c - s
    out = np.zeros(c.shape, np.uint8)
    out[(c >= s) & (c > clear)] = 1
    out[(s > c) & (s > clear)] = 2
    return out


def any2x2(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[-2:]
    p = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, h % 2), (0, w % 2)])
    return p[..., ::2, ::2] | p[..., 1::2, ::2] | p[..., ::2, 1::2] | p[..., 1::2, 1::2]


def class_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    cm = np.zeros((3, 3), np.int64)
    for t in range(pred.shape[0]):
        cm += confusion(pred[t], target[t])
    return scores_from_confusion(cm)


CLEAR_MAX_CLOUD, CLEAR_MAX_SHADOW, OVERCAST_MIN_CLOUD = 0.01, 0.02, 0.95


def s2cloudless_mask(sample: Any, px: float) -> np.ndarray | None:
    """s2cloudless's cloud mask (its LightGBM model, offline) where 13 L1C bands exist."""
    if sample.l1c13 is None:
        return None
    try:
        from s2cloudless import S2PixelCloudDetector
    except ImportError:
        return None
    # Its recommended smoothing: average_over 22 / dilation 11 at 10 m, scaled with the pixel.
    k = max(1, round(10 / px * 22)), max(1, round(10 / px * 11))
    det = S2PixelCloudDetector(threshold=0.4, average_over=k[0], dilation_size=k[1], all_bands=True)
    x = np.nan_to_num(sample.l1c13).transpose(1, 2, 0)[None]
    return det.get_cloud_masks(x)[0].astype(bool)


def _shares(cls: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    n = max(int(valid.sum()), 1)
    return float(((cls == 1) & valid).sum() / n), float(((cls == 2) & valid).sum() / n)


def real_samples_eval(models: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (sample, resolution, method): cloud and shadow shares, and the verdict."""
    from scipy import ndimage

    from compositor.masks import samples
    from compositor.masks.predict import classes, cloud_probabilities

    rows: list[dict[str, Any]] = []
    for smp in samples.evaluation_samples():
        variants = [(smp.pixel_size, smp)]
        if smp.pixel_size <= 10:
            coarse = samples.RealSample(
                smp.name,
                smp.title,
                smp.level,
                smp.pixel_size * 2,
                samples.downsample(smp.bands, 2),
                smp.expect,
                l1c13=None if smp.l1c13 is None else samples.downsample(smp.l1c13, 2),
            )
            variants.append((coarse.pixel_size, coarse))
        for px, v in variants:
            valid = v.valid
            x = np.nan_to_num(v.bands)
            methods: dict[str, np.ndarray] = {}
            for name, m in models.items():
                t = time.perf_counter()
                methods[name] = classes(cloud_probabilities(x, m))
                methods[name + "#s"] = np.array(time.perf_counter() - t)
            s2c = s2cloudless_mask(v, px)
            if s2c is not None:
                methods["s2cloudless"] = s2c.astype(np.uint8)
            if v.scl is not None:
                scl = np.zeros(v.scl.shape, np.uint8)
                scl[np.isin(v.scl, (8, 9, 10))] = 1
                scl[v.scl == 3] = 2
                methods["SCL"] = scl
            for name, cls in methods.items():
                if name.endswith("#s"):
                    continue
                cloud, shadow = _shares(cls, valid)
                row = {
                    "sample": v.name,
                    "level": v.level,
                    "pixel_m": round(px, 1),
                    "size": list(x.shape[1:]),
                    "expect": v.expect,
                    "method": name,
                    "cloud": cloud,
                    "shadow": shadow,
                }
                if name in models:
                    row["seconds"] = float(methods[name + "#s"])
                if v.expect == "clear":
                    row["pass"] = cloud <= CLEAR_MAX_CLOUD and shadow <= CLEAR_MAX_SHADOW
                elif v.expect == "overcast":
                    row["pass"] = cloud >= OVERCAST_MIN_CLOUD
                elif v.scl is not None and name != "SCL":
                    ref = np.isin(v.scl, (8, 9, 10))
                    ok = valid & (v.scl != 0)
                    pred = cls == 1
                    tp = int((pred & ref & ok).sum())
                    f1 = 2 * tp / max(int((pred & ok).sum() + (ref & ok).sum()), 1)
                    # False cloud over the desert: SCL clear, away (5 px) from any SCL cloud.
                    far = ok & ~ndimage.binary_dilation(ref | (v.scl == 3), iterations=5)
                    row["cloud_f1_vs_scl"] = f1
                    row["false_cloud"] = float((pred & far).sum() / max(int(far.sum()), 1))
                    row["pass"] = row["false_cloud"] <= CLEAR_MAX_CLOUD
                rows.append(row)
    return rows


# (sample, pool factor, patch px): 10 m and 20 m where the sample is large enough.
# T31TDH is left out: its cirrus band reads 0.02-0.04 everywhere (clear air ~0.001), a thin
# cirrus veil over the whole clip, which a model may rightly call cloud once clouds are near.
CUMULUS_CASES = (
    ("wright-clear", 1, 256),
    ("wright-clear", 2, 192),
    ("eolearn-2", 1, 96),
    ("eolearn-3", 1, 96),
    ("eolearn-4", 1, 96),
)
CUMULUS_DRAWS = 64  # draws per case; those with 5-45 % labelled cloud are scored
FAR_M = 300.0


def cumulus_eval(models: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows per (case, method) and an "all" row per method; see section 0b of the docstring."""
    import torch
    from scipy import ndimage

    from compositor.masks import samples
    from compositor.masks.cloudsim import SkyConfig, render
    from compositor.masks.predict import classes, cloud_probabilities

    rows: list[dict[str, Any]] = []
    totals: dict[str, list[Any]] = {m: [np.zeros((3, 3), np.int64), 0, 0] for m in models}
    for name, f, p in CUMULUS_CASES:
        try:
            smp = samples.load(name)
        except (FileNotFoundError, StopIteration, OSError):
            continue
        x = smp.bands if f == 1 else samples.downsample(smp.bands, f)
        _, h, w = x.shape
        rng = np.random.default_rng(123)
        crops = []
        for _ in range(CUMULUS_DRAWS):
            r, c = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
            crops.append(x[:, r : r + p, c : c + p])
        px = smp.pixel_size * f
        # L1C samples already hold an atmosphere: only the L2A-like residuals go on top.
        sky = SkyConfig(
            clear=0,
            cumulus=1,
            stratus=0,
            overcast=0,
            thin_deck=0,
            cirrus=0,
            mixed=0,
            cirrus_over=0,
            nodata=0,
            l1c=0.0 if smp.level == "L1C" else 0.45,
        )
        g = torch.Generator().manual_seed(7)
        obs, lab = render(torch.from_numpy(np.stack(crops)), torch.full((len(crops),), px), g, sky)
        obs, lab = obs.numpy(), lab.numpy()
        keep = [i for i in range(len(crops)) if 0.05 <= (lab[i] == 1).mean() <= 0.45]
        far = [ndimage.distance_transform_edt(lab[i] != 1) * px > FAR_M for i in keep]
        for mname, m in models.items():
            cm = np.zeros((3, 3), np.int64)
            far_fp = far_n = 0
            for i, fi in zip(keep, far, strict=True):
                pred = classes(cloud_probabilities(obs[i], m))
                cm += confusion(pred, lab[i])
                clear_far = fi & (lab[i] == 0)
                far_fp += int((clear_far & (pred == 1)).sum())
                far_n += int(clear_far.sum())
            t = totals[mname]
            t[0] += cm
            t[1] += far_fp
            t[2] += far_n
            rows.append(_cumulus_row(name, smp.level, px, len(keep), mname, cm, far_fp, far_n))
    for mname, (cm, far_fp, far_n) in totals.items():
        if cm.sum():
            rows.append(_cumulus_row("all", "", 0.0, 0, mname, cm, far_fp, far_n))
    return rows


def _cumulus_row(
    name: str, level: str, px: float, n: int, method: str, cm: np.ndarray, far_fp: int, far_n: int
) -> dict[str, Any]:
    sc = scores_from_confusion(cm)
    return {
        "sample": name,
        "level": level,
        "pixel_m": px,
        "scenes": n,
        "method": method,
        "cloud_share": float(cm[1].sum() / max(cm.sum(), 1)),
        **{
            f"{c}_{k}": sc[f"{c}_{k}"]
            for c in ("cloud", "shadow")
            for k in ("precision", "recall", "f1")
        },
        "far_false_cloud": far_fp / max(far_n, 1),
    }


def print_cumulus(rows: list[dict[str, Any]]) -> None:
    print(
        "\nBroken cumulus (5-45 % cover, simulated) over the real evaluation surfaces "
        "(never trained on), vs exact labels"
    )
    print(
        f"{'sample':13} {'lvl':3} {'px m':>4} {'n':>3} {'method':9} {'cloud':>6} "
        f"{'cloud P':>7} {'R':>5} {'F1':>5}  {'shad P':>6} {'R':>5} {'F1':>5}  far false cloud"
    )
    for r in rows:
        print(
            f"{r['sample']:13} {r['level']:3} {r['pixel_m']:>4.0f} {r['scenes']:>3} "
            f"{r['method']:9} {100 * r['cloud_share']:>5.1f}% "
            f"{r['cloud_precision']:>7.3f} {r['cloud_recall']:>5.3f} {r['cloud_f1']:>5.3f}  "
            f"{r['shadow_precision']:>6.3f} {r['shadow_recall']:>5.3f} {r['shadow_f1']:>5.3f}  "
            f"{100 * r['far_false_cloud']:>6.2f} %"
        )


def cirrus_band(rows_out: dict[str, float] | None = None) -> dict[str, float]:
    """Median B10 (1375 nm, the cirrus band) of every evaluation sample that has it: clear air
    reads ~0.001 there, Sen2Cor flags thin cirrus above ~0.012."""
    from compositor.masks import samples

    out = rows_out if rows_out is not None else {}
    for smp in samples.evaluation_samples():
        if smp.l1c13 is not None:
            out[smp.name] = float(np.nanmedian(smp.l1c13[samples.L1C_13.index("B10")]))
    return out


def print_real(rows: list[dict[str, Any]]) -> None:
    print("\nReal samples, never trained on: share of valid pixels called cloud / shadow")
    print(
        f"{'sample':13} {'lvl':3} {'px m':>5} {'size':>9} {'truth':8} {'method':12} "
        f"{'cloud':>7} {'shadow':>7}  {'vs SCL':>18}  verdict"
    )
    for r in rows:
        extra = ""
        if "cloud_f1_vs_scl" in r:
            extra = f"F1 {r['cloud_f1_vs_scl']:.2f} fc {r['false_cloud'] * 100:.2f}%"
        verdict = "" if "pass" not in r else ("ok" if r["pass"] else "FAIL")
        size = "x".join(str(v) for v in r["size"])
        print(
            f"{r['sample']:13} {r['level']:3} {r['pixel_m']:>5g} {size:>9} {r['expect']:8} "
            f"{r['method']:12} {r['cloud'] * 100:6.2f}% {r['shadow'] * 100:6.2f}%  "
            f"{extra:>18}  {verdict}"
        )


def synthetic_eval(
    stack_path: Path, level: int, model: Any
) -> tuple[dict[str, dict[str, float]], float]:
    """Scores of model and SCL against the truth at ``level`` and at 10 m."""
    from compositor.demo import read_truth
    from compositor.masks.predict import mask_stack

    rep = mask_stack(stack_path, level=level, model=model, progress=False)
    stack = Stack.open(stack_path)
    idx = stack.complete_indices()
    truth = read_truth(stack_path)
    out: dict[str, dict[str, float]] = {}
    for lv in sorted({0, level}):
        L = stack.levels[lv]
        data = stack.read(lv, (0, 0, L.height, L.width), idx, ("scl", "cloudprob"))
        cloud, shadow = truth["cloud"][idx], truth["shadow"][idx]
        for _ in range(lv):
            cloud, shadow = any2x2(cloud), any2x2(shadow)
        target = truth_to_labels(cloud, shadow)
        target[data["scl"] == 0] = IGNORE  # no data: neither truth nor SCL say anything
        res = f"{10 * 2**lv} m"
        scl = scl_to_labels(data["scl"])
        scl[scl == IGNORE] = 0
        out[f"SCL @ {res}"] = class_scores(scl, target)
        out[f"model @ {res}"] = class_scores(labels_from_prob(data["cloudprob"]), target)
    return out, rep.seconds


def real_eval(stack_path: Path, model: Any, heldout: list[str] | None) -> dict[str, Any]:
    from compositor.masks.predict import mask_stack

    rep = mask_stack(stack_path, model=model, progress=False)
    stack = Stack.open(stack_path)
    idx = stack.complete_indices()
    if heldout:
        idx = np.asarray([i for i in idx if stack.scenes[i].datetime[:10] in set(heldout)])
    L = stack.levels[rep.level]
    data = stack.read(rep.level, (0, 0, L.height, L.width), idx, ("scl", "cloudprob"))
    pred = labels_from_prob(data["cloudprob"])
    s: dict[str, Any] = class_scores(pred, scl_to_labels(data["scl"]))
    # Thin cirrus (10) is found by Sen2Cor in band B10, which the model does not get: score
    # again with those pixels left out to see how much of the disagreement it is.
    no_cirrus = scl_to_labels(data["scl"])
    no_cirrus[data["scl"] == 10] = IGNORE
    s["without_cirrus"] = class_scores(pred, no_cirrus)
    s["dates"] = float(len(idx))
    s["level"] = float(rep.level)
    return s


def speed(model: Any, side: int, full: bool) -> dict[str, float]:
    import torch

    from compositor.masks.predict import cloud_probabilities
    from compositor.synthetic import make_synthetic

    # A real-looking scene (synthetic clouds over land) tiled up to the measured size.
    syn = make_synthetic(seed=3, size=512, n_dates=1)
    base = syn.reflectance[0].astype(np.float32) / 10000.0
    n = SCENE_20M if full else side
    reps = -(-n // 512)
    x = np.tile(base, (1, reps, reps))[:, :n, :n].copy()
    cloud_probabilities(x[:, :512, :512], model)  # warm-up: first call allocates / picks kernels
    load = os.getloadavg()[0]
    t, c = time.perf_counter(), time.process_time()
    cloud_probabilities(x, model)
    sec, cpu = time.perf_counter() - t, time.process_time() - c
    mpx = n * n / 1e6
    per = sec / mpx
    return {
        "threads": float(torch.get_num_threads()),
        "load_average_1min": load,  # other processes on the machine slow the wall clock
        "measured_side_px": float(n),
        "measured_seconds": sec,
        "cpu_seconds": cpu,  # summed over threads: what the run costs on an idle machine
        "seconds_per_mpx": per,
        "cpu_seconds_per_mpx": cpu / mpx,
        "scene_20m_seconds": sec if full else per * SCENE_20M**2 / 1e6,
        "scene_20m_cpu_seconds": cpu * SCENE_20M**2 / 1e6 / mpx,
        "scene_20m_extrapolated": float(not full),
    }


def composite_eval(stack_path: Path) -> dict[str, dict[str, Any]]:
    from compositor.demo import read_truth
    from compositor.quality import composite_scores
    from compositor.tiling import ViewParams, composite_window

    stack = Stack.open(stack_path)
    ref = read_truth(stack_path)["composite"]
    out = {}
    for mask in ("none", "scl", "segformer"):
        t = time.perf_counter()
        res = composite_window(stack, 0, (0, 0, stack.height, stack.width), ViewParams(mask=mask))
        s = composite_scores(res.values, ref, stack.bands)
        s["seconds"] = time.perf_counter() - t
        out[mask] = s
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="model .safetensors (default: the shipped one)")
    ap.add_argument("--baseline-model", help="another model file to score beside it")
    ap.add_argument("--only-real", action="store_true", help="only the real-sample table")
    ap.add_argument("--seed", type=int, default=0, help="synthetic seed (never trained on)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--dates", type=int, default=64)
    ap.add_argument("--level", type=int, default=1, help="level the masks are predicted at")
    ap.add_argument("--romania", default=os.environ.get("CLEARSKY_ROMANIA_NC", DEFAULT_ROMANIA))
    ap.add_argument("--speed-side", type=int, default=2048, help="side of the timed array (px)")
    ap.add_argument("--full-scene", action="store_true", help="time a real 5490 x 5490 array")
    ap.add_argument("--work", help="directory for the evaluation stacks (default: temporary)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args(argv)

    from compositor.demo import build_real, build_synthetic
    from compositor.masks.model import load_model

    model = load_model(args.model)
    meta = model.meta
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-masks-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"model": model.source, "parameters": model.n_parameters}
    trained_seeds = {d.get("source") for d in meta.get("data", [])}
    if any(f"seed={args.seed})" in (s or "") for s in trained_seeds):
        print(f"WARNING: the model was trained on synthetic seed {args.seed}", file=sys.stderr)

    # 0. real samples
    models = {"model": model}
    if args.baseline_model:
        models["baseline"] = load_model(args.baseline_model)
    rows = real_samples_eval(models)
    result["real_samples"] = rows
    print_real(rows)
    b10 = cirrus_band()
    result["cirrus_band_median"] = b10
    print(
        "Cirrus band (B10) median reflectance, clear air ~0.001, thin cirrus > ~0.012: "
        + ", ".join(f"{k} {v:.4f}" for k, v in b10.items())
    )
    cu = cumulus_eval(models)
    result["cumulus_over_real"] = cu
    print_cumulus(cu)
    if args.only_real:
        if args.json:
            print(json.dumps(result, default=float))
        return 0

    # 1. synthetic truth
    t = time.perf_counter()
    syn_dir = work / f"synthetic-{args.seed}-{args.size}-{args.dates}"
    syn_dir.mkdir(exist_ok=True)
    syn = build_synthetic(syn_dir, seed=args.seed, size=args.size, n_dates=args.dates)
    build_s = time.perf_counter() - t
    scores, mask_s = synthetic_eval(syn, args.level, model)
    result["synthetic"] = {
        "seed": args.seed,
        "size": args.size,
        "dates": args.dates,
        "scores": scores,
        "mask_seconds": mask_s,
        "build_seconds": build_s,
    }
    print(
        f"\nSynthetic cell seed={args.seed} {args.size}x{args.size} px x {args.dates} dates "
        f"vs TRUE masks (masks predicted at level {args.level}, {mask_s:.1f} s)"
    )
    print(
        f"{'':16} {'cloud P':>8} {'R':>6} {'F1':>6} {'IoU':>6}   "
        f"{'shadow P':>8} {'R':>6} {'F1':>6} {'IoU':>6}"
    )
    for name, s in scores.items():
        print(
            f"{name:16} "
            + " ".join(f"{s[f'cloud_{m}']:>6.3f}" for m in ("precision", "recall", "f1", "iou"))
            + "   "
            + " ".join(f"{s[f'shadow_{m}']:>6.3f}" for m in ("precision", "recall", "f1", "iou"))
        )

    # 2. real Romania, held-out dates
    nc = Path(args.romania)
    if nc.is_file():
        os.environ["CLEARSKY_ROMANIA_NC"] = str(nc)
        real_dir = work / "real"
        real_dir.mkdir(exist_ok=True)
        real = build_real(real_dir, real_dir / ".cache")
        heldout = next(
            (d["val_dates"] for d in meta.get("data", []) if d.get("kind") == "real"), None
        )
        r = real_eval(real, model, heldout)
        r["heldout_only"] = heldout is not None
        result["real"] = r
        which = "held-out dates" if heldout else "ALL dates (model has no held-out record)"
        print(
            f"\nReal Romania cube ({which}: {int(r['dates'])}), agreement with SCL "
            f"(level {int(r['level'])})"
        )
        for name, sc in (("all SCL classes", r), ("cirrus (10) left out", r["without_cirrus"])):
            print(
                f"{name:22} balanced accuracy {sc['balanced_accuracy']:.3f}  "
                + "  ".join(f"{c} F1 {sc[f'{c}_f1']:.3f}" for c in CLASSES)
            )
    else:
        print(f"\n(real cube {nc} absent: skipped)")

    # 3. speed
    sp = speed(model, args.speed_side, args.full_scene)
    result["speed"] = sp
    label = "measured" if args.full_scene else "EXTRAPOLATED"
    print(
        f"\nCPU speed ({int(sp['threads'])} threads, load average {sp['load_average_1min']:.1f}): "
        f"{sp['seconds_per_mpx']:.3f} s/Mpx wall, {sp['cpu_seconds_per_mpx']:.3f} CPU-s/Mpx "
        f"({int(sp['measured_side_px'])}^2 px in {sp['measured_seconds']:.1f} s)\n"
        f"full {SCENE_20M}x{SCENE_20M} scene at 20 m: {sp['scene_20m_seconds']:.1f} s wall, "
        f"{sp['scene_20m_cpu_seconds']:.1f} CPU-s ({label})"
    )

    # 4. composite
    comp = composite_eval(syn)
    result["composite"] = comp
    print("\nComposite (10 m, 25th percentile) vs the true clear-sky composite")
    print(f"{'mask':10} {'resid cloud':>12} {'resid shadow':>13} {'RMSE B04':>9} {'seconds':>8}")
    for m, s in comp.items():
        print(
            f"{m:10} {s['residual_cloud']:>12.4f} {s['residual_shadow']:>13.4f} "
            f"{s['rmse']['B04']:>9.4f} {s['seconds']:>8.1f}"
        )

    if args.json:
        print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
