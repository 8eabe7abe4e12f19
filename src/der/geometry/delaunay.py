r"""2D Delaunay triangulation: SciPy/QHull, and QHull on a spatially ordered input (paper §5.1).

:func:`delaunay` returns ``(t, 3)`` ``int64`` vertex indices into ``points``, each triangle
counter-clockwise, triangles sorted lexicographically (so results compare directly). Inputs with
fewer than 3 distinct points, or all points collinear, have no triangles: ``(0, 3)``. Exact
duplicates: one representative takes part (QHull's "coplanar" points are left out).

Methods:

* ``"qhull"`` -- ``scipy.spatial.Delaunay`` on the input as given.
* ``"ordered"`` (``"auto"``) -- the same engine on the points reordered along a Morton (Z-order)
  curve: QHull inserts points in input order and locates each new point by walking from recently
  created facets, so spatially coherent insertion shortens the walks and improves cache locality;
  the triangulation is the same (the Delaunay triangulation is unique up to cocircular ties). The
  Morton key is computed in numba (one pass) and sorted by NumPy.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from der.geometry.data import check_points

__all__ = ["METHODS", "delaunay", "morton_order"]

METHODS = ("auto", "ordered", "qhull")


@njit(cache=True)
def _morton_keys(P, lo0, lo1, s0, s1):
    n = P.shape[0]
    out = np.empty(n, dtype=np.uint64)
    for i in range(n):
        a = np.uint64(min(max((P[i, 0] - lo0) * s0, 0.0), 65535.0))
        b = np.uint64(min(max((P[i, 1] - lo1) * s1, 0.0), 65535.0))
        for sh, mask in ((8, 0x00FF00FF), (4, 0x0F0F0F0F), (2, 0x33333333), (1, 0x55555555)):
            a = (a | (a << np.uint64(sh))) & np.uint64(mask)
            b = (b | (b << np.uint64(sh))) & np.uint64(mask)
        out[i] = a | (b << np.uint64(1))
    return out


def morton_order(points) -> np.ndarray:
    """Permutation sorting ``points`` (n, 2) along a 16-bit-per-axis Morton (Z-order) curve."""
    P = check_points(points, 2)
    if len(P) == 0:
        return np.zeros(0, dtype=np.int64)
    lo = P.min(axis=0)
    span = P.max(axis=0) - lo
    s = np.where(span > 0, 65535.0 / np.where(span > 0, span, 1.0), 0.0)
    return np.argsort(_morton_keys(P, lo[0], lo[1], s[0], s[1]), kind="stable").astype(np.int64)


def _canonical(P: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """Orient every triangle counter-clockwise, rotate its smallest index first, sort rows."""
    if len(tri) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    tri = tri.astype(np.int64)
    a, b, c = P[tri[:, 0]], P[tri[:, 1]], P[tri[:, 2]]
    cw = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]) < 0
    tri[cw] = tri[cw][:, ::-1]
    r = np.argmin(tri, axis=1)
    rows = np.arange(len(tri))[:, None]
    tri = tri[rows, (r[:, None] + np.arange(3)) % 3]
    return tri[np.lexsort(tri.T[::-1])]


def _qhull(P: np.ndarray) -> np.ndarray:
    from scipy.spatial import Delaunay, QhullError

    try:
        return Delaunay(P).simplices
    except (QhullError, ValueError):
        return np.zeros((0, 3), dtype=np.int64)


def delaunay(points, method: str = "auto") -> np.ndarray:
    """Delaunay triangles of ``points`` (n, 2): ``(t, 3)`` int64 indices, CCW, rows sorted.

    >>> delaunay([[0, 0], [1, 0], [0, 1], [1, 1.1]]).tolist()
    [[0, 1, 2], [1, 3, 2]]
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    P = check_points(points, 2)
    if len(P) < 3:
        return np.zeros((0, 3), dtype=np.int64)
    if method == "qhull":
        return _canonical(P, _qhull(P))
    order = morton_order(P)
    tri = _qhull(np.ascontiguousarray(P[order]))
    return _canonical(P, order[tri] if len(tri) else tri)
