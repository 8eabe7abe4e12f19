"""Mask–object IoU on digits (the analog of Table 18 and the abstract's "IoU 0.73 vs 0.41").

``der exp mask-iou [--quick]``: the models are those of ``der exp vit-digits`` (same training fields → same
checkpoints under the same run dir, so after a vit-digits run nothing is retrained): the tiny digits ViT trained plainly (its attention top-k is the *magnitude*
mask), with DER (λ·H_diff on keys) and with the L1 attention penalty (``baselines.l1_attention_penalty``). For each test image and layer, the CLS token's attention over the 256 patches (mean over heads)
is thresholded to its top ``1 − sparsity`` fraction — the attention mask at that sparsity — and compared
with the object mask (patches whose mean intensity in the upsampled digit exceeds 0.25). Reported: mean
IoU per method and layer, and the IoU of a random mask of the same size (chance level).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from der.data import digits_dataset
from der_lab.experiments.common import DigitsTraining, digits_vit_der, run_experiment, train_classifier
from der_lab.experiments.vit_digits import ViTDigitsConfig, l1_loss

__all__ = ["MaskIoUConfig", "topk_mask", "iou", "cls_attention", "run", "main"]


@dataclasses.dataclass
class MaskIoUConfig(DigitsTraining):
    sparsity: float = 0.75
    lam: float = 0.01
    l1_lam: float = 0.03

    def __post_init__(self) -> None:
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")

    @classmethod
    def quick(cls) -> MaskIoUConfig:
        q = ViTDigitsConfig.quick()  # the vit-digits quick models
        return cls(epochs=q.epochs, batch_size=q.batch_size, lr=q.lr, hidden=q.hidden, layers=q.layers, heads=q.heads,
                   overlap=q.overlap, lam=q.lam, l1_lam=q.l1_lam)

    def vit(self) -> ViTDigitsConfig:
        """The vit-digits config whose trained variants this experiment reads."""
        return ViTDigitsConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, train_limit=self.train_limit,
                               hidden=self.hidden, layers=self.layers, heads=self.heads, overlap=self.overlap,
                               lam=self.lam, l1_lam=self.l1_lam, l1_sparsity=self.sparsity, seed=self.seed)


def topk_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Boolean mask of the top ``keep`` fraction of the last dimension."""
    k = max(1, int(round(keep * scores.shape[-1])))
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row IoU of two boolean masks ``(n, P)``."""
    inter = (a & b).sum(-1).double()
    union = (a | b).sum(-1).double().clamp_min(1)
    return inter / union


@torch.no_grad()
def cls_attention(model, x: torch.Tensor, batch: int = 64) -> list[torch.Tensor]:
    """Per layer ``(n, P)``: CLS → patch attention averaged over heads (eager attention)."""
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    model.eval()
    try:
        outs = [model(pixel_values=x[i : i + batch], output_attentions=True).attentions for i in range(0, len(x), batch)]
    finally:
        model.set_attn_implementation(prev)
    return [torch.cat([o[layer][:, :, 0, 1:].mean(1) for o in outs]) for layer in range(len(outs[0]))]


def run(cfg: MaskIoUConfig, run_dir: Path) -> dict:
    data = digits_dataset(seed=cfg.seed)
    train = data.train if cfg.train_limit is None else torch.utils.data.Subset(data.train, range(cfg.train_limit))
    x, _ = data.test.tensors
    fg = data.test_fg
    if cfg.test_limit is not None:
        x, fg = x[: cfg.test_limit], fg[: cfg.test_limit]
    vcfg = cfg.vit()
    keep = 1 - cfg.sparsity
    g = torch.Generator().manual_seed(cfg.seed)
    rand = topk_mask(torch.rand(fg.shape, generator=g), keep)
    out: dict = {"chance_iou": float(iou(rand, fg).mean()), "foreground_fraction": float(fg.float().mean()),
                 "methods": {}}
    for name in ("magnitude (plain)", "der", "l1"):
        model, handle = digits_vit_der(vcfg.spec(), block_size=vcfg.block_size, lam=vcfg.lam, alpha=vcfg.alpha,
                                       seed=vcfg.seed)
        handle.regularize = name == "der"
        variant = name.split()[0].replace("magnitude", "dense")
        override = l1_loss(cfg.l1_lam, vcfg.block_size, keep) if name == "l1" else None
        if override is not None:
            model.set_attn_implementation("eager")
        train_classifier(model, train, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                         out_dir=run_dir / variant, config=vcfg.train_key(variant), seed=cfg.seed, loss_override=override,
                         extra_loss=(lambda m, xx, y, lg, h=handle: (h.loss(), {})) if name == "der" else None,
                         on_step=lambda s, h=handle: h.step())
        model.set_attn_implementation("sdpa")
        handle.regularize = False
        per_layer = [float(iou(topk_mask(a, keep), fg).mean()) for a in cls_attention(model, x)]
        out["methods"][name] = {"iou_per_layer": per_layer, "iou_mean": sum(per_layer) / len(per_layer),
                                "iou_best_layer": max(per_layer)}
        print(f"{name:<20} IoU per layer {[round(v, 3) for v in per_layer]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    # reads the vit-digits models: after a vit-digits run this is evaluation only
    res, path = run_experiment("mask_iou", MaskIoUConfig, run, argv, __doc__, run_name="vit_digits")
    print(f"chance IoU {res['chance_iou']:.3f}; wrote {path}")
    return 0
