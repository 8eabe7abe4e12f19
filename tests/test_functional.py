"""der.functional against float64 references, gradcheck, property tests and bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import der.functional as F


def ref_anchor_entropy(x, c, alpha, metric="sqeuclidean", L=None):
    """Plain float64 reference of Eq. 2–3 with explicit loops over metrics."""
    x, c = x.double(), c.double()
    if metric == "mahalanobis":
        x, c, metric = x @ L.double().T, c @ L.double().T, "sqeuclidean"
    if metric == "cosine":
        d = 1 - torch.nn.functional.cosine_similarity(x.unsqueeze(-2), c.unsqueeze(-3), dim=-1)
    else:
        d = torch.cdist(x, c) ** (2 if metric == "sqeuclidean" else 1)
    p = torch.softmax(-alpha * d, -1).mean(-2)
    return -(p * p.log()).sum(-1)


def ref_cells_entropy(z, a, b):
    """Eq. 5–6 literally: products of h and (1-h), normalized (probability space)."""
    h = torch.sigmoid(z.double())
    num = torch.stack([torch.prod(h ** a[j] * (1 - h) ** b[j], dim=-1) for j in range(a.shape[0])], -1)
    g = num / num.sum(-1, keepdim=True)
    q = g.mean(-2)
    return -(q * torch.log(q)).sum(-1)


@pytest.mark.parametrize("metric", F.METRICS)
@pytest.mark.parametrize("shape", [(40, 3), (2, 5, 33, 3)])
def test_anchor_entropy_matches_reference(metric, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    c = torch.randn(6, 3, generator=g)
    L = torch.randn(3, 3, generator=g) if metric == "mahalanobis" else None
    got = F.anchor_entropy(x, c, 3.0, metric, L)
    want = ref_anchor_entropy(x, c, 3.0, metric, L)
    assert got.shape == shape[:-2]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_soft_assign_rows_sum_to_one_and_match_counts():
    x, c = torch.randn(50, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    p = F.soft_assign(x, c, 2.0)
    torch.testing.assert_close(p.sum(-1), torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(F.anchor_counts(x, c, 2.0), p.sum(0))


def test_far_from_origin_is_precise_in_float32():
    """Shift invariance is used to avoid cancellation: points at 1e4 with unit spread."""
    x = torch.randn(200, 2, dtype=torch.float64) + 1e4
    c = torch.randn(5, 2, dtype=torch.float64) + 1e4
    want = ref_anchor_entropy(x, c, 10.0)
    got = F.anchor_entropy(x.float(), c.float(), 10.0)
    assert abs(float(got) - float(want)) < 1e-3


@pytest.mark.parametrize("metric", F.METRICS)
def test_gradcheck_ball(metric):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 3, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    L = torch.randn(3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    if metric == "mahalanobis":
        assert torch.autograd.gradcheck(lambda x, c, L: F.anchor_entropy(x, c, 1.5, metric, L), (x, c, L))
    else:
        assert torch.autograd.gradcheck(lambda x, c: F.anchor_entropy(x, c, 1.5, metric), (x, c))


def test_halfspace_matches_probability_space_reference_and_gradcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    a, bb = F.cell_codes(3, torch.float64)
    want = ref_cells_entropy((x @ w.T - b) / 0.5, a, bb)
    torch.testing.assert_close(F.halfspace_entropy(x, w, b, 0.5), want)
    assert torch.autograd.gradcheck(lambda x, w, b: F.halfspace_entropy(x, w, b, 0.5), (x, w, b))


def test_halfspace_explicit_cells_and_small_tau_is_stable():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 2, dtype=torch.float64, generator=g)
    w, b = torch.randn(4, 2, dtype=torch.float64, generator=g), torch.zeros(4, dtype=torch.float64)
    # explicit cells: only the patterns that "use" the first two planes (a coarser gate, K=4)
    a = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    b_codes = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float64)
    h = F.halfspace_entropy(x, w, b, 0.3, cells=(a, b_codes))
    assert 0 <= float(h) <= math.log(4) + 1e-12
    xs = x.clone().requires_grad_(True)
    tau = min(1e-4, float(F.empirical_margin(x, w, b) * w.norm(dim=-1).min()) / 50)
    hs = F.halfspace_entropy(xs, w, b, tau)  # tiny τ: sigmoid saturates, log space stays finite
    hs.backward()
    assert torch.isfinite(hs) and torch.isfinite(xs.grad).all()
    # hard limit: the entropy of the sign-pattern labels
    labels = ((x @ w.T - b) > 0).long() @ (2 ** torch.arange(4))
    torch.testing.assert_close(hs.detach(), F.partition_entropy(labels), atol=1e-6, rtol=0)


def test_box_entropy_gradcheck_and_hard_limit():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(40, 2, dtype=torch.float64, generator=g, requires_grad=True)
    lows = torch.tensor([[0.1, 0.1], [0.5, 0.2]], dtype=torch.float64, requires_grad=True)
    highs = torch.tensor([[0.6, 0.7], [0.9, 0.8]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, lo, hi: F.box_entropy(x, lo, hi, 0.2), (x, lows, highs))
    inside = ((x > lows[:, None]) & (x < highs[:, None])).all(-1).T.long()  # (N, m)
    labels = inside @ torch.tensor([1, 2])
    got = F.box_entropy(x.detach(), lows.detach(), highs.detach(), tau=1e-6)
    torch.testing.assert_close(got, F.partition_entropy(labels), atol=1e-6, rtol=0)


def test_half_precision_inputs_computed_in_float32():
    x, c = torch.randn(100, 3), torch.randn(5, 3)
    for dt in (torch.float16, torch.bfloat16):
        h = F.anchor_entropy(x.to(dt), c.to(dt), 4.0)
        assert h.dtype == torch.float32
        torch.testing.assert_close(h, ref_anchor_entropy(x.to(dt).float(), c.to(dt).float(), 4.0).float(),
                                   rtol=1e-4, atol=1e-5)
        assert F.halfspace_entropy(x.to(dt), c.to(dt), torch.zeros(5, dtype=dt)).dtype == torch.float32


# ---------------------------------------------------------------- properties (hypothesis)
finite = st.floats(-5, 5, allow_nan=False, width=64)


@st.composite
def point_sets(draw):
    n, k, d = draw(st.integers(1, 25)), draw(st.integers(1, 8)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.floats(0.01, 10))
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale,
            torch.randn(k, d, generator=g, dtype=torch.float64) * scale, seed)


@settings(max_examples=60, deadline=None)
@given(point_sets(), st.floats(0.01, 50))
def test_bounds_order_and_shift_invariance(sets, alpha):
    x, c, seed = sets
    k = c.shape[0]
    h = F.anchor_entropy(x, c, alpha)
    assert -1e-12 <= float(h) <= math.log(k) + 1e-9
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(F.anchor_entropy(x[perm], c, alpha), h, rtol=1e-9, atol=1e-9)
    shift = torch.randn(x.shape[1], dtype=torch.float64) * 3
    torch.testing.assert_close(F.anchor_entropy(x + shift, c + shift, alpha), h, rtol=1e-7, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(point_sets())
def test_alpha_limits_and_single_anchor(sets):
    x, c, _ = sets
    k = c.shape[0]
    assert abs(float(F.anchor_entropy(x, c, 1e-9)) - math.log(k)) < 1e-6  # α → 0: uniform
    assert abs(float(F.anchor_entropy(x, c[:1], 3.0))) < 1e-12  # one anchor: 0
    d = torch.cdist(x, c) ** 2
    top2 = d.topk(2, largest=False).values if k > 1 else None
    if k > 1 and float((top2[:, 1] - top2[:, 0]).min()) > 1e-3:  # no near-ties: α → ∞ is the hard entropy
        alpha = 60.0 / float((top2[:, 1] - top2[:, 0]).min())
        want = F.partition_entropy(d.argmin(-1))
        assert abs(float(F.anchor_entropy(x, c, alpha)) - float(want)) < 1e-6


def test_k_larger_than_n_is_allowed():
    x, c = torch.randn(3, 2, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    h = F.anchor_entropy(x, c, 2.0)
    torch.testing.assert_close(h, ref_anchor_entropy(x, c, 2.0))


# ---------------------------------------------------------------- hard entropy & margin
def test_partition_entropy_values_and_units():
    assert float(F.partition_entropy(np.array([0, 0, 1, 1]))) == pytest.approx(math.log(2))
    assert float(F.partition_entropy(torch.tensor([7, 7, 7]))) == 0.0
    counts = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    h = float(F.partition_entropy(counts))
    assert h == pytest.approx(0.5 * math.log(4) + 0.5 * math.log(2))
    assert float(F.partition_entropy(counts, normalized=False)) == pytest.approx(4 * h)
    assert float(F.partition_entropy([3, 0, 3], kind="counts")) == pytest.approx(math.log(2))


def test_empirical_margin_brute_force():
    x = torch.randn(20, 2, dtype=torch.float64)
    w, b = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    want = min(abs(float(w[t] @ x[i] - b[t])) / float(w[t].norm()) for i, t in itertools.product(range(20), range(3)))
    assert float(F.empirical_margin(x, w, b)) == pytest.approx(want)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: F.anchor_entropy(torch.tensor([[0.0, float("nan")], [1, 1], [float("inf"), 0]]), torch.zeros(2, 2)),
         "2 row"),
        (lambda: F.anchor_entropy(torch.zeros(0, 2), torch.zeros(2, 2)), "empty"),
        (lambda: F.anchor_entropy(torch.zeros(5), torch.zeros(2, 2)), r"\(\.\.\., N, d\)"),
        (lambda: F.anchor_entropy(torch.zeros(5, 3), torch.zeros(2, 2)), "dimension 2"),
        (lambda: F.anchor_entropy(torch.zeros(5, 2), torch.zeros(2, 2), alpha=0.0), "alpha"),
        (lambda: F.anchor_entropy(torch.zeros(5, 2), torch.zeros(2, 2), alpha=-1.0), "alpha"),
        (lambda: F.anchor_entropy(torch.zeros(5, 2), torch.zeros(2, 2), metric="l7"), "metric"),
        (lambda: F.anchor_entropy(torch.zeros(5, 2), torch.zeros(2, 2), metric="mahalanobis"), "needs the factor L"),
        (lambda: F.halfspace_entropy(torch.zeros(5, 2), torch.ones(2, 2), torch.zeros(2), tau=0), "tau"),
        (lambda: F.halfspace_entropy(torch.zeros(5, 2), torch.ones(20, 2), torch.zeros(20)), "2\\^20"),
        (lambda: F.halfspace_entropy(torch.zeros(5, 2), torch.ones(2, 2), torch.zeros(3)), "offsets"),
        (lambda: F.box_entropy(torch.zeros(5, 2), torch.zeros(2, 2), torch.ones(3, 2)), "equal shapes"),
        (lambda: F.anchor_entropy(torch.zeros(5, 2, dtype=torch.long), torch.zeros(2, 2)), "floating"),
        (lambda: F.partition_entropy(torch.zeros(0, dtype=torch.long)), "non-empty"),
        (lambda: F.partition_entropy(torch.tensor([-1.0, 2.0])), "non-negative"),
        (lambda: F.empirical_margin(torch.ones(4, 2), torch.zeros(1, 2), torch.zeros(1)), "non-zero"),
    ],
)
def test_bad_input_raises_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
