"""Robust incircle predicate for the Delaunay engine: a float filter with an exact expansion fallback.

:func:`incircle` returns a value whose *sign* is that of the determinant

    | ax-dx  ay-dy  (ax-dx)^2 + (ay-dy)^2 |
    | bx-dx  by-dy  (bx-dx)^2 + (by-dy)^2 |
    | cx-dx  cy-dy  (cx-dx)^2 + (cy-dy)^2 |

(> 0 iff d lies inside the circle through a, b, c when a, b, c turn counter-clockwise). Shewchuk's
error bound ``iccerrboundA`` decides almost all calls in float64; the rest are evaluated exactly with
Shewchuk's expansion arithmetic (two_diff / two_prod / scale-expansion / fast-expansion-sum with zero
elimination) on the exact differences. Exact while no product underflows: coordinate differences
must not be below ~2^-240 times the largest coordinate (the caller rescales the input by a power of
two so that the largest coordinate is near 1; see :mod:`der.geometry.delaunay`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from der.geometry._kernels import _two_prod, _two_sum

_EPS = 2.0**-53
_ICC_ERRBOUND_A = (10.0 + 96.0 * _EPS) * _EPS
_TINY = 2.0**-900


@njit(cache=True, inline="always")
def _fast_two_sum(a: float, b: float):
    x = a + b
    return x, b - (x - a)


@njit(cache=True)
def _scale(e, b):
    """Expansion ``e * b`` (zero-eliminated; the zero expansion is ``[0.0]``)."""
    h = np.empty(2 * e.shape[0])
    q, hh = _two_prod(e[0], b)
    k = 0
    if hh != 0.0:
        h[k] = hh
        k += 1
    for i in range(1, e.shape[0]):
        p1, p0 = _two_prod(e[i], b)
        s, hh = _two_sum(q, p0)
        if hh != 0.0:
            h[k] = hh
            k += 1
        q, hh = _fast_two_sum(p1, s)
        if hh != 0.0:
            h[k] = hh
            k += 1
    if q != 0.0 or k == 0:
        h[k] = q
        k += 1
    return h[:k]


@njit(cache=True)
def _add(e, f):
    """Expansion ``e + f`` (Shewchuk's fast-expansion-sum, zero-eliminated)."""
    ne, nf = e.shape[0], f.shape[0]
    h = np.empty(ne + nf)
    i = j = k = 0
    en, fn = e[0], f[0]
    if (fn > en) == (fn > -en):
        q = en
        i += 1
    else:
        q = fn
        j += 1
    while i < ne or j < nf:
        if j >= nf or (i < ne and (f[j] > e[i]) == (f[j] > -e[i])):
            q, hh = _two_sum(q, e[i])
            i += 1
        else:
            q, hh = _two_sum(q, f[j])
            j += 1
        if hh != 0.0:
            h[k] = hh
            k += 1
    if q != 0.0 or k == 0:
        h[k] = q
        k += 1
    return h[:k]


@njit(cache=True)
def _mul(e, f):
    """Expansion ``e * f``: sum of ``e * f_j`` over the components of ``f``."""
    acc = _scale(e, f[0])
    for j in range(1, f.shape[0]):
        acc = _add(acc, _scale(e, f[j]))
    return acc


@njit(cache=True)
def _diff(a: float, b: float):
    """Exact ``a - b`` as an expansion of one or two components."""
    x, y = _two_sum(a, -b)
    if y == 0.0:
        return np.array([x])
    return np.array([y, x])


@njit(cache=True)
def incircle_exact(ax, ay, bx, by, cx, cy, dx, dy) -> float:
    """Exact sign (-1.0, 0.0, 1.0) of the incircle determinant."""
    adx, ady = _diff(ax, dx), _diff(ay, dy)
    bdx, bdy = _diff(bx, dx), _diff(by, dy)
    cdx, cdy = _diff(cx, dx), _diff(cy, dy)
    alift = _add(_mul(adx, adx), _mul(ady, ady))
    blift = _add(_mul(bdx, bdx), _mul(bdy, bdy))
    clift = _add(_mul(cdx, cdx), _mul(cdy, cdy))
    bc = _add(_mul(bdx, cdy), -_mul(cdx, bdy))
    ca = _add(_mul(cdx, ady), -_mul(adx, cdy))
    ab = _add(_mul(adx, bdy), -_mul(bdx, ady))
    det = _add(_add(_mul(alift, bc), _mul(blift, ca)), _mul(clift, ab))
    top = det[det.shape[0] - 1]
    return 1.0 if top > 0.0 else (-1.0 if top < 0.0 else 0.0)


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
    return incircle_exact(ax, ay, bx, by, cx, cy, dx, dy)
