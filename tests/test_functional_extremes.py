"""der.functional at the edges: mixed dtypes, mismatched batches, huge/tiny scales, zero vectors, half counts.

Every case is checked against a float64 evaluation written out from the definitions (Eq. 1–6, App. H.3).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import der
from der import functional as dfn

f32, f64 = torch.float32, torch.float64


def _ref_distance(x, c, metric, L=None):
    x, c = x.double(), c.double()
    if metric == "mahalanobis":
        x, c, metric = x @ L.double().T, c @ L.double().T, "sqeuclidean"
    if metric == "cosine":
        xn = x / torch.where(x.norm(dim=-1, keepdim=True) > 0, x.norm(dim=-1, keepdim=True), 1.0)
        cn = c / torch.where(c.norm(dim=-1, keepdim=True) > 0, c.norm(dim=-1, keepdim=True), 1.0)
        return 1 - xn @ cn.transpose(-1, -2)
    sq = ((x.unsqueeze(-2) - c.unsqueeze(-3)) ** 2).sum(-1)
    return sq if metric == "sqeuclidean" else sq.sqrt()


def _ref_entropy_of(p):
    p = p / p.sum(-1, keepdim=True)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def ref_anchor_entropy(x, c, alpha, metric="sqeuclidean", L=None):
    return _ref_entropy_of(torch.softmax(-alpha * _ref_distance(x, c, metric, L), -1).sum(-2))


def ref_halfspace_entropy(x, w, b, tau):
    z = (x.double() @ w.double().T - b.double()) / tau
    m = w.shape[0]
    a = torch.tensor([[(j >> (m - 1 - t)) & 1 for t in range(m)] for j in range(2**m)], dtype=f64)
    logg = torch.nn.functional.logsigmoid(z) @ a.T + torch.nn.functional.logsigmoid(-z) @ (1 - a).T
    return _ref_entropy_of(torch.softmax(logg, -1).sum(-2))


# ---------------------------------------------------------------- issue reproducers: mixed dtypes
def test_mixed_dtypes_promote_like_torch():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(30, 2, generator=g), torch.randn(4, 2, generator=g)
    L = torch.eye(2, dtype=f64)
    h = dfn.anchor_entropy(x, c, 1.0, metric="mahalanobis", L=L)
    assert h.dtype == f64
    torch.testing.assert_close(h, ref_anchor_entropy(x, c, 1.0, "mahalanobis", L))
    p = dfn.soft_assign(x, c.double(), 1.0, metric="cosine")
    assert p.dtype == f64
    torch.testing.assert_close(p, torch.softmax(-_ref_distance(x, c, "cosine"), -1))
    hs = dfn.halfspace_entropy(x, c.double(), torch.zeros(4, dtype=f64))
    assert hs.dtype == f64
    torch.testing.assert_close(hs, ref_halfspace_entropy(x, c, torch.zeros(4), 0.1))
    gm = dfn.empirical_margin(x, c.double(), torch.zeros(4, dtype=f64))
    want = ((x.double() @ c.double().T).abs() / c.double().norm(dim=-1)).min()
    torch.testing.assert_close(gm, want)
    hb = dfn.box_entropy(x.half(), c.double() - 1, c.bfloat16() + 1)
    assert hb.dtype == f64
    for metric in dfn.METRICS:  # every metric, every order of the mixed pair
        Lm = torch.eye(2, dtype=torch.bfloat16) if metric == "mahalanobis" else None
        for a, b in ((x.half(), c.double()), (x.double(), c.bfloat16()), (x, c.double())):
            out = dfn.anchor_entropy(a, b, 2.0, metric=metric, L=Lm)
            assert out.dtype == f64
            torch.testing.assert_close(out, ref_anchor_entropy(a, b, 2.0, metric, Lm), atol=1e-6, rtol=0)


def test_mixed_dtypes_through_the_regularizer():
    reg = der.EntropyRegularizer(family="ball", dim=2, num_anchors=3, metric="mahalanobis",
                                 L=torch.eye(2, dtype=f64), lam=1.0)
    h = reg(torch.randn(40, 2, generator=torch.Generator().manual_seed(1)))
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("metric", dfn.METRICS)
def test_mismatched_batch_dims_raise_value_error(metric):
    L = torch.eye(2) if metric == "mahalanobis" else None
    x, c = torch.randn(3, 10, 2), torch.randn(2, 4, 2)
    for fn in (dfn.anchor_entropy, dfn.anchor_counts, dfn.soft_assign):
        with pytest.raises(ValueError, match="batch dimensions"):
            fn(x, c, 1.0, metric=metric, L=L)
    with pytest.raises(ValueError, match="batch dimensions"):
        dfn.pairwise_distance(x, c, metric=metric, L=L)


def test_mismatched_batch_dims_halfspace_box_margin():
    x, w, b = torch.randn(3, 10, 2), torch.randn(2, 2, 2), torch.zeros(2, 2)
    for call in (lambda: dfn.halfspace_entropy(x, w, b), lambda: dfn.empirical_margin(x, w, b),
                 lambda: dfn.box_entropy(x, w - 1, w + 1)):
        with pytest.raises(ValueError, match="batch dimensions"):
            call()


def test_L_must_be_a_tensor():
    with pytest.raises(TypeError, match="L must be a torch.Tensor"):
        dfn.anchor_entropy(torch.randn(5, 2), torch.randn(2, 2), metric="mahalanobis", L=[[1.0, 0.0], [0.0, 1.0]])


# ---------------------------------------------------------------- issue reproducers: extremes
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "mahalanobis"])
@pytest.mark.parametrize("scale", [1e19, 1e25, 1e30])
def test_float32_far_beyond_1e19_matches_float64(metric, scale):
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(50, 2, generator=g) * scale, torch.randn(4, 2, generator=g) * scale
    L = torch.tensor([[1.0, 0.5], [0.0, 2.0]]) if metric == "mahalanobis" else None
    alpha = 1.0 / scale ** (2 if metric != "euclidean" else 1)  # O(1) logits: a non-trivial entropy
    h = dfn.anchor_entropy(x, c, alpha, metric=metric, L=L)
    assert h.dtype == f32 and torch.isfinite(h)
    torch.testing.assert_close(h.double(), ref_anchor_entropy(x, c, alpha, metric, L), atol=1e-5, rtol=0)
    h1 = dfn.anchor_entropy(x, c, 1.0, metric=metric, L=L)  # hard assignment: still the float64 value
    torch.testing.assert_close(h1.double(), ref_anchor_entropy(x, c, 1.0, metric, L), atol=1e-5, rtol=0)


def test_halfspace_float32_huge_matches_float64():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(60, 2, generator=g) * 1e20, torch.randn(3, 2, generator=g) * 1e20
    b = torch.randn(3, generator=g) * 1e38
    h = dfn.halfspace_entropy(x, w, b, tau=1e40)
    assert torch.isfinite(h)
    torch.testing.assert_close(h.double(), ref_halfspace_entropy(x, w, b, 1e40), atol=1e-5, rtol=0)


def test_float64_overflow_is_a_clear_error():
    x = torch.randn(10, 2, dtype=f64) * 1e160
    with pytest.raises(ValueError, match="exceed the float64 range"):
        dfn.anchor_entropy(x, x[:3], 1.0)


def test_cosine_is_scale_invariant_at_1e20_and_1e_minus_20():
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(40, 3, generator=g), torch.randn(5, 3, generator=g)
    want = ref_anchor_entropy(x, c, 10.0, "cosine")
    assert float(want) < math.log(5) - 0.05  # far from uniform: a scale bug would show
    for s in (1e20, 1e30, 1e-13, 1e-30):
        h = dfn.anchor_entropy(x * s, c * s, 10.0, metric="cosine")
        torch.testing.assert_close(h.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, f32, f64])
def test_cosine_zero_vector_is_defined_with_zero_gradient(dtype):
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=dtype, requires_grad=True)
    c = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [0.0, 0.0]], dtype=dtype, requires_grad=True)
    p = dfn.soft_assign(x, c, 3.0, metric="cosine")
    d = dfn.pairwise_distance(x, c, metric="cosine")
    torch.testing.assert_close(d[0].float(), torch.ones(3))  # zero vector: distance 1 to all
    torch.testing.assert_close(d[:, 2].float(), torch.ones(3))  # ... and to a zero anchor
    torch.testing.assert_close(p[0].float(), torch.full((3,), 1 / 3))
    h = dfn.anchor_entropy(x, c, 3.0, metric="cosine")
    h.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(c.grad).all()
    assert float(x.grad[0].abs().max()) == 0.0 and float(c.grad[2].abs().max()) == 0.0
    assert float(x.grad.abs().max()) < 10 and float(c.grad.abs().max()) < 10


def test_cosine_gradcheck_tiny_rows():
    x = (torch.randn(6, 3, dtype=f64) * 1e-20).requires_grad_()
    c = torch.randn(3, 3, dtype=f64).requires_grad_()
    # rescale the gradient to O(1): d H / d x scales like 1/|x| for a direction-only function
    assert torch.autograd.gradcheck(lambda a, b: dfn.anchor_entropy(a * 1e-20, b, 2.0, metric="cosine"),
                                    (x.detach().mul(1e20).requires_grad_(), c))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_partition_entropy_half_counts(dtype):
    c = torch.tensor([40000.0, 40000.0], dtype=dtype)
    h = dfn.partition_entropy(c)
    assert h.dtype == f32
    torch.testing.assert_close(h, torch.tensor(math.log(2)))
    n = float(c.double().sum())  # 80000 (float16) / 79872 (bfloat16 rounds 40000 to 39936)
    torch.testing.assert_close(dfn.partition_entropy(c, normalized=False), torch.tensor(n * math.log(2)))
    soft = torch.tensor([1.0, 3.0, 0.0], dtype=dtype, requires_grad=True)
    dfn.partition_entropy(soft).backward()
    assert soft.grad is not None and torch.isfinite(soft.grad).all()


def test_empirical_margin_safe_dtype_and_huge_normals():
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(200, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    ref = ((x.double() @ w.double().T - b.double()).abs() / w.double().norm(dim=-1)).min()
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    ref_b = ((xb.double() @ wb.double().T - bb.double()).abs() / wb.double().norm(dim=-1)).min()
    got = dfn.empirical_margin(xb, wb, bb)
    assert got.dtype == f32
    assert abs(float(got) - float(ref_b)) <= 1e-6 * max(1.0, float(ref_b))  # exact up to float32 rounding
    assert float(dfn.empirical_margin(x, w, b)) == pytest.approx(float(ref), rel=1e-6)
    one = dfn.empirical_margin(torch.tensor([[1.0, 5.0]]), torch.tensor([[1e30, 0.0]]), torch.tensor([0.0]))
    assert float(one) == pytest.approx(1.0)
    tiny = dfn.empirical_margin(torch.tensor([[2.0, 5.0]]), torch.tensor([[1e-30, 0.0]]), torch.tensor([1e-30]))
    assert float(tiny) == pytest.approx(1.0)


def test_theory_margin_is_the_functional_one():
    from der import theory

    x, w, b = torch.randn(20, 2, dtype=f64), torch.randn(3, 2, dtype=f64), torch.randn(3, dtype=f64)
    assert theory.empirical_margin(x.numpy(), w.numpy(), b.numpy()) == float(dfn.empirical_margin(x, w, b))


# ---------------------------------------------------------------- hypothesis: dtypes × scales × α × metrics
_DT = [torch.float16, torch.bfloat16, f32, f64]


def _tol(work: torch.dtype, logits: torch.Tensor, k: int) -> float:
    """Entropy error allowed for rounding the logits in ``work`` (|Δlogit| ≲ eps·|logit|, times log k slack)."""
    eps = torch.finfo(work).eps
    return 1e-5 + 64 * eps * float(logits.abs().max()) * (1 + math.log(k))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), n=st.integers(1, 40), k=st.integers(1, 6), d=st.integers(1, 4),
       scale_exp=st.integers(-30, 30), alpha_exp=st.floats(-6, 4), metric=st.sampled_from(dfn.METRICS),
       dx=st.sampled_from(_DT), dc=st.sampled_from(_DT), dup=st.booleans())
def test_anchor_entropy_property(seed, n, k, d, scale_exp, alpha_exp, metric, dx, dc, dup):
    g = torch.Generator().manual_seed(seed)
    s = 10.0**scale_exp
    x64 = torch.randn(n, d, generator=g, dtype=f64) * s
    c64 = x64[torch.randint(0, n, (k,), generator=g)] if dup else torch.randn(k, d, generator=g, dtype=f64) * s
    x, c = x64.to(dx), c64.to(dc)
    L = torch.eye(d, dtype=f64) * 0.5 if metric == "mahalanobis" else None
    alpha = 10.0**alpha_exp
    if not (torch.isfinite(x).all() and torch.isfinite(c).all()):  # beyond float16/bfloat16 range
        with pytest.raises(ValueError, match="NaN/Inf"):
            dfn.anchor_entropy(x, c, alpha, metric=metric, L=L)
        return
    ref_d = _ref_distance(x, c, metric, L)
    logits = alpha * ref_d
    assume(float(logits.abs().max()) < 1e290)
    h = dfn.anchor_entropy(x, c, alpha, metric=metric, L=L)
    out = torch.promote_types(torch.promote_types(x.dtype, c.dtype), f64 if L is not None else x.dtype)
    assert h.dtype == (f32 if out in (torch.float16, torch.bfloat16) else out)
    want = _ref_entropy_of(torch.softmax(-logits, -1).sum(-2))
    work = f64 if h.dtype == f64 else f32
    assert abs(float(h) - float(want)) <= _tol(work, logits - logits.amin(-1, keepdim=True), k) + (
        0.0 if work == f64 else 1e-5 * (1 + float(logits.abs().max()) * 1e-7)
    ), (float(h), float(want))
    assert 0.0 <= float(h) <= math.log(k) + 1e-5


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), n=st.integers(1, 30), m=st.integers(1, 4), d=st.integers(1, 3),
       scale_exp=st.integers(-30, 30), tau_exp=st.floats(-6, 4), dx=st.sampled_from(_DT), dw=st.sampled_from(_DT))
def test_halfspace_entropy_property(seed, n, m, d, scale_exp, tau_exp, dx, dw):
    g = torch.Generator().manual_seed(seed)
    s = 10.0**scale_exp
    x = (torch.randn(n, d, generator=g, dtype=f64) * s).to(dx)
    w = torch.randn(m, d, generator=g, dtype=f64).to(dw)
    b = (torch.randn(m, generator=g, dtype=f64) * s).to(dw)
    tau = 10.0**tau_exp
    if not (torch.isfinite(x).all() and torch.isfinite(b).all()):
        with pytest.raises(ValueError, match="NaN/Inf"):
            dfn.halfspace_entropy(x, w, b, tau)
        return
    z = (x.double() @ w.double().T - b.double()) / tau
    assume(float(z.abs().max()) < 1e290)
    h = dfn.halfspace_entropy(x, w, b, tau)
    want = ref_halfspace_entropy(x, w, b, tau)
    work = f64 if h.dtype == f64 else f32
    assert abs(float(h) - float(want)) <= _tol(work, z, 2**m) * m, (float(h), float(want))


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.floats(0, 6e4), min_size=1, max_size=8), dtype=st.sampled_from(_DT))
def test_partition_entropy_counts_property(counts, dtype):
    t = torch.tensor(counts, dtype=f64).to(dtype)
    assume(float(t.double().sum()) > 0)
    want = _ref_entropy_of(t.double())
    h = dfn.partition_entropy(t)
    assert abs(float(h) - float(want)) <= 1e-5 * (1 + math.log(len(counts)))
