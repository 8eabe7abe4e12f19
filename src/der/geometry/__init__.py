"""Geometry: exact hull / Delaunay / maxima, data generators, EntropyNet and its pipeline.

Plain functions on ``(n, d)`` float arrays returning indices, in the manner of ``scipy.spatial``.
"""

from der._lazy import lazy_getattr

_TABLE = {
    "convex_hull": ".hull",
    "delaunay": ".delaunay",
    "maxima": ".maxima",
    "EntropyNet": ".entropynet",
    "preprocess_then": ".pipeline",
    "data": ".data",
    "convex_hull_dask": ".dask_hull",
}
__all__ = sorted(_TABLE)
__getattr__ = lazy_getattr(__name__, _TABLE)
