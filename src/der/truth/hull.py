r"""Convex hull (2-d, 3-d): the respectful-triangle test, exact search, upper bounds, work count.

A set :math:`P\subseteq S` is *respectful* for ``hull2d`` when :math:`|P|=1` or some closed triangle
:math:`T` (possibly degenerate) satisfies :math:`P\subseteq T\subseteq\operatorname{conv}(S)`; see the
package docstring for the source and the boundary reading.

**Triangle test** (:func:`triangle_witness`). Shrinking the edges of any such ``T`` parallel to themselves
until they touch :math:`Q=\operatorname{conv}(P)` keeps it inside ``conv(S)``, so it suffices to look at
triangles whose three edge lines support ``Q``, with outward normal angles :math:`\theta_1<\theta_2<
\theta_3`. Let :math:`g(\theta)` be the largest :math:`\theta'` for which the corner of the support lines
at :math:`\theta,\theta'` is still inside ``conv(S)`` (the corner slides monotonically along line
:math:`\theta` as :math:`\theta'` grows; :math:`g` is the normal of the second tangent to ``Q`` from the
point where that line leaves ``conv(S)``). ``g`` is monotone with :math:`g(\theta+2\pi)=g(\theta)+2\pi`,
so a triangle exists iff :math:`\max_\theta\, g^3(\theta)-\theta-2\pi\ \ge 0`. We maximise over a finite
candidate set that contains every event angle where a line is flush with an edge of ``Q`` or passes through
a vertex of ``conv(S)`` (this covers the touching cases such as three hull vertices), plus a 256-point grid
with golden-section refinement; ties are accepted with tolerance 1e-9 rad. A positive answer always comes
with an explicit witness triangle, checked to contain ``P`` and to lie in ``conv(S)``.
"""

from __future__ import annotations

import itertools

import numpy as np

from der.truth._common import TruthResult, exact_partition, greedy_cover, labels_entropy, respectful_masks

__all__ = [
    "ANGLE_TOL",
    "hull2d_exact",
    "hull2d_upper",
    "hull2d_work",
    "hull3d_upper",
    "hull_ccw",
    "in_triangles",
    "triangle_is_valid",
    "triangle_witness",
    "upper_hull_work",
]

TWO_PI = 2.0 * np.pi
ANGLE_TOL = 1e-9


# --------------------------------------------------------------------------- 2-d hull primitives
def hull_ccw(points: np.ndarray) -> np.ndarray:
    """Indices of the strict convex-hull vertices, counter-clockwise from the lexicographically smallest:
    the exact monotone chain of :func:`der.geometry.convex_hull` (``method="monotone"``).

    Collinear boundary points are not vertices. One index for a single distinct point, two for a
    collinear set; of exact duplicates the smallest index.
    """
    from der.geometry.hull import convex_hull

    return convex_hull(points, method="monotone")


