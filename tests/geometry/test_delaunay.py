"""der.geometry.delaunay: same triangulation as scipy.spatial.Delaunay, canonical form."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from test_predicates import incircle_ref, orient_ref

from der.geometry import data
from der.geometry.delaunay import METHODS, delaunay, morton_order


def empty_circle_ok(P, tri) -> bool:
    """Delaunay property: no point strictly inside any triangle's circumcircle (float64 check)."""
    a, b, c = P[tri[:, 0]], P[tri[:, 1]], P[tri[:, 2]]
    for k in range(0, len(P), 512):
        d = P[k : k + 512, None, :]
        m = np.stack([a - d, b - d, c - d], axis=-2)  # (q, t, 3, 2)
        lift = (m**2).sum(-1, keepdims=True)
        det = np.linalg.det(np.concatenate([m, lift], axis=-1))
        scale = np.abs(lift).max() ** 2 + 1e-300
        if (det > 1e-9 * scale).any():
            return False
    return True


@pytest.mark.parametrize("name", [d for d in data.DISTRIBUTIONS if d != "circle"])
def test_matches_scipy(name):
    P = data.generate(name, 5000, seed=1)
    want = delaunay(P, "qhull")
    for m in METHODS:
        got = delaunay(P, m)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


def test_properties_small():
    P = data.uniform_disk(600, seed=2)
    tri = delaunay(P)
    a, b, c = P[tri[:, 0]], P[tri[:, 1]], P[tri[:, 2]]
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    assert (cross > 0).all()  # CCW
    from der.geometry import convex_hull

    assert len(tri) == 2 * len(P) - 2 - len(convex_hull(P))  # Euler, general position
    assert empty_circle_ok(P, tri)


def test_cocircular_and_degenerate():
    P = data.circle(300, seed=0)
    tri = delaunay(P)
    assert len(tri) == len(P) - 2  # any triangulation of a convex polygon
    assert delaunay(np.zeros((0, 2))).shape == (0, 3)
    assert delaunay([[0, 0], [1, 1]]).shape == (0, 3)
    assert delaunay([[0, 0], [1, 1], [2, 2], [3, 3]]).shape == (0, 3)  # collinear
    dup = np.array([[0, 0], [1, 0], [0, 1], [0, 0], [1, 0]], float)
    np.testing.assert_array_equal(delaunay(dup), [[0, 1, 2]])


def test_dtypes_and_errors():
    P = data.gaussian(1000, seed=3)
    want = delaunay(P)
    np.testing.assert_array_equal(delaunay(np.asfortranarray(P)), want)
    np.testing.assert_array_equal(delaunay(P.astype(np.float32)), delaunay(P.astype(np.float32).astype(float)))
    order = morton_order(P)
    np.testing.assert_array_equal(np.sort(order), np.arange(len(P)))
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        delaunay(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="finite"):
        delaunay([[0, 0], [1, np.inf], [0, 1]])
    with pytest.raises(ValueError, match="method"):
        delaunay(P, "triangle")


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(3, 40), st.just(2)), elements=st.floats(-100, 100, width=32)))
def test_property_same_as_scipy(P):
    P = data.dedup(P)
    try:
        a = delaunay(P, "qhull")
    except ValueError:  # QHull gives up on nearly flat input that the exact engine triangulates
        a = np.zeros((0, 3), dtype=np.int64)
    b = delaunay(P)
    if len(b):
        assert empty_circle_ok(P, b)
        assert len(np.unique(b)) == len(P)  # every distinct point is a vertex
    if len(a) and len(b) and empty_circle_ok(P, a) and len(np.unique(a)) == len(P) and _exact_tiling(P, a):
        # where QHull's tolerances drop no point and its triangles tile the hull in exact
        # arithmetic: same triangle count (same triangles up to ties)
        assert len(a) == len(b)


def _exact_tiling(P, tri) -> bool:
    """Every triangle CCW and their areas sum to the hull's, in rational arithmetic."""
    from fractions import Fraction

    from der.geometry import convex_hull

    if not all(orient_ref(*P[i], *P[j], *P[k]) > 0 for i, j, k in tri):
        return False
    Q = [(Fraction(float(x)), Fraction(float(y))) for x, y in P]

    def area2(i, j, k):
        return (Q[j][0] - Q[i][0]) * (Q[k][1] - Q[i][1]) - (Q[j][1] - Q[i][1]) * (Q[k][0] - Q[i][0])

    h = convex_hull(P)
    return sum(area2(i, j, k) for i, j, k in tri) == sum(area2(h[0], h[t], h[t + 1]) for t in range(1, len(h) - 1))


