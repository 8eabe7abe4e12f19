"""docs/quality.md from the ``der exp minilm-distill`` and ``der exp byte-lm-quality`` result files: every
number is read from them, nothing typed by hand, the verdicts included.

Usage: ``python -m der_lab.report.distill [--results DIR] [--doc docs/quality.md]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from der_lab.harness import docs_dir, results_dir

__all__ = ["BYTE_LM_FILE", "FILES", "is_der", "render", "render_byte_lm", "verdict", "main"]

# documents first: unpadded long inputs are where block sparsity can save time (docs/speed.md)
FILES = ("minilm_distill_docs512.json", "minilm_distill_docs512_b16.json", "minilm_distill.json")
BYTE_LM_FILE = "exp_byte_lm_quality.json"
BYTE_LM_MEASURES = (("val_ppl", "validation perplexity"), ("ppl_increase_pct", "perplexity vs dense (%)"),
                    ("recall", "attention-mass recall"), ("kept_causal_pairs", "kept causal block pairs"))
MEASURES = (("cos_mean", "cosine to dense (mean)"), ("cos_min", "cosine (min)"),
            ("sts_spearman_vs_dense", "STS ρ vs dense"), ("recall", "attention-mass recall"),
            ("real_density", "kept real block pairs"))


def is_der(key: str) -> bool:
    """A row of the DER family: layouts through the anchors, or trained with the attention-mass term."""
    method, tune = key.partition("@")[0], key.rpartition("/")[2]
    return "anchors" in method or "mass" in tune or method.startswith("der/")


def _cell(s: dict | None) -> str:
    if s is None:
        return "–"
    n = len(s["values"])
    return f"{s['mean']:.4f} ± {s['sd']:.4f}" if n > 1 else f"{s['mean']:.4f} (1 seed)"


def _sparsity(key: str) -> float:
    return float(key.split("@")[1].split("/")[0])


def verdict(d: dict, measure: str = "cos_mean", higher: bool = True) -> list[dict]:
    """Per sparsity: the best DER row and the best other row by mean ``measure`` (``higher`` is better, else
    lower), the gap (positive: DER better) and whether DER wins by more than the larger seed sd of the two."""
    sign = 1.0 if higher else -1.0
    out = []
    for sp in sorted({_sparsity(k) for k in d["summary"]}):
        rows = {k: s[measure] for k, s in d["summary"].items() if _sparsity(k) == sp and measure in s}
        der = {k: v for k, v in rows.items() if is_der(k)}
        other = {k: v for k, v in rows.items() if not is_der(k)}
        if not der or not other:
            continue
        bd, bo = max(der, key=lambda k: sign * der[k]["mean"]), max(other, key=lambda k: sign * other[k]["mean"])
        gap = sign * (der[bd]["mean"] - other[bo]["mean"])
        spread = max(der[bd]["sd"], other[bo]["sd"])
        out.append({"sparsity": sp, "best_der": bd, "best_der_mean": der[bd]["mean"], "best_other": bo,
                    "best_other_mean": other[bo]["mean"], "gap": gap, "spread": spread,
                    "der_wins": gap > spread, "best": bd if gap > 0 else bo})
    return out


def _regime(d: dict) -> str:
    if d.get("text") == "documents":
        return (f"{d['n_eval_sentences']} held-out {d['seq_len']}-token windows of the Python Language Reference "
                f"(`pydoc_data.topics`, no padding) and {d['n_pairs']} random window pairs")
    gold = d["dense"].get("sts_spearman_vs_gold")
    return (f"{d['n_eval_sentences']} held-out sentences and {d['n_pairs']} STS pairs, padded to {d['seq_len']} "
            f"tokens" + ("" if gold is None else f" (dense STS ρ vs gold: {gold:.4f})"))


def render_one(name: str, d: dict) -> list[str]:
    """The section of one result file: settings, table, verdict lines."""
    head = "| method @ sparsity / tuning | seeds | " + " | ".join(n for _, n in MEASURES) + " |"
    lines = [f"## `{name}`", "",
             f"{_regime(d)}; blocks of {d['block_size']}; distillation: {d['steps']} steps, lr {d['lr']}, batch "
             f"{d.get('train_batch_size')}, attention-mass weight {d['mass_weight']}; complete: "
             f"{d.get('complete', False)}. Mean ± sd over seeds.", "", head, "|" + "---|" * (len(MEASURES) + 2)]
    for key, s in d["summary"].items():
        lines.append(f"| {key} | {len(s['cos_mean']['values'])} | " + " | ".join(_cell(s.get(m)) for m, _ in MEASURES)
                     + " |")
    if d.get("oracle"):
        fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
        parts = [f"{float(sp):.0%}: per input {fmt(o['dynamic'])}, one shared layout {fmt(o['static'])}, chance "
                 f"{fmt(o['chance'])}" for sp, o in sorted(d["oracle"].items())]
        lines += ["", "Oracle attention-mass recall (the dense model's own top blocks at the same budget, "
                  "real blocks only): " + "; ".join(parts) + "."]
    return lines + _verdict_lines(d, "cosine to dense", "cos_mean", True, ".4f") + [""]


def _verdict_lines(d: dict, what: str, measure: str, higher: bool, fmt: str) -> list[str]:
    lines = ["", f"Verdict ({what}; DER = anchor layouts, DER training or the attention-mass term):", ""]
    for v in verdict(d, measure, higher):
        word = "beats" if v["der_wins"] else "does not beat"
        lines.append(f"- {v['sparsity']:g}: the best DER row `{v['best_der']}` ({v['best_der_mean']:{fmt}}) {word} "
                     f"the best other `{v['best_other']}` ({v['best_other_mean']:{fmt}}) by more than the seed "
                     f"spread (gap {v['gap']:+{fmt}}, positive favours DER; sd {v['spread']:{fmt}}).")
    return lines


def render_byte_lm(d: dict) -> list[str]:
    """The section of the ``byte-lm-quality`` result: settings, dense models, table, oracle, goal, verdict."""
    cfg = d["meta"]["config"]
    dense = d["dense_models"]["dense"]
    ppl = [r["val_ppl"] for r in dense]
    lines = [f"## `{BYTE_LM_FILE}` (byte-level Llama, causal)", "",
             f"`der exp byte-lm-quality`: a {cfg['layers']}-layer byte-level Llama (hidden {cfg['hidden']}, "
             f"{cfg['heads']} heads) trained {cfg['steps']} steps on Python's stdlib sources per seed, context "
             f"{cfg['context']} ({cfg['context'] // cfg['block_size']} blocks of {cfg['block_size']}); perplexity "
             f"on {cfg['val_windows']} held-out windows of held-out files; distillation: {cfg['distill_steps']} "
             f"steps of logits KL to the dense self, lr {cfg['distill_lr']}. Dense perplexity per seed: "
             + ", ".join(f"{x:.3f}" for x in ppl) + ". `der/anchors` is a second model trained with λ·H_diff "
             f"(λ = {cfg['lam']}); its own dense-kernel perplexity: "
             + ", ".join(f"{r['val_ppl']:.3f}" for r in d["dense_models"].get("der", []))
             + "; its rows are compared with the dense model's. Mean ± sd over seeds.", "",
             "| method @ sparsity / tuning | seeds | " + " | ".join(n for _, n in BYTE_LM_MEASURES) + " |",
             "|" + "---|" * (len(BYTE_LM_MEASURES) + 2)]
    for key, s in d["summary"].items():
        lines.append(f"| {key} | {len(s['val_ppl']['values'])} | "
                     + " | ".join(_cell(s.get(m)) for m, _ in BYTE_LM_MEASURES) + " |")
    orc = d.get("oracle", {})
    if orc:
        parts = []
        for sp in sorted({sp for o in orc.values() for sp in o}, key=float):
            vals = [o[sp] for o in orc.values() if sp in o]
            parts.append(f"{float(sp):.0%}: {sum(v['dynamic'] for v in vals) / len(vals):.3f}, chance "
                         f"{vals[0]['chance']:.3f}")
        lines += ["", "Oracle attention-mass recall of the dense models (each window's own top causal blocks at the "
                  f"budget, mean over {len(orc)} seeds): "
                  + "; ".join(parts) + "."]
    ok = [k for k, s in d["summary"].items() if abs(_sparsity(k) - 0.75) < 1e-9 and s["ppl_increase_pct"]["mean"] <= 2.0]
    lines += ["", "Goal (issue 14): perplexity within 2% of dense at 75% and context ≥ 2048: "
              + (f"met by {', '.join(f'`{k}`' for k in ok)}." if ok and cfg["context"] >= 2048 else "not met.")]
    return lines + _verdict_lines(d, "perplexity vs dense, lower is better", "ppl_increase_pct", False, ".2f") + [""]


def render(files: dict[str, dict]) -> str:
    """docs/quality.md from ``{file name: result dict}`` (MiniLM files, and the byte-LM file if present)."""
    lines = ["# Quality of converted models (generated by `python -m der_lab.report.distill`)", "",
             "all-MiniLM-L6-v2 (real, pretrained; `der exp minilm-distill`) and a byte-level Llama trained here "
             "(`der exp byte-lm-quality`). Every method at the same block budget (`kept ... block pairs`: the "
             "fraction of (query block, key block) pairs over real tokens, or over the causal triangle, that the "
             "layouts computed), the same distillation steps and seeds. Goals (issue 14): MiniLM cosine ≥ 0.99 and "
             "STS ρ ≥ 0.98 at 75%; byte-LM perplexity within 2% of dense at 75%.", ""]
    for name, d in files.items():
        lines += render_byte_lm(d) if name == BYTE_LM_FILE else render_one(name, d)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m der_lab.report.distill", description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--doc", type=Path, default=None)
    args = ap.parse_args(argv)
    found = {f: json.loads((results_dir(args.results) / f).read_text()) for f in (*FILES, BYTE_LM_FILE)
             if (results_dir(args.results) / f).exists()}
    if not found:
        raise SystemExit(f"none of {FILES} in {results_dir(args.results)}: run `der exp minilm-distill` first")
    doc = args.doc or docs_dir() / "quality.md"
    doc.write_text(render(found))
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
