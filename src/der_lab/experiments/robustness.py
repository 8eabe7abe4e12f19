"""Robustness on digits (the analog of Table 27): corruption mCE, OOD accuracy, clean accuracy, cost.

``der exp robustness [--quick]`` trains the same tiny ViT six ways — plain, label smoothing (ε=0.1),
confidence penalty (loss − β·H(softmax), Pereyra et al. 2017), variational information bottleneck on the
CLS feature (Alemi et al. 2017), FGSM adversarial training (Goodfellow et al. 2015; 50/50 clean/adversarial,
ε in pixel units), and DER (λ·H_diff on the attention keys via ``der.attention.inject``) — and evaluates

* clean top-1 on the digits test split;
* the 16 asset-free CIFAR-C corruptions of :mod:`der_lab.experiments.corruptions` at 5 severities
  (spatial scale: upsampled digits carry detail at 8×8, so ``scale = W/16``), mCE normalized by the
  plain model (Hendrycks & Dietterich; plain = 100) plus the unnormalized mean corruption error;
* OOD accuracy on **shifted digits** (defined here): every test digit rotated by U(−30°, 30°), scaled by
  U(0.75, 1.1), translated by U(−12%, 12%) of the width, on a fog-like plasma background of amplitude 0.35;
* training cost relative to plain: median forward + backward time of one training step of each method's
  loss on the same batch, all timed in one process after training (wall times of the training runs are
  kept too, but they depend on what else ran on the machine).

"Matched clean accuracy" is approached by training every method for the same epochs and reporting clean
accuracy next to mCE; the JSON says how far apart they ended up.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from der.data import digits_dataset
from der_lab.experiments.common import (
    DigitsTraining,
    VIBHead,
    ViTSpec,
    accuracy,
    logits_of,
    run_experiment,
    tiny_vit,
    train_classifier,
)
from der_lab.experiments.corruptions import CORRUPTIONS, corrupt, mce, plasma_fractal
from der_lab.harness import time_call

__all__ = ["RobustnessConfig", "shifted_digits", "step_ms", "run", "main"]

METHODS = ("plain", "label_smoothing", "confidence_penalty", "vib", "fgsm", "der")


@dataclasses.dataclass
class RobustnessConfig(DigitsTraining):
    methods: tuple[str, ...] = METHODS
    label_smoothing: float = 0.1
    confidence_beta: float = 0.1
    vib_beta: float = 1e-3
    vib_dim: int = 32
    fgsm_eps: float = 0.1  # in [0, 1] pixel units
    der_lam: float = 0.01
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or "plain" not in self.methods:
            raise ValueError(f"methods must include 'plain' (the mCE reference) and be among {METHODS}, got {self.methods}")
        bad = [c for c in self.corruptions if c not in CORRUPTIONS]
        if bad:
            raise ValueError(f"unknown corruptions {bad}; expected among {sorted(CORRUPTIONS)}")

    @classmethod
    def quick(cls) -> RobustnessConfig:
        # the vit-digits quick model and schedule (full train split, batch 16, 18 epochs); same epochs and seed
        # for every method; 300 test images × 16 corruptions × 5 severities keep the evaluation short
        return cls(epochs=18, batch_size=16, test_limit=300, hidden=32, heads=4)

    def train_key(self, method: str) -> dict:
        """What a trained method depends on (its checkpoint is reused by any run with the same key, e.g. a
        second process training some of the methods in parallel)."""
        skip = {"methods", "corruptions", "test_limit"}
        return {"method": method, **{k: v for k, v in dataclasses.asdict(self).items() if k not in skip}}


def shifted_digits(raw: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The OOD set: random rotation/scale/translation on a plasma-fractal background (see module doc)."""
    rng = np.random.default_rng(seed)
    n, _, h, w = raw.shape
    ang = torch.tensor(rng.uniform(-30, 30, n) * math.pi / 180, dtype=torch.float32)
    sc = torch.tensor(rng.uniform(0.75, 1.1, n), dtype=torch.float32)
    tr = torch.tensor(rng.uniform(-0.24, 0.24, (n, 2)), dtype=torch.float32)  # ±12% of width (grid is [-1, 1])
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) / sc, -torch.sin(ang) / sc
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) / sc, torch.cos(ang) / sc
    theta[:, :, 2] = tr
    grid = F.affine_grid(theta, list(raw.shape), align_corners=False)
    moved = F.grid_sample(raw, grid, padding_mode="zeros", align_corners=False)
    size = 1 << max(h, w, 2).bit_length()
    bg = torch.from_numpy(np.stack([plasma_fractal(size, 2.0, rng)[:h, :w] for _ in range(n)]).astype(np.float32))
    return torch.maximum(moved, 0.35 * bg[:, None]).clamp(0, 1)


def _model(cfg: RobustnessConfig, method: str):
    model = tiny_vit(ViTSpec(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, mlp=2 * cfg.hidden,
                             overlap=cfg.overlap))
    if method == "vib":
        model.classifier = VIBHead(cfg.hidden, cfg.vib_dim, 10)
    return model


