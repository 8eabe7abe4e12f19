r"""Ground-truth range-partition entropy :math:`H_\mathcal{R}` (paper Eq. 1) for hulls and maxima.

Definitions (the ones implemented here)
---------------------------------------
Let :math:`S` be a set of :math:`n` points. For a partition :math:`\Pi=\{S_1,\dots,S_t\}` of :math:`S`,

.. math:: H(\Pi) = \sum_k \frac{|S_k|}{n}\log\frac{n}{|S_k|}\quad\text{(nats per point; Eq. 1 divided by n)}

and :math:`H_\mathcal{R}(S)=\min H(\Pi)` over **respectful** partitions. Respectful, following
Afshani, Barbay & Chan, *Instance-optimal geometric algorithms* (FOCS 2009; J. ACM 64(1), 2017;
arXiv:1505.00184), where the minimum is called the *structural entropy*, and the range-partition entropy
of Eppstein, Goodrich, Illickan & To, *Entropy-bounded computational geometry made easier and sensitive
to sortedness* (arXiv:2508.20489, 2025), which keeps the respectful condition and generalises the ranges:

* ``maxima2d`` / ``maxima3d`` (ABC, 2-d maxima; 3-d maxima): each :math:`S_k` is a singleton or is
  enclosed by an axis-aligned box whose interior lies entirely in the region dominated by the staircase
  of :math:`S` (the points :math:`x` with :math:`x\le s` coordinatewise for some :math:`s\in S`).
* ``hull2d`` / ``hull3d`` (ABC state it for the upper hull: a simplex "whose interior is completely below
  the upper hull"; for the full hull, as in EGIT's 2-d/3-d hull sections, the region is the hull
  itself): each :math:`S_k` is a singleton or is enclosed by a triangle (2-d) / tetrahedron (3-d)
  whose interior lies inside :math:`\operatorname{conv}(S)`.

Note that Eq. 1 of the DER paper minimises over all partitions "induced by ranges in R" without the
respectful condition; read literally that minimum is always 0 (one range holds every point), so the
respectful condition is what makes :math:`H_\mathcal{R}` meaningful. ABC use log base 2; we use nats.

Boundary reading (stated because the closed forms depend on it)
----------------------------------------------------------------
Ranges are **closed**, only their *interior* is constrained, and degenerate ranges (segments, flat boxes)
are allowed. So an output point may belong to a non-singleton part when it lies on the range's boundary:

* hull: a strict hull vertex may lie in :math:`T\subseteq\operatorname{conv}(S)` only as a corner of
  :math:`T`, so a part holds at most 3 (2-d) / 4 (3-d) hull vertices, and **any** 3 (resp. 4) points form
  a respectful part (their own hull is a triangle inside conv(S)). Points in convex position therefore
  have :math:`H_\mathcal{R}=\log(n/3)` when :math:`3\mid n`; a triangle with any interior points has
  :math:`H_\mathcal{R}=0`; collinear input has :math:`H_\mathcal{R}=0`.
* maxima: the box condition is equivalent to ``max(P) <= s`` for some ``s`` in ``S``; a part holds at most
  one maximal point, which may sit at the box's top corner. A staircase of n maximal points has
  :math:`H_\mathcal{R}=\log n`; a staircase point plus everything it dominates forms one part.

Duplicated points are kept as separate points (they may share a part). ``n = 1, 2`` give 0. NaN/Inf or a
wrong shape raise ``ValueError``.

What is computed
----------------
* ``method="exact"``: subset DP (O(3^n)) over the respectful sets, found with heredity pruning; the
  ``hull2d`` test is the nested-triangle test of :mod:`der.truth.hull` (every positive answer carries a
  verified witness triangle). Default limit n <= 12 (hull2d) / 16 (maxima).
* ``method="upper"``: an explicit respectful partition. hull: greedy cover by simplices spanned by hull
  vertices (Delaunay of the hull vertices, plus all triples/quadruples when there are few). maxima: the
  greedy minimum-entropy cover by the maximal points' down-sets, which is within 1 nat of optimal
  (Cardinal, Fiorini & Joret 2008), so the result also carries a certified lower bound.
* :func:`work_entropy`: the work Σ|Q| of the instance-optimal divide-and-conquer (Kirkpatrick–Seidel with
  ABC pruning for hulls; ABC's maxima recursion), whose Θ(n(1+H)) makes ``W/n`` a second, unnormalised
  estimate of :math:`1+H_\mathcal{R}`.
* ``hull3d`` has no exact search here (no exact tetrahedron-nesting test is implemented); only
  ``method="upper"``.
"""

from __future__ import annotations

import numpy as np

from der.truth._common import TruthResult, check_points, labels_entropy, part_costs
from der.truth.hull import hull2d_exact, hull2d_upper, hull2d_work, hull3d_upper, triangle_witness
from der.truth.maxima import maxima2d_work, maxima_exact, maxima_greedy, maxima_mask