def _halfplanes(poly: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Outward unit normals ``(m, 2)`` and offsets ``(m,)`` of a ccw convex polygon: ``x ∈ P ⇔ N x ≤ c``."""
    d = np.roll(poly, -1, axis=0) - poly
    nrm = np.column_stack([d[:, 1], -d[:, 0]])
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    return nrm, (nrm * poly).sum(axis=1)


def _g(theta: np.ndarray, Q: np.ndarray, N: np.ndarray, c: np.ndarray, eps: float) -> np.ndarray:
    """The map g (module docstring) for an array of angles; ``Q`` ccw vertices of conv(P)."""
    u = np.column_stack([np.cos(theta), np.sin(theta)])
    t = np.column_stack([-u[:, 1], u[:, 0]])
    proj = u @ Q.T
    fwd = np.where(proj >= proj.max(axis=1, keepdims=True) - eps, t @ Q.T, -np.inf)
    q = Q[np.argmax(fwd, axis=1)]  # touch vertex; the forward-most one when an edge is flush
    nd = t @ N.T
    slack = c[None, :] - q @ N.T
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(nd > 1e-15, np.maximum(slack, 0.0) / nd, np.inf).min(axis=1)
    e = q + np.minimum(s, 1e300)[:, None] * t
    w = e[:, None, :] - Q[None, :, :]
    rel = np.arctan2(w[..., 1], w[..., 0]) - theta[:, None]
    rel = (rel + np.pi) % TWO_PI - np.pi
    rel = np.clip(rel, -np.pi / 2, np.pi / 2)
    rel = np.where(np.linalg.norm(w, axis=2) > eps, rel, np.pi / 2)
    return theta + rel.min(axis=1) + np.pi / 2


def _closing_gap(theta, Q, N, c, eps):
    g1 = _g(theta, Q, N, c, eps)
    g2 = _g(g1, Q, N, c, eps)
    return _g(g2, Q, N, c, eps) - theta - TWO_PI, g1, g2


def _line_corner(a: float, b: float, Q: np.ndarray) -> np.ndarray:
    ua, ub = np.array([np.cos(a), np.sin(a)]), np.array([np.cos(b), np.sin(b)])
    A = np.stack([ua, ub])
    return np.linalg.solve(A, np.array([(Q @ ua).max(), (Q @ ub).max()]))


def triangle_witness(P: np.ndarray, C: np.ndarray, grid: int = 256) -> np.ndarray | None:
    """A triangle ``(3, 2)`` with ``P ⊆ T ⊆ conv(C)``, or ``None`` if there is none (module docstring).

    ``P``: ``(p, 2)`` points inside conv(C); ``C``: ``(m, 2)`` ccw strict vertices of conv(S) (m >= 3).
    """
    qi = hull_ccw(P)
    Q = P[qi]
    if len(Q) <= 3:
        return np.vstack([Q, np.repeat(Q[-1:], 3 - len(Q), axis=0)])
    scale = float(np.abs(C).max()) + 1.0
    eps = 1e-12 * scale
    if sum(np.any(np.all(np.abs(C - v) <= eps, axis=1)) for v in Q) > 3:
        return None  # a strict vertex of conv(S) in T must be a corner of T
    N, c = _halfplanes(C)
    dq = np.roll(Q, -1, axis=0) - Q
    cand = [np.arctan2(-dq[:, 0], dq[:, 1])]
    for sgn in (1.0, -1.0):
        d = (C[None, :, :] - Q[:, None, :]).reshape(-1, 2)
        d = d[np.linalg.norm(d, axis=1) > eps]
        cand.append(np.arctan2(-sgn * d[:, 0], sgn * d[:, 1]))
    cand.append(np.linspace(0.0, TWO_PI, grid, endpoint=False))
    theta = np.concatenate(cand)
    gap, _, _ = _closing_gap(theta, Q, N, c, eps)
    if gap.max() < -ANGLE_TOL:  # golden-section refinement around the best candidates, all at once
        step = TWO_PI / grid
        top = theta[np.argsort(-gap)[:4]]
        lo, hi = top - step, top + step
        r = (np.sqrt(5.0) - 1.0) / 2.0
        for _ in range(36):
            m1, m2 = hi - r * (hi - lo), lo + r * (hi - lo)
            v = _closing_gap(np.concatenate([m1, m2]), Q, N, c, eps)[0]
            left = v[: len(m1)] >= v[len(m1):]
            lo, hi = np.where(left, lo, m1), np.where(left, m2, hi)
        mid = 0.5 * (lo + hi)
        theta = np.concatenate([theta, mid])
        gap = np.concatenate([gap, _closing_gap(mid, Q, N, c, eps)[0]])
    best = int(np.argmax(gap))
    if gap[best] < -ANGLE_TOL:
        return None
    th = theta[best]
    g1 = _g(np.array([th]), Q, N, c, eps)[0]
    g2 = _g(np.array([g1]), Q, N, c, eps)[0]
    return np.stack([_line_corner(th, g1, Q), _line_corner(g1, g2, Q), _line_corner(g2, th, Q)])


def in_triangles(X: np.ndarray, tris: np.ndarray, tol: float) -> np.ndarray:
    """``(n, m)`` bool: point i lies in (closed, tolerance ``tol``) triangle j; degenerate ones handled."""
    A, B, Cc = tris[:, 0], tris[:, 1], tris[:, 2]

    def side(a, b):
        d = b - a
        ln = np.maximum(np.linalg.norm(d, axis=1), 1e-300)
        return ((d[None, :, 0] * (X[:, None, 1] - a[None, :, 1])
                 - d[None, :, 1] * (X[:, None, 0] - a[None, :, 0])) / ln[None, :])

    s1, s2, s3 = side(A, B), side(B, Cc), side(Cc, A)
    pos = (s1 >= -tol) & (s2 >= -tol) & (s3 >= -tol)
    neg = (s1 <= tol) & (s2 <= tol) & (s3 <= tol)
    return pos | neg


def triangle_is_valid(T: np.ndarray, P: np.ndarray, C: np.ndarray, rel_tol: float = 1e-7) -> bool:
    """Check a witness: ``P ⊆ T`` and the corners of ``T`` inside conv(C) (tolerance ``rel_tol·scale``)."""
    scale = float(np.abs(np.vstack([C, P])).max()) + 1.0
    N, c = _halfplanes(C)
    inside_c = bool(((T @ N.T) <= c[None, :] + rel_tol * scale).all())
    return inside_c and bool(in_triangles(P, T[None], rel_tol * scale).all())


# --------------------------------------------------------------------------- entropies
def _collinear_result(n: int, problem: str) -> TruthResult:
    return TruthResult(0.0, 0.0, 0.0, "exact", problem, np.zeros(n, dtype=np.int64), n,
                       {"note": "affinely degenerate input: one (degenerate) range holds every point"})


def hull2d_exact(X: np.ndarray) -> TruthResult:
    """Exact :math:`H_\\mathcal{R}` for ``hull2d`` by subset DP over respectful sets (n <= ~13)."""
    n = len(X)
    ci = hull_ccw(X)
    if len(ci) < 3:
        return _collinear_result(n, "hull2d")
    C = X[ci]
    ok = respectful_masks(n, lambda idx: triangle_witness(X[idx], C) is not None)
    total, labels = exact_partition(n, ok)
    return TruthResult(total / n, total / n, total / n, "exact", "hull2d", labels, n)


def _spread(V: np.ndarray, k: int) -> np.ndarray:
    """``k`` rows of ``V`` chosen by farthest-point sampling (deterministic: starts at row 0)."""
    pick = [0]
    dist = np.linalg.norm(V - V[0], axis=1)
    while len(pick) < min(k, len(V)):
        pick.append(int(np.argmax(dist)))
        dist = np.minimum(dist, np.linalg.norm(V - V[pick[-1]], axis=1))
    return V[np.array(pick)]


def _simplex_candidates(V: np.ndarray, all_limit: int) -> np.ndarray:
    """Candidate simplices on the hull vertices ``V``: their Delaunay triangulation (which covers
    conv(S)) and every (d+1)-subset of at most ``all_limit`` well-spread hull vertices."""
    from scipy.spatial import Delaunay

    d = V.shape[1]
    W = _spread(V, all_limit)
    idx = np.array(list(itertools.combinations(range(len(W)), d + 1)))
    return np.concatenate([V[Delaunay(V).simplices], W[idx]])


def hull2d_upper(X: np.ndarray, all_limit: int = 24) -> TruthResult:
    """Upper bound: greedy cover by triangles spanned by hull vertices (each inside conv(S))."""
    n = len(X)
    ci = hull_ccw(X)
    if len(ci) < 3:
        return _collinear_result(n, "hull2d")
    tris = _simplex_candidates(X[ci], all_limit)
    tol = 1e-12 * (float(np.abs(X).max()) + 1.0)
    labels = greedy_cover(in_triangles(X, tris, tol))
    h = labels_entropy(labels)
    return TruthResult(h, 0.0, h, "upper", "hull2d", labels, n, {"candidates": len(tris)})


def _in_simplices_3d(X: np.ndarray, simp: np.ndarray, tol: float) -> np.ndarray:
    T = np.transpose(simp[:, 1:] - simp[:, :1], (0, 2, 1))  # (m, 3, 3) columns = edges
    ok = np.abs(np.linalg.det(T)) > 1e-14
    inv = np.zeros_like(T)
    inv[ok] = np.linalg.inv(T[ok])
    lam = np.einsum("mij,nmj->nmi", inv, X[:, None, :] - simp[None, :, 0])
    bary = np.concatenate([1.0 - lam.sum(axis=2, keepdims=True), lam], axis=2)
    return (bary >= -tol).all(axis=2) & ok[None, :]


def hull3d_upper(X: np.ndarray, all_limit: int = 16) -> TruthResult:
    """Upper bound for ``hull3d``: greedy cover by tetrahedra spanned by hull vertices.

    Coplanar input is handled in its plane by :func:`hull2d_upper` (a flat tetrahedron is allowed).
    """
    from scipy.spatial import ConvexHull, QhullError

    n = len(X)
    try:
        V = X[ConvexHull(X).vertices]
    except (QhullError, ValueError):
        Y = X - X.mean(axis=0)
        _, sv, vt = np.linalg.svd(Y, full_matrices=False)
        r = hull2d_upper(Y @ vt[:2].T) if sv[1] > 1e-12 * max(sv[0], 1e-300) else _collinear_result(n, "")
        r.problem, r.info["note"] = "hull3d", "coplanar/collinear input reduced to its affine hull"
        return r
    simp = _simplex_candidates(V, all_limit)
    labels = greedy_cover(_in_simplices_3d(X, simp, 1e-9))
    h = labels_entropy(labels)
    return TruthResult(h, 0.0, h, "upper", "hull3d", labels, n, {"candidates": len(simp)})


# --------------------------------------------------------------------------- work count (Θ(n(1+H)))
def _upper_hull_vertices(X: np.ndarray) -> np.ndarray:
    order = np.lexsort((-X[:, 1], X[:, 0]))
    out: list[int] = []
    for i in order:
        if out and X[out[-1], 0] == X[i, 0]:
            continue  # same x, lower y: never an upper-hull vertex
        while len(out) >= 2:
            a, b, c = X[out[-2]], X[out[-1]], X[i]
            if (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]) >= 0:
                out.pop()
            else:
                break
        out.append(int(i))
    return np.array(out, dtype=np.int64)


def _below(X, idx, a, b) -> np.ndarray:
    """Mask of ``idx`` points on or below the segment a→b (within its x-range)."""
    pa, pb = X[a], X[b]
    cr = (pb[0] - pa[0]) * (X[idx, 1] - pa[1]) - (pb[1] - pa[1]) * (X[idx, 0] - pa[0])
    return cr <= 0


def upper_hull_work(X: np.ndarray) -> int:
    """Work of the Kirkpatrick–Seidel upper hull with the extra pruning of Afshani–Barbay–Chan.

    Node on point set Q (sorted by x, its extreme points are hull vertices): split at the median x, find
    the bridge (a, b) over it, drop every point under the bridge and every point of the left (right) half
    under the chord from Q's leftmost point to a (from b to Q's rightmost point), recurse. The work is
    Σ|Q| over the nodes (each node is linear-time); ABC prove this is O(n(1 + H)) and that every algorithm
    needs Ω(n(1 + H)) in their model. The bridge is read off the global upper hull (the same edge a
    linear-time LP at the node would return).
    """
    hv = _upper_hull_vertices(X)
    pos = np.full(len(X), -1)
    pos[hv] = np.arange(len(hv))
    work = 0
    stack = [np.lexsort((-X[:, 1], X[:, 0]))]
    while stack:
        Q = stack.pop()
        work += len(Q)
        hq = Q[pos[Q] >= 0]
        if len(Q) <= 2 or len(hq) == len(Q):
            continue  # everything left is output; a merge pass over it is the |Q| just counted
        hq = hq[np.argsort(pos[hq])]
        m = len(Q) // 2
        xm = X[Q[m], 0]
        k = int(np.searchsorted(X[hq, 0], xm, side="right")) - 1
        k = min(max(k, 0), len(hq) - 2)
        a, b = hq[k], hq[k + 1]
        left, right = Q[X[Q, 0] <= X[a, 0]], Q[X[Q, 0] >= X[b, 0]]
        l0, r0 = Q[0], Q[-1]
        for part, (s, t) in ((left, (l0, a)), (right, (b, r0))):
            keep = part[~_below(X, part, s, t) | np.isin(part, [s, t])]
            if len(keep) > 2:
                stack.append(keep)
    return work


def hull2d_work(X: np.ndarray) -> int:
    """Upper + lower hull work (the lower hull is the upper hull of the reflected set)."""
    return upper_hull_work(X) + upper_hull_work(X * np.array([1.0, -1.0]))
