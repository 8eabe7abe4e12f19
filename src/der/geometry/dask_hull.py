"""Convex hulls of point sets larger than memory, from a Dask array (chunk hulls, then one merge).

The hull of a union is the hull of the union of hulls, so each row-chunk is reduced to its own hull
vertices (with :func:`der.geometry.convex_hull`, any method) and the final hull is taken over those
candidates only. Chunks are loaded one task at a time by Dask's scheduler, so peak memory is about
(workers x chunk size) plus the candidates; the candidates are small unless nearly every point is a
hull vertex (points on a circle), where they are as large as the input itself.
"""

from __future__ import annotations

import numpy as np

from der.geometry.hull import convex_hull

__all__ = ["convex_hull_dask"]


def _chunk_hull(block: np.ndarray, offset: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    v = convex_hull(block, method)
    return v + offset, np.asarray(block, dtype=np.float64)[v]


def convex_hull_dask(points, method: str = "auto", scheduler: str | None = None) -> np.ndarray:
    """Global ``int64`` indices of the hull vertices of a (n, 2) Dask (or NumPy) array, CCW from the
    lexicographic minimum; same result as :func:`der.geometry.convex_hull` on the whole array.

    ``method`` is used per chunk and for the merge; ``scheduler`` is passed to ``dask.compute``.
    Bad chunks (NaN/Inf) raise ``ValueError`` when they are computed.
    """
    import dask
    import dask.array as da

    if not isinstance(points, da.Array):
        return convex_hull(points, method)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be (n, 2), got shape {points.shape}")
    x = points.rechunk({1: 2})
    blocks = x.to_delayed().ravel()
    offsets = np.concatenate([[0], np.cumsum(x.chunks[0])[:-1]]).astype(np.int64)
    tasks = [dask.delayed(_chunk_hull)(b, int(o), method) for b, o in zip(blocks, offsets, strict=True)]
    parts = dask.compute(*tasks, scheduler=scheduler)
    if not parts:
        return np.zeros(0, dtype=np.int64)
    idx = np.concatenate([p[0] for p in parts])
    pts = np.concatenate([p[1] for p in parts]).reshape(-1, 2)
    return idx[convex_hull(pts, method)]
