"""Cloud masks: SCL labels, SegFormer save/load, training, inference into a stack, composites."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from affine import Affine
from conftest import SHARED_DATA, needs_shared

from compositor.masks.model import (
    DEFAULT_MODEL,
    MaskModelError,
    build_model,
    load_model,
    save_model,
)
from compositor.masks.predict import cloud_probabilities, mask_stack
from compositor.masks.scl import CLOUD, IGNORE, SHADOW, scl_to_labels, truth_to_labels
from compositor.masks.train import TrainConfig, train
from compositor.stack import CLOUDPROB_UNSET, Scene, Stack
from compositor.tiling import ViewParams, composite_window

# Measured with the shipped model on the test scene below (seed 7, 256 px, 6 dates, 20 m): cloud
# F1 0.947. The floor leaves room for float differences between machines, not a worse model.
DEFAULT_MODEL_CLOUD_F1_FLOOR = 0.93


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(seed=0).eval()


def test_scl_to_labels_maps_every_code():
    scl = np.arange(13, dtype=np.uint8)
    want = [IGNORE, IGNORE, 0, SHADOW, 0, 0, 0, 0, CLOUD, CLOUD, CLOUD, 0, IGNORE]
    assert scl_to_labels(scl).tolist() == want
    assert scl_to_labels(np.array([300, -1])).tolist() == [IGNORE, IGNORE]
    lab = truth_to_labels(np.array([True, False, True]), np.array([True, True, False]))
    assert lab.tolist() == [CLOUD, SHADOW, CLOUD]


def test_save_load_round_trip_is_exact(tmp_path: Path, tiny_model):
    tiny_model.meta = {"note": "round trip"}
    path = save_model(tiny_model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.meta == {"note": "round trip"}
    assert loaded.source["sha256"]
    x = torch.rand(2, 4, 96, 80) * 0.6
    with torch.inference_mode():
        assert torch.equal(tiny_model(x), loaded(x))
    # The stem or the .json name the same model.
    assert torch.equal(load_model(tmp_path / "m.json").mean, loaded.mean)


def test_missing_or_corrupt_model_file_names_the_file(tmp_path: Path, tiny_model):
    with pytest.raises(MaskModelError, match="nope.safetensors.*not found"):
        load_model(tmp_path / "nope.safetensors")
    path = save_model(tiny_model, tmp_path / "m.safetensors")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated download
    with pytest.raises(MaskModelError, match=r"m\.safetensors.*corrupt"):
        load_model(path)
    path.write_bytes(good)
    cfg = tmp_path / "m.json"
    text = cfg.read_text()
    cfg.write_text(text[:50])
    with pytest.raises(MaskModelError, match=r"m\.json.*corrupt"):
        load_model(path)
    doc = json.loads(text)
    doc["segformer"]["hidden_sizes"][0] += 4  # a config that does not fit the weights
    cfg.write_text(json.dumps(doc))
    with pytest.raises(MaskModelError, match=r"m\.safetensors.*do not match"):
        load_model(path)


def test_cloud_probabilities_shape_dtype_range(tiny_model):
    rng = np.random.default_rng(0)
    for h, w in ((5, 7), (37, 53), (600, 530)):  # tiny; smaller than a tile; several tiles
        bands = rng.uniform(0, 0.6, (4, h, w)).astype(np.float32)
        bands[:, :3, :5] = 0.0  # no data
        bands[:, -1, -1] = np.nan
        p = cloud_probabilities(bands, tiny_model)
        assert p.shape == (2, h, w) and p.dtype == np.float32
        assert np.isfinite(p).all() and p.min() >= 0 and (p.sum(axis=0) <= 1 + 1e-5).all()
        assert (p[:, :3, :5] == 0).all()
    with pytest.raises(ValueError, match="4, H, W"):
        cloud_probabilities(np.zeros((3, 8, 8), np.float32), tiny_model)


def _tiny_stack(path: Path, n: int = 3, size: int = 300) -> Stack:
    """Three looks of one flat field: two clear, the last a bright 'cloud' SCL calls clear.
    (300 px: more than one chunk, so the stack has a 20 m level.)"""
    stack = Stack.create(path, "49NDB", 32649, Affine(10, 0, 500000, 0, -10, 200000), size, size)
    for t in range(n):
        refl = np.full((4, size, size), 1000 + 100 * t, np.uint16)
        if t == n - 1:
            refl[:] = 9000
        scl = np.full((size, size), 4, np.uint8)
        stack.append_scene(Scene(id=f"S{t}", datetime=f"2024-01-0{t + 1}T03:00:00Z"), refl, scl)
    return stack


def test_written_masks_drive_the_segformer_composite(tmp_path: Path):
    stack = _tiny_stack(tmp_path / "s.zarr")
    view = ViewParams(mask="segformer", percentile=100, dilate=0, temporal=False)
    window = (0, 0, stack.height, stack.width)
    # Nothing predicted yet: segformer falls back to SCL, which misses the cloud.
    none = composite_window(stack, 0, window, ViewParams(mask="none", percentile=100, dilate=0))
    assert (none.values[0] == 9000).all()
    assert np.array_equal(composite_window(stack, 0, window, view).values, none.values)
    # Known probabilities at level 1: the left half of the last scene is cloud.
    lv1 = stack.levels[1]
    prob = np.zeros((2, lv1.height, lv1.width), np.uint8)
    prob[0, :, : lv1.width // 2] = 250
    stack.write_cloudprob(2, prob, level=1)
    for scene in (0, 1):
        stack.write_cloudprob(scene, np.zeros_like(prob), level=1)
    res = composite_window(Stack.open(stack.path), 0, window, view)
    half = stack.width // 2
    assert (res.values[0][:, :half] == 1100).all()  # cloud removed: the brightest clear look
    assert (res.values[0][:, half:] == 9000).all()  # probability 0: kept
    coarse = composite_window(stack, 1, (0, 0, lv1.height, lv1.width), view)
    assert (coarse.values[0][:, : lv1.width // 2] == 1100).all()


def test_mask_stack_writes_records_and_skips(tmp_path: Path, tiny_model):
    stack = _tiny_stack(tmp_path / "s.zarr")
    rep = mask_stack(stack.path, level=1, model=tiny_model, progress=False)
    assert (rep.level, rep.done, rep.skipped) == (1, 3, 0)
    again = Stack.open(stack.path)
    assert all(s.extra["cloudprob"]["level"] == 1 for s in again.scenes)
    window = (0, 0, 300, 300)
    cp = again.read(0, window, again.complete_indices(), ("cloudprob",))["cloudprob"]
    assert cp.shape == (3, 2, 300, 300) and (cp != CLOUDPROB_UNSET).all() and cp.max() <= 250
    rep2 = mask_stack(stack.path, level=1, model=tiny_model, progress=False)
    assert (rep2.done, rep2.skipped) == (0, 3)
    assert mask_stack(stack.path, level=1, model=tiny_model, force=True, progress=False).done == 3


@pytest.fixture
def one_thread():
    """Tiny batches gain nothing from a second thread, and on a busy CI machine torch's OpenMP
    threads waiting for each other cost 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bank():
    """A tiny training bank: one small synthetic cell (truth labels) and two procedural
    surfaces (simulated skies); built in-process (workers=1 would still spawn: use the
    generators directly)."""
    from compositor.masks.trainset import Bank, _procedural, _synthetic_cell

    labelled, surfaces, desc = _synthetic_cell((11, 96, 6, (0,), 3, 0.15))
    return Bank(surfaces + [_procedural(0), _procedural(4)], labelled, [desc])


