"""Shared pieces of :mod:`der.truth`: input checks, the partition cost (Eq. 1), the exact subset DP and
the greedy minimum-entropy cover."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from der._validate import as_points
from der.functional import entropy_from_counts

__all__ = [
    "TruthResult",
    "check_points",
    "exact_partition",
    "greedy_cover",
    "labels_entropy",
    "part_costs",
    "respectful_masks",
]

try:  # numba is in the ``geometry`` extra; the pure-Python DP below is the fallback
    from numba import njit
except ImportError:  # pragma: no cover - exercised only without numba
    njit = None


@dataclass
class TruthResult:
    """A respectful partition and what is known about :math:`H_\\mathcal{R}` (nats per point).

    ``value`` is the entropy of ``labels`` (an upper bound, exact when ``method == "exact"``);
    ``lower`` is a certified lower bound (``value`` itself for ``exact``, ``value - 1`` for the greedy
    cover of ``maxima*`` by the Cardinal–Fiorini–Joret guarantee, ``0`` when nothing better is known).
    """

    value: float
    lower: float
    upper: float
    method: str
    problem: str
    labels: np.ndarray
    n: int
    info: dict = field(default_factory=dict)

    def total(self) -> float:
        """:math:`n\\cdot H` (Eq. 1 without the division by n)."""
        return self.value * self.n


def check_points(points, d: int, name: str = "points") -> np.ndarray:
    """Finite ``(n, d)`` float64 array with ``n >= 1`` (:func:`der._validate.as_points`)."""
    return as_points(points, d, name, min_rows=1)


def part_costs(n: int) -> np.ndarray:
    """``c[k] = k log(n/k)`` for ``k = 0..n`` (``c[0] = 0``): the cost of a part of size k in Eq. 1."""
    k = np.arange(n + 1, dtype=np.float64)
    out = np.zeros(n + 1)
    out[1:] = k[1:] * np.log(n / k[1:])
    return out


def labels_entropy(labels: np.ndarray) -> float:
    """Per-point entropy (nats) of the partition given by integer ``labels``."""
    _, counts = np.unique(labels, return_counts=True)
    return float(entropy_from_counts(torch.from_numpy(counts.astype(np.float64))))


def respectful_masks(n: int, oracle: Callable[[np.ndarray], bool]) -> np.ndarray:
    """``ok[mask]`` for every subset of ``range(n)``, using heredity.

    Respectful families are closed under subsets (the same range encloses any subset), so a set is tested
    with ``oracle(indices)`` only when all its subsets of one fewer element passed. Sets of size <= 1
    are always respectful.
    """
    size = 1 << n
    ok = np.zeros(size, dtype=np.bool_)
    pop = np.array([bin(m).count("1") for m in range(size)])
    for m in np.argsort(pop, kind="stable"):
        m = int(m)
        if pop[m] <= 1:
            ok[m] = True
            continue
        bits = [b for b in range(n) if m >> b & 1]
        if all(ok[m ^ (1 << b)] for b in bits):
            ok[m] = bool(oracle(np.array(bits)))
    return ok


def _dp_python(n: int, ok: np.ndarray, cost: np.ndarray, pop: np.ndarray):
    size = 1 << n
    best = np.full(size, np.inf)
    choice = np.zeros(size, dtype=np.int64)
    best[0] = 0.0
    for mask in range(1, size):
        low = mask & -mask
        rest = mask ^ low
        sub = rest
        while True:
            s = sub | low
            if ok[s]:
                c = cost[pop[s]] + best[mask ^ s]
                if c < best[mask]:
                    best[mask] = c
                    choice[mask] = s
            if sub == 0:
                break
            sub = (sub - 1) & rest
    return best, choice


_dp = njit(cache=True)(_dp_python) if njit is not None else _dp_python


def exact_partition(n: int, ok: np.ndarray) -> tuple[float, np.ndarray]:
    """Minimum of Eq. 1 (``n·H``) over partitions into sets with ``ok[mask]``; O(3^n) subset DP.

    Returns ``(n·H, labels)``.
    """
    pop = np.array([bin(m).count("1") for m in range(1 << n)], dtype=np.int64)
    best, choice = _dp(n, ok.astype(np.bool_), part_costs(n), pop)
    labels = np.empty(n, dtype=np.int64)
    mask, lab = (1 << n) - 1, 0
    while mask:
        s = int(choice[mask])
        for b in range(n):
            if s >> b & 1:
                labels[b] = lab
        lab += 1
        mask ^= s
    return float(best[(1 << n) - 1]), labels


def greedy_cover(member: np.ndarray) -> np.ndarray:
    """Greedy minimum-entropy cover: repeatedly take the candidate range holding the most uncovered points.

    ``member``: ``(n, m)`` bool, point i lies in candidate range j. Points in no range become singletons.
    Returns labels ``(n,)``. For the full family of respectful sets (as for maxima, where the candidates
    are the down-sets of the maximal points) this is the greedy of Cardinal, Fiorini & Joret ("Tight
    results on minimum entropy set cover", Algorithmica 2008), within 1 nat (log2 e bits) of optimal.
    """
    n = member.shape[0]
    labels = np.full(n, -1, dtype=np.int64)
    free = np.ones(n, dtype=bool)
    counts = member.sum(axis=0).astype(np.int64)
    lab = 0
    while free.any() and member.shape[1] and counts.max() > 0:
        j = int(np.argmax(counts))
        take = free & member[:, j]
        labels[take] = lab
        lab += 1
        free &= ~take
        counts -= member[take].sum(axis=0)
    rest = np.flatnonzero(labels < 0)
    labels[rest] = lab + np.arange(len(rest))
    return labels
