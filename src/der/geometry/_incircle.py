"""Robust incircle predicate for the Delaunay engine: Shewchuk's adaptive stages, allocation-free.

:func:`incircle` returns a value whose *sign* is that of the determinant

    | ax-dx  ay-dy  (ax-dx)^2 + (ay-dy)^2 |
    | bx-dx  by-dy  (bx-dx)^2 + (by-dy)^2 |
    | cx-dx  cy-dy  (cx-dx)^2 + (cy-dy)^2 |

(> 0 iff d lies inside the circle through a, b, c when a, b, c turn counter-clockwise), exactly, for
any finite doubles. Stages (Shewchuk 1997, ``incircleadapt``):

* A: float64 with the error bound ``iccerrboundA`` -- decides almost every call;
* B: exact determinant of the *rounded* differences (expansions on stack buffers), bound ``B``;
  if the differences were exact (all tails zero) this is the exact answer (integer lattices);
* C: first-order correction by the difference tails, bound ``C``;
* D: the exact determinant of the exact (two-component) differences by expansion products.

Every buffer lives in the stack frame (:func:`der.geometry._expansion.stack_f64`): no heap
allocation on any path. Stages B--D are exact while no product underflows or overflows, which
:func:`_adapt_safe` guarantees from the coordinates' magnitudes; outside that range (subnormal or
huge coordinates beside ordinary ones) the sign comes from an integer superaccumulator over the 48
monomials of the lifted 4x4 determinant (:func:`incircle_limbs`).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from numba import njit

from der.geometry._expansion import (
    fast_expansion_sum,
    fast_two_sum,
    scale_expansion,
    stack_f64,
    stack_i64,
    store4,
    two_diff_tail,
    two_prod,
    two_sum,
    two_two_diff,
)
from der.geometry._limbs import MASK30, limbs_sign, mant

__all__ = ["incircle", "incircle_exact", "incircle_limbs"]

_EPS = 2.0**-53
_ICC_ERRBOUND_A = (10.0 + 96.0 * _EPS) * _EPS
_ICC_ERRBOUND_B = (4.0 + 48.0 * _EPS) * _EPS
_ICC_ERRBOUND_C = (44.0 + 576.0 * _EPS) * _EPS * _EPS
_RESULT_ERRBOUND = (3.0 + 8.0 * _EPS) * _EPS
_TINY = 2.0**-900
_DD_ERR = 128.0 * _EPS * _EPS  # double-double stage B: 4 x the 32 eps^2 worst case


@njit(cache=True, inline="always")
def _lifted(bc, bcl, x, y, t1, t2, t3, t4, out) -> int:
    """``out = (x^2 + y^2) * bc`` for doubles x, y (stage B's per-row term)."""
    n1 = scale_expansion(bcl, bc, x, t1)
    n2 = scale_expansion(n1, t1, x, t2)
    n3 = scale_expansion(bcl, bc, y, t3)
    n4 = scale_expansion(n3, t3, y, t4)
    return fast_expansion_sum(n2, t2, n4, t4, out)


@njit(cache=True, inline="always")
def _cross4(a, b, c, d, h) -> int:
    """``h = a*b - c*d`` exactly (four components)."""
    p1, p0 = two_prod(a, b)
    q1, q0 = two_prod(c, d)
    return store4(h, two_two_diff(p1, p0, q1, q0))


@njit(cache=True)
def _stage_b(adx, ady, bdx, bdy, cdx, cdy, fin) -> int:
    """Exact determinant of the rounded differences into ``fin`` (>= 96 slots); returns its length."""
    bc = stack_f64(4)
    ca = stack_f64(4)
    ab = stack_f64(4)
    t1 = stack_f64(8)
    t2 = stack_f64(16)
    t3 = stack_f64(8)
    t4 = stack_f64(16)
    adet = stack_f64(32)
    bdet = stack_f64(32)
    cdet = stack_f64(32)
    abdet = stack_f64(64)
    _cross4(bdx, cdy, cdx, bdy, bc)
    _cross4(cdx, ady, adx, cdy, ca)
    _cross4(adx, bdy, bdx, ady, ab)
    na = _lifted(bc, 4, adx, ady, t1, t2, t3, t4, adet)
    nb = _lifted(ca, 4, bdx, bdy, t1, t2, t3, t4, bdet)
    nc = _lifted(ab, 4, cdx, cdy, t1, t2, t3, t4, cdet)
    nab = fast_expansion_sum(na, adet, nb, bdet, abdet)
    return fast_expansion_sum(nab, abdet, nc, cdet, fin)


@njit(cache=True, inline="always")
def _diff2(a: float, b: float, h) -> int:
    """Exact ``a - b`` as an expansion of one or two components in ``h``."""
    x, y = two_sum(a, -b)
    if y == 0.0:
        h[0] = x
        return 1
    h[0], h[1] = y, x
    return 2


@njit(cache=True)
def _mul(elen, e, flen, f, h, tmp, acc) -> int:
    """``h = e * f`` (expansions); ``tmp`` >= 2 elen slots, ``acc`` >= len(h) slots scratch."""
    n = scale_expansion(elen, e, f[0], h)
    for j in range(1, flen):
        m = scale_expansion(elen, e, f[j], tmp)
        k = fast_expansion_sum(n, h, m, tmp, acc)
        for i in range(k):
            h[i] = acc[i]
        n = k
    return n


@njit(cache=True)
def _lift_cross(px, pxl, py, pyl, ux, uxl, uy, uyl, vx, vxl, vy, vyl, out, s1, s2, s3, s4, tmp, acc) -> int:
    """``out = (px^2 + py^2) * (ux*vy - vx*uy)`` for two-component expansions (stage D's row)."""
    n1 = _mul(pxl, px, pxl, px, s1, tmp, acc)
    n2 = _mul(pyl, py, pyl, py, s2, tmp, acc)
    nl = fast_expansion_sum(n1, s1, n2, s2, s3)  # lift, <= 16
    n1 = _mul(uxl, ux, vyl, vy, s1, tmp, acc)
    n2 = _mul(vxl, vx, uyl, uy, s2, tmp, acc)
    for i in range(n2):
        s2[i] = -s2[i]
    nx = fast_expansion_sum(n1, s1, n2, s2, s4)  # cross, <= 16
    return _mul(nl, s3, nx, s4, out, tmp, acc)


@njit(cache=True)
def incircle_exact(ax, ay, bx, by, cx, cy, dx, dy) -> float:
    """Exact sign (-1.0, 0.0, 1.0) of the incircle determinant from the exact differences (stage D);
    valid where :func:`_adapt_safe` holds."""
    adx, ady, bdx = stack_f64(2), stack_f64(2), stack_f64(2)
    bdy, cdx, cdy = stack_f64(2), stack_f64(2), stack_f64(2)
    la, lb = _diff2(ax, dx, adx), _diff2(ay, dy, ady)
    lc, ld = _diff2(bx, dx, bdx), _diff2(by, dy, bdy)
    le, lf = _diff2(cx, dx, cdx), _diff2(cy, dy, cdy)
    s1, s2, s3, s4 = stack_f64(16), stack_f64(16), stack_f64(32), stack_f64(32)
    tmp = stack_f64(64)
    acc = stack_f64(512)
    ra, rb, rc = stack_f64(512), stack_f64(512), stack_f64(512)
    rab = stack_f64(1024)
    fin = stack_f64(1536)
    na = _lift_cross(adx, la, ady, lb, bdx, lc, bdy, ld, cdx, le, cdy, lf, ra, s1, s2, s3, s4, tmp, acc)
    nb = _lift_cross(bdx, lc, bdy, ld, cdx, le, cdy, lf, adx, la, ady, lb, rb, s1, s2, s3, s4, tmp, acc)
    nc = _lift_cross(cdx, le, cdy, lf, adx, la, ady, lb, bdx, lc, bdy, ld, rc, s1, s2, s3, s4, tmp, acc)
    nab = fast_expansion_sum(na, ra, nb, rb, rab)
    n = fast_expansion_sum(nab, rab, nc, rc, fin)
    top = fin[n - 1]
    return 1.0 if top > 0.0 else (-1.0 if top < 0.0 else 0.0)


@njit(cache=True, inline="always")
def _dd_lift(x, y):
    """``x^2 + y^2`` as a double-double ``(hi, lo)``, error <= 4 eps^2 (x^2 + y^2)."""
    p1, p0 = two_prod(x, x)
    q1, q0 = two_prod(y, y)
    s, e = two_sum(p1, q1)
    return fast_two_sum(s, e + (p0 + q0))


@njit(cache=True, inline="always")
def _dd_cross(a, b, c, d):
    """``a*b - c*d`` as a double-double, error <= 4 eps^2 (|a*b| + |c*d|)."""
    p1, p0 = two_prod(a, b)
    q1, q0 = two_prod(c, d)
    s, e = two_sum(p1, -q1)
    return fast_two_sum(s, e + (p0 - q0))


@njit(cache=True, inline="always")
def _dd_mul(ah, al, bh, bl):
    h, l = two_prod(ah, bh)
    return fast_two_sum(h, l + (ah * bl + al * bh))


@njit(cache=True, inline="always")
def _dd_term(x, y, a, b, c, d):
    """``(x^2 + y^2) * (a*b - c*d)`` in double-double."""
    lh, ll = _dd_lift(x, y)
    ch, cl = _dd_cross(a, b, c, d)
    return _dd_mul(lh, ll, ch, cl)


@njit(cache=True, inline="always")
def _dd_add(ah, al, bh, bl):
    s, e = two_sum(ah, bh)
    return fast_two_sum(s, e + (al + bl))


@njit(cache=True)
def _dd_det(adx, ady, bdx, bdy, cdx, cdy) -> float:
    """The determinant of the rounded differences in double-double arithmetic: within
    ``_DD_ERR * permanent`` of its exact value (each lift and cross product to 4 eps^2 of its
    permanent, their products to 12 eps^2, the two sums to 4 eps^2 more; the bound has a safety
    factor of 4 and all products are exact multiples of the grain, see :func:`_adapt_safe`)."""
    ah, al = _dd_term(adx, ady, bdx, cdy, cdx, bdy)
    bh, bl = _dd_term(bdx, bdy, cdx, ady, adx, cdy)
    ch, cl = _dd_term(cdx, cdy, adx, bdy, bdx, ady)
    h, l = _dd_add(ah, al, bh, bl)
    h, l = _dd_add(h, l, ch, cl)
    return h + l


@njit(cache=True, inline="always")
def _integral(v: float) -> bool:
    return math.floor(v) == v


@njit(cache=True)
def _adapt(ax, ay, bx, by, cx, cy, dx, dy, permanent, det_a) -> float:
    """Stages B, C, D (module docstring); ``det_a``: stage A's float determinant."""
    adx, bdx, cdx = ax - dx, bx - dx, cx - dx
    ady, bdy, cdy = ay - dy, by - dy, cy - dy
    det = _dd_det(adx, ady, bdx, bdy, cdx, cdy)  # stage B in double-double: no branches
    dd_err = _DD_ERR * permanent
    bound = _ICC_ERRBOUND_B * permanent + dd_err
    if det >= bound or -det >= bound:
        return det
    adxt, bdxt, cdxt = two_diff_tail(ax, dx, adx), two_diff_tail(bx, dx, bdx), two_diff_tail(cx, dx, cdx)
    adyt, bdyt, cdyt = two_diff_tail(ay, dy, ady), two_diff_tail(by, dy, bdy), two_diff_tail(cy, dy, cdy)
    if adxt == 0.0 and bdxt == 0.0 and cdxt == 0.0 and adyt == 0.0 and bdyt == 0.0 and cdyt == 0.0:
        # exact differences: the rounded-difference determinant is the answer
        if det >= dd_err or -det >= dd_err:
            return det
        if permanent < 2.0**53 and _integral(adx) and _integral(ady) and _integral(bdx) \
                and _integral(bdy) and _integral(cdx) and _integral(cdy):
            return det_a  # integers below 2^53 throughout: stage A's float evaluation was exact
        fin = stack_f64(96)
        n = _stage_b(adx, ady, bdx, bdy, cdx, cdy, fin)
        return fin[n - 1]
    bound = _ICC_ERRBOUND_C * permanent + dd_err + _RESULT_ERRBOUND * abs(det)
    det += (((adx * adx + ady * ady) * ((bdx * cdyt + cdy * bdxt) - (bdy * cdxt + cdx * bdyt))
             + 2.0 * (adx * adxt + ady * adyt) * (bdx * cdy - bdy * cdx))
            + ((bdx * bdx + bdy * bdy) * ((cdx * adyt + ady * cdxt) - (cdy * adxt + adx * cdyt))
               + 2.0 * (bdx * bdxt + bdy * bdyt) * (cdx * ady - cdy * adx))
            + ((cdx * cdx + cdy * cdy) * ((adx * bdyt + bdy * adxt) - (ady * bdxt + bdx * adyt))
               + 2.0 * (cdx * cdxt + cdy * cdyt) * (adx * bdy - ady * bdx)))
    if det >= bound or -det >= bound:
        return det
    return incircle_exact(ax, ay, bx, by, cx, cy, dx, dy)


@njit(cache=True, inline="always")
def _adapt_safe(ax, ay, bx, by, cx, cy, dx, dy) -> bool:
    """Every coordinate zero or in [2^-216, 2^250] in magnitude: all are multiples of a grain
    g >= 2^-268, so every product of up to four differences or tails is a multiple of
    g^4 >= 2^-1074 (never rounded by underflow), and no product of four differences overflows."""
    lo = np.inf
    hi = 0.0
    for v in (ax, ay, bx, by, cx, cy, dx, dy):
        a = abs(v)
        hi = max(hi, a)
        if a != 0.0:
            lo = min(lo, a)
    return hi <= 2.0**250 and lo >= 2.0**-216


def _permutations() -> np.ndarray:
    """Rows ``(i, j, k, sign)``: the 24 permutations of the rows (a, b, c, d) = (0, 1, 2, 3) over the
    columns (x, y, lift, 1) of the lifted determinant ``det[[p_x, p_y, p_x^2 + p_y^2, 1]]`` (which
    equals the 3x3 form: translating every point by -d adds multiples of the x and y columns to the
    lift column), with the permutation's sign; the constant column takes the remaining row."""
    out = []
    for p in itertools.permutations(range(4)):
        inv = sum(p[u] > p[v] for u in range(4) for v in range(u + 1, 4))
        out.append((p[0], p[1], p[2], -1 if inv % 2 else 1))
    return np.array(out, dtype=np.int64)


_PERMS = _permutations()


@njit(cache=True)
def _acc_monomial(acc, u1, u2, u3, u4, sgn) -> None:
    """``acc += sgn * u1 u2 u3 u4`` exactly (30-bit limbs; the product of the four 53-bit mantissas
    by schoolbook multiplication, then added at its binary exponent)."""
    if u1 == 0.0 or u2 == 0.0 or u3 == 0.0 or u4 == 0.0:
        return
    neg = (u1 < 0.0) ^ (u2 < 0.0) ^ (u3 < 0.0) ^ (u4 < 0.0)
    s = -sgn if neg else sgn
    prod = stack_i64(10)
    nxt = stack_i64(10)
    for i in range(10):
        prod[i] = 0
    m, q = mant(u1)
    prod[0], prod[1] = m & MASK30, m >> 30
    n = 2
    for u in (u2, u3, u4):
        mu, e = mant(u)
        q += e
        lo, hi = mu & MASK30, mu >> 30
        for i in range(n + 2):
            nxt[i] = 0
        for i in range(n):
            nxt[i] += prod[i] * lo
            nxt[i + 1] += prod[i] * hi
            c = nxt[i] >> 30  # carry as we go: every entry stays below 2^62
            nxt[i] &= MASK30
            nxt[i + 1] += c
        c = nxt[n] >> 30
        nxt[n] &= MASK30
        nxt[n + 1] += c
        n += 2
        for i in range(n):
            prod[i] = nxt[i]
    q += 4 * 1126  # lowest possible exponent -> bit 0
    for i in range(n):
        if prod[i]:
            b = q + 30 * i
            lim = b // 30
            sh = b - 30 * lim
            v = prod[i] << sh
            acc[lim] += s * (v & MASK30)
            acc[lim + 1] += s * (v >> 30)


@njit(cache=True)
def incircle_limbs(ax, ay, bx, by, cx, cy, dx, dy) -> float:
    """Exact sign (-1.0, 0.0, 1.0) of the incircle determinant for any finite doubles: the 48
    monomials of the lifted 4x4 determinant summed exactly in an integer superaccumulator."""
    acc = stack_i64(320)  # 30-bit limbs: exponents 4 * [-1126, 971] plus 212 bits and carries
    for i in range(320):
        acc[i] = 0
    X = (ax, bx, cx, dx)
    Y = (ay, by, cy, dy)
    for r in range(24):
        i, j, k, sg = _PERMS[r, 0], _PERMS[r, 1], _PERMS[r, 2], _PERMS[r, 3]
        _acc_monomial(acc, X[i], Y[j], X[k], X[k], sg)
        _acc_monomial(acc, X[i], Y[j], Y[k], Y[k], sg)
    return limbs_sign(acc, 320)


@njit(cache=True)
def incircle(ax, ay, bx, by, cx, cy, dx, dy) -> float:
    """Incircle determinant of a, b, c, d with the exact sign (module docstring)."""
    adx, bdx, cdx = ax - dx, bx - dx, cx - dx
    ady, bdy, cdy = ay - dy, by - dy, cy - dy
    bdxcdy, cdxbdy = bdx * cdy, cdx * bdy
    cdxady, adxcdy = cdx * ady, adx * cdy
    adxbdy, bdxady = adx * bdy, bdx * ady
    alift = adx * adx + ady * ady
    blift = bdx * bdx + bdy * bdy
    clift = cdx * cdx + cdy * cdy
    det = alift * (bdxcdy - cdxbdy) + blift * (cdxady - adxcdy) + clift * (adxbdy - bdxady)
    perm = ((abs(bdxcdy) + abs(cdxbdy)) * alift + (abs(cdxady) + abs(adxcdy)) * blift
            + (abs(adxbdy) + abs(bdxady)) * clift)
    if abs(det) > _ICC_ERRBOUND_A * perm and abs(det) > _TINY:
        return det
    if _adapt_safe(ax, ay, bx, by, cx, cy, dx, dy):
        return _adapt(ax, ay, bx, by, cx, cy, dx, dy, perm, det)
    return incircle_limbs(ax, ay, bx, by, cx, cy, dx, dy)
