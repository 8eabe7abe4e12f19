"""numba kernels for the exact 2D hull: robust orientation, monotone chain, extreme-direction filter.

Exactness rests on one predicate, :func:`orient`, the sign of
``(a - c) x (b - c)`` computed exactly: Shewchuk's floating-point filter (error bound
``ccwerrboundA``) decides almost every call; the rest fall back to an exact 12-term expansion sum of
Dekker/Veltkamp products. This is exact as long as no product underflows or overflows; the public
wrappers rescale the input by a power of two (an exact operation) so the largest coordinate is ~1.

All kernels use ``cache=True`` so compilation happens once per machine, not per process.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_EPS = 2.0**-53
_SPLITTER = 134217729.0  # 2^27 + 1 (Veltkamp split for float64)
_CCW_ERRBOUND_A = (3.0 + 16.0 * _EPS) * _EPS


@njit(cache=True, inline="always")
def _two_sum(a: float, b: float):
    x = a + b
    bv = x - a
    av = x - bv
    return x, (a - av) + (b - bv)


@njit(cache=True, inline="always")
def _two_prod(a: float, b: float):
    x = a * b
    c = _SPLITTER * a
    ahi = c - (c - a)
    alo = a - ahi
    c = _SPLITTER * b
    bhi = c - (c - b)
    blo = b - bhi
    err = x - ahi * bhi - alo * bhi - ahi * blo
    return x, alo * blo - err


@njit(cache=True)
def _orient_exact(ax, ay, bx, by, cx, cy) -> float:
    """Exact sign of ax*by - ax*cy - cx*by - ay*bx + ay*cx + cy*bx (as -1.0, 0.0 or 1.0)."""
    terms = np.empty(12)
    prods = ((ax, by), (ax, -cy), (-cx, by), (-ay, bx), (ay, cx), (cy, bx))
    k = 0
    for u, v in prods:
        hi, lo = _two_prod(u, v)
        terms[k] = hi
        terms[k + 1] = lo
        k += 2
    # grow a non-overlapping expansion (Shewchuk's Grow-Expansion with zero elimination)
    e = np.zeros(13)
    m = 0
    for t in range(12):
        q = terms[t]
        j = 0
        for i in range(m):
            q, h = _two_sum(q, e[i])
            if h != 0.0:
                e[j] = h
                j += 1
        if q != 0.0:
            e[j] = q
            j += 1
        m = j
    if m == 0:
        return 0.0
    return 1.0 if e[m - 1] > 0.0 else -1.0


@njit(cache=True)
def orient(ax, ay, bx, by, cx, cy) -> float:
    """>0 if a, b, c turn counter-clockwise, <0 clockwise, 0 if collinear -- sign exact."""
    detleft = (ax - cx) * (by - cy)
    detright = (ay - cy) * (bx - cx)
    det = detleft - detright
    if detleft > 0.0:
        if detright <= 0.0:
            return det
        detsum = detleft + detright
    elif detleft < 0.0:
        if detright >= 0.0:
            return det
        detsum = -detleft - detright
    else:
        return det
    if abs(det) >= _CCW_ERRBOUND_A * detsum:
        return det
    return _orient_exact(ax, ay, bx, by, cx, cy)


@njit(cache=True)
def lex_fix_ties(P, order) -> None:
    """Make ``order`` (sorted by x only) lexicographic in (x, y, index), in place."""
    n = order.shape[0]
    i = 0
    while i < n:
        j = i + 1
        xi = P[order[i], 0]
        while j < n and P[order[j], 0] == xi:
            j += 1
        if j - i > 1:
            run = np.sort(order[i:j])
            ys = np.empty(j - i)
            for t in range(j - i):
                ys[t] = P[run[t], 1]
            sub = np.argsort(ys, kind="mergesort")
            for t in range(j - i):
                order[i + t] = run[sub[t]]
        i = j


@njit(cache=True, inline="always")
def _turn(P, i, j, k) -> float:
    return orient(P[i, 0], P[i, 1], P[j, 0], P[j, 1], P[k, 0], P[k, 1])


@njit(cache=True)
def chain_sorted(P, order, out) -> int:
    """Andrew's monotone chain on points visited in lexicographic ``order``; writes the CCW hull into
    ``out`` (len >= len(order) + 1), starting at the lexicographically smallest point; returns count.

    Strict turns only (collinear points dropped); of exact duplicates the first in ``order`` is kept.
    Fewer than 3 distinct points: the distinct points (1 or 2, lexicographic); all collinear: the two
    extreme points.
    """
    n = order.shape[0]
    if n == 0:
        return 0
    uniq = np.empty(n, dtype=np.int64)  # exact duplicates are adjacent in lexicographic order
    m = 0
    for t in range(n):
        i = order[t]
        if m > 0 and P[i, 0] == P[uniq[m - 1], 0] and P[i, 1] == P[uniq[m - 1], 1]:
            continue
        uniq[m] = i
        m += 1
    if m < 3:
        for t in range(m):
            out[t] = uniq[t]
        return m
    k = 0
    for t in range(m):  # lower hull
        i = uniq[t]
        while k >= 2 and _turn(P, out[k - 2], out[k - 1], i) <= 0:
            k -= 1
        out[k] = i
        k += 1
    lower = k + 1
    for t in range(m - 2, -1, -1):  # upper hull
        i = uniq[t]
        while k >= lower and _turn(P, out[k - 2], out[k - 1], i) <= 0:
            k -= 1
        out[k] = i
        k += 1
    return k - 1  # the last point repeats the first


@njit(cache=True, parallel=True)
def extremes(P, idx, full, cosv, sinv):
    """For each direction (cos_k, sin_k): the index of a point maximizing the (float) dot product,
    over all rows of ``P`` (``full``) or over the rows ``idx``. Parallel over 16 chunks."""
    n = P.shape[0] if full else idx.shape[0]
    k = cosv.shape[0]
    nchunk = 16 if n >= 1 << 15 else 1
    best = np.full((nchunk, k), -np.inf)
    arg = np.zeros((nchunk, k), dtype=np.int64)
    step = (n + nchunk - 1) // nchunk
    for c in prange(nchunk):
        lo = c * step
        hi = min(n, lo + step)
        bc = np.full(k, -np.inf)
        ac = np.zeros(k, dtype=np.int64)
        for t in range(lo, hi):
            i = t if full else idx[t]
            xi = P[i, 0]
            yi = P[i, 1]
            for d in range(k):
                v = cosv[d] * xi + sinv[d] * yi
                if v > bc[d]:
                    bc[d] = v
                    ac[d] = i
        best[c] = bc
        arg[c] = ac
    res = arg[0].copy()
    for d in range(k):
        bv = best[0, d]
        for c in range(1, nchunk):
            if best[c, d] > bv:
                bv = best[c, d]
                res[d] = arg[c, d]
    return res


@njit(cache=True)
def edge_tests(qx, qy, scale):
    """Half-plane coefficients (A, B, thr) of the closed polygon q (no repeated consecutive vertex)
    such that ``A*px + B*py > thr`` (evaluated in float64) *proves* ``orient(q_i, q_{i+1}, p) > 0``.

    ``scale`` bounds |px|, |py| of every point that will be tested. The threshold adds a bound
    (16 eps: a safety factor > 4 over the worst-case analysis) on the rounding error of the float
    evaluation of (q_i.y - q_j.y) px + (q_j.x - q_i.x) py + (q_i.x q_j.y - q_i.y q_j.x), j = i + 1.
    If p passes all m tests, p is strictly left of every edge of a closed polygon whose vertices are
    input points, so its winding number is >= 1 and p lies in the *interior* of their convex hull:
    p cannot be a hull vertex, nor lie on the hull boundary.
    """
    m = qx.shape[0]
    a = np.empty(m)
    b = np.empty(m)
    thr = np.empty(m)
    for i in range(m):
        j = (i + 1) % m
        a[i] = qy[i] - qy[j]
        b[i] = qx[j] - qx[i]
        p1 = qx[i] * qy[j]
        p2 = qy[i] * qx[j]
        c = p1 - p2
        err = 16.0 * _EPS * ((abs(a[i]) + abs(b[i])) * scale + abs(p1) + abs(p2)) + 1e-300
        thr[i] = (err - c) + 2.0 * _EPS * (err + abs(c))
    return a, b, thr


@njit(cache=True, parallel=True)
def filter_outside(P, idx, full, a, b, thr):
    """Row indices (all rows if ``full``, else ``idx``) NOT proven strictly inside the polygon of
    :func:`edge_tests`, in input order. Parallel over 16 chunks, then compacted."""
    n = P.shape[0] if full else idx.shape[0]
    m = a.shape[0]
    nchunk = 16 if n >= 1 << 15 else 1
    step = (n + nchunk - 1) // nchunk
    keep = np.empty(n, dtype=np.int64)
    counts = np.zeros(nchunk, dtype=np.int64)
    for c in prange(nchunk):
        lo = c * step
        hi = min(n, lo + step)
        w = lo
        for t in range(lo, hi):
            i = t if full else idx[t]
            xi = P[i, 0]
            yi = P[i, 1]
            inside = True
            for e in range(m):
                if a[e] * xi + b[e] * yi <= thr[e]:
                    inside = False
                    break
            if not inside:
                keep[w] = i
                w += 1
        counts[c] = w - lo
    total = counts.sum()
    out = np.empty(total, dtype=np.int64)
    pos = 0
    for c in range(nchunk):
        lo = c * step
        out[pos : pos + counts[c]] = keep[lo : lo + counts[c]]
        pos += counts[c]
    return out
