r"""Exact geometry against the best peers: Delaunay vs Shewchuk's Triangle and SciPy; hull vs QHull,
Shapely/GEOS and the memory floor; a chunked hull of a memory-mapped file larger than the in-memory cases.

    der bench geometry-peers [--quick] [--repeats R] [--max-n N] [--hull-max-n N] [--chunked-n N] [--docs-only]
                             [--sections delaunay,hull,chunked] [--min-n N] [--dists a,b] [--merge]

``--sections`` / ``--min-n`` / ``--dists`` / ``--merge`` split the full run into several shorter ones whose rows are
merged into one JSON (each row records the load average when it finished).

One process, single thread (our kernels run serially; Triangle, QHull and GEOS are serial). For every
case ours and its baseline (Triangle; the memory floor) run interleaved (A, B, A, B, ...) after one
warm-up call each (:func:`der_lab.bench.geometry_algos._time`), then the other peers (SciPy, Shapely)
interleaved among themselves (:func:`_time_groups`: interleaved with them, ours would pay for the
allocator's clean-up of their millions of freed objects); medians of wall and process-CPU time, time
per point, and the ratios in the same process.

* Delaunay: ``ours`` = ``der.geometry.delaunay`` (canonical, sorted output included), ``triangle`` =
  ``triangle.triangulate({"vertices": P}, "Q")`` (Shewchuk's Triangle, divide and conquer, adaptive
  exact predicates), ``scipy`` = ``scipy.spatial.Delaunay`` (up to ``--scipy-max-n``; not on the
  circle, where QHull takes minutes). Check: in
  general position (uniform, Gaussian, parabola, clustered) our triangle set equals Triangle's;
  on cocircular input (grid, circle) the Delaunay triangulation is not unique and the triangle
  counts must agree.
* Hull: ``ours`` = ``der.geometry.convex_hull``; ``floor`` = one pass reading every coordinate (a numba
  max-reduction over the same array: the memory floor of any exact hull); ``scipy`` = QHull;
  ``shapely`` = ``shapely.convex_hull(shapely.multipoints(P))`` (up to ``--shapely-max-n``; QHull
  not on the circle above 1e6 nor Shapely above 1e5: minutes). Check:
  ours equals the exact monotone chain.
* Chunked: ``convex_hull_chunked`` over a ``.npy`` written in chunks (memory-mapped, uniform square),
  throughput in points per second; the file is deleted afterwards. It lies in the page cache when
  read (the machine has enough RAM), so this is the hull's own throughput, not the disk's.

Distributions: ``uniform`` (unit square), ``gaussian``, ``parabola``, ``circle``, ``grid`` (integer
lattice in row-major order: every cell cocircular), ``clustered``. Writes
``benchmarks/results/geometry_peers.json``; ``docs/geometry_algos.md`` gets its tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from numba import njit

from der_lab.bench.geometry_algos import _time
from der_lab.harness import Run, result_path

__all__ = ["DISTS", "main", "merge_results", "peers_markdown", "points", "read_floor"]

DISTS = ("uniform", "gaussian", "parabola", "circle", "grid", "clustered")
GENERAL = ("uniform", "gaussian", "parabola", "clustered")  # unique Delaunay triangulation


def points(dist: str, n: int, seed: int = 0) -> np.ndarray:
    """(n, 2) float64 points of one of ``DISTS``."""
    from der.geometry import data

    if dist == "grid":
        side = int(np.ceil(np.sqrt(n)))
        g = np.stack(np.meshgrid(np.arange(side, dtype=float), np.arange(side, dtype=float)), -1)
        return np.ascontiguousarray(g.reshape(-1, 2)[:n])
    return data.generate("square" if dist == "uniform" else dist, n, seed=seed)


@njit(cache=True)
def read_floor(P) -> float:
    """Largest coordinate of ``P`` (n, 2): one sequential read of the input."""
    m = -np.inf
    for i in range(P.shape[0]):
        m = max(m, max(P[i, 0], P[i, 1]))
    return m


def _time_groups(fns: dict, first: tuple, repeats: int, check) -> dict:
    """Ours and its baseline (``first``) interleaved with each other, then the other peers interleaved
    among themselves, in one process. The peers that build millions of small objects (QHull's facets,
    Shapely's points) leave freed memory that the allocator consolidates at the next allocation, and
    evict the caches: interleaved with them, ours would pay for their clean-up."""
    head = {k: fns[k] for k in first}
    rest = {k: f for k, f in fns.items() if k not in head}
    return {**_time(head, repeats, check), **(_time(rest, repeats, check) if rest else {})}


def _per_point(row: dict, n: int, base: str) -> None:
    b = row["methods"][base]
    for m in row["methods"].values():
        m["ns_per_point"] = m["wall_s"] / n * 1e9
        m["cpu_ns_per_point"] = m["cpu_s"] / n * 1e9
        m[f"{base}_over_this_wall"] = b["wall_s"] / m["wall_s"]
        m[f"{base}_over_this_cpu"] = b["cpu_s"] / max(m["cpu_s"], 1e-12)


def bench_delaunay(ns, dists, repeats, scipy_max, rows) -> None:
    import triangle
    from scipy.spatial import Delaunay

    from der.geometry.delaunay import _canonical, delaunay

    for n in ns:
        for dist in dists:
            P = points(dist, n)
            fns = {"ours": lambda P=P: delaunay(P),
                   "triangle": lambda P=P: triangle.triangulate({"vertices": P}, "Q")["triangles"]}
            if n <= scipy_max and dist != "circle":  # QHull on cocircular input: minutes
                fns["scipy"] = lambda P=P: Delaunay(P).simplices
            ref: dict = {}

            def check(k, out, ref=ref, P=P, dist=dist):
                if k != "scipy":
                    ref[k] = out  # compared below, once
                return len(out) > 0

            res = _time_groups(fns, ("ours", "triangle"), repeats, check)
            ours, tri = ref["ours"], ref["triangle"]
            same = (np.array_equal(ours, _canonical(P, tri)) if dist in GENERAL else len(ours) == len(tri))
            row = {"task": "delaunay", "n": n, "dist": dist, "load_avg_1m": os.getloadavg()[0], "triangles": len(ours),
                   "triangle_triangles": len(tri), "same_as_triangle": bool(same),
                   "check": "same triangle set" if dist in GENERAL else "same count (cocircular)",
                   "methods": res}
            _per_point(row, n, "triangle")
            rows.append(row)
            _print(row, "triangle")


def bench_hull(ns, dists, repeats, shapely_max, rows) -> None:
    import shapely
    from scipy.spatial import ConvexHull

    from der.geometry import convex_hull

    for n in ns:
        for dist in dists:
            P = points(dist, n)
            want = convex_hull(P, "monotone")
            fns = {"ours": lambda P=P: convex_hull(P), "floor": lambda P=P: read_floor(P)}
            if not (dist == "circle" and n > 10**6):  # QHull takes minutes there
                fns["scipy"] = lambda P=P: ConvexHull(P).vertices
            if n <= shapely_max and not (dist == "circle" and n > 10**5):
                fns["shapely"] = lambda P=P: shapely.convex_hull(shapely.multipoints(P))

            def check(k, out, want=want):
                return np.array_equal(out, want) if k == "ours" else True

            row = {"task": "hull", "n": n, "dist": dist, "h": len(want),
                   "methods": _time_groups(fns, ("ours", "floor"), repeats, check),
                   "load_avg_1m": os.getloadavg()[0]}
            _per_point(row, n, "floor")
            rows.append(row)
            _print(row, "floor")


def bench_chunked(n: int, chunk_rows: int, rows) -> None:
    from numpy.lib.format import open_memmap

    from der.geometry import convex_hull
    from der.geometry.dask_hull import convex_hull_chunked

    step = 10**7
    with tempfile.TemporaryDirectory(dir=os.environ.get("DER_TMP")) as tmp:
        f = Path(tmp) / "points.npy"
        M = open_memmap(f, mode="w+", dtype=np.float64, shape=(n, 2))
        rng = np.random.default_rng(0)
        for lo in range(0, n, step):
            M[lo : lo + step] = rng.random((min(step, n - lo), 2))
        M.flush()
        del M
        t0, c0 = time.perf_counter(), time.process_time()
        got = convex_hull_chunked(f, chunk_rows=chunk_rows, progress=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        full = np.load(f, mmap_mode="r")
        same = bool(np.array_equal(got, convex_hull(np.asarray(full))))
        del full
    row = {"task": "chunked", "n": n, "dist": "uniform", "chunk_rows": chunk_rows, "bytes": 16 * n,
           "wall_s": wall, "cpu_s": cpu, "points_per_s": n / wall, "gb_per_s": 16 * n / wall / 1e9,
           "h": len(got), "same_as_in_memory": same, "load_avg_1m": os.getloadavg()[0]}
    rows.append(row)
    print(f"chunked  n={n:.0e}  {wall:.2f}s  {n / wall / 1e6:.1f} Mpt/s  {16 * n / wall / 1e9:.2f} GB/s  "
          f"same={same}", flush=True)


def _print(row: dict, base: str) -> None:
    cells = [f"{row['task']:8s} {row['n']:>9d} {row['dist']:9s}"]
    for k, m in row["methods"].items():
        cells.append(f"{k}={m['wall_s'] * 1e3:.2f}ms ({m['ns_per_point']:.0f} ns/pt, "
                     f"{base}/{k} x{m[f'{base}_over_this_wall']:.2f})")
    print("  ".join(cells), flush=True)


def _goals(rows: list[dict]) -> list[str]:
    """The issue's goals, judged from the rows (wall and CPU time); empty if no row bears on them."""
    out = []

    def judge(sel, ratio, goal, better_high):
        got = [(r, ratio(r)) for r in rows if sel(r)]
        if not got:
            return None
        ok = [(w >= goal if better_high else w <= goal) for _, (w, _c) in got]
        worst = min(got, key=lambda g: g[1][0] if better_high else -g[1][0])
        r, (w, c) = worst
        verdict = "met" if all(ok) else f"not met ({sum(ok)} of {len(ok)} rows)"
        return f"{verdict}; worst {r['dist']} at {r['n']:.0e}: {w:.2f} wall, {c:.2f} CPU"

    def tri(r):
        o = r["methods"]["ours"]
        return o["triangle_over_this_wall"], o["triangle_over_this_cpu"]

    def floor(r):
        o = r["methods"]["ours"]
        return 1 / o["floor_over_this_wall"], 1 / o["floor_over_this_cpu"]

    hard = judge(lambda r: r["task"] == "delaunay" and r["n"] in (10**5, 10**6)
                 and r["dist"] in ("uniform", "gaussian", "parabola"), tri, 1.2, True)
    if hard:
        out.append(f"* Delaunay >= 1.2x Triangle at 1e5 and 1e6 on uniform, Gaussian, parabola: {hard}.")
    every = judge(lambda r: r["task"] == "delaunay" and r["n"] in (10**5, 10**6), tri, 1.0, True)
    if every:
        out.append(f"* Delaunay faster than Triangle on every distribution at 1e5 and 1e6: {every}.")
    per = {}
    for r in rows:
        if r["task"] == "delaunay" and r["dist"] == "uniform":
            per[r["n"]] = r["methods"]["ours"]["ns_per_point"] / 1e3
    if len(per) > 1:
        out.append("* Delaunay time per point (uniform, µs): " + ", ".join(f"{n:.0e}: {v:.2f}" for n, v in
                                                                          sorted(per.items()))
                   + (" (flat)" if max(per.values()) <= 1.2 * min(per.values()) else " (not flat)") + ".")
    hull = judge(lambda r: r["task"] == "hull" and r["n"] in (10**6, 10**7) and r["dist"] in ("uniform", "gaussian"),
                 floor, 2.0, False)
    if hull:
        out.append(f"* Hull <= 2x the memory floor at 1e6 and 1e7 on uniform and Gaussian: {hull}.")
    qh = [r for r in rows if r["task"] == "hull" and "scipy" in r["methods"]]
    if qh:
        slow = [r for r in qh if r["methods"]["scipy"]["wall_s"] <= r["methods"]["ours"]["wall_s"]]
        least = min(qh, key=lambda r: r["methods"]["scipy"]["wall_s"] / r["methods"]["ours"]["wall_s"])
        x = least["methods"]["scipy"]["wall_s"] / least["methods"]["ours"]["wall_s"]
        out.append(f"* Hull ahead of QHull on every row timed with QHull: {'met' if not slow else 'not met'} "
                   f"(least margin {x:.1f}x, {least['dist']} at {least['n']:.0e}; QHull is not timed on the "
                   "circle at 1e7).")
    return ["### Goals (issue 18), judged from the rows below", "", *out, ""] if out else []


def peers_markdown(res: dict) -> list[str]:
    """Markdown sections (lines) of the JSON written by :func:`main`."""
    loads = [r["load_avg_1m"] for r in res["rows"] if "load_avg_1m" in r]
    load = (f"load {min(loads):.1f}-{max(loads):.1f} (1-minute average as each row finished)" if loads else
            f"load {res['load_avg_1m_at_start']:.1f} at start, {res['load_avg_1m_at_end']:.1f} at end")
    runs = res.get("runs", [])
    counts = sorted({m["runs"] for r in res["rows"] for m in r.get("methods", {}).values() if "runs" in m})
    reps = "/".join(map(str, counts)) if counts else res["repeats"]
    parts = f", {len(runs)} runs merged" if len(runs) > 1 else ""
    out = ["## Peers: Delaunay vs Shewchuk's Triangle, hull vs the memory floor", "",
           f"Generated by `der bench geometry-peers` from `benchmarks/results/geometry_peers.json` "
           f"({res['date']}, {res['machine']}, {load}{parts}). Single thread, median of {reps} "
           "interleaved runs after a warm-up (per row in the JSON), ratios within one process. `x` columns: the peer's time over ours "
           "(> 1: ours is faster); CPU-time ratios are the steadier figure on a shared machine. No "
           "all-cores column: the Delaunay engine and the hull's slab pass are serial, and on this 2-core "
           "machine, shared with other jobs, a parallel timing would not be meaningful.", ""]
    out += _goals(res["rows"])
    dl = [r for r in res["rows"] if r["task"] == "delaunay"]
    if dl:
        out += ["### Delaunay (ms; µs per point; Triangle time / ours)", "",
                "| n | data | ours | Triangle | SciPy | x wall | x cpu | ours µs/pt | check |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in dl:
            m = r["methods"]
            sc = f"{m['scipy']['wall_s'] * 1e3:.1f}" if "scipy" in m else "—"
            out.append(f"| {r['n']:.0e} | {r['dist']} | {m['ours']['wall_s'] * 1e3:.1f} | "
                       f"{m['triangle']['wall_s'] * 1e3:.1f} | {sc} | {m['ours']['triangle_over_this_wall']:.2f} | "
                       f"{m['ours']['triangle_over_this_cpu']:.2f} | {m['ours']['ns_per_point'] / 1e3:.2f} | "
                       f"{r['check']}: {r['same_as_triangle']} |")
        out.append("")
    hl = [r for r in res["rows"] if r["task"] == "hull"]
    if hl:
        out += ["### Convex hull (ns per point; ours / memory floor; QHull and Shapely time / ours)", "",
                "| n | data | floor | ours | ours / floor (wall, cpu) | QHull | x QHull | Shapely | x Shapely | exact |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in hl:
            m = r["methods"]
            o = m["ours"]

            def peer(k, m=m, o=o):
                if k not in m:
                    return "—", "—"
                return f"{m[k]['ns_per_point']:.1f}", f"{m[k]['wall_s'] / o['wall_s']:.1f}"

            (qs, qx), (ss, sx) = peer("scipy"), peer("shapely")
            out.append(f"| {r['n']:.0e} | {r['dist']} | {m['floor']['ns_per_point']:.2f} | {o['ns_per_point']:.2f} | "
                       f"{1 / o['floor_over_this_wall']:.2f}, {1 / o['floor_over_this_cpu']:.2f} | {qs} | {qx} | "
                       f"{ss} | {sx} | {o['exact']} |")
        out.append("")
    for r in (r for r in res["rows"] if r["task"] == "chunked"):
        out += [f"Chunked hull of a memory-mapped `.npy` ({r['n']:.0e} uniform points, {r['bytes'] / 1e9:.1f} GB, "
                f"chunks of {r['chunk_rows']} rows, in the page cache): {r['wall_s']:.2f} s, "
                f"{r['points_per_s'] / 1e6:.1f} M points/s ({r['gb_per_s']:.2f} GB/s); same as in memory: "
                f"{r['same_as_in_memory']}.", ""]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der bench geometry-peers", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="n <= 1e5, 3 repeats, no chunked run (smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-n", type=float, default=1e6, help="largest Delaunay n")
    ap.add_argument("--hull-max-n", type=float, default=1e7, help="largest hull n")
    ap.add_argument("--scipy-max-n", type=float, default=1e5, help="largest n timed with SciPy's Delaunay")
    ap.add_argument("--shapely-max-n", type=float, default=1e6)
    ap.add_argument("--chunked-n", type=float, default=1e8, help="points of the chunked run (0: skip)")
    ap.add_argument("--chunk-rows", type=int, default=1 << 22)
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default <results>/geometry_peers.json)")
    ap.add_argument("--docs-only", action="store_true", help="regenerate the docs tables from the JSON")
    ap.add_argument("--sections", default="delaunay,hull,chunked", help="comma-separated subset to run")
    ap.add_argument("--min-n", type=float, default=0, help="smallest n of the Delaunay and hull sections")
    ap.add_argument("--dists", default=",".join(DISTS), help="comma-separated subset of the distributions")
    ap.add_argument("--merge", action="store_true",
                    help="merge the rows into the existing JSON (replacing rows of the same task, n, data)")
    args = ap.parse_args(argv)
    out = result_path("geometry_peers.json", args.out)
    if args.docs_only:
        _write_docs()
        return 0
    run = Run()
    from der.geometry.delaunay import warmup as warmup_delaunay
    from der.geometry.hull import warmup

    warmup()
    warmup_delaunay()
    read_floor(np.zeros((4, 2)))
    reps = 3 if args.quick else args.repeats
    top = 1e5 if args.quick else args.max_n
    sections = set(args.sections.split(","))
    dists = [d for d in DISTS if d in args.dists.split(",")]
    rows: list[dict] = []
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "load_avg_1m_at_start": os.getloadavg()[0], "repeats": reps, "rows": rows}
    old = json.loads(out.read_text()) if args.merge and out.exists() else None
    this_run = {"date": res["date"], "argv": list(argv) if argv is not None else None, "repeats": reps,
                "load_avg_1m_at_start": res["load_avg_1m_at_start"]}

    def save(done: str) -> None:  # after every section, so a stopped run keeps what it measured
        this_run.update(load_avg_1m_at_end=os.getloadavg()[0], completed=done)
        res.update(load_avg_1m_at_end=this_run["load_avg_1m_at_end"], completed=done)
        run.write(out, merge_results(old, res, this_run) if old is not None else {**res, "runs": [this_run]})

    for n in (10**4, 10**5, 10**6, 10**7):
        if "delaunay" in sections and args.min_n <= n <= top:
            bench_delaunay([n], dists, reps, args.scipy_max_n, rows)
            save(f"delaunay n={n}")
    for n in (10**6, 10**7):
        if "hull" in sections and args.min_n <= n <= (1e6 if args.quick else args.hull_max_n):
            bench_hull([n], dists, reps, args.shapely_max_n, rows)
            save(f"hull n={n}")
    if "chunked" in sections and args.chunked_n and not args.quick:
        bench_chunked(int(args.chunked_n), args.chunk_rows, rows)
        save("all")
    print(f"wrote {out} and {_write_docs()}")
    return 0


def merge_results(old: dict, new: dict, this_run: dict) -> dict:
    """``new``'s rows merged into ``old``'s (a row of the same task, n and data is replaced), rows
    ordered by task, n and data; ``runs`` lists every run that contributed. The top-level ``repeats``
    is the smallest of the merged runs'."""
    key = lambda r: (r["task"], r["n"], r["dist"])  # noqa: E731
    fresh = {key(r) for r in new["rows"]}
    rows = [r for r in old.get("rows", []) if key(r) not in fresh] + list(new["rows"])
    tasks = ("delaunay", "hull", "chunked")
    rows.sort(key=lambda r: (tasks.index(r["task"]), r["n"], DISTS.index(r["dist"])))
    legacy = [{"date": old.get("date"), "argv": old.get("meta", {}).get("argv"), "repeats": old.get("repeats")}]
    runs = old.get("runs") or (legacy if len(rows) > len(new["rows"]) else [])
    runs = [*runs, this_run]
    return {**new, "rows": rows, "runs": runs, "repeats": min(r["repeats"] for r in runs if r.get("repeats"))}


def _write_docs() -> Path:
    from der_lab.bench.geometry_algos import write_docs

    return write_docs(json.loads(result_path("geometry_algos.json").read_text()))
