"""Tests for der.geometry.metrics (App. G.13 error metrics) against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial import ConvexHull

from der.geometry import metrics as M


def _mc_symdiff_pct(a: np.ndarray, b: np.ndarray, n: int = 200_000, seed: int = 0) -> float:
    """Monte-Carlo estimate of area(A Δ B)/area(A) using half-plane membership."""
    rng = np.random.default_rng(seed)
    lo = np.minimum(a.min(0), b.min(0))
    hi = np.maximum(a.max(0), b.max(0))
    q = lo + (hi - lo) * rng.random((n, 2))

    def inside(pts: np.ndarray) -> np.ndarray:
        h = ConvexHull(pts)
        return (q @ h.equations[:, :2].T + h.equations[:, 2] <= 0).all(1)

    box = float(np.prod(hi - lo))
    ia, ib = inside(a), inside(b)
    return 100.0 * (ia ^ ib).mean() * box / ConvexHull(a).volume


def test_hull_polygon_matches_qhull_ccw() -> None:
    rng = np.random.default_rng(1)
    p = rng.normal(size=(5000, 2))
    poly = M.hull_polygon(p)
    h = ConvexHull(p)
    assert len(poly) == len(h.vertices)
    assert M.polygon_area(poly) == pytest.approx(h.volume, rel=1e-12)
    assert M.polygon_area(poly) > 0  # CCW


def test_symdiff_identical_is_zero_and_shifted_square() -> None:
    sq = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    assert M.hull_area_symdiff_pct(sq, sq) == pytest.approx(0.0, abs=1e-12)
    # shift by 0.1 in x: intersection 0.9, symdiff = 0.2 → 20 %
    assert M.hull_area_symdiff_pct(sq, sq + [0.1, 0]) == pytest.approx(20.0, rel=1e-12)
    # disjoint squares: symdiff = 2 areas → 200 %
    assert M.hull_area_symdiff_pct(sq, sq + [5, 0]) == pytest.approx(200.0, rel=1e-12)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.01, 0.3))
def test_symdiff_matches_monte_carlo(seed: int, shift: float) -> None:
    rng = np.random.default_rng(seed)
    a = rng.random((40, 2))
    b = a * (1 - shift) + shift * rng.random((40, 2))
    exact = M.hull_area_symdiff_pct(a, b)
    assert exact == pytest.approx(_mc_symdiff_pct(a, b, seed=seed), abs=1.5)


def test_hull_hausdorff_square_and_point_hausdorff_bruteforce() -> None:
    sq = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    inner = 0.1 + 0.8 * sq
    assert M.hull_hausdorff(sq, inner) == pytest.approx(np.sqrt(2) * 0.1, rel=1e-12)
    rng = np.random.default_rng(2)
    a, b = rng.random((50, 3)), rng.random((70, 3))
    d = np.linalg.norm(a[:, None] - b[None], axis=-1)
    assert M.hausdorff(a, b) == pytest.approx(max(d.min(1).max(), d.min(0).max()), rel=1e-12)


def test_vertex_recall() -> None:
    sq = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5]], float)
    assert M.vertex_recall(sq, sq) == 1.0
    cut = np.array([[0, 0], [1, 0], [1, 1], [0.5, 0.5]], float)  # lost (0, 1)
    assert M.vertex_recall(sq, cut) == pytest.approx(0.75)
    e = M.hull_errors(sq, sq)
    assert e["hull_area_symdiff_pct"] == 0.0 and e["hausdorff"] == 0.0 and e["vertex_recall"] == 1.0


@pytest.mark.parametrize(
    "bad, msg",
    [
        (np.zeros((5, 3)), r"\(n, 2\)"),
        (np.array([[0.0, np.nan], [1, 1], [0, 1]]), "NaN"),
        (np.array([[0.0, np.inf], [1, 1], [0, 1]]), "NaN or Inf"),
        (np.array([["a", "b"]]), "numeric"),
    ],
)
def test_bad_input(bad: np.ndarray, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        M.hull_area_symdiff_pct(bad, np.random.rand(5, 2))


def test_degenerate_reference_raises() -> None:
    line = np.array([[0, 0], [1, 1], [2, 2]], float)
    with pytest.raises(ValueError, match="degenerate"):
        M.hull_area_symdiff_pct(line, np.random.rand(5, 2))


def test_hull_polygon_and_truth_hull_are_the_exact_chain() -> None:
    """One monotone chain: metrics.hull_polygon and truth.hull_ccw are convex_hull(method="monotone")."""
    from der.geometry import convex_hull
    from der.truth.hull import hull_ccw

    rng = np.random.default_rng(7)
    t = rng.random(300)
    near = np.c_[t, 0.1 + 0.3 * t + rng.integers(-2, 3, 300) * 2.0**-52]  # turns below float resolution
    for p in (rng.random((500, 2)), near, np.repeat(rng.random((20, 2)), 3, axis=0), np.zeros((4, 2))):
        idx = convex_hull(p, method="monotone")
        np.testing.assert_array_equal(hull_ccw(p), idx)
        np.testing.assert_array_equal(M.hull_polygon(p), p[idx])
