"""Exactness of der.geometry.convex_hull against QHull and an exact rational reference."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from der.geometry import data, hull
from der.geometry.hull import METHODS, convex_hull

EXACT = ("auto", "monotone", "chan")


def ref_hull(P) -> list[tuple]:
    """Exact reference: Andrew's chain in rational arithmetic; CCW vertex coordinates from lexmin."""
    pts = sorted({(Fraction(float(x)), Fraction(float(y))) for x, y in np.asarray(P, dtype=np.float64)})
    if len(pts) < 3:
        return [tuple(map(float, p)) for p in pts]

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(seq):
        h: list = []
        for p in seq:
            while len(h) >= 2 and cross(h[-2], h[-1], p) <= 0:
                h.pop()
            h.append(p)
        return h

    lo, up = half(pts), half(pts[::-1])
    return [tuple(map(float, p)) for p in lo[:-1] + up[:-1]]


def coords(P, v) -> list[tuple]:
    P = np.asarray(P, dtype=np.float64)
    return [(float(P[i, 0]), float(P[i, 1])) for i in v]


def assert_same_as_qhull(P):
    q = convex_hull(P, "qhull")
    for m in EXACT:
        v = convex_hull(P, m)
        assert v.dtype == np.int64
        np.testing.assert_array_equal(v, q, err_msg=f"method {m}")


@pytest.mark.parametrize("name", [d for d in data.DISTRIBUTIONS if d != "circle"])
@pytest.mark.parametrize("n", [5, 100, 3000, 60_000])
def test_matches_qhull(name, n):
    assert_same_as_qhull(data.generate(name, n, seed=n))


@pytest.mark.parametrize("name", ["parabola", "disk", "clustered"])
def test_refinement_rounds(monkeypatch, name):
    """Force the multi-round filter (refined inner polygons) and compare with QHull."""
    monkeypatch.setattr(hull, "_DONE", 10)
    monkeypatch.setattr(hull, "_SAMPLE", 64)
    P = data.generate(name, 40_000, seed=7)
    np.testing.assert_array_equal(convex_hull(P), convex_hull(P, "qhull"))


def test_parallel_kernel_same_result():
    P = data.uniform_disk(80_000, seed=3)
    np.testing.assert_array_equal(hull._auto(P, par=True), hull._auto(P))


def test_circle_exact():
    """Every point a vertex (up to rounding): compare with the rational reference, not QHull."""
    P = data.circle(400, seed=1)
    want = ref_hull(P)
    for m in EXACT:
        assert coords(P, convex_hull(P, m)) == want
    Q = data.circle(50_000, seed=2)
    a = convex_hull(Q)
    np.testing.assert_array_equal(a, convex_hull(Q, "monotone"))
    np.testing.assert_array_equal(a, convex_hull(Q, "chan"))


def test_ccw_and_start():
    P = data.gaussian(2000, seed=5)
    v = convex_hull(P)
    x, y = P[v, 0], P[v, 1]
    area2 = np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)
    assert area2 > 0
    assert v[0] == np.lexsort((P[:, 1], P[:, 0]))[0]


@pytest.mark.parametrize("method", METHODS)
def test_degenerate(method):
    assert convex_hull(np.zeros((0, 2)), method).shape == (0,)
    np.testing.assert_array_equal(convex_hull([[1.0, 2.0]], method), [0])
    np.testing.assert_array_equal(convex_hull([[3.0, 1.0], [1.0, 1.0]], method), [1, 0])
    np.testing.assert_array_equal(convex_hull(np.ones((7, 2)), method), [0])
    line = np.c_[np.arange(10.0), 2 * np.arange(10.0) + 1][::-1]
    np.testing.assert_array_equal(convex_hull(line, method), [9, 0])
    sq = [[0, 0], [1, 0], [2, 0], [2, 1], [2, 2], [1, 2], [0, 2], [0, 1], [1, 1]]
    np.testing.assert_array_equal(convex_hull(sq, method), [0, 2, 4, 6])


@pytest.mark.parametrize("method", METHODS)
def test_duplicates(method):
    P = data.uniform_square(500, seed=1)
    D = np.concatenate([P, P[::-1], P[:50]])
    assert coords(D, convex_hull(D, method)) == coords(P, convex_hull(P, "qhull"))
    if method in ("auto", "monotone", "chan"):
        v = convex_hull(D, method)
        assert np.all(v < len(P))  # the first occurrence is returned


