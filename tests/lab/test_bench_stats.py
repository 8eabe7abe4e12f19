"""The bootstrap interval the overhead benchmark reports (der_lab.harness.bootstrap_median_ci)."""

import statistics

import pytest
import torch

from der_lab.harness import bootstrap_median_ci


def test_bootstrap_ci_brackets_the_median_and_shrinks_with_n():
    g = torch.Generator().manual_seed(3)
    small = (1.02 + 0.01 * torch.randn(20, generator=g)).tolist()
    big = (1.02 + 0.01 * torch.randn(2000, generator=g)).tolist()
    lo_s, hi_s = bootstrap_median_ci(small)
    lo_b, hi_b = bootstrap_median_ci(big)
    assert lo_s <= statistics.median(small) <= hi_s
    assert lo_b <= statistics.median(big) <= hi_b
    assert hi_b - lo_b < (hi_s - lo_s) / 3  # ~1/sqrt(n) width: 10x more data, ~3x narrower
    assert lo_b < 1.02 < hi_b  # covers the true median here


def test_bootstrap_ci_degenerate_and_bad_input():
    assert bootstrap_median_ci([1.5] * 7) == (1.5, 1.5)
    assert bootstrap_median_ci([1.0, 2.0], seed=1) == bootstrap_median_ci([1.0, 2.0], seed=1)  # reproducible
    with pytest.raises(ValueError):
        bootstrap_median_ci([])


def test_attention_breakdown_shares_and_rates():
    from der_lab.bench.attention_breakdown import breakdown, sgemm_gflops

    r = breakdown(1, 2, 256, repeats=2)
    sh = r["op_share_of_kernel"]
    assert sum(sh.values()) == pytest.approx(1.0)
    assert sh["matmul"] > 0 and sh["softmax"] > 0 and sh["gather"] >= 0
    assert r["matmul_gflops"] > 0 and r["ours_ms"] > 0 and r["speedup"] > 0
    assert sgemm_gflops(64, repeats=2) > 0
