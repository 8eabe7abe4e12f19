"""Convex hulls of point sets larger than memory: a Dask array, or a memory-mapped ``.npy`` in chunks.

The hull of a union is the hull of the union of hulls, so each row-chunk is reduced to its own hull
vertices (with :func:`der.geometry.convex_hull`, any method) and the final hull is taken over those
candidates only. :func:`convex_hull_dask`: chunks are loaded one task at a time by Dask's scheduler,
so peak memory is about (workers x chunk size) plus the candidates; the candidates are small unless
nearly every point is a hull vertex (points on a circle), where they are as large as the input.
:func:`convex_hull_chunked` streams row-chunks of any array-like (``np.load(path, mmap_mode="r")``,
or a path to a ``.npy`` file) in one thread and folds each chunk's hull into the running hull, so
peak memory is one chunk plus the hull, whatever the input size.
"""

from __future__ import annotations

import os

import numpy as np

from der.geometry.hull import convex_hull

__all__ = ["convex_hull_chunked", "convex_hull_dask"]


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


def convex_hull_chunked(points, chunk_rows: int = 1 << 22, method: str = "auto",
                        progress: bool = False) -> np.ndarray:
    """Global ``int64`` hull indices (CCW from the lexicographic minimum) of a (n, 2) array-like read
    ``chunk_rows`` rows at a time; same result as :func:`der.geometry.convex_hull` on the whole array
    for ``method`` ``"auto"`` or ``"monotone"`` (of exact duplicates the smallest index is kept).

    points: a path to a ``.npy`` file (opened memory-mapped) or an array-like with ``shape`` and
    row slicing (``numpy.memmap``, ``h5py`` dataset ...). ``progress``: a ``tqdm`` bar over rows.
    """
    if isinstance(points, (str, os.PathLike)):
        points = np.load(points, mmap_mode="r")
    shape = getattr(points, "shape", None)
    if shape is None or len(shape) != 2 or shape[1] != 2:
        raise ValueError(f"points must be (n, 2), got shape {shape}")
    if not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 3:
        raise ValueError(f"chunk_rows must be an int >= 3, got {chunk_rows!r}")
    n = int(shape[0])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="pt", unit_scale=True, desc="convex hull")
    idx = np.zeros(0, dtype=np.int64)
    pts = np.zeros((0, 2))
    try:
        for lo in range(0, n, chunk_rows):
            v, p = _chunk_hull(np.asarray(points[lo : lo + chunk_rows]), lo, method)
            # candidates in increasing global index, so the merge keeps the smallest duplicate
            idx, pts = np.concatenate([idx, v]), np.concatenate([pts, p])
            keep = convex_hull(pts, method)
            idx, pts = idx[keep], pts[keep]
            order = np.argsort(idx, kind="stable")
            idx, pts = idx[order], pts[order]
            if bar is not None:
                bar.update(min(chunk_rows, n - lo))
    finally:
        if bar is not None:
            bar.close()
    if len(idx) == 0:
        return idx
    return idx[convex_hull(pts, method)]
