"""Ground-truth range-partition entropy: closed forms, invariances, bounds, bad input (der.truth)."""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from der.truth import (
    is_respectful,
    range_partition,
    range_partition_entropy,
    triangle_witness,
    work_entropy,
)
from der.truth.hull import hull_ccw, in_triangles, triangle_is_valid


def best_sizes_entropy(n: int, max_part: int) -> float:
    """min Σ k/n log(n/k) over compositions of n into parts <= max_part (independent brute force)."""

    @lru_cache(None)
    def f(m: int) -> float:
        if m == 0:
            return 0.0
        return min(k * np.log(n / k) + f(m - k) for k in range(1, min(m, max_part) + 1))

    return f(n) / n


def polygon(n: int, r: float = 1.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + 0.1
    return r * np.c_[np.cos(t), np.sin(t)]


@pytest.mark.parametrize("n", [4, 6, 7, 8])
def test_convex_position_parts_of_three(n):
    # every point is a strict hull vertex: a part holds <= 3 of them, any 3 fit (their own triangle)
    assert range_partition_entropy(polygon(n)) == pytest.approx(best_sizes_entropy(n, 3), abs=1e-12)


def test_triangle_with_interior_points_is_zero():
    rng = np.random.default_rng(1)
    tri = np.array([[0.0, 0.0], [2.0, 0.0], [0.3, 1.5]])
    X = np.vstack([tri, rng.dirichlet([1, 1, 1], 6) @ tri])
    assert range_partition_entropy(X, method="exact") == 0.0
    assert range_partition_entropy(np.vstack([X, rng.dirichlet([1, 1, 1], 300) @ tri])) == 0.0  # upper


def test_square_with_cluster():
    # 4 corners + a cluster off the diagonal: one triangle holds 3 corners and the cluster, the 4th corner
    # is alone (no triangle inside a square holds all 4 corners)
    rng = np.random.default_rng(2)
    X = np.vstack([[[0, 0], [1, 0], [1, 1], [0, 1]], [0.7, 0.3] + 0.01 * rng.standard_normal((6, 2))])
    n = len(X)
    want = (n - 1) / n * np.log(n / (n - 1)) + np.log(n) / n
    assert range_partition_entropy(X) == pytest.approx(want, abs=1e-12)
    assert range_partition_entropy(X, normalized=False) == pytest.approx(n * want, abs=1e-10)


def test_staircase_maxima():
    st_ = np.c_[np.arange(10.0), -np.arange(10.0)]
    assert range_partition_entropy(st_, "maxima2d") == pytest.approx(np.log(10), abs=1e-12)
    # each stair point dominates 2 private points: parts of 3 -> log(10) of a 30-point set in 10 parts
    X = np.vstack([st_, st_ - [0.1, 0.1], st_ - [0.2, 0.05]])
    r = range_partition(X, "maxima2d", method="upper")
    assert r.value == pytest.approx(np.log(10), abs=1e-12)  # greedy is optimal here (disjoint down-sets)
    assert r.lower == pytest.approx(np.log(10) - 1)


def test_maxima3d_exact_inside_greedy_bracket():
    rng = np.random.default_rng(3)
    for _ in range(3):
        X = rng.random((10, 3))
        ex = range_partition(X, "maxima3d", method="exact").value
        g = range_partition(X, "maxima3d", method="upper")
        assert g.lower - 1e-12 <= ex <= g.value + 1e-12


@pytest.mark.parametrize("problem", ["hull2d", "maxima2d"])
def test_exact_below_upper_and_parts_respectful(problem):
    rng = np.random.default_rng(4)
    for _ in range(3):
        X = rng.random((8, 2))
        ex = range_partition(X, problem, method="exact")
        up = range_partition(X, problem, method="upper")
        assert ex.value <= up.value + 1e-12
        if problem == "maxima2d":
            assert up.lower <= ex.value + 1e-12
        for lab in np.unique(ex.labels):
            assert is_respectful(X, np.flatnonzero(ex.labels == lab), problem)


@pytest.mark.parametrize("problem", ["hull2d", "maxima2d"])
def test_invariance_order_translation_scale(problem):
    rng = np.random.default_rng(5)
    X = rng.random((8, 2))
    h = range_partition_entropy(X, problem)
    assert range_partition_entropy(X[rng.permutation(8)], problem) == pytest.approx(h, abs=1e-12)
    assert range_partition_entropy(X * 37.0 + [5.0, -3.0], problem) == pytest.approx(h, abs=1e-12)
    if problem == "hull2d":  # hulls are also invariant under rotations
        c, s = np.cos(0.7), np.sin(0.7)
        assert range_partition_entropy(X @ np.array([[c, -s], [s, c]]), problem) == pytest.approx(h, abs=1e-12)


def test_degenerate_inputs():
    line = np.c_[np.arange(6.0), 2 * np.arange(6.0)]
    assert range_partition_entropy(line) == 0.0
    assert range_partition_entropy(line, "maxima2d") == 0.0  # a chain: the top point dominates all
    assert range_partition_entropy(np.zeros((1, 2))) == 0.0
    assert range_partition_entropy(np.array([[0.0, 1.0], [1.0, 0.0]]), "maxima2d") == pytest.approx(np.log(2))
    dup = np.vstack([polygon(6), polygon(6)])  # duplicates may share a part: 6 pairs -> parts of 3 pairs?
    assert range_partition_entropy(dup) == pytest.approx(np.log(2), abs=1e-12)  # 2 triangles of 3 pairs
    assert range_partition(np.random.default_rng(0).random((40, 3)) * [1, 1, 0], "hull3d").value >= 0


@pytest.mark.parametrize("bad, msg", [
    (np.array([[0.0, np.nan], [1.0, 1.0]]), "finite"),
    (np.zeros((3, 3)), "shape"),
    (np.zeros((0, 2)), "at least one"),
    ("abc", "real"),
])
def test_bad_input(bad, msg):
    with pytest.raises(ValueError, match=msg):
        range_partition_entropy(bad)


def test_bad_arguments():
    X = np.random.default_rng(0).random((20, 2))
    with pytest.raises(ValueError, match="problem"):
        range_partition_entropy(X, "delaunay")
    with pytest.raises(ValueError, match="limit"):
        range_partition_entropy(X, method="exact")
    with pytest.raises(ValueError, match="hull3d"):
        range_partition_entropy(np.zeros((5, 3)), "hull3d", method="exact")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(5, 9), p=st.integers(4, 6))
