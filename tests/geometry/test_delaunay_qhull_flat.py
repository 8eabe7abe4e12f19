"""method="qhull" on flat input: exactly collinear → no triangles; nearly collinear → a clear ValueError."""

import numpy as np
import pytest

pytest.importorskip("scipy")
pytest.importorskip("numba")

from der.geometry import delaunay


def test_exactly_collinear_points_have_no_triangles_with_every_method():
    P = np.c_[np.arange(8.0), 2 * np.arange(8.0)]
    for method in ("qhull", "sweep", "auto"):
        assert delaunay(P, method=method).shape == (0, 3)


def test_nearly_collinear_points_raise_for_qhull_and_triangulate_exactly():
    P = np.c_[np.arange(10.0), np.arange(10.0) * 1e-300]
    tri = delaunay(P, method="sweep")
    assert len(tri) > 0
    with pytest.raises(ValueError, match="nearly collinear.*sweep"):
        delaunay(P, method="qhull")
