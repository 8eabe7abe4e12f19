"""Tests for der.geometry.preprocess_then and the exact pruning filters behind its 'prune' mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from der.geometry.entropynet import EntropyNet
from der.geometry.fast_infer import prune_hull, prune_maxima
from der.geometry.hull import convex_hull
from der.geometry.pipeline import _run_maxima, learned_directions, preprocess_then


def _brute_maxima(p: np.ndarray) -> np.ndarray:
    ge = (p[None, :, :] >= p[:, None, :]).all(-1)
    gt = (p[None, :, :] > p[:, None, :]).any(-1)
    return np.flatnonzero(~(ge & gt).any(1))


@pytest.fixture(scope="module")
def net() -> EntropyNet:
    torch.manual_seed(0)
    n = EntropyNet(widths=(8, 16, 16), head=8)
    n.materialize(torch.rand(256, 2))
    for p in n.point_mlp.parameters():
        torch.nn.init.normal_(p, std=0.5)
    torch.nn.init.normal_(n.out.weight, std=0.05)
    return n.eval()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(3, 24), st.sampled_from(["square", "disk", "parabola", "circle"]))
def test_prune_hull_is_exact(seed: int, m: int, dist: str) -> None:
    from der.geometry import data

    rng = np.random.default_rng(seed)
    p = data.generate(dist, 3000, seed=seed)
    keep = prune_hull(p, rng.normal(size=(m, 2)))
    assert set(keep[convex_hull(p[keep], method="monotone")].tolist()) == set(convex_hull(p, method="monotone").tolist())


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 3]))
def test_maxima_shim_and_prune_are_exact(seed: int, d: int) -> None:
    rng = np.random.default_rng(seed)
    p = np.round(rng.random((400, d)), 2)  # ties and duplicates on purpose
    ref = _brute_maxima(p)
    np.testing.assert_array_equal(_run_maxima(p), ref)
    keep = prune_maxima(p, rng.random((4, d)))
    np.testing.assert_array_equal(np.sort(keep[_run_maxima(p[keep])]), ref)


def test_none_mode_is_exact_and_timed() -> None:
    p = np.random.default_rng(1).random((5000, 2))
    r = preprocess_then(p, "hull", mode="none")
    assert r.errors["hull_area_symdiff_pct"] == 0.0 and r.errors["vertex_recall"] == 1.0
    assert set(r.input_index.tolist()) == set(convex_hull(p, method="qhull").tolist())
    assert {"network", "algorithm", "total"} <= set(r.timings) and r.timings["total"] >= r.timings["algorithm"]


def test_prune_mode_with_learned_ranges_has_zero_error(net: EntropyNet) -> None:
    p = np.random.default_rng(2).random((20000, 2))
    assert learned_directions(net).shape == (16, 2)
    r = preprocess_then(p, "hull", net=net, mode="prune")
    assert r.errors["hull_area_symdiff_pct"] == 0.0 and r.errors["vertex_recall"] == 1.0
    assert len(r.points) < len(p) / 4  # interior discarded


@pytest.mark.parametrize("mode", ["net", "fused"])
def test_net_modes_agree_and_report_errors(net: EntropyNet, mode: str) -> None:
    p = np.random.default_rng(3).random((3000, 2)) * 10
    r = preprocess_then(p, "hull", net=net, mode=mode)
    ref = net.preprocess(p)
    assert len(r.points) == len(r.index) and abs(len(r.points) - len(ref)) <= 3  # fp32 cell-edge ties
    assert r.errors["hull_area_symdiff_pct"] >= 0 and 0 <= r.errors["vertex_recall"] <= 1
    assert np.abs(r.points - p[r.index]).max() <= net.config.sigma * 10 + 1e-6


def test_delaunay_and_maxima(net: EntropyNet) -> None:
    p = np.random.default_rng(4).random((2000, 2))
    d = preprocess_then(p, "delaunay", net=net, mode="fused")
    assert d.result.shape[1] == 3 and d.errors["points_hausdorff_rel"] >= 0
    m = preprocess_then(np.random.default_rng(5).random((3000, 3)), "maxima", mode="prune")
    assert m.errors["f1"] == 1.0


def test_bad_input(net: EntropyNet) -> None:
    p = np.random.rand(100, 2)
    with pytest.raises(ValueError, match="algorithm"):
        preprocess_then(p, "voronoi", net=net)
    with pytest.raises(ValueError, match="mode"):
        preprocess_then(p, "hull", net=net, mode="magic")
    with pytest.raises(ValueError, match="Delaunay"):
        preprocess_then(p, "delaunay", net=net, mode="prune")
    with pytest.raises(ValueError, match="NaN"):
        preprocess_then(np.array([[0.0, np.nan]] * 5), "hull", net=net)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        preprocess_then(np.random.rand(10, 3), "hull", net=net)
