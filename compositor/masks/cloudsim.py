"""Clouds, cloud shadows and atmosphere rendered over clear Sentinel-2 surfaces, with exact labels.

The cloud model learns from real clear surfaces (and procedural ones) under simulated skies, so
its labels are exact and its training world holds the surfaces, atmospheres and cloud forms of
the real one, not one landscape's. Physics, per band b (B02, B03, B04, B08):

- Cloud optical thickness tau(x, y): fractal fields thresholded to a cover fraction with soft
  edges (cumulus fields at 0.2-3 km scales, stratiform decks, overcast), plus thin anisotropic
  cirrus. Scales are in metres, so a 60 m patch sees the same clouds as a 10 m one, coarser.
- Cloud reflectance from a two-stream approximation, R_c = a tau / (a tau + 2) (a = 1 - g), with
  sunlit and shaded cloud sides; transmittance T = 1 - R_c (no absorption in the visible);
  observed = R_c + T^2 R_s / (1 - R_c R_s) (cloud over surface, multiple reflection).
- Shadows: the tau field displaced by the cloud height along the anti-solar direction; the direct
  beam is cut by exp(-tau / mu_s) and the diffuse sky light (strongest in blue) still lights the
  ground, so shadows are darkest in NIR and bluish, as observed.
- Atmosphere on top of everything: L2A-like (small residual offsets and gains left by Sen2Cor)
  or L1C-like (Rayleigh path reflectance ~ lambda^-4, aerosol ~ lambda^-alpha, two-way
  transmittance), and smooth haze. Haze is *clear*: it is spatially smooth, clouds are not.
- Sensor: blur (MTF), noise, gaps of no data (label ignore).

Labels: cloud where its optical thickness is >= 0.8, so that it washes out the ground's detail, or
it adds >= 0.06 reflectance, and its faint rims and troughs (thickness >= 0.25) where the cloud
around them is thick over ~150 m; shadow where the ground gets less than 60 % of
its light (NIR) and no cloud is seen; else clear.
Everything is batched torch and runs on CPU or GPU, deterministic for a given generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compositor.masks.scl import CLEAR, CLOUD, IGNORE, SHADOW

WAVELENGTH_UM = (0.492, 0.560, 0.665, 0.833)  # B02, B03, B04, B08 centres
# Cloud where it washes the ground out (optical thickness >= 0.8: under half the light crosses
# unscattered, the surface's detail is lost), taken over ~150 m as an analyst outlines it, or
# where it is bright (>= 0.06 added); a faint veil over a sharp surface is haze, not cloud.
CLOUD_LABEL_TAU = 0.8
CLOUD_LABEL_REFLECTANCE = 0.06
CLOUD_LABEL_RIM_TAU = 0.25  # a rim or trough this thick still shows (adds ~0.02, blurs detail)
SHADOW_LABEL_LIGHT = 0.6  # shadow where the ground gets less than this of its light (NIR)
TWO_STREAM_A = 0.14  # 1 - asymmetry factor g (water cloud, g ~ 0.86)


@dataclass
class SkyConfig:
    """Probabilities of the scenarios drawn per patch (they need not sum to 1: normalised)."""

    clear: float = 0.3  # a clear patch of bright soil or snow must not look like a deck
    cumulus: float = 0.34
    stratus: float = 0.14
    overcast: float = 0.16
    thin_deck: float = 0.12  # fog / thin stratus over the whole patch, surface seen through
    cirrus: float = 0.1
    mixed: float = 0.12
    cirrus_over: float = 0.1  # share of the other cloudy patches that get cirrus as well
    l1c: float = 0.45  # share of patches given an L1C-like (top-of-atmosphere) atmosphere
    haze: float = 0.15  # share given extra smooth haze
    nodata: float = 0.08  # share with a no-data gap


def _u(g: torch.Generator, n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _loguniform(g: torch.Generator, n: int, lo: float, hi: float, device) -> torch.Tensor:
    return torch.exp(_u(g, n, math.log(lo), math.log(hi), device))


def fractal_noise(
    g: torch.Generator,
    n: int,
    size: int,
    scale_px: torch.Tensor,
    beta: torch.Tensor | float = 3.0,
    aniso: torch.Tensor | None = None,
    angle: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(n, size, size) zero-mean unit-std periodic fractal noise, power ~ (k^2 + k0^2)^-beta/2
    with k0 = 1/scale_px per sample; ``aniso`` stretches it along ``angle`` (cirrus streaks)."""
    device = torch.device(device)
    ky = torch.fft.fftfreq(size, device=device).view(1, size, 1)
    kx = torch.fft.rfftfreq(size, device=device).view(1, 1, size // 2 + 1)
    if aniso is not None and angle is not None:
        c, s = torch.cos(angle).view(n, 1, 1), torch.sin(angle).view(n, 1, 1)
        ka, kb = kx * c + ky * s, -kx * s + ky * c
        a = aniso.view(n, 1, 1)
        k2 = (ka * a) ** 2 + (kb / a) ** 2
    else:
        k2 = (kx**2 + ky**2).expand(n, -1, -1)
    beta_t = torch.as_tensor(beta, device=device, dtype=torch.float32).reshape(-1, 1, 1)
    amp = (k2 + (1.0 / scale_px.view(n, 1, 1)) ** 2) ** (-beta_t / 4)
    amp[:, 0, 0] = 0.0
    re = torch.randn(amp.shape, generator=g, device=device)
    im = torch.randn(amp.shape, generator=g, device=device)
    f = torch.fft.irfft2(torch.complex(re * amp, im * amp), s=(size, size))
    f = f - f.mean(dim=(1, 2), keepdim=True)
    return f / (f.std(dim=(1, 2), keepdim=True) + 1e-8)


def _quantile_rows(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-sample quantile ``q`` (n,) of (n, H, W), from a strided subsample (speed)."""
    flat = x[:, ::2, ::2].reshape(x.shape[0], -1)
    srt = flat.sort(dim=1).values
    idx = (q.clamp(0, 1) * (srt.shape[1] - 1)).round().long()
    return srt.gather(1, idx.view(-1, 1)).view(-1)


def _fft_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of periodic (n, S, S) fields, per-sample sigma in pixels (in Fourier space:
    the cost does not grow with sigma)."""
    n, s, _ = x.shape
    ky = torch.fft.fftfreq(s, device=x.device).view(1, s, 1)
    kx = torch.fft.rfftfreq(s, device=x.device).view(1, 1, s // 2 + 1)
    k2 = kx**2 + ky**2
    gauss = torch.exp(-2 * math.pi**2 * sigma.view(n, 1, 1) ** 2 * k2)
    return torch.fft.irfft2(torch.fft.rfft2(x) * gauss, s=(s, s))


def _shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Shift each (H, W) field of (n, H, W) by integer (dy, dx) pixels, periodically (one
    gather for the batch)."""
    n, h, w = x.shape
    rows = (torch.arange(h, device=x.device).view(1, h) - dy.long().view(n, 1)) % h
    cols = (torch.arange(w, device=x.device).view(1, w) - dx.long().view(n, 1)) % w
    idx = rows.view(n, h, 1) * w + cols.view(n, 1, w)
    return x.reshape(n, h * w).gather(1, idx.view(n, h * w)).view(n, h, w)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur (n, C, H, W) with a per-sample sigma in pixels (0 = none)."""
    n, c, h, w = x.shape
    r = 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    s = sigma.clamp(min=1e-3).view(n, 1)
    k = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (n, 5)
    xp = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    kk = k.repeat_interleave(c, dim=0)
    y = F.conv2d(xp, kk.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, kk.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def cloud_labels(
    rc_blue: torch.Tensor, tau: torch.Tensor, pixel_size: torch.Tensor
) -> torch.Tensor:
    """Where (n, H, W) is cloud: it clearly shows (``rc_blue``, the reflectance it adds in blue),
    or it is optically thick (``tau``); the thin troughs inside a deck and a cloud's faint rim
    count where the cloud around them is thick over ~150 m, as an analyst outlines it, but only
    where some cloud is there. (A blurred thickness alone put clear ground up to ~250 m around
    every thick cumulus in the cloud class, and the model taught that called all the ground of
    a broken cumulus field cloud.)"""
    tau_near = _fft_blur(tau, (150.0 / pixel_size).clamp(min=0.3))
    return (
        (rc_blue >= CLOUD_LABEL_REFLECTANCE)
        | (tau >= CLOUD_LABEL_TAU)
        | ((tau_near >= CLOUD_LABEL_TAU) & (tau >= CLOUD_LABEL_RIM_TAU))
    )


def render(
    surface: torch.Tensor,
    pixel_size: torch.Tensor,
    g: torch.Generator,
    cfg: SkyConfig | None = None,
    clouds: torch.Tensor | None = None,
    base_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put skies over clear surfaces.

    surface: (n, 4, P, P) clear surface reflectance (B02, B03, B04, B08); NaN or 0 = no data.
    pixel_size: (n,) metres per pixel of each patch.
    clouds: (n,) bool, which patches get simulated clouds (default all); the others (scenes with
    real clouds and labels of their own, ``base_labels`` (n, P, P)) get only the atmosphere and
    sensor effects and keep their labels.
    Returns (reflectance (n, 4, P, P) float32 as a sensor would see it, labels (n, P, P) int64
    with CLEAR / CLOUD / SHADOW / IGNORE).
    """
    cfg = cfg or SkyConfig()
    dev = surface.device
    n, nb, p, _ = surface.shape
    nodata = ~torch.isfinite(surface).all(dim=1) | (surface <= 0).all(dim=1)
    rs = torch.nan_to_num(surface, nan=0.0).clamp(0, 1.5)
    px = pixel_size.to(dev, torch.float32)

    # --- scenario per patch
    probs = torch.tensor(
        [cfg.clear, cfg.cumulus, cfg.stratus, cfg.overcast, cfg.thin_deck, cfg.cirrus, cfg.mixed],
        device=dev,
    )
    kind = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=g)
    is_cu = (kind == 1) | (kind == 6)
    is_st = kind == 2
    is_ov = kind == 3
    is_thin = kind == 4
    has_ci = (
        (kind == 5)
        | (kind == 6)
        | ((kind != 0) & (torch.rand(n, generator=g, device=dev) < cfg.cirrus_over))
    )
    if clouds is None:
        clouds = torch.ones(n, dtype=torch.bool, device=dev)
    has_thick = (is_cu | is_st | is_ov | is_thin) & clouds
    full = is_ov | is_thin  # decks that cover the whole patch

    # Canvas larger than the patch so shadows can come from clouds outside it.
    canvas = 2 * p
    # Where the cloud is: a fractal field thresholded to a cover fraction, soft edges.
    scale_m = torch.where(
        is_cu, _loguniform(g, n, 250, 3000, dev), _loguniform(g, n, 3000, 30000, dev)
    )
    scale = (scale_m / px).clamp(1.5, 8 * canvas)
    beta = torch.where(is_cu, _u(g, n, 2.6, 3.8, dev), _u(g, n, 2.8, 4.0, dev))
    field = fractal_noise(g, n, canvas, scale, beta, device=dev)
    cover = torch.where(is_cu, _u(g, n, 0.03, 0.7, dev), _u(g, n, 0.3, 0.98, dev))
    thr = _quantile_rows(field, 1 - cover)
    thr = torch.where(full, field.amin(dim=(1, 2)) - 10.0, thr)
    edge = _u(g, n, 0.1, 1.0, dev)  # softness of cloud edges (noise units)
    inside = ((field - thr.view(n, 1, 1)) / edge.view(n, 1, 1)).clamp(0, 1)
    inside = inside ** _u(g, n, 0.5, 1.5, dev).view(n, 1, 1)
    # How thick: log-normal within the cloud (the standard model of cloud fields), so decks
    # show the bright tops and darker troughs seen from above.
    tex_scale = (_loguniform(g, n, 150, 3000, dev) / px).clamp(1.5, 8 * canvas)
    texture = fractal_noise(g, n, canvas, tex_scale, _u(g, n, 2.4, 3.6, dev), device=dev)
    sigma = _loguniform(g, n, 0.08, 0.9, dev).view(n, 1, 1)  # real decks are often smooth
    tau_mean = torch.where(
        is_thin, _loguniform(g, n, 0.8, 5.0, dev), _loguniform(g, n, 2.0, 40.0, dev)
    )
    tau_max = tau_mean * 3
    tau_thick = tau_mean.view(n, 1, 1) * inside * torch.exp(sigma * texture - sigma**2 / 2)
    # Cell edges of stratocumulus / cumulus tops: a network of thinner, shaded troughs along
    # the zero lines of a fine field (seen from above as darker grey-blue cracks).
    cells = fractal_noise(
        g, n, canvas, (_loguniform(g, n, 120, 800, dev) / px).clamp(1.2, canvas), 2.8, device=dev
    )
    width = _u(g, n, 0.15, 0.5, dev).view(n, 1, 1)
    depth = _u(g, n, 0.0, 1.6, dev) * (torch.rand(n, generator=g, device=dev) < 0.6)
    trough = (1 - cells.abs() / width).clamp(min=0)
    tau_thick = tau_thick * torch.exp(-depth.view(n, 1, 1) * trough)
    tau_thick = tau_thick * has_thick.view(n, 1, 1)
    # Real cloud edges fade over 10-150 m (entrainment, sub-pixel cover): soften in metres.
    soft_px = (_loguniform(g, n, 8, 150, dev) / px).clamp(min=0.3)
    tau_thick = _fft_blur(tau_thick, soft_px).clamp(min=0)

    # Thin cirrus / thin cloud sheets: streaky, low optical thickness.
    ci = fractal_noise(
        g,
        n,
        canvas,
        (_loguniform(g, n, 2000, 20000, dev) / px).clamp(2, 8 * canvas),
        3.2,
        aniso=_u(g, n, 1.5, 5.0, dev),
        angle=_u(g, n, 0, math.pi, dev),
        device=dev,
    )
    ci_thr = _quantile_rows(ci, 1 - _u(g, n, 0.2, 1.0, dev))
    tau_ci = _loguniform(g, n, 0.15, 3.0, dev).view(n, 1, 1) * (
        (ci - ci_thr.view(n, 1, 1)) / _u(g, n, 0.5, 2.0, dev).view(n, 1, 1)
    ).clamp(0, 1)
    tau_ci = tau_ci * (has_ci & clouds).view(n, 1, 1)

    # --- geometry: sun and cloud heights -> shadow offsets (pixels on the canvas)
    zen = torch.deg2rad(_u(g, n, 15, 70, dev))
    az = _u(g, n, 0, 2 * math.pi, dev)
    h_thick = torch.where(is_cu, _u(g, n, 500, 3500, dev), _u(g, n, 300, 2500, dev))
    h_ci = _u(g, n, 6000, 12000, dev)

    # Anti-solar direction on the image (rows grow southwards); the view parallax adds a
    # small random part.
    def offset(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = h * torch.tan(zen) / px
        jitter = h * torch.tan(torch.deg2rad(_u(g, n, 0, 10, dev))) / px
        ja = _u(g, n, 0, 2 * math.pi, dev)
        dy = d * torch.cos(az) + jitter * torch.cos(ja)  # sun in the south -> shadow north
        dx = -d * torch.sin(az) + jitter * torch.sin(ja)
        lim = canvas - p - 1
        return dy.clamp(-lim, lim).round(), dx.clamp(-lim, lim).round()

    dy1, dx1 = offset(h_thick)
    dy2, dx2 = offset(h_ci)
    tau_shadow = _shift(tau_thick, dy1, dx1) + _shift(tau_ci, dy2, dx2)
    o = (canvas - p) // 2
    crop = (slice(None), slice(o, o + p), slice(o, o + p))
    tau = (tau_thick + tau_ci)[crop]
    tau_sh = tau_shadow[crop]
    mu_s = torch.cos(zen).view(n, 1, 1)

    # --- shadowed surface: the direct beam is cut to exp(-tau / mu_s); of the light the cloud
    # scatters forward (2 / (a tau + 2) in all, two-stream), a share reaches the shadowed
    # ground: all of it under a deck, less beside a broken cloud (3-D: it spreads out). The
    # clear sky's diffuse light (bluish) still lights it: shadows are darkest in NIR.
    direct = torch.exp(-tau_sh / mu_s)
    forward = (2.0 / (TWO_STREAM_A * tau_sh + 2.0) - direct).clamp(min=0)
    spread = torch.where(full, _u(g, n, 0.85, 1.0, dev), _u(g, n, 0.25, 0.8, dev)).view(n, 1, 1)
    beam = direct + spread * forward  # what is left of the sun's beam on the ground
    lam = torch.tensor(WAVELENGTH_UM, device=dev).view(1, nb)
    f_nir = _u(g, n, 0.04, 0.22, dev).view(n, 1)
    f_diff = (f_nir * (lam / lam[0, -1]) ** -_u(g, n, 1.0, 2.5, dev).view(n, 1)).clamp(max=0.85)
    f_diff = f_diff * _u(g, n, 0.6, 1.15, dev).view(n, 1)
    irr = f_diff.view(n, nb, 1, 1) + (1 - f_diff.view(n, nb, 1, 1)) * beam.unsqueeze(1)
    ground = rs * irr

    # --- cloud over the ground
    rc = TWO_STREAM_A * tau / (TWO_STREAM_A * tau + 2.0)
    # Sunlit and shaded cloud sides: brightness follows the slope of the cloud top towards
    # the sun (cumulus look 3-D), and the cloud tops' overall brightness varies.
    gy = torch.gradient(tau, dim=1)[0]
    gx = torch.gradient(tau, dim=2)[0]
    towards_sun = -(gy * torch.cos(az).view(n, 1, 1) - gx * torch.sin(az).view(n, 1, 1))
    soft = tau_max.view(n, 1, 1) * 0.05 + 1e-3
    shade = 1 + _u(g, n, 0.0, 0.4, dev).view(n, 1, 1) * torch.tanh(towards_sun / soft)
    rc_b = (rc * shade * _u(g, n, 0.45, 1.1, dev).view(n, 1, 1)).clamp(0, 0.95).unsqueeze(1)
    tilt = _u(g, n, -0.07, 0.03, dev).view(n, 1)
    spec = (1 + tilt * (torch.arange(nb, device=dev).view(1, nb) - 1.0) / 2).view(n, nb, 1, 1)
    rcs = (rc_b * spec).clamp(0, 0.98)
    tr = 1 - rcs
    # Light that crossed the cloud is mostly scattered: only exp(-tau) of it each way is
    # direct. The scattered part carries the surface blurred over hundreds of metres, so a
    # thin deck washes out the ground's detail (as seen from above), not only its contrast.
    direct2 = torch.exp(-2 * tau).unsqueeze(1)  # both ways, nadir view
    f_dir = (direct2 / (tr * tr).clamp(min=1e-6)).clamp(0, 1)
    blur_px = (_loguniform(g, n, 100, 600, dev) / px).clamp(min=0.5)
    pad = p // 2
    gpad = F.pad(ground, (pad, pad, pad, pad), mode="reflect")
    gblur = _fft_blur(gpad.reshape(n * nb, 2 * p, 2 * p), blur_px.repeat_interleave(nb))
    gblur = gblur.view(n, nb, 2 * p, 2 * p)[:, :, pad : pad + p, pad : pad + p]
    seen = f_dir * ground + (1 - f_dir) * gblur
    obs = rcs + tr * tr * seen / (1 - rcs * ground).clamp(min=0.05)

    # --- labels (before atmosphere and sensor: they are properties of the scene)
    is_cloud = cloud_labels(rcs[:, 0], tau, px)
    is_shadow = (irr[:, -1] < SHADOW_LABEL_LIGHT) & ~is_cloud
    labels = torch.full((n, p, p), CLEAR, dtype=torch.int64, device=dev)
    labels[is_shadow] = SHADOW
    labels[is_cloud] = CLOUD
    if base_labels is not None:
        labels = torch.where(clouds.view(n, 1, 1), labels, base_labels.to(dev, torch.int64))

    # --- atmosphere: L2A residuals or L1C path radiance, plus smooth haze (clear)
    l1c = torch.rand(n, generator=g, device=dev) < cfg.l1c
    rayleigh = _u(g, n, 0.03, 0.08, dev).view(n, 1) * (lam / lam[0, 0]) ** -4.0
    aer = _loguniform(g, n, 0.003, 0.04, dev).view(n, 1) * (lam / lam[0, 0]) ** -_u(
        g, n, 0.8, 2.0, dev
    ).view(n, 1)
    t_atm = 1 - (rayleigh + aer) * _u(g, n, 0.6, 1.4, dev).view(n, 1)
    path_l1c = rayleigh + aer
    path_l2a = 0.008 * torch.randn(n, nb, generator=g, device=dev)
    gain_l2a = (
        1
        + 0.05 * torch.randn(n, 1, generator=g, device=dev)
        + 0.02 * torch.randn(n, nb, generator=g, device=dev)
    )
    path = torch.where(l1c.view(n, 1), path_l1c, path_l2a)
    gain = torch.where(l1c.view(n, 1), t_atm, gain_l2a)
    x = obs * gain.view(n, nb, 1, 1) + path.view(n, nb, 1, 1)
    hazy = torch.rand(n, generator=g, device=dev) < cfg.haze
    if bool(hazy.any()):
        # Haze and smoke: smooth over kilometres, bluish; clear for an analyst (it is not a
        # cloud one could mask out of a look: the surface stays readable).
        hz_scale = (_loguniform(g, n, 1000, 10000, dev) / px).clamp(2.0, 4.0 * p)
        hz = fractal_noise(g, n, p, hz_scale, 3.5, device=dev)
        amp = _u(g, n, 0.2, 0.6, dev).view(n, 1, 1)
        amt = _loguniform(g, n, 0.01, 0.07, dev).view(n, 1, 1) * (1 + amp * hz).clamp(min=0)
        hz_spec = (lam / lam[0, 0]) ** -_u(g, n, 0.7, 2.2, dev).view(n, 1)
        haze = amt.unsqueeze(1) * hz_spec.view(n, nb, 1, 1) * hazy.view(n, 1, 1, 1)
        x = x * (1 - 0.6 * haze) + haze

    # --- sensor
    sigma = _u(g, n, 0.0, 0.8, dev) * (torch.rand(n, generator=g, device=dev) < 0.7)
    x = _blur(x, sigma)
    x = x + torch.randn(x.shape, generator=g, device=dev) * _u(g, n, 0.0005, 0.005, dev).view(
        n, 1, 1, 1
    )
    x = x.clamp(0.0001, 2.0)

    # --- no data: the surface's own gaps, plus an orbit-edge cut on a few patches
    cut = torch.rand(n, generator=g, device=dev) < cfg.nodata
    if bool(cut.any()):
        yy = torch.arange(p, device=dev).view(1, p, 1).float()
        xx = torch.arange(p, device=dev).view(1, 1, p).float()
        ang = _u(g, n, 0, 2 * math.pi, dev).view(n, 1, 1)
        pos = _u(g, n, -0.4, 0.4, dev).view(n, 1, 1) * p
        side = (yy - p / 2) * torch.cos(ang) + (xx - p / 2) * torch.sin(ang) > pos
        nodata = nodata | (side & cut.view(n, 1, 1))
    x = x.masked_fill(nodata.unsqueeze(1), 0.0)
    labels[nodata] = IGNORE
    return x.float(), labels


__all__ = [
    "SkyConfig",
    "render",
    "cloud_labels",
    "fractal_noise",
    "CLEAR",
    "CLOUD",
    "SHADOW",
    "IGNORE",
]
