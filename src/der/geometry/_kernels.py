"""numba kernels for the exact 2D hull: robust orientation, monotone chain, extreme-direction filter.

Exactness rests on one predicate, :func:`orient`, the sign of ``(a - c) x (b - c)`` computed exactly
for any finite doubles: Shewchuk's floating-point filter (error bound ``ccwerrboundA``) decides
almost every call; the rest go through Shewchuk's adaptive stages B, C, D (``orient2dadapt``, on stack
buffers: no heap allocation) when the triple's magnitudes rule out underflow and overflow of every
product, and otherwise (subnormal or huge coordinates) through an integer superaccumulator that sums
the six coordinate products exactly.

All kernels use ``cache=True`` so compilation happens once per machine, not per process.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from der.geometry._expansion import (
    estimate,
    fast_expansion_sum,
    stack_f64,
    stack_i64,
    store4,
    two_diff_tail,
    two_prod,
    two_two_diff,
)
from der.geometry._limbs import MASK30, limbs_sign, mant

__all__ = ["absmax", "chain_sorted", "chan_hull", "dedup_hash", "edge_tests", "filter_chains", "filter_chains_par",
           "lex_fix_ties", "orient"]

_EPS = 2.0**-53
_CCW_ERRBOUND_A = (3.0 + 16.0 * _EPS) * _EPS
_CCW_ERRBOUND_B = (2.0 + 12.0 * _EPS) * _EPS
_CCW_ERRBOUND_C = (9.0 + 64.0 * _EPS) * _EPS * _EPS
_RESULT_ERRBOUND = (3.0 + 8.0 * _EPS) * _EPS
_MASK27 = (1 << 27) - 1
_LIMBS = 150  # 30-bit limbs: every product of two finite doubles, 2^-2252 .. 2^2048, plus carries
_TINY = 2.0**-900  # below this a float determinant may have underflowed: decide exactly


@njit(cache=True)
def _orient_adapt(ax, ay, bx, by, cx, cy, detsum) -> float:
    """Shewchuk's ``orient2dadapt`` (stages B, C, D) on stack buffers: exact sign, valid while every
    coordinate product of the triple is free of underflow and overflow (:func:`_adapt_safe`)."""
    acx, bcx = ax - cx, bx - cx
    acy, bcy = ay - cy, by - cy
    dl1, dl0 = two_prod(acx, bcy)
    dr1, dr0 = two_prod(acy, bcx)
    B = stack_f64(4)
    store4(B, two_two_diff(dl1, dl0, dr1, dr0))
    det = estimate(4, B)
    bound = _CCW_ERRBOUND_B * detsum
    if det >= bound or -det >= bound:
        return det
    acxt, bcxt = two_diff_tail(ax, cx, acx), two_diff_tail(bx, cx, bcx)
    acyt, bcyt = two_diff_tail(ay, cy, acy), two_diff_tail(by, cy, bcy)
    if acxt == 0.0 and acyt == 0.0 and bcxt == 0.0 and bcyt == 0.0:
        return det
    bound = _CCW_ERRBOUND_C * detsum + _RESULT_ERRBOUND * abs(det)
    det += (acx * bcyt + bcy * acxt) - (acy * bcxt + bcx * acyt)
    if det >= bound or -det >= bound:
        return det
    u = stack_f64(4)
    C1 = stack_f64(8)
    C2 = stack_f64(12)
    D = stack_f64(16)
    s1, s0 = two_prod(acxt, bcy)
    t1, t0 = two_prod(acyt, bcx)
    store4(u, two_two_diff(s1, s0, t1, t0))
    c1 = fast_expansion_sum(4, B, 4, u, C1)
    s1, s0 = two_prod(acx, bcyt)
    t1, t0 = two_prod(acy, bcxt)
    store4(u, two_two_diff(s1, s0, t1, t0))
    c2 = fast_expansion_sum(c1, C1, 4, u, C2)
    s1, s0 = two_prod(acxt, bcyt)
    t1, t0 = two_prod(acyt, bcxt)
    store4(u, two_two_diff(s1, s0, t1, t0))
    d = fast_expansion_sum(c2, C2, 4, u, D)
    return D[d - 1]


@njit(cache=True, inline="always")
def _adapt_safe(ax, ay, bx, by, cx, cy) -> bool:
    """All six coordinates are zero or in [2^-485, 2^509] in magnitude: every coordinate is then a
    multiple of a grain g >= 2^-537 and below 2^509, so every product in :func:`_orient_adapt` is a
    multiple of g^2 >= 2^-1074 (never rounded by underflow) and finite."""
    lo = np.inf
    hi = 0.0
    for v in (ax, ay, bx, by, cx, cy):
        a = abs(v)
        hi = max(hi, a)
        if a != 0.0:
            lo = min(lo, a)
    return hi <= 2.0**509 and lo >= 2.0**-485


@njit(cache=True, inline="always")
def _acc_add(acc, x, q, sgn) -> None:
    """``acc += sgn * x * 2^q`` for ``0 <= x < 2^60`` on 30-bit limbs (no carries yet)."""
    lim = q // 30
    s = q - 30 * lim
    v = (x & MASK30) << s
    acc[lim] += sgn * (v & MASK30)
    acc[lim + 1] += sgn * (v >> 30)
    v = (x >> 30) << s
    acc[lim + 1] += sgn * (v & MASK30)
    acc[lim + 2] += sgn * (v >> 30)


@njit(cache=True)
def _orient_limbs(ax, ay, bx, by, cx, cy) -> float:
    """Exact sign of ``ax*by - ax*cy - cx*by - ay*bx + ay*cx + cy*bx`` for *any* finite doubles
    (subnormals included): the six products of 53-bit mantissas are summed exactly in an integer
    accumulator of 30-bit limbs spanning every exponent (a superaccumulator)."""
    acc = stack_i64(150)  # _LIMBS
    for i in range(_LIMBS):
        acc[i] = 0
    for u, v, sg in ((ax, by, 1), (ax, cy, -1), (cx, by, -1), (ay, bx, -1), (ay, cx, 1), (cy, bx, 1)):
        if u == 0.0 or v == 0.0:
            continue
        mu, eu = mant(u)
        mv, ev = mant(v)
        if (u < 0.0) != (v < 0.0):
            sg = -sg
        q = eu + ev + 2252
        u1, u0 = mu >> 27, mu & _MASK27
        v1, v0 = mv >> 27, mv & _MASK27
        _acc_add(acc, u0 * v0, q, sg)
        _acc_add(acc, u0 * v1, q + 27, sg)
        _acc_add(acc, u1 * v0, q + 27, sg)
        _acc_add(acc, u1 * v1, q + 54, sg)
    return limbs_sign(acc, _LIMBS)


@njit(cache=True)
def _orient_exact(ax, ay, bx, by, cx, cy) -> float:
    """Exact orientation when the float filter cannot decide: Shewchuk's adaptive stages where no
    product can underflow or overflow, else the integer superaccumulator."""
    if _adapt_safe(ax, ay, bx, by, cx, cy):
        detsum = abs((ax - cx) * (by - cy)) + abs((ay - cy) * (bx - cx))
        return _orient_adapt(ax, ay, bx, by, cx, cy, detsum)
    return _orient_limbs(ax, ay, bx, by, cx, cy)


@njit(cache=True)
def orient(ax, ay, bx, by, cx, cy) -> float:
    """>0 if a, b, c turn counter-clockwise, <0 clockwise, 0 if collinear -- sign exact."""
    detleft = (ax - cx) * (by - cy)
    detright = (ay - cy) * (bx - cx)
    det = detleft - detright
    if abs(det) > _TINY:  # Shewchuk's filter is valid only without underflow
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
def absmax(P) -> float:
    """max |P| over all entries in one vectorizable pass; NaN if any entry is NaN, inf if any is inf."""
    m = 0.0
    bad = 0.0
    for i in range(P.shape[0]):
        for c in range(P.shape[1]):
            v = P[i, c]
            bad += v - v  # 0 for finite values, NaN for NaN or +-inf
            m = max(m, abs(v))
    return m + bad


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


def _filter_chains(P, idx, full, xb, a, b, thr, nlow, x0, inv_w, tab_lo, tab_up, brk_lo, brk_up):
    """Row indices (all rows if ``full``, else ``idx``) NOT proven interior to the CCW polygon q.

    q (vertices' x in ``xb``, ``h`` of them, plus ``xb[h] = xb[0]`` appended) starts at its lexicographic minimum; edges
    0..nlow-1 form the lower chain (x ascending), edges nlow..h-1 the upper chain (x descending);
    edge e's half-plane test is ``a[e]*px + b[e]*py > thr[e]`` (see :func:`edge_tests`). A point is
    discarded iff its x lies strictly inside the x-range of lower edge e_l and of upper edge e_u and it
    passes both tests: then it is strictly above e_l and strictly below e_u on a vertical line that
    crosses e_l transversally, hence in the interior of the triangle (e_l, point of e_u above it), and
    so in the interior of the hull. The edge containing px is found from a bucket table over x
    (``tab_*[k]``: the edge at bucket k's near end) plus one branch-free step; the table only speeds
    the search; correctness does not depend on it (a point whose edge is not found survives).
    """
    n = P.shape[0] if full else idx.shape[0]
    nb = tab_lo.shape[0]
    nchunk = 16 if n >= 1 << 15 else 1
    step = (n + nchunk - 1) // nchunk
    keep = np.empty(n, dtype=np.int64)
    counts = np.zeros(nchunk, dtype=np.int64)
    xmin = xb[0]
    xmax = xb[nlow]
    for c in prange(nchunk):
        lo = c * step
        hi = min(n, lo + step)
        w = lo
        for t in range(lo, hi):
            i = t if full else idx[t]
            px = P[i, 0]
            py = P[i, 1]
            u = (px - x0) * inv_w
            u = u if u > 0.0 else 0.0  # clamp as a float first: NaN/inf never reach int()
            k = int(u if u < nb - 1.0 else nb - 1.0)
            # lower edge e spans xb[e] .. xb[e + 1]; upper edge f spans xb[f] (right) .. xb[f + 1]
            e = tab_lo[k] + (brk_lo[k] <= px)  # brk_*[k] = xb[tab_*[k] + 1]: loads depend on k only
            f = tab_up[k] + (brk_up[k] >= px)
            inside = (
                (xmin < px)
                & (px < xmax)
                & (xb[e] < px)
                & (px < xb[e + 1])
                & (a[e] * px + b[e] * py > thr[e])
                & (xb[f + 1] < px)
                & (px < xb[f])
                & (a[f] * px + b[f] * py > thr[f])
            )
            keep[w] = i  # branch-free compaction: always write, advance only for survivors
            w += not inside
        counts[c] = w - lo
    total = counts.sum()
    out = np.empty(total, dtype=np.int64)
    pos = 0
    for c in range(nchunk):
        lo = c * step
        out[pos : pos + counts[c]] = keep[lo : lo + counts[c]]
        pos += counts[c]
    return out


filter_chains = njit(cache=True)(_filter_chains)
filter_chains_par = njit(cache=True, parallel=True)(_filter_chains)


# ---------------------------------------------------------------- Chan's algorithm (Chan 1996)


@njit(cache=True)
def dedup_hash(P):
    """Rows of the first occurrence of each distinct point, in input order (expected O(n), hashing)."""
    seen = dict()
    keep = np.empty(P.shape[0], dtype=np.int64)
    m = 0
    for i in range(P.shape[0]):
        key = (P[i, 0] + 0.0, P[i, 1] + 0.0)
        if key not in seen:
            seen[key] = i
            keep[m] = i
            m += 1
    return keep[:m]


@njit(cache=True, inline="always")
def _sgn(v: float) -> int:
    return 1 if v > 0.0 else (-1 if v < 0.0 else 0)


@njit(cache=True)
def _farther(P, p, q, r) -> bool:
    """For r collinear with p -> q and on the same side: is r strictly farther from p than q?"""
    if P[q, 0] != P[p, 0]:
        return (P[r, 0] > P[q, 0]) if P[q, 0] > P[p, 0] else (P[r, 0] < P[q, 0])
    return (P[r, 1] > P[q, 1]) if P[q, 1] > P[p, 1] else (P[r, 1] < P[q, 1])


@njit(cache=True)
def _better(P, p, best, r) -> bool:
    """Jarvis comparator: r is strictly right of p -> best, or collinear with it and farther."""
    t = _turn(P, p, best, r)
    return t < 0.0 or (t == 0.0 and _farther(P, p, best, r))


@njit(cache=True)
def _lex_gt(P, i, j) -> bool:
    return P[i, 0] > P[j, 0] or (P[i, 0] == P[j, 0] and P[i, 1] > P[j, 1])


@njit(cache=True)
def _tangent(P, c, lo, hi, p) -> int:
    """Next lower-hull candidate from p on the lower chain c[lo:hi] (lexicographically sorted, convex):
    among the chain vertices lexicographically after p, the one with no other strictly right of
    p -> it (collinear: the farthest); -1 if none. Two binary searches, O(log m): the first vertex
    after p, then the first i with orient(p, c_i, c_{i+1}) > 0; verified, with a linear scan as the
    fallback should the (assumed) monotonicity fail."""
    a, b = lo, hi
    while a < b:  # first chain vertex lexicographically greater than p
        mid = (a + b) // 2
        if _lex_gt(P, c[mid], p):
            b = mid
        else:
            a = mid + 1
    s = a
    if s >= hi:
        return -1
    a, b = s, hi - 1
    while a < b:
        mid = (a + b) // 2
        if _turn(P, p, c[mid], c[mid + 1]) > 0.0:
            b = mid
        else:
            a = mid + 1
    ok = (a == hi - 1 or _turn(P, p, c[a], c[a + 1]) > 0.0) and (a == s or _turn(P, p, c[a - 1], c[a]) <= 0.0)
    if ok:
        return c[a]
    q = c[s]
    for t in range(s + 1, hi):
        if _better(P, p, q, c[t]):
            q = c[t]
    return q


@njit(cache=True)
def _chan_lower(P, m, out) -> int:
    """Lower hull (lexmin .. lexmax) of the distinct points P by Chan's method with group size m;
    writes it into out and returns its length, or -1 if it needs more than m Jarvis steps."""
    n = P.shape[0]
    ng = (n + m - 1) // m
    hv = np.empty(n + ng, dtype=np.int64)
    off = np.zeros(ng + 1, dtype=np.int64)
    for g in range(ng):
        a = g * m
        b = min(n, a + m)
        order = np.argsort(P[a:b, 0]) + a
        lex_fix_ties(P, order)
        k = chain_sorted(P, order, hv[off[g] :])
        j = 0  # the lower chain ends at the group's lexicographic maximum
        for t in range(1, k):
            if _lex_gt(P, hv[off[g] + t], hv[off[g] + j]):
                j = t
        off[g + 1] = off[g] + j + 1
    p = 0
    for i in range(1, n):
        if _lex_gt(P, p, i):
            p = i
    out[0] = p
    h = 1
    for _ in range(m):
        best = -1
        for g in range(ng):
            cand = _tangent(P, hv, off[g], off[g + 1], p)
            if cand >= 0 and (best == -1 or _better(P, p, best, cand)):
                best = cand
        if best == -1:
            return h
        out[h] = best
        h += 1
        p = best
    return -1


@njit(cache=True)
def chan_hull(P):
    """Chan's O(n log h) hull (Chan 1996) of the distinct points P (n >= 1), CCW from the lexicographic
    minimum, strict turns only. Run on P for the lower hull and on -P (a 180-degree rotation, exact)
    for the upper hull: groups of m = 2^(2^t) points, mini-hulls by monotone chain, then at most m
    Jarvis steps with O(log m) tangent queries per group; m is squared until the march ends."""
    n = P.shape[0]
    out = np.empty(n + 1, dtype=np.int64)
    res = np.empty(2 * n + 2, dtype=np.int64)
    total = 0
    for half in range(2):
        Q = P if half == 0 else -P
        t = 1
        while True:
            m = min(n, 1 << min(1 << t, 62))
            h = _chan_lower(Q, m, out)
            if h >= 0:
                break
            t += 1
        start = 0 if half == 0 else 1
        for j in range(start, h):
            res[total] = out[j]
            total += 1
    if total >= 2 and res[total - 1] == res[0]:
        total -= 1
    return res[:total].copy()