def _exact_valid(P, tri) -> None:
    """Exact checks of a Delaunay triangulation of integer points: every triangle CCW and non-flat,
    the triangles tile the convex hull (areas sum to its area), every distinct point is a vertex,
    and no point lies strictly inside any triangle's circumcircle (int64 determinants)."""
    from der.geometry import convex_hull

    Q = np.asarray(P, dtype=np.int64)
    a, b, c = Q[tri[:, 0]], Q[tri[:, 1]], Q[tri[:, 2]]
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    assert (cross > 0).all()
    h = Q[convex_hull(P)]
    hull2 = int(np.sum(h[:, 0] * np.roll(h[:, 1], -1) - np.roll(h[:, 0], -1) * h[:, 1]))
    assert int(cross.sum()) == hull2
    assert len(np.unique(tri)) == len(np.unique(Q, axis=0))
    m = np.stack([a, b, c], axis=1)[None] - Q[:, None, None, :]  # (n, t, 3, 2)
    lift = (m**2).sum(-1)
    det = (lift[..., 0] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 2, 0] * m[..., 1, 1])
           + lift[..., 1] * (m[..., 2, 0] * m[..., 0, 1] - m[..., 0, 0] * m[..., 2, 1])
           + lift[..., 2] * (m[..., 0, 0] * m[..., 1, 1] - m[..., 1, 0] * m[..., 0, 1]))
    assert (det <= 0).all()


@pytest.mark.parametrize("k", [2, 3, 7, 20])
def test_sweep_cocircular_grids(k):
    """Integer grids: every 2x2 cell is cocircular, any valid triangulation is allowed."""
    g = np.stack(np.meshgrid(np.arange(k), np.arange(k)), -1).reshape(-1, 2).astype(float)
    P = np.random.default_rng(k).permutation(g)
    tri = delaunay(P, "sweep")
    assert len(tri) == 2 * (k - 1) ** 2
    _exact_valid(P, tri)
    ref = delaunay(P, "qhull")
    assert len(ref) == len(tri)


def test_sweep_duplicates_keep_smallest_index():
    rng = np.random.default_rng(4)
    base = rng.random((300, 2))
    P = np.concatenate([base, base[rng.integers(0, 300, 200)]])[rng.permutation(500)]
    tri = delaunay(P, "sweep")
    _, first = np.unique(P, axis=0, return_index=True)
    np.testing.assert_array_equal(np.unique(tri), np.sort(first))
    keep = np.sort(first)
    sub = delaunay(P[keep], "sweep")
    np.testing.assert_array_equal(np.sort(keep[sub].reshape(-1)), np.sort(tri.reshape(-1)))


def test_sweep_collinear_on_hull_and_scaling():
    """Points on hull edges and collinear runs are vertices; power-of-two rescaling is exact."""
    line = np.stack([np.arange(10.0), np.zeros(10)], 1)
    P = np.concatenate([line, [[4.5, 3.0], [2.0, -1.0]], line[::3] + [0, 2]])
    tri = delaunay(P, "sweep")
    _exact_valid(P * 2, tri)  # doubled so every coordinate is an integer
    for s in (2.0**300, 2.0**-300, 3.0):
        np.testing.assert_array_equal(delaunay(P * s if s != 3.0 else P, "sweep"), tri)
    assert delaunay(line, "sweep").shape == (0, 3)
    assert delaunay(np.ones((5, 2)), "sweep").shape == (0, 3)


def test_sweep_circle_exact_in_rationals():
    """Nearly cocircular float points (the engine's near-tie path): exact empty-circle check."""
    from fractions import Fraction

    P = data.circle(120, seed=5)
    tri = delaunay(P, "sweep")
    F = [(Fraction(x), Fraction(y)) for x, y in P]
    for t in tri:
        (ax, ay), (bx, by), (cx, cy) = (F[i] for i in t)
        assert (bx - ax) * (cy - ay) - (by - ay) * (cx - ax) > 0
        for dx, dy in F:
            m = [(ax - dx, ay - dy), (bx - dx, by - dy), (cx - dx, cy - dy)]
            lift = [u * u + v * v for u, v in m]
            det = (lift[0] * (m[1][0] * m[2][1] - m[2][0] * m[1][1])
                   + lift[1] * (m[2][0] * m[0][1] - m[0][0] * m[2][1])
                   + lift[2] * (m[0][0] * m[1][1] - m[1][0] * m[0][1]))
            assert det <= 0
    assert len(np.unique(tri)) == len(np.unique(P, axis=0))  # every point takes part


