r"""Maxima (Pareto front) in any dimension: respectful test, exact search, greedy bracket, work count.

Dominance: ``q`` dominates ``p`` when ``q >= p`` coordinatewise and ``q != p``; the maximal points are the
undominated ones. A set ``P`` is respectful when ``|P| = 1`` or a closed axis-aligned box ``B ⊇ P`` has its
interior inside the dominated region :math:`D=\{x: \exists s\in S,\ x\le s\}`. ``D`` is closed and
down-closed, so this holds iff the box's top corner, the coordinatewise maximum of ``P``, is ``<=`` some
point of ``S`` (that point can be taken maximal). Hence a respectful set holds at most one maximal point
(two maximal points have a joint maximum that nothing dominates), and the minimum of Eq. 1 over respectful
partitions is exactly a *minimum-entropy set cover* of ``S`` by the down-sets of the maximal points.
"""

from __future__ import annotations

import numpy as np

from der.truth._common import TruthResult, exact_partition, greedy_cover, labels_entropy, respectful_masks

__all__ = ["dominated_by", "maxima2d_work", "maxima_exact", "maxima_greedy", "maxima_mask", "maximal_mask"]


def maximal_mask(X: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: the point is maximal (no other *distinct* point is >= it in every coordinate)."""
    ge = (X[None, :, :] >= X[:, None, :]).all(axis=2)  # ge[i, j]: X[j] >= X[i]
    ne = (X[None, :, :] != X[:, None, :]).any(axis=2)
    return ~(ge & ne).any(axis=1)


def _maximal_mask_2d(X: np.ndarray) -> np.ndarray:
    """O(n log n) maximal points in 2-d (sort by x descending, keep running max of y)."""
    order = np.lexsort((-X[:, 1], -X[:, 0]))
    ys = X[order, 1]
    prev = np.maximum.accumulate(np.concatenate([[-np.inf], ys[:-1]]))
    keep = ys > prev
    # exact duplicates of a maximal point are maximal too
    out = np.zeros(len(X), dtype=bool)
    out[order[keep]] = True
    dup = np.isin(np.arange(len(X)), order[keep], invert=True)
    if dup.any():
        mx = X[out]
        same = (X[dup][:, None, :] == mx[None, :, :]).all(axis=2).any(axis=1)
        out[np.flatnonzero(dup)[same]] = True
    return out


def maxima_mask(X: np.ndarray) -> np.ndarray:
    return _maximal_mask_2d(X) if X.shape[1] == 2 else maximal_mask(X)


def dominated_by(X: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``(n, m)`` bool: ``M[j] >= X[i]`` coordinatewise (the down-set of ``M[j]`` holds ``X[i]``)."""
    return (M[None, :, :] >= X[:, None, :]).all(axis=2)


def maxima_exact(X: np.ndarray, problem: str) -> TruthResult:
    """Exact :math:`H_\\mathcal{R}` by subset DP (n <= ~16)."""
    n = len(X)
    M = X[maxima_mask(X)]
    ok = respectful_masks(n, lambda idx: bool((M >= X[idx].max(axis=0)).all(axis=1).any()))
    total, labels = exact_partition(n, ok)
    return TruthResult(total / n, total / n, total / n, "exact", problem, labels, n)


def maxima_greedy(X: np.ndarray, problem: str) -> TruthResult:
    """Greedy min-entropy cover by the maximal points' down-sets; certified bracket [H_g − 1, H_g].

    The candidate family is the full family of maximal respectful sets, so the Cardinal–Fiorini–Joret
    additive bound (1 nat) applies: ``lower = max(0, value − 1)``.
    """
    M = X[maxima_mask(X)]
    labels = greedy_cover(dominated_by(X, M))
    h = labels_entropy(labels)
    return TruthResult(h, max(0.0, h - 1.0), h, "greedy", problem, labels, len(X), {"maxima": len(M)})


def maxima2d_work(X: np.ndarray) -> int:
    """Work Σ|Q| of the Afshani–Barbay–Chan divide-and-conquer for 2-d maxima (O(n(1 + H))).

    Node on Q: split at the median x; take the highest point q of the right half (a maximal point);
    drop every point of Q that q dominates; recurse on both halves. Each node is linear-time.
    """
    work = 0
    stack = [np.lexsort((X[:, 1], X[:, 0]))]
    while stack:
        Q = stack.pop()
        work += len(Q)
        if len(Q) <= 1:
            continue
        m = len(Q) // 2
        L, R = Q[:m], Q[m:]
        q = R[np.lexsort((X[R, 0], X[R, 1]))[-1]]
        dom = (X[Q, 0] <= X[q, 0]) & (X[Q, 1] <= X[q, 1])
        dom &= Q != q
        keep = Q[~dom]
        for part in (keep[np.isin(keep, L)], keep[np.isin(keep, R) & (keep != q)]):
            if len(part):
                stack.append(part)
    return work
