"""The streaming soft-count op (der._ops) against the float64 plain-autograd reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from der import _ops
from der._ops import softmax_counts, softmax_counts_reference
from der._ops.streaming import streaming_softmax_counts


def _inputs(fshape, wshape, bshape, dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    f = (scale * torch.randn(*fshape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    W = torch.randn(*wshape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(*bshape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return f, W, b


def _ref64(f, W, b, gout):
    f64, W64, b64 = (t.detach().double().requires_grad_() for t in (f, W, b))
    out = softmax_counts_reference(f64, W64, b64)
    return out.detach(), torch.autograd.grad(out, (f64, W64, b64), gout.double())


def _close(a, b, rtol):
    scale = b.abs().max().clamp_min(1e-12)
    assert ((a.double() - b).abs().max() / scale).item() < rtol, ((a.double() - b).abs().max() / scale).item()


SHAPES = [
    ((1000, 3), (7, 3), (7,)),  # plain
    ((2, 3, 301, 4), (3, 9, 4), (3, 9)),  # (B, H, N, d) keys, per-head anchors broadcast over B
    ((301, 4), (5, 9, 4), (9,)),  # one point set shared by 5 heads
    ((1, 5, 77, 2), (4, 1, 6, 2), (6,)),  # both sides broadcast
    ((2, 300, 16), (2, 9, 16), (2, 9)),  # f > 8: gradient products in the wide (untransposed) form
    ((301, 12), (3, 9, 12), (9,)),  # f > 8, one point set shared by 3 heads
]


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("chunk", [211, 1000, 1 << 18])  # chunk boundaries inside, at, beyond N
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_matches_float64_reference(shapes, chunk, dtype):
    f, W, b = _inputs(*shapes, dtype=dtype, seed=chunk)
    out = streaming_softmax_counts(f, W, b, chunk_elems=chunk)
    gout = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, (f, W, b), gout.to(dtype))
    ref, ref_grads = _ref64(f, W, b, gout)
    assert out.shape == ref.shape and out.dtype == dtype
    tol_v, tol_g = (1e-5, 1e-4) if dtype == torch.float32 else (1e-12, 1e-10)
    _close(out, ref, tol_v)
    for g, r, t in zip(grads, ref_grads, (f, W, b)):
        assert g.shape == t.shape and g.dtype == t.dtype
        _close(g, r, tol_g)


def test_large_n_float32_accuracy_through_dispatch():
    """N = 2·10⁵ float32 points (many chunks): counts to 1e-5 and gradients to 1e-4 of float64."""
    f, W, b = _inputs((200_000, 2), (64, 2), (64,), dtype=torch.float32, seed=3, scale=1.0)
    out = softmax_counts(f, W * 5, b)
    gout = torch.randn(64, dtype=torch.float64)
    grads = torch.autograd.grad(out, (f, W, b), gout.float())
    ref, ref_grads = _ref64(f, W * 5, b, gout)
    _close(out, ref, 1e-5)
    _close(grads[0], ref_grads[0], 1e-4)
    _close(grads[1], 5 * ref_grads[1], 1e-4)
    _close(grads[2], ref_grads[2], 1e-4)


def test_gradcheck_and_double_backward():
    for shapes in [((7, 2), (3, 2), (3,)), ((2, 5, 2), (2, 3, 2), (3,))]:
        f, W, b = _inputs(*shapes, seed=1)

        def fn(a, c, d):
            return streaming_softmax_counts(a, c, d, chunk_elems=12)

        assert torch.autograd.gradcheck(fn, (f, W, b))
        assert torch.autograd.gradgradcheck(fn, (f, W, b))


def test_no_n_by_k_tensor_saved_for_backward():
    """Memory contract: autograd keeps only the inputs (O((N+k)·f)), never an N×k matrix."""
    N, k, d = 50_000, 32, 2
    f, W, b = _inputs((N, d), (k, d), (k,), dtype=torch.float32)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = softmax_counts(f, W, b)
    assert max(saved) <= N * d < N * k
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        softmax_counts_reference(f, W, b)
    assert max(saved) >= N * k  # the reference does keep it: the hook really sees saved tensors
    out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    f, W, b = _inputs((5000, 3), (70, 3), (70,), dtype=dtype, seed=2, scale=1.0)
    out = softmax_counts(f, W, b)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert f.grad.dtype == dtype and W.grad.dtype == dtype
    ref = softmax_counts_reference(f.double(), W.double(), b.double())
    _close(out, ref, 1e-5)


def test_forward_ad_falls_back_to_reference():
    import torch.autograd.forward_ad as fwAD

    f, W, b = _inputs((3000, 2), (100, 2), (100,))
    tangent = torch.randn_like(f)
    with fwAD.dual_level():
        out = softmax_counts(fwAD.make_dual(f.detach(), tangent), W.detach(), b.detach())
        jvp = fwAD.unpack_dual(out).tangent
    ref = torch.func.jvp(
        lambda x: softmax_counts_reference(x, W.detach(), b.detach()), (f.detach(),), (tangent,)
    )
    torch.testing.assert_close(jvp, ref[1])


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 300),
    k=st.integers(1, 40),
    fdim=st.integers(1, 5),
    batch=st.sampled_from([(), (2,), (2, 3)]),
    chunk=st.integers(1, 500),
    shift=st.floats(-50, 50),
)
def test_properties(n, k, fdim, batch, chunk, shift):
    """Σ_j n_j = N per set, n_j ≥ 0, and invariance to a common shift of the bias (softmax)."""
    f, W, b = _inputs((*batch, n, fdim), (k, fdim), (k,), seed=n * 41 + k)
    out = streaming_softmax_counts(f, W, b, chunk_elems=chunk)
    assert out.shape == (*batch, k)
    assert bool((out >= 0).all())
    torch.testing.assert_close(out.sum(-1), torch.full(batch, float(n), dtype=torch.float64))
    torch.testing.assert_close(streaming_softmax_counts(f, W, b + shift, chunk_elems=chunk), out)


@pytest.mark.parametrize(
    "args, match",
    [
        (((10,), (3, 2), (3,)), "feat needs at least 2 dims"),
        (((10, 2), (3, 4), (3,)), "disagree on f"),
        (((10, 2), (3, 2), (4,)), "disagree on k"),
        (((2, 10, 2), (3, 3, 2), (3,)), "batch dims do not broadcast"),
    ],
)
def test_bad_shapes_raise(args, match):
    with pytest.raises(ValueError, match=match):
        softmax_counts(*(torch.zeros(s) for s in args))


def test_integer_input_raises():
    with pytest.raises(ValueError, match="floating-point"):
        softmax_counts(torch.zeros(4, 2, dtype=torch.long), torch.zeros(3, 2), torch.zeros(3))


def test_exports():
    assert _ops.softmax_counts is softmax_counts
