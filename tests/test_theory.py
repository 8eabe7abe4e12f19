"""The paper's bounds (der.theory): property tests that try to break each statement; counterexamples kept."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from der import theory
from der.truth import range_partition_entropy


# ----------------------------------------------------------------------------- margin
def test_empirical_margin_matches_functional():
    from der.functional import empirical_margin as emp_torch

    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((50, 3)), rng.standard_normal((4, 3)), rng.standard_normal(4)
    ref = theory.empirical_margin(x, w, b)
    brute = min(abs(x[i] @ w[t] - b[t]) / np.linalg.norm(w[t]) for i in range(50) for t in range(4))
    assert ref == pytest.approx(brute, rel=1e-12)
    got = float(emp_torch(torch.tensor(x), torch.tensor(w), torch.tensor(b)))
    assert got == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError, match="non-zero"):
        theory.empirical_margin(x, np.zeros((1, 3)), np.zeros(1))


# ----------------------------------------------------------------------------- Theorem 4
def test_theorem4_counterexample_kept():
    """H_R is a minimum over partitions; H_soft follows the given Θ. Triangle + 2 separated clusters."""
    from der.functional import halfspace_entropy

    rng = np.random.default_rng(1)
    tri = np.array([[0.0, 0.0], [1.0, 0.0], [0.2, 1.0]])
    a = [0.3, 0.2] + 0.01 * rng.standard_normal((20_000, 2))
    b = [0.7, 0.2] + 0.01 * rng.standard_normal((20_000, 2))
    X = np.vstack([tri, a, b])
    h_r = range_partition_entropy(X, "hull2d")  # the triangle itself is a respectful range
    assert h_r == 0.0
    w, off = np.array([[1.0, 0.0]]), np.array([0.5])
    gamma = theory.empirical_margin(X, w, off)
    tau = 0.005
    h_soft = float(halfspace_entropy(torch.tensor(X), torch.tensor(w), torch.tensor(off), tau=tau))
    bound = theory.theorem4_bound(gamma, tau, n=len(X), d=2, m=1, K=2, delta=0.05)
    assert h_soft == pytest.approx(math.log(2), abs=1e-3)
    assert abs(h_r - h_soft) > 5 * bound  # the stated bound is violated by a wide margin


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), K=st.integers(2, 8))
def test_entropy_continuity_holds_where_valid(seed, K):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(K) * rng.uniform(0.1, 3))
    q = np.abs(p + rng.normal(0, 0.05, K))
    q /= q.sum()
    l1 = float(np.abs(p - q).sum())
    if l1 <= 0.5:
        gap = abs(theory.shannon_entropy(p) - theory.shannon_entropy(q))
        assert gap <= theory.entropy_continuity_bound(l1, K) + 1e-12


def test_entropy_continuity_counterexample_outside_validity():
    p, q = np.array([1.0, 0.0, 0.0]), np.ones(3) / 3
    l1 = float(np.abs(p - q).sum())  # 4/3 > 1/2
    assert abs(theory.shannon_entropy(p) - theory.shannon_entropy(q)) > theory.entropy_continuity_bound(
        l1, 3, strict=False)
    with pytest.raises(ValueError, match="1/2"):
        theory.entropy_continuity_bound(l1, 3)


# ----------------------------------------------------------------------------- Proposition 1
def skewed(M: int) -> np.ndarray:
    return np.concatenate([[0.5], np.full(M, 0.5 / M)])


def test_prop1_counterexample_kept():
    p = skewed(1000)
    H = theory.shannon_entropy(p)
    R_true, _ = theory.min_clusters_for_mass(p, 0.25)
    assert R_true == 501
    assert theory.prop1_bound(H, 0.25, len(p)) == 253 < R_true  # Prop. 1 as stated fails
    assert R_true <= theory.prop1_corrected_bound(H, 0.25, len(p))


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**6), k=st.integers(1, 300), delta=st.floats(0.01, 0.99))
def test_prop1_corrected_never_breaks(seed, k, delta):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, rng.choice([0.05, 0.3, 1.0, 5.0])))
    if rng.random() < 0.3:  # the skewed shape that breaks the original statement
        p = np.concatenate([[rng.uniform(0.1, 0.9)], np.full(k, 1.0)])
        p[1:] *= (1 - p[0]) / k
    R, top = theory.min_clusters_for_mass(p, delta)
    assert p[top].sum() >= 1 - delta - 1e-9
    assert R <= theory.prop1_corrected_bound(theory.shannon_entropy(p), delta, len(p))


# ----------------------------------------------------------------------------- Lemma 2
@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(2, 64), d=st.integers(1, 8))
def test_lemma2_holds(seed, n, d):
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.full(n, rng.choice([0.1, 1.0])))
    v = rng.standard_normal((n, d)) * rng.uniform(0.1, 10)
    keep = np.argsort(-w)[: rng.integers(1, n + 1)]
    r = theory.lemma2_truncation(w, v, keep)
    if r["delta_t"] <= 0.5:
        assert r["error"] <= r["sharp"] + 1e-9 <= r["bound"] + 1e-9


def test_lemma2_sharp_constant_is_attained():
    # half the mass on +B, the other half split: dropping δ of mass on -B moves y by 2Bδ/(1-δ)·(1-δ)
    w = np.array([0.9, 0.1])
    v = np.array([[1.0], [-1.0]])
    r = theory.lemma2_truncation(w, v, [0])
    assert r["error"] == pytest.approx(2 * 1.0 * 0.1)  # = sharp 2Bδ_t, half of the stated 4Bδ_t


# ----------------------------------------------------------------------------- Theorem 2
def test_theorem2_error_counterexample_and_flop_bound():
    """Uniform attention satisfies Assumption 1 with C_align = 1; with R from Eq. 8 the error exceeds ε."""
    M, d, B, eps = 10_000, 1, 1.0, 0.5
    sizes = np.concatenate([[M], np.ones(M, dtype=np.int64)])  # keys per cluster; n = 2M
    n, k = int(sizes.sum()), len(sizes)
    masses = sizes / n
    H = theory.shannon_entropy(masses)
    R = theory.theorem2_R(H, eps, B, 1.0, k)
    sel = np.argsort(-masses, kind="stable")[:R]  # the best possible S* with |S*| <= R
    cluster = np.repeat(np.arange(k), sizes)
    keep = np.flatnonzero(np.isin(cluster, sel))
    v = np.where(np.isin(cluster, sel), -B, B)[:, None].astype(float)
    r = theory.lemma2_truncation(np.full(n, 1.0 / n), v, keep)
    assert r["error"] > eps  # Eq. 9 fails
    c_max = sizes.max() * k / n
    assert theory.block_sparse_flops(sizes, sel, n, d) <= theory.theorem2_flop_bound(n, d, k, R, c_max)
    # with the corrected Prop. 1 in Eq. 8 the same construction meets the tolerance
    Rc = theory.theorem2_R(H, eps, B, 1.0, k, corrected=True)
    sel_c = np.argsort(-masses, kind="stable")[:Rc]
    keep_c = np.flatnonzero(np.isin(cluster, sel_c))
    assert theory.lemma2_truncation(np.full(n, 1.0 / n), v, keep_c)["error"] <= eps


def test_bad_arguments():
    with pytest.raises(ValueError, match="delta"):
        theory.prop1_bound(1.0, 1.5, 10)
    with pytest.raises(ValueError, match="eps"):
        theory.theorem2_R(1.0, 2.0, 1.0, 1.0, 10)
    with pytest.raises(ValueError, match="tau"):
        theory.theorem4_epsilon(0.1, 0.0, 10, 2, 2, 0.1)
    with pytest.raises(ValueError, match="finite"):
        theory.shannon_entropy([np.nan, 1.0])
    assert theory.theorem4_bound(0.0, 1.0, 10, 2, 4, 16, 0.1) == math.inf  # ε > 1/2: no bound
