"""Measured tables (and one plot per experiment) from ``benchmarks/results/exp_*.json`` into docs/experiments.md.

Everything between the ``<!-- measured:begin -->`` and ``<!-- measured:end -->`` markers of
``docs/experiments.md`` is replaced; the rest of the file is left alone. Plots go next to the JSON as
``exp_<name>[_quick].png``. Nothing here is typed by hand: every number is read from a result file.

Usage: ``python -m der_lab.report.experiment_tables [--results DIR] [--doc docs/experiments.md] [--no-plots]``
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

from der_lab.harness import docs_dir, results_dir

__all__ = ["vit", "byte_lm", "lora", "robustness", "mask_iou", "render", "main"]

BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"


def _f(x, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def _pm(v: dict, key: str, nd: int = 1) -> str:
    """``v[key]``, with ``± sd`` when the file aggregates seeds (``der exp aggregate-seeds``)."""
    return _f(v.get(key), nd) + (f" ± {_f(v[key + '_std'], nd)}" if key + "_std" in v else "")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _meta(d: dict) -> str:
    m = d.get("meta", {})
    if m.get("aggregated"):
        return (f"mean ± sd over seeds {m.get('seeds')} (files {', '.join(m.get('sources', []))}), wall time "
                f"{_f(d.get('wall_seconds'), 0)} s in all, {m.get('threads', '?')} threads")
    la, lb = m.get("loadavg_start"), m.get("loadavg_end")
    load = f"load average (1 min) {_f(la[0], 2)} at start, {_f(lb[0], 2)} at end" if la and lb else "load not recorded"
    wall = f"wall time {_f(d.get('wall_seconds'), 0)} s" if d.get("wall_seconds") is not None else "wall time not recorded"
    return f"{wall}, {m.get('threads', '?')} threads, {load}; config hash `{m.get('config_hash', '?')}`"


def _goal(ok: bool, text: str) -> str:
    return f"**goal {'met' if ok else 'NOT met'}**: {text}"


def vit(d: dict) -> tuple[list[str], Callable | None]:
    m = d["methods"]
    dense = m["dense"]
    rows = []
    for k, v in m.items():
        rows.append([k, _pm(v, "top1"), _pm(v, "top1_before_finetune"), _pm(v, "attention_mass_recall", 3),
                     _f(v.get("block_sparsity"), 3),
                     _f(v.get("mean_block_length"), 2), _f(v.get("flops", math.nan) / 1e6, 1) if "flops" in v else "n/a",
                     _f(v.get("latency_ms"), 1)])
    out = _table(["method", "top-1 %", "top-1 before fine-tune", "attention-mass recall", "block sparsity",
                  "mean block length (blocks)", "MFLOPs / image", "latency ms (batch)"], rows)
    orc = d.get("oracle_recall")
    if orc:  # aggregated files hold per-seed lists under oracle_recall_seeds, single runs one dict
        runs = orc if isinstance(orc, list) else [orc]
        parts = []
        for sp in sorted(runs[0], key=float):
            dyn = [r[sp]["dynamic"] for r in runs]
            stat = [r[sp]["static"] for r in runs]
            parts.append(f"{float(sp):.0%}: per input {sum(dyn) / len(dyn):.3f}, one shared layout "
                         f"{sum(stat) / len(stat):.3f}, chance {runs[0][sp]['chance']:.3f}")
        out += ["", f"Oracle attention-mass recall of the dense model (its own top blocks on test images, mean over "
                f"{len(runs)} run(s)): " + "; ".join(parts) + ". Recall near chance means the model's attention "
                "leaves a block layout nothing to exploit: any layout at that budget drops most of the mass."]
    for s in sorted({float(k.split("@")[1]) for k in m if "@" in k}):
        der, l1, mag = m.get(f"der@{s}"), m.get(f"l1@{s}"), m.get(f"magnitude_topb@{s}")
        if der is None:
            continue
        gap = dense["top1"] - der["top1"]
        beats = [n for n, o in (("L1", l1), ("magnitude top-b", mag)) if o is not None and der["top1"] > o["top1"]]
        if abs(s - 0.75) < 1e-9:
            out += ["", _goal(gap <= 0.5 and len(beats) == 2,
                              f"at 75% DER {_f(der['top1'])} vs dense {_f(dense['top1'])} (gap {_f(gap, 2)} points, "
                              f"goal ≤ 0.5); L1 {_f(l1['top1']) if l1 else 'n/a'}, magnitude top-b "
                              f"{_f(mag['top1']) if mag else 'n/a'} (DER beats: {', '.join(beats) or 'none'})")]

    def plot(ax):
        names = list(m)
        ax.bar(range(len(names)), [m[n]["top1"] for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("test top-1 (%)")
        ax.set_ylim(max(0, min(m[n]["top1"] for n in names) - 10), 100)
        ax.set_title("ViT digits: accuracy at equal block sparsity")

    return out, plot


def byte_lm(d: dict) -> tuple[list[str], Callable | None]:
    m = d["methods"]
    rows = [[k, _f(v["val_ppl"], 3), _f(v["bits_per_byte"], 3), _f(v.get("val_ppl_before_finetune"), 3),
             _f(v.get("ppl_increase_pct"), 1), _f(v.get("block_sparsity"), 3),
             _f(v.get("kernel", {}).get("speedup"), 2), _f(v.get("rows", {}).get("mean_kept_per_row"), 2),
             _f(v.get("rows", {}).get("mean_head_max_kept_per_row"), 2), _f(v.get("latency_ms"), 1)]
            for k, v in m.items()]
    c = d.get("corpus", {})
    out = [f"Corpus: {c.get('train_bytes', '?'):,} train bytes ({c.get('train_files', '?')} files), "
           f"{c.get('val_bytes', '?'):,} validation bytes ({c.get('val_files', '?')} other files).", ""]
    out += _table(["method", "val PPL", "bits/byte", "PPL before fine-tune", "PPL rise %", "causal block sparsity",
                   "attention kernel speedup ×", "kept blocks / row (mean)", "kept blocks / row (head max)",
                   "forward ms"], rows)
    der = m.get("der")
    if der is not None:
        ok = der["ppl_increase_pct"] <= 5 and 0.70 <= der["block_sparsity"] + 1e-9 and der["kernel"]["speedup"] >= 1.5
        out += ["", _goal(ok, f"DER at causal block sparsity {_f(der['block_sparsity'], 3)}: PPL change "
                              f"{der['ppl_increase_pct']:+.2f}% vs dense (goal ≤ +5%), attention kernel "
                              f"{_f(der['kernel']['speedup'], 2)}× vs SDPA causal (goal ≥ 1.5×)")]
        if "rows" in der:
            out += ["", f"DER's layouts are uneven: {_f(der['rows']['mean_kept_per_row'], 2)} kept blocks per row on "
                        f"average but {_f(der['rows']['mean_head_max_kept_per_row'], 2)} in a head's longest row (of "
                        f"{der['rows']['blocks_per_row']}). The CPU kernel groups rows by their kept-block count "
                        "(it pays for what each row keeps, not for the longest row)."]

    def plot(ax):
        names = list(m)
        ax.bar(range(len(names)), [m[n]["val_ppl"] for n in names], color="tab:green")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("validation perplexity (bytes)")
        ax.set_title("byte LM on stdlib sources")

    return out, plot


def lora(d: dict) -> tuple[list[str], Callable | None]:
    m = d["methods"]
    rows = [["base (pre-trained, no LoRA)", _f(d["base"]["val_ppl"], 3), "", "", ""]]
    rows += [[k, _f(v["val_ppl"], 3), _f(v.get("ppl_increase_pct"), 2),
              _f(v.get("block_sparsity_der_layers"), 3), _f(v.get("latency_ms"), 1)] for k, v in m.items()]
    out = _table(["model", "val PPL", "PPL rise % vs dense LoRA", "block sparsity (DER layers)", "forward ms"], rows)
    r = m.get("der_lora")
    if r is not None:
        out += ["", f"End-to-end speedup of LoRA+DER (sparse layers only: {', '.join(r.get('sites', []))}): "
                    f"{_f(r.get('speedup_end_to_end'), 2)}×."]
    return out, None


def robustness(d: dict) -> tuple[list[str], Callable | None]:
    m = d["methods"]
    rows = [[k, _f(v["clean_top1"]), _f(v.get("mCE")), _f(v["mean_corruption_error"]), _f(v["ood_top1"]),
             _f(v.get("training_cost_vs_plain"), 2)] for k, v in m.items()]
    out = _table(["method", "clean top-1 %", "mCE (plain = 100)", "mean corruption error %", "OOD top-1 %",
                  "training time vs plain"], rows)
    der, plain, ls = m.get("der"), m.get("plain"), m.get("label_smoothing")
    if der is not None and der.get("mCE") is not None and ls is not None and ls.get("mCE") is not None:
        out += ["", _goal(der["mCE"] < plain["mCE"] and der["mCE"] < ls["mCE"],
                          f"DER mCE {_f(der['mCE'])} vs plain {_f(plain['mCE'])} and label smoothing {_f(ls['mCE'])}; "
                          f"clean accuracies span {_f(min(v['clean_top1'] for v in m.values()))}–"
                          f"{_f(max(v['clean_top1'] for v in m.values()))}%")]
    out += ["", f"OOD set: {d.get('ood_definition', '?')}."]

    def plot(ax):
        names = list(m)
        ax.bar(range(len(names)), [m[n].get("mCE") or 0 for n in names], color="tab:red")
        ax.axhline(100, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("mCE (plain = 100)")
        ax.set_title("digits corruption suite")

    return out, plot


def mask_iou(d: dict) -> tuple[list[str], Callable | None]:
    m = d["methods"]
    rows = [[k, _pm(v, "iou_mean", 3), _pm(v, "iou_best_layer", 3), ", ".join(_f(x, 3) for x in v["iou_per_layer"])]
            for k, v in m.items()]
    per_layer = "IoU per layer (first seed)" if d.get("meta", {}).get("aggregated") else "IoU per layer"
    out = _table(["method", "mean IoU", "best layer IoU", per_layer], rows)
    out += ["", f"Chance IoU (random mask of the same size) {_f(d['chance_iou'], 3)}; foreground fraction "
                f"{_f(d['foreground_fraction'], 3)}."]
    return out, None


def _reruns(results: Path, path: Path, d: dict) -> list[str]:
    """Other runs of the same config (``<stem>_*.json``, e.g. another thread count): top-1 / PPL side by side,
    to show how much the numbers move between runs that differ only in floating-point reduction order."""
    out = []
    for other in sorted(results.glob(f"{path.stem}_*.json")):
        o = json.loads(other.read_text())
        if o.get("meta", {}).get("config_hash") != d.get("meta", {}).get("config_hash"):
            continue
        first = next(iter(d["methods"].values()))
        key = next((k for k in ("top1", "iou_mean", "clean_top1", "val_ppl") if k in first), None)
        if key is None:
            continue
        nd = 1 if key in ("top1", "clean_top1") else 3
        rows = [[k, _f(v.get(key), nd), _f(o["methods"].get(k, {}).get(key), nd)] for k, v in d["methods"].items()]
        out += [f"Same config rerun `{other.name}` ({o['meta'].get('threads')} threads instead of "
                f"{d['meta'].get('threads')}; only the floating-point reduction order differs):", "",
                *_table(["method", f"{key} ({path.name})", f"{key} ({other.name})"], rows), ""]
    return out


SECTIONS: dict[str, tuple[str, Callable[[dict], tuple[list[str], Callable | None]]]] = {
    "vit_digits": ("ViT on digits (Tables 4, 5, 24 analog)", vit),
    "byte_lm": ("Byte-level LM on stdlib sources (Table 3 analog)", byte_lm),
    "lora_llama": ("LoRA + DER on a byte Llama (App. G.9 analog)", lora),
    "robustness": ("Robustness (Table 27 analog)", robustness),
    "mask_iou": ("Mask–object IoU (Table 18 analog)", mask_iou),
}


def render(results: Path, plots: bool) -> str:
    lines = [BEGIN, "", "## Measured results", "",
             "Generated by `python -m der_lab.report.experiment_tables` from `benchmarks/results/exp_*.json`; do not edit by hand.", ""]
    for name, (title, fn) in SECTIONS.items():
        path = next((results / f"exp_{name}{s}.json" for s in ("", "_quick")
                     if (results / f"exp_{name}{s}.json").is_file()), None)
        lines += [f"### {title}", ""]
        if path is None:
            lines += [f"No result file yet (`der exp {name.replace('_', '-')} --quick` writes it).", ""]
            continue
        d = json.loads(path.read_text())
        body, plot = fn(d)
        lines += [f"`{path.name}` — {_meta(d)}.", "", *body, ""]
        lines += _reruns(results, path, d)
        if plot is not None and plots:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 3.6))
            plot(ax)
            fig.tight_layout()
            png = path.with_suffix(".png")
            fig.savefig(png, dpi=110)
            plt.close(fig)
            lines += [f"![{name}](../benchmarks/results/{png.name})", ""]
    return "\n".join(lines + [END])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=None, help="result JSON folder (default: the results dir)")
    p.add_argument("--doc", type=Path, default=None, help="default: docs/experiments.md of the checkout")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    a.results = results_dir(a.results)
    a.doc = a.doc if a.doc is not None else docs_dir() / "experiments.md"
    text = a.doc.read_text() if a.doc.is_file() else "# Experiments\n"
    block = render(a.results, not a.no_plots)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    a.doc.write_text(text)
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
