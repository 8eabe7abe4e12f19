r"""CIFAR-C-style corruptions (Hendrycks & Dietterich, 2019) that need no external assets, and mCE.

Every corruption maps grayscale or RGB images ``x: (n, C, H, W)`` in ``[0, 1]`` to corrupted images in
``[0, 1]`` at severity 1–5, deterministically for a given ``seed``. Severity constants follow the CIFAR-C
generator (``make_cifar_c.py``); spatial constants (blur radii, displacements) are given for 32-pixel images
and scaled by ``scale`` image pixels per CIFAR pixel (default ``W / 32``).

Families (14 of CIFAR-C's 15; *frost* is left out because it overlays photographs of frost that we do not
ship; speckle noise and Gaussian blur are CIFAR-C's extra corruptions):

* noise:   gaussian_noise, shot_noise, impulse_noise, speckle_noise
* blur:    defocus_blur, glass_blur, motion_blur, zoom_blur, gaussian_blur
* weather: snow (synthetic flakes streaked by motion blur), fog (plasma fractal), brightness
* digital: contrast, elastic_transform, pixelate, jpeg_compression

mCE (Hendrycks & Dietterich, Sec. 4): for classifier f and corruption c,
:math:`CE^f_c = \sum_{s=1}^5 E^f_{s,c} / \sum_{s=1}^5 E^{ref}_{s,c}`, and mCE is the mean of
:math:`CE^f_c` over corruptions, ×100. The paper normalizes by AlexNet; here the reference is the plain
(unregularized) model of the same run, so the plain model's mCE is 100 by construction.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CORRUPTIONS", "FAMILIES", "corrupt", "mce", "relative_mce", "plasma_fractal"]

Corruption = Callable[[torch.Tensor, int, np.random.Generator, float], torch.Tensor]


def _conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 'same' convolution with reflect padding; kernel (kh, kw) or per-image (n, kh, kw)."""
    n, c, h, w = x.shape
    if kernel.dim() == 2:
        kernel = kernel.expand(n, *kernel.shape)
    kh, kw = kernel.shape[-2:]
    xp = F.pad(x.reshape(1, n * c, h, w), (kw // 2, (kw - 1) // 2, kh // 2, (kh - 1) // 2), mode="reflect")
    k = kernel.to(x).repeat_interleave(c, 0).unsqueeze(1)
    return F.conv2d(xp, k, groups=n * c).reshape(n, c, h, w)


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """Normalized disk of ``radius`` smoothed by a Gaussian of σ = ``alias_blur`` (zero-padded, sums to 1)."""
    g = _gauss_kernel(max(alias_blur, 1e-3))
    r = int(math.ceil(radius)) + g.shape[0] // 2
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    d = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).float()
    d = F.conv2d(d[None, None], g[None, None], padding=g.shape[0] // 2)[0, 0]
    return d / d.sum()


def _line(length: int, angle: float) -> torch.Tensor:
    size = 2 * length + 1
    k = torch.zeros(size, size)
    for t in np.linspace(-length, length, 4 * length + 1):
        k[int(round(length + t * math.sin(angle))), int(round(length + t * math.cos(angle)))] = 1.0
    return k / k.sum()


def _clip(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0)


def _randn(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))


# ----------------------------------------------------------------------------- noise
def gaussian_noise(x, s, rng, scale):
    return _clip(x + [0.04, 0.06, 0.08, 0.09, 0.10][s - 1] * _randn(x, rng))


def shot_noise(x, s, rng, scale):
    c = [500, 250, 100, 75, 50][s - 1]
    return _clip(torch.from_numpy(rng.poisson(x.numpy() * c).astype(np.float32)) / c)


def impulse_noise(x, s, rng, scale):
    amount = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]
    u = torch.from_numpy(rng.random(x.shape).astype(np.float32))
    out = x.clone()
    out[u < amount / 2] = 0.0
    out[(u >= amount / 2) & (u < amount)] = 1.0
    return out


def speckle_noise(x, s, rng, scale):
    return _clip(x + x * [0.06, 0.10, 0.12, 0.16, 0.20][s - 1] * _randn(x, rng))


# ----------------------------------------------------------------------------- blur
def gaussian_blur(x, s, rng, scale):
    return _clip(_conv(x, _gauss_kernel([0.4, 0.6, 0.7, 0.8, 1.0][s - 1] * scale)))


def defocus_blur(x, s, rng, scale):
    r, a = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    return _clip(_conv(x, _disk(max(r * scale, 0.5) + 0.5, a * scale)))


