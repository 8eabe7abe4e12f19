"""Baseline layouts: equal block sparsity, structure (window/global/random), routing, L1 penalty."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from der.attention.baselines import (
    KMeansRouter,
    bigbird_layout,
    blocks_per_row,
    dense_layout,
    l1_attention_penalty,
    longformer_layout,
    magnitude_layout,
    topb_mask,
)
from der.attention.kernels import block_sparse_attention
from der.attention.layout import BlockLayout, block_mass


@settings(max_examples=25, deadline=None)
@given(nb=st.integers(1, 24), heads=st.integers(1, 3), density=st.floats(0.0, 1.0), seed=st.integers(0, 99))
def test_every_baseline_keeps_b_blocks_per_row(nb, heads, density, seed):
    sparsity = 1 - density
    b = blocks_per_row(nb, sparsity)
    layouts = [bigbird_layout(nb * 4, 4, heads, sparsity, seed=seed), longformer_layout(nb * 4, 4, heads, sparsity)]
    g = torch.Generator().manual_seed(seed)
    attn = torch.softmax(torch.randn(2, heads, nb * 4, nb * 4, generator=g), -1)
    layouts.append(magnitude_layout(attn, 4, sparsity))
    router = KMeansRouter(heads, 8, num_clusters=3, seed=seed)
    x = torch.randn(2, heads, nb * 4, 8, generator=g)
    layouts.append(router(x, x, 4, sparsity))
    for lay in layouts:
        assert isinstance(lay, BlockLayout) and lay.block_size == 4 and lay.seq_len == nb * 4
        assert lay.mask.dtype == torch.bool and lay.shape[-2:] == (nb, nb) and lay.heads == heads
        assert torch.all(lay.mask.sum(-1) == b)
        assert lay.sparsity() == pytest.approx(1 - b / nb)


def test_longformer_is_global_plus_window():
    lay = longformer_layout(64, 8, 1, 0.5, num_global=1).mask[0, 0]  # b = 4
    assert lay[:, 0].all()
    for i in range(8):
        kept = set(lay[i].nonzero().flatten().tolist()) - {0}
        span = sorted(kept)
        assert span == list(range(span[0], span[-1] + 1)), f"row {i} window not contiguous: {span}"
        assert i in kept or i == 0


def test_bigbird_random_blocks_depend_on_seed_and_head():
    a = bigbird_layout(256, 16, 4, 0.625, seed=0).mask  # b = 6: 1 global + 2 random + 3 window
    b = bigbird_layout(256, 16, 4, 0.625, seed=1).mask
    assert not torch.equal(a, b)
    assert not all(torch.equal(a[0, 0], a[0, h]) for h in range(1, 4))
    assert torch.equal(a, bigbird_layout(256, 16, 4, 0.625, seed=0).mask)
    assert a[..., 0].all()  # global key block
    assert torch.diagonal(a[0], dim1=-2, dim2=-1).all()  # window contains the diagonal


def test_magnitude_picks_heaviest_blocks():
    attn = torch.full((1, 1, 8, 8), 0.01)
    attn[..., 0:2, 6:8] = 1.0  # query block 0 → key block 3 heavy
    lay = magnitude_layout(attn, 2, 0.75).mask  # nb = 4, b = 1
    assert lay[0, 0, 0].tolist() == [False, False, False, True]
    # ties → towards the diagonal
    assert torch.equal(topb_mask(torch.zeros(3, 3), 2 / 3), torch.eye(3, dtype=torch.bool))
    torch.testing.assert_close(block_mass(attn, 2).sum(), attn.sum().double())
    static = magnitude_layout(torch.softmax(torch.randn(3, 2, 16, 16), -1), 4, 0.5, per_input=False)
    assert static.shape == (1, 2, 4, 4)


def test_dense_layout_reproduces_dense_attention():
    q = torch.randn(1, 2, 64, 8)
    lay = dense_layout(64, 16, 2)
    out = block_sparse_attention(q, q, q, lay)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))


def test_kmeans_router_ema_and_routing():
    torch.manual_seed(0)
    H, D = 1, 4
    router = KMeansRouter(H, D, num_clusters=2, decay=0.5)
    # two well-separated directions: tokens 0..31 along e0, 32..63 along e1
    x = torch.zeros(1, H, 64, D)
    x[..., :32, 0] = 1.0
    x[..., 32:, 1] = 1.0
    x = x + 0.01 * torch.randn_like(x)
    before = router.centroids.clone()
    router.train()
    for _ in range(10):
        lay = router(x, x, 16, 0.5)  # nb = 4, b = 2
    assert not torch.equal(before, router.centroids)
    assert torch.allclose(router.centroids.norm(dim=-1), torch.ones(H, 2), atol=1e-5)
    # routed blocks share the cluster: blocks 0,1 ↔ 0,1 and 2,3 ↔ 2,3
    expect = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(lay.mask[0, 0], expect)
    router.eval()
    frozen = router.centroids.clone()
    router(x, x, 16, 0.5)
    assert torch.equal(frozen, router.centroids)


def test_l1_penalty_gradient_pushes_mass_into_kept_blocks():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 32, 32, requires_grad=True)
    attn = torch.softmax(logits, -1)
    # plain L1 of softmax rows is constant: the point of the pruned-mass formulation
    assert torch.allclose(attn.abs().sum(-1), torch.ones(1, 2, 32))
    loss = l1_attention_penalty(attn, lam=1.0, block_size=8, sparsity=0.75)
    loss.backward()
    mask = magnitude_layout(attn.detach(), 8, 0.75).to_dense()
    assert loss.item() > 0 and logits.grad.abs().sum() > 0
    # descent direction raises logits in kept blocks relative to pruned ones
    assert (-logits.grad)[mask].mean() > (-logits.grad)[~mask].mean()
    with torch.no_grad():
        stepped = torch.softmax(logits - 10 * logits.grad, -1)
    assert l1_attention_penalty(stepped, 1.0, 8, 0.75) < loss
    elem = l1_attention_penalty(attn, 0.1)
    assert 0 < elem.item() < 0.1


def test_bad_inputs():
    with pytest.raises(ValueError, match="sparsity"):
        bigbird_layout(64, 8, 2, 1.5)
    with pytest.raises(ValueError, match="shorter than one block"):
        longformer_layout(0, 8, 2, 0.5)
    with pytest.raises(ValueError, match="n_blocks"):
        blocks_per_row(0, 0.5)
    with pytest.raises(ValueError, match="heads"):
        dense_layout(64, 16, 0)
    with pytest.raises(ValueError, match="attn must be"):
        magnitude_layout(torch.rand(4, 5), 2, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        topb_mask(torch.tensor([[math.nan, 0.0], [0.0, 0.0]]), 0.5)
    with pytest.raises(ValueError, match="expected H"):
        KMeansRouter(2, 4, 3)(torch.randn(1, 3, 8, 4), torch.randn(1, 3, 8, 4), 4, 0.5)
    with pytest.raises(ValueError, match="attn must be"):
        l1_attention_penalty(torch.rand(2, 3, 3))


def _moba_reference(q, k, bs, sparsity, causal, kpm):
    """Float64 loops: mean-pooled real tokens per block, q̄·k̄ scores, diagonal + best b - 1 per row, over
    the blocks holding a real token only (blocks of pure padding are skipped as queries and as keys)."""
    B, H, N, _ = q.shape
    nb = -(-N // bs)
    out = torch.zeros(B, H, nb, nb, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            kh = h // (H // k.shape[1])

            def mean(x, i, b=b):
                idx = [t for t in range(i * bs, min(N, (i + 1) * bs)) if kpm is None or kpm[b, t]]
                return None if not idx else x[idx].double().mean(0)

            for i in range(nb):
                qi = mean(q[b, h], i)
                if qi is None:  # a query block of padding only: skipped
                    continue
                valid = [j for j in (range(i + 1) if causal else range(nb)) if mean(k[b, kh], j) is not None]
                nkeep = max(1, round(len(valid) * (1 - sparsity)))
                sc = {j: float(qi @ mean(k[b, kh], j)) for j in valid}
                others = sorted((j for j in valid if j != i), key=lambda j: (-sc[j], abs(i - j)))
                for j in [i] + others[:nkeep - 1]:
                    out[b, h, i, j] = True
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_moba_layout_matches_loop_reference(causal):
    from der.attention.baselines import moba_layout

    g = torch.Generator().manual_seed(4)
    B, Hq, Hkv, N, D, bs = 2, 4, 2, 45, 8, 8
    q = torch.randn(B, Hq, N, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, 30:] = False
    for mask in (None, kpm):
        lay = moba_layout(q, k, bs, 0.5, causal=causal, key_padding_mask=mask)
        assert isinstance(lay, BlockLayout) and lay.shape == (B, Hq, 6, 6) and lay.causal == causal
        assert torch.equal(lay.mask, _moba_reference(q, k, bs, 0.5, causal, mask))
        real = torch.ones(B, 6, dtype=torch.bool) if mask is None else torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
        assert torch.equal(lay.mask.diagonal(dim1=-2, dim2=-1), real[:, None].expand(B, Hq, 6))
    with pytest.raises(ValueError, match="multiple"):
        moba_layout(q[:, :3], k, bs, 0.5)
    with pytest.raises(ValueError, match="key_padding_mask"):
        moba_layout(q, k, bs, 0.5, key_padding_mask=kpm.float())


def test_bigbird_scores_rank_its_own_blocks_and_reselect_at_the_budget():
    from der.attention.metrics import real_density
    from der.attention.rules import reselect, select_blocks

    lay = bigbird_layout(256, 16, 3, 0.75, seed=1)
    assert lay.scores is not None
    assert torch.equal(select_blocks(lay.scores, 0.75, False, "head"), lay.mask)  # the mask is its own top-K
    kept, dropped = lay.scores[lay.mask], lay.scores[~lay.mask]
    assert float(kept.min()) > float(dropped.max())
    assert bool(lay.mask[..., 0].all())  # the global block survives every re-selection first
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[0, :6] = True
    valid[1] = True
    small = reselect(lay, 0.75, valid=valid)
    kv = valid.repeat_interleave(16, 1)
    assert real_density(small, kv) == pytest.approx(0.5 * (max(6, round(0.25 * 36)) / 36 + 0.25), abs=0.03)
    extra = small.mask[0, :, :6, :6] & ~torch.eye(6, dtype=torch.bool)
    assert bool(extra[..., 1:].sum() == 0) and int(extra.sum()) == 3 * 3  # the budget went to the global block
