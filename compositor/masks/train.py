"""Train the cloud/shadow SegFormer from stacks: patches, a class-balanced loss, held-out dates.

Labels per stack (``labels``):
- ``scl``: Sen2Cor's Scene Classification (cloud = 8, 9, 10; shadow = 3; ignore = 0, 1);
- ``truth``: the synthetic ground truth stored under ``truth/`` (only synthetic stacks have it);
- ``auto`` (default): the truth where a stack has it, else its SCL.

Whole dates are held out per stack for validation (never a random pixel split: neighbouring
pixels of one date are nearly copies of each other, and would flatter the scores).
Training is deterministic from ``seed`` (patch sampling, initialisation and dropout), resumable
from a checkpoint that also holds the random states, and runs on CUDA when there is one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compositor.masks.model import BANDS, CloudMaskModel, build_model, save_model
from compositor.masks.scl import CLASSES, IGNORE, scl_to_labels, truth_to_labels
from compositor.stack import Stack, StackError, downsample_reflectance, downsample_scl

log = logging.getLogger(__name__)

DN_SCALE = 10000.0
LABEL_MODES = ("auto", "scl", "truth")
# Seeds the benchmark (0, the demo cell) and the tests (7) evaluate on: never train on them.
EVAL_SEEDS = (0, 7)


@dataclass
class TrainConfig:
    steps: int = 2000
    batch: int = 8
    patch: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-2
    warmup: int = 100
    levels: tuple[int, ...] = (0, 1, 2)
    level_weights: tuple[float, ...] = (0.3, 0.5, 0.2)
    labels: str = "auto"
    scl_share: float = 0.25  # share of patches from SCL-labelled stacks when truth is mixed in
    val_fraction: float = 0.15
    val_scenes: int = 6  # per stack and level at each evaluation (whole scenes)
    dice_weight: float = 0.5
    seed: int = 0
    eval_every: int = 250
    checkpoint_every: int = 100
    segformer: dict[str, Any] = field(default_factory=dict)  # overrides of DEFAULT_SEGFORMER

    def __post_init__(self) -> None:
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, not {self.labels!r}")
        if len(self.level_weights) != len(self.levels):
            self.level_weights = tuple(1.0 for _ in self.levels)
        self.levels = tuple(int(v) for v in self.levels)
        self.level_weights = tuple(float(v) for v in self.level_weights)


@dataclass
class Source:
    """One stack at one level, split into training and validation dates."""

    name: str
    level: int
    kind: str  # 'truth' or 'scl': where the labels come from
    train_x: np.ndarray  # uint16 (T, 4, H, W) DN
    train_y: np.ndarray  # uint8 (T, H, W) labels
    val_x: np.ndarray
    val_y: np.ndarray
    val_dates: list[str] = field(default_factory=list)

    @property
    def pixels(self) -> int:
        return int(np.prod(self.train_y.shape))


@dataclass
class TrainResult:
    model: CloudMaskModel
    history: list[dict[str, Any]]
    seconds: float
    steps: int
    val: dict[str, Any]


# --------------------------------------------------------------------------- data


def _any2x2(a: np.ndarray) -> np.ndarray:
    """OR-pool a boolean (..., H, W) by 2 (coarse pixels keep every cloud, like the stack's SCL
    and probability pyramids)."""
    h, w = a.shape[-2:]
    p = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, h % 2), (0, w % 2)])
    return p[..., ::2, ::2] | p[..., 1::2, ::2] | p[..., ::2, 1::2] | p[..., 1::2, 1::2]


def _truth_at_level(path: Path, indices: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    from compositor.demo import read_truth

    t = read_truth(path)
    cloud, shadow = t["cloud"][indices], t["shadow"][indices]
    for _ in range(level):
        cloud, shadow = _any2x2(cloud), _any2x2(shadow)
    return cloud, shadow


def heldout_mask(stack: Stack, idx: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """bool per entry of ``idx``: the dates held out for validation. A seeded choice keyed by
    what the stack is (not its position in a list), so the benchmark finds the same dates."""
    ident = f"{stack.cell_id}:{stack.meta.get('seed')}:{stack.width}x{stack.height}"
    rng = np.random.default_rng([seed, zlib.crc32(ident.encode())])
    n_val = min(max(1, round(fraction * len(idx))), len(idx) - 1)
    is_val = np.zeros(len(idx), bool)
    is_val[rng.choice(len(idx), n_val, replace=False)] = True
    return is_val


def _read_level(stack: Stack, idx: np.ndarray, level: int) -> dict[str, np.ndarray]:
    """Reflectance and SCL of scenes ``idx`` at ``level``; levels coarser than the stack's own
    pyramid (a small stack stops at one chunk) are made with the stack's own downsampling, so
    a 1 km real stack still teaches the model what 20-40 m pixels look like."""
    top = min(level, len(stack.levels) - 1)
    lv = stack.levels[top]
    data = stack.read(top, (0, 0, lv.height, lv.width), idx, ("reflectance", "scl"))
    refl, scl = data["reflectance"], data["scl"]
    for _ in range(level - top):
        refl = downsample_reflectance(refl, stack.nodata)
        scl = np.stack([downsample_scl(s) for s in scl])
    return {"reflectance": refl, "scl": scl}


def load_sources(
    paths: Sequence[str | Path], cfg: TrainConfig
) -> tuple[list[Source], list[dict[str, Any]]]:
    """Read every stack at every training level; returns the sources and a description of the
    data (for the model card)."""
    sources: list[Source] = []
    described: list[dict[str, Any]] = []
    for p in paths:
        path = Path(p)
        stack = Stack.open(path)
        idx = stack.complete_indices()
        if len(idx) < 2:
            raise StackError(f"stack {path} has {len(idx)} complete scenes; need >= 2 to hold out")
        has_truth = (path / "truth").is_dir()
        kind = "truth" if cfg.labels == "truth" or (cfg.labels == "auto" and has_truth) else "scl"
        if kind == "truth" and not has_truth:
            raise StackError(f"stack {path} has no truth/ (labels=truth needs synthetic stacks)")
        is_val = heldout_mask(stack, idx, cfg.seed, cfg.val_fraction)
        band_idx = [stack.bands.index(b) for b in BANDS]
        for level in cfg.levels:
            data = _read_level(stack, idx, level)
            x = data["reflectance"][:, band_idx]
            if kind == "truth":
                y = truth_to_labels(*_truth_at_level(path, idx, level))
            else:
                y = scl_to_labels(data["scl"])
            y[x[:, 0] == stack.nodata] = IGNORE
            y[data["scl"] == 0] = IGNORE
            if (y[~is_val] == IGNORE).all():
                raise StackError(f"stack {path} level {level}: no labelled pixel (all no data)")
            sources.append(
                Source(
                    name=f"{path.parent.name}/{path.name}",
                    level=level,
                    kind=kind,
                    train_x=np.ascontiguousarray(x[~is_val]),
                    train_y=np.ascontiguousarray(y[~is_val]),
                    val_x=np.ascontiguousarray(x[is_val]),
                    val_y=np.ascontiguousarray(y[is_val]),
                    val_dates=[stack.scenes[i].datetime[:10] for i in idx[is_val]],
                )
            )
        described.append(
            {
                "stack": str(path),
                "cell": stack.cell_id,
                "kind": stack.meta.get("kind"),
                "source": stack.meta.get("source"),
                "labels": kind,
                "size": [stack.width, stack.height],
                "scenes": len(idx),
                "val_dates": [stack.scenes[i].datetime[:10] for i in idx[is_val]],
            }
        )
    if not sources:
        raise StackError("no training data: no stack has any of the requested levels")
    return sources, described


def _source_weights(sources: list[Source], cfg: TrainConfig) -> np.ndarray:
    """Sampling weight per source: kinds share as configured, then stacks equally, then levels
    by ``level_weights``."""
    lw = dict(zip(cfg.levels, cfg.level_weights, strict=True))
    kinds = sorted({s.kind for s in sources})
    share = {"scl": cfg.scl_share, "truth": 1 - cfg.scl_share} if len(kinds) == 2 else {kinds[0]: 1}
    w = np.zeros(len(sources))
    for kind in kinds:
        members = [i for i, s in enumerate(sources) if s.kind == kind]
        names = sorted({sources[i].name for i in members})
        for name in names:
            mine = [i for i in members if sources[i].name == name]
            tot = sum(lw[sources[i].level] for i in mine)
            for i in mine:
                w[i] = share[kind] / len(names) * lw[sources[i].level] / tot
    return w / w.sum()


def _sample_batch(
    sources: list[Source], weights: np.ndarray, cfg: TrainConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    p = cfg.patch
    xb = np.empty((cfg.batch, len(BANDS), p, p), np.float32)
    yb = np.full((cfg.batch, p, p), IGNORE, np.uint8)
    for b in range(cfg.batch):
        s = sources[rng.choice(len(sources), p=weights)]
        t = rng.integers(s.train_y.shape[0])
        h, w = s.train_y.shape[1:]
        ph, pw = min(p, h), min(p, w)
        r, c = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        x = s.train_x[t, :, r : r + ph, c : c + pw].astype(np.float32) / DN_SCALE
        y = s.train_y[t, r : r + ph, c : c + pw]
        # Augment: the 8 flips/rotations, and a brightness gain (calibration, season, haze).
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        x = x * np.float32(rng.uniform(0.9, 1.1)) * rng.uniform(0.97, 1.03, (4, 1, 1))
        hh, ww = y.shape
        if (hh, ww) != (p, p):  # stacks smaller than a patch: mirror the image, ignore labels
            x = np.pad(x, ((0, 0), (0, p - hh), (0, p - ww)), mode="symmetric")
        xb[b] = x
        yb[b, :hh, :ww] = y
    return xb, yb


def _class_weights(sources: list[Source], weights: np.ndarray) -> np.ndarray:
    """Inverse square-root class frequency as the sampler sees it: lifts the rare shadow class
    without letting a handful of shadow pixels dominate."""
    freq = np.zeros(len(CLASSES))
    for s, w in zip(sources, weights, strict=True):
        counts = np.bincount(s.train_y[:, ::4, ::4].ravel(), minlength=256)[: len(CLASSES)]
        if counts.sum():
            freq += w * counts / counts.sum()
    freq = np.maximum(freq / freq.sum(), 1e-3)
    cw = freq**-0.5
    return cw / (cw * freq).sum()


def _input_stats(sources: list[Source]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and std of the training reflectance (a sparse sample, no-data left out)."""
    nb = len(BANDS)
    xs = [s.train_x[:, :, ::8, ::8].transpose(1, 0, 2, 3).reshape(nb, -1) for s in sources]
    x = np.concatenate(xs, axis=1)
    x = np.clip(x[:, x[0] > 0].astype(np.float64) / DN_SCALE, 0, 2)
    return tuple(float(v) for v in x.mean(axis=1)), tuple(float(v) for v in x.std(axis=1) + 1e-3)


