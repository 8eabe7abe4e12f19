"""Schedules for the regularizer: temperature anneal and the λ window (App. A, G.11)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ANCHOR_RULES", "LambdaWindow", "alpha_schedule", "anchor_heuristic", "cosine_anneal", "icbrt"]

# One anchor-count rule per name; "lite" (the regularizer's old name) and "cbrt" (attention's) are one rule.
ANCHOR_RULES = ("sqrt", "geometry", "cbrt", "lite")


def cosine_anneal(step: int, start: float, end: float, steps: int) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ≥ ``steps``).

    App. A / G.11: α is cosine-annealed from 10 to 5 over the first half of regularized training.
    """
    if steps <= 0:
        return float(end)
    t = min(max(step, 0) / steps, 1.0)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t)))


def alpha_schedule(step: int, alpha: float, alpha_final: float | None, anneal_steps: int | None) -> float:
    """α after ``step`` schedule steps: constant ``alpha``, or :func:`cosine_anneal` to ``alpha_final``
    over ``anneal_steps`` steps (``alpha_final=None`` or ``anneal_steps`` 0/None: no anneal)."""
    if alpha_final is None or not anneal_steps:
        return float(alpha)
    return cosine_anneal(step, alpha, alpha_final, anneal_steps)


@dataclass(frozen=True)
class LambdaWindow:
    """λ(t) = ``lam`` for ``start ≤ t < stop`` (``stop=None``: no end), else 0 (App. G.11: epochs 20–60)."""

    lam: float
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be finite and ≥ 0, got {self.lam}")
        if self.start < 0 or (self.stop is not None and self.stop < self.start):
            raise ValueError(f"need 0 ≤ start ≤ stop, got start={self.start}, stop={self.stop}")

    def __call__(self, step: int) -> float:
        active = step >= self.start and (self.stop is None or step < self.stop)
        return self.lam if active else 0.0


def icbrt(n: int) -> int:
    """⌈n^{1/3}⌉ in exact integer arithmetic (no float rounding at perfect cubes)."""
    r = max(0, round(n ** (1.0 / 3.0)))
    while r**3 < n:
        r += 1
    while r > 0 and (r - 1) ** 3 >= n:
        r -= 1
    return r


def anchor_heuristic(n: int, rule: str = "geometry", minimum: int = 1) -> int:
    """Number of anchors from the paper's heuristics (App. A, G.10), at least ``minimum``.

    ``"sqrt"``: ⌊√N⌋ (attention); ``"geometry"``: min(16, ⌊n/4⌋); ``"cbrt"`` (alias ``"lite"``):
    ⌈N^{1/3}⌉ (H_diff-lite). The attention handle uses ``minimum=2`` so that H can be > 0.
    """
    if n < 1:
        raise ValueError(f"need n ≥ 1 points, got {n}")
    if rule == "sqrt":
        k = math.isqrt(n)
    elif rule == "geometry":
        k = min(16, n // 4)
    elif rule in ("cbrt", "lite"):
        k = icbrt(n)
    else:
        raise ValueError(f"rule must be one of {ANCHOR_RULES}, got {rule!r}")
    return max(minimum, k)
