r"""Exact 2D convex hulls: QHull, Andrew's monotone chain, Chan's algorithm, and a filtered ``auto``.

:func:`convex_hull` returns the ``int64`` indices of the hull vertices, counter-clockwise, starting
at the lexicographically smallest vertex (smallest x, then smallest y). Collinear points on hull
edges are excluded. Degenerate inputs (where QHull raises) are defined as:

* ``n == 0`` -> empty array; all points equal -> one index; all points collinear -> the two
  extreme points (lexicographic min first).

Among exact duplicates, ``monotone`` and ``auto`` return the smallest index; ``qhull`` and ``chan``
return one of them.

**Exactness.** ``monotone``, ``chan`` and ``auto`` decide every turn with an exact orientation
predicate (:mod:`der.geometry._kernels`), so they return the hull of the points *as given* in
float64. QHull decides with floating-point tolerances and merges facets whose points are within its
roundoff bound; on inputs in general position both agree, but where points lie within ~1e-15 of a
hull edge (dense points on a circle) QHull may drop vertices that are strictly convex in exact
arithmetic. Input is rescaled by a power of two (exact) when its magnitude is outside
``[2^-400, 2^400]``; the predicates are exact as long as no product underflows, i.e. unless nonzero
coordinate magnitudes differ by more than ~2^450.

**auto** (the paper's theme, §5.1: low-entropy structure makes hulls cheap): an exact,
output-friendly variant of the Akl--Toussaint heuristic. Stage 1 finds the extreme points in
8 directions (one parallel numba pass) and discards, in a second parallel pass, every point that is
*provably* strictly inside their polygon (a float test with a rigorous rounding-error margin). If
many points survive and the survivors are still a small fraction, stage 2 repeats with 64
directions on the survivors only. When most points survive (points on a circle: nothing can be
discarded) filtering stops at once. The survivors are sorted (NumPy's SIMD argsort) and finished
with the exact monotone chain. Compile time: all kernels use ``cache=True``; :func:`warmup` compiles
them once per machine.
"""

from __future__ import annotations

import numpy as np

from der.geometry import _kernels as K
from der.geometry.data import check_points

__all__ = ["METHODS", "convex_hull", "hull_qhull", "warmup"]

METHODS = ("auto", "qhull", "chan", "monotone")

_SMALL = 512  # below this, filtering does not pay: monotone chain directly
_STAGE2_MIN = 4096  # run the 64-direction stage only if more survivors than this ...
_STAGE2_MAX_FRAC = 0.25  # ... and they are a small fraction (else the input is circle-like)


def _prepare(points) -> np.ndarray:
    """Validate and return an exact power-of-two rescaling of ``points`` (C-contiguous float64)."""
    P = check_points(points, 2)
    if len(P):
        big = float(np.abs(P).max())
        if big > 2.0**400 or (0.0 < big < 2.0**-400):
            P = np.ldexp(P, -int(np.frexp(big)[1]))  # exact: only the exponent changes
    return P


def _chain(P: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """Monotone chain on rows ``idx`` (default all) of ``P``: sort lexicographically, then chain."""
    if idx is None:
        order = np.argsort(P[:, 0])
    else:
        order = idx[np.argsort(P[idx, 0])]
    order = np.ascontiguousarray(order, dtype=np.int64)
    K.lex_fix_ties(P, order)
    out = np.empty(len(order) + 1, dtype=np.int64)
    k = K.chain_sorted(P, order, out)
    return out[:k].copy()


def _directions(k: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(k) * (2.0 * np.pi / k)
    return np.ascontiguousarray(np.cos(t)), np.ascontiguousarray(np.sin(t))


_DIRS = {k: _directions(k) for k in (8, 64)}


def _filter_stage(P: np.ndarray, idx: np.ndarray | None, k: int, scale: float) -> np.ndarray | None:
    """One extreme-direction filter stage; returns surviving row indices, or None if no polygon."""
    full = idx is None
    cosv, sinv = _DIRS[k]
    ext = K.extremes(P, np.empty(0, np.int64) if full else idx, full, cosv, sinv)
    q = ext[np.r_[True, ext[1:] != ext[:-1]]]  # drop consecutive repeats (circularly below)
    if len(q) > 1 and q[0] == q[-1]:
        q = q[:-1]
    qx, qy = P[q, 0].copy(), P[q, 1].copy()
    # distinct indices may still be equal points: drop consecutive equal coordinates
    same = (qx == np.roll(qx, -1)) & (qy == np.roll(qy, -1))
    qx, qy = qx[~same], qy[~same]
    if len(qx) < 3:
        return None
    a, b, thr = K.edge_tests(qx, qy, scale)
    return K.filter_outside(P, np.empty(0, np.int64) if full else idx, full, a, b, thr)


def _auto(P: np.ndarray) -> np.ndarray:
    n = len(P)
    if n <= _SMALL:
        return _chain(P)
    scale = float(np.abs(P).max())
    idx = _filter_stage(P, None, 8, scale)
    if idx is None:  # fewer than 3 distinct extremes: degenerate input
        return _chain(P)
    if _STAGE2_MIN < len(idx) < _STAGE2_MAX_FRAC * n:
        idx2 = _filter_stage(P, idx, 64, scale)
        if idx2 is not None:
            idx = idx2
    return _chain(P, idx)


def hull_qhull(P: np.ndarray) -> np.ndarray:
    """SciPy/QHull hull vertices (CCW as QHull gives them), or None if QHull rejects the input."""
    from scipy.spatial import ConvexHull, QhullError

    try:
        return ConvexHull(P).vertices.astype(np.int64)
    except (QhullError, ValueError):
        return None


def _rotate_to_lexmin(P: np.ndarray, v: np.ndarray) -> np.ndarray:
    if len(v) == 0:
        return v
    start = np.lexsort((P[v, 1], P[v, 0]))[0]
    return np.ascontiguousarray(np.roll(v, -start))


def convex_hull(points, method: str = "auto") -> np.ndarray:
    """Indices of the convex-hull vertices of a 2D point set, counter-clockwise (module docstring).

    points: (n, 2) real array (any float/int dtype, any strides); method: one of ``METHODS``.
    Returns an ``int64`` array (h,).

    >>> convex_hull([[0, 0], [1, 0], [0.5, 0.2], [1, 1], [0, 1], [0.5, 0]]).tolist()
    [0, 1, 3, 4]
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    P = _prepare(points)
    if len(P) == 0:
        return np.zeros(0, dtype=np.int64)
    if method == "monotone":
        return _chain(P)
    if method == "qhull":
        v = hull_qhull(P) if len(P) >= 3 else None
        return _chain(P) if v is None else _rotate_to_lexmin(P, v)
    if method == "chan":
        from der.geometry._chan import chan

        return chan(P)
    return _auto(P)


def warmup() -> None:
    """Compile (or load from the numba cache) every kernel on a tiny input."""
    from der.geometry.data import uniform_disk

    for n in (16, 70_000):
        P = uniform_disk(n, seed=0)
        _auto(P)
        _filter_stage(P, np.arange(n, dtype=np.int64), 64, 1.0)
    _chain(np.zeros((3, 2)))