def test_triangle_oracle_against_brute_force(seed, n, p):
    """A returned witness is valid; a refusal survives a random search over triangles on conv(S)."""
    rng = np.random.default_rng(seed)
    X = rng.random((n, 2))
    C = X[hull_ccw(X)]
    P = X[rng.choice(n, size=min(p, n), replace=False)]
    T = triangle_witness(P, C)
    if T is not None:
        assert triangle_is_valid(T, P, C)
        return
    # random triangles with corners on the boundary of conv(S) (any feasible one can be grown to that)
    m = len(C)
    e = rng.integers(0, m, size=(4000, 3))
    s = rng.random((4000, 3, 1))
    corners = C[e] + s * (C[(e + 1) % m] - C[e])
    inside = in_triangles(P, corners, 1e-12).all(axis=0)
    assert not inside.any(), "oracle refused but a random triangle inside conv(S) holds P"


def test_work_count_tracks_difficulty():
    rng = np.random.default_rng(6)
    tri = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]])
    easy = np.vstack([tri, rng.dirichlet([1, 1, 1], 997) @ tri])
    hard = polygon(1000)
    we, wh = work_entropy(easy)["per_point"], work_entropy(hard)["per_point"]
    assert 1.0 <= we < 3.0 < wh  # hull vertices survive log n levels
    st_ = np.c_[np.arange(512.0), -np.arange(512.0)]
    assert work_entropy(st_, "maxima2d")["per_point"] > work_entropy(rng.random((512, 2)), "maxima2d")["per_point"]


def test_upper_bounds_large_n_are_respectful_partitions():
    rng = np.random.default_rng(7)
    X = rng.random((400, 2))
    r = range_partition(X, "hull2d")
    assert r.method == "upper" and 0 < r.value < np.log(400)
    big = max(np.unique(r.labels), key=lambda lab: (r.labels == lab).sum())
    part = X[r.labels == big]
    assert triangle_witness(part, X[hull_ccw(X)]) is not None  # the largest part really fits a triangle
    r3 = range_partition(rng.random((200, 3)), "hull3d")
    assert 0 < r3.value < np.log(200) and len(r3.labels) == 200
    assert list(itertools.chain(np.bincount(r3.labels))) and r3.labels.min() == 0
