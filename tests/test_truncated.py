"""Cost reducers (App. A, G.4, G.11): subsampled and r-nearest-anchor truncated soft counts."""

from __future__ import annotations

import pytest
import torch

from der._ops import softmax_counts_reference
from der._ops.truncated import (
    approximation_error,
    nearest_anchors,
    subsampled_counts,
    truncated_counts,
)


def _anchor_form(n=3000, k=32, d=2, alpha=10.0, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*batch, n, d, generator=g, dtype=torch.float64)
    c = torch.rand(k, d, generator=g, dtype=torch.float64)
    return x, 2 * alpha * c, -alpha * (c * c).sum(-1), c


def test_exact_topr_are_nearest_anchors():
    x, W, b, c = _anchor_form(n=500, k=20)
    idx = nearest_anchors(x, W, b, 3, chunk_elems=100)
    ref = torch.cdist(x, c).topk(3, dim=-1, largest=False).indices
    assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)


@pytest.mark.parametrize("method", ["exact", "faiss"])
def test_truncation_error_bound_and_monotone(method):
    """‖n̂ − n‖₁ ≤ 2·Σ_i ε_i (ε_i: softmax mass outside point i's r nearest); error → 0 at r = k."""
    x, W, b, _ = _anchor_form(n=2000, k=32, alpha=30.0)
    p = torch.softmax(x @ W.T + b, dim=-1)
    exact = p.sum(0)
    errs = []
    for r in (1, 2, 4, 8, 32):
        approx = truncated_counts(x, W, b, r, method=method, chunk_elems=3000)
        kept = p.topk(r, dim=-1).values.sum(-1)
        l1 = (approx - exact).abs().sum()
        assert l1 <= 2 * (1 - kept).sum() + 1e-9
        torch.testing.assert_close(approx.sum(), torch.tensor(2000.0, dtype=torch.float64))
        errs.append(approximation_error(x, W, b, approx)["counts_rel_l1"])
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-12


def test_faiss_ivf_path_with_many_anchors():
    x, W, b, _ = _anchor_form(n=2000, k=600, alpha=50.0, seed=4)  # k // 39 ≥ 2 lists: IVF index
    exact_idx = nearest_anchors(x, W, b, 4)
    faiss_idx = nearest_anchors(x, W, b, 4, method="faiss", nprobe=64)
    top1 = (exact_idx[:, 0] == faiss_idx[:, 0]).double().mean()
    assert top1 > 0.9
    err = approximation_error(x, W, b, truncated_counts(x, W, b, 4, method="faiss", nprobe=64))
    assert err["counts_rel_l1"] < 0.5


def test_truncated_full_r_equals_reference_batched_with_grads():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, 3, 40, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(3, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    out = truncated_counts(f, W, b, 9, chunk_elems=100)
    ref = softmax_counts_reference(f, W, b)
    torch.testing.assert_close(out, ref)
    gout = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (f, W, b), gout), torch.autograd.grad(ref, (f, W, b), gout)):
        torch.testing.assert_close(a, r)


def test_truncated_gradcheck():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, d: truncated_counts(a, c, d, 2, chunk_elems=8), (f, W, b))


def test_subsampling_unbiased_and_exact_at_full():
    x, W, b, _ = _anchor_form(n=400, k=8)
    exact = softmax_counts_reference(x, W, b)
    torch.testing.assert_close(subsampled_counts(x, W, b, 400), exact)
    g = torch.Generator().manual_seed(0)
    mean = torch.stack([subsampled_counts(x, W, b, 50, generator=g) for _ in range(400)]).mean(0)
    assert ((mean - exact).abs().sum() / exact.sum()) < 0.02
    one = subsampled_counts(x, W, b, 50, generator=g)
    torch.testing.assert_close(one.sum(), torch.tensor(400.0, dtype=torch.float64))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, W, b: truncated_counts(x, W, b, 0), "r must be"),
        (lambda x, W, b: truncated_counts(x, W, b, 99), "r must be"),
        (lambda x, W, b: truncated_counts(x, W, b, 2, method="annoy"), "method must be"),
        (lambda x, W, b: truncated_counts(x, W[None], b, 2, method="faiss"), "shared parameters"),
        (lambda x, W, b: subsampled_counts(x, W, b, 0), "num must be"),
    ],
)
def test_bad_arguments_raise(call, match):
    x, W, b, _ = _anchor_form(n=50, k=8)
    with pytest.raises(ValueError, match=match):
        call(x, W, b)
