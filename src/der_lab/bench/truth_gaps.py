"""Gaps of the large-n estimates of H_R to the exact value on small n (issue: ground-truth entropy).

For random small instances: exact H_R (partition search), the explicit respectful-partition upper bound,
and the instance-optimal divide-and-conquer work per point (an estimate of 1 + H_R up to constants).
Writes ``benchmarks/results/truth_gaps.json`` and prints one table.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from der.truth import range_partition_entropy, work_entropy
from der_lab.harness import Run, result_path

__all__ = ["run", "main"]

FAMILIES = ("square", "gaussian", "clustered", "circle")


def _points(family: str, n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    if family == "square":
        return rng.random((n, d))
    if family == "gaussian":
        return rng.standard_normal((n, d))
    if family == "clustered":
        return rng.random((3, d))[rng.integers(3, size=n)] + 0.03 * rng.standard_normal((n, d))
    t = rng.random(n) * 2 * np.pi  # circle: every point on the hull
    return np.c_[np.cos(t), np.sin(t)] if d == 2 else np.c_[np.cos(t), np.sin(t), rng.random(n)]


def run(sizes: dict[str, tuple[int, ...]], seeds: int) -> dict:
    rows = []
    for problem, ns in sizes.items():
        d = 3 if problem.endswith("3d") else 2
        for family in FAMILIES:
            for n in ns:
                for seed in range(seeds):
                    X = _points(family, n, d, np.random.default_rng(seed))
                    exact = range_partition_entropy(X, problem, method="exact")
                    upper = range_partition_entropy(X, problem, method="upper")
                    row = {"problem": problem, "family": family, "n": n, "seed": seed, "exact": exact,
                           "upper": upper, "gap": upper - exact}
                    if problem in ("hull2d", "maxima2d"):
                        row["work_per_point"] = work_entropy(X, problem)["per_point"]
                    rows.append(row)
    summary = {}
    for problem in sizes:
        sel = [r for r in rows if r["problem"] == problem]
        summary[problem] = {"instances": len(sel), "mean_gap": statistics.fmean(r["gap"] for r in sel),
                            "max_gap": max(r["gap"] for r in sel),
                            "upper_below_exact": sum(r["gap"] < -1e-9 for r in sel)}
    return {"rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der bench truth-gaps", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=None, help="result JSON (default <results>/truth_gaps.json)")
    args = ap.parse_args(argv)
    args.out = result_path("truth_gaps.json", args.out)
    meta = Run()
    res = run({"hull2d": (6, 8, 10), "maxima2d": (8, 12)}, args.seeds)
    meta.write(args.out, res)
    print(f"{'problem':9s} {'family':10s} {'n':>3s} {'exact':>7s} {'upper':>7s} {'gap':>6s} {'W/n':>6s}  (means over seeds)")
    keys = sorted({(r["problem"], r["family"], r["n"]) for r in res["rows"]})
    for p, f, n in keys:
        sel = [r for r in res["rows"] if (r["problem"], r["family"], r["n"]) == (p, f, n)]
        m = {k: statistics.fmean(r[k] for r in sel) for k in ("exact", "upper", "gap")}
        w = statistics.fmean(r.get("work_per_point", float("nan")) for r in sel)
        print(f"{p:9s} {f:10s} {n:3d} {m['exact']:7.3f} {m['upper']:7.3f} {m['gap']:6.3f} {w:6.2f}")
    print(json.dumps(res["summary"]))
    return 0
