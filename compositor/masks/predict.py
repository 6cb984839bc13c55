"""Cloud and shadow probabilities from the SegFormer: one array, or every scene of a stack.

The public entry point is :func:`cloud_probabilities` (kept stable); :func:`mask_stack` runs it
over a stack and stores the result as ``cloudprob`` (probability x 250, uint8) so that composites
with ``mask=segformer`` use it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compositor.masks.model import BANDS, DEFAULT_MODEL, CloudMaskModel, load_model

CLOUDPROB_SCALE = 250.0  # = compositor.stack.CLOUDPROB_SCALE (kept import-free: a GPU box
# training the model has torch but not the stack's zarr)

log = logging.getLogger(__name__)

DN_SCALE = 10000.0  # L2A DN per unit reflectance (the stack is harmonised at prefetch)
TILE = 512  # pixels per side of an inference tile's kept core
MARGIN = 32  # context on each side, predicted and thrown away: no seams at tile borders

_default_model: CloudMaskModel | None = None
_default_lock = threading.Lock()


def default_model() -> CloudMaskModel:
    """The shipped model, loaded once per process (offline; raises MaskModelError if absent)."""
    global _default_model
    with _default_lock:
        if _default_model is None:
            _default_model = load_model(DEFAULT_MODEL)
        return _default_model


def _pad_to(a: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """Pad (C, h, w) to (C, height, width) with ``top``/``left`` before; mirror, so the model
    sees plausible context instead of a black border it would call shadow."""
    h, w = a.shape[-2:]
    pad = ((0, 0), (top, height - h - top), (left, width - w - left))
    return np.pad(a, pad, mode="symmetric")


def _starts(n: int, tile: int) -> list[int]:
    """Tile origins along one axis: the last tile is moved back to end at the edge, so no tile
    is a thin sliver with little context (cores may overlap; they agree closely)."""
    if n <= tile:
        return [0]
    return [*range(0, n - tile, tile), n - tile]


def _fill_nodata(win: np.ndarray) -> np.ndarray:
    """No-data pixels (all bands 0) take their nearest valid pixel's values: a black gap next
    to real data looks like a shadow or water edge to the model (its output there is zeroed
    anyway). Only windows that hold no data pay for it."""
    nodata = ~(win != 0).any(axis=0)
    if not nodata.any() or nodata.all():
        return win
    from scipy import ndimage

    idx = ndimage.distance_transform_edt(nodata, return_distances=False, return_indices=True)
    return win[:, idx[0], idx[1]]


@torch.inference_mode()
def _predict_array(model: CloudMaskModel, x: np.ndarray, tile: int, margin: int) -> np.ndarray:
    """Softmax probabilities (3, H, W) of reflectance ``x`` (4, H, W), tile by tile: cores of
    ``tile`` px, each predicted with ``margin`` px of context around it."""
    _, h, w = x.shape
    device = next(model.parameters()).device
    align, min_side = model.align, model.min_input
    out = np.empty((3, h, w), np.float32)
    was_training = model.training
    model.eval()  # dropout off, batch-norm running statistics
    try:
        for r0 in _starts(h, tile):
            for c0 in _starts(w, tile):
                r1, c1 = min(r0 + tile, h), min(c0 + tile, w)
                top, left = min(margin, r0), min(margin, c0)
                rr1, cc1 = min(r1 + margin, h), min(c1 + margin, w)
                win = _fill_nodata(x[:, r0 - top : rr1, c0 - left : cc1])
                ph = max(-(-win.shape[1] // align) * align, min_side)
                pw = max(-(-win.shape[2] // align) * align, min_side)
                if (ph, pw) != win.shape[1:]:
                    win = _pad_to(win, 0, 0, ph, pw)
                t = torch.from_numpy(np.ascontiguousarray(win))[None].to(device)
                p = torch.softmax(model(t), dim=1)[0].cpu().numpy()
                out[:, r0:r1, c0:c1] = p[:, top : top + (r1 - r0), left : left + (c1 - c0)]
    finally:
        model.train(was_training)
    return out


def cloud_probabilities(
    bands: np.ndarray,
    model: CloudMaskModel | None = None,
    tile: int = TILE,
    margin: int = MARGIN,
) -> np.ndarray:
    """Probability of cloud and of cloud shadow per pixel.

    bands: float32 (4, H, W) surface reflectance of B02, B03, B04, B08 in 0..1 (DN / 10000),
    at 10-60 m. NaN or all-zero pixels are treated as no data and get probability 0.
    model: a loaded :class:`CloudMaskModel`; None uses the shipped default (cached).
    Returns float32 (2, H, W) in 0..1: [cloud, shadow].
    """
    a = np.asarray(bands)
    if a.ndim != 3 or a.shape[0] != len(BANDS):
        raise ValueError(f"bands must be (4, H, W) reflectance of {BANDS}, got {a.shape}")
    if min(a.shape[1:]) < 1:
        raise ValueError(f"bands must not be empty, got {a.shape}")
    model = model if model is not None else default_model()
    x = np.nan_to_num(a.astype(np.float32, copy=False), nan=0.0)
    nodata = ~(x != 0).any(axis=0)
    p = _predict_array(model, x, tile, margin)
    probs = np.ascontiguousarray(p[1:3])
    probs[:, nodata] = 0.0
    return probs


def classes(probs: np.ndarray) -> np.ndarray:
    """(2, H, W) [cloud, shadow] probabilities -> uint8 (H, W) class of the largest of clear,
    cloud and shadow (0 clear, 1 cloud, 2 shadow; a tie with clear is clear)."""
    cloud, shadow = probs[0], probs[1]
    clear = 1.0 - cloud - shadow
    out = np.zeros(cloud.shape, np.uint8)
    out[(shadow > cloud) & (shadow > clear)] = 2
    out[(cloud >= shadow) & (cloud > clear)] = 1
    return out


def to_uint8(probs: np.ndarray) -> np.ndarray:
    """float (2, H, W) probabilities -> the stack's uint8 encoding (x 250, 255 kept for unset)."""
    return np.clip(np.rint(probs * CLOUDPROB_SCALE), 0, CLOUDPROB_SCALE).astype(np.uint8)


