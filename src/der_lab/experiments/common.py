"""Shared pieces of the experiments: tiny HF ViTs and Llamas, training/eval, timing, results.

Every experiment module defines a frozen-ish ``@dataclass`` config with a ``quick()`` classmethod and a
``main(argv)`` that calls :func:`run_experiment`: :func:`der_lab.harness.parse_config` (``--quick`` picks
the quick defaults; every field is also a ``--flag``), the run, and :func:`write_result` of
``<results>/exp_<name>[_quick].json``. Models shared by several experiments live here, public
(``vit-digits`` and ``mask-iou`` share :func:`digits_vit_der`; ``byte-lm`` and ``lora-llama`` share
:func:`byte_llama` and :func:`train_lm`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from der.attention.layout import block_mass
from der.training import config_hash, fit, seed_everything
from der_lab.harness import Run, parse_config, result_path, time_call

__all__ = [
    "write_result",
    "run_experiment",
    "DigitsTraining",
    "digits_vit_der",
    "byte_llama",
    "train_lm",
    "ViTSpec",
    "tiny_vit",
    "VIBHead",
    "train_classifier",
    "accuracy",
    "median_ms",
    "attention_block_scores",
]

C = TypeVar("C")

def write_result(name: str, cfg: Any, quick: bool, payload: dict, out: Path | None = None,
                 run: Run | None = None) -> Path:
    """``<results>/exp_<name>[_quick].json`` (or ``out``) with config, hash and :class:`Run` metadata."""
    path = result_path(f"exp_{name}{'_quick' if quick else ''}.json", out)
    meta = {"experiment": name, "quick": quick, "config": dataclasses.asdict(cfg), "config_hash": config_hash(cfg)}
    return (run or Run()).write(path, {**payload, "meta": meta})


def run_experiment(name: str, cls: type, run: Callable[[Any, Path], dict], argv: list[str] | None, doc: str,
                   run_name: str | None = None) -> tuple[dict, Path]:
    """The ``main`` shared by the experiments: parse ``cls`` from ``argv``, run it in
    ``runs/<run_name or name>[_quick]`` (or ``--run-dir``), time it and write its result JSON."""
    cfg, ns = parse_config(cls, argv, f"der exp {name.replace('_', '-')}", doc.split("\n\n")[0])
    run_dir = ns.run_dir or Path("runs") / f"{run_name or name}{'_quick' if ns.quick else ''}"
    t0 = time.perf_counter()
    res = run(cfg, run_dir)
    res["wall_seconds"] = time.perf_counter() - t0
    return res, write_result(name, cfg, ns.quick, res, ns.out, ns.run)


# ----------------------------------------------------------------------------- models
@dataclasses.dataclass
class DigitsTraining:
    """Training settings shared by the digits-ViT experiments (vit-digits, mask-iou, robustness)."""

    epochs: int = 12
    lr: float = 2e-3
    batch_size: int = 64
    train_limit: int | None = None
    test_limit: int | None = None
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    overlap: int = 4  # overlapping patch embedding (12×12 pixel kernel, stride 4): same 257 tokens
    seed: int = 0


@dataclasses.dataclass
class ViTSpec:
    """A small HF ViT for the 64×64 digits: 16×16 = 256 patches + CLS = 257 tokens."""

    image_size: int = 64
    patch_size: int = 4
    channels: int = 1
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    mlp: int = 128
    num_labels: int = 10
    dropout: float = 0.0
    overlap: int = 0  # >0: overlapping patch embedding (kernel patch+2·overlap, same stride → same tokens)


def tiny_vit(spec: ViTSpec, attn_implementation: str = "sdpa") -> nn.Module:
    """``ViTForImageClassification`` from a config (random init; no download)."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=spec.image_size, patch_size=spec.patch_size, num_channels=spec.channels,
                    hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                    intermediate_size=spec.mlp, num_labels=spec.num_labels, hidden_dropout_prob=spec.dropout,
                    attention_probs_dropout_prob=0.0, attn_implementation=attn_implementation)
    model = ViTForImageClassification(cfg)
    if spec.overlap:
        if spec.overlap < 0:
            raise ValueError(f"overlap must be >= 0, got {spec.overlap}")
        # overlapping patches (as in CvT / PVT v2): each token sees (patch + 2·overlap)² pixels; the token grid,
        # hence N, is unchanged. Small data needs this locality to train a ViT in minutes.
        model.vit.embeddings.patch_embeddings.projection = nn.Conv2d(
            spec.channels, spec.hidden, kernel_size=spec.patch_size + 2 * spec.overlap, stride=spec.patch_size,
            padding=spec.overlap)
    return model


def digits_vit_der(spec: ViTSpec, *, block_size: int, lam: float, alpha: float, seed: int,
                   state: dict | None = None) -> tuple[nn.Module, Any]:
    """A :func:`tiny_vit` with DER injected into its keys (``der.attention.inject``), optionally loaded from
    ``state``; returns ``(model, handle)``."""
    from der.attention import DERConfig, inject

    model = tiny_vit(spec)
    handle = inject(model, DERConfig(block_size=block_size, lam=lam, alpha=alpha, seed=seed))
    if state is not None:
        model.load_state_dict(state)
    return model, handle


