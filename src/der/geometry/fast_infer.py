r"""Cheap CPU inference paths for EntropyNet and the exact range-pruning filter.

Three things live here:

* :class:`FusedEntropyNet` — the eval-mode EntropyNet as plain float32 NumPy/BLAS: BatchNorm folded into
  the linear layers, and the output MLP's first layer split so the tiled global feature costs one
  ``(C,) @ (C, 128)`` product per set instead of one per point (``W [F; G] = W_F F + W_G G``). Optionally
  the global max-pool is taken over a random subsample of ``global_sample`` points (an approximation; the
  per-point moves are still computed for every point). Numerically equal to the torch model in eval mode
  up to float32 rounding (tested).
* :func:`prune_hull` — the exact filter that uses the *learned ranges* (the surrogate's plane normals or
  anchor directions) as in the exact pipeline: the extreme input point along each direction is a hull
  vertex, so every point strictly inside their convex polygon can be discarded without changing the hull
  (Akl–Toussaint). One fused numba pass for the extremes, one for the inside test.
* :func:`first_in_cell` — O(n) grid dedup (the paper's dedup step on a grid) with a bitmap when the grid is
  small enough, otherwise a sort.
"""

from __future__ import annotations

import numba
import numpy as np

from der.geometry.maxima import _dominated

__all__ = ["FusedEntropyNet", "first_in_cell", "prune_hull", "prune_maxima"]

_BITMAP_LIMIT = 1 << 26  # cells; 64 MiB of bools at most


@numba.njit(cache=True)
def _first_in_cell_bitmap(cells: np.ndarray, lo: np.ndarray, ext: np.ndarray) -> np.ndarray:
    n, d = cells.shape
    seen = np.zeros(int(np.prod(ext)), dtype=np.bool_)
    keep = np.empty(n, dtype=np.int64)
    m = 0
    for i in range(n):
        key = 0
        for j in range(d):
            key = key * ext[j] + (cells[i, j] - lo[j])
        if not seen[key]:
            seen[key] = True
            keep[m] = i
            m += 1
    return keep[:m]


def first_in_cell(cells: np.ndarray) -> np.ndarray:
    """Sorted indices of the first row of each distinct integer row of ``cells: (n, d) int64``."""
    cells = np.ascontiguousarray(cells, dtype=np.int64)
    if len(cells) == 0:
        return np.zeros(0, dtype=np.int64)
    lo = cells.min(0)
    ext = cells.max(0) - lo + 1
    if float(np.prod(ext.astype(np.float64))) <= _BITMAP_LIMIT:
        return _first_in_cell_bitmap(cells, lo, ext)
    _, idx = np.unique(cells, axis=0, return_index=True)
    return np.sort(idx).astype(np.int64)


# --------------------------------------------------------------------------- exact range pruning (hull)
@numba.njit(cache=True)
def _extremes(p: np.ndarray, w: np.ndarray) -> np.ndarray:
    n, m = p.shape[0], w.shape[0]
    best = np.full(m, -np.inf)
    arg = np.zeros(m, dtype=np.int64)
    for i in range(n):
        x, y = p[i, 0], p[i, 1]
        for j in range(m):
            v = x * w[j, 0] + y * w[j, 1]
            if v > best[j]:
                best[j] = v
                arg[j] = i
    return arg


@numba.njit(cache=True)
def _not_strictly_inside(p: np.ndarray, poly: np.ndarray, margin: float) -> np.ndarray:
    """Indices of points not *provably* strictly inside the convex CCW polygon ``poly``: a point is
    dropped only if it is left of every edge by more than ``margin · |edge|`` (a rounding-error bound)."""
    n, h = p.shape[0], poly.shape[0]
    ex = np.empty(h)
    ey = np.empty(h)
    thr = np.empty(h)
    for k in range(h):
        ex[k] = poly[(k + 1) % h, 0] - poly[k, 0]
        ey[k] = poly[(k + 1) % h, 1] - poly[k, 1]
        thr[k] = margin * (abs(ex[k]) + abs(ey[k]))
    keep = np.empty(n, dtype=np.int64)
    m = 0
    for i in range(n):
        x, y = p[i, 0], p[i, 1]
        for k in range(h):
            if ex[k] * (y - poly[k, 1]) - ey[k] * (x - poly[k, 0]) <= thr[k]:
                keep[m] = i
                m += 1
                break
    return keep[:m]


