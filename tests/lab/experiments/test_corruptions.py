"""CIFAR-C-style corruption suite and mCE (Hendrycks & Dietterich)."""

from __future__ import annotations

import pytest
import torch

from der_lab.experiments.corruptions import CORRUPTIONS, FAMILIES, corrupt, mce, plasma_fractal, relative_mce


@pytest.fixture(scope="module")
def imgs():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(3, 1, 32, 32)
    x[:, :, 8:24, 12:20] = 0.8  # a bright bar on black, like a digit stroke
    return (x + 0.05 * torch.rand(x.shape, generator=g)).clamp(0, 1)


def test_families_cover_four_groups_and_14_cifar_c_corruptions():
    assert set(FAMILIES) == {"noise", "blur", "weather", "digital"}
    assert len(CORRUPTIONS) == 16  # 14 of CIFAR-C's 15 (no frost) + speckle + gaussian blur


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_keeps_shape_range_and_is_deterministic(imgs, name):
    a = corrupt(imgs, name, 3, seed=1)
    assert a.shape == imgs.shape and a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, corrupt(imgs, name, 3, seed=1))
    assert not torch.equal(corrupt(imgs, name, 5, seed=1), imgs)


@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "contrast", "brightness", "zoom_blur"])
def test_severity_increases_distortion(imgs, name):
    big = imgs.repeat(8, 1, 2, 2)  # enough pixels that sampling noise cannot reorder severities
    d = [float((corrupt(big, name, s) - big).abs().mean()) for s in range(1, 6)]
    assert all(b > a for a, b in zip(d, d[1:], strict=False)), d


def test_rgb_supported(imgs):
    rgb = imgs.repeat(1, 3, 1, 1)
    for name in ("glass_blur", "motion_blur", "jpeg_compression", "elastic_transform", "fog"):
        assert corrupt(rgb, name, 2).shape == rgb.shape


def test_bad_input(imgs):
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(imgs, "frost", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(imgs, "fog", 6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(imgs * 3, "fog", 1)
    with pytest.raises(ValueError, match="power of two"):
        plasma_fractal(30, 2.0, __import__("numpy").random.default_rng(0))


def test_mce_matches_hand_computation():
    ref = {"a": [0.1, 0.2, 0.3, 0.4, 0.5], "b": [0.2] * 5}
    f = {"a": [0.05, 0.1, 0.15, 0.2, 0.25], "b": [0.3] * 5}
    assert mce(ref, ref) == pytest.approx(100.0)
    assert mce(f, ref) == pytest.approx(100 * (0.5 + 1.5) / 2)
    assert relative_mce(f, 0.0, ref, 0.0) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="same corruptions"):
        mce({"a": ref["a"]}, ref)
