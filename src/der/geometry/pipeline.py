r"""``preprocess_then``: EntropyNet (+ the dedup step) then hull / Delaunay / maxima, timed and checked.

Sec. 4 / Table 2 / Table 22 pipeline: ``S → EntropyNet → dedup → algorithm``. The result carries the
algorithm's output, the timing breakdown (network incl. dedup, algorithm, total) and the error metrics
against the exact answer on the *input* (App. G.13): hull area symmetric difference (%), Hausdorff
distance of the hull regions, vertex-set recall; for maxima precision / recall / F1 of the maximal set.

Modes:

* ``"net"``   — the paper's pipeline with the torch EntropyNet (:meth:`EntropyNet.preprocess`).
* ``"fused"`` — the same network as folded float32 NumPy (:class:`~der.geometry.fast_infer.FusedEntropyNet`),
  optionally with the global max-pool over a subsample (``global_sample``).
* ``"prune"`` — no forward pass: the net's *learned ranges* (plane normals, or anchor directions from the
  anchors' centroid) drive an exact filter (:func:`~der.geometry.fast_infer.prune_hull`); the hull is
  unchanged, error 0 by construction. Delaunay needs every point, so ``"prune"`` is refused there.
* ``"none"``  — no preprocessing (the raw baseline through the same code path).

The algorithms: ``der.geometry.convex_hull`` (``hull_method``: qhull | chan | monotone | auto);
Delaunay and maxima use ``der.geometry.delaunay`` (``delaunay_method``, default ``"qhull"`` = SciPy as in
Table 23) / ``der.geometry.maxima`` when those modules exist,
otherwise SciPy's Delaunay and a small numba maxima routine (private shims below).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import numpy as np

from der._validate import as_points
from der.geometry.metrics import hull_errors

__all__ = ["PipelineResult", "preprocess_then", "learned_directions", "ALGORITHMS", "MODES"]

ALGORITHMS = ("hull", "delaunay", "maxima")
MODES = ("net", "fused", "prune", "none")


@dataclasses.dataclass
class PipelineResult:
    """What :func:`preprocess_then` returns.

    ``points``: the set the algorithm saw ``(m, d)``; ``index``: input row of each of them ``(m,)``;
    ``result``: the algorithm's output on ``points`` (hull: CCW vertex indices; delaunay: ``(t, 3)``
    simplices; maxima: indices); ``timings``: seconds (``network``, ``algorithm``, ``total``);
    ``errors``: metrics vs the exact answer on the input (empty when ``errors=False``).
    """

    algorithm: str
    mode: str
    points: np.ndarray
    index: np.ndarray
    result: np.ndarray
    timings: dict[str, float]
    errors: dict[str, float]

    @property
    def n_in(self) -> int:
        return int(self.timings.get("n_in", 0))

    @property
    def input_index(self) -> np.ndarray:
        """The result as input row indices (hull vertices / maxima); for Delaunay the simplices' rows."""
        return self.index[self.result]


@functools.lru_cache(maxsize=4)
def _default_net(surrogate: str):
    from der.geometry.entropynet import EntropyNet

    return EntropyNet.pretrained(surrogate=surrogate)


def _fused(net: Any, global_sample: int | None) -> Any:
    """Fold the net afresh on every call (cheap next to the forward pass), so a net trained further is never
    served stale."""
    from der.geometry.fast_infer import FusedEntropyNet

    return FusedEntropyNet(net, global_sample=global_sample)


def learned_directions(net) -> np.ndarray:
    """Directions ``(m, 2)`` from the net's learned ranges: ± plane normals (halfspace), anchor / box
    centre directions from their centroid (ball / box)."""
    reg = net.surrogate
    if reg.family == "halfspace":
        w = reg.normals.detach().double().numpy()
        return np.concatenate([w, -w])
    c = (reg.anchors if reg.family == "ball" else reg.centers).detach().double().numpy()
    return c - c.mean(0)


# --------------------------------------------------------------------------- algorithm shims
def _run_hull(p: np.ndarray, method: str) -> np.ndarray:
    from der.geometry.hull import convex_hull

    return convex_hull(p, method=method)


def _run_delaunay(p: np.ndarray, method: str = "qhull") -> np.ndarray:
    from der.geometry.delaunay import delaunay

    return np.asarray(delaunay(p, method=method))


def _run_maxima(p: np.ndarray) -> np.ndarray:
    """Indices of the maximal points (larger is better in every coordinate; duplicates all kept)."""
    from der.geometry.maxima import maxima

    return np.sort(np.asarray(maxima(p), dtype=np.int64))