def model_tag(model: CloudMaskModel) -> str:
    """A short id of the model's weights, recorded per scene so a new model redoes the masks."""
    sha = model.source.get("sha256")
    if sha:
        return sha[:16]
    # An in-memory model (tests, right after training): hash the weights themselves.
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class MaskReport:
    level: int
    done: int
    skipped: int
    seconds: float
    megapixels: float


def default_level(stack) -> int:  # noqa: ANN001 - a compositor.stack.Stack
    """20 m (level 1 of a 10 m stack): the resolution of Sen2Cor's own SCL, 4x fewer pixels."""
    return stack.level_for_resolution(20.0).index


def mask_stack(
    path: str | Path,
    level: int | None = None,
    model: CloudMaskModel | None = None,
    force: bool = False,
    progress: bool = True,
    tile: int = TILE,
) -> MaskReport:
    """Predict cloud/shadow probabilities for every complete scene of the stack at ``path`` and
    write them at ``level`` (and, by the stack, every other level).

    A scene whose ``extra['cloudprob']`` records the same level and model is skipped, so an
    interrupted run resumes where it stopped; ``force`` redoes everything.
    """
    from tqdm import tqdm

    from compositor.stack import Stack, StackError

    stack = Stack.open(path, mode="r+")
    lv_index = default_level(stack) if level is None else int(level)
    if not 0 <= lv_index < len(stack.levels):
        raise StackError(f"stack {stack.path} has levels 0..{len(stack.levels) - 1}, not {level}")
    missing = [b for b in BANDS if b not in stack.bands]
    if missing:
        raise StackError(f"stack {stack.path} lacks bands {missing} the cloud model needs")
    band_idx = [stack.bands.index(b) for b in BANDS]
    model = model if model is not None else default_model()
    tag = model_tag(model)
    lv = stack.levels[lv_index]
    window = (0, 0, lv.height, lv.width)
    todo, skipped = [], 0
    for i in stack.complete_indices():
        rec = stack.scenes[i].extra.get("cloudprob") or {}
        if not force and rec.get("level") == lv_index and rec.get("model") == tag:
            skipped += 1
        else:
            todo.append(int(i))
    t0 = time.perf_counter()
    for i in tqdm(todo, desc=f"masks {stack.cell_id} L{lv_index}", disable=not progress):
        refl = stack.read(lv_index, window, np.asarray([i]), ("reflectance",))["reflectance"][0]
        refl = refl[band_idx]
        x = refl.astype(np.float32) / DN_SCALE
        x[:, refl[0] == stack.nodata] = 0.0
        prob = cloud_probabilities(x, model, tile=tile)
        stack.write_cloudprob(i, to_uint8(prob), lv_index)
        # Record after the data is written: a crash in between only costs a redo.
        with stack._lock:
            stack.scenes[i].extra["cloudprob"] = {"level": lv_index, "model": tag}
            stack._save_scenes()
    seconds = time.perf_counter() - t0
    mpx = len(todo) * lv.width * lv.height / 1e6
    log.info(
        "masked %d scenes of %s at level %d (%.1f Mpx) in %.1f s, %d already done",
        len(todo),
        stack.cell_id,
        lv_index,
        mpx,
        seconds,
        skipped,
    )
    return MaskReport(lv_index, len(todo), skipped, seconds, mpx)