def _cfg(steps: int) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch=4,
        patch=64,
        lr=4e-3,
        warmup=3,
        levels=(0,),
        level_weights=(1.0,),
        eval_every=10_000,
        checkpoint_every=4,
        val_scenes=1,
        val_sim=8,
        seed=3,
    )


def test_cloudsim_renders_physical_skies_with_exact_labels():
    from compositor.masks.cloudsim import SkyConfig, render

    g = torch.Generator().manual_seed(0)
    surface = torch.full((6, 4, 64, 64), 0.05)
    surface[:, 3] = 0.3  # vegetation: dark visible, bright NIR
    surface[0, :, :8, :] = 0.0  # no data
    px = torch.full((6,), 20.0)
    none = dict(clear=0, cumulus=0, stratus=0, overcast=0, thin_deck=0, cirrus=0, mixed=0)
    clear_sky = SkyConfig(**{**none, "clear": 1}, l1c=0, haze=0, nodata=0)
    x, y = render(surface.clone(), px, g, clear_sky)
    assert (y[0, :8] == IGNORE).all() and (x[0, :, :8] == 0).all()
    assert (y[:, 8:] == 0).all()  # a clear sky is clear everywhere
    assert torch.allclose(x[:, :, 8:], surface[:, :, 8:], atol=0.05, rtol=0.25)
    overcast = SkyConfig(**{**none, "overcast": 1}, l1c=0, haze=0, nodata=0)
    x, y = render(surface.clone(), px, g, overcast)
    assert (y[:, 8:] == CLOUD).float().mean() > 0.9
    assert x[:, 0, 8:].mean() > 0.15  # bright, and whiter than the ground: blue rose most
    # Shadows: darker than the ground, NIR most in absolute terms, and labelled shadow.
    cu = SkyConfig(**{**none, "cumulus": 1}, l1c=0, haze=0, nodata=0)
    x, y = render(surface.clone().repeat(4, 1, 1, 1), px.repeat(4), g, cu)
    sh = y == SHADOW
    assert sh.any()
    assert x[:, 3][sh].mean() < 0.7 * 0.3 and x[:, 0][sh].mean() < 0.05
    # L1C-like atmospheres add path radiance, strongest in blue; labels do not change.
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    xa, ya = render(surface.clone(), px, g1, SkyConfig(**{**none, "clear": 1}, l1c=1, nodata=0))
    xb, yb = render(surface.clone(), px, g2, clear_sky)
    assert torch.equal(ya, yb)
    gain = (xa[:, :, 8:] - surface[:, :, 8:]).mean(dim=(0, 2, 3))
    assert gain[0] > gain[2] and gain[0] > 0.02