def test_integer_grid_and_dtypes():
    g = np.stack(np.meshgrid(np.arange(30), np.arange(20)), -1).reshape(-1, 2)
    for m in METHODS:
        assert coords(g, convex_hull(g, m)) == [(0, 0), (29, 0), (29, 19), (0, 19)]
    P = data.parabola(5000, seed=2)
    base = convex_hull(P.astype(np.float32).astype(np.float64))
    for m in EXACT:
        np.testing.assert_array_equal(convex_hull(P.astype(np.float32), m), base)
    F = np.asfortranarray(P)
    S = np.repeat(P, 2, axis=0)[::2]  # non-contiguous view
    for m in EXACT:
        np.testing.assert_array_equal(convex_hull(F, m), convex_hull(P, "qhull"))
        np.testing.assert_array_equal(convex_hull(S, m), convex_hull(P, "qhull"))


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e200, 1e300])
def test_huge_and_tiny(scale):
    P = data.uniform_disk(3000, seed=4)
    want = convex_hull(P, "qhull")
    for m in EXACT:
        np.testing.assert_array_equal(convex_hull(P * scale, m), want)


@pytest.mark.parametrize("xscale", [1e-310, 1e-300, 1e-250])
def test_extreme_aspect_ratio(xscale):
    """x spread tiny (even subnormal) against y of order 1: slopes and slab widths overflow in the
    filters; the result must still be exact (the slab pass then discards nothing it cannot prove)."""
    P = data.uniform_disk(4000, seed=6) * [xscale, 1.0]
    P = np.concatenate([P, [[0.0, 5.0], [0.0, -5.0], [3 * xscale, 0.0]]])
    want = ref_hull(P)
    assert coords(P, convex_hull(P)) == want
    assert coords(P, convex_hull(P, "monotone")) == want


@pytest.mark.parametrize("n", [600, 5000, 70_000])
def test_slab_pass_sizes_and_nan(n):
    """The fused slab pass at several table sizes; a NaN or Inf anywhere (not in the sample) raises."""
    P = data.gaussian(n, seed=n)
    np.testing.assert_array_equal(convex_hull(P), convex_hull(P, "qhull"))
    for bad in (np.nan, np.inf):
        Q = P.copy()
        Q[n // 2 + 1, 1] = bad
        with pytest.raises(ValueError, match="finite"):
            convex_hull(Q)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((5, 3)), np.zeros(6), np.zeros((2, 2, 2)), [[0.0, np.nan]] * 4, [[np.inf, 0.0]] * 4,
     np.array([["a", "b"]])],
)
def test_bad_input(bad):
    with pytest.raises(ValueError):
        convex_hull(bad)


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        convex_hull(np.zeros((3, 2)), "gift")


small_ints = arrays(np.float64, st.tuples(st.integers(0, 40), st.just(2)), elements=st.integers(-4, 4))
floats = arrays(
    np.float64,
    st.tuples(st.integers(0, 30), st.just(2)),
    elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=64),
)


def _check_ref(P):
    want = ref_hull(P)
    for m in EXACT:
        assert coords(P, convex_hull(P, m)) == want, m
    # the filtered path of auto even on tiny inputs (sample of 8, filter rounds down to 1 survivor)
    saved = hull._SMALL, hull._SAMPLE, hull._DONE
    try:
        hull._SMALL, hull._SAMPLE, hull._DONE = 2, 8, 1
        assert coords(P, convex_hull(P)) == want, "auto (filtered)"
    finally:
        hull._SMALL, hull._SAMPLE, hull._DONE = saved


@settings(max_examples=150, deadline=None)
@given(small_ints)
def test_property_int_sets(P):
    _check_ref(P)


@settings(max_examples=100, deadline=None)
@given(floats)
def test_property_float_sets(P):
    _check_ref(P)


any_floats = arrays(
    np.float64,
    st.tuples(st.integers(0, 12), st.just(2)),
    elements=st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=64),
                       st.sampled_from([0.0, 1.0, 2.2e-313, 5e-324, -5e-324, 1e308])),
)


@settings(max_examples=150, deadline=None)
@given(any_floats)
def test_property_any_doubles(P):
    """Subnormal, tiny and huge coordinates side by side: still the exact hull."""
    _check_ref(P)


def test_subnormal_regression():
    """Was 2 vertices: the product 2.2e-313 * 2.2e-313 underflowed in the exact orientation."""
    P = [[1, 2.2e-313], [2.2e-313, 0], [0, 0]]
    for m in EXACT:
        np.testing.assert_array_equal(convex_hull(P, m), [2, 1, 0])
    _check_ref(np.array(P, dtype=float))


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(st.one_of(small_ints, floats))
def test_property_thousands(P):
    _check_ref(P)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(data.DISTRIBUTIONS))
def test_large_exact(name):
    P = data.generate(name, 1_000_000, seed=11)
    a = convex_hull(P)
    np.testing.assert_array_equal(a, convex_hull(P, "monotone"))
    if name != "circle":
        np.testing.assert_array_equal(a, convex_hull(P, "qhull"))


def test_dask_hull_matches_in_memory():
    da = pytest.importorskip("dask.array")
    from der.geometry import convex_hull_dask

    for name in ("square", "parabola", "circle"):
        P = data.generate(name, 20_000, seed=9)
        D = np.concatenate([P, P[:100]])  # duplicates across chunks
        got = convex_hull_dask(da.from_array(D, chunks=(3000, 2)), scheduler="synchronous")
        np.testing.assert_array_equal(got, convex_hull(D))
    np.testing.assert_array_equal(convex_hull_dask(P), convex_hull(P))  # NumPy input passes through
    bad = da.from_array(np.r_[P, [[np.nan, 0.0]]], chunks=(5000, 2))
    with pytest.raises(ValueError, match="finite"):
        convex_hull_dask(bad, scheduler="synchronous")
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        convex_hull_dask(da.zeros((10, 3)))


