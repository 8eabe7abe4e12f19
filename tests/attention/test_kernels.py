"""block_sparse_attention: every backend equals masked dense SDPA (forward and backward), gradcheck, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from der.attention import kernels
from der.attention.kernels import block_sparse_attention
from der.attention.layout import BlockLayout


def bsa(q, k, v, lay, bs, causal=False, **kw):
    """``block_sparse_attention`` on a bare block mask (wrapped for ``q``'s N)."""
    if not isinstance(lay, BlockLayout):
        lay = BlockLayout.from_mask(lay, bs, q.shape[-2], causal)
    return block_sparse_attention(q, k, v, lay, **kw)


def expand_layout(layout, bs, n, causal=False):
    return BlockLayout.from_mask(layout, bs, n, causal).to_dense()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: OpenMP sync dominates on the shared 2-core machine, so run these tests on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(B, H, N, Dh, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, Dh, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def _layout(Bl, H, nb, density, seed=0, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    lay = torch.rand(Bl, H, nb, nb, generator=g) < density
    if empty_row:
        lay[0, 0, nb // 2] = False
    return lay


def _naive(q, k, v, layout, bs, causal, scale=None, kpm=None):
    """Float64 reference: explicit masked softmax, empty rows → 0."""
    n = q.shape[-2]
    mask = expand_layout(layout, bs, n, causal)
    if kpm is not None:
        mask = mask & kpm[:, None, None, :]
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def _fwd_bwd(backend, q, k, v, lay, bs, causal, scale=None):
    out = bsa(q, k, v, lay, bs, causal=causal, backend=backend, scale=scale)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    return out, grads


CASES = [  # B, Bl, H, N, Dh, bs, causal
    (2, 1, 3, 128, 8, 32, False),
    (2, 2, 2, 200, 16, 32, False),  # N % bs != 0, per-batch layouts
    (1, 1, 2, 130, 8, 32, True),  # padding + causal
    (2, 2, 3, 96, 8, 16, True),
]


@pytest.mark.parametrize("B,Bl,H,N,Dh,bs,causal", CASES)
def test_cpu_and_dense_match_naive_float64(B, Bl, H, N, Dh, bs, causal):
    q, k, v = _inputs(B, H, N, Dh)
    lay = _layout(Bl, H, math.ceil(N / bs), 0.4)
    ref = _naive(q, k, v, lay, bs, causal)
    ref_g = torch.autograd.grad((ref * torch.linspace(-1, 1, ref.numel(), dtype=ref.dtype).view_as(ref)).sum(),
                                (q, k, v))
    for backend in ("gather", "dense"):
        out, grads = _fwd_bwd(backend, q, k, v, lay, bs, causal)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
        for g, r in zip(grads, ref_g, strict=True):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_matches_dense_sdpa_float32_1e5(causal):
    B, H, N, Dh, bs = 2, 4, 320, 32, 64
    q, k, v = _inputs(B, H, N, Dh, torch.float32, seed=1)
    lay = _layout(1, H, 5, 0.3, seed=1)
    o1, g1 = _fwd_bwd("gather", q, k, v, lay, bs, causal)
    o2, g2 = _fwd_bwd("dense", q, k, v, lay, bs, causal)
    assert (o1 - o2).abs().max() < 1e-5
    for a, b in zip(g1, g2, strict=True):
        assert (a - b).abs().max() < 1e-5


def test_empty_rows_are_zero_with_zero_grad():
    q, k, v = _inputs(1, 2, 96, 8)
    lay = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    lay[0, 1, 1] = False  # head 1, query block 1 attends to nothing
    out, (gq, _, _) = _fwd_bwd("gather", q, k, v, lay, 32, False)
    assert torch.all(out[0, 1, 32:64] == 0) and torch.all(gq[0, 1, 32:64] == 0)
    assert torch.isfinite(out).all() and out[0, 0].abs().sum() > 0
    # causal: a row whose only kept block lies in the future is empty too
    lay2 = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    lay2[..., 0, 2] = True
    lay2[..., 1:, 0] = True
    out2 = bsa(q, k, v, lay2, 32, causal=True)
    assert torch.all(out2[:, :, :32] == 0)
    torch.testing.assert_close(out2, bsa(q, k, v, lay2, 32, causal=True, backend="dense"))


def test_gradcheck_custom_backward():
    q, k, v = _inputs(1, 2, 20, 3)
    mask = _layout(1, 2, 3, 0.6, seed=3)
    for causal in (False, True):
        lay = BlockLayout.from_mask(mask, 8, 20, causal)  # one layout: its plan is built once
        assert torch.autograd.gradcheck(
            lambda a, b, c, lay=lay: block_sparse_attention(a, b, c, lay, backend="gather", scale=0.7),
            (q, k, v), atol=1e-6)
    kpm = torch.ones(1, 20, dtype=torch.bool)
    kpm[0, :16] = False  # head 1, query block 0 keeps only key block 1 → dead rows in the gradcheck too
    lay = BlockLayout.from_mask(mask, 8, 20)
    assert torch.autograd.gradcheck(
        lambda a, b, c: block_sparse_attention(a, b, c, lay, backend="gather", key_padding_mask=kpm),
        (q, k, v), atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(16, 100), bs=st.sampled_from([8, 16]), density=st.floats(0.0, 1.0),
       causal=st.booleans(), seed=st.integers(0, 10_000))
def test_property_cpu_equals_reference(n, bs, density, causal, seed):
    if n < bs:
        n = bs
    q, k, v = _inputs(1, 2, n, 4, seed=seed)
    lay = _layout(1, 2, math.ceil(n / bs), density, seed=seed, empty_row=False)
    out = bsa(q, k, v, lay, bs, causal=causal, backend="gather")
    torch.testing.assert_close(out, _naive(q, k, v, lay, bs, causal), atol=1e-10, rtol=1e-9)
    # invariant: a full layout is exactly dense attention
    full = torch.ones_like(lay)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(bsa(q, k, v, full, bs, causal=causal), dense)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in _inputs(1, 2, 64, 16, torch.float32))
    lay = _layout(1, 2, 4, 0.5, empty_row=False)
    out = bsa(q, k, v, lay, 16)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()
    ref = bsa(q.float(), k.float(), v.float(), lay, 16, backend="dense")
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_flex_eager_matches_dense_cpu():
    q, k, v = (t.detach().float() for t in _inputs(2, 2, 200, 16))
    lay = _layout(2, 2, 7, 0.4)
    for causal in (False, True):
        out = kernels._flex(q, k, v, BlockLayout(lay, 32, 200, causal), 0.25, compiled=False)
        ref = bsa(q, k, v, lay, 32, causal=causal, backend="dense", scale=0.25)
        assert (out - ref).abs().max() < 1e-5


@pytest.mark.slow
def test_flex_compiled_matches_dense_cpu():
    q, k, v = (t.detach().float() for t in _inputs(1, 2, 200, 16))
    lay = _layout(1, 2, 4, 0.5)
    out = bsa(q, k, v, lay, 64, backend="flex")
    ref = bsa(q, k, v, lay, 64, backend="dense")
    assert (out - ref).abs().max() < 1e-5


def test_flex_cpu_training_raises_and_auto_trains():
    q, k, v = (t.detach().float().requires_grad_() for t in _inputs(1, 2, 64, 8))
    lay = _layout(1, 2, 2, 1.0, empty_row=False)
    with pytest.raises(ValueError, match="no CPU backward"):
        bsa(q, k, v, lay, 32, backend="flex")
    bsa(q, k, v, lay, 32, backend="auto").sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_plan_cached_on_the_layout_across_calls_and_batch_sizes():
    lay = BlockLayout.from_mask(_layout(1, 2, 3, 0.5), 32, 96)
    plans = set()
    for B in (1, 3, 1):
        q = torch.randn(B, 2, 96, 8)
        block_sparse_attention(q, q, q, lay)
        plans.add(id(lay.derived("gather_plan", lambda: None)))
    assert len(plans) == 1
    short = lay.resize(90)  # another N: another (cached) layout with its own plan
    q = torch.randn(1, 2, 90, 8)
    block_sparse_attention(q, q, q, short)
    assert lay.resize(90) is short and short.derived("gather_plan", lambda: None) is not None
    assert lay.derived("gather_plan", lambda: None) is not short.derived("gather_plan", lambda: None)


def test_layout_edited_in_place_gets_a_new_plan():
    """The layout's derived cache follows in-place edits of its mask (also through a view)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 96, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = _layout(1, 2, 3, 0.6, empty_row=False)
    lay = BlockLayout.from_mask(mask, 32, 96)
    for edit in (lambda t: t[0, 0].fill_(True), lambda t: t[0, 1, 1].logical_not_()):
        block_sparse_attention(q, k, v, lay)
        edit(mask[0:1])  # in place, through a view
        ref = block_sparse_attention(q, k, v, lay, backend="dense")
        torch.testing.assert_close(block_sparse_attention(q, k, v, lay), ref, rtol=1e-10, atol=1e-10)
    for seed in range(4):  # fresh layouts with other contents
        lay = BlockLayout.from_mask(_layout(1, 2, 3, 0.5, seed=seed), 32, 96)
        ref = block_sparse_attention(q, k, v, lay, backend="dense")
        torch.testing.assert_close(block_sparse_attention(q, k, v, lay), ref, rtol=1e-10, atol=1e-10)
        del lay
    with torch.inference_mode():  # no version counter: never cached
        mask = _layout(1, 2, 3, 0.5, empty_row=False)
        lay = BlockLayout.from_mask(mask, 32, 96)
        block_sparse_attention(q, k, v, lay)
        mask[0, 0].fill_(True)
        ref = block_sparse_attention(q, k, v, lay, backend="dense")
        torch.testing.assert_close(block_sparse_attention(q, k, v, lay), ref, rtol=1e-10, atol=1e-10)


def test_bare_tensor_layout_is_a_clear_type_error_and_cpu_alias_warns():
    q = torch.randn(1, 2, 64, 8)
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    with pytest.raises(TypeError, match="BlockLayout.from_mask"):
        block_sparse_attention(q, q, q, mask)
    lay = BlockLayout.from_mask(mask, 32)
    with pytest.warns(DeprecationWarning, match="gather"):
        out = block_sparse_attention(q, q, q, lay, backend="cpu")
    torch.testing.assert_close(out, block_sparse_attention(q, q, q, lay, backend="gather"))


def test_bad_inputs():
    q = torch.randn(1, 2, 64, 8)
    lay = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs ceil"):
        bsa(q, q, q, torch.ones(1, 2, 3, 3, dtype=torch.bool), 32)
    with pytest.raises(ValueError, match="layout must have 1 or B=1"):
        bsa(q, q, q, torch.ones(2, 2, 2, 2, dtype=torch.bool), 32)
    with pytest.raises(ValueError, match="H=2 heads"):
        bsa(q, q, q, torch.ones(1, 3, 2, 2, dtype=torch.bool), 32)
    with pytest.raises(ValueError, match="seq_len=128"):
        block_sparse_attention(q, q, q, BlockLayout(torch.ones(1, 2, 2, 2, dtype=torch.bool), 64, 128))
    with pytest.raises(TypeError, match="bool"):
        bsa(q, q, q, lay.float(), 32)
    with pytest.raises(ValueError, match="one dtype"):
        bsa(q, q.double(), q, lay, 32)
    with pytest.raises(ValueError, match="one device"):
        bsa(q, q, q, lay.to("meta"), 32)
    with pytest.raises(ValueError, match="smaller than one block"):
        bsa(q[:, :, :16], q[:, :, :16], q[:, :, :16], lay[..., :1, :1], 32)
    with pytest.raises(ValueError, match="backend"):
        bsa(q, q, q, lay, 32, backend="triton")
    with pytest.raises(ValueError, match="same shape"):
        bsa(q, q[:, :1], q, lay, 32)
    with pytest.raises(ValueError, match=r"\(B, H, N, Dh\)"):
        bsa(q[0], q[0], q[0], lay, 32)


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask_matches_reference(causal):
    B, H, N, Dh, bs = 3, 2, 100, 8, 32
    q, k, v = _inputs(B, H, N, Dh, seed=5)
    lay = _layout(1, H, 4, 0.5, seed=5)
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[0, 70:] = False  # right padding
    kpm[1, :40] = False  # left padding: query blocks that keep only block 0 lose every key
    w = torch.randn(B, H, N, Dh, dtype=torch.float64)
    ref = _naive(q, k, v, lay, bs, causal, kpm=kpm)
    ref_g = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for backend in ("gather", "dense", "auto"):
        out = bsa(q, k, v, lay, bs, causal=causal, backend=backend, key_padding_mask=kpm)
        grads = torch.autograd.grad((out * w).sum(), (q, k, v))
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
        for g, r in zip(grads, ref_g, strict=True):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-9)
    with pytest.raises(ValueError, match="flex"):
        bsa(q, k, v, lay, bs, backend="flex", key_padding_mask=kpm)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        bsa(q, k, v, lay, bs, key_padding_mask=kpm.float())
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        bsa(q, k, v, lay, bs, key_padding_mask=kpm[:, :50])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_cuda_matches_dense_forward_backward():
    q, k, v = (t.detach().float().cuda().requires_grad_() for t in _inputs(2, 2, 300, 64))
    lay = _layout(1, 2, 3, 0.5).cuda()
    for causal in (False, True):
        o1, g1 = _fwd_bwd("flex", q, k, v, lay, 128, causal)
        o2, g2 = _fwd_bwd("dense", q, k, v, lay, 128, causal)
        assert (o1 - o2).abs().max() < 1e-4
        for a, b in zip(g1, g2, strict=True):
            assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_runs_of_identical_rows_and_uneven_rows_match_reference(causal):
    """Consecutive query blocks with one kept set are merged into runs (capped at MAX_RUN); rows of very
    different lengths go to different buckets. Both must equal the reference, with key/N padding."""
    B, H, N, Dh, bs = 2, 3, 8 * 11 - 5, 4, 8
    nb = math.ceil(N / bs)
    q, k, v = _inputs(B, H, N, Dh, seed=7)
    lay = torch.zeros(1, H, nb, nb, dtype=torch.bool)
    lay[0, 0, :, 0] = True  # head 0: every row keeps block 0 → one run of 11 (split 8 + 3)
    lay[0, 1, :, :] = True  # head 1: dense rows (the last, padded block in every row)
    lay[0, 1, 4:6] = False
    lay[0, 1, 4:6, 2:4] = True  # a run of 2 rows in the middle
    lay[0, 2] = _layout(1, 1, nb, 0.3, seed=7, empty_row=False)[0, 0]  # head 2: uneven random rows
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, :20] = False
    w = torch.randn(B, H, N, Dh, dtype=torch.float64)
    for layout in (lay, lay[:, :1].expand_as(lay).clone()):  # mixed heads; every head merged into runs
        ref = _naive(q, k, v, layout, bs, causal, kpm=kpm)
        ref_g = torch.autograd.grad((ref * w).sum(), (q, k, v))
        out = bsa(q, k, v, layout, bs, causal=causal, backend="gather", key_padding_mask=kpm)
        grads = torch.autograd.grad((out * w).sum(), (q, k, v))
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
        for g, r in zip(grads, ref_g, strict=True):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-9)
    plan = kernels._gather.make_plan(lay[:, :1], bs, N, causal)  # head 0 alone: merges pay off
    assert max(b.m for b in plan.buckets) == kernels._gather.MAX_RUN
    assert all(b.m == 1 for b in plan.buckets if b.tail == 1)  # causal diagonal rows are never merged


@pytest.mark.parametrize("keep_bytes", [0, 1 << 40])
def test_backward_recompute_and_kept_probabilities_agree(monkeypatch, keep_bytes):
    """Backward with probabilities recomputed (large problems) and kept from forward (small ones)."""
    monkeypatch.setattr(kernels._gather, "KEEP_P_BYTES", keep_bytes)
    for causal in (False, True):
        test_runs_of_identical_rows_and_uneven_rows_match_reference(causal)
        test_cpu_and_dense_match_naive_float64(2, 2, 2, 200, 16, 32, causal)
    test_gradcheck_custom_backward()


@settings(max_examples=25, deadline=None)
@given(nb=st.integers(1, 12), H=st.integers(1, 3), Bl=st.integers(1, 2), density=st.floats(0.0, 1.0),
       causal=st.booleans(), short=st.booleans(), runs=st.booleans(), seed=st.integers(0, 10_000))
def test_property_plan_covers_every_kept_block_once(nb, H, Bl, density, causal, short, runs, seed):
    """The (numpy) plan: every non-empty layout row is in exactly one run of one bucket, with its kept key
    blocks (causal: not above the diagonal) in ascending order; expand at B = 2 keeps that per batch row."""
    bs = 8
    n = nb * bs - (3 if short and nb > 1 else 0)
    lay = _layout(Bl, H, nb, density, seed=seed, empty_row=False)
    if runs:
        lay[..., 1:, :] = lay[..., :1, :]  # identical consecutive rows → merged runs
    keep = lay & torch.ones(nb, nb, dtype=torch.bool).tril() if causal else lay
    flat = keep.reshape(-1, nb)
    plan = kernels._gather.make_plan(lay, bs, n, causal)
    seen = {}
    for bk in plan.buckets:
        for start, ids in zip(bk.rows.tolist(), bk.idx.tolist(), strict=True):
            for row in range(start, start + bk.m):
                assert row not in seen
                seen[row] = ids
    want = {r: (torch.nonzero(flat[r])[:, 0] + r // nb * nb).tolist() for r in range(flat.shape[0]) if flat[r].any()}
    assert seen == want
    assert plan.has_empty == bool((flat.sum(-1) == 0).any())
    B = 2
    buckets, _ = plan.expand(B, torch.float64, 4, bs)
    got = {}
    for K, _, chunks in buckets:
        for r, c, m, ids, _ in chunks:
            rows = torch.arange(r.start, r.stop) if isinstance(r, slice) else r
            for j, row in enumerate(rows.tolist()):
                got[row] = ids.view(c, K)[j // m].tolist()
    reps = B * H * nb // flat.shape[0]
    assert got == {r + i * flat.shape[0]: [x + i * flat.shape[0] for x in ids] for i in range(reps)
                   for r, ids in want.items()}