# --------------------------------------------------------------------------- errors
def _errors(algorithm: str, pts: np.ndarray, res: PipelineResult, hull_method: str) -> dict[str, float]:
    if algorithm == "hull":
        return hull_errors(pts, res.points[res.result]) if len(res.result) >= 3 else {}
    if algorithm == "maxima":
        exact = set(_run_maxima(pts).tolist())
        got = set(res.index[res.result].tolist())
        tp = len(exact & got)
        prec, rec = tp / max(len(got), 1), tp / max(len(exact), 1)
        return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / max(prec + rec, 1e-300)}
    from der.geometry.metrics import hausdorff

    diag = float(np.linalg.norm(pts.max(0) - pts.min(0))) or 1.0
    out = {"points_hausdorff_rel": hausdorff(pts, res.points) / diag}
    out.update({f"hull_{k}": v for k, v in hull_errors(pts, res.points).items()})
    return out


# --------------------------------------------------------------------------- the pipeline
def preprocess_then(
    points: np.ndarray,
    algorithm: str = "hull",
    *,
    net: Any = None,
    mode: str = "fused",
    hull_method: str = "qhull",
    delaunay_method: str = "qhull",
    global_sample: int | None = None,
    errors: bool = True,
) -> PipelineResult:
    """EntropyNet (+ dedup) then ``algorithm`` on ``points: (n, d)`` (d = 2; maxima also d = 3 in
    ``"prune"`` / ``"none"`` modes). ``net`` defaults to ``EntropyNet.pretrained("ball")`` (cached).
    The default mode ``"fused"`` is the same network as ``"net"`` (equal to float32 rounding) with BatchNorm
    folded into plain BLAS products (:class:`der.geometry.fast_infer.FusedEntropyNet`), so it is faster.

    >>> import numpy as np
    >>> r = preprocess_then(np.random.default_rng(0).random((2000, 2)), "hull", mode="none")
    >>> r.errors["hull_area_symdiff_pct"], r.errors["vertex_recall"]
    (0.0, 1.0)
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "prune" and algorithm == "delaunay":
        raise ValueError("mode='prune' discards interior points, which Delaunay needs; use 'net' or 'fused'")
    d_ok = (2, 3) if algorithm == "maxima" and mode in ("prune", "none") else (2,)
    pts = as_points(points, None, min_rows=3 if algorithm != "maxima" else 1)
    if pts.shape[1] not in d_ok:
        raise ValueError(f"points must be (n, {' or '.join(map(str, d_ok))}) for {algorithm}/{mode}, "
                         f"got {pts.shape}")
    if mode != "none" and net is None and not (mode == "prune" and pts.shape[1] == 3):
        net = _default_net("ball")
    t0 = time.perf_counter()
    moved, index = _preprocess(pts, algorithm, mode, net, global_sample)
    t1 = time.perf_counter()
    if algorithm == "hull":
        result = _run_hull(moved, hull_method)
    elif algorithm == "delaunay":
        result = _run_delaunay(moved, delaunay_method)
    else:
        result = _run_maxima(moved)
    t2 = time.perf_counter()
    timings = {"network": t1 - t0, "algorithm": t2 - t1, "total": t2 - t0, "n_in": float(len(pts)),
               "n_out": float(len(moved))}
    res = PipelineResult(algorithm, mode, moved, index, result, timings, {})
    if errors:
        res.errors = _errors(algorithm, pts, res, hull_method)
    return res


def _preprocess(pts: np.ndarray, algorithm: str, mode: str, net: Any,
                global_sample: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The timed preprocessing step: ``(points the algorithm sees, their input rows)``."""
    from der.geometry.entropynet import grid_dedup

    if mode == "none":
        return pts, np.arange(len(pts), dtype=np.int64)
    if mode == "prune":
        from der.geometry.fast_infer import prune_hull, prune_maxima

        if algorithm == "hull":
            keep = prune_hull(pts, learned_directions(net))
        else:
            w = np.eye(pts.shape[1]) + 1.0 if net is None else np.abs(learned_directions(net))
            keep = prune_maxima(pts, w)
        return pts[keep], keep
    if mode == "net":
        moved, keep = net.preprocess(pts, return_index=True)
        return moved, keep
    lo = pts.min(0)
    scale = float((pts.max(0) - lo).max()) or 1.0
    moved = lo + _fused(net, global_sample).displace((pts - lo) / scale) * scale
    keep = grid_dedup(moved, net.config.dedup_grid, lo, scale)
    return np.ascontiguousarray(moved[keep]), keep