@settings(max_examples=300, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(3, 60), st.just(2)), elements=st.integers(-6, 6)))
def test_property_integer_sets_exact(P):
    """Small integer ranges: duplicates, collinear runs, cocircular quadruples everywhere."""
    tri = delaunay(P, "sweep")
    if len(np.unique(tri)) == 0:
        from der.geometry import convex_hull

        assert len(convex_hull(P)) <= 2  # no triangles only when all points are collinear
        return
    _exact_valid(P, tri)


def _sweep_in_order(P, order):
    from der.geometry._sweep import sweep_delaunay
    from der.geometry.delaunay import _canonical

    return _canonical(P, sweep_delaunay(P[:, 0].copy(), P[:, 1].copy(), order.astype(np.int64)), cw=True)


@pytest.mark.parametrize("name", ["square", "gaussian", "clustered"])
def test_sweep_any_insertion_order(name):
    """Random insertion orders put most points inside the current hull: the walk-and-split path
    (triangle and edge splits, hull edges included) must give the same triangulation."""
    P = data.generate(name, 3000, seed=11)
    want = delaunay(P, "qhull")
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(P))
        np.testing.assert_array_equal(_sweep_in_order(P, order), want)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(3, 50), st.just(2)), elements=st.integers(-5, 5)),
       st.integers(0, 2**32 - 1))
def test_property_integer_sets_random_order(P, seed):
    """Grids, collinear runs and points on hull edges, inserted in random order (exact checks)."""
    P = data.dedup(P)
    order = np.random.default_rng(seed).permutation(len(P))
    tri = _sweep_in_order(P, order)
    if len(tri):
        _exact_valid(P, tri)
        assert len(tri) == len(delaunay(P, "sweep"))


def test_sweep_dense_circle_counts():
    """20k points on a circle (every flip touches the hull; many near-ties): a triangulation of
    all points with the Euler count for its exact hull."""
    from der.geometry import convex_hull

    P = data.circle(20_000, seed=3)
    tri = delaunay(P)
    assert len(np.unique(tri)) == len(P)
    assert len(tri) == 2 * len(P) - 2 - len(convex_hull(P))


def test_sweep_hull_edge_split_regression():
    """A point inserted on a hull edge, then flips: its hull edge must stay tracked."""
    P = np.array([[-1, -3], [2, -3], [0, -3], [-3, -3], [-3, -4], [-2, -3], [-3, 2], [1, -3], [1, 0], [-3, 1]], float)
    tri = _sweep_in_order(P, np.array([8, 9, 3, 2, 4, 1, 7, 0, 6, 5]))
    _exact_valid(P, tri)


@pytest.mark.parametrize("name", ["square", "gaussian", "parabola", "clustered"])
def test_same_triangles_as_shewchuk_triangle(name):
    """General position: the Delaunay triangulation is unique, so Triangle's triangle set is ours."""
    triangle = pytest.importorskip("triangle")
    from der.geometry.delaunay import _canonical

    P = data.generate(name, 20_000, seed=7)
    ref = triangle.triangulate({"vertices": P}, "Q")["triangles"]
    np.testing.assert_array_equal(delaunay(P), _canonical(P, ref))


def _incircle_fraction(P, a, b, c, d) -> int:
    from fractions import Fraction

    (ax, ay), (bx, by), (cx, cy), (dx, dy) = ([Fraction(float(v)) for v in P[i]] for i in (a, b, c, d))
    m = [(ax - dx, ay - dy), (bx - dx, by - dy), (cx - dx, cy - dy)]
    lift = [u * u + v * v for u, v in m]
    det = (lift[0] * (m[1][0] * m[2][1] - m[2][0] * m[1][1])
           + lift[1] * (m[2][0] * m[0][1] - m[0][0] * m[2][1])
           + lift[2] * (m[0][0] * m[1][1] - m[1][0] * m[0][1]))
    return (det > 0) - (det < 0)