def glass_blur(x, s, rng, scale):
    sigma, delta, iters = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][s - 1]
    n, c, h, w = x.shape
    y = _conv(x, _gauss_kernel(max(sigma * scale, 0.05)))
    d = max(1, int(round(delta * scale)))
    for _ in range(iters):  # local pixel shuffling: every pixel takes a random neighbour's value
        dy = torch.from_numpy(rng.integers(-d, d + 1, (n, h, w)))
        dx = torch.from_numpy(rng.integers(-d, d + 1, (n, h, w)))
        iy = (torch.arange(h)[None, :, None] + dy).clamp(0, h - 1)
        ix = (torch.arange(w)[None, None, :] + dx).clamp(0, w - 1)
        flat = (iy * w + ix).reshape(n, 1, h * w).expand(n, c, h * w)
        y = y.reshape(n, c, h * w).gather(2, flat).reshape(n, c, h, w)
    return _clip(_conv(y, _gauss_kernel(max(sigma * scale, 0.05))))


def motion_blur(x, s, rng, scale):
    length = max(1, int(round([1, 1.5, 2, 2.5, 3][s - 1] * scale)))
    kernels = torch.stack([_line(length, rng.uniform(-math.pi, math.pi)) for _ in range(x.shape[0])])
    return _clip(_conv(x, kernels))


def zoom_blur(x, s, rng, scale):
    zooms = [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
             np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)][s - 1]
    out = x.clone()
    h, w = x.shape[-2:]
    for z in zooms[1:]:
        big = F.interpolate(x, scale_factor=float(z), mode="bilinear", align_corners=False)
        top, left = (big.shape[-2] - h) // 2, (big.shape[-1] - w) // 2
        out = out + big[..., top : top + h, left : left + w]
    return _clip(out / len(zooms))


