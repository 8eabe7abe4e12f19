r"""Exact geometry algorithms vs SciPy (§5.1): convex hull, Delaunay, 2D/3D maxima.

    der bench geometry-algos [--quick] [--repeats R] [--max-n N] [--docs-only]

One process; for every case all methods run interleaved (A, B, C, A, B, C, ...) after one warm-up
call each, so load drift on a shared machine hits all alike. We record the median wall time and the
median process CPU time of each method, the speedup vs the baseline (SciPy; for maxima the
sort-based skyline), and check every run's output against the reference (``exact`` = all runs equal):

* hull: SciPy ``ConvexHull``; ``octagon+qhull`` (Akl--Toussaint: extreme points in 8 directions,
  the provable interior filter of :mod:`der.geometry.hull`, QHull on the survivors); ``chan``;
  ``auto`` (ours). Reference: QHull's vertex list, except on the circle where QHull's tolerance
  merges nearly collinear vertices, so the reference is the exact monotone chain and QHull's
  disagreement is reported (``qhull_vertices`` vs ``exact_vertices``).
* Delaunay: SciPy vs ``ordered`` (QHull on Morton-ordered input, ordering included) vs ``auto``
  (our exact sweep-hull engine); both include the canonical (sorted) output form. Reference: SciPy's
  triangulation, canonicalized.
* maxima: sort-based skyline (``sweep``) vs ``paretoset`` vs ``auto`` (pivot filter + sweep).

Writes ``benchmarks/results/geometry_algos.json`` and generates ``docs/geometry_algos.md`` from it (with
the peer tables of ``geometry_peers.json``, :mod:`der_lab.bench.geometry_peers`, when that file exists).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from der_lab.harness import Run, docs_dir, result_path, time_calls

__all__ = ["bench_hull", "bench_delaunay", "bench_maxima", "write_docs", "main"]

HULL_DISTS = ("square", "disk", "gaussian", "parabola", "clustered", "circle")


def _time(fns: dict[str, Callable], repeats: int, check: Callable[[str, object], bool]) -> dict:
    """Interleaved timing (:func:`der_lab.harness.time_calls`: warm-up once each, then ``repeats`` rounds);
    median wall/CPU per method, and whether its last output passes ``check``."""
    t = time_calls(fns, repeats=repeats, warmup=1)
    return {k: {"wall_s": t[k].median_s, "cpu_s": t[k].cpu_median_s, "exact": bool(check(k, t[k].result)),
                "runs": repeats} for k in fns}


def _octagon_qhull(P: np.ndarray) -> np.ndarray:
    from der.geometry import hull as H

    forms = np.stack([P[:, 0], P[:, 1], P[:, 0] + P[:, 1], P[:, 0] - P[:, 1]])
    ext = np.concatenate([forms.argmax(1), forms.argmin(1)])
    q = H.convex_hull(P[ext], "monotone")
    if len(q) < 3:
        return H.convex_hull(P, "qhull")
    q = ext[q]
    idx = H._inner_polygon_filter(P, q, None, float(np.abs(P).max()), False)
    v = H.hull_qhull(np.ascontiguousarray(P[idx]))
    return H._rotate_to_lexmin(P, idx[v]) if v is not None else idx[H._chain(P[idx])]


def bench_hull(ns, repeats, rows):
    from scipy.spatial import ConvexHull

    from der.geometry import convex_hull, data, hull

    for n in ns:
        for dist in HULL_DISTS:
            P = data.generate(dist, n, seed=0)
            exact = convex_hull(P, "monotone")
            qv = hull._rotate_to_lexmin(P, ConvexHull(P).vertices.astype(np.int64))
            ref = exact if dist == "circle" else qv
            fns = {
                "scipy": lambda P=P: ConvexHull(P).vertices,
                "octagon+qhull": lambda P=P: _octagon_qhull(P),
                "chan": lambda P=P: convex_hull(P, "chan"),
                "auto": lambda P=P: convex_hull(P),
            }

            def check(k, out, ref=ref, qv=qv, P=P):
                if k == "scipy":
                    return np.array_equal(hull._rotate_to_lexmin(P, np.asarray(out, np.int64)), qv)
                return np.array_equal(out, ref)

            reps = repeats if not (dist == "circle" and n >= 10**6) else max(5, repeats // 2)
            res = _time(fns, reps, check)
            row = {"task": "hull", "n": n, "dist": dist, "h": len(exact), "qhull_vertices": len(qv),
                   "exact_vertices": len(exact), "methods": res}
            _speedups(row, "scipy")
            rows.append(row)
            _print_row(row)


def bench_delaunay(ns, repeats, rows):
    from scipy.spatial import Delaunay

    from der.geometry import data
    from der.geometry.delaunay import _canonical, delaunay

    for n in ns:
        for dist in ("square", "gaussian", "parabola"):
            P = data.generate(dist, n, seed=0)
            ref = delaunay(P, "qhull")
            fns = {"scipy": lambda P=P: Delaunay(P).simplices, "ordered": lambda P=P: delaunay(P, "ordered"),
                   "auto": lambda P=P: delaunay(P)}

            def check(k, out, ref=ref, P=P):
                return np.array_equal(_canonical(P, out) if k == "scipy" else out, ref)

            row = {"task": "delaunay", "n": n, "dist": dist, "methods": _time(fns, repeats, check)}
            _speedups(row, "scipy")
            rows.append(row)
            _print_row(row)


def bench_maxima(ns, repeats, rows):
    from paretoset import paretoset

    from der.geometry.maxima import maxima, maxima_sweep

    rng = np.random.default_rng(0)
    for n in ns:
        for d in (2, 3):
            for dist in ("uniform", "gaussian"):
                P = rng.random((n, d)) if dist == "uniform" else rng.standard_normal((n, d))
                ref = maxima_sweep(P)
                fns = {"sweep": lambda P=P: maxima_sweep(P),
                       "paretoset": lambda P=P, d=d: np.flatnonzero(paretoset(P, sense=["max"] * d, distinct=False)),
                       "auto": lambda P=P: maxima(P)}
                row = {"task": "maxima", "n": n, "dist": f"{dist}{d}d", "h": len(ref),
                       "methods": _time(fns, repeats, lambda k, out, ref=ref: np.array_equal(out, ref))}
                _speedups(row, "sweep")
                rows.append(row)
                _print_row(row)


def _speedups(row: dict, base: str) -> None:
    b = row["methods"][base]
    for m in row["methods"].values():
        m["speedup_wall"] = b["wall_s"] / m["wall_s"]
        m["speedup_cpu"] = b["cpu_s"] / max(m["cpu_s"], 1e-9)


def _fmt_row(row: dict, sep: str = "  ") -> str:
    cells = [f"{row['task']:8s}", f"{row['n']:>8d}", f"{row['dist']:11s}"]
    for k, m in row["methods"].items():
        flag = "" if m["exact"] else " INEXACT"
        cells.append(f"{k}={m['wall_s'] * 1e3:.2f}ms(x{m['speedup_wall']:.1f}; cpu x{m['speedup_cpu']:.1f}){flag}")
    return sep.join(cells)


def _print_row(row: dict) -> None:
    print(_fmt_row(row), flush=True)


def write_docs(res: dict) -> None:
    """docs/geometry_algos.md from the JSON (every number in it comes from the JSON)."""
    lines = ["# Exact geometry algorithms vs SciPy", "",
             f"Generated by `der bench geometry-algos` from `benchmarks/results/geometry_algos.json` ({res['date']}, "
             f"{res['machine']}). Median of {res['repeats']} interleaved runs after a warm-up; wall-clock "
             "and process-CPU speedups vs the baseline (SciPy; for maxima the sort-based skyline). "
             f"{res['note']}", ""]
    for task, title in (("hull", "Convex hull"), ("delaunay", "Delaunay"), ("maxima", "Pareto maxima")):
        rows = [r for r in res["rows"] if r["task"] == task]
        if not rows:
            continue
        meths = list(rows[0]["methods"])
        lines += [f"## {title}", "", "| n | data | " + " | ".join(f"{m} ms (x wall / x cpu)" for m in meths)
                  + " | exact |", "|" + "---|" * (len(meths) + 3)]
        for r in rows:
            cells = [f"{m['wall_s'] * 1e3:.2f} (x{m['speedup_wall']:.1f} / x{m['speedup_cpu']:.1f})"
                     for m in r["methods"].values()]
            ex = all(m["exact"] for m in r["methods"].values())
            extra = ""
            if task == "hull" and r["qhull_vertices"] != r["exact_vertices"]:
                extra = f" (QHull {r['qhull_vertices']} vs exact {r['exact_vertices']} vertices)"
            lines.append(f"| {r['n']:.0e} | {r['dist']} | " + " | ".join(cells) + f" | {ex}{extra} |")
        lines.append("")
    if "first_call_s" in res:
        lines += [f"First `convex_hull` call in a fresh process (numba cache load): {res['first_call_s']:.3f} s.", ""]
    peers = result_path("geometry_peers.json")
    if peers.exists():
        from der_lab.bench.geometry_peers import peers_markdown

        lines += peers_markdown(json.loads(peers.read_text()))
    docs = docs_dir() / "geometry_algos.md"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text("\n".join(lines))
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der bench geometry-algos", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 repeats (smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-n", type=int, default=10**6)
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default <results>/geometry_algos.json)")
    ap.add_argument("--docs-only", action="store_true", help="regenerate the docs table from the JSON")
    args = ap.parse_args(argv)
    out = result_path("geometry_algos.json", args.out)
    if args.docs_only:
        write_docs(json.loads(out.read_text()))
        return 0
    run = Run()
    t0 = time.perf_counter()
    from der.geometry import convex_hull, data

    convex_hull(data.uniform_disk(70_000, 0))  # numba cache load happens here
    first = time.perf_counter() - t0
    from der.geometry.delaunay import warmup as warmup_delaunay
    from der.geometry.hull import warmup

    warmup()
    warmup_delaunay()
    reps = 3 if args.quick else args.repeats
    big = [n for n in (10**4, 10**5, 10**6) if n <= (10**5 if args.quick else args.max_n)]
    rows: list[dict] = []
    bench_hull(big, reps, rows)
    bench_delaunay([n for n in (10**4, 10**5) if n <= max(big)], reps, rows)
    bench_maxima([n for n in (10**5, 10**6) if n <= max(big)], reps, rows)
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores", "repeats": reps,
           "first_call_s": first,
           "note": "The machine was shared with other jobs (see meta.loadavg_start / loadavg_end); wall times are noisy, "
                   "CPU-time ratios are the steadier figure.",
           "rows": rows}
    run.write(out, res)
    print(f"wrote {out} and {write_docs(res)}")
    return 0