@pytest.mark.parametrize("name", ["square", "gaussian", "parabola", "circle"])
def test_chunked_memmap_matches_in_memory(tmp_path, name):
    """Chunks of a memory-mapped .npy (path or array), duplicates across chunks, odd chunk sizes."""
    from der.geometry.dask_hull import convex_hull_chunked

    P = data.generate(name, 30_000, seed=4)
    D = np.concatenate([P, P[:500], P[::-7]])
    f = tmp_path / "pts.npy"
    np.save(f, D)
    want = convex_hull(D)
    for chunk in (3, 1001, 7000, len(D) + 5):
        np.testing.assert_array_equal(convex_hull_chunked(f, chunk_rows=chunk), want)
    np.testing.assert_array_equal(convex_hull_chunked(np.load(f, mmap_mode="r"), 4096, progress=True), want)
    np.testing.assert_array_equal(convex_hull_chunked(D.astype(np.float32), 5000), convex_hull(D.astype(np.float32)))


def test_chunked_bad_input(tmp_path):
    from der.geometry.dask_hull import convex_hull_chunked

    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        convex_hull_chunked(np.zeros((10, 3)))
    with pytest.raises(ValueError, match="chunk_rows"):
        convex_hull_chunked(np.zeros((10, 2)), chunk_rows=0)
    with pytest.raises(ValueError, match="finite"):
        convex_hull_chunked(np.r_[data.uniform_square(100, 0), [[np.inf, 0]]], chunk_rows=50)
    assert convex_hull_chunked(np.zeros((0, 2))).shape == (0,)
    np.testing.assert_array_equal(convex_hull_chunked(np.ones((7, 2)), 3), [0])


def _slab_tables_ref(xq, yq, nlow, nb):
    """The slab tables by NumPy, vectorized (the formulas of der.geometry._slab, evaluated directly)."""
    eps = 2.0**-53
    xmin, xmax = float(xq[0]), float(xq[nlow])
    width = xmax - xmin
    big = float(max(np.abs(xq).max(), np.abs(yq).max()))
    with np.errstate(over="ignore"):
        inv_w = nb / width
    edges = xmin + np.arange(nb + 1) / inv_w
    delta = 16.0 * eps * (abs(xmin) + abs(xmax) + width) + 1e-10 * width
    xl, xr = edges[:-1] - delta, edges[1:] + delta
    ok = (xl > xmin) & (xr < xmax)
    ok[0] = ok[-1] = False
    xl, xr = np.where(ok, xl, 0.5 * (xmin + xmax)), np.where(ok, xr, 0.5 * (xmin + xmax))

    def at(xs, ys, x):
        e = np.clip(np.searchsorted(xs, x, side="right") - 1, 0, len(xs) - 2)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            v = ys[e] + (x - xs[e]) * ((ys[e + 1] - ys[e]) / (xs[e + 1] - xs[e]))
        return np.where(np.isfinite(v), v, np.nan)

    xlow, ylow = xq[: nlow + 1], yq[: nlow + 1]
    xup, yup = np.append(xq[nlow:], xq[0])[::-1], np.append(yq[nlow:], yq[0])[::-1]
    lo = np.maximum(at(xlow, ylow, xl), at(xlow, ylow, xr)) + 128.0 * eps * big
    up = np.minimum(at(xup, yup, xl), at(xup, yup, xr)) - 128.0 * eps * big
    return xmin, inv_w, np.where(ok, lo, np.inf), np.where(ok, up, -np.inf)


@pytest.mark.parametrize("name", ["square", "gaussian", "parabola", "circle", "clustered"])
@pytest.mark.parametrize("xscale", [1.0, 1e-12, 1e-300, 1e100])
def test_slab_tables_match_numpy_reference(name, xscale):
    """The numba slab tables (edge pointers, per-edge slopes) are bit-identical to the direct formulas."""
    from der.geometry._slab import slab_tables

    P = data.generate(name, 5000, seed=3) * [xscale, 1.0]
    q = hull._chain(P, np.arange(0, len(P), 7))
    xq, yq = np.ascontiguousarray(P[q, 0]), np.ascontiguousarray(P[q, 1])
    nlow = int(np.lexsort((yq, xq))[-1])
    for nb in (4, 37, 1024, 8192):
        got, want = slab_tables(xq, yq, nlow, nb), _slab_tables_ref(xq, yq, nlow, nb)
        assert got[:2] == want[:2]
        np.testing.assert_array_equal(got[2], want[2])
        np.testing.assert_array_equal(got[3], want[3])
