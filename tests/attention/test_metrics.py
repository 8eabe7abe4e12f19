"""Attention metrics: sparsity (App. G.13), block sparsity, mean block length (Table 4), FLOPs, timing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from der.attention.kernels import block_sparse_attention
from der.attention.layout import BlockLayout
from der.attention.metrics import (
    attention_sparsity,
    block_sparse_attention_flops,
    dense_attention_flops,
    mean_block_length,
    median_latency,
    model_flops,
    peak_memory,
)


def test_attention_sparsity_threshold_and_mask():
    a = torch.tensor([[0.5, 0.005, 0.495, 0.0]])
    assert attention_sparsity(a) == 0.5
    assert attention_sparsity(a, threshold=0.4) == 0.5
    assert attention_sparsity(a, mask=torch.tensor([True, True, False, False])) == 0.5
    assert attention_sparsity(a, mask=torch.tensor([False, True, False, True])) == 1.0
    with pytest.raises(ValueError, match="no attention"):
        attention_sparsity(a, mask=torch.zeros(4, dtype=torch.bool))


def test_block_sparsity_and_causal():
    lay = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)[None]
    assert BlockLayout(lay, 4).sparsity() == pytest.approx(4 / 9)
    assert BlockLayout(lay, 4, causal=True).density() == pytest.approx(5 / 6)
    with pytest.raises(TypeError, match="bool"):
        BlockLayout(lay.float(), 4)
    with pytest.raises(TypeError, match="from_mask"):
        mean_block_length(lay)


def _runs_naive(lay: torch.Tensor) -> float:
    total = runs = 0
    for row in lay.reshape(-1, lay.shape[-1]).tolist():
        prev = False
        for x in row:
            total += x
            runs += x and not prev
            prev = x
    return total / runs


def test_mean_block_length_examples():
    lay = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert mean_block_length(BlockLayout(lay[None], 2)) == pytest.approx(9 / 4)  # runs: 3, 1, 1, 4
    with pytest.raises(ValueError, match="no block"):
        mean_block_length(BlockLayout(torch.zeros(1, 2, 2, dtype=torch.bool), 2))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.floats(0.05, 1.0), st.integers(0, 999))
def test_mean_block_length_matches_naive(nb, p, seed):
    lay = torch.rand(2, nb, nb, generator=torch.Generator().manual_seed(seed)) < p
    lay[0, 0, 0] = True
    assert mean_block_length(BlockLayout(lay, 4)) == pytest.approx(_runs_naive(lay))


def test_flops_formula():
    B, H, N, D = 2, 3, 256, 64
    fwd = dense_attention_flops(B, H, N, D)
    assert fwd == 4 * B * H * N * N * D
    assert dense_attention_flops(B, H, N, D, backward=True) == 3 * fwd
    mask = torch.zeros(1, H, 4, 4, dtype=torch.bool)
    mask[..., :1] = True  # density 1/4
    lay = BlockLayout(mask, 64, N)
    assert block_sparse_attention_flops(lay, D, batch=B) == fwd // 4
    # the gather path really does ~ρ of the dense matmul work: count its bmm FLOPs
    q = torch.randn(B, H, N, D)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as fc:
        block_sparse_attention(q, q, q, lay, backend="gather")
    assert fc.get_total_flops() == fwd // 4


def test_model_flops_scales_only_attention():
    lin = torch.nn.Linear(16, 16)
    q = torch.randn(1, 2, 32, 8)

    def fn():
        lin(torch.randn(32, 16))
        return F.scaled_dot_product_attention(q, q, q)

    full = model_flops(fn)
    quarter = model_flops(fn, sparsity=0.75)
    assert full["attention_dense"] == 4 * 2 * 32 * 32 * 8
    assert full["other"] == quarter["other"] == 2 * 32 * 16 * 16
    assert quarter["total"] == pytest.approx(full["other"] + 0.25 * full["attention_dense"])


def test_latency_and_peak_memory():
    stats = median_latency(lambda: torch.randn(64, 64) @ torch.randn(64, 64), warmup=1, repeats=3)
    assert stats["min_s"] <= stats["median_s"] <= stats["max_s"] and stats["repeats"] == 3
    nbytes = 4 * 512 * 512
    peak = peak_memory(lambda: torch.ones(512, 512) + torch.ones(512, 512))
    assert 2 * nbytes <= peak <= 4 * nbytes
    with pytest.raises(ValueError, match="repeats"):
        median_latency(lambda: None, repeats=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_cuda():
    n = 1 << 20
    assert peak_memory(lambda: torch.ones(n, device="cuda"), device="cuda") >= 4 * n


def _recall_loops(p, mask, bs, causal, qmask=None):
    """Float64 loop reference of attention-mass recall per head."""
    B, H, N, _ = p.shape
    inside = torch.zeros(H, dtype=torch.float64)
    total = torch.zeros(H, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(N):
                if qmask is not None and not qmask[b, t]:
                    continue
                for s in range(N):
                    total[h] += float(p[b, h, t, s])
                    if mask[b if mask.shape[0] > 1 else 0, h, t // bs, s // bs] and (not causal or s <= t):
                        inside[h] += float(p[b, h, t, s])
    return inside / total, float(inside.sum() / total.sum())


@settings(max_examples=10, deadline=None)
@given(n=st.integers(4, 12), bs=st.sampled_from([2, 3, 4]), causal=st.booleans(), per_input=st.booleans(),
       seed=st.integers(0, 999))
def test_attention_mass_recall_matches_float64_loops(n, bs, causal, per_input, seed):
    from der.attention.metrics import attention_mass_recall

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 2, n, n, generator=g) * 2
    if causal:
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(logits, -1)
    nb = -(-n // bs)
    mask = torch.rand(2 if per_input else 1, 2, nb, nb, generator=g) < 0.5
    qmask = torch.rand(2, n, generator=g) < 0.8
    qmask[:, 0] = True
    rec = attention_mass_recall(p, BlockLayout(mask, bs, n, causal), query_mask=qmask)
    ref_head, ref = _recall_loops(p, mask, bs, causal, qmask)
    torch.testing.assert_close(rec.per_head, ref_head)
    assert rec.overall == pytest.approx(ref)
    full = BlockLayout(torch.ones(1, 2, nb, nb, dtype=torch.bool), bs, n, causal)
    assert attention_mass_recall(p, full).overall == pytest.approx(1.0)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(5, 12), bs=st.sampled_from([4, 5]), causal=st.booleans(), seed=st.integers(0, 999))
def test_oracle_recall_is_the_best_layout_of_the_same_budget(n, bs, causal, seed):
    """Brute force over every layout with the same kept valid blocks per head (grids of at most 3x3)."""
    import itertools

    from der.attention.metrics import attention_mass_recall, oracle_layout, oracle_recall

    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(3, 2, n, n, generator=g, dtype=torch.float64) * 3, -1)
    nb = -(-n // bs)
    budget = BlockLayout(torch.rand(1, 2, nb, nb, generator=g) < 0.4, bs, n, causal)
    orc = oracle_recall(p, budget)
    lay = oracle_layout(p, budget)
    assert torch.equal(lay.kept_blocks().sum((-1, -2)), budget.kept_blocks().sum((-1, -2)))
    valid = [ij for ij in itertools.product(range(nb), range(nb)) if budget.valid_blocks()[ij]]
    for h in range(2):
        k = int(budget.kept_blocks()[0, h].sum())
        best = 0.0
        for keep in itertools.combinations(valid, k):
            m = torch.zeros(1, 2, nb, nb, dtype=torch.bool)
            for i, j in keep:
                m[0, h, i, j] = True
            best = max(best, float(attention_mass_recall(p, BlockLayout(m, bs, n, causal)).per_head[h]))
        assert float(orc.per_head[h]) == pytest.approx(best, abs=1e-12)
    assert orc.overall >= attention_mass_recall(p, budget).overall - 1e-12


def test_recall_bad_input():
    from der.attention.metrics import attention_mass_recall

    lay = BlockLayout(torch.ones(1, 2, 2, 2, dtype=torch.bool), 4, 8)
    with pytest.raises(ValueError, match="does not fit"):
        attention_mass_recall(torch.rand(1, 3, 8, 8), lay)
    with pytest.raises(ValueError, match="probabilities"):
        attention_mass_recall(torch.rand(1, 2, 8), lay)
    with pytest.raises(ValueError, match="finite"):
        attention_mass_recall(torch.full((1, 2, 8, 8), float("nan")), lay)
    with pytest.raises(ValueError, match="query_mask"):
        attention_mass_recall(torch.rand(1, 2, 8, 8), lay, query_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="BlockLayout"):
        attention_mass_recall(torch.rand(1, 2, 8, 8), lay.mask)


@pytest.mark.parametrize("causal", [False, True])
def test_real_density_counts_kept_pairs_of_real_blocks(causal):
    from der.attention.metrics import real_density

    g = torch.Generator().manual_seed(3)
    bs, n, B, H = 8, 37, 3, 2
    nb = -(-n // bs)
    mask = torch.rand(B, H, nb, nb, generator=g) < 0.4
    lay = BlockLayout(mask, bs, n, causal)
    kv = torch.zeros(B, n, dtype=torch.bool)
    for b, m in enumerate((n, 20, 3)):
        kv[b, :m] = True
    want = []
    for b in range(B):
        real = [bool(kv[b, i * bs:(i + 1) * bs].any()) for i in range(nb)]
        for h in range(H):
            pairs = kept = 0
            for i in range(nb):
                for j in range(nb):
                    if real[i] and real[j] and (not causal or j <= i):
                        pairs += 1
                        kept += bool(mask[b, h, i, j])
            want.append(kept / pairs)
    assert real_density(lay, kv) == pytest.approx(sum(want) / len(want), abs=1e-12)
    assert real_density(lay) == pytest.approx(lay.density(), abs=1e-12)
    with pytest.raises(ValueError, match="key_valid"):
        real_density(lay, kv[:, :5])