def loss_fn(
    logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor, dice_weight: float
) -> torch.Tensor:
    """Class-weighted cross-entropy + soft Dice over cloud and shadow (Dice scores overlap, so a
    rare class counts as much as a common one)."""
    ce = F.cross_entropy(logits, target, weight=class_weights, ignore_index=IGNORE)
    if dice_weight <= 0:
        return ce
    valid = (target != IGNORE).unsqueeze(1)
    prob = torch.softmax(logits, dim=1) * valid
    onehot = F.one_hot(torch.where(valid[:, 0], target, 0), len(CLASSES)).permute(0, 3, 1, 2)
    onehot = onehot * valid
    inter = (prob * onehot).sum(dim=(0, 2, 3))[1:]
    denom = (prob + onehot).sum(dim=(0, 2, 3))[1:]
    dice = 1 - (2 * inter + 1) / (denom + 1)
    return ce + dice_weight * dice.mean()


# --------------------------------------------------------------------------- evaluation


def confusion(pred: np.ndarray, target: np.ndarray, n: int = len(CLASSES)) -> np.ndarray:
    """(n, n) counts [true, predicted] over pixels whose target is not IGNORE."""
    ok = target != IGNORE
    return np.bincount(target[ok].astype(np.int64) * n + pred[ok], minlength=n * n).reshape(n, n)


