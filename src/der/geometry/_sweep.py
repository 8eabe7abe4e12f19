"""Sweep-hull Delaunay triangulation in numba (the Delaunator scheme) with exact predicates.

Points are inserted in order of distance from the circumcentre of a seed triangle. Each point is
normally outside the current convex hull: it is joined to every hull edge it sees (found from an
angular hash of hull vertices and exact orientation tests), the hull linked list is updated, and each
new edge is legalized by Lawson flips (exact :func:`der.geometry._incircle.incircle`). Since the
distance order is computed in float64, a point can be (rarely) not strictly outside the hull -- a
near-tie in distance or an exact duplicate. Unlike Delaunator, which skips such points, we locate it
by a visibility walk (it terminates in a Delaunay triangulation) and split the triangle, or the edge it
lies on, before legalizing; an exact duplicate of an inserted point is skipped, so of duplicates the
one inserted first takes part (stable sort: the smallest index). Every decision is exact, so the
result is the Delaunay triangulation (unique up to cocircular ties).

Triangles are stored clockwise (Delaunator's convention) as halfedge triples: halfedge ``h`` runs
from ``tri[h]`` to ``tri[_nxt(h)]`` and ``he[h]`` is its twin (-1 on the hull). ``hull_tri[v]`` is
the halfedge of the hull edge from hull vertex ``v`` to ``hull_next[v]``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from der.geometry._incircle import incircle
from der.geometry._kernels import orient
from der.geometry._order import stable_argsort

__all__ = ["index_proto", "sweep_delaunay", "sweep_ranked"]


@njit(cache=True, inline="always")
def _nxt(h: int) -> int:
    return h - 2 if h % 3 == 2 else h + 1


@njit(cache=True, inline="always")
def _prv(h: int) -> int:
    return h + 2 if h % 3 == 0 else h - 1


@njit(cache=True, inline="always")
def _link(he, a: int, b: int) -> None:
    he[a] = b
    if b != -1:
        he[b] = a


@njit(cache=True, inline="always")
def _hash_key(x, y, cx, cy, size) -> int:
    dx, dy = x - cx, y - cy
    s = abs(dx) + abs(dy)
    if not 0.0 < s < np.inf:  # (coincident, or overflowed for coordinates near 1e308)
        return 0
    p = dx / s
    a = (3.0 - p if dy > 0.0 else 1.0 + p) / 4.0  # pseudo-angle in [0, 1]
    return int(math.floor(a * size)) % size


@njit(cache=True, inline="always")
def _unhash(hull_hash, x, y, cx, cy, size, v) -> None:
    """Clear ``v``'s slot when it leaves the hull: the search for a live vertex then skips empty
    slots (a sequential scan) instead of following stale vertices into cold memory."""
    k = _hash_key(x, y, cx, cy, size)
    if hull_hash[k] == v:
        hull_hash[k] = -1


@njit(cache=True)
def _add_tri(tri, he, tlen, i0, i1, i2, a, b, c) -> int:
    tri[tlen], tri[tlen + 1], tri[tlen + 2] = i0, i1, i2
    _link(he, tlen, a)
    _link(he, tlen + 1, b)
    _link(he, tlen + 2, c)
    return tlen


@njit(cache=True)
def _legalize(X, Y, tri, he, hull_prev, hull_tri, hull_start, stack, a) -> int:
    """Lawson flips from halfedge ``a`` (Delaunator's ``_legalize``, unbounded stack, exact test)."""
    i = 0
    ar = 0
    while True:
        b = he[a]
        ar = _prv(a)
        if b == -1:
            if i == 0:
                break
            i -= 1
            a = stack[i]
            continue
        al = _nxt(a)
        bl = _prv(b)
        p0, pr, pl, p1 = tri[ar], tri[a], tri[al], tri[bl]
        if incircle(X[p0], Y[p0], X[pr], Y[pr], X[pl], Y[pl], X[p1], Y[p1]) < 0.0:
            tri[a] = p1
            tri[b] = p0
            hbl = he[bl]
            if hbl == -1 and hull_tri[tri[bl]] == bl:  # a hull edge moves from bl to a: O(1) fix
                hull_tri[tri[bl]] = a
            elif hbl == -1:  # (Delaunator's scan; the O(1) test above finds it in practice)
                e = hull_start
                while True:
                    if hull_tri[e] == bl:
                        hull_tri[e] = a
                        break
                    e = hull_prev[e]
                    if e == hull_start:
                        break
            _link(he, a, hbl)
            _link(he, b, he[ar])
            _link(he, ar, bl)
            stack[i] = _nxt(b)
            i += 1
        else:
            if i == 0:
                break
            i -= 1
            a = stack[i]
    return ar


@njit(cache=True)
def _turn(X, Y, a, b, p) -> float:
    return orient(X[a], Y[a], X[b], Y[b], X[p], Y[p])


@njit(cache=True)
def _locate(X, Y, tri, he, tlen, t, p) -> int:
    """Triangle (its first halfedge) whose closed region holds ``p``: visibility walk from ``t``
    (exact tests), with a linear scan as the fallback should the walk not end."""
    for step in range(tlen + 3):
        moved = False
        for k in range(3):
            h = t + (k + step) % 3
            if _turn(X, Y, tri[h], tri[_nxt(h)], p) > 0.0:
                if he[h] == -1:
                    return _scan(X, Y, tri, tlen, p)  # outside the hull: not expected here
                t = he[h] - he[h] % 3
                moved = True
                break
        if not moved:
            return t
    return _scan(X, Y, tri, tlen, p)


@njit(cache=True)
def _scan(X, Y, tri, tlen, p) -> int:
    for t in range(0, tlen, 3):
        if (_turn(X, Y, tri[t], tri[t + 1], p) <= 0.0 and _turn(X, Y, tri[t + 1], tri[t + 2], p) <= 0.0
                and _turn(X, Y, tri[t + 2], tri[t], p) <= 0.0):
            return t
    return -1


@njit(cache=True)
def _insert_inside(X, Y, tri, he, tlen, hull_next, hull_prev, hull_tri, hull_hash, hull_start, stack,
                   cx, cy, p, t0) -> int:
    """Insert ``p`` (inside or on the boundary of the hull) by splitting the triangle or edge holding
    it; returns the new triangle count ``tlen`` (unchanged if ``p`` duplicates a vertex)."""
    t = _locate(X, Y, tri, he, tlen, t0, p)
    if t < 0:
        return tlen
    zeros = 0
    h = -1
    for k in range(3):
        if _turn(X, Y, tri[t + k], tri[_nxt(t + k)], p) == 0.0:
            zeros += 1
            h = t + k
    if zeros >= 2:
        return tlen  # p coincides with a vertex: exact duplicate
    outer = np.empty(6, dtype=np.int64)
    no = 0
    on_hull = False
    if zeros == 0:  # split (a, b, c) into (a, b, p), (b, c, p), (c, a, p)
        a, b, c = tri[t], tri[t + 1], tri[t + 2]
        o1, o2 = he[t + 1], he[t + 2]
        s1, s2 = tlen, tlen + 3
        tri[t + 2] = p
        _add_tri(tri, he, s1, b, c, p, o1, -1, t + 1)
        _add_tri(tri, he, s2, c, a, p, o2, t + 2, s1 + 1)
        tlen += 6
        outer[0], outer[1], outer[2] = t, s1, s2
        no = 3
    else:  # p on edge a -> b of (a, b, c); its twin (b, a, d) if any
        c_h = _nxt(_nxt(h))
        a, b, c = tri[h], tri[_nxt(h)], tri[c_h]
        x1, x2 = he[_nxt(h)], he[c_h]
        o = he[h]
        s1 = tlen
        # (a, p, c) in slot t, (p, b, c) new
        tri[t], tri[t + 1], tri[t + 2] = a, p, c
        _link(he, t + 2, x2)
        _add_tri(tri, he, s1, p, b, c, -1, x1, t + 1)
        tlen += 3
        outer[0], outer[1] = t + 2, s1 + 1
        no = 2
        if o == -1:  # hull edge a -> b: p joins the hull between a and b
            hull_next[a], hull_prev[p], hull_next[p], hull_prev[b] = p, a, b, p
            _link(he, t, -1)
            _link(he, s1, -1)
            hull_tri[a], hull_tri[p] = t, s1
            on_hull = True
            hull_hash[_hash_key(X[p], Y[p], cx, cy, hull_hash.shape[0])] = p
        else:  # twin (b, a, d): (b, p, d) in its slot, (p, a, d) new
            u = o - o % 3
            oy1, oy2 = he[_nxt(o)], he[_nxt(_nxt(o))]
            d = tri[_nxt(_nxt(o))]
            s3 = tlen
            tri[u], tri[u + 1], tri[u + 2] = b, p, d
            _link(he, u + 2, oy2)
            _add_tri(tri, he, s3, p, a, d, t, oy1, u + 1)
            _link(he, u, s1)
            tlen += 3
            outer[2], outer[3] = u + 2, s3 + 1
            no = 4
    for k in range(no):  # hull edges among the outer edges moved to new halfedges
        if he[outer[k]] == -1:
            hull_tri[tri[outer[k]]] = outer[k]
    for k in range(no):
        r = _legalize(X, Y, tri, he, hull_prev, hull_tri, hull_start, stack, outer[k])
        if k == 1 and on_hull:
            # p joined the hull: flips opposite p move its hull edge p -> b, which legalize
            # tracks and returns (as in Delaunator's sweep step)
            hull_tri[p] = r
    return tlen


@njit(cache=True)
def _seed(X, Y):
    """Seed triangle (i0, i1, i2), clockwise; i2 = -1 if all points are collinear."""
    n = X.shape[0]
    cx = 0.5 * (X.min() + X.max())
    cy = 0.5 * (Y.min() + Y.max())
    i0, i1, i2 = 0, -1, -1  # (distances may overflow to inf for coordinates near 1e308)
    best = np.inf
    for i in range(n):
        d = (X[i] - cx) ** 2 + (Y[i] - cy) ** 2
        if d < best:
            i0, best = i, d
    best = np.inf
    for i in range(n):
        if X[i] != X[i0] or Y[i] != Y[i0]:
            d = (X[i] - X[i0]) ** 2 + (Y[i] - Y[i0]) ** 2
            if i1 == -1 or d < best:
                i1, best = i, d
    if i1 == -1:
        return i0, i1, i2
    best = np.inf
    for i in range(n):
        r = _circumradius2(X[i0], Y[i0], X[i1], Y[i1], X[i], Y[i])
        if r < best:
            i2, best = i, r
    if i2 == -1 or _turn(X, Y, i0, i1, i2) == 0.0:
        i2 = -1
        for i in range(n):
            if _turn(X, Y, i0, i1, i) != 0.0:
                i2 = i
                break
    if i2 != -1 and _turn(X, Y, i0, i1, i2) > 0.0:
        i1, i2 = i2, i1
    return i0, i1, i2


@njit(cache=True, inline="always")
def _circumradius2(ax, ay, bx, by, cx, cy) -> float:
    dx, dy, ex, ey = bx - ax, by - ay, cx - ax, cy - ay
    bl, cl = dx * dx + dy * dy, ex * ex + ey * ey
    den = dx * ey - dy * ex
    if den == 0.0:
        return np.inf
    d = 0.5 / den
    x, y = (ey * bl - dy * cl) * d, (dx * cl - ex * bl) * d
    return x * x + y * y


@njit(cache=True)
def _seed_circumcentre(X, Y, i0, i1, i2):
    ax, ay, bx, by = X[i0], Y[i0], X[i1] - X[i0], Y[i1] - Y[i0]
    ex, ey = X[i2] - ax, Y[i2] - ay
    bl, cl = bx * bx + by * by, ex * ex + ey * ey
    den = bx * ey - by * ex
    cx = cy = np.inf
    if den != 0.0:
        cx, cy = ax + (ey * bl - by * cl) * (0.5 / den), ay + (bx * cl - ex * bl) * (0.5 / den)
    if not (math.isfinite(cx) and math.isfinite(cy)):  # (nearly) flat seed: its centroid will do
        cx, cy = (X[i0] + X[i1] + X[i2]) / 3.0, (Y[i0] + Y[i1] + Y[i2]) / 3.0
    return cx, cy


@njit(cache=True)
def sweep_ranked(X, Y, order, proto):
    """Delaunay triangles of the points (X, Y) as *ranks* in the insertion order, and that order.

    Returns ``(tri, ids)``: ``tri`` (t, 3) clockwise, of the dtype of ``proto`` (an empty int32 or
    int64 array), its entries index ``ids`` (so ``ids[tri]`` are row indices of the input); (0, 3)
    if all points are collinear. ``order``: insertion order (a permutation of all rows), or empty
    for the sweep order (distance from the seed circumcentre, a stable bucket sort). The
    coordinates are gathered into insertion order first, so the sweep reads them sequentially and
    every array indexed by a vertex (hull links, coordinates) is visited in the order of the sweep
    front instead of at random."""
    n = X.shape[0]
    i0, i1, i2 = _seed(X, Y) if n >= 3 else (-1, -1, -1)
    if i2 == -1:
        return np.zeros((0, 3), dtype=proto.dtype), np.arange(n)
    cx, cy = _seed_circumcentre(X, Y, i0, i1, i2)
    if order.shape[0]:
        ids = order
    else:
        dist = np.empty(n)
        for i in range(n):
            dist[i] = (X[i] - cx) ** 2 + (Y[i] - cy) ** 2
        ids = stable_argsort(dist)
    XY = np.empty((n, 2))
    r0 = r1 = r2 = 0
    for k in range(n):
        i = ids[k]
        XY[k, 0], XY[k, 1] = X[i], Y[i]
        if i == i0:
            r0 = k
        elif i == i1:
            r1 = k
        elif i == i2:
            r2 = k
    return _sweep_core(XY[:, 0], XY[:, 1], r0, r1, r2, cx, cy, proto), ids


def index_proto(n: int) -> np.ndarray:
    """Empty array of the index dtype for ``n`` points: int32 while 6 n fits, else int64."""
    return np.empty(0, np.int32 if 6 * n < 2**31 else np.int64)


def sweep_delaunay(X: np.ndarray, Y: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Delaunay triangles (t, 3) int64, clockwise, of the points (X, Y); (0, 3) if all are collinear.

    ``order``: insertion order (a permutation of all rows), or empty for the sweep order (distance
    from the seed circumcentre). Any order gives the same triangulation up to cocircular ties and
    the choice among exact duplicates (the first inserted is kept); orders other than the sweep's
    make most insertions go through the walk-and-split path (tests use this)."""
    tri, ids = sweep_ranked(X, Y, order, index_proto(len(X)))
    return ids[tri].astype(np.int64)


@njit(cache=True)
def _sweep_core(X, Y, i0, i1, i2, cx, cy, proto):
    """The sweep over rows 0..n-1 of (X, Y) in index order, from the seed triangle (i0, i1, i2)
    (clockwise) with circumcentre (cx, cy); clockwise triangles (t, 3), of the integer dtype of
    ``proto`` (int32 halves the memory traffic of the triangle arrays where 6 n < 2^31)."""
    n = X.shape[0]
    size = max(1, int(math.ceil(math.sqrt(n))))
    hull_hash = np.full(size, -1, dtype=proto.dtype)
    hull_next = np.empty(n, dtype=proto.dtype)
    hull_prev = np.empty(n, dtype=proto.dtype)
    hull_tri = np.empty(n, dtype=proto.dtype)
    ntri = max(1, 2 * n - 5)
    tri = np.empty(3 * ntri, dtype=proto.dtype)
    he = np.full(3 * ntri, -1, dtype=proto.dtype)
    stack = np.empty(3 * ntri, dtype=proto.dtype)
    hull_next[i0], hull_prev[i2] = i1, i1
    hull_next[i1], hull_prev[i0] = i2, i2
    hull_next[i2], hull_prev[i1] = i0, i0
    hull_tri[i0], hull_tri[i1], hull_tri[i2] = 0, 1, 2
    for v in (i0, i1, i2):
        hull_hash[_hash_key(X[v], Y[v], cx, cy, size)] = v
    tlen = _add_tri(tri, he, 0, i0, i1, i2, -1, -1, -1) + 3
    hull_start = i0
    last = -1
    for i in range(n):
        x, y = X[i], Y[i]
        if i == i0 or i == i1 or i == i2 or (last >= 0 and x == X[last] and y == Y[last]):
            continue
        last = i
        key = _hash_key(x, y, cx, cy, size)
        start = 0
        for j in range(size):
            start = hull_hash[(key + j) % size]
            if start != -1 and start != hull_next[start]:
                break
        start = hull_prev[start]
        e = start
        while True:
            q = hull_next[e]
            if orient(x, y, X[e], Y[e], X[q], Y[q]) > 0.0:
                break
            e = q
            if e == start:
                e = -1
                break
        if e == -1:  # not strictly outside the hull (near-tie in distance, or a duplicate)
            t0 = hull_tri[start] - hull_tri[start] % 3
            tlen = _insert_inside(X, Y, tri, he, tlen, hull_next, hull_prev, hull_tri, hull_hash,
                                  hull_start, stack, cx, cy, i, t0)
            continue
        t = _add_tri(tri, he, tlen, e, i, hull_next[e], -1, -1, hull_tri[e])
        tlen += 3
        hull_tri[i] = _legalize(X, Y, tri, he, hull_prev, hull_tri, hull_start, stack, t + 2)
        hull_tri[e] = t
        nn = hull_next[e]
        while True:
            q = hull_next[nn]
            if not orient(x, y, X[nn], Y[nn], X[q], Y[q]) > 0.0:
                break
            t = _add_tri(tri, he, tlen, nn, i, q, hull_tri[i], -1, hull_tri[nn])
            tlen += 3
            hull_tri[i] = _legalize(X, Y, tri, he, hull_prev, hull_tri, hull_start, stack, t + 2)
            hull_next[nn] = nn  # removed from the hull
            _unhash(hull_hash, X[nn], Y[nn], cx, cy, size, nn)
            nn = q
        if e == start:
            while True:
                q = hull_prev[e]
                if not orient(x, y, X[q], Y[q], X[e], Y[e]) > 0.0:
                    break
                t = _add_tri(tri, he, tlen, q, i, e, -1, hull_tri[e], hull_tri[q])
                tlen += 3
                _legalize(X, Y, tri, he, hull_prev, hull_tri, hull_start, stack, t + 2)
                hull_tri[q] = t
                hull_next[e] = e
                _unhash(hull_hash, X[e], Y[e], cx, cy, size, e)
                e = q
        hull_start = e
        hull_prev[i] = e
        hull_next[e] = i
        hull_prev[nn] = i
        hull_next[i] = nn
        hull_hash[_hash_key(x, y, cx, cy, size)] = i
        hull_hash[_hash_key(X[e], Y[e], cx, cy, size)] = e
    return tri[:tlen].reshape(-1, 3)
