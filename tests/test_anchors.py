"""der._anchors: update rules, objectives, geometry; non-degeneracy (property) and the paper rule's collapse."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import der
from der import functional as DF
from der._anchors import AnchorSet, anchor_objective, apply_geometry, live_anchors, sinkhorn


def _kmeans_optimum(x: np.ndarray, k: int) -> float:
    """Exact k-means distortion (mean squared distance to the cluster mean) by enumerating all labelings."""
    n = x.shape[0]
    best = math.inf
    for lab in itertools.product(range(k), repeat=n - 1):
        lab = np.array((0,) + lab)
        cost = sum(((x[lab == j] - x[lab == j].mean(0)) ** 2).sum() for j in range(k) if (lab == j).any())
        best = min(best, cost)
    return best / n


points = st.integers(3, 7).flatmap(lambda n: st.lists(
    st.tuples(st.floats(-10, 10), st.floats(-10, 10)), min_size=n, max_size=n))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pts=points, k=st.integers(2, 3), update=st.sampled_from(["gradient", "ema", "frozen"]),
       geometry=st.sampled_from(["raw", "normalized", "spread"]), seed=st.integers(0, 2**16),
       decays=st.lists(st.floats(0.0, 0.99), min_size=1, max_size=6), alpha=st.floats(0.05, 50.0))
def test_commitment_never_goes_below_the_kmeans_optimum(pts, k, update, geometry, seed, decays, alpha):
    """Points fixed: no sequence of the rule's own updates (EMA k-means steps with re-seeding, gradient
    steps, arbitrary jumps of the anchors) takes the commitment loss below the exact k-means optimum."""
    x = torch.tensor(pts, dtype=torch.float64)
    if geometry == "normalized" and bool((x.norm(dim=-1) < 1e-6).any()):
        x = x + 1.0
    xg, _ = apply_geometry(x, x[:1], geometry)
    opt = _kmeans_optimum(xg.numpy(), k)
    a = AnchorSet((k, 2), update="ema" if update == "ema" else update, init="random", geometry=geometry,
                  seed=seed, dtype=torch.float64)
    a.seed_from(x)
    gen = torch.Generator().manual_seed(seed)
    for g in decays:
        if update == "ema":
            a.ema_decay = g
            a.ema_update(x)
        elif update == "gradient":
            with torch.no_grad():  # anchors receive no gradient from commitment: any jump is allowed
                a.anchors.add_(torch.randn(a.anchors.shape, generator=gen, dtype=torch.float64) * 3)
        loss = a.objective(x, alpha, objective="commitment")
        assert float(loss) >= opt - 1e-9 * max(1.0, opt)


def test_commitment_moves_only_points_and_reaches_kmeans_at_lloyd_fixed_point():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 2, generator=g) * 0.1, torch.randn(20, 2, generator=g) * 0.1 + 4]).double()
    a = AnchorSet((2, 2), update="ema", ema_decay=0.0, init="kmeans++", dtype=torch.float64)
    a.seed_from(x)
    for _ in range(5):
        a.ema_update(x)  # decay 0: a plain Lloyd step
    xr = x.clone().requires_grad_(True)
    loss = a.objective(xr, 50.0, objective="commitment")
    loss.backward()
    assert xr.grad.abs().sum() > 0 and not a.anchors.requires_grad
    d = DF.pairwise_distance(x, a.anchors).amin(-1).mean()  # the k-means distortion of the fixed point
    assert float(loss) == pytest.approx(float(d), rel=1e-6)


def test_paper_rule_collapses_and_new_objectives_do_not():
    """Minimising over the anchors alone (points fixed): gradient+entropy drives H to ~0 with one live
    anchor; the marginal objective keeps every anchor live and ends near its bound −log k."""
    torch.manual_seed(0)
    x = torch.randn(128, 2, dtype=torch.float64)
    res = {}
    for obj in ("entropy", "marginal"):
        reg = der.EntropyRegularizer("ball", num_anchors=4, alpha=1.0, objective=obj).double()
        reg.materialize(x)
        opt = torch.optim.Adam(reg.parameters(), lr=0.1)
        for _ in range(300):
            opt.zero_grad()
            reg(x).backward()
            opt.step()
        res[obj] = (float(reg(x).detach()), int(live_anchors(x, reg.anchors)))
    assert res["entropy"][0] < 1e-3 and res["entropy"][1] == 1  # the collapse (documented)
    assert res["marginal"][1] == 4 and res["marginal"][0] < -0.9 * math.log(4)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 6), alpha=st.floats(1e-3, 1e3), scale=st.floats(1e-3, 1e3))
def test_marginal_is_bounded_by_minus_log_k_and_collapse_is_not_its_minimum(seed, k, alpha, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    c = torch.randn(k, 3, generator=g, dtype=torch.float64) * scale
    m = anchor_objective(x, c, alpha, objective="marginal")
    assert -math.log(k) - 1e-9 <= float(m) <= 1e-9  # mean H(p_i) ≤ H(mean p) (concavity)
    far = c.clone()
    far[1:] += 1e6  # one live anchor: every p_i is one-hot on anchor 0 → value 0
    assert float(anchor_objective(x, far, alpha, objective="marginal")) == pytest.approx(0.0, abs=1e-9)


def test_ema_keeps_every_anchor_live_on_one_blob():
    """The EMA rule on the blob where the paper rule collapses: anchors stay live (dead ones re-seeded)."""
    torch.manual_seed(0)
    x = torch.randn(128, 2, dtype=torch.float64)
    reg = der.EntropyRegularizer("ball", num_anchors=4, alpha=1.0, anchor_update="ema", ema_decay=0.9).double()
    with torch.no_grad():
        reg.materialize(x)
        reg.anchors[1:] += 100.0  # start from a collapsed state: three dead anchors
        for _ in range(30):
            reg(x)
    assert int(live_anchors(x, reg.anchors)) == 4 and float(reg(x)) > 0.9 * math.log(4)
    assert list(reg.parameters()) == [] and "ema_count" in reg.state_dict()


def test_ema_step_with_zero_decay_is_a_lloyd_step_and_batched_over_groups():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 2, generator=g, dtype=torch.float64)  # 3 groups (heads)
    a = AnchorSet((3, 4, 2), update="ema", ema_decay=0.0, init="random", dtype=torch.float64)
    a.seed_from(x)
    c0 = a.anchors.clone()
    a.ema_update(x)
    for h in range(3):
        lab = DF.pairwise_distance(x[h], c0[h]).argmin(-1)
        for j in range(4):
            if (lab == j).any():
                torch.testing.assert_close(a.anchors[h, j], x[h, lab == j].mean(0))


def test_objectives_match_functional_and_masks_drop_points():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64)
    c = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(anchor_objective(x, c, 0.7), DF.anchor_entropy(x, c, 0.7))
    mask = torch.ones(2, 1, 9, dtype=torch.bool)
    mask[1, :, 6:] = False
    for obj in ("entropy", "marginal", "commitment"):
        for geo in ("raw", "normalized", "spread"):
            got = anchor_objective(x, c, 0.7, objective=obj, geometry=geo, mask=mask)[1]
            ref = anchor_objective(x[1:, :, :6], c, 0.7, objective=obj, geometry=geo)[0]
            torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("obj, geo", [("marginal", "raw"), ("entropy", "spread"), ("entropy", "normalized"),
                                      ("marginal", "spread")])
def test_objectives_gradcheck(obj, geo):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64).requires_grad_()
    c = torch.randn(3, 3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: anchor_objective(a, b, 0.9, objective=obj, geometry=geo), (x, c))


def test_scale_free_geometries_are_invariant_to_shrinking():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    c = torch.randn(4, 3, generator=g, dtype=torch.float64)
    for geo in ("normalized", "spread"):
        for obj in ("entropy", "marginal", "commitment"):
            a = anchor_objective(x, c, 2.0, objective=obj, geometry=geo)
            b = anchor_objective(x * 1e-3, c * 1e-3, 2.0, objective=obj, geometry=geo)
            torch.testing.assert_close(a, b)
    raw = [float(anchor_objective(x * s, c * s, 2.0)) for s in (1.0, 1e-3)]
    assert raw[1] > raw[0] + 0.1  # raw geometry: shrinking changes H (points "cluster" by shrinking)


def test_sinkhorn_is_balanced_and_respects_mask():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 12, 3, generator=g, dtype=torch.float64) * 5
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 9:] = False
    q = sinkhorn(logits, mask, iters=500)
    torch.testing.assert_close(q.sum(-1), mask.double())
    torch.testing.assert_close(q.sum(-2), (mask.sum(-1, keepdim=True) / 3.0).double().expand(2, 3),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"anchor_update": "sgd"}, "anchor_update"), ({"objective": "kl"}, "objective"),
    ({"geometry": "log"}, "geometry"), ({"ema_decay": 1.0}, "ema_decay"),
    ({"objective": "commitment", "metric": "cosine"}, "commitment"),
    ({"family": "halfspace", "anchor_update": "ema"}, "family='ball'"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        der.EntropyRegularizer(**kwargs)
    from der.attention import DERConfig

    if "family" not in kwargs:
        with pytest.raises(ValueError, match=match):
            DERConfig(**kwargs)


def test_init_names_mean_the_same_everywhere():
    x = torch.randn(40, 3)
    for init in ("random", "data"):
        a = AnchorSet((5, 3), init=init)
        a.seed_from(x)
        assert all(any(torch.equal(r, p) for p in x) for r in a.anchors.detach())
    a = AnchorSet((5, 3), init="normal", seed=7)
    before = a.anchors.detach().clone()
    a.seed_from(x)
    assert torch.equal(a.anchors.detach(), before) and bool(a.initialized)
    with pytest.raises(ValueError, match="init"):
        AnchorSet((5, 3), init="pca")
