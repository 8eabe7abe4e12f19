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
arithmetic. The orientation predicate is exact for all finite doubles (subnormals included). The
float filters of ``auto`` need magnitudes in ``[2^-400, 2^400]``: other input is rescaled by a power
of two where that is exact, else (coordinates spanning more than ~2^800) finished by the exact chain
without filtering.

**auto** (the paper's theme, §5.1: low-entropy structure makes hulls cheap): an exact,
output-friendly variant of the Akl--Toussaint heuristic. The exact hull of a strided sample of 4096
points is an inner polygon whose vertices are input points. One fused numba pass over the input
(:mod:`der.geometry._slab`) checks for NaN/Inf, measures max |P| and discards every point that is
*provably* strictly inside that polygon, with one slab index and two table loads per point (bounds
above the lower and below the upper chain per x-slab, with rigorous rounding margins). If many
points survive and the survivors are still a small fraction, further rounds use the hull of the
sample plus a sample of the survivors and an exact per-edge test (``filter_chains``, a float test
with a rigorous margin). When the sample hull has most sample points as vertices (points on a
circle: nothing can be discarded) filtering is skipped. The survivors are sorted (NumPy's SIMD
argsort) and finished with the exact monotone chain. The input is not copied when it is already
C-contiguous float64 with magnitude in ``[2^-400, 2^400]``. Compile time: all kernels use
``cache=True``; :func:`warmup` compiles them once per machine.
"""

from __future__ import annotations

import numpy as np

from der.geometry import _kernels as K
from der.geometry._slab import slab_filter, slab_tables
from der.geometry.data import check_points

__all__ = ["METHODS", "convex_hull", "hull_qhull", "warmup"]

METHODS = ("auto", "qhull", "chan", "monotone")

_SMALL = 512  # below this, filtering does not pay: monotone chain directly
_SAMPLE = 4096  # size of the strided sample whose exact hull is the first inner polygon
_CIRCLE_FRAC = 0.5  # sample hull has more vertices than this fraction: do not filter
_DONE = 20_000  # survivors few enough for the final sort + chain
_MAX_ROUNDS = 3
_SLABS = 8192  # slabs of the first, fused pass
_SAFE_LO, _SAFE_HI = 2.0**-400, 2.0**400  # magnitudes at which the float filters are rigorous


def _prepare(points) -> tuple[np.ndarray, float]:
    """Validate ``points``; return an exact power-of-two rescaling (C-contiguous float64) and max |P|.

    The NaN/Inf check and max |P| are one fused numba pass."""
    P = check_points(points, 2, check_finite=False)
    big = K.absmax(P) if len(P) else 0.0
    _check_finite(P, big)
    if not _SAFE_LO <= big <= _SAFE_HI and big > 0.0:
        e = -int(np.frexp(big)[1])
        Q = np.ldexp(P, e)
        if np.array_equal(np.ldexp(Q, -e), P):  # exact (no tiny coordinate lost bits): only the exponent changed
            P, big = Q, float(np.ldexp(big, e))
    return P, big


def _check_finite(P: np.ndarray, big: float) -> None:
    if not np.isfinite(big):
        bad = int(np.count_nonzero(~np.isfinite(P).all(axis=1)))
        raise ValueError(f"points must be finite, got {bad} row(s) with NaN or Inf")


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


def _inner_polygon_filter(P: np.ndarray, q: np.ndarray, idx: np.ndarray | None, scale: float, par: bool):
    """Rows (all, or ``idx``) not proven interior to the CCW polygon with vertex rows ``q``."""
    xb = np.ascontiguousarray(P[q, 0])
    yb = np.ascontiguousarray(P[q, 1])
    h = len(q)
    nlow = int(np.lexsort((yb, xb))[-1])  # lexicographic max ends the lower chain
    a, b, thr = K.edge_tests(xb, yb, scale)
    nb = 16 * h
    x0, x1 = xb[0], xb[nlow]
    with np.errstate(over="ignore"):
        inv_w = nb / (x1 - x0)  # inf for a tiny width: the table is then useless, never wrong
    edges = x0 + np.arange(nb + 1) / inv_w  # bucket k spans edges[k] .. edges[k + 1]
    # lower edge containing the left end of bucket k (largest e <= nlow - 1 with xb[e] <= left end)
    tab_lo = np.clip(np.searchsorted(xb[: nlow + 1], edges[:-1], side="right") - 1, 0, nlow - 1)
    # upper edge containing the right end of bucket k (smallest f >= nlow with xb[f + 1] < right end)
    upx = np.append(xb[nlow:], xb[0])  # x of upper-chain vertices nlow..h, descending
    cnt = np.searchsorted(-upx, -edges[1:], side="left")  # upper vertices with x > right end
    tab_up = np.clip(nlow + cnt - 1, nlow, h - 1)
    fn = K.filter_chains_par if par else K.filter_chains
    full = idx is None
    xb = np.append(xb, xb[0])
    tab_lo, tab_up = tab_lo.astype(np.int64), tab_up.astype(np.int64)
    return fn(P, np.empty(0, np.int64) if full else idx, full, xb, a, b, thr, nlow, x0, inv_w,
              tab_lo, tab_up, xb[tab_lo + 1], xb[tab_up + 1])


def _first_pass(P: np.ndarray, cand: np.ndarray):
    """Sample hull -> slab tables -> one fused pass over all of ``P`` (:mod:`der.geometry._slab`).

    Returns ``(q, idx, big)``: the sample hull, the survivors and max |P| (NaN/inf if some entry is),
    or ``None`` when the sample is degenerate, circle-like or outside the safe magnitude range."""
    s = K.absmax(P[cand])
    if not _SAFE_LO <= s <= _SAFE_HI:
        return None
    q = _chain(P, cand)
    if len(q) < 3 or len(q) > _CIRCLE_FRAC * len(cand):
        return None
    xq, yq = np.ascontiguousarray(P[q, 0]), np.ascontiguousarray(P[q, 1])
    nlow = int(np.lexsort((yq, xq))[-1])
    tab = slab_tables(xq, yq, nlow, int(np.clip(len(P) // 32, 4, _SLABS)))
    if tab is None:
        return None
    idx, big = slab_filter(P, *tab)
    return q, idx, big


def _auto(P: np.ndarray, par: bool = False) -> np.ndarray:
    """Sample hull -> slab pass (validates P) -> provable interior filter refined while it pays ->
    exact monotone chain. ``P``: (n, 2) C-contiguous float64, not yet checked for NaN/Inf."""
    n = len(P)
    cand = np.arange(0, n, max(1, n // min(_SAMPLE, max(256, n // 16))), dtype=np.int64)
    first = _first_pass(P, cand) if n > _SMALL else None
    if first is not None:
        q, idx, scale = first
        _check_finite(P, scale)
        if _SAFE_LO <= scale <= _SAFE_HI:
            if len(idx) <= _DONE:
                return _chain(P, idx)
            cand = np.union1d(q, idx[:: max(1, len(idx) // _SAMPLE)])
            return _refine(P, cand, idx, scale, par, _MAX_ROUNDS - 1)
    P, scale = _prepare(P)
    if n <= _SMALL or not _SAFE_LO <= scale <= _SAFE_HI:
        return _chain(P)  # (coordinates spanning more than ~2^800: the exact chain, no float filter)
    return _refine(P, cand, None, scale, par, _MAX_ROUNDS)


def _refine(P: np.ndarray, cand: np.ndarray, idx: np.ndarray | None, scale: float, par: bool,
            rounds: int) -> np.ndarray:
    """Up to ``rounds`` exact inner-polygon filters (hull of ``cand`` first) on the rows ``idx``
    (default all), then the chain. ``scale`` bounds max |P|."""
    for _ in range(rounds):
        q = _chain(P, cand)
        if len(q) < 3 or len(q) > _CIRCLE_FRAC * len(cand):
            break  # degenerate, or circle-like: (almost) nothing can be discarded
        idx = _inner_polygon_filter(P, q, idx, scale, par)
        if len(idx) <= _DONE:
            break
        # refine: the hull of a sample of the survivors plus the current polygon is a larger
        # inner polygon (its vertices are input points)
        cand = np.union1d(q, idx[:: max(1, len(idx) // _SAMPLE)])
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
    P = check_points(points, 2, check_finite=False)
    if len(P) == 0:
        return np.zeros(0, dtype=np.int64)
    if method == "auto":
        return _auto(P)
    P, _ = _prepare(P)
    if method == "monotone":
        return _chain(P)
    if method == "qhull":
        v = hull_qhull(P) if len(P) >= 3 else None
        return _chain(P) if v is None else _rotate_to_lexmin(P, v)
    if method == "chan":
        keep = K.dedup_hash(P)
        return keep[K.chan_hull(np.ascontiguousarray(P[keep]))]


def warmup() -> None:
    """Compile (or load from the numba cache) every kernel on a tiny input."""
    from der.geometry.data import uniform_disk

    for n in (16, 70_000):
        P = uniform_disk(n, seed=0)
        _auto(P)
        _auto(P, par=True)
    _chain(np.zeros((3, 2)))
