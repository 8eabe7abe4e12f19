r"""``der exp entropynet-ablations --which k|estimator|fixed|alpha|lambda|taskloss|baselines|figure [--quick]``.

The paper's EntropyNet ablations, each by one command (App. E.5, F.2, G.6):

* ``k`` — anchor count k ∈ {8, 16, 32, 64} (Table 16);
* ``estimator`` — ball (H_diff) / halfspace (H_soft) / box surrogates (Table 15);
* ``fixed`` — learned vs fixed (k-means++-seeded, frozen) anchors (Table 17);
* ``alpha`` — α = 1 vs the default 10 → 5 (Table 17);
* ``lambda`` — λ ∈ {0.01, 0.03, 0.1, 0.3, 1.0} (Fig. 6 and Table 17's λ = 1.0);
* ``taskloss`` — (ours) the fidelity weight of the task loss, w_fid ∈ {1, 0.1, 0}: with w_fid = 0 only
  the hull vertices and the hull itself are held, every interior point is free for the entropy term;
* ``baselines`` — heuristic sort, NeuralSort-at-inference (a hard sort by a 1-D score: at inference
  NeuralSort's relaxed permutation becomes an argsort, so its cost is a sort; we train no NeuralSort
  model), k-means preprocessing (every point moved ≤ σ toward its k-means++ centre, then the same grid
  dedup), the grid dedup alone, and the exact prune with fixed directions (Table 20);
* ``figure`` — points before / after the shipped network (Fig. 10) → ``benchmarks/results/entropynet_fig10.png``.

Each trained variant is evaluated by the same code: the fused network + dedup → QHull on fresh uniform and
parabolic sets, speedup vs raw QHull in the same process (median of repeats, network time included), hull
area error (%), kept fraction, and the surrogate entropy reduction ``1 − H(S')/H(S)`` under the net's own
anchors / planes. ``--quick`` trains small nets (widths 16-32-64, head 32) for a few steps: it checks the
machinery and the direction of each effect, not the paper's absolute numbers. Output:
``benchmarks/results/entropynet_ablation_<which>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from der_lab.harness import Run, median_time, results_dir

__all__ = ["run_training", "run_baselines", "figure", "main"]

WHICH = ("k", "estimator", "fixed", "alpha", "lambda", "taskloss", "baselines", "figure")


def _base(quick: bool):
    from der.geometry.train import TrainConfig

    if quick:
        return TrainConfig(epochs=4, clouds_per_epoch=64, batch=16, n_points=256, widths=(16, 32, 64), head=32)
    return TrainConfig()


def _variants(which: str, quick: bool) -> list[tuple[str, Any]]:
    b = _base(quick)
    rep = dataclasses.replace
    if which == "k":
        return [(f"k={k}", rep(b, num_anchors=k)) for k in (8, 16, 32, 64)]
    if which == "estimator":
        return [(s, rep(b, surrogate=s)) for s in ("ball", "halfspace", "box")]
    if which == "fixed":
        return [("learned anchors", b), ("fixed anchors", rep(b, fixed_ranges=True))]
    if which == "alpha":
        return [("alpha 10->5", b), ("alpha=1", rep(b, alpha=1.0, alpha_final=1.0))]
    if which == "lambda":
        return [(f"lambda={lam:g}", rep(b, lam=lam)) for lam in (0.01, 0.03, 0.1, 0.3, 1.0)]
    if which == "taskloss":  # ours, not the paper's: does the fidelity term hold the entropy term back?
        return [(f"w_fid={w:g}", rep(b, w_fid=w)) for w in (1.0, 0.1, 0.0)]
    raise ValueError(f"no training variants for {which!r}")


def _eval_sets(n: int) -> dict[str, np.ndarray]:
    from der.geometry import data

    return {d: data.generate(d, n, seed=2024) for d in ("square", "parabola")}


def _score(name: str, pre, sets: dict[str, np.ndarray], repeats: int, extra: dict | None = None) -> list[dict]:
    """Time ``pre(points) -> kept points`` + QHull against raw QHull on each set; hull error vs input."""
    from scipy.spatial import ConvexHull

    from der.geometry.metrics import hull_area_symdiff_pct

    def pipeline(p: np.ndarray) -> np.ndarray:
        kept = pre(p)
        ConvexHull(kept)
        return kept

    rows = []
    for dist, p in sets.items():
        raw, _ = median_time(lambda p=p: ConvexHull(p).vertices, repeats)
        t, kept = median_time(lambda p=p: pipeline(p), repeats)
        rows.append({"variant": name, "dist": dist, "n": len(p), "speedup": raw / t, "raw_ms": 1e3 * raw,
                     "total_ms": 1e3 * t, "kept_frac": len(kept) / len(p),
                     "hull_err_pct": hull_area_symdiff_pct(p, kept), **(extra or {})})
    return rows


def _entropy_reduction(net, p: np.ndarray) -> float:
    lo = p.min(0)
    s = float((p.max(0) - lo).max()) or 1.0
    x = (p - lo) / s
    with torch.no_grad():
        h0 = float(net.surrogate(torch.tensor(x, dtype=torch.float32)))
        h1 = float(net.surrogate(torch.tensor(net.displace_numpy(x), dtype=torch.float32)))
    return 1.0 - h1 / h0 if h0 > 0 else 0.0


def _net_pre(net):
    from der.geometry.pipeline import preprocess_then

    return lambda p: preprocess_then(p, "hull", net=net, mode="fused", errors=False).points


def run_training(which: str, quick: bool, n_eval: int, repeats: int, out_root: Path) -> list[dict]:
    from der.geometry.train import train

    rows = []
    sets = _eval_sets(n_eval)
    for name, cfg in _variants(which, quick):
        t0 = time.perf_counter()
        net, metrics = train(cfg, out_root / name.replace(" ", "_").replace("=", ""), progress=False, resume=False)
        train_min = (time.perf_counter() - t0) / 60
        extra = {"train_min": train_min, "entropy_reduction": _entropy_reduction(net, sets["square"]),
                 "config": dataclasses.asdict(cfg)}
        rows += _score(name, _net_pre(net), sets, repeats, extra)
        print(f"  {name}: " + ", ".join(f"{r['dist']} {r['speedup']:.2f}x err {r['hull_err_pct']:.3f}% "
                                         f"kept {r['kept_frac']:.3f}" for r in rows[-2:]), flush=True)
    return rows


def run_baselines(n_eval: int, repeats: int) -> list[dict]:
    from der.geometry.entropynet import EntropyNet, grid_dedup
    from der.geometry.fast_infer import prune_hull
    from der.initializers import init_anchors

    sets = _eval_sets(n_eval)
    net = EntropyNet.pretrained("ball")
    grid, sigma = net.config.dedup_grid, net.config.sigma

    def norm(p):
        lo = p.min(0)
        return lo, float((p.max(0) - lo).max()) or 1.0

    def heuristic_sort(p):
        return p[np.lexsort((p[:, 1], p[:, 0]))]

    def neuralsort_inference(p):  # hard sort by a 1-D score (NeuralSort's inference-time permutation)
        return p[np.argsort(p @ np.array([0.8, 0.6]))]

    def kmeans_pre(p):
        lo, s = norm(p)
        x = (p - lo) / s
        sub = torch.tensor(x[:: max(1, len(x) // 2048)], dtype=torch.float32)
        c = init_anchors(sub, 16, "kmeans++", 0).double().numpy()
        j = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        v = c[j] - x
        dist = np.linalg.norm(v, axis=1, keepdims=True)
        y = x + v * np.minimum(1.0, sigma / np.maximum(dist, 1e-300))
        q = lo + y * s
        return q[grid_dedup(q, grid, lo, s)]

    def dedup_only(p):
        lo, s = norm(p)
        return p[grid_dedup(p, grid, lo, s)]

    def fixed_prune(p):
        t = np.arange(16) * 2 * np.pi / 16
        return p[prune_hull(p, np.stack([np.cos(t), np.sin(t)], 1))]

    rows = []
    for name, fn in [("raw", lambda p: p), ("heuristic sort", heuristic_sort),
                     ("NeuralSort (hard sort at inference)", neuralsort_inference), ("k-means (16) + dedup", kmeans_pre),
                     ("grid dedup only", dedup_only), ("EntropyNet (shipped, fused)", _net_pre(net)),
                     ("exact prune, 16 fixed directions", fixed_prune)]:
        rows += _score(name, fn, sets, repeats)
        print(f"  {name}: " + ", ".join(f"{r['dist']} {r['speedup']:.2f}x err {r['hull_err_pct']:.3f}%"
                                         for r in rows[-2:]), flush=True)
    return rows


def figure(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from der.geometry import data
    from der.geometry.entropynet import EntropyNet

    net = EntropyNet.pretrained("ball")
    fig, axes = plt.subplots(2, 2, figsize=(8, 8))
    for row, dist in zip(axes, ("square", "parabola"), strict=True):
        p = data.generate(dist, 2000, seed=7)
        q = net.preprocess(p)
        row[0].scatter(p[:, 0], p[:, 1], s=1)
        row[0].set_title(f"{dist}: input (n={len(p)})")
        row[1].scatter(q[:, 0], q[:, 1], s=1, c="C1")
        row[1].set_title(f"after EntropyNet + dedup (n={len(q)})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="der exp entropynet-ablations", description=__doc__.split("\n\n")[0])
    ap.add_argument("--which", choices=WHICH, required=True)
    ap.add_argument("--quick", action="store_true", help="small nets, few steps, n = 1e4")
    ap.add_argument("--n", type=int, default=None, help="evaluation set size (default 1e4 quick, 1e5 full)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runs", default=None, help="folder for training runs (default: a temp folder)")
    a = ap.parse_args(argv)
    results = results_dir()
    meta = Run()
    if a.which == "figure":
        print(f"wrote {figure(results / 'entropynet_fig10.png')}")
        return 0
    n = a.n or (10_000 if a.quick else 100_000)
    t0 = time.perf_counter()
    if a.which == "baselines":
        rows = run_baselines(n, a.repeats)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = run_training(a.which, a.quick, n, a.repeats, Path(a.runs or tmp))
    doc = {"which": a.which, "quick": a.quick, "n_eval": n, "repeats": a.repeats,
           "command": "der exp entropynet-ablations " + " ".join(argv),
           "wall_min": (time.perf_counter() - t0) / 60, "rows": rows}
    out = meta.write(results / f"entropynet_ablation_{a.which}.json", doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