PROBLEMS = {"hull2d": 2, "hull3d": 3, "maxima2d": 2, "maxima3d": 3}
EXACT_LIMIT = {"hull2d": 12, "maxima2d": 16, "maxima3d": 16}

__all__ = [
    "PROBLEMS",
    "TruthResult",
    "is_respectful",
    "labels_entropy",
    "part_costs",
    "range_partition",
    "range_partition_entropy",
    "triangle_witness",
    "work_entropy",
]


def _check_problem(problem: str) -> int:
    if problem not in PROBLEMS:
        raise ValueError(f"problem must be one of {sorted(PROBLEMS)}, got {problem!r}")
    return PROBLEMS[problem]


def range_partition(points, problem: str = "hull2d", method: str = "auto",
                    max_exact_n: int | None = None) -> TruthResult:
    """A respectful partition of ``points`` and what it proves about :math:`H_\\mathcal{R}`.

    Args:
        points: ``(n, 2)`` or ``(n, 3)`` finite array (d fixed by ``problem``).
        problem: ``"hull2d" | "maxima2d" | "maxima3d" | "hull3d"``.
        method: ``"exact"`` (raises if n is above the limit or for hull3d), ``"upper"`` (construction),
            ``"auto"`` (exact when n <= ``max_exact_n``, else upper).
        max_exact_n: limit for ``auto``/``exact`` (default 12 for hull2d, 16 for maxima).
    Returns:
        :class:`TruthResult` with ``value`` (nats per point), ``lower``, ``upper``, ``labels``.
    """
    d = _check_problem(problem)
    if method not in ("auto", "exact", "upper"):
        raise ValueError(f"method must be 'auto', 'exact' or 'upper', got {method!r}")
    X = check_points(points, d)
    n = len(X)
    limit = EXACT_LIMIT.get(problem, 0) if max_exact_n is None else int(max_exact_n)
    if method == "exact" and (problem not in EXACT_LIMIT or n > limit):
        why = "no exact search for hull3d" if problem not in EXACT_LIMIT else f"n={n} > limit {limit}"
        raise ValueError(f"method='exact' is not available here ({why}); use method='upper'")
    exact = problem in EXACT_LIMIT and (method == "exact" or (method == "auto" and n <= limit))
    if problem == "hull2d":
        return hull2d_exact(X) if exact else hull2d_upper(X)
    if problem == "hull3d":
        return hull3d_upper(X)
    return maxima_exact(X, problem) if exact else maxima_greedy(X, problem)


def range_partition_entropy(points, problem: str = "hull2d", method: str = "auto",
                            normalized: bool = True, max_exact_n: int | None = None) -> float:
    """:math:`H_\\mathcal{R}` in nats per point (``normalized=False``: :math:`n\\cdot H`, Eq. 1).

    Exact for small n, otherwise the entropy of an explicit respectful partition (an upper bound);
    see :func:`range_partition` for the arguments.

    >>> import numpy as np
    >>> t = np.linspace(0, 2 * np.pi, 9, endpoint=False)
    >>> round(range_partition_entropy(np.c_[np.cos(t), np.sin(t)], "hull2d"), 6)  # log(9/3)
    1.098612
    """
    r = range_partition(points, problem, method, max_exact_n)
    return r.value if normalized else r.total()


def is_respectful(points, part, problem: str = "hull2d") -> bool:
    """Whether the points ``points[part]`` form a respectful part of ``points`` (definitions above)."""
    d = _check_problem(problem)
    X = check_points(points, d)
    idx = np.unique(np.asarray(part, dtype=np.int64))
    if idx.size == 0 or idx.min() < 0 or idx.max() >= len(X):
        raise ValueError(f"part must be non-empty indices in [0, {len(X)}), got {np.asarray(part)!r}")
    if idx.size == 1:
        return True
    if problem.startswith("maxima"):
        M = X[maxima_mask(X)]
        return bool((M >= X[idx].max(axis=0)).all(axis=1).any())
    if problem == "hull3d":
        raise ValueError("is_respectful is not implemented for hull3d (no exact tetrahedron test)")
    from der.truth.hull import hull_ccw

    ci = hull_ccw(X)
    return len(ci) < 3 or triangle_witness(X[idx], X[ci]) is not None


def work_entropy(points, problem: str = "hull2d") -> dict:
    """Work of the instance-optimal divide-and-conquer: ``{"work": W, "per_point": W/n}``.

    ``W = Σ|Q|`` over the recursion nodes is Θ(n(1 + H_R)) (ABC), so ``W/n`` estimates ``1 + H_R`` up to
    constants. Available for ``hull2d`` and ``maxima2d``.
    """
    d = _check_problem(problem)
    X = check_points(points, d)
    if problem == "hull2d":
        w = hull2d_work(X)
    elif problem == "maxima2d":
        w = maxima2d_work(X)
    else:
        raise ValueError(f"work_entropy supports 'hull2d' and 'maxima2d', got {problem!r}")
    return {"work": int(w), "per_point": w / len(X)}
