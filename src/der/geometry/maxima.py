r"""Exact Pareto maxima (skyline) of 2D and 3D point sets (paper App. D.1).

A point :math:`p` is *maximal* when no other point :math:`q` satisfies :math:`q \ge p` componentwise
with :math:`q \ne p`. Exact duplicates of a maximal point are all maximal (as ``paretoset`` with
``distinct=False``). :func:`maxima` returns their indices in increasing order.

Methods:

* ``"sweep"`` -- the classic sort-based skyline (Kung, Luccio & Preparata 1975): sort
  lexicographically in decreasing order (NumPy's argsort on x; lexsort only when x ties) (every dominator of p then precedes p) and sweep, keeping the
  running max of y (2D) or a (y, z) staircase with binary search (3D). O(n log n) plus staircase
  updates (memmove of the staircase; O(n s) worst case with s the staircase size).
* ``"auto"`` -- the same sweep after an exact numba pre-filter in the spirit of the
  paper's entropy view: a few *pivot* points (rows of largest estimated dominated mass: in a sample, then among the survivors)
  discard every point they strictly dominate (dominance by any input point is proof of
  non-maximality; comparisons are exact). Only the survivors are sorted. On uniform or Gaussian data
  the survivors are a few percent of n; when nothing can be discarded (all points on an
  anti-diagonal plane) the cost is the sweep's plus one linear pass.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from der.geometry.data import check_points

__all__ = ["maxima", "maxima_sweep", "METHODS"]

METHODS = ("auto", "sweep")
_SAMPLE = 1 << 12  # strided sample: empirical CDFs and first pivot candidates
_DONE = 4096  # survivors few enough: stop filtering
_PIVOTS = 4  # pivots per round


@njit(cache=True)
def _sweep2(P, order):
    """2D: ``order`` lexicographically decreasing; keep p iff y_p > max y of points with larger x,
    or p equals the best point so far (duplicates)."""
    keep = np.zeros(order.shape[0], dtype=np.bool_)
    best_y = -np.inf
    bx = np.nan
    for t in range(order.shape[0]):
        i = order[t]
        x, y = P[i, 0], P[i, 1]
        if y > best_y:
            keep[t] = True
            best_y, bx = y, x
        elif y == best_y and x == bx:
            keep[t] = True  # exact duplicate of a maximal point
    return keep


@njit(cache=True)
def _sweep3(P, order):
    """3D: ``order`` lexicographically decreasing in (x, y, z); staircase of (y, z) sorted by y
    ascending with z descending; each entry keeps the largest x seen for its (y, z)."""
    n = order.shape[0]
    keep = np.zeros(n, dtype=np.bool_)
    sy = np.empty(n)
    sz = np.empty(n)
    sx = np.empty(n)
    s = 0
    for t in range(n):
        i = order[t]
        x, y, z = P[i, 0], P[i, 1], P[i, 2]
        lo, hi = 0, s  # first staircase entry with y' >= y
        while lo < hi:
            mid = (lo + hi) // 2
            if sy[mid] < y:
                lo = mid + 1
            else:
                hi = mid
        if lo < s and sz[lo] >= z:
            if sy[lo] == y and sz[lo] == z and sx[lo] == x:
                keep[t] = True  # duplicate of a maximal point
            continue
        keep[t] = True
        # remove entries weakly dominated by (y, z): a run ending just before position lo
        j = lo
        while j > 0 and sz[j - 1] <= z:
            j -= 1
        # entries j..lo-1 have y' < y and z' <= z: dominated; an entry at lo with y' == y and z' < z too
        end = lo
        if end < s and sy[end] == y:
            end += 1
        removed = end - j
        if removed == 0:
            sy[j + 1 : s + 1] = sy[j:s].copy()
            sz[j + 1 : s + 1] = sz[j:s].copy()
            sx[j + 1 : s + 1] = sx[j:s].copy()
            s += 1
        elif removed > 1:
            sy[j + 1 : s - removed + 1] = sy[end:s].copy()
            sz[j + 1 : s - removed + 1] = sz[end:s].copy()
            sx[j + 1 : s - removed + 1] = sx[end:s].copy()
            s -= removed - 1
        sy[j], sz[j], sx[j] = y, z, x
    return keep


@njit(cache=True)
def _dominated(P, V):
    """mask[i]: row i of P is strictly dominated by some pivot row of V (k, d). One branch-free,
    vectorizable loop per pivot; exact comparisons."""
    n, d = P.shape
    out = np.zeros(n, dtype=np.bool_)
    for j in range(V.shape[0]):
        vx, vy = V[j, 0], V[j, 1]
        if d == 2:
            for i in range(n):
                x, y = P[i, 0], P[i, 1]
                out[i] |= (vx >= x) & (vy >= y) & ((vx != x) | (vy != y))
        else:
            vz = V[j, 2]
            for i in range(n):
                x, y, z = P[i, 0], P[i, 1], P[i, 2]
                out[i] |= (vx >= x) & (vy >= y) & (vz >= z) & ((vx != x) | (vy != y) | (vz != z))
    return out


def _pivot_filter(P: np.ndarray) -> np.ndarray:
    """Rows not strictly dominated by a pivot (module docstring). Pivots are the rows with the
    largest estimated dominated mass: the sum over coordinates of log(empirical CDF), the CDF taken
    from a strided sample. Any input row may serve as a pivot (being dominated by an input row proves
    non-maximality), so the choice affects speed only. Round 1 picks pivots in the sample and
    filters all rows; round 2, if many survive, picks them among the survivors and filters those."""
    n, d = P.shape
    step = max(1, n // _SAMPLE)
    samp = np.sort(P[::step], axis=0)

    def pivots(rows: np.ndarray) -> np.ndarray:
        X = P[rows]
        score = np.zeros(len(rows))
        for c in range(d):
            score += np.log(np.searchsorted(samp[:, c], X[:, c], side="right") + 0.5)
        return np.ascontiguousarray(X[np.argsort(score)[-_PIVOTS:]])

    idx = np.flatnonzero(~_dominated(P, pivots(np.arange(0, n, step))))
    if len(idx) > _DONE:
        idx = idx[~_dominated(np.ascontiguousarray(P[idx]), pivots(idx[:: max(1, len(idx) // _SAMPLE)]))]
    return idx


def _lex_desc(P: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``idx`` sorted lexicographically decreasing by the rows of P (NumPy's SIMD argsort on x;
    the slower ``np.lexsort`` only if some x values tie)."""
    o = idx[np.argsort(-P[idx, 0])]
    x = P[o, 0]
    if len(o) > 1 and np.any(x[1:] == x[:-1]):
        cols = [-P[idx, c] for c in range(P.shape[1] - 1, -1, -1)]  # last key is primary
        o = idx[np.lexsort(cols)]
    return np.ascontiguousarray(o, dtype=np.int64)


def _sweep(P: np.ndarray, idx: np.ndarray) -> np.ndarray:
    order = _lex_desc(P, idx)
    keep = _sweep2(P, order) if P.shape[1] == 2 else _sweep3(P, order)
    return np.sort(order[keep])


def maxima_sweep(points) -> np.ndarray:
    """Baseline: the sort-based skyline on all points (no pre-filter). Same output as :func:`maxima`."""
    P = check_points(points, dim=(2, 3))
    return _sweep(P, np.arange(len(P), dtype=np.int64))


def maxima(points, method: str = "auto") -> np.ndarray:
    """Indices (int64, increasing) of the Pareto-maximal points of ``points`` (n, 2) or (n, 3).

    >>> maxima([[1, 1], [2, 0], [0, 2], [0.5, 0.5], [2, 0]]).tolist()
    [0, 1, 2, 4]
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    P = check_points(points, dim=(2, 3))
    if len(P) == 0:
        return np.zeros(0, dtype=np.int64)
    if method == "sweep" or len(P) < 256:
        return _sweep(P, np.arange(len(P), dtype=np.int64))
    return _sweep(P, _pivot_filter(P))