def test_cloud_labels_stop_where_the_cloud_does():
    """Clear ground next to a thick cumulus is clear: the ~150 m neighbourhood only lends the cloud
    class to faint rims and troughs that carry some cloud (labels that grew every cloud by ~250 m
    taught the model to call the ground of a broken cumulus field cloud)."""
    from compositor.masks.cloudsim import TWO_STREAM_A, cloud_labels

    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    r = torch.hypot(yy - 64, xx - 64)
    tau = (20.0 * (24 - r).clamp(0, 4) / 4).unsqueeze(0)  # a 240 m cumulus, 40 m soft rim
    tau[0, 62:66, 0:8] = 0.3  # a faint wisp 320-400 m off its edge: too far to borrow from it
    trough = tau.clone()
    trough[0, 63:66, 50:78] = 0.3  # a thin trough across the cloud: part of it
    for t in (tau, trough):
        rc = TWO_STREAM_A * t / (TWO_STREAM_A * t + 2)
        lab = cloud_labels(rc, t, torch.tensor([10.0]))[0]
        assert not lab[(r > 24) & (t[0] == 0)].any()  # no halo over clear ground
        assert lab[r < 20].all()
    rc = TWO_STREAM_A * tau / (TWO_STREAM_A * tau + 2)
    assert not cloud_labels(rc, tau, torch.tensor([10.0]))[0, 62:66, 0:8].any()
    rc = TWO_STREAM_A * trough / (TWO_STREAM_A * trough + 2)
    assert cloud_labels(rc, trough, torch.tensor([10.0]))[0, 63:66, 50:78].all()


def test_training_loss_drops(bank, one_thread):
    from compositor.masks.cloudsim import SkyConfig
    from compositor.masks.train import Sampler, loss_fn, make_batch

    cfg = _cfg(30)
    # A fixed batch, scored before and after: per-step losses of random patches are too noisy
    # to compare over a few steps.
    x, y = make_batch(
        Sampler(bank, cfg),
        np.random.default_rng(123),
        torch.Generator().manual_seed(1),
        torch.device("cpu"),
        SkyConfig(),
        8,
    )

    def fixed_loss(model) -> float:
        with torch.inference_mode():
            return float(loss_fn(model.eval()(x), y, torch.ones(3), 0.5))

    losses: list[float] = []
    res = train(bank, cfg, progress=False, on_log=lambda e: losses.append(e["loss"]))
    before = fixed_loss(build_model(seed=cfg.seed, features=cfg.features))
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert fixed_loss(res.model) < 0.9 * before
    assert res.model.meta["data"][0]["labels"] == "truth"
    assert "truth" in res.val and "simulated" in res.val
    assert 0 <= res.val["simulated"]["cloud_f1"] <= 1