def _locally_delaunay_edges(P, tri, rows) -> int:
    """Assert (in rationals) that every interior edge of the triangles ``rows`` is locally Delaunay;
    return how many edges were checked."""
    n = len(P)
    src, dst, opp = (np.concatenate([tri[:, (k + j) % 3] for k in range(3)]) for j in range(3))
    key = src * n + dst
    order = np.argsort(key)
    checked = 0
    for t in rows:
        for k in range(3):
            u, v, w = tri[t, k], tri[t, (k + 1) % 3], tri[t, (k + 2) % 3]
            # the triangle on the other side of the edge (u, v) holds the directed edge (v, u)
            j = np.searchsorted(key, v * n + u, sorter=order)
            if j < len(key) and key[order[j]] == v * n + u:
                assert _incircle_fraction(P, u, v, w, opp[order[j]]) <= 0
                checked += 1
    return checked


@pytest.mark.parametrize("name", ["square", "gaussian", "clustered"])
def test_sampled_edges_locally_delaunay_in_rationals(name):
    """A triangulation whose every edge is locally Delaunay is the Delaunay triangulation; check a
    random sample of interior edges exactly (rationals) at a size that exercises the bucket sort."""
    P = data.generate(name, 100_000, seed=3)
    tri = delaunay(P)
    assert len(np.unique(tri)) == len(P)
    from der.geometry import convex_hull

    assert len(tri) == 2 * len(P) - 2 - len(convex_hull(P))
    assert _locally_delaunay_edges(P, tri, np.random.default_rng(0).choice(len(tri), 300, replace=False)) > 500


def test_grid_lattice_every_cell_cocircular():
    """Integer lattice 150 x 150 in random order: cocircular everywhere, exact counts and tiling."""
    g = np.stack(np.meshgrid(np.arange(150.0), np.arange(150.0)), -1).reshape(-1, 2)
    P = np.random.default_rng(1).permutation(g)
    tri = delaunay(P)
    assert len(tri) == 2 * 149**2
    Q = P.astype(np.int64)
    a, b, c = Q[tri[:, 0]], Q[tri[:, 1]], Q[tri[:, 2]]
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    assert (cross == 1).all()  # unit right triangles: the only Delaunay triangles of a lattice


@settings(max_examples=80, deadline=None)
@given(arrays(np.float64, st.integers(1, 400), elements=st.sampled_from([0.0, 1e-300, 0.5, 1.0, 3.0, 1e300]))
       | arrays(np.float64, st.integers(1, 400), elements=st.floats(0, 1e6)))
def test_stable_argsort_equals_numpy(d):
    from der.geometry._order import stable_argsort

    np.testing.assert_array_equal(stable_argsort(d), np.argsort(d, kind="stable"))


@pytest.mark.slow  # compiles the whole engine a second time (int64 indices)
def test_crowded_buckets_and_wide_indices():
    """One far outlier puts almost every key in the first bucket (the merge-sort path); the int64
    index arrays (used past 2^31 / 6 points) give the same triangles as int32."""
    from der.geometry._order import canonical_from_cw, stable_argsort
    from der.geometry._sweep import sweep_ranked

    d = np.concatenate([np.random.default_rng(2).random(5000), [1e9]])
    np.testing.assert_array_equal(stable_argsort(d), np.argsort(d, kind="stable"))
    P = np.concatenate([data.gaussian(3000, seed=5), [[1e7, 1e7]]])
    none = np.zeros(0, np.int64)
    got = [canonical_from_cw(*sweep_ranked(P[:, 0], P[:, 1], none, np.empty(0, dt)), len(P))
           for dt in (np.int32, np.int64)]
    np.testing.assert_array_equal(got[0], got[1])
    assert _locally_delaunay_edges(P, got[0], range(len(got[0]))) > 8000


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(3, 12), st.just(2)),
              elements=st.one_of(st.floats(-1e3, 1e3), st.sampled_from([0.0, 2.2e-313, 1e-300, 1e300, -1e300]))))
def test_property_exact_any_magnitudes(P):
    """Tiny and huge coordinates side by side: the triangulation is Delaunay in exact arithmetic."""
    P = data.dedup(P)
    tri = delaunay(P)
    for a, b, c in tri:
        assert orient_ref(*P[a], *P[b], *P[c]) > 0
        for d in range(len(P)):
            assert incircle_ref(*P[a], *P[b], *P[c], *P[d]) <= 0