def _loss_kwargs(cfg: RobustnessConfig, method: str, model, data) -> dict:
    """The ``train_classifier`` keyword arguments that make ``method``'s training loss."""
    kw: dict = {}
    if method == "label_smoothing":
        kw["label_smoothing"] = cfg.label_smoothing
    elif method == "confidence_penalty":
        def conf(m, x, y, logits):
            ent = -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum(-1).mean()
            return -cfg.confidence_beta * ent, {"out_entropy": float(ent.detach())}
        kw["extra_loss"] = conf
    elif method == "vib":
        kw["extra_loss"] = lambda m, x, y, logits: (cfg.vib_beta * m.classifier.kl, {"kl": float(m.classifier.kl.detach())})
    elif method == "fgsm":
        lo, hi = data.normalize(torch.tensor(0.0)), data.normalize(torch.tensor(1.0))
        eps = cfg.fgsm_eps / data.std

        def fgsm(m, x, y):
            xa = x.detach().clone().requires_grad_(True)
            g, = torch.autograd.grad(F.cross_entropy(logits_of(m, xa), y), xa)
            adv = (x + eps * g.sign()).clamp(lo, hi).detach()
            return 0.5 * F.cross_entropy(logits_of(m, x), y) + 0.5 * F.cross_entropy(logits_of(m, adv), y)
        kw["loss_override"] = fgsm
    elif method == "der":
        from der.attention import DERConfig, inject

        handle = inject(model, DERConfig(lam=cfg.der_lam, seed=cfg.seed))
        kw["extra_loss"] = lambda m, x, y, logits: (handle.loss(), {"H": float(handle.entropy().detach().mean())})
        kw["on_step"] = lambda s: handle.step()
    return kw


def step_ms(model, kw: dict, x: torch.Tensor, y: torch.Tensor, repeats: int = 5) -> float:
    """Median time of one training step's forward + backward (no optimizer) of a method's loss on one batch:
    all methods timed in the same process at the end of the run (the "training cost" column)."""
    def step() -> None:
        if "loss_override" in kw:
            loss = kw["loss_override"](model, x, y)
        else:
            logits = logits_of(model, x)
            loss = F.cross_entropy(logits, y, label_smoothing=kw.get("label_smoothing", 0.0))
            if "extra_loss" in kw:
                loss = loss + kw["extra_loss"](model, x, y, logits)[0]
        model.zero_grad(set_to_none=True)
        loss.backward()

    model.train()
    t = time_call(step, warmup=2, repeats=repeats)
    model.eval()
    return 1e3 * t.median_s


def _train(cfg: RobustnessConfig, method: str, model, train, run_dir: Path, data) -> tuple[dict, dict]:
    kw = _loss_kwargs(cfg, method, model, data)
    t0 = time.perf_counter()
    metrics = train_classifier(model, train, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                               out_dir=run_dir / method, config=cfg.train_key(method), seed=cfg.seed, **kw)
    metrics["train_seconds"] = time.perf_counter() - t0  # this process only (0 when resumed from a finished run)
    return metrics, kw


def run(cfg: RobustnessConfig, run_dir: Path) -> dict:
    data = digits_dataset(seed=cfg.seed)
    train = data.train if cfg.train_limit is None else torch.utils.data.Subset(data.train, range(cfg.train_limit))
    raw, y = data.test_raw, data.test.tensors[1]
    if cfg.test_limit is not None:
        raw, y = raw[: cfg.test_limit], y[: cfg.test_limit]
    scale = raw.shape[-1] / 16
    corrupted = {c: [data.normalize(corrupt(raw, c, s, seed=cfg.seed, scale=scale)) for s in range(1, 6)]
                 for c in cfg.corruptions}
    ood = data.normalize(shifted_digits(raw, seed=cfg.seed + 1))
    per: dict[str, dict] = {}
    trained: dict[str, tuple] = {}
    for method in cfg.methods:
        model = _model(cfg, method)
        m, kw = _train(cfg, method, model, train, run_dir, data)
        trained[method] = (model, kw)
        clean = accuracy(model, data.normalize(raw), y)
        errs = {c: [100 - accuracy(model, xs, y) for xs in corrupted[c]] for c in cfg.corruptions}
        per[method] = {"clean_top1": clean, "errors": errs, "ood_top1": accuracy(model, ood, y),
                       "mean_corruption_error": float(np.mean([np.mean(e) for e in errs.values()])),
                       "train_seconds": m["train_seconds"], "train_loss": m.get("train_loss")}
        print(f"{method:<20} clean {clean:5.1f}  mean CE {per[method]['mean_corruption_error']:5.1f}  "
              f"OOD {per[method]['ood_top1']:5.1f}  {m['train_seconds']:.0f}s", flush=True)
    xb, yb = data.train.tensors[0][: cfg.batch_size], data.train.tensors[1][: cfg.batch_size]
    for method, (model, kw) in trained.items():
        per[method]["train_step_ms"] = step_ms(model, {k: v for k, v in kw.items() if k != "on_step"}, xb, yb)
    ref = per["plain"]["errors"]
    for r in per.values():
        try:
            r["mCE"] = mce(r["errors"], ref)
        except ValueError as e:  # plain model perfect on some corruption
            r["mCE"], r["mCE_error"] = None, str(e)
        r["training_cost_vs_plain"] = r["train_step_ms"] / per["plain"]["train_step_ms"]
    return {"methods": per, "ood_definition": "rotation U(-30,30) deg, scale U(0.75,1.1), shift U(-12%,12%), "
            "plasma background amplitude 0.35", "corruption_scale": scale}


def main(argv: list[str] | None = None) -> int:
    res, path = run_experiment("robustness", RobustnessConfig, run, argv, __doc__)
    print(f"{'method':<20} {'clean':>6} {'mCE':>6} {'meanCE':>6} {'OOD':>6} {'cost':>5}")
    for k, v in res["methods"].items():
        mc = f"{v['mCE']:.1f}" if v["mCE"] is not None else "n/a"
        print(f"{k:<20} {v['clean_top1']:>6.1f} {mc:>6} {v['mean_corruption_error']:>6.1f} {v['ood_top1']:>6.1f} "
              f"{v['training_cost_vs_plain']:>5.2f}")
    print(f"wrote {path}")
    return 0
