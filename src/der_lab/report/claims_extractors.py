"""Judges for the claims table that read the geometry, kernel, surrogate-op and MiniLM result files.

Each judge takes the parsed JSON of one result file (and, for those that also read a sibling file, the
folder it came from) and returns ``(our counterpart, verdict)``; used by
``der_lab.report.claims``. Nothing here is typed by hand: every number comes from the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from der_lab.harness import results_dir

__all__ = [
    "entropynet_table2",
    "table23",
    "table10",
    "table15",
    "table16",
    "table17",
    "table20",
    "table22",
    "kernel",
    "overhead_goal",
    "geometry_algos",
    "surrogate_op",
    "minilm",
    "minilm_distill",
    "byte_lm_quality",
]

Verdict = tuple[str, str]


def _x(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}×"


def _row(d: dict, **match) -> dict | None:
    for r in d["rows"]:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def entropynet_table2(d: dict) -> Verdict:
    """Table 2: EntropyNet → hull, network included, vs SciPy; our exact hull as the honest alternative."""
    parts, ok = [], False
    for dist, paper in (("square", 4.14), ("parabola", 2.33)):
        net = [r for r in d["rows"] if r["task"] == "hull" and r["dist"] == dist and r["method"].startswith("entropynet")]
        if not net:
            continue
        n = max(r["n"] for r in net)
        best = max((r for r in net if r["n"] == n), key=lambda r: r["speedup_vs_scipy"])
        auto = _row(d, task="hull", dist=dist, n=n, method="der_hull_auto")
        ok |= best["speedup_vs_scipy"] >= paper and (best.get("hull_area_symdiff_pct") or 0) < 0.2
        parts.append(f"{dist} n={n:.0e}: best EntropyNet pipeline {_x(best['speedup_vs_scipy'])} at "
                     f"{best.get('hull_area_symdiff_pct', float('nan')):.3f}% error (paper {paper}×); "
                     f"exact `convex_hull` without a network {_x(auto['speedup_vs_scipy']) if auto else 'n/a'}")
    return "; ".join(parts), ("reproduced" if ok else "not reproduced (network cost exceeds the hull it speeds up)")


def table23(d: dict) -> Verdict:
    """Table 23: n = 1e6 hull (EntropyNet + Chan 1.41×; SciPy 15.8 s) and n = 1e5 Delaunay (1.36×)."""
    scipy = _row(d, task="hull", dist="square", n=1_000_000, method="scipy_qhull")
    chan = _row(d, task="hull", dist="square", n=1_000_000, method="entropynet_chan")
    dl = _row(d, task="delaunay", dist="square", n=100_000, method="entropynet_fused_delaunay")
    ours_dl = _row(d, task="delaunay", dist="square", n=100_000, method="der_delaunay_ordered")
    txt = (f"SciPy ConvexHull n=1e6: {scipy['total_s']:.3f} s (paper 15.8 s); EntropyNet + Chan: "
           f"{_x(chan['speedup_vs_scipy']) if chan else 'n/a'}; EntropyNet → Delaunay n=1e5: "
           f"{_x(dl['speedup_vs_scipy']) if dl else 'n/a'}; our ordered Delaunay: "
           f"{_x(ours_dl['speedup_vs_scipy']) if ours_dl else 'n/a'}")
    ok = chan is not None and chan["speedup_vs_scipy"] >= 1.41 and dl is not None and dl["speedup_vs_scipy"] >= 1.36
    return txt, "reproduced" if ok else "not reproduced (and the paper's SciPy baseline is ~50× too slow)"


def table10(d: dict) -> Verdict:
    """Table 10: 3D maxima 2.8–3.2×. No 3D network is trained; the exact dominance filter is reported."""
    rows = [r for r in d["rows"] if r["task"] == "maxima" and r["method"] in ("der_maxima_auto", "dominance_prune_maxima")]
    txt = "; ".join(f"{r['method']} n={r['n']:.0e}: {_x(r['speedup_vs_scipy'])} vs sort-and-sweep" for r in rows)
    return txt or "no maxima rows", "not testable as a learned result (no 3D EntropyNet, no KITTI/Waymo); exact filter shown"


def _ablation(d: dict, paper_note: str) -> Verdict:
    by: dict[str, list[str]] = {}
    for r in d["rows"]:
        by.setdefault(r["variant"], []).append(f"{r['dist']} {_x(r['speedup'])}, {r['hull_err_pct']:.3f}% err")
    scale = " (quick: small nets, 16 steps)" if d.get("quick") else ""
    txt = "; ".join(f"{v}: {', '.join(s)}" for v, s in by.items()) + f" at n={d['rows'][0]['n']:.0e}{scale}"
    best = max(r["speedup"] for r in d["rows"])
    return txt, f"not reproduced (best {best:.2f}× end to end; {paper_note})"


def table15(d: dict) -> Verdict:
    return _ablation(d, "paper: halfspace 4.82× vs ball 4.14×")


def table16(d: dict) -> Verdict:
    return _ablation(d, "paper: 3.8–4.2× for k ∈ [8, 64]")


def table17(d: dict) -> Verdict:
    return _ablation(d, "paper: fixed anchors 2.87×, α = 1 3.21×, λ = 1 5.21×")


def table20(d: dict) -> Verdict:
    by = {}
    for r in d["rows"]:
        by.setdefault(r["variant"], []).append(f"{r['dist']} {_x(r['speedup'])} ({r['hull_err_pct']:.2f}% err)")
    txt = "; ".join(f"{v}: {', '.join(s)}" for v, s in by.items())
    return txt, "not reproduced (no learned preprocessor beats the exact filter; NeuralSort row is its hard sort)"


def table22(d: dict) -> Verdict:
    rows = d.get("network_overhead", [])
    txt = "; ".join(f"n={r['n']:.0e}: torch {r['torch_forward_s'] * 1e3:.0f} ms, fused {r['fused_forward_s'] * 1e3:.0f} ms"
                    for r in rows)
    fastest = min((r["fused_forward_s"] for r in rows), default=float("inf"))
    return txt, "reproduced" if fastest * 1e3 <= 0.8 else "not reproduced (forward pass ≫ 0.8 ms on CPU)"


def kernel(d: dict, results: Path | None = None) -> Verdict:
    s = d["summary"]
    txt = (f"median {_x(s['ours_speedup_median'])} dense SDPA over all shapes, {_x(s['ours_speedup_median_N>=1024'])} "
           f"at N ≥ 1024, min {_x(s['ours_speedup_min'])}; compiled FlexAttention forward {_x(s['flex_fwd_speedup_median'])}")
    la, lb = d.get("meta", {}).get("loadavg_start"), d.get("meta", {}).get("loadavg_end")
    if la and lb:  # a shared 2-core machine: the load the ratios were measured under
        txt += f" (load average {la[0]:.1f} → {lb[0]:.1f})"
    below = [r for r in d["rows"] if r["ours_speedup"] < 3]
    if below:
        txt += (f"; {len(below)} of {len(d['rows'])} shapes below 3× "
                f"({_x(min(r['ours_speedup'] for r in below))}–{_x(max(r['ours_speedup'] for r in below))}, "
                f"N ≤ {max(r['N'] for r in below)})")
    bd = _sibling("attention_breakdown.json", results)
    if bd:
        fr = [r["matmul_fraction_of_sgemm"] for r in bd["rows"]]
        mm = [r["op_share_of_kernel"]["matmul"] for r in bd["rows"]]
        sm = [r["op_share_of_kernel"]["softmax"] for r in bd["rows"]]
        txt += (f"; where the time goes (`attention_breakdown.json`): batched matmuls {min(mm):.0%}–{max(mm):.0%} of "
                f"the kernel at {min(fr):.0%}–{max(fr):.0%} of single-thread SGEMM, softmax {min(sm):.0%}–{max(sm):.0%}")
    if s["ours_speedup_median"] < 3:
        return txt, "not reproduced (goal ≥ 3×)"
    return txt, "met on the median, not on every shape" if below else "met on every shape"


def overhead_goal(d: dict, results: Path | None = None) -> Verdict:
    """Issue 7's ≤2% DER training-step overhead, per model at the paper default k = ⌊√N⌋ on every step:
    median / paired overhead and the 95% bootstrap interval of the paired one (``der bench der-overhead``)."""
    parts, met = [], []
    for r in d["rows"]:
        ci = r.get("cpu_paired_overhead_ci95_pct")
        cis = f" [95% CI {ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        tag = f"{r['name']} k={r['k']}" + (f" every {r['every']}" if r.get("every", 1) != 1 else "")
        parts.append(f"{tag}: {r['cpu_overhead_pct']:.2f}% / paired {r['cpu_paired_overhead_pct']:.2f}%{cis}")
        if r.get("anchors_rule") == "sqrt" and r.get("every", 1) == 1:
            met.append((r["name"], r["cpu_paired_overhead_pct"] <= 2.0, ci is not None and ci[1] <= 2.0))
    rerun = _sibling("der_overhead_rerun.json", results)
    if rerun:  # the same bench run again later: between-run drift exceeds the within-run interval
        again = {r["name"]: r["cpu_paired_overhead_pct"] for r in rerun["rows"]
                 if r.get("anchors_rule") == "sqrt" and r.get("every", 1) == 1}
        parts.append("rerun (`der_overhead_rerun.json`) paired at k = √N: "
                     + ", ".join(f"{n} {v:.2f}%" for n, v in again.items()))
        met = [(n, m and again.get(n, math.inf) <= 2.0, c) for n, m, c in met]
    ok = [n for n, m, _ in met if m]
    verdict = ("met" if len(ok) == len(met) else f"met for {', '.join(ok) or 'none'}, missed for "
               + ", ".join(n for n, m, _ in met if not m)) + " (paired median at k = √N, every step" + (
               ", in both runs)" if rerun else ")")
    return "; ".join(parts), verdict


GOAL_CASES = ((1_000_000, 64, 2), (65536, 256, 64))  # issue 3's two goal sizes


def geometry_algos(d: dict) -> Verdict:
    """Issue 5's goals from ``der bench geometry-algos``: exact hull vs SciPy, Delaunay vs SciPy, maxima vs the skyline."""
    def sp(task: str, n: int, method: str) -> dict[str, float]:
        return {r["dist"]: r["methods"][method]["speedup_wall"] for r in d["rows"]
                if r["task"] == task and r["n"] == n and method in r["methods"]}

    goal_dists = ("square", "disk", "gaussian", "parabola")
    h6, h5 = sp("hull", 1_000_000, "auto"), sp("hull", 100_000, "auto")
    dl = next((sp("delaunay", 100_000, m) for m in ("auto", "sweep", "ordered") if sp("delaunay", 100_000, m)), {})
    mx = sp("maxima", 1_000_000, "auto")
    exact = all(r["methods"]["auto"]["exact"] for r in d["rows"] if "auto" in r["methods"])
    txt = (f"hull n=1e6 {', '.join(f'{k} {_x(v)}' for k, v in h6.items())}; n=1e5 min {_x(min(h5.values()))}; "
           f"Delaunay n=1e5 {', '.join(f'{k} {_x(v)}' for k, v in dl.items())}; maxima n=1e6 min "
           f"{_x(min(mx.values()))}; every `auto` result exact: {exact}")
    ok = (all(h6.get(k, 0) >= 10 for k in goal_dists) and all(h5.get(k, 0) >= 5 for k in goal_dists)
          and min(h6.values()) >= 1 and min(h5.values()) >= 1 and dl and min(dl.values()) >= 1.5
          and min(mx.values()) >= 3.2 and exact)
    return txt, "goals met" if ok else "goals partly met"


