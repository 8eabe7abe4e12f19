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

_EPS = 2.0**-53


def _chain_at(xs: np.ndarray, ys: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Float values at ``x`` (strictly inside ``(xs[0], xs[-1])``) of the chain with vertices
    ``xs`` (non-decreasing) / ``ys``; vertical edges are never selected for such x. NaN where a
    slope overflowed (an edge of tiny width): the bound is then unknown and the slab discards
    nothing (NaN compares false)."""
    e = np.clip(np.searchsorted(xs, x, side="right") - 1, 0, len(xs) - 2)
    xa, ya = xs[e], ys[e]
    dx, dy = xs[e + 1] - xa, ys[e + 1] - ya
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        v = ya + (x - xa) * (dy / dx)
    return np.where(np.isfinite(v), v, np.nan)


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
    k = np.arange(nb + 1)
    edges = xmin + k / inv_w
    delta = 16.0 * _EPS * (abs(xmin) + abs(xmax) + width) + 1e-10 * width
    xl, xr = edges[:-1] - delta, edges[1:] + delta
    ok = (xl > xmin) & (xr < xmax)
    ok[0] = ok[-1] = False
    xl = np.where(ok, xl, 0.5 * (xmin + xmax))  # placeholders where unused, still strictly inside
    xr = np.where(ok, xr, 0.5 * (xmin + xmax))
    xlow, ylow = xq[: nlow + 1], yq[: nlow + 1]
    xup = np.append(xq[nlow:], xq[0])[::-1]  # upper chain, x ascending
    yup = np.append(yq[nlow:], yq[0])[::-1]
    margin = 128.0 * _EPS * big
    lo = np.maximum(_chain_at(xlow, ylow, xl), _chain_at(xlow, ylow, xr)) + margin
    up = np.minimum(_chain_at(xup, yup, xl), _chain_at(xup, yup, xr)) - margin
    lo = np.where(ok, lo, np.inf)
    up = np.where(ok, up, -np.inf)
    return xmin, inv_w, np.ascontiguousarray(lo), np.ascontiguousarray(up)


@njit(cache=True)
def slab_filter(P, x0, inv_w, lo, up):
    """Rows of ``P`` not proven interior by the slab tables, and max |P| (NaN/inf if any entry is)."""
    n = P.shape[0]
    top = lo.shape[0] - 1.0
    keep = np.empty(n, dtype=np.int64)
    w = 0
    m = 0.0
    bad = 0.0
    for i in range(n):
        px = P[i, 0]
        py = P[i, 1]
        bad += (px - px) + (py - py)  # 0 for finite values, NaN otherwise
        m = max(m, max(abs(px), abs(py)))
        t = (px - x0) * inv_w
        t = t if t > 0.0 else 0.0  # also maps NaN to slab 0, which never discards
        t = t if t < top else top
        k = int(t)
        if not ((lo[k] < py) & (py < up[k])):  # rare and well predicted: only survivors touch keep
            keep[w] = i
            w += 1
    return keep[:w].copy(), m + bad