def test_training_resumes_bit_for_bit(bank, tmp_path: Path, one_thread):
    whole = train(bank, _cfg(10), progress=False).model

    class Stop(Exception):
        pass

    def stop_at_6(entry: dict) -> None:
        if entry["step"] == 6:
            raise Stop

    ckpt = tmp_path / "c.ckpt"
    with pytest.raises(Stop):
        train(bank, _cfg(10), checkpoint=ckpt, progress=False, on_log=stop_at_6)
    resumed = train(bank, _cfg(10), checkpoint=ckpt, resume=True, progress=False).model
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_fine_tuning_starts_from_the_given_model(bank, tmp_path: Path, one_thread):
    base = train(bank, _cfg(4), progress=False).model
    path = save_model(base, tmp_path / "base.safetensors")
    cfg = _cfg(2)
    cfg.init = str(path)
    res = train(bank, cfg, progress=False)
    assert res.model.meta["fine_tuned_from"]["sha256"] == load_model(path).source["sha256"]
    # Started from the base (its normalisation kept), not from a fresh initialisation.
    assert torch.equal(res.model.mean, base.mean)
    drift = [
        float((a - b).abs().max())
        for a, b in zip(res.model.state_dict().values(), base.state_dict().values(), strict=True)
    ]
    fresh = build_model(seed=cfg.seed, features=cfg.features)
    far = [
        float((a - b).abs().max())
        for a, b in zip(fresh.state_dict().values(), base.state_dict().values(), strict=True)
    ]
    assert max(drift) < max(far)


def test_predict_constants_match_the_stack():
    from compositor.masks import predict
    from compositor.stack import CLOUDPROB_SCALE

    assert predict.CLOUDPROB_SCALE == CLOUDPROB_SCALE


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the cloud mask model tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_shipped_model_loads_offline_and_finds_clouds(no_network):
    from compositor.masks import predict
    from compositor.stack import downsample_reflectance
    from compositor.synthetic import make_synthetic

    assert DEFAULT_MODEL.is_file() and DEFAULT_MODEL.with_suffix(".json").is_file()
    assert DEFAULT_MODEL.stat().st_size < 20e6
    predict._default_model = None  # load it here, under the no-network guard
    syn = make_synthetic(seed=7, size=256, n_dates=6)  # seed 7 is never trained on
    tp = fp = fn = 0
    for t in range(len(syn.dates)):
        # At 20 m, as `clearsky mask` runs by default; truth pooled like the stack pools SCL.
        x = downsample_reflectance(syn.reflectance[t]).astype(np.float32) / 10000
        p = cloud_probabilities(x)
        c = syn.truth_cloud[t]
        truth = c[::2, ::2] | c[1::2, ::2] | c[::2, 1::2] | c[1::2, 1::2]
        valid = syn.scl[t, ::2, ::2] != 0
        pred = (p[0] > p[1]) & (p[0] > 1 - p[0] - p[1])
        tp += int((pred & truth & valid).sum())
        fp += int((pred & ~truth & valid).sum())
        fn += int((~pred & truth & valid).sum())
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert f1 >= DEFAULT_MODEL_CLOUD_F1_FLOOR, f1


# Real scenes the model never saw (../shared/data), small crops: what a user's first look at a
# clear or an overcast scene must show. Measured with the shipped model (bench/masks.py has the
# whole scenes): every clear crop <= 1 % cloud and <= 2 % shadow; overcast >= 95 % cloud.
CLEAR_CROPS = {
    "t31tdh": (slice(0, 160), slice(100, 260)),
    "wright-clear": (slice(120, 280), slice(200, 360)),
    "eolearn-2": (slice(None), slice(None)),
    "eolearn-3": (slice(None), slice(None)),
    "eolearn-4": (slice(None), slice(None)),
    "luxembourg": (slice(None), slice(None)),
}


def _shares(name: str, crop: tuple[slice, slice]) -> tuple[float, float]:
    from compositor.masks import samples
    from compositor.masks.predict import classes

    s = samples.load(name)
    x = s.bands[:, crop[0], crop[1]]
    valid = np.isfinite(x).all(axis=0) & (np.nan_to_num(x) > 0).any(axis=0)
    cls = classes(cloud_probabilities(np.nan_to_num(x)))[valid]
    return float((cls == CLOUD).mean()), float((cls == SHADOW).mean())


@needs_shared(SHARED_DATA / "s2cloudless-optimized-T31TDH")
@pytest.mark.parametrize("name", list(CLEAR_CROPS))
def test_shipped_model_keeps_real_clear_scenes_clear(name: str):
    cloud, shadow = _shares(name, CLEAR_CROPS[name])
    assert cloud <= 0.01 and shadow <= 0.02, (name, cloud, shadow)


@needs_shared(SHARED_DATA / "eolearn-testeopatch")
def test_shipped_model_sees_a_real_overcast_scene():
    cloud, _ = _shares("eolearn-0", (slice(None), slice(None)))
    assert cloud >= 0.95, cloud