def _sibling(name: str, results: Path | None) -> dict | None:
    """Another result file in the folder being judged (``results``; default the results dir), if produced."""
    p = results_dir(results) / name
    return json.loads(p.read_text()) if p.exists() else None


def _thp_rows(results: Path | None) -> list[dict]:
    """Goal-case rows of the huge-page rerun of the surrogate-op bench, if it was run."""
    d = _sibling("surrogate_op_thp.json", results)
    if d is None:
        return []
    return [r for r in d["rows"] if (r["N"], r["k"], r["d"]) in GOAL_CASES and "speedup" in r]


def surrogate_op(d: dict, results: Path | None = None) -> Verdict:
    parts, ok = [], True
    for r in d["rows"]:
        if (r["N"], r["k"], r["d"]) not in GOAL_CASES:
            continue
        parts.append(f"N={r['N']:,}, k={r['k']}, d={r['d']}: {_x(r['speedup'])} naive, memory "
                     f"{100 * r['memory_ratio']:.1f}% of naive, {r['floor_ratio']:.1f}× FLOP floor")
        ok &= r["speedup"] >= 5 and r["memory_ratio"] <= 0.10
    fb = d.get("floor_breakdown")
    if fb:
        q = fb["ratios_to_floor"]
        parts.append(f"floor breakdown at N={fb['N']:,}, k={fb['k']}, d={fb['d']} ({fb['threads']} threads): ours "
                     f"{q['ours_streaming']:.2f}×, its four products alone {q['products_only']:.2f}×, "
                     f"compiled chunks {q['compiled_chunks']:.2f}×, keeping N×k (no recompute) "
                     f"{q['keep_probabilities']:.2f}×")
    thp = _thp_rows(results)
    if thp:
        parts.append("with 2 MiB pages (THP_MEM_ALLOC_ENABLE=1, `surrogate_op_thp.json`) the naive path loses its "
                     "page-fault cost and the margin shrinks: " + ", ".join(
                         f"N={r['N']:,}, k={r['k']}, d={r['d']}: {_x(r['speedup'])}" for r in thp))
    d64 = [r["floor_ratio"] for r in d["rows"] if r["d"] == 64 and r["k"] >= 256]
    floor_ok = bool(d64) and max(d64) <= 2.0
    verdict = "goals met" if ok and floor_ok else (
        "speed/memory goals met; FLOP-floor goal (≤2× at d=64) missed" if ok
        else "goals partly met (≥5× and ≤10% memory at both sizes; ≤2× FLOP floor at d=64)")
    return "; ".join(parts), verdict


