"""ViT on digits: dense vs DER vs L1 vs magnitude top-b vs BigBird at equal block sparsity (Tables 4, 5, 24).

Protocol (``der exp vit-digits [--quick]``):

1. Train a dense tiny ViT and a DER ViT (``der.attention.inject``: per-head anchors on the keys,
   loss = CE + λ·H_diff) on the digits (64×64, 4×4 patches → 257 tokens); if
   ``der.attention.baselines`` provides an L1 attention penalty, also an L1 model.
2. For every sparsity (50/75/80% of key blocks dropped) build a block-sparse model through
   ``der.attention.convert`` with the same kernel for every method — DER: layouts from its anchors'
   calibrated soft assignments; magnitude top-b: the top blocks of the dense model's own attention mass
   (same selection rule, ``layouts.select_blocks``); L1: top-b of the L1 model's attention; BigBird:
   ``baselines.bigbird_layout``; and ``der_attention_rule``: the DER-trained model converted with
   ``convert(..., rule="attention")`` (layouts from its own calibrated attention mass instead of its
   anchors: which part loses accuracy, DER training or the anchor-derived layout rule?) — then fine-tune
   every sparse model for ``finetune_epochs`` epochs.
3. Report top-1, achieved block sparsity, mean contiguous run length of kept key blocks per query block
   (Table 4's "mean block length", in blocks), attention+linear FLOPs from the formula
   ``4·N²·Dh·H·density + linear layers``, and median forward latency (batch ``latency_batch``).

Wall-clock numbers on this shared 2-core machine are noisy; the JSON records the thread count.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from der.data import digits_dataset
from der_lab.experiments.common import (
    DigitsTraining,
    ViTSpec,
    accuracy,
    attention_block_scores,
    digits_vit_der,
    median_ms,
    run_experiment,
    train_classifier,
)

__all__ = ["ViTDigitsConfig", "vit_flops", "l1_loss", "run", "main"]


@dataclasses.dataclass
class ViTDigitsConfig(DigitsTraining):
    sparsities: tuple[float, ...] = (0.5, 0.75, 0.8)
    block_size: int = 16
    finetune_epochs: int = 2
    lam: float = 0.01
    alpha: float = 5.0
    l1_lam: float = 0.03  # App. A grid {0.01, 0.03, 0.1, 0.3}; 0 disables the L1 model
    l1_sparsity: float = 0.75  # the support the L1 penalty pushes mass into
    latency_batch: int = 64
    budget: str = "head"  # DER layout budget: "head" or "row" (der.attention.layouts)

    def __post_init__(self) -> None:
        if not self.sparsities or any(not 0 <= s < 1 for s in self.sparsities):
            raise ValueError(f"sparsities must be in [0, 1), got {self.sparsities}")
        if self.epochs < 1 or self.finetune_epochs < 0:
            raise ValueError(f"epochs must be >= 1 and finetune_epochs >= 0, got {self.epochs}, {self.finetune_epochs}")

    @classmethod
    def quick(cls) -> ViTDigitsConfig:
        # sized so that the dense model is well trained (≈1500 AdamW steps on the full 1347-image train split)
        # within a few minutes on 2 cores; every method gets the same epochs, seed and fine-tune budget
        return cls(sparsities=(0.75,), epochs=18, finetune_epochs=2, batch_size=16, hidden=32, heads=4,
                   latency_batch=32)

    def spec(self) -> ViTSpec:
        return ViTSpec(hidden=self.hidden, layers=self.layers, heads=self.heads, mlp=2 * self.hidden,
                       overlap=self.overlap)

    def train_key(self, variant: str) -> dict:
        """What a trained variant depends on: its checkpoint is shared by every run with the same key
        (``der exp mask-iou`` reuses the dense / DER / L1 models of ``der exp vit-digits``)."""
        keep = ("epochs", "lr", "batch_size", "train_limit", "hidden", "layers", "heads", "overlap", "block_size",
                "seed")
        key = {k: getattr(self, k) for k in keep}
        key["variant"] = variant
        if variant == "der":
            key.update(lam=self.lam, alpha=self.alpha)
        if variant == "l1":
            key.update(l1_lam=self.l1_lam, l1_sparsity=self.l1_sparsity)
        return key


def vit_flops(spec: ViTSpec, n: int, density: float) -> float:
    """Forward FLOPs per image: linear layers + attention (QKᵀ and PV) scaled by the kept-block density."""
    d, m = spec.hidden, spec.mlp
    linear = 2 * n * (4 * d * d + 2 * d * m)
    attn = 4 * n * n * d * density
    return float(spec.layers * (linear + attn))


def _fresh(cfg: ViTDigitsConfig, state: dict | None):
    return digits_vit_der(cfg.spec(), block_size=cfg.block_size, lam=cfg.lam, alpha=cfg.alpha, seed=cfg.seed,
                          state=state)


def _structured(kind: str, heads: int, n: int, block_size: int, sparsity: float, seed: int):
    from der.attention import baselines

    if kind == "bigbird":
        return baselines.bigbird_layout(n, block_size, heads, sparsity, seed=seed)
    return baselines.longformer_layout(n, block_size, heads, sparsity)


def l1_loss(lam: float, block_size: int, sparsity: float):
    """``loss_override`` for the L1 baseline: CE + Σ_layers ``baselines.l1_attention_penalty`` (eager attention)."""
    from der.attention.baselines import l1_attention_penalty

    def loss(m, x, y):
        out = m(pixel_values=x, output_attentions=True)
        pen = sum(l1_attention_penalty(a, lam, block_size, sparsity) for a in out.attentions)
        return torch.nn.functional.cross_entropy(out.logits, y) + pen, {"l1": float(pen.detach())}

    return loss


def run(cfg: ViTDigitsConfig, run_dir: Path) -> dict:
    from der.attention import BlockLayout, convert
    from der.attention.baselines import topb_mask
    from der.attention.metrics import mean_block_length
    from der_lab.experiments.minilm_distill import layout_recall, oracle_recalls

    torch.manual_seed(cfg.seed)
    data = digits_dataset(seed=cfg.seed, limit=None)
    train = data.train if cfg.train_limit is None else torch.utils.data.Subset(data.train, range(cfg.train_limit))
    xt, yt = data.test.tensors
    if cfg.test_limit is not None:
        xt, yt = xt[: cfg.test_limit], yt[: cfg.test_limit]
    spec = cfg.spec()
    n_tokens = (spec.image_size // spec.patch_size) ** 2 + 1
    # calibration (static layouts, magnitude top-b) on training images, never on the test split
    xc = torch.stack([train[i][0] for i in range(min(len(train), 256))])
    calib = [{"pixel_values": xc[i : i + 64]} for i in range(0, len(xc), 64)]
    xb = xt[: cfg.latency_batch]

    def train_variant(name: str, make_extra=None, handle_reg=True, override=None):
        model, handle = _fresh(cfg, None)
        handle.regularize = handle_reg
        extra = make_extra(handle) if make_extra is not None else None
        if override is not None:
            model.set_attn_implementation("eager")  # the L1 penalty needs the attention probabilities
        metrics = train_classifier(model, train, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                   out_dir=run_dir / name, config=cfg.train_key(name), seed=cfg.seed, extra_loss=extra,
                                   loss_override=override, on_step=lambda s: handle.step())
        model.set_attn_implementation("sdpa")
        print(f"trained {name}: train loss {metrics.get('train_loss', float('nan')):.3f}, "
              f"test top-1 {accuracy(model, xt, yt):.1f}", flush=True)
        return model, handle, metrics

    results: dict = {"methods": {}, "n_tokens": n_tokens}
    dense, dh, _ = train_variant("dense", handle_reg=False)
    recall_batches = [{"pixel_values": xt[i : i + 32]} for i in range(0, min(len(xt), 128), 32)]
    # what any layout could keep of this model's own attention at each budget (issue 14: structure check)
    results["oracle_recall"] = oracle_recalls(dense, recall_batches, cfg.sparsities, cfg.block_size)
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    dense_ms = median_ms(lambda: dense(pixel_values=xb))
    results["methods"]["dense"] = {"top1": accuracy(dense, xt, yt), "latency_ms": dense_ms,
                                   "flops": vit_flops(spec, n_tokens, 1.0), "block_sparsity": 0.0}
    der, _, _ = train_variant("der", make_extra=lambda h: lambda m, x, y, lg: (h.loss(), {"H": float(h.entropy().detach().mean())}))
    der_state = {k: v.clone() for k, v in der.state_dict().items()}
    results["methods"]["der_dense_kernel"] = {"top1": accuracy(der, xt, yt)}
    # der_attention_rule: the DER model, layouts from its own attention (ablation: training vs. layout rule)
    sources = {"der": der_state, "der_attention_rule": der_state, "magnitude_topb": dense_state}
    skipped: dict[str, str] = {}
    if cfg.l1_lam > 0:
        l1_model, _, _ = train_variant("l1", handle_reg=False,
                                       override=l1_loss(cfg.l1_lam, cfg.block_size, cfg.l1_sparsity))
        sources["l1"] = {k: v.clone() for k, v in l1_model.state_dict().items()}

    for s in cfg.sparsities:
        for method, state in list(sources.items()) + [("bigbird", dense_state), ("longformer", dense_state)]:
            model, handle = _fresh(cfg, state)
            names = [site.name for site in handle.sites]
            try:
                if method in ("der", "der_attention_rule"):
                    convert(model, sparsity=s, block_size=cfg.block_size, calib_inputs=calib, budget=cfg.budget,
                            rule="attention" if method == "der_attention_rule" else "anchors")
                else:
                    if method in ("bigbird", "longformer"):
                        lay = [_structured(method, spec.heads, n_tokens, cfg.block_size, s, cfg.seed + i)
                               for i in range(len(names))]
                    else:  # magnitude top-b of this model's own dense attention (the dense or the L1 model)
                        lay = [BlockLayout(topb_mask(sc, s), cfg.block_size, n_tokens)
                               for sc in attention_block_scores(model, calib, cfg.block_size)]
                    convert(model, sparsity=s, block_size=cfg.block_size, layouts=dict(zip(names, lay, strict=True)))
            except (ImportError, AttributeError, TypeError) as e:
                skipped[f"{method}@{s}"] = f"{type(e).__name__}: {e}"
                continue
            layouts = list(handle.converted.layouts.values())
            sp = float(sum(lay.sparsity() for lay in layouts) / len(layouts))
            before = accuracy(model, xt, yt)
            recall = layout_recall(model, handle, recall_batches)[0]  # of the source model's attention, pre-tuning
            if cfg.finetune_epochs:
                train_classifier(model, train, epochs=cfg.finetune_epochs, lr=cfg.lr / 4, batch_size=cfg.batch_size,
                                 out_dir=run_dir / f"{method}_{s}_ft", config=cfg, seed=cfg.seed)
            results["methods"][f"{method}@{s}"] = {
                "top1_before_finetune": before, "top1": accuracy(model, xt, yt), "block_sparsity": sp,
                "attention_mass_recall": recall,
                "mean_block_length": sum(mean_block_length(lay) for lay in layouts) / len(layouts),
                "flops": vit_flops(spec, n_tokens, 1 - sp), "latency_ms": median_ms(lambda m=model: m(pixel_values=xb)),
                "dense_fallbacks": dict(handle.dense_fallbacks),
            }
    results["skipped"] = skipped
    return results


def main(argv: list[str] | None = None) -> int:
    res, path = run_experiment("vit_digits", ViTDigitsConfig, run, argv, __doc__)
    _print(res)
    print(f"wrote {path}")
    return 0


def _print(res: dict) -> None:
    print(f"{'method':<22} {'top1':>6} {'sparsity':>8} {'blk len':>7} {'GFLOPs':>7} {'ms':>7}")
    for k, v in res["methods"].items():
        print(f"{k:<22} {v['top1']:>6.1f} {v.get('block_sparsity', float('nan')):>8.2f} "
              f"{v.get('mean_block_length', float('nan')):>7.2f} {v.get('flops', float('nan')) / 1e9:>7.3f} "
              f"{v.get('latency_ms', float('nan')):>7.1f}")
    for k, v in res.get("skipped", {}).items():
        print(f"skipped {k}: {v}")