def byte_llama(*, hidden: int, layers: int, heads: int, context: int) -> nn.Module:
    """A byte-level ``LlamaForCausalLM`` (vocabulary 256, tied embeddings, SDPA; random init, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=context,
                    attn_implementation="sdpa", tie_word_embeddings=True)
    return LlamaForCausalLM(c)


def train_lm(model: nn.Module, ds: Dataset, *, steps: int, batch_size: int, lr: float, seed: int, out: Path,
             config: Any, handle: Any = None) -> None:
    """Next-byte cross-entropy (+ ``handle.loss()`` while it regularizes) for ``steps`` AdamW steps on
    batches drawn with replacement from ``ds``, one-cycle schedule, through :func:`der.training.fit`
    (``config`` keys its checkpoint in ``out``)."""
    seed_everything(seed)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(ds), (steps * batch_size,), generator=g).tolist()
    loader = DataLoader(Subset(ds, idx), batch_size=batch_size, shuffle=False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)

    def loss_fn(m, batch):
        x, y = batch
        logits = m(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        if handle is not None and handle.regularize:
            return loss + handle.loss(), {"ce": float(loss.detach())}
        return loss

    fit(model, opt, loader, loss_fn, epochs=1, out_dir=out, config=config, scheduler=sched,
        on_step=(lambda s: handle.step()) if handle is not None else None)


class VIBHead(nn.Module):
    """Variational information bottleneck head (Alemi et al., 2017): z ~ N(μ, σ²), KL to N(0, I) in ``.kl``."""

    def __init__(self, hidden: int, z_dim: int, num_labels: int) -> None:
        super().__init__()
        self.enc = nn.Linear(hidden, 2 * z_dim)
        self.dec = nn.Linear(z_dim, num_labels)
        self.kl = torch.zeros(())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.enc(h).chunk(2, dim=-1)
        logvar = logvar.clamp(-10, 10)
        self.kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1).mean()
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return self.dec(z)


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x) if hasattr(model, "config") else model(x)
    return out.logits if hasattr(out, "logits") else out


ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict]"]


def train_classifier(model: nn.Module, train: Dataset, *, epochs: int, lr: float, batch_size: int, out_dir: Path,
                     config: Any, seed: int = 0, extra_loss: ExtraLoss | None = None,
                     loss_override: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     on_step: Callable[[int], None] | None = None, label_smoothing: float = 0.0,
                     params: Iterable[nn.Parameter] | None = None, progress: bool = False) -> dict:
    """Cross-entropy (+ ``extra_loss``) training with AdamW + cosine schedule through :func:`der.training.fit`."""
    seed_everything(seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=False,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(list(params) if params is not None else model.parameters(), lr=lr, weight_decay=0.05)
    total = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, total // 10))
                                              * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / total)).item()))

    def loss_fn(m: nn.Module, batch):
        x, y = batch
        if loss_override is not None:
            return loss_override(m, x, y)
        logits = logits_of(m, x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        logs = {"ce": float(loss.detach())}
        if extra_loss is not None:
            extra, more = extra_loss(m, x, y, logits)
            loss = loss + extra
            logs.update(more)
        return loss, logs

    res = fit(model, opt, loader, loss_fn, epochs=epochs, out_dir=out_dir, config=config, scheduler=sched,
              progress=progress, tensorboard=True, on_step=on_step)
    return res.metrics


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([logits_of(model, x[i : i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((predict(model, x, batch_size) == y).float().mean())


def median_ms(fn: Callable[[], Any], warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of ``fn()`` without autograd, in milliseconds (:func:`der_lab.harness.time_call`)."""
    with torch.no_grad():
        return 1e3 * time_call(fn, warmup=warmup, repeats=repeats).median_s


@torch.no_grad()
def attention_block_scores(model: nn.Module, batches: Iterable[dict], block_size: int) -> list[torch.Tensor]:
    """Per layer ``(H, nb, nb)`` mean dense attention mass per (query block, key block) — the magnitude
    statistic of the top-b baseline (Table 4). Runs the model with eager attention and
    ``output_attentions=True``; restores the previous implementation afterwards."""
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    was = model.training
    model.eval()
    sums: list[torch.Tensor] | None = None
    count = 0
    try:
        for b in batches:
            att = model(**b, output_attentions=True).attentions  # L × (B, H, N, N)
            if sums is None:
                sums = [torch.zeros_like(a[0], dtype=torch.float64) for a in att]
            for s, a in zip(sums, att, strict=True):
                s += a.double().sum(0)
            count += att[0].shape[0]
    finally:
        model.set_attn_implementation(prev)
        model.train(was)
    if sums is None:
        raise ValueError("no batches given")
    return [block_mass(s / count, block_size) for s in sums]
