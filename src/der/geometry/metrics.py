r"""Geometric error metrics for preprocessed point sets (App. G.13).

The paper measures "symmetric difference for hull area, Hausdorff distance for point sets". Here:

* :func:`hull_area_symdiff_pct` — ``100 · area(A Δ B) / area(A)`` for the convex hulls ``A`` of the
  reference set and ``B`` of the preprocessed set (exact: convex-polygon clipping, float64).
* :func:`hull_hausdorff` — Hausdorff distance between the two hull *regions*; for convex polygons it is
  attained at a vertex, so it is exact from the vertices and point-to-polygon distances.
* :func:`hausdorff` — Hausdorff distance between two finite point sets (k-d tree, exact).
* :func:`vertex_recall` — fraction of the reference hull's vertices that have a vertex of the other hull
  within ``tol · diag`` (``diag`` = bounding-box diagonal of the reference set).

All take plain ``(n, 2)`` float arrays (or ``(h, 2)`` polygons in counter-clockwise order).
"""

from __future__ import annotations

import numpy as np

from der._validate import as_points

__all__ = [
    "polygon_area",
    "hull_polygon",
    "hull_area_symdiff_pct",
    "hull_hausdorff",
    "hausdorff",
    "vertex_recall",
    "hull_errors",
]


def polygon_area(poly: np.ndarray) -> float:
    """Signed shoelace area of a polygon ``(h, 2)`` (positive when counter-clockwise)."""
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def hull_polygon(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise convex hull vertices ``(h, 2)`` of ``points``: the exact monotone chain of
    :func:`der.geometry.convex_hull` (``method="monotone"``). Degenerate input (all collinear / one point)
    gives ``h ≤ 2``."""
    from der.geometry.hull import convex_hull

    pts = as_points(points, 2, min_rows=1)
    return pts[convex_hull(pts, method="monotone")]


def _clip(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Sutherland–Hodgman: ``subject ∩ clip`` for a convex CCW ``clip`` polygon."""
    out = subject
    for i in range(len(clip)):
        if len(out) == 0:
            break
        a, b = clip[i], clip[(i + 1) % len(clip)]
        ex, ey = b - a
        side = ex * (out[:, 1] - a[1]) - ey * (out[:, 0] - a[0])  # ≥ 0: inside (left of a→b)
        nxt: list[np.ndarray] = []
        for j in range(len(out)):
            p, q = out[j], out[(j + 1) % len(out)]
            sp, sq = side[j], side[(j + 1) % len(out)]
            if sp >= 0:
                nxt.append(p)
            if (sp >= 0) != (sq >= 0):
                t = sp / (sp - sq)
                nxt.append(p + t * (q - p))
        out = np.array(nxt, dtype=np.float64).reshape(-1, 2)
    return out


def hull_area_symdiff_pct(reference: np.ndarray, other: np.ndarray) -> float:
    """``100 · area(hull(ref) Δ hull(other)) / area(hull(ref))`` in percent (App. G.13)."""
    a, b = hull_polygon(reference), hull_polygon(other)
    area_a = polygon_area(a)
    if area_a <= 0:
        raise ValueError("reference points have a degenerate hull (zero area); area error is undefined")
    area_b = polygon_area(b) if len(b) >= 3 else 0.0
    inter = polygon_area(_clip(a, b)) if len(b) >= 3 else 0.0
    return 100.0 * max(area_a + area_b - 2.0 * inter, 0.0) / area_a


def _dist_to_convex(pts: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Euclidean distance of each point to the convex CCW region ``poly`` (0 inside)."""
    if len(poly) == 1:
        return np.linalg.norm(pts - poly[0], axis=1)
    a = poly
    b = np.roll(poly, -1, axis=0)
    if len(poly) == 2:  # a segment: one edge, not a closed polygon
        a, b = poly[:1], poly[1:]
    ab = b - a  # (h, 2)
    ap = pts[:, None, :] - a[None]  # (n, h, 2)
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-300), 0.0, 1.0)
    seg = np.linalg.norm(ap - t[..., None] * ab, axis=-1).min(axis=1)
    if len(poly) < 3:
        return seg
    inside = ((ab[None, :, 0] * ap[..., 1] - ab[None, :, 1] * ap[..., 0]) >= 0).all(axis=1)
    return np.where(inside, 0.0, seg)


def hull_hausdorff(reference: np.ndarray, other: np.ndarray) -> float:
    """Hausdorff distance between the hull regions of two point sets (exact for convex polygons)."""
    a, b = hull_polygon(reference), hull_polygon(other)
    return float(max(_dist_to_convex(a, b).max(), _dist_to_convex(b, a).max()))


def hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Hausdorff distance between finite point sets ``a: (n, d)`` and ``b: (m, d)``."""
    from scipy.spatial import cKDTree

    a = as_points(a, None, "a", min_rows=1)
    b = as_points(b, a.shape[1], "b", min_rows=1)
    return float(max(cKDTree(b).query(a)[0].max(), cKDTree(a).query(b)[0].max()))


def vertex_recall(reference: np.ndarray, other: np.ndarray, tol: float = 1e-3) -> float:
    """Fraction of hull(reference) vertices with a hull(other) vertex within ``tol · diag``."""
    ref = as_points(reference, 2, "reference", min_rows=1)
    a, b = hull_polygon(ref), hull_polygon(other)
    diag = float(np.linalg.norm(ref.max(0) - ref.min(0)))
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1).min(axis=1)
    return float((d <= tol * diag).mean())


def hull_errors(reference: np.ndarray, other: np.ndarray, tol: float = 1e-3) -> dict[str, float]:
    """All hull metrics at once: area symmetric difference (%), region Hausdorff (absolute and relative
    to the bounding-box diagonal), and vertex recall at ``tol``."""
    ref = as_points(reference, 2, "reference", min_rows=1)
    diag = float(np.linalg.norm(ref.max(0) - ref.min(0))) or 1.0
    h = hull_hausdorff(ref, other)
    return {
        "hull_area_symdiff_pct": hull_area_symdiff_pct(ref, other),
        "hausdorff": h,
        "hausdorff_rel": h / diag,
        "vertex_recall": vertex_recall(ref, other, tol),
    }
