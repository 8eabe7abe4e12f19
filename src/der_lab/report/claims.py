"""Generate docs/claims.md from the result JSON under benchmarks/results/ (nothing here is typed by hand).

Every headline claim of the paper (abstract, Tables 2–7, 8–9, 10, 15–17, 20, 22–27, App. E.2, App. G.3)
gets: the paper's number, our counterpart at our scale (read from a result file), and a verdict —
``reproduced`` / ``not reproduced`` / ``not testable here`` (with the reason) / ``not measured yet`` (the
result file does not exist). The judges for the geometry, kernel, surrogate-op and MiniLM files live in
``der_lab.report.claims_extractors``.

Usage: ``python -m der_lab.report.claims [--results DIR] [--out docs/claims.md]``
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from der_lab.harness import docs_dir, results_dir
from der_lab.report import claims_extractors as X  # judges for the geometry / kernel / op / MiniLM files

__all__ = [
    "Claim",
    "vit_table4",
    "vit_goal",
    "vit_table5",
    "byte_lm",
    "lora",
    "robustness",
    "mask_iou",
    "breakeven",
    "gradient",
    "overhead",
    "r2",
    "render",
    "main",
]

Verdict = tuple[str, str]  # (our counterpart, verdict)


@dataclass
class Claim:
    where: str
    paper: str
    source: str | None  # result file stem (exp_* files: the full run is preferred over *_quick)
    judge: Callable[[dict], Verdict] | None = None
    untestable: str | None = None  # reason, when no counterpart can exist here
    siblings: bool = False  # the judge also reads other files of the results folder: judge(d, results=...)


def _f(x: float, nd: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _verdict(ok: bool) -> str:
    return "reproduced" if ok else "not reproduced"


def _scale_note(d: dict) -> str:
    meta = d.get("meta", {})
    seeds = f", mean ± sd over seeds {meta['seeds']}" if meta.get("aggregated") else ""
    return f" (quick scale{seeds})" if meta.get("quick") else (f" ({seeds[2:]})" if seeds else "")


def _t(v: dict | None, key: str = "top1", nd: int = 1) -> str:
    """``v[key]`` with its seed spread when the file aggregates several seeds."""
    if not v or key not in v:
        return "n/a"
    return _f(v[key], nd) + (f" ± {_f(v[key + '_std'], nd)}" if key + "_std" in v else "")


# ----------------------------------------------------------------------------- judges for our files
def vit_table4(d: dict) -> Verdict:
    m = d["methods"]
    der, l1, mag, dense = m.get("der@0.75"), m.get("l1@0.75"), m.get("magnitude_topb@0.75"), m["dense"]
    if der is None:
        raise KeyError("der@0.75")
    rule = m.get("der_attention_rule@0.75")
    txt = (f"digits ViT at 75% block sparsity{_scale_note(d)}: dense {_t(dense)}, DER {_t(der)}, "
           f"L1 {_t(l1)}, top-b {_t(mag)} top-1"
           + (f" (DER model with `rule=\"attention\"` layouts {_t(rule)})" if rule else "") + "; mean block "
           f"length DER {_f(der['mean_block_length'], 2)} vs L1 {_f(l1['mean_block_length'], 2) if l1 else 'n/a'} "
           f"vs top-b {_f(mag['mean_block_length'], 2) if mag else 'n/a'} blocks")
    ok = bool(l1 and mag and der["top1"] > l1["top1"] and der["top1"] > mag["top1"])
    return txt, _verdict(ok) + " (ordering DER > L1, top-b)"


def vit_goal(d: dict) -> Verdict:
    der, dense = d["methods"]["der@0.75"], d["methods"]["dense"]
    gap = dense["top1"] - der["top1"]
    return (f"DER@75% {_t(der)} vs dense {_t(dense)} (gap {_f(gap, 2)} points){_scale_note(d)}",
            _verdict(gap <= 0.5) + " (goal: within 0.5 points)")


def vit_table5(d: dict) -> Verdict:
    der, dense = d["methods"]["der@0.75"], d["methods"]["dense"]
    red = 100 * (1 - der["flops"] / dense["flops"])
    sp = dense["latency_ms"] / der["latency_ms"]
    return (f"FLOPs −{_f(red)}%, end-to-end CPU speedup {_f(sp, 2)}× (batch forward, shared 2-core machine)"
            f"{_scale_note(d)}", _verdict(sp >= 1.47) + " (speedup ≥ 1.47×)")


def byte_lm(d: dict) -> Verdict:
    m = d["methods"]
    der = m["der"]
    txt = (f"byte LM{_scale_note(d)}: PPL dense {_f(m['dense']['val_ppl'], 3)}, DER {_f(der['val_ppl'], 3)} "
           f"({der['ppl_increase_pct']:+.1f}%), BigBird {_f(m['bigbird']['val_ppl'], 3)}, Longformer "
           f"{_f(m['longformer']['val_ppl'], 3)}; causal block sparsity {_f(der['block_sparsity'], 2)}; attention "
           f"kernel speedup {_f(der['kernel']['speedup'], 2)}×"
           + (f" (DER rows keep {_f(der['rows']['mean_kept_per_row'], 2)} blocks on average, "
              f"{_f(der['rows']['mean_head_max_kept_per_row'], 2)} in a head's longest row; the kernel pads to it)"
              if "rows" in der else ""))
    ppl_ok, sp_ok = der["ppl_increase_pct"] <= 5, der["kernel"]["speedup"] >= 1.5
    return txt, (_verdict(ppl_ok and sp_ok) + f" (goal: PPL +≤5% {'met' if ppl_ok else 'not met'}, ≥1.5× attention "
                 f"{'met' if sp_ok else 'not met'})")


def lora(d: dict) -> Verdict:
    r = d["methods"]["der_lora"]
    return (f"LoRA+DER on byte Llama{_scale_note(d)}: PPL {_f(d['methods']['dense_lora']['val_ppl'], 3)} → "
            f"{_f(r['val_ppl'], 3)} ({r['ppl_increase_pct']:+.1f}%), end-to-end speedup {_f(r['speedup_end_to_end'], 2)}×",
            _verdict(r["ppl_increase_pct"] <= 11 and r["speedup_end_to_end"] >= 1.48) + " (paper: +0.9 PPL ≈ +11%, 1.48×)")


def robustness(d: dict) -> Verdict:
    m = d["methods"]
    der, ls = m["der"], m.get("label_smoothing")
    parts = [f"{k}: clean {_f(v['clean_top1'])}, mCE {_f(v['mCE'])}, OOD {_f(v['ood_top1'])}" for k, v in m.items()]
    ok = der["mCE"] is not None and der["mCE"] < 100 and ls is not None and ls["mCE"] is not None and der["mCE"] < ls["mCE"]
    return "; ".join(parts) + _scale_note(d), _verdict(ok) + " (goal: DER mCE below plain and label smoothing)"


def mask_iou(d: dict) -> Verdict:
    m = d["methods"]
    der, l1 = m["der"]["iou_mean"], m.get("l1", {}).get("iou_mean")
    mag = m.get("magnitude (plain)", {}).get("iou_mean")
    return (f"IoU (CLS attention top-25% vs foreground patches){_scale_note(d)}: DER {_t(m['der'], 'iou_mean', 3)}, "
            f"L1 {_t(m.get('l1'), 'iou_mean', 3)}, magnitude {_t(m.get('magnitude (plain)'), 'iou_mean', 3)}, "
            f"chance {_f(d['chance_iou'], 3)}",
            _verdict(l1 is not None and mag is not None and der > l1 and der > mag) + " (DER above L1 and magnitude)")


def breakeven(d: dict) -> Verdict:
    bad = [f"Table {r['table']} {r['scenario']} (stated {r['stated_batches']:,.0f}, recomputed "
           f"{r['recomputed_batches']:,.0f})" for r in d["rows"] if r.get("consistent") is False]
    return ("; ".join(bad) + " are inconsistent with N = T/((1−1/S)·t); Table 9's recomputed ViT row (450K) holds",
            "partly reproduced (arithmetic checked by der breakeven --check-paper)")


def gradient(d: dict) -> Verdict:
    v = d["verdict"]
    return (f"paper's gradient matches autograd: {v.get('paper_gradient_matches_autograd')}; derived gradient "
            f"matches: {v.get('derived_gradient_matches_autograd')}; paper's fixed point holds: "
            f"{v.get('paper_fixed_point_holds')}", _verdict(bool(v.get("paper_gradient_matches_autograd"))))


def overhead(d: dict) -> Verdict:
    rows = d["rows"]
    best = min(rows, key=lambda r: r.get("cpu_paired_overhead_pct", math.inf))
    txt = "; ".join(f"{r['name']} ({r.get('anchors_rule')}): CPU-time overhead {_f(r.get('cpu_paired_overhead_pct'))}%"
                    for r in rows)
    return txt, _verdict(best.get("cpu_paired_overhead_pct", math.inf) <= 3.5) + " (best config ≤ 3.5%)"


def r2(d: dict) -> Verdict:
    s = d["summary"]["diff_vs_hull2d"]
    return f"R² of H_diff vs ground-truth entropy: {_f(s['r2'], 3)} (n = {s['n']})", _verdict(s["r2"] >= 0.9)


NO_GPU = "needs a GPU"
CLAIMS: list[Claim] = [
    Claim("Abstract / Table 2", "EntropyNet: 4–5× convex-hull / triangulation speedups, <0.2% error", "geometry_entropynet", X.entropynet_table2),
    Claim("Table 23", "n = 10⁶ hull 1.41× (SciPy 15.8 s), n = 10⁵ Delaunay 1.36× vs SciPy", "geometry_entropynet", X.table23),
    Claim("App. G.3", "R² = 0.96 between H_diff and ground-truth H_R", "entropy_validation_quick", r2),
    Claim("App. E.2", "closed-form gradient of H_diff and anchor fixed point", "core_gradient_check", gradient),
    Claim("Abstract / Table 5", "ViT-B ImageNet 80.1% at 75–80% sparsity, 1.60× speedup", None,
          untestable=f"ImageNet and ViT-B training {NO_GPU} and the dataset; config + loader in der_lab.experiments.configs"),
    Claim("Abstract / Table 5", "FlashAttention v2 + DER 2.07× vs 1.63× FA alone", None,
          untestable="FlashAttention v2 is CUDA-only; no GPU was lent to this task"),
    Claim("Table 5 (analog)", "ViT-S CIFAR-100: DER −64% FLOPs, 1.47× wall clock", "exp_vit_digits", vit_table5),
    Claim("Table 4 (analog)", "same b: DER 75.2 > L1 74.8 > top-b 74.6; block length 12.7 vs 8.4 / 8.1", "exp_vit_digits", vit_table4),
    Claim("Table 24 (analog)", "same kernel: DER 75.0 vs L1-top-b 74.6 vs dense 76.7", "exp_vit_digits", vit_goal),
    Claim("Table 3 (analog)", "Phi-2 WikiText-103: PPL 8.2 → 9.1 at 70–75%, 1.48×", "exp_byte_lm", byte_lm),
    Claim("Tables 3, 7 (analog)", "LLaMA-2/Mistral 7B 4-bit LoRA + DER: −0.3/−0.4 ROUGE-L, 1.55–1.60×", "exp_lora_llama", lora),
    Claim("Table 7", "LLaMA-2 7B CNN/DM 8K: 42.5 ROUGE-L, 35% memory reduction", None,
          untestable=f"a 7B model {NO_GPU} (≥24 GB); config + CNN/DM loader in der_lab.experiments.configs"),
    Claim("Table 6", "training overhead 2.1–3.5% with FAISS (8–12% naive)", "der_overhead", overhead),
    Claim("Table 8–9", "break-even 1.5K / 450K / 180K / 420K batches", "breakeven_paper_check", breakeven),
    Claim("Abstract / Table 18 (analog)", "mask IoU 0.73 (DER) vs 0.41; Table 18: 0.56 vs 0.36 (L1)", "exp_mask_iou", mask_iou),
    Claim("Abstract / Table 27 (analog)", "mCE 48.7 (DER) vs 55.4 plain, 52.1 label smoothing; SVHN 91.3 vs 88.2", "exp_robustness", robustness),
    Claim("Table 10", "3D maxima: 2.8–3.2× speedup, +3–7% F1 (KITTI/Waymo)", "geometry_entropynet", X.table10),
    Claim("Table 15", "half-space surrogate 4.82× vs ball 4.14×", "entropynet_ablation_estimator", X.table15),
    Claim("Table 16", "anchor count k ∈ [8, 64]: 3.8–4.2×", "entropynet_ablation_k", X.table16),
    Claim("Table 17", "ablations: fixed anchors 2.87×, α = 1 3.21×, λ = 1 5.21× with 23.4 error", "entropynet_ablation_fixed", X.table17),
    Claim("Table 20", "NeuralSort 1.81× vs DER 4.14× (preprocessing baselines)", "entropynet_ablation_baselines", X.table20),
    Claim("Table 22", "EntropyNet overhead 0.8 ms of a 2.9 ms pipeline", "geometry_entropynet", X.table22),
    Claim("Table 25", "FA + DER: SST-2 92.7% at 75%, ImageNet 80.3% at 80%", None,
          untestable="FlashAttention is CUDA-only and no GPU was lent; the real-model analog is the MiniLM row"),
    Claim("Sec. 4 (real model)", "sparse attention keeps a pretrained encoder's outputs", "minilm_sparsity", X.minilm),
    Claim("Table 4 (real model)", "DER layouts keep quality better than magnitude top-b / structured layouts at the same "
          "budget", "minilm_distill_docs512", X.minilm_distill),
    Claim("Table 3 (long context)", "DER layouts keep a causal LM's perplexity at 75% (Phi-2: 8.2 → 9.1)",
          "exp_byte_lm_quality", X.byte_lm_quality),
    Claim("Table 26", "OGB-Arxiv geodesic 69.4 vs 65.2; STS-B Mahalanobis 85.8 vs 84.1", None,
          untestable="OGB-Arxiv / STS-B are not on this machine and nothing may download"),
    Claim("Geometry (issue 5)", "exact hull ≥10× SciPy at n=1e6, ≥5× at 1e5 (square, disk, Gaussian, parabola); "
          "Delaunay ≥1.5× at 1e5; maxima ≥3.2× the skyline at 1e6", "geometry_algos", X.geometry_algos),
    Claim("Kernel (issue 7)", "block-sparse attention ≥3× SDPA at 75% on CPU", "attention_kernel", X.kernel, siblings=True),
    Claim("Overhead (issue 7)", "DER adds ≤2% to a full training step of a small BERT and a small ViT", "der_overhead",
          X.overhead_goal, siblings=True),
    Claim("Surrogate op", "streaming H_diff op: ≥5× naive, ≤10% memory (N=1e6,k=64,d=2; N=65536,k=256,d=64); ≤2× FLOP floor at d=64", "surrogate_op", X.surrogate_op, siblings=True),
]


def _load(results: Path, stem: str) -> tuple[dict | None, str | None]:
    for name in ([stem, stem + "_quick"] if stem.startswith("exp_") else [stem]):
        p = results / f"{name}.json"
        if p.is_file():
            return json.loads(p.read_text()), p.name
    return None, None


def render(results: Path) -> str:
    lines = ["# Claims of the paper vs. what this repository measures", "",
             "Generated by `python -m der_lab.report.claims` from `benchmarks/results/*.json`; do not edit by hand.",
             "Our numbers come from CPU runs on a shared 2-core machine at small scale (see docs/experiments.md);",
             "a verdict at quick scale says whether the *direction* holds there, not that the paper's number holds.", "",
             "| where | paper | ours | verdict | source |", "|---|---|---|---|---|"]
    for c in CLAIMS:
        if c.untestable:
            ours, verdict, src = "—", f"not testable here: {c.untestable}", "—"
        else:
            d, src = _load(results, c.source)
            if d is None:
                ours, verdict, src = "—", "not measured yet", f"{c.source}.json (missing)"
            else:
                try:
                    ours, verdict = c.judge(d, results=results) if c.siblings else c.judge(d)
                except (KeyError, TypeError, IndexError, ValueError) as e:
                    ours, verdict = f"fields not recognised ({type(e).__name__}: {e})", "measured — see file"
        lines.append(f"| {c.where} | {c.paper} | {ours} | {verdict} | {src} |".replace("\n", " "))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=None, help="result JSON folder (default: the results dir)")
    p.add_argument("--out", type=Path, default=None, help="default: docs/claims.md of the checkout")
    a = p.parse_args(argv)
    a.results = results_dir(a.results)
    a.out = a.out if a.out is not None else docs_dir() / "claims.md"
    text = render(a.results)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
