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
