r"""2D Delaunay triangulation: an exact sweep-hull engine, SciPy/QHull, QHull on ordered input (§5.1).

:func:`delaunay` returns ``(t, 3)`` ``int64`` vertex indices into ``points``, each triangle
counter-clockwise, triangles sorted lexicographically (so results compare directly). Inputs with
fewer than 3 distinct points, or all points collinear, have no triangles: ``(0, 3)``. Exact
duplicates: one representative takes part (QHull's "coplanar" points are left out).

Methods:

* ``"sweep"`` (``"auto"``) -- our engine (:mod:`der.geometry._sweep`): Delaunator's sweep-hull
  insertion with Lawson flips, compiled with numba, with *exact* orientation and incircle predicates
  (float filters with exact fallbacks) and exact handling of the points Delaunator would skip. It
  returns the Delaunay triangulation of the points as given in float64 (where QHull, deciding with
  tolerances, can differ on nearly cocircular or nearly collinear points); of exact duplicates the
  smallest index takes part. The sweep order is a stable bucket sort of the distances (linear time),
  the coordinates are gathered into that order before the sweep (sequential reads, a compact
  working set at the sweep front), triangle and halfedge arrays are int32 below 2^31 / 6 points, and
  the canonical form comes from a counting sort (:mod:`der.geometry._order`). The predicates
  are exact for all finite doubles (:mod:`der.geometry._incircle`: Shewchuk's adaptive stages without
  heap allocation); input whose largest coordinate is outside ``[2^-100, 2^100]`` is rescaled by a
  power of two where that is exact (it keeps the float distances and centres of the sweep finite).
* ``"qhull"`` -- ``scipy.spatial.Delaunay`` on the input as given.
* ``"ordered"`` -- QHull on the points reordered along a Morton (Z-order)
  curve: QHull inserts points in input order and locates each new point by walking from recently
  created facets, so spatially coherent insertion shortens the walks and improves cache locality;
  the triangulation is the same (the Delaunay triangulation is unique up to cocircular ties). The
  Morton key is computed in numba (one pass) and sorted by NumPy.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from der.geometry._kernels import absmax
from der.geometry._order import canonical_from_cw
from der.geometry._sweep import index_proto, sweep_ranked
from der.geometry.data import check_points

__all__ = ["METHODS", "delaunay", "morton_order", "warmup"]

METHODS = ("auto", "sweep", "ordered", "qhull")


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


def _canonical(P: np.ndarray, tri: np.ndarray, cw: bool = False) -> np.ndarray:
    """Orient every triangle counter-clockwise, rotate its smallest index first, sort rows.

    ``cw=True``: the triangles are known to be clockwise (our engine) -- reverse them all."""
    if len(tri) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    tri = tri.astype(np.int64)
    if cw:
        tri = tri[:, ::-1]
    else:
        a, b, c = P[tri[:, 0]], P[tri[:, 1]], P[tri[:, 2]]
        flip = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]) < 0
        tri[flip] = tri[flip][:, ::-1]
    return _rotate_sort(np.ascontiguousarray(tri), len(P))


def _rotate_sort(tri: np.ndarray, n: int) -> np.ndarray:
    """Rotate each row's smallest index first; sort rows lexicographically (one int64 key when
    three indices fit in 63 bits)."""
    r = np.argmin(tri, axis=1)
    rows = np.arange(len(tri))[:, None]
    tri = tri[rows, (r[:, None] + np.arange(3)) % 3]
    if n <= 1 << 21:
        key = (tri[:, 0] << 42) | (tri[:, 1] << 21) | tri[:, 2]
        return tri[np.argsort(key)]
    return tri[np.lexsort(tri.T[::-1])]


def _qhull(P: np.ndarray) -> np.ndarray:
    """QHull's triangles; where QHull gives up (flat input), empty if the points are exactly collinear
    (the exact engine finds no triangle), else a ``ValueError`` instead of a silently empty answer."""
    from scipy.spatial import Delaunay, QhullError

    try:
        return Delaunay(P).simplices
    except (QhullError, ValueError) as e:
        if len(_sweep(P)) == 0:
            return np.zeros((0, 3), dtype=np.int64)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"qhull cannot triangulate these nearly collinear points ({reason}); "
                         "method='sweep' (exact) can") from None


def _sweep(P: np.ndarray, big: float | None = None) -> np.ndarray:
    """Our exact engine on ``P`` (rescaled by a power of two when its magnitude ``big`` = max |P| is
    extreme), in the canonical form."""
    big = float(absmax(P)) if big is None else big
    if big > 0.0 and not 2.0**-100 <= big <= 2.0**100:
        e = -int(np.frexp(big)[1])
        Q = np.ldexp(P, e)
        if np.array_equal(np.ldexp(Q, -e), P):  # exact: no tiny coordinate lost bits
            P = Q
    tri, ids = sweep_ranked(P[:, 0], P[:, 1], np.zeros(0, np.int64), index_proto(len(P)))
    return canonical_from_cw(tri, ids, len(P))


def warmup() -> None:
    """Compile (or load from the numba cache) the engine on a tiny input."""
    _sweep(np.random.default_rng(0).random((64, 2)))


def delaunay(points, method: str = "auto") -> np.ndarray:
    """Delaunay triangles of ``points`` (n, 2): ``(t, 3)`` int64 indices, CCW, rows sorted.

    >>> delaunay([[0, 0], [1, 0], [0, 1], [1, 1.1]]).tolist()
    [[0, 1, 2], [1, 3, 2]]
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    P = check_points(points, 2, check_finite=False)
    big = float(absmax(P))  # one pass, no temporaries: max |P|, NaN or inf if some entry is
    if not np.isfinite(big):
        check_points(P, 2)  # raises, naming the rows with NaN or Inf
    if len(P) < 3:
        return np.zeros((0, 3), dtype=np.int64)
    if method == "qhull":
        return _canonical(P, _qhull(P))
    if method in ("auto", "sweep"):
        return _sweep(P, big)
    order = morton_order(P)
    tri = _qhull(np.ascontiguousarray(P[order]))
    return _canonical(P, order[tri] if len(tri) else tri)
