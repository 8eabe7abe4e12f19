"""der.geometry.delaunay: same triangulation as scipy.spatial.Delaunay, canonical form."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

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
    a = delaunay(P, "qhull")
    b = delaunay(P)
    if len(a) and len(b) and empty_circle_ok(P, a):
        # same triangle count always; same triangles unless cocircular ties
        assert len(a) == len(b)
        assert empty_circle_ok(P, b)
