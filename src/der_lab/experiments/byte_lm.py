"""Byte-level causal LM on Python's stdlib sources: dense vs DER vs BigBird/Longformer (Table 3's Phi-2 row).

``der exp byte-lm [--quick]``: a small ``LlamaForCausalLM`` (vocab 256 = bytes) is trained on the stdlib
corpus (:func:`der.data.stdlib_corpus`, train/val split **by file**) twice — dense, and with DER on
``k_proj`` (λ·H_diff). Then, at the target block sparsity, with the same block-sparse kernel:

* **DER**: ``der.attention.convert`` (static layouts from calibration on training windows, causal);
* **BigBird / Longformer**: ``der.attention.baselines`` layouts on the dense model, restricted to the
  causal lower triangle (diagonal kept), with the per-row budget b chosen so the causal block sparsity is
  as close as possible to the target;

each followed by ``finetune_steps`` steps of sparse fine-tuning. Reported: validation perplexity and bits per
byte on non-overlapping windows of held-out files, achieved causal block sparsity, end-to-end forward
latency, and the attention-kernel speedup (``block_sparse_attention`` with the learned layout vs
``F.scaled_dot_product_attention(is_causal=True)`` on the model's ``(B, H, N, Dh)``, one process, median).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from der.data import ByteWindows, stdlib_corpus
from der_lab.experiments.common import byte_llama, median_ms, run_experiment, train_lm

__all__ = ["ByteLMConfig", "evaluate", "row_stats", "run", "main"]


@dataclasses.dataclass
class ByteLMConfig:
    context: int = 1024
    block_size: int = 64
    sparsity: float = 0.75
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    steps: int = 1500
    finetune_steps: int = 150
    batch_size: int = 8
    lr: float = 1e-3
    lam: float = 0.01
    max_bytes: int = 8_000_000
    val_windows: int = 64
    seed: int = 0
    budget: str = "head"  # DER layout budget: "head" or "row" (der.attention.layouts)

    def __post_init__(self) -> None:
        if self.context < 2 * self.block_size:
            raise ValueError(f"context must be >= 2 blocks, got context={self.context}, block_size={self.block_size}")
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")

    @classmethod
    def quick(cls) -> ByteLMConfig:
        # context 1024 in 16 blocks of 64 (the full config's N and block size, the 1024–2048 range);
        # 300 steps of 4 × 1024 bytes; the same fine-tune budget goes to every sparse method
        return cls(context=1024, block_size=64, hidden=64, layers=2, steps=300, finetune_steps=40, batch_size=4,
                   lr=2e-3, max_bytes=2_000_000, val_windows=16)


def _model(cfg: ByteLMConfig):
    return byte_llama(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, context=cfg.context)


def _inject(model, cfg: ByteLMConfig):
    from der.attention import DERConfig, inject

    return inject(model, DERConfig(block_size=cfg.block_size, sparsity=cfg.sparsity, lam=cfg.lam,
                                   seq_len=cfg.context, seed=cfg.seed))


def _train(model, ds, steps: int, cfg: ByteLMConfig, out: Path, handle=None, lr: float | None = None) -> None:
    train_lm(model, ds, steps=steps, batch_size=cfg.batch_size, lr=lr or cfg.lr, seed=cfg.seed, out=out,
             config=cfg, handle=handle)


@torch.no_grad()
def evaluate(model, val: ByteWindows, n: int, batch: int = 8) -> dict:
    model.eval()
    tot, cnt = 0.0, 0
    for i in range(0, min(n, len(val)), batch):
        xs, ys = zip(*(val[j] for j in range(i, min(i + batch, n, len(val)))), strict=True)
        x, y = torch.stack(xs), torch.stack(ys)
        tot += float(F.cross_entropy(model(input_ids=x).logits.reshape(-1, 256), y.reshape(-1), reduction="sum"))
        cnt += y.numel()
    nll = tot / cnt
    return {"val_ppl": math.exp(nll), "bits_per_byte": nll / math.log(2)}


def row_stats(layouts: list) -> dict:
    """Kept causal key blocks per query-block row of ``BlockLayout`` s: mean and max over rows, heads and
    layers (a kernel that pads rows to a head's longest row costs like the max more than the mean)."""
    rows = torch.cat([lay.kept_blocks().sum(-1).flatten().double() for lay in layouts])
    per_head_max = torch.cat([lay.kept_blocks().sum(-1).amax(-1).flatten().double() for lay in layouts])
    return {"mean_kept_per_row": float(rows.mean()), "mean_head_max_kept_per_row": float(per_head_max.mean()),
            "blocks_per_row": int(layouts[0].n_blocks[1])}


def _kernel_speedup(layouts: list, cfg: ByteLMConfig) -> dict:
    """Attention-kernel time of every layer's layout (summed) vs SDPA causal on the same shapes, one process."""
    from der.attention import block_sparse_attention

    h, dh = cfg.heads, cfg.hidden // cfg.heads
    q, k, v = (torch.randn(cfg.batch_size, h, cfg.context, dh) for _ in range(3))
    lays = [lay.resize(cfg.context) for lay in layouts]
    assert all(lay.causal for lay in lays)
    dense = median_ms(lambda: [F.scaled_dot_product_attention(q, k, v, is_causal=True) for _ in lays])
    sparse = median_ms(lambda: [block_sparse_attention(q, k, v, lay) for lay in lays])
    return {"sdpa_causal_ms": dense, "block_sparse_ms": sparse, "speedup": dense / sparse, "layers": len(lays)}


def run(cfg: ByteLMConfig, run_dir: Path) -> dict:
    from der.attention import BlockLayout, convert
    from der.attention.baselines import bigbird_layout, longformer_layout

    corpus = stdlib_corpus(max_bytes=cfg.max_bytes)
    train = ByteWindows(corpus.train, cfg.context, stride=cfg.context // 4)
    val = ByteWindows(corpus.val, cfg.context)
    nb = -(-cfg.context // cfg.block_size)
    out: dict = {"corpus": {"train_bytes": len(corpus.train), "val_bytes": len(corpus.val),
                            "train_files": len(corpus.train_files), "val_files": len(corpus.val_files)},
                 "methods": {}}
    xb = torch.stack([val[i][0] for i in range(min(4, len(val)))])

    dense = _model(cfg)
    dh = _inject(dense, cfg)
    dh.regularize = False
    _train(dense, train, cfg.steps, cfg, run_dir / "dense")
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    out["methods"]["dense"] = {**evaluate(dense, val, cfg.val_windows), "latency_ms": median_ms(lambda: dense(input_ids=xb)),
                               "block_sparsity": 0.0}
    der = _model(cfg)
    derh = _inject(der, cfg)
    _train(der, train, cfg.steps, cfg, run_dir / "der", handle=derh)
    der_state = {k: v.clone() for k, v in der.state_dict().items()}
    out["methods"]["der_dense_kernel"] = evaluate(der, val, cfg.val_windows)
    tril = torch.ones(nb, nb, dtype=torch.bool).tril()
    calib = [train[i][0][None] for i in range(0, min(len(train), 64), 8)]
    for method, state in (("der", der_state), ("bigbird", dense_state), ("longformer", dense_state)):
        model = _model(cfg)
        handle = _inject(model, cfg)
        model.load_state_dict(state)
        names = [s.name for s in handle.sites]
        if method == "der":
            convert(model, sparsity=cfg.sparsity, block_size=cfg.block_size, calib_inputs=calib, budget=cfg.budget,
                    rule="anchors")
        else:
            make = bigbird_layout if method == "bigbird" else longformer_layout

            def causal(d: float, i: int, make=make, method=method) -> BlockLayout:
                lay = make(cfg.context, cfg.block_size, cfg.heads, 1 - d,
                           **({"seed": cfg.seed + i} if method == "bigbird" else {}))
                mask = (lay.mask & tril) | torch.eye(nb, dtype=torch.bool)
                return BlockLayout(mask, cfg.block_size, cfg.context, causal=True)

            # the baselines keep b blocks per full row; pick b so the causal-triangle sparsity matches DER's
            dens = min((b / nb for b in range(1, nb + 1)),
                       key=lambda d: abs(causal(d, 0).sparsity() - cfg.sparsity))
            lays = {n: causal(dens, i) for i, n in enumerate(names)}
            convert(model, sparsity=cfg.sparsity, block_size=cfg.block_size, layouts=lays)
        lays = list(handle.converted.layouts.values())
        before = evaluate(model, val, cfg.val_windows)
        if cfg.finetune_steps:
            handle.regularize = False
            _train(model, train, cfg.finetune_steps, cfg, run_dir / f"{method}_ft", lr=cfg.lr / 4)
        res = {**evaluate(model, val, cfg.val_windows), "val_ppl_before_finetune": before["val_ppl"],
               "block_sparsity": sum(lay.sparsity() for lay in lays) / len(lays),
               "latency_ms": median_ms(lambda m=model: m(input_ids=xb)),
               "kernel": _kernel_speedup(lays, cfg), "rows": row_stats(lays), "dense_fallbacks": dict(handle.dense_fallbacks)}
        res["ppl_increase_pct"] = 100 * (res["val_ppl"] / out["methods"]["dense"]["val_ppl"] - 1)
        out["methods"][method] = res
    return out


def main(argv: list[str] | None = None) -> int:
    res, path = run_experiment("byte_lm", ByteLMConfig, run, argv, __doc__)
    print(f"{'method':<18} {'ppl':>8} {'bpb':>6} {'sparsity':>8} {'kernel x':>8} {'ms':>8}")
    for k, v in res["methods"].items():
        kx = v.get("kernel", {}).get("speedup", float("nan"))
        print(f"{k:<18} {v['val_ppl']:>8.3f} {v['bits_per_byte']:>6.3f} {v.get('block_sparsity', float('nan')):>8.2f} "
              f"{kx:>8.2f} {v.get('latency_ms', float('nan')):>8.1f}")
    print(f"wrote {path}")
    return 0
