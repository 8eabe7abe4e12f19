"""Integer points beyond float64's exact range are said to be rounded (issue: int64 near 2**60)."""

import warnings

import numpy as np
import pytest

from der._validate import as_points


def test_large_int64_points_warn_that_they_are_rounded():
    P = np.array([[2**60 + 1, 0], [0, 1], [1, 0]], dtype=np.int64)
    with pytest.warns(UserWarning, match="exceed 2\\*\\*53"):
        out = as_points(P)
    assert out.dtype == np.float64 and out[0, 0] == float(2**60)


def test_small_ints_and_floats_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_points(np.array([[2**53, -(2**53)], [0, 1]], dtype=np.int64))
        as_points(np.array([[1e300, 0.0], [0.0, 1.0]]))
        as_points(np.array([[np.iinfo(np.int64).min + 1, 0]], dtype=np.int64)[:0].reshape(0, 2))


def test_int64_min_does_not_overflow_the_check():
    P = np.array([[np.iinfo(np.int64).min, 0], [0, 1]], dtype=np.int64)
    with pytest.warns(UserWarning):
        as_points(P)


def test_geometry_entry_points_pass_the_warning_on():
    pytest.importorskip("numba")
    from der.geometry import convex_hull

    P = np.array([[2**60, 0], [0, 2**60], [0, 0], [1, 1]], dtype=np.int64)
    with pytest.warns(UserWarning, match="rounded"):
        hull = convex_hull(P)
    assert sorted(int(i) for i in hull) == [0, 1, 2]