def prune_hull(points: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Exact hull filter with the learned ranges: sorted indices of the points that may be hull vertices.

    The extreme points along ``directions: (m, 2)`` (sorted by angle) are hull vertices and form a convex
    CCW polygon; every point provably strictly inside it is dropped (float test with a 64-ulp margin
    relative to the coordinate scale), so ``hull(points[idx]) == hull(points)`` for any directions.
    """
    p = np.ascontiguousarray(points, np.float64)
    w = np.asarray(directions, np.float64)
    w = w[np.argsort(np.arctan2(w[:, 1], w[:, 0]))]
    ext = _extremes(p, np.ascontiguousarray(w))
    q = ext[np.r_[True, ext[1:] != ext[:-1]]]
    if len(q) > 1 and q[0] == q[-1]:
        q = q[:-1]
    poly = p[q]
    same = (poly == np.roll(poly, -1, axis=0)).all(1)
    poly = np.ascontiguousarray(poly[~same])
    if len(poly) < 3:
        return np.arange(len(p), dtype=np.int64)
    margin = 64 * np.finfo(np.float64).eps * max(float(np.abs(p).max()), 1e-300)
    return _not_strictly_inside(p, poly, margin)


# --------------------------------------------------------------------------- exact pruning (maxima)
@numba.njit(cache=True)
def _argmax_dots(p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``argmax_i p_i · w_j`` for each row ``w_j`` in one pass (no BLAS: a (n, d) @ (d, m) product with
    tiny d, m is slow and thread-hungry in BLAS)."""
    n, d = p.shape
    m = w.shape[0]
    best = np.full(m, -np.inf)
    arg = np.zeros(m, dtype=np.int64)
    for i in range(n):
        for j in range(m):
            v = 0.0
            for t in range(d):
                v += p[i, t] * w[j, t]
            if v > best[j]:
                best[j] = v
                arg[j] = i
    return arg


def prune_maxima(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Exact maxima filter (larger is better in every coordinate, d = 2 or 3): the maximizer of
    ``points @ w`` for a positive ``w`` is a maximal point, so every point it strictly dominates can go.
    Returns sorted kept indices."""
    p = np.ascontiguousarray(points, np.float64)
    w = np.ascontiguousarray(np.abs(np.asarray(weights, np.float64)) + 1e-12)
    pivots = p[np.unique(_argmax_dots(p, w))]
    return np.flatnonzero(~_dominated(p, np.ascontiguousarray(pivots)))


# --------------------------------------------------------------------------- fused network
class FusedEntropyNet:
    """Eval-mode EntropyNet as folded float32 matrices (see the module docstring)."""

    def __init__(self, net, global_sample: int | None = None, seed: int = 0) -> None:
        import torch

        def fold(block) -> tuple[np.ndarray, np.ndarray]:
            lin, bn = block[0], block[1]
            s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
            w = (lin.weight.detach() * s[:, None]).T
            b = (lin.bias.detach() - bn.running_mean) * s + bn.bias.detach()
            return np.ascontiguousarray(w.numpy(), np.float32), b.numpy().astype(np.float32)

        self.layers = [fold(b) for b in net.point_mlp]
        wh, self.bh = fold(net.head)
        c = net.config.widths[-1]
        self.wf, self.wg = np.ascontiguousarray(wh[:c]), np.ascontiguousarray(wh[c:])
        self.wo = np.ascontiguousarray(net.out.weight.detach().numpy().T, np.float32)
        self.bo = net.out.bias.detach().numpy().astype(np.float32)
        self.sigma = np.float32(net.config.sigma)
        self.global_sample = global_sample
        self.rng = np.random.default_rng(seed)

    def _features(self, x: np.ndarray) -> np.ndarray:
        for w, b in self.layers:
            x = x @ w
            x += b
            np.maximum(x, 0, out=x)
        return x

    def displace(self, x: np.ndarray, chunk: int = 32768) -> np.ndarray:
        """``S + σ tanh(Δ)`` for one normalized set ``x: (n, d)`` (float64 in, float64 out)."""
        x32 = np.ascontiguousarray(x, np.float32)
        n = len(x32)
        src = x32
        if self.global_sample is not None and n > self.global_sample:
            src = x32[self.rng.choice(n, self.global_sample, replace=False)]
        g = np.max([self._features(src[i : i + chunk]).max(0) for i in range(0, len(src), chunk)], axis=0)
        gb = g @ self.wg + self.bh
        out = np.empty_like(x32)
        for i in range(0, n, chunk):
            h = self._features(x32[i : i + chunk]) @ self.wf
            h += gb
            np.maximum(h, 0, out=h)
            out[i : i + chunk] = x32[i : i + chunk] + self.sigma * np.tanh(h @ self.wo + self.bo)
        return out.astype(np.float64)