def scores_from_confusion(cm: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    recalls = []
    for c, name in enumerate(CLASSES):
        tp = float(cm[c, c])
        fp = float(cm[:, c].sum() - tp)
        fn = float(cm[c, :].sum() - tp)
        prec = tp / max(tp + fp, 1.0)
        rec = tp / max(tp + fn, 1.0)
        out[f"{name}_precision"] = prec
        out[f"{name}_recall"] = rec
        out[f"{name}_f1"] = 2 * prec * rec / max(prec + rec, 1e-12)
        out[f"{name}_iou"] = tp / max(tp + fp + fn, 1.0)
        if cm[c, :].sum():
            recalls.append(rec)
    out["balanced_accuracy"] = float(np.mean(recalls)) if recalls else 0.0
    out["pixels"] = float(cm.sum())
    return out


def evaluate(
    model: CloudMaskModel, sources: list[Source], max_scenes: int | None = None
) -> dict[str, Any]:
    """Scores on the held-out dates, per label kind and level (argmax class)."""
    from compositor.masks.predict import _predict_array

    was_training = model.training
    model.eval()
    cms: dict[str, np.ndarray] = {}
    for s in sources:
        n = s.val_y.shape[0] if max_scenes is None else min(max_scenes, s.val_y.shape[0])
        for t in range(n):
            x = s.val_x[t].astype(np.float32) / DN_SCALE
            pred = _predict_array(model, x, 512, 32).argmax(axis=0).astype(np.uint8)
            cm = confusion(pred, s.val_y[t])
            for key in (s.kind, f"{s.kind}/L{s.level}"):
                cms[key] = cms.get(key, 0) + cm
    model.train(was_training)
    return {k: scores_from_confusion(v) for k, v in sorted(cms.items())}


# --------------------------------------------------------------------------- training


def _data_names(stacks: Sequence[str | Path]) -> list[str]:
    # Folder/name, not the full path: a resumed run may build its stacks in a new temp dir.
    return [f"{Path(s).parent.name}/{Path(s).name}" for s in stacks]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    prog = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    stacks: Sequence[str | Path],
    cfg: TrainConfig | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train a model on ``stacks``; returns it with the training history and validation scores.

    checkpoint: where to save progress every ``cfg.checkpoint_every`` steps; with ``resume`` an
    existing checkpoint (same config) continues bit-for-bit where it stopped.
    """
    from tqdm import tqdm

    cfg = cfg or TrainConfig()
    device = _device()
    sources, described = load_sources(stacks, cfg)
    weights = _source_weights(sources, cfg)
    mean, std = _input_stats(sources)
    cw = _class_weights(sources, weights)
    log.info(
        "training on %d stacks (%d sources, %.1f Mpx of training dates), device %s, "
        "class weights %s",
        len(described),
        len(sources),
        sum(s.pixels for s in sources) / 1e6,
        device,
        np.round(cw, 3).tolist(),
    )

    model = build_model(cfg.segformer, mean=mean, std=std, seed=cfg.seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    rng = np.random.default_rng(cfg.seed)
    history: list[dict[str, Any]] = []
    start, elapsed_before = 0, 0.0
    ckpt_path = Path(checkpoint) if checkpoint else None
    if resume and ckpt_path and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck["config"] != asdict(cfg) or ck["stacks"] != _data_names(stacks):
            raise ValueError(
                f"checkpoint {ckpt_path} was made with another config or data; "
                "start over without --resume or use the same options"
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        rng.bit_generator.state = ck["np_rng"]
        torch.set_rng_state(ck["torch_rng"])
        start, history, elapsed_before = ck["step"], ck["history"], ck["seconds"]
        log.info("resumed from %s at step %d", ckpt_path, start)
    cw_t = torch.tensor(cw, dtype=torch.float32, device=device)

    def save_checkpoint(step: int, seconds: float) -> None:
        if ckpt_path is None:
            return
        _atomic_torch_save(
            {
                "step": step,
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "np_rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "config": asdict(cfg),
                "stacks": _data_names(stacks),
                "history": history,
                "seconds": seconds,
            },
            ckpt_path,
        )

    model.train()
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, cfg.steps), desc="train", disable=not progress, initial=start, total=cfg.steps
    )
    running = None
    for step in bar:
        xb, yb = _sample_batch(sources, weights, cfg, rng)
        x = torch.from_numpy(xb).to(device)
        y = torch.from_numpy(yb.astype(np.int64)).to(device)
        loss = loss_fn(model(x), y, cw_t, cfg.dice_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        lv = float(loss.detach())
        running = lv if running is None else 0.95 * running + 0.05 * lv
        bar.set_postfix(loss=f"{running:.3f}")
        done = step + 1
        entry: dict[str, Any] = {"step": done, "loss": lv}
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val = evaluate(model, sources, cfg.val_scenes)
            entry["val"] = {
                k: {m: round(v[m], 4) for m in ("cloud_f1", "shadow_f1", "balanced_accuracy")}
                for k, v in val.items()
            }
            log.info("step %d loss %.4f val %s", done, running, json.dumps(entry["val"]))
        history.append(entry)
        if on_log:
            on_log(entry)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(done, elapsed_before + time.perf_counter() - t0)
    bar.close()
    seconds = elapsed_before + time.perf_counter() - t0
    model.eval()
    val = evaluate(model, sources)  # every held-out scene, once at the end
    model.meta = {
        "trained_steps": cfg.steps,
        "train_seconds": round(seconds, 1),
        "device": str(device),
        "torch": torch.__version__,
        "config": asdict(cfg),
        "data": described,
        "class_weights": [round(float(v), 4) for v in cw],
        "validation": {k: {m: round(x, 4) for m, x in v.items()} for k, v in val.items()},
    }
    return TrainResult(
        model=model.cpu(), history=history, seconds=seconds, steps=cfg.steps, val=val
    )


def train_and_save(
    stacks: Sequence[str | Path],
    out: str | Path,
    cfg: TrainConfig | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> TrainResult:
    result = train(stacks, cfg, checkpoint, resume, progress)
    if command:
        result.model.meta["command"] = command
    save_model(result.model, out)
    return result


def parse_seeds(spec: str) -> list[int]:
    """'101-104,110' -> [101, 102, 103, 104, 110]."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "-" in part:
            a, b = (int(v) for v in part.split("-", 1))
            seeds.extend(range(a, b + 1))
        else:
            seeds.append(int(part))
    return seeds


def build_training_stacks(
    workdir: str | Path,
    synthetic_seeds: Sequence[int] = (),
    synthetic_size: int = 512,
    synthetic_dates: int = 32,
    real: bool = False,
) -> list[Path]:
    """Build synthetic cells (one per seed) and/or the real Romania cell under ``workdir``,
    reusing any already built there. Returns their stack paths."""
    from compositor.demo import _complete, build_real, build_synthetic

    workdir = Path(workdir)
    paths: list[Path] = []
    bad = sorted(set(synthetic_seeds) & set(EVAL_SEEDS))
    if bad:
        log.warning("training on seeds %s that the benchmark/tests evaluate on", bad)
    # Key built cells by the generator's source too: a changed generator must not reuse them.
    import compositor.synthetic as synthetic_module

    gen = hashlib.sha256(Path(synthetic_module.__file__).read_bytes()).hexdigest()[:8]
    for seed in synthetic_seeds:
        d = workdir / f"synthetic-{seed}-{synthetic_size}-{synthetic_dates}-{gen}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / "49NDB.zarr"
        if not (path.exists() and _complete(path)):
            log.info("building synthetic training cell seed=%d in %s", seed, d)
            path = build_synthetic(d, seed=seed, size=synthetic_size, n_dates=synthetic_dates)
        paths.append(path)
    if real:
        d = workdir / "real"
        d.mkdir(parents=True, exist_ok=True)
        path = d / "34TER.zarr"
        if not (path.exists() and _complete(path)):
            log.info("building the real Romania cell in %s", d)
            path = build_real(d, workdir / ".cache")
        paths.append(path)
    return paths