def minilm(d: dict) -> Verdict:
    def cos(block: dict, key: str) -> str:
        return f"{block[key]['cos']['mean']:.3f}" if key in block else "n/a"

    b, a = d["before"], d["after"]
    txt = (f"all-MiniLM-L6-v2, {d['seq_len']} tokens, blocks of {d['block_size']}: cosine(sparse, dense) "
           f"static 50% {cos(b, 'static@0.5')} → {cos(a, 'static@0.5')}, 75% {cos(b, 'static@0.75')} → "
           f"{cos(a, 'static@0.75')} (before → after a {d['steps']}-step DER fine-tune)")
    return txt, "measured (no paper counterpart at this scale)"


def minilm_distill(d: dict) -> Verdict:
    """The quality verdict of ``der exp minilm-distill`` (:func:`der_lab.report.distill.verdict`)."""
    from der_lab.report.distill import verdict

    vs = verdict(d)
    regime = (f"{d['seq_len']}-token documents" if d.get("text") == "documents"
              else f"sentences padded to {d['seq_len']}")
    parts = [f"{v['sparsity']:.0%}: best DER `{v['best_der']}` cos {v['best_der_mean']:.3f} vs best other "
             f"`{v['best_other']}` {v['best_other_mean']:.3f} (gap {v['gap']:+.3f}, sd {v['spread']:.3f})" for v in vs]
    txt = (f"all-MiniLM-L6-v2, {regime}, blocks of {d['block_size']}, equal budget, seeds {d['seeds']}, "
           f"{d['steps']} distillation steps: " + "; ".join(parts))
    if not vs:
        return txt, "incomplete"
    wins = [v for v in vs if v["der_wins"]]
    return txt, ("reproduced (a DER variant wins beyond the seed spread at " + ", ".join(f"{v['sparsity']:.0%}" for v in wins)
                 + ")" if wins else "not reproduced (no DER variant beats the best non-DER layout; "
                 "the default rule is the best non-DER one)")


def byte_lm_quality(d: dict) -> Verdict:
    """The perplexity verdict of ``der exp byte-lm-quality`` (lower is better)."""
    from der_lab.report.distill import verdict

    cfg = d["meta"]["config"]
    vs = verdict(d, "ppl_increase_pct", higher=False)
    parts = [f"{v['sparsity']:.0%}: best DER `{v['best_der']}` {v['best_der_mean']:+.2f}% vs best other "
             f"`{v['best_other']}` {v['best_other_mean']:+.2f}% (sd {v['spread']:.2f})" for v in vs]
    txt = (f"byte-level Llama trained here, context {cfg['context']}, blocks of {cfg['block_size']}, equal budget, "
           f"seeds {list(cfg['seeds'])}, perplexity vs dense: " + "; ".join(parts))
    if not vs:
        return txt, "incomplete"
    wins = [v for v in vs if v["der_wins"]]
    return txt, ("reproduced (a DER variant wins beyond the seed spread at " + ", ".join(f"{v['sparsity']:.0%}" for v in wins)
                 + ")" if wins else "not reproduced (no DER variant beats the best non-DER layout)")
