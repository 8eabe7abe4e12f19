"""EntropyRegularizer: families, heuristics, schedules, init, state round-trips, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import der
import der.functional as F
from der.schedules import LambdaWindow, anchor_heuristic, cosine_anneal


@pytest.mark.parametrize("family", ["ball", "halfspace", "box"])
def test_families_train_and_reduce_entropy(family):
    torch.manual_seed(0)
    x = torch.rand(256, 2)
    reg = der.EntropyRegularizer(family, lam=1.0, seed=1, tau=0.05)
    h0 = reg(x)
    opt = torch.optim.Adam(reg.parameters(), lr=0.05)
    for _ in range(40):
        opt.zero_grad()
        reg.loss(x).backward()
        opt.step()
    assert float(reg(x)) < float(h0)  # learnable ranges lower the entropy of a fixed set


def test_gradients_flow_to_points_and_parameters_and_match_functional():
    x = torch.randn(64, 3, dtype=torch.float64, requires_grad=True)
    reg = der.EntropyRegularizer("ball", num_anchors=5, alpha=3.0).double()
    h = reg(x)
    torch.testing.assert_close(h, F.anchor_entropy(x, reg.anchors, 3.0))
    h.backward()
    assert x.grad.abs().sum() > 0 and reg.anchors.grad.abs().sum() > 0


@pytest.mark.parametrize("rule, n, k", [("sqrt", 100, 10), ("sqrt", 99, 9), ("geometry", 1000, 16),
                                        ("geometry", 20, 5), ("geometry", 3, 1), ("lite", 1000, 10)])
def test_anchor_heuristics(rule, n, k):
    assert anchor_heuristic(n, rule) == k


def test_num_anchors_decided_at_first_call_and_halfspace_uses_log2_cells():
    reg = der.EntropyRegularizer("ball", heuristic="sqrt")
    reg(torch.randn(2, 100, 4))
    assert reg.anchors.shape == (10, 4)
    hs = der.EntropyRegularizer("halfspace")  # geometry: k = 16 cells → m = 4 planes
    hs(torch.randn(400, 2))
    assert hs.normals.shape == (4, 2) and hs.offsets.shape == (4,)


def test_eager_parameters_are_seeded_in_place_so_optimizer_stays_valid():
    reg = der.EntropyRegularizer("ball", dim=2, num_anchors=4, init="kmeans++")
    opt = torch.optim.SGD(reg.parameters(), lr=0.1)
    before = reg.anchors.detach().clone()
    x = torch.rand(50, 2) + 10
    reg.loss(x).backward()
    opt.step()
    assert reg.anchors is opt.param_groups[0]["params"][0]
    assert not torch.allclose(reg.anchors, before)
    assert float(reg.anchors.min()) > 9  # seeded on the data, not the Gaussian draw
    # k-means++ seeds are data points
    reg2 = der.EntropyRegularizer("ball", num_anchors=4, init="random")
    reg2.materialize(x)
    assert all(any(torch.equal(a, p) for p in x) for a in reg2.anchors.detach())


def test_faiss_init():
    pytest.importorskip("faiss")
    x = torch.cat([torch.randn(100, 2) * 0.1, torch.randn(100, 2) * 0.1 + 5])
    reg = der.EntropyRegularizer("ball", num_anchors=2, init="faiss")
    reg.materialize(x)
    got = sorted(float(a[0]) for a in reg.anchors.detach())
    assert got[0] == pytest.approx(0, abs=0.1) and got[1] == pytest.approx(5, abs=0.1)


def test_schedules_anneal_and_lambda_window():
    assert cosine_anneal(0, 10, 5, 100) == 10 and cosine_anneal(100, 10, 5, 100) == 5
    assert cosine_anneal(50, 10, 5, 100) == pytest.approx(7.5) and cosine_anneal(500, 10, 5, 100) == 5
    w = LambdaWindow(0.1, 20, 60)
    assert [w(t) for t in (0, 19, 20, 59, 60)] == [0, 0, 0.1, 0.1, 0]
    reg = der.EntropyRegularizer("ball", num_anchors=3, alpha=10, alpha_final=5, anneal_steps=10,
                                 lam=0.5, lam_start=2, lam_stop=4)
    x = torch.randn(30, 2)
    lams, alphas = [], []
    for _ in range(6):
        loss = reg.loss(x)
        lams.append(reg.lam)
        alphas.append(reg.alpha)
        loss.backward()  # outside the window: exact zero, still a graph over every parameter
        assert reg.anchors.grad is not None
        reg.step()
    assert lams == [0, 0, 0.5, 0.5, 0, 0] and alphas[0] == 10 and alphas[-1] < 10


def test_subsampling_bounds_points_and_is_unbiased_enough():
    x = torch.randn(5000, 2)
    reg = der.EntropyRegularizer("ball", num_anchors=6, subsample=1000, alpha=2.0)
    full = F.anchor_entropy(x, (reg.materialize(x), reg.anchors)[1].detach(), 2.0)
    vals = torch.stack([reg(x).detach() for _ in range(20)])
    assert abs(float(vals.mean() - full)) < 0.02 and float(vals.std()) > 0  # fresh subsets each call


def test_lite_variant_uses_cube_root():
    reg = der.EntropyRegularizer("ball", heuristic="lite")
    reg(torch.randn(1000, 3))
    assert reg.num_anchors == 10


@pytest.mark.parametrize("family", ["ball", "halfspace", "box"])
def test_state_dict_and_safetensors_round_trip(family, tmp_path):
    x = torch.rand(100, 2)
    reg = der.EntropyRegularizer(family, alpha=7.0, lam=0.3, lam_start=1, seed=3)
    h = reg(x)
    reg.step()
    fresh = der.EntropyRegularizer(family, alpha=7.0, lam=0.3, lam_start=1, seed=99)
    fresh.load_state_dict(reg.state_dict())
    torch.testing.assert_close(fresh(x), h)
    reg.save(tmp_path / "reg.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg.safetensors"]  # one file, no sidecar
    loaded = der.EntropyRegularizer.load(tmp_path / "reg.safetensors")
    torch.testing.assert_close(loaded(x), h)
    assert int(loaded.step_count) == 1 and loaded.lam == 0.3 and loaded.config() == reg.config()


def test_margin_and_box_bounds():
    reg = der.EntropyRegularizer("halfspace", num_anchors=3)
    x = torch.randn(50, 2)
    assert float(reg.margin(x)) >= 0
    box = der.EntropyRegularizer("box", num_anchors=2)
    box(x)
    assert bool((box.lows < box.highs).all())
    with pytest.raises(ValueError, match="halfspace"):
        box.margin(x)


@pytest.mark.parametrize("kwargs, match", [
    ({"family": "sphere"}, "family"), ({"init": "pca"}, "init"), ({"alpha": 0}, "alpha"),
    ({"tau": -1.0}, "tau"), ({"metric": "l3"}, "metric"), ({"alpha_final": 5.0}, "anneal_steps"),
    ({"num_anchors": 0}, "num_anchors"), ({"lam": -0.1}, "lam"), ({"heuristic": "elbow"}, "rule"),
    ({"lam_start": 5, "lam_stop": 2}, "start"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        der.EntropyRegularizer(**kwargs)


def test_bad_points_and_dimension_change():
    reg = der.EntropyRegularizer("ball", num_anchors=2)
    reg(torch.randn(10, 2))
    with pytest.raises(ValueError, match="dimension 3"):
        reg(torch.randn(10, 3))
    with pytest.raises(ValueError, match="NaN/Inf in 1 row"):
        reg(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]))


def test_k_greater_than_n_and_entropy_bounded():
    reg = der.EntropyRegularizer("ball", num_anchors=12)
    h = reg(torch.randn(4, 2))
    assert 0 <= float(h) <= math.log(12)


def test_saves_with_one_stem_do_not_mix_and_subsampling_continues(tmp_path):
    x = torch.randn(400, 2)
    a = der.EntropyRegularizer("ball", num_anchors=3, alpha=2.0, lam=0.1, subsample=50, seed=1)
    b = der.EntropyRegularizer("ball", num_anchors=3, alpha=9.0, lam=0.7, seed=2)
    a(x), b(x)
    a.save(tmp_path / "m.v1")
    b.save(tmp_path / "m.v2")
    la, lb = der.EntropyRegularizer.load(tmp_path / "m.v1"), der.EntropyRegularizer.load(tmp_path / "m.v2")
    assert (la.alpha, la.lam, lb.alpha, lb.lam) == (2.0, 0.1, 9.0, 0.7)
    torch.testing.assert_close(la.anchors, a.anchors)
    for _ in range(3):  # the subsample stream continues exactly where the saved one stood
        torch.testing.assert_close(la(x), a(x))


@pytest.mark.parametrize("update", ["ema", "frozen"])
def test_stop_gradient_rules_round_trip(update, tmp_path):
    x = torch.randn(200, 3)
    reg = der.EntropyRegularizer("ball", num_anchors=4, anchor_update=update, objective="commitment",
                                 geometry="normalized")
    for _ in range(3):
        reg(x)
    reg.save(tmp_path / "r.safetensors")
    back = der.EntropyRegularizer.load(tmp_path / "r.safetensors")
    assert back.config() == reg.config()
    torch.testing.assert_close(back.state_dict(), reg.state_dict())
    torch.testing.assert_close(back(x), reg(x))


def test_damaged_foreign_and_nan_files_name_the_file(tmp_path):
    reg = der.EntropyRegularizer("ball", num_anchors=2)
    reg(torch.randn(10, 2))
    p = reg.save(tmp_path / "r.safetensors")
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ValueError, match="r.safetensors"):
        der.EntropyRegularizer.load(p)
    from der._io import save_state

    q = save_state(tmp_path / "nan.safetensors", {"anchors": torch.full((2, 2), float("nan"))},
                   {"config": reg.config()}, kind="der.EntropyRegularizer")
    with pytest.raises(ValueError, match="nan.safetensors"):
        der.EntropyRegularizer.load(q)
    other = save_state(tmp_path / "o.safetensors", {"w": torch.ones(1)}, {}, kind="der.EntropyNet")
    with pytest.raises(ValueError, match="o.safetensors"):
        der.EntropyRegularizer.load(other)