# ----------------------------------------------------------------------------- weather-like
def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map in [0, 1] of shape (mapsize, mapsize); mapsize a power of two."""
    if mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two, got {mapsize}")
    a = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0
    while step >= 2:
        half = step // 2
        wibble /= wibbledecay
        corner = a[0:mapsize:step, 0:mapsize:step]
        sq = corner + np.roll(corner, -1, 0)
        sq = sq + np.roll(sq, -1, 1)
        a[half:mapsize:step, half:mapsize:step] = sq / 4 + rng.uniform(-wibble, wibble, sq.shape)
        m = a.shape[0]
        dd = a[0:m:step, 0:m:step]
        ds = a[half:m:step, half:m:step]
        ltsum = ds + np.roll(ds, 1, 0) + dd + np.roll(dd, -1, 1)
        a[0:m:step, half:m:step] = ltsum / 4 + rng.uniform(-wibble, wibble, ltsum.shape)
        ttsum = ds + np.roll(ds, 1, 1) + dd + np.roll(dd, -1, 0)
        a[half:m:step, 0:m:step] = ttsum / 4 + rng.uniform(-wibble, wibble, ttsum.shape)
        step //= 2
    a -= a.min()
    return a / max(a.max(), 1e-12)


def fog(x, s, rng, scale):
    c0, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][s - 1]
    n, _, h, w = x.shape
    size = 1 << max(h, w, 2).bit_length()
    maps = np.stack([plasma_fractal(size, decay, rng)[:h, :w] for _ in range(n)]).astype(np.float32)
    mx = x.amax(dim=(1, 2, 3), keepdim=True)
    y = x + c0 * torch.from_numpy(maps)[:, None]
    return _clip(y * mx / (mx + c0))


def snow(x, s, rng, scale):
    # (flake density, flake threshold, streak length at 32 px, blend) — flakes streaked along one direction
    dens, thr, length, blend = [(0.1, 0.75, 2, 0.8), (0.2, 0.7, 3, 0.7), (0.55, 0.65, 3, 0.65),
                                (0.55, 0.6, 4, 0.6), (0.6, 0.55, 5, 0.55)][s - 1]
    flakes = torch.from_numpy(rng.random(x[:, :1].shape).astype(np.float32))
    flakes = ((flakes > 1 - dens * 0.1) & (flakes > thr)).float()
    kernels = torch.stack([_line(max(1, int(round(length * scale))), rng.uniform(-2.4, -0.8))
                           for _ in range(x.shape[0])])
    streaks = _clip(_conv(flakes, kernels) * 3.0)
    base = blend * x + (1 - blend) * torch.maximum(x, 0.5 * x.mean(1, keepdim=True) + 0.25)
    return _clip(base + streaks)


def brightness(x, s, rng, scale):
    return _clip(x + [0.05, 0.1, 0.15, 0.2, 0.3][s - 1])


# ----------------------------------------------------------------------------- digital
def contrast(x, s, rng, scale):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return _clip((x - m) * c + m)


def elastic_transform(x, s, rng, scale):
    # (displacement magnitude, smoothing σ) at 32 px, as fractions of the image size
    alpha, sigma = [(0.04, 0.04), (0.06, 0.04), (0.08, 0.035), (0.1, 0.03), (0.12, 0.03)][s - 1]
    n, _, h, w = x.shape
    field = _randn(torch.empty(n, 2, h, w), rng)
    field = _conv(field, _gauss_kernel(sigma * h))
    field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6) * alpha * 2
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = torch.stack([xs, ys], -1)[None] + field.permute(0, 2, 3, 1)
    return _clip(F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True))


def pixelate(x, s, rng, scale):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def jpeg_compression(x, s, rng, scale):
    from PIL import Image

    q = [80, 65, 58, 50, 40][s - 1]
    out = []
    for img in (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy():
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=q)
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0
        out.append(dec[None] if dec.ndim == 2 else dec.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("snow", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS: dict[str, Corruption] = {name: globals()[name] for fam in FAMILIES.values() for name in fam}


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0, scale: float | None = None) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1–5) to ``x: (n, C, H, W)`` in [0, 1].

    ``scale``: image pixels per CIFAR pixel for the spatial constants (default ``W / 32``). Upsampled
    digits carry detail only at their 8×8 source resolution, so the digits experiments pass ``W / 16``.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {sorted(CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    if x.dim() != 4:
        raise ValueError(f"images must be (n, C, H, W), got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x) or x.min() < 0 or x.max() > 1:
        raise ValueError("images must be floating point in [0, 1]")
    rng = np.random.default_rng([seed, severity, sorted(CORRUPTIONS).index(name)])
    if scale is None:
        scale = x.shape[-1] / 32.0
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    out = CORRUPTIONS[name](x.detach().float().cpu(), severity, rng, float(scale))
    return out.to(x.dtype)


def mce(errors: Mapping[str, list[float]], reference: Mapping[str, list[float]]) -> float:
    """Hendrycks & Dietterich mCE (×100): mean over corruptions of Σ_s E_{s,c} / Σ_s E^ref_{s,c}."""
    if set(errors) != set(reference):
        raise ValueError(f"errors and reference must cover the same corruptions, got {sorted(errors)} vs {sorted(reference)}")
    ces = []
    for c, e in errors.items():
        ref = sum(reference[c])
        if len(e) != 5 or len(reference[c]) != 5:
            raise ValueError(f"need 5 severities per corruption, got {len(e)} / {len(reference[c])} for {c!r}")
        if ref <= 0:
            raise ValueError(f"reference error for {c!r} is 0 at every severity: CE undefined")
        ces.append(sum(e) / ref)
    return 100.0 * float(np.mean(ces))


def relative_mce(errors: Mapping[str, list[float]], clean_error: float, reference: Mapping[str, list[float]],
                 reference_clean_error: float) -> float:
    """Relative mCE (×100): mean over c of Σ_s (E_{s,c} − E_clean) / Σ_s (E^ref_{s,c} − E^ref_clean)."""
    num = {c: [v - clean_error for v in e] for c, e in errors.items()}
    den = {c: [v - reference_clean_error for v in e] for c, e in reference.items()}
    return mce(num, den)


def main(argv: list[str] | None = None) -> int:
    """``der exp corruptions [--out grid.png]``: preview every corruption × severity on a few digits."""
    import argparse

    p = argparse.ArgumentParser(prog="der exp corruptions", description=main.__doc__)
    p.add_argument("--out", default=None, help="PNG path (default <results>/corruptions_grid.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="accepted for uniformity; the preview is always quick")
    a = p.parse_args(argv)
    from der_lab.harness import result_path

    a.out = result_path("corruptions_grid.png", a.out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from der.data import digits_dataset

    x = digits_dataset(limit=8).test_raw[:1]
    names = list(CORRUPTIONS)
    fig, axes = plt.subplots(len(names), 6, figsize=(6, len(names)))
    for i, name in enumerate(names):
        axes[i, 0].imshow(x[0, 0], cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_ylabel(name, rotation=0, ha="right", fontsize=6)
        for s in range(1, 6):
            axes[i, s].imshow(corrupt(x, name, s, a.seed, x.shape[-1] / 16)[0, 0], cmap="gray", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(a.out, dpi=80)
    print(f"wrote {a.out}")
    return 0
