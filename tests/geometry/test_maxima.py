"""Exactness of der.geometry.maxima (2D/3D) against brute force and the paretoset package."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from der.geometry.maxima import maxima, maxima_sweep

M = importlib.import_module("der.geometry.maxima")  # the module (der.geometry.maxima is the function)


def brute(P) -> np.ndarray:
    P = np.asarray(P, dtype=np.float64)
    if len(P) == 0:
        return np.zeros(0, dtype=np.int64)
    dom = (P[:, None, :] >= P[None, :, :]).all(-1) & (P[:, None, :] != P[None, :, :]).any(-1)
    return np.flatnonzero(~dom.any(0))


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("kind", ["uniform", "gaussian", "grid", "antidiagonal"])
def test_against_brute_force(d, kind):
    rng = np.random.default_rng(d)
    n = 1500
    P = {
        "uniform": rng.random((n, d)),
        "gaussian": rng.standard_normal((n, d)),
        "grid": rng.integers(0, 6, (n, d)).astype(float),  # many ties and duplicates
        "antidiagonal": np.c_[rng.dirichlet(np.ones(d), n)],  # every point maximal
    }[kind]
    want = brute(P)
    for m in M.METHODS:
        np.testing.assert_array_equal(maxima(P, m), want)


def test_large_filtered_path_against_paretoset():
    from paretoset import paretoset

    rng = np.random.default_rng(0)
    for d in (2, 3):
        P = rng.standard_normal((60_000, d))
        got = maxima(P)
        np.testing.assert_array_equal(got, maxima_sweep(P))
        np.testing.assert_array_equal(got, np.flatnonzero(paretoset(P, sense=["max"] * d, distinct=False)))


def test_edge_cases_and_errors():
    assert maxima(np.zeros((0, 2))).shape == (0,)
    np.testing.assert_array_equal(maxima([[1.0, 1.0]]), [0])
    np.testing.assert_array_equal(maxima(np.ones((5, 3))), np.arange(5))  # duplicates all maximal
    np.testing.assert_array_equal(maxima([[0, 0], [1, 0], [1, 0], [0, 1]]), [1, 2, 3])
    P = np.random.default_rng(1).random((3000, 3)).astype(np.float32)
    np.testing.assert_array_equal(maxima(P), brute(P))
    np.testing.assert_array_equal(maxima(np.asfortranarray(P)[::2]), brute(P[::2]))
    with pytest.raises(ValueError, match=r"\(n, 2\) or \(n, 3\)"):
        maxima(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="finite"):
        maxima([[np.nan, 1.0]])
    with pytest.raises(ValueError, match="method"):
        maxima(np.zeros((2, 2)), "bnl")


pts = st.integers(2, 3).flatmap(
    lambda d: arrays(np.float64, st.tuples(st.integers(0, 60), st.just(d)), elements=st.integers(-3, 3))
)


def _check(P):
    want = brute(P)
    np.testing.assert_array_equal(maxima(P, "sweep"), want)
    saved = M._SAMPLE, M._DONE
    try:  # force the pivot filter on tiny inputs
        M._SAMPLE, M._DONE = 4, 0
        np.testing.assert_array_equal(M._sweep(P, M._pivot_filter(P)) if len(P) else want, want)
    finally:
        M._SAMPLE, M._DONE = saved


@settings(max_examples=200, deadline=None)
@given(pts)
def test_property_small_integer_sets(P):
    _check(P)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(pts)
def test_property_thousands(P):
    _check(P)
