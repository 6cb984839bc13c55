"""Train the cloud/shadow SegFormer: clear surfaces under simulated skies, plus labelled scenes.

Each batch mixes two kinds of patch (:class:`TrainConfig.sim_share`):

- a crop of a clear surface (real clear looks, procedural landscapes, synthetic Borneo) at a
  random pixel size of 10 m to 1 km, with clouds, shadows, atmosphere and sensor effects
  rendered over it by :mod:`compositor.masks.cloudsim` (exact labels);
- a crop of a labelled scene (the real Romania cube with Sen2Cor's SCL, synthetic cells with
  their truth, a user's prefetched stacks with SCL), given the same atmosphere (L2A-like or
  L1C-like) but no added clouds: real clouds, imperfect labels.

Whole dates are held out per labelled stack for validation (never a random pixel split).
Training is deterministic from ``seed`` on a given device, resumable from a checkpoint that also
holds the random states, and runs on CUDA when there is one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compositor.masks.cloudsim import SkyConfig, render
from compositor.masks.model import (
    BANDS,
    LOG_EPS,
    CloudMaskModel,
    build_model,
    make_features,
    save_model,
)
from compositor.masks.scl import CLASSES, IGNORE
from compositor.masks.trainset import Bank, Labelled, Surface, bank_digest

log = logging.getLogger(__name__)

DN_SCALE = 10000.0


@dataclass
class TrainConfig:
    steps: int = 2000
    batch: int = 8
    patch: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-2
    warmup: int = 100
    levels: tuple[int, ...] = (0, 1, 2)  # labelled stacks: levels sampled (10, 20, 40 m)
    level_weights: tuple[float, ...] = (0.3, 0.5, 0.2)
    sim_share: float = 0.6  # share of patches from clear surfaces with simulated skies
    # Sampling share of the surface groups (renormalised over the groups present).
    real_share: float = 0.35
    procedural_share: float = 0.45
    synthetic_share: float = 0.2
    scl_share: float = 0.6  # among labelled patches: share from SCL-labelled (vs truth) scenes
    pixel_sizes: tuple[float, ...] = (10, 20, 30, 60, 100, 200, 500)
    pixel_weights: tuple[float, ...] = (0.25, 0.33, 0.08, 0.16, 0.08, 0.06, 0.04)
    val_fraction: float = 0.15
    val_scenes: int = 4  # per labelled source at each evaluation (whole scenes)
    val_sim: int = 96  # simulated validation patches (fixed)
    dice_weight: float = 0.5
    seed: int = 0
    eval_every: int = 500
    checkpoint_every: int = 100
    features: str = "linear+log"
    segformer: dict[str, Any] = field(default_factory=dict)  # overrides of DEFAULT_SEGFORMER
    sky: dict[str, float] = field(default_factory=dict)  # overrides of cloudsim.SkyConfig
    # Fine-tune: start from this model file's weights, normalisation, features and config.
    init: str = ""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch < 1 or self.patch < 64:
            raise ValueError(f"batch must be >= 1 and patch >= 64, got {self.batch}, {self.patch}")
        if not 0 <= self.sim_share <= 1 or not 0 <= self.scl_share <= 1:
            raise ValueError("sim_share and scl_share must be within 0..1")
        if len(self.level_weights) != len(self.levels):
            self.level_weights = tuple(1.0 for _ in self.levels)
        if len(self.pixel_weights) != len(self.pixel_sizes):
            raise ValueError("pixel_weights must have one weight per pixel size")
        self.levels = tuple(int(v) for v in self.levels)
        self.level_weights = tuple(float(v) for v in self.level_weights)
        self.pixel_sizes = tuple(float(v) for v in self.pixel_sizes)
        self.pixel_weights = tuple(float(v) for v in self.pixel_weights)
        try:
            SkyConfig(**self.sky)  # unknown keys fail here, not mid-run
        except TypeError:
            known = ", ".join(SkyConfig.__dataclass_fields__)
            raise ValueError(f"sky takes {known}; got {sorted(self.sky)}") from None


@dataclass
class TrainResult:
    model: CloudMaskModel
    history: list[dict[str, Any]]
    seconds: float
    steps: int
    val: dict[str, Any]


# --------------------------------------------------------------------------- sampling


class Sampler:
    """Draws training batches from a :class:`Bank` (numpy side: crops, resampling, flips)."""

    def __init__(self, bank: Bank, cfg: TrainConfig):
        self.bank, self.cfg = bank, cfg
        shares = {
            "real": cfg.real_share,
            "procedural": cfg.procedural_share,
            "synthetic": cfg.synthetic_share,
        }
        groups = sorted({s.group for s in bank.surfaces})
        w = np.array(
            [
                shares.get(s.group, 0.0) / sum(x.group == s.group for x in bank.surfaces)
                for s in bank.surfaces
            ]
        )
        self.surface_p = w / w.sum() if w.sum() > 0 else None
        if self.surface_p is None and bank.surfaces:
            self.surface_p = np.full(len(bank.surfaces), 1 / len(bank.surfaces))
        self.groups = groups
        lw = dict(zip(cfg.levels, cfg.level_weights, strict=True))
        kinds = sorted({lab.kind for lab in bank.labelled})
        kshare = (
            {"scl": cfg.scl_share, "truth": 1 - cfg.scl_share}
            if len(kinds) == 2
            else {k: 1.0 for k in kinds}
        )
        lp = []
        for lab in bank.labelled:
            level = int(round(math.log2(max(lab.pixel_size, 10.0) / 10.0)))
            members = [x for x in bank.labelled if x.kind == lab.kind]
            stacks = {x.name.rsplit("/", 1)[0] for x in members}
            mine = [x for x in members if x.name.rsplit("/", 1)[0] == lab.name.rsplit("/", 1)[0]]
            tot = sum(
                lw.get(int(round(math.log2(max(x.pixel_size, 10.0) / 10.0))), 1.0) for x in mine
            )
            lp.append(kshare[lab.kind] / len(stacks) * lw.get(level, 1.0) / tot)
        self.labelled_p = np.array(lp) / np.sum(lp) if lp else None
        self._pyramids: dict[str, dict[float, np.ndarray]] = {}
        self._has_nan: set[str] = set()
        # Cumulative weights: one searchsorted per draw instead of rng.choice's O(n) set-up.
        self._surface_cdf = _cdf(self.surface_p)
        self._labelled_cdf = _cdf(self.labelled_p)

    def batch(self, rng: np.random.Generator, n: int | None = None) -> Batch:
        """n patches: reflectance, pixel size, whether skies are simulated, the scene's labels
        (IGNORE for simulated patches) and the augmentation to apply on the device."""
        cfg = self.cfg
        n = n or cfg.batch
        p = cfg.patch
        xs = np.empty((n, len(BANDS), p, p), np.float32)
        ys = np.full((n, p, p), IGNORE, np.uint8)
        px = np.zeros(n, np.float32)
        sim = np.zeros(n, bool)
        aug = np.empty((n, 2 + len(BANDS)), np.float32)
        for i in range(n):
            use_sim = self.labelled_p is None or (
                self.surface_p is not None and rng.random() < cfg.sim_share
            )
            if use_sim:
                s = self.bank.surfaces[int(np.searchsorted(self._surface_cdf, rng.random()))]
                xs[i], px[i] = self._surface_patch(s, rng)
                sim[i] = True
                # Illumination / season / calibration: a common gain, a little per band.
                gain = rng.uniform(0.8, 1.25) * rng.uniform(0.94, 1.06, len(BANDS))
            else:
                j = int(np.searchsorted(self._labelled_cdf, rng.random()))
                lab = self.bank.labelled[j]
                self._labelled_patch(lab, rng, xs[i], ys[i])
                px[i] = lab.pixel_size
                gain = rng.uniform(0.9, 1.1) * rng.uniform(0.97, 1.03, len(BANDS))
            aug[i, 0] = rng.integers(4)  # quarter turns
            aug[i, 1] = rng.random() < 0.5  # mirror
            aug[i, 2:] = gain
        return Batch(xs, px, sim, ys, aug)

    def _pyramid(self, s: Surface) -> dict[float, np.ndarray]:
        """The surface resampled (area mean, NaN-aware) to every training pixel size at or
        above its own whose extent is at least half a patch (crops mirror at most 2x)."""
        out: dict[float, np.ndarray] = {}
        h, w = s.x.shape[1:]
        base = torch.from_numpy(s.x.astype(np.float32))[None]
        bad = torch.isnan(base[:, :1]).float()
        clean = torch.nan_to_num(base)
        for t in self.cfg.pixel_sizes:
            f = t / s.pixel_size
            if f < 0.99:
                continue
            size = (max(1, int(round(h / f))), max(1, int(round(w / f))))
            if 2 * min(size) < self.cfg.patch and out:
                break
            if size == (h, w):
                out[t] = s.x.astype(np.float32)
                continue
            val = F.interpolate(clean, size=size, mode="area")
            frac = F.interpolate(bad, size=size, mode="area")
            lv = (val / (1 - frac).clamp(min=1e-6))[0].numpy()
            lv[:, frac[0, 0].numpy() > 0.5] = np.nan
            out[t] = lv
        return out

    def _surface_patch(self, s: Surface, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        cfg, p = self.cfg, self.cfg.patch
        pyr = self._pyramids.get(s.name)
        if pyr is None:
            pyr = self._pyramids[s.name] = self._pyramid(s)
            if np.isnan(s.x[0]).any():
                self._has_nan.add(s.name)
        sizes = list(pyr)
        wts = np.array(
            [dict(zip(cfg.pixel_sizes, cfg.pixel_weights, strict=True))[t] for t in sizes]
        )
        t = sizes[int(rng.choice(len(sizes), p=wts / wts.sum()))]
        a = pyr[t]
        h, w = a.shape[1:]
        has_nan = s.name in self._has_nan
        for _ in range(6):
            r = int(rng.integers(0, max(0, h - p) + 1))
            c = int(rng.integers(0, max(0, w - p) + 1))
            crop = a[:, r : r + p, c : c + p]
            if not has_nan or np.isnan(crop[0]).mean() < 0.3:
                break
        if crop.shape[1:] != (p, p):
            crop = np.pad(
                crop, ((0, 0), (0, p - crop.shape[1]), (0, p - crop.shape[2])), mode="symmetric"
            )
        return crop, float(t)

    def _labelled_patch(
        self, lab: Labelled, rng: np.random.Generator, x_out: np.ndarray, y_out: np.ndarray
    ) -> None:
        p = self.cfg.patch
        t = int(rng.integers(lab.train_y.shape[0]))
        h, w = lab.train_y.shape[1:]
        ph, pw = min(p, h), min(p, w)
        r, c = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        x = lab.train_x[t, :, r : r + ph, c : c + pw].astype(np.float32) / DN_SCALE
        y_out[:ph, :pw] = lab.train_y[t, r : r + ph, c : c + pw]
        if (ph, pw) != (p, p):  # scenes smaller than a patch: mirror the image, ignore labels
            x = np.pad(x, ((0, 0), (0, p - ph), (0, p - pw)), mode="symmetric")
        x_out[:] = x


def _cdf(p: np.ndarray | None) -> np.ndarray:
    if p is None:
        return np.ones(1)
    c = np.cumsum(p)
    c[-1] = 1.0 + 1e-9  # a draw of 0.99999 never falls past the end
    return c


@dataclass
class Batch:
    x: np.ndarray  # float32 (n, 4, P, P) reflectance before augmentation
    pixel_size: np.ndarray  # float32 (n,) metres
    simulate: np.ndarray  # bool (n,) put simulated skies over it
    labels: np.ndarray  # uint8 (n, P, P) the scene's own labels (IGNORE if simulated)
    aug: np.ndarray  # float32 (n, 6): quarter turns, mirror, gain per band


class Prefetch:
    """Draws the sampler's batches in a background thread, in order (the numpy work overlaps
    the model's), recording the random state after each so a checkpoint can resume exactly."""

    def __init__(self, sampler: Sampler, rng: np.random.Generator, depth: int = 4):
        import queue
        import threading

        self.sampler, self.rng = sampler, rng
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.state_after: dict[str, Any] = rng.bit_generator.state  # of the last batch taken
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import queue

        while not self._stop.is_set():
            try:
                item = (self.sampler.batch(self.rng), self.rng.bit_generator.state)
            except Exception as exc:  # surfaced in the training thread
                item = (exc, None)
            while not self._stop.is_set():
                try:
                    self.q.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if isinstance(item[0], Exception):
                return

    def next(self) -> Batch:
        batch, state = self.q.get()
        if isinstance(batch, Exception):
            raise batch
        self.state_after = state
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def render_batch(
    batch: Batch, gen: torch.Generator, device: torch.device, sky: SkyConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch on ``device`` (turns, mirror, gain: batched) and render its skies."""
    x = torch.from_numpy(batch.x).to(device)
    y = torch.from_numpy(batch.labels.astype(np.int64)).to(device)
    aug = torch.from_numpy(batch.aug).to(device)
    x = x * aug[:, 2:].view(-1, len(BANDS), 1, 1)
    turns, mirror = aug[:, 0].long(), aug[:, 1] > 0.5
    for k in range(4):
        for m in (False, True):
            sel = (turns == k) & (mirror == m)
            if not bool(sel.any()):
                continue
            xs, ys = torch.rot90(x[sel], k, (2, 3)), torch.rot90(y[sel], k, (1, 2))
            if m:
                xs, ys = xs.flip(3), ys.flip(2)
            x[sel], y[sel] = xs, ys
    return render(
        x,
        torch.from_numpy(batch.pixel_size).to(device),
        gen,
        sky,
        clouds=torch.from_numpy(batch.simulate).to(device),
        base_labels=y,
    )


def make_batch(
    sampler: Sampler,
    rng: np.random.Generator,
    gen: torch.Generator,
    device: torch.device,
    sky: SkyConfig,
    n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch on ``device``: (reflectance (n, 4, P, P), labels (n, P, P) int64)."""
    return render_batch(sampler.batch(rng, n), gen, device, sky)


# --------------------------------------------------------------------------- loss, scores


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
    model: CloudMaskModel,
    labelled: Sequence[Labelled],
    max_scenes: int | None = None,
    sim_val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Scores on the held-out dates, per label kind and level, and on the fixed simulated
    validation patches (argmax class)."""
    from compositor.masks.predict import _predict_array

    was_training = model.training
    model.eval()
    cms: dict[str, np.ndarray] = {}
    for lab in labelled:
        n = lab.val_y.shape[0] if max_scenes is None else min(max_scenes, lab.val_y.shape[0])
        level = lab.name.rsplit("/", 1)[-1]
        for t in range(n):
            x = lab.val_x[t].astype(np.float32) / DN_SCALE
            pred = _predict_array(model, x, 512, 32).argmax(axis=0).astype(np.uint8)
            cm = confusion(pred, lab.val_y[t])
            for key in (lab.kind, f"{lab.kind}/{level}"):
                cms[key] = cms.get(key, 0) + cm
    if sim_val is not None:
        x, y = sim_val
        with torch.inference_mode():
            pred = torch.cat([model(x[i : i + 16]).argmax(1) for i in range(0, len(x), 16)])
        cms["simulated"] = confusion(
            pred.cpu().numpy().astype(np.uint8), y.cpu().numpy().astype(np.uint8)
        )
    model.train(was_training)
    return {k: scores_from_confusion(v) for k, v in sorted(cms.items())}


# --------------------------------------------------------------------------- training


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


def _stats(
    x: torch.Tensor, y: torch.Tensor, features: str
) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """Per-channel mean/std of the model's input features (valid pixels) and class frequencies
    of a sample of training batches."""
    f = make_features(x, features)
    valid = (x > 0).any(dim=1)
    v = f.permute(1, 0, 2, 3)[:, valid].double()
    counts = torch.bincount(y[y != IGNORE].flatten(), minlength=len(CLASSES)).double()
    freq = (counts / counts.sum()).cpu().numpy()
    mean = tuple(float(m) for m in v.mean(dim=1))
    std = tuple(float(s) + 1e-3 for s in v.std(dim=1))
    return mean, std, freq


def _class_weights(freq: np.ndarray) -> np.ndarray:
    """Inverse square-root class frequency: lifts the rare shadow class without letting a
    handful of shadow pixels dominate."""
    freq = np.maximum(freq / freq.sum(), 1e-3)
    cw = freq**-0.5
    return cw / (cw * freq).sum()


def train(
    bank: Bank,
    cfg: TrainConfig | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    device: str | torch.device | None = None,
    max_minutes: float | None = None,
) -> TrainResult:
    """Train a model on ``bank``; returns it with the training history and validation scores.

    checkpoint: where to save progress every ``cfg.checkpoint_every`` steps; with ``resume`` an
    existing checkpoint (same config and data) continues bit for bit where it stopped.
    """
    from tqdm import tqdm

    cfg = cfg or TrainConfig()
    dev = torch.device(device) if device else _device()
    sky = SkyConfig(**cfg.sky)
    sampler = Sampler(bank, cfg)
    digest = bank_digest(bank)

    # Input normalisation, class weights and the fixed validation patches come from streams
    # of their own, so they do not depend on where a run resumes.
    rng0 = np.random.default_rng([cfg.seed, 1])
    gen0 = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
    xs, ys = zip(*(make_batch(sampler, rng0, gen0, dev, sky, 32) for _ in range(8)), strict=True)
    mean, std, freq = _stats(torch.cat(xs), torch.cat(ys), cfg.features)
    cw = _class_weights(freq)
    sim_val = None
    if bank.surfaces and cfg.val_sim > 0:
        rngv = np.random.default_rng([cfg.seed, 2])
        genv = torch.Generator(device=dev).manual_seed(cfg.seed + 2)
        keep = cfg.sim_share
        cfg.sim_share = 1.0  # validation patches are all simulated
        try:
            sim_val = make_batch(sampler, rngv, genv, dev, sky, cfg.val_sim)
        finally:
            cfg.sim_share = keep
    log.info(
        "training on %d surfaces and %d labelled sources, device %s, class frequencies %s, "
        "weights %s",
        len(bank.surfaces),
        len(bank.labelled),
        dev,
        np.round(freq, 3).tolist(),
        np.round(cw, 3).tolist(),
    )

    if cfg.init:
        from compositor.masks.model import load_model

        model = load_model(cfg.init, device=dev).train()
        init_from = {"path": cfg.init, "sha256": model.source.get("sha256", "")}
        model.source = {}  # a new model: its tag is its own weights' hash
        cfg.features, cfg.segformer = model.features, model.segformer_config()
    else:
        init_from = None
        model = build_model(
            cfg.segformer, mean=mean, std=std, seed=cfg.seed, features=cfg.features
        ).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    start, elapsed_before = 0, 0.0
    ckpt_path = Path(checkpoint) if checkpoint else None
    if resume and ckpt_path and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if ck["config"] != asdict(cfg) or ck["data"] != digest:
            raise ValueError(
                f"checkpoint {ckpt_path} was made with another config or data; "
                "start over without --resume or use the same options"
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        rng.bit_generator.state = ck["np_rng"]
        gen.set_state(ck["gen"].to("cpu") if dev.type == "cpu" else ck["gen"].cpu())
        torch.set_rng_state(ck["torch_rng"])
        start, history, elapsed_before = ck["step"], ck["history"], ck["seconds"]
        log.info("resumed from %s at step %d", ckpt_path, start)
    cw_t = torch.tensor(cw, dtype=torch.float32, device=dev)

    def save_checkpoint(step: int, seconds: float) -> None:
        if ckpt_path is None:
            return
        _atomic_torch_save(
            {
                "step": step,
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "np_rng": feed.state_after,
                "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "config": asdict(cfg),
                "data": digest,
                "history": history,
                "seconds": seconds,
            },
            ckpt_path,
        )

    model.train()
    feed = Prefetch(sampler, rng)
    t0 = time.perf_counter()
    deadline = t0 + max_minutes * 60 if max_minutes else None
    bar = tqdm(
        range(start, cfg.steps), desc="train", disable=not progress, initial=start, total=cfg.steps
    )
    running = None
    stopped_at = None
    try:
        for step in bar:
            x, y = render_batch(feed.next(), gen, dev, sky)
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
                val = evaluate(model, bank.labelled, cfg.val_scenes, sim_val)
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
            if deadline and time.perf_counter() > deadline and done < cfg.steps:
                # A safety net for a lent machine's time limit: keep what was learnt.
                save_checkpoint(done, elapsed_before + time.perf_counter() - t0)
                stopped_at = done
                log.warning("stopped at step %d of %d: --max-minutes reached", done, cfg.steps)
                break
    finally:
        feed.close()
        bar.close()
    seconds = elapsed_before + time.perf_counter() - t0
    model.eval()
    val = evaluate(model, bank.labelled, None, sim_val)  # every held-out scene, at the end
    model.meta = {
        "trained_steps": stopped_at or cfg.steps,
        "train_seconds": round(seconds, 1),
        "device": str(dev),
        "torch": torch.__version__,
        "config": asdict(cfg),
        "data": bank.described,
        "data_digest": digest,
        "class_frequencies": [round(float(v), 4) for v in freq],
        "class_weights": [round(float(v), 4) for v in cw],
        "validation": {k: {m: round(x, 4) for m, x in v.items()} for k, v in val.items()},
    }
    if init_from:
        model.meta["fine_tuned_from"] = init_from
    return TrainResult(
        model=model.cpu(), history=history, seconds=seconds, steps=cfg.steps, val=val
    )


def train_and_save(
    bank: Bank,
    out: str | Path,
    cfg: TrainConfig | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    device: str | None = None,
    max_minutes: float | None = None,
) -> TrainResult:
    result = train(bank, cfg, checkpoint, resume, progress, device=device, max_minutes=max_minutes)
    if command:
        result.model.meta["command"] = command
    save_model(result.model, out)
    return result


def parse_seeds(spec: str) -> list[int]:
    """'101-104,110' -> [101, 102, 103, 104, 110]; raises ValueError naming the bad part."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                if b < a:
                    raise ValueError
                seeds.extend(range(a, b + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ValueError(f"seeds are N or A-B separated by commas, got {part!r}") from None
    return seeds


__all__ = [
    "LOG_EPS",
    "TrainConfig",
    "TrainResult",
    "Sampler",
    "make_batch",
    "loss_fn",
    "confusion",
    "scores_from_confusion",
    "evaluate",
    "train",
    "train_and_save",
    "parse_seeds",
]
