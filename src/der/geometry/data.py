r"""Point-set generators and preprocessing for the geometry experiments (paper §5.1, App. G.12).

Every generator returns a C-contiguous ``float64`` array of shape ``(n, 2)`` and is deterministic
given ``seed`` (``numpy.random.default_rng(seed)``; ``seed=None`` draws fresh entropy).

Distributions (``DISTRIBUTIONS``):

* ``"square"``   -- uniform in :math:`[0, 1]^2` (App. G.12 "Synthetic Uniform").
* ``"disk"``     -- uniform in the unit disk centred at the origin.
* ``"gaussian"`` -- standard normal :math:`\mathcal N(0, I_2)`.
* ``"parabola"`` -- App. G.12 "Synthetic Parabolic": :math:`x \sim U[-1, 1]`,
  :math:`y = x^2 + \sigma\,\varepsilon`, :math:`\varepsilon \sim \mathcal N(0, 1)` with
  :math:`\sigma` = ``noise`` = 0.01 by default, i.e. additive Gaussian noise with *standard deviation*
  0.01 (variance :math:`10^{-4}`). The paper writes :math:`\mathcal N(0, 0.01)` without saying whether
  0.01 is the variance or the standard deviation; we read it as the standard deviation.
* ``"clustered"`` -- ``k`` isotropic Gaussian blobs (std ``spread``) with centres uniform in
  :math:`[0, 1]^2` and equal expected sizes.
* ``"circle"``   -- points on the unit circle at uniform random angles: the worst case for hull
  algorithms (up to floating-point rounding every point is a hull vertex).

Preprocessing (App. G.12): :func:`normalize_unit_square` and :func:`dedup`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from der._validate import as_points

__all__ = [
    "DISTRIBUTIONS",
    "check_points",
    "circle",
    "clustered",
    "dedup",
    "gaussian",
    "generate",
    "normalize_unit_square",
    "parabola",
    "uniform_disk",
    "uniform_square",
]


def check_points(
    points, dim: int | tuple[int, ...] = 2, name: str = "points", check_finite: bool = True
) -> np.ndarray:
    """``points`` as a finite C-contiguous float64 ``(n, dim)`` array (:func:`der._validate.as_points`)."""
    return as_points(points, dim, name, check_finite=check_finite)


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return int(n)


def uniform_square(n: int, seed: int | None = None) -> np.ndarray:
    """``n`` points uniform in ``[0, 1]^2`` (App. G.12 "Synthetic Uniform")."""
    return np.random.default_rng(seed).random((_check_n(n), 2))


def uniform_disk(n: int, seed: int | None = None) -> np.ndarray:
    """``n`` points uniform in the unit disk (radius ``sqrt(U)``, uniform angle)."""
    rng = np.random.default_rng(seed)
    n = _check_n(n)
    r = np.sqrt(rng.random(n))
    t = rng.uniform(0.0, 2.0 * np.pi, n)
    return np.ascontiguousarray(np.column_stack([r * np.cos(t), r * np.sin(t)]))


def gaussian(n: int, seed: int | None = None) -> np.ndarray:
    """``n`` points from the standard bivariate normal."""
    return np.random.default_rng(seed).standard_normal((_check_n(n), 2))


def parabola(n: int, seed: int | None = None, noise: float = 0.01) -> np.ndarray:
    r"""App. G.12 parabola: :math:`x \sim U[-1,1]`, :math:`y = x^2 + \mathrm{noise}\cdot\mathcal N(0,1)`.

    ``noise`` is the standard deviation of the additive Gaussian noise on ``y`` (default 0.01).
    """
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite non-negative std, got {noise!r}")
    rng = np.random.default_rng(seed)
    n = _check_n(n)
    x = rng.uniform(-1.0, 1.0, n)
    y = x * x + noise * rng.standard_normal(n)
    return np.ascontiguousarray(np.column_stack([x, y]))


def clustered(n: int, seed: int | None = None, k: int = 10, spread: float = 0.02) -> np.ndarray:
    """``n`` points in ``k`` Gaussian blobs (std ``spread``) with centres uniform in ``[0, 1]^2``."""
    if k < 1 or not np.isfinite(spread) or spread < 0:
        raise ValueError(f"need k >= 1 and a finite spread >= 0, got k={k!r}, spread={spread!r}")
    rng = np.random.default_rng(seed)
    n = _check_n(n)
    centres = rng.random((k, 2))
    labels = rng.integers(0, k, n)
    return np.ascontiguousarray(centres[labels] + spread * rng.standard_normal((n, 2)))


def circle(n: int, seed: int | None = None) -> np.ndarray:
    """``n`` points on the unit circle at uniform random angles (hull worst case: h ~ n)."""
    t = np.random.default_rng(seed).uniform(0.0, 2.0 * np.pi, _check_n(n))
    return np.ascontiguousarray(np.column_stack([np.cos(t), np.sin(t)]))


DISTRIBUTIONS: dict[str, Callable[..., np.ndarray]] = {
    "square": uniform_square,
    "disk": uniform_disk,
    "gaussian": gaussian,
    "parabola": parabola,
    "clustered": clustered,
    "circle": circle,
}


def generate(name: str, n: int, seed: int | None = None, **kwargs) -> np.ndarray:
    """Generate ``n`` points from the distribution ``name`` (a key of ``DISTRIBUTIONS``).

    Extra keyword arguments go to the generator (e.g. ``noise`` for ``"parabola"``).

    >>> generate("parabola", 4, seed=0).shape
    (4, 2)
    """
    if name not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {name!r}; expected one of {sorted(DISTRIBUTIONS)}")
    return DISTRIBUTIONS[name](n, seed, **kwargs)


def normalize_unit_square(points, keep_aspect: bool = False) -> np.ndarray:
    """Affinely map ``points`` (n, d) into ``[0, 1]^d`` (App. G.12 preprocessing).

    Per-axis min-max scaling by default; ``keep_aspect=True`` uses one scale for all axes (the
    largest extent), so shapes are not stretched. A constant axis maps to 0. Returns a new array.
    """
    arr = check_points(points, dim=tuple(range(1, 65)))
    if len(arr) == 0:
        return arr.copy()
    lo = arr.min(axis=0)
    ext = arr.max(axis=0) - lo
    if keep_aspect:
        ext = np.full_like(ext, ext.max())
    scale = np.where(ext > 0, ext, 1.0)
    return np.clip((arr - lo) / scale, 0.0, 1.0)


def dedup(points, return_index: bool = False):
    """Remove exactly repeated rows, keeping the first occurrence and the original order.

    Returns the unique points (m, d), and with ``return_index=True`` also the kept row indices (m,).
    ``-0.0`` and ``0.0`` are treated as equal.
    """
    arr = check_points(points, dim=tuple(range(1, 65))) + 0.0  # + 0.0 turns -0.0 into 0.0
    if len(arr) == 0:
        idx = np.zeros(0, dtype=np.int64)
    else:
        order = np.lexsort(arr.T[::-1])
        srt = arr[order]
        new = np.ones(len(arr), dtype=bool)
        new[1:] = np.any(srt[1:] != srt[:-1], axis=1)
        # lexsort is stable, so the first row of each run of equal rows has the smallest index
        idx = np.sort(order[new]).astype(np.int64)
    out = np.ascontiguousarray(arr[idx])
    return (out, idx) if return_index else out


# ``der.geometry.data`` goes through the package's lazy table, which looks up the attribute ``data``
# on this module: make that the module itself.
data = sys.modules[__name__]
