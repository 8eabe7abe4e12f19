r"""Slab filter for the exact hull: one fused pass that validates, measures and discards interior points.

Given a convex polygon ``q`` whose vertices are input points (the exact hull of a sample), the x-range
of ``q`` is cut into ``nb`` equal slabs. For slab ``k`` we store a bound ``lo[k]`` that is *rigorously*
above the lower chain of ``q`` and a bound ``up[k]`` rigorously below its upper chain over the whole
slab (widened by the worst rounding of the slab index). A point whose computed slab is ``k`` and with
``lo[k] < py < up[k]`` (exact float comparisons) is then strictly inside ``q``, hence strictly inside
the hull: it can be neither a vertex nor on an edge. The per-point work is one slab index and two
table loads, with no gathers of edge coefficients, and the same pass accumulates max |P| and a
NaN/Inf flag (so the input is read once). Only survivors are written, so the pages of the index
buffer that no survivor reaches are never touched (the pass costs about one read of the input).

Rigor. The lower chain ``f`` is convex and the upper chain ``g`` concave, so over an interval
``[xl, xr]`` max f = max(f(xl), f(xr)) and min g = min(g(xl), g(xr)). Each endpoint value is computed
in float64 from one chain edge (``ya + (x - xa) * (dy / dx)``, |error| <= 8 eps (|ya| + |dy|) <= 24 eps S
with S = max |q|), and we add a margin of 128 eps S (which also absorbs the rounding of the addition).
The slab index ``int((px - x0) * inv_w)`` carries a relative error below 4 eps, i.e. px lies within
``16 eps (|x0| + W) + 1e-10 W`` of its slab, which is the widening ``delta``. The first and last slab
(and any slab whose widened interval leaves the open x-range of ``q``) never discard. Valid while
S lies in [2^-400, 2^400] (no underflow or overflow in the bounds); the caller checks this.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["slab_filter", "slab_tables"]

_EPS = 2.0**-53
_ABS = 0x7FFFFFFFFFFFFFFF  # clears the sign bit of a float64's bit pattern


@njit(cache=True, inline="always")
def _edge(xs, e: int, x: float) -> int:
    """From ``e`` (a previous answer for a smaller ``x``): the last ``j`` with ``xs[j] <= x``, clipped
    to ``[0, len(xs) - 2]`` (``np.searchsorted(xs, x, side="right") - 1``, clipped)."""
    while e + 1 < xs.shape[0] - 1 and xs[e + 1] <= x:
        e += 1
    return e


@njit(cache=True, error_model="numpy")
def _slopes(xs, ys):
    """``dy / dx`` of every chain edge (inf or NaN for vertical or tiny-width edges)."""
    out = np.empty(xs.shape[0] - 1)
    for e in range(xs.shape[0] - 1):
        out[e] = (ys[e + 1] - ys[e]) / (xs[e + 1] - xs[e])
    return out


@njit(cache=True, inline="always")
def _chain_at(xs, ys, sl, e: int, x: float) -> float:
    """Float value at ``x`` (strictly inside ``(xs[0], xs[-1])``) of the chain with vertices ``xs``
    (non-decreasing) / ``ys`` and slopes ``sl``, from its edge ``e`` (:func:`_edge`); vertical edges
    are never selected for such x. NaN where a slope overflowed (an edge of tiny width): the bound
    is then unknown and the slab discards nothing (NaN compares false)."""
    v = ys[e] + (x - xs[e]) * sl[e]
    return v if np.isfinite(v) else np.nan


@njit(cache=True, inline="always")
def _nan_max(a: float, b: float) -> float:
    return a + b if (a != a or b != b) else max(a, b)  # NaN if either is (as np.maximum)


@njit(cache=True, inline="always")
def _nan_min(a: float, b: float) -> float:
    return a + b if (a != a or b != b) else min(a, b)


@njit(cache=True, error_model="numpy")
def _bounds(xlow, ylow, xup, yup, xmin, xmax, inv_w, delta, margin, nb):
    """``lo``, ``up`` per slab (module docstring); +inf / -inf where a slab never discards."""
    lo = np.full(nb, np.inf)
    up = np.full(nb, -np.inf)
    sl, su = _slopes(xlow, ylow), _slopes(xup, yup)
    el = er = fl = fr = 0  # chain edges at xl and xr: both ends only move right as k grows
    for k in range(1, nb - 1):
        xl = (xmin + k / inv_w) - delta
        xr = (xmin + (k + 1) / inv_w) + delta
        if not (xl > xmin and xr < xmax):
            continue
        el, er = _edge(xlow, el, xl), _edge(xlow, er, xr)
        fl, fr = _edge(xup, fl, xl), _edge(xup, fr, xr)
        lo[k] = _nan_max(_chain_at(xlow, ylow, sl, el, xl), _chain_at(xlow, ylow, sl, er, xr)) + margin
        up[k] = _nan_min(_chain_at(xup, yup, su, fl, xl), _chain_at(xup, yup, su, fr, xr)) - margin
    return lo, up


def slab_tables(xq: np.ndarray, yq: np.ndarray, nlow: int, nb: int):
    """Tables ``(x0, inv_w, lo, up)`` for the CCW polygon with vertices ``(xq, yq)`` starting at its
    lexicographic minimum, lower chain ``0..nlow`` (module docstring). ``None`` if the polygon has
    no x-extent."""
    xmin, xmax = float(xq[0]), float(xq[nlow])
    width = xmax - xmin
    if not width > 0.0:
        return None
    big = float(max(np.abs(xq).max(), np.abs(yq).max()))
    with np.errstate(over="ignore"):
        inv_w = nb / width  # inf for a tiny width: then no slab is usable (edges collapse to xmin)
    delta = 16.0 * _EPS * (abs(xmin) + abs(xmax) + width) + 1e-10 * width
    xlow, ylow = xq[: nlow + 1], yq[: nlow + 1]
    xup = np.ascontiguousarray(np.append(xq[nlow:], xq[0])[::-1])  # upper chain, x ascending
    yup = np.ascontiguousarray(np.append(yq[nlow:], yq[0])[::-1])
    lo, up = _bounds(np.ascontiguousarray(xlow), np.ascontiguousarray(ylow), xup, yup, xmin, xmax, inv_w,
                     delta, 128.0 * _EPS * big, nb)
    return xmin, inv_w, lo, up


@njit(cache=True)
def slab_filter(P, x0, inv_w, lo, up):
    """Rows of ``P`` not proven interior by the slab tables, and max |P| (NaN/inf if any entry is).

    max |P| is an integer max over the bit patterns with the sign cleared (for non-negative doubles
    the integer order is the float order, and every NaN pattern lies above inf), a one-cycle chain
    per point instead of a float max and a float NaN sum."""
    n = P.shape[0]
    bits = P.view(np.int64)
    top = lo.shape[0] - 1.0
    keep = np.empty(n, dtype=np.int64)
    w = 0
    m0 = np.int64(0)
    m1 = np.int64(0)
    for i in range(n):
        px = P[i, 0]
        py = P[i, 1]
        m0 = max(m0, bits[i, 0] & _ABS)
        m1 = max(m1, bits[i, 1] & _ABS)
        t = (px - x0) * inv_w
        t = t if t > 0.0 else 0.0  # also maps NaN to slab 0, which never discards
        t = t if t < top else top
        k = int(t)
        if not ((lo[k] < py) & (py < up[k])):  # rare and well predicted: only survivors touch keep
            keep[w] = i
            w += 1
    big = np.empty(1, dtype=np.int64)
    big[0] = max(m0, m1)
    return keep[:w].copy(), big.view(np.float64)[0]
