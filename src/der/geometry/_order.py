"""Linear-time orderings for the Delaunay engine: a stable bucket argsort and the canonical triangle list.

:func:`stable_argsort` sorts non-negative keys (squared distances from the sweep centre) by one
counting pass into ``n`` equal-width buckets over ``[min d, max d]`` (points on a circle: distances
in a sliver of width ~1e-16 still spread over all buckets), a stable scatter, and an insertion sort
inside each bucket (a stable merge sort for the rare crowded bucket). Bucketing by
``int((d - min d) * scale)`` is monotone in ``d``, so the result equals
``np.argsort(d, kind="stable")``.

:func:`canonical_from_cw` turns the engine's clockwise triangles (ranks in the insertion order) into
the public canonical form -- counter-clockwise, smallest vertex first, rows sorted -- with a counting
sort on the first vertex. Within one first vertex ``v`` the second vertices are distinct (a directed
edge ``v -> s`` has one triangle on its left), so sorting a bucket by its second vertex sorts it
completely.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["canonical_from_cw", "stable_argsort"]

_CROWDED = 48  # bucket size above which the bucket is merge-sorted instead of insertion-sorted


@njit(cache=True)
def stable_argsort(d):
    """``np.argsort(d, kind="stable")`` for finite ``d >= 0`` (module docstring)."""
    n = d.shape[0]
    top = 0.0
    bot = np.inf
    for i in range(n):
        top = max(top, d[i])
        bot = min(bot, d[i])
    span = top - bot
    scale = (n - 1) / span if span > 0.0 else 0.0
    if not (np.isfinite(scale) and np.isfinite(span)):  # (a distance overflowed to inf)
        return np.argsort(d, kind="mergesort")
    key = np.empty(n, dtype=np.int64)
    start = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        k = min(int((d[i] - bot) * scale), n - 1)
        key[i] = k
        start[k + 1] += 1
    for k in range(n):
        start[k + 1] += start[k]
    out = np.empty(n, dtype=np.int64)
    fill = start[:n].copy()
    for i in range(n):
        k = key[i]
        out[fill[k]] = i
        fill[k] += 1
    for k in range(n):
        lo, hi = start[k], start[k + 1]
        if hi - lo > _CROWDED:
            seg = out[lo:hi].copy()
            sub = np.argsort(d[seg], kind="mergesort")
            for j in range(hi - lo):
                out[lo + j] = seg[sub[j]]
            continue
        for j in range(lo + 1, hi):  # insertion sort, strict comparison: stable
            v = out[j]
            dv = d[v]
            m = j
            while m > lo and d[out[m - 1]] > dv:
                out[m] = out[m - 1]
                m -= 1
            out[m] = v
    return out


@njit(cache=True, inline="always")
def _ccw_min_first(tri, ids, t):
    a, b, c = ids[tri[t, 0]], ids[tri[t, 2]], ids[tri[t, 1]]  # reversed: counter-clockwise
    if b < a and b < c:
        return b, c, a
    if c < a and c < b:
        return c, a, b
    return a, b, c


@njit(cache=True)
def canonical_from_cw(tri, ids, n):
    """Canonical triangles (module docstring) from clockwise ``tri`` (t, 3) of ranks into ``ids``."""
    m = tri.shape[0]
    start = np.zeros(n + 1, dtype=np.int64)
    for t in range(m):
        a, _, _ = _ccw_min_first(tri, ids, t)
        start[a + 1] += 1
    for v in range(n):
        start[v + 1] += start[v]
    fill = start[:n].copy()
    out = np.empty((m, 3), dtype=np.int64)
    for t in range(m):
        a, b, c = _ccw_min_first(tri, ids, t)
        f = fill[a]
        out[f, 0], out[f, 1], out[f, 2] = a, b, c
        fill[a] = f + 1
    for v in range(n):
        lo, hi = start[v], start[v + 1]
        if hi - lo > _CROWDED:
            sub = np.argsort(out[lo:hi, 1])
            seg = out[lo:hi].copy()
            for j in range(hi - lo):
                out[lo + j, 1], out[lo + j, 2] = seg[sub[j], 1], seg[sub[j], 2]
            continue
        for j in range(lo + 1, hi):
            s, r = out[j, 1], out[j, 2]
            k = j
            while k > lo and out[k - 1, 1] > s:
                out[k, 1], out[k, 2] = out[k - 1, 1], out[k - 1, 2]
                k -= 1
            out[k, 1], out[k, 2] = s, r
    return out
