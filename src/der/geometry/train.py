r"""``der train entropynet``: train EntropyNet with DER (Alg. 1, Eq. 7, App. G.10–G.14).

.. math:: \mathcal L = \mathcal L_\text{task}(S, S') + \lambda(t)\, H_\star(S'; \Theta)

The paper leaves ``DownstreamLoss`` open (Alg. 1 line 15). We use a *hull-preservation* task loss on the
normalized moves :math:`u_i = (x'_i - x_i)/\sigma` (so every term is O(1)):

* ``w_fid · mean_i |u_i|²`` — fidelity (a Chamfer-like bound: Chamfer(S, S') ≤ mean |x' − x|²);
* ``w_hull · mean_{i ∈ hull(S)} |u_i|²`` — the input's hull vertices must stay put (hull error ≈ 0);
* ``w_out · mean_i max(0, max_e (n_e·x'_i − b_e)/σ)²`` — no point may leave the input hull, whose edge
  equations ``(n_e, b_e)`` are computed exactly (QHull) per training cloud.

Why: the downstream quantity is the hull; it is unchanged iff the hull vertices stay and nothing crosses the
hull, and every other point is free to move so that the entropy term can gather them. The entropy term is
the surrogate of the net (ball H_diff / halfspace H_soft / box), with anchors / planes learned jointly.

Defaults (App. G.10–G.11): AdamW lr 1e-3, wd 1e-4, batch 32, grad-clip 1.0, k = 16, α cosine 10 → 5 over
the first half of the λ window, λ = 0.1 switched on after 10 % of training (the paper's "epoch 20 of 200").
Data (App. G.12): clouds of ``n_points`` from the uniform square and the parabola, normalized to [0, 1]
with one scale. Checkpoints, exact resume, CSV + TensorBoard logs and the progress bar come from
:func:`der.training.fit`. ``--lam`` and ``--seed`` accept lists (the paper's grid: λ ∈ {0.01, 0.03, 0.1,
0.3}, seeds {42, 123, 456, 789, 999}); each pair trains into ``<out>/lam<λ>_seed<s>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from der.geometry.entropynet import SURROGATES, EntropyNet, EntropyNetConfig

__all__ = ["TrainConfig", "make_dataset", "task_loss", "train", "main"]


@dataclasses.dataclass
class TrainConfig:
    """Everything that determines a training run (hashed into the checkpoint for exact resume)."""

    surrogate: str = "ball"
    lam: float = 0.1  # App. G.10
    seed: int = 42  # App. G.14
    epochs: int = 20
    clouds_per_epoch: int = 320  # 10 steps of batch 32 per epoch
    batch: int = 32  # App. G.10
    n_points: int = 512
    num_anchors: int = 16  # App. G.10: min(16, n/4)
    alpha: float = 10.0
    alpha_final: float = 5.0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    warmup_frac: float = 0.1  # App. G.11: λ on from epoch 20 of 200
    widths: tuple[int, ...] = (64, 128, 256)
    head: int = 128
    dists: tuple[str, ...] = ("square", "parabola")
    w_fid: float = 1.0
    w_hull: float = 10.0
    w_out: float = 10.0
    fixed_ranges: bool = False  # ablation (Table 17): anchors / planes frozen after k-means++ seeding

    def net_config(self) -> EntropyNetConfig:
        steps = self.epochs * -(-self.clouds_per_epoch // self.batch)
        start = int(self.warmup_frac * steps)
        return EntropyNetConfig(
            widths=self.widths, head=self.head, surrogate=self.surrogate, num_anchors=self.num_anchors,
            alpha=self.alpha, alpha_final=self.alpha_final, lam=self.lam, lam_start=start,
            anneal_steps=start + max(1, (steps - start) // 2),
        )


def make_dataset(cfg: TrainConfig, count: int, seed: int) -> torch.utils.data.TensorDataset:
    """``count`` normalized clouds with their hull-vertex masks and padded hull edge equations."""
    from scipy.spatial import ConvexHull

    from der.geometry import data

    rng = np.random.default_rng(seed)
    xs, masks, eqs = [], [], []
    for i in range(count):
        raw = data.generate(cfg.dists[i % len(cfg.dists)], cfg.n_points, seed=int(rng.integers(2**31)))
        x = data.normalize_unit_square(raw, keep_aspect=True)
        hull = ConvexHull(x)
        mask = np.zeros(cfg.n_points, dtype=bool)
        mask[hull.vertices] = True
        eq = np.zeros((cfg.n_points, 3))
        eq[:, 2] = -1e3  # padding edges: n·x − b = −1e3, never active
        eq[: len(hull.equations)] = hull.equations  # rows (n_x, n_y, c) with n·x + c ≤ 0 inside
        xs.append(x)
        masks.append(mask)
        eqs.append(eq)
    f32 = torch.float32
    return torch.utils.data.TensorDataset(
        torch.tensor(np.stack(xs), dtype=f32), torch.tensor(np.stack(masks)), torch.tensor(np.stack(eqs), dtype=f32)
    )


def task_loss(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, eq: torch.Tensor, sigma: float,
              cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Hull-preservation task loss (module docstring) for ``x, y: (B, n, 2)``, ``mask: (B, n)``,
    ``eq: (B, H, 3)``."""
    u2 = ((y - x) / sigma).pow(2).sum(-1)
    fid = u2.mean()
    m = mask.to(u2.dtype)
    hull = (u2 * m).sum() / m.sum().clamp_min(1.0)
    viol = (y @ eq[..., :2].transpose(1, 2) + eq[..., 2].unsqueeze(1)).amax(-1)  # (B, n) > 0 outside
    out = torch.relu(viol / sigma).pow(2).mean()
    loss = cfg.w_fid * fid + cfg.w_hull * hull + cfg.w_out * out
    return loss, {"fid": float(fid.detach()), "hull_move": float(hull.detach()), "outside": float(out.detach())}


def _eval_fn(cfg: TrainConfig):
    from der.geometry import data
    from der.geometry.metrics import hull_area_symdiff_pct

    pts = {d: data.generate(d, 10_000, seed=cfg.seed + 7) for d in cfg.dists}

    def run(model: EntropyNet) -> dict[str, float]:
        out: dict[str, float] = {"H": float(model.surrogate.last_entropy.mean())
                                 if model.surrogate.last_entropy is not None else float("nan")}
        for name, p in pts.items():
            q = model.preprocess(p)
            out[f"{name}/kept_frac"] = len(q) / len(p)
            out[f"{name}/hull_err_pct"] = hull_area_symdiff_pct(p, q)
        return {k: v for k, v in out.items() if np.isfinite(v)}

    return run


def train(cfg: TrainConfig, out_dir: str | Path, *, progress: bool = True, resume: bool = True,
          export: str | Path | None = None, command: str | None = None,
          stop_after: int | None = None) -> tuple[EntropyNet, dict[str, Any]]:
    """Train one EntropyNet; returns the net (eval mode) and the final metrics. Writes ``out_dir``.

    ``stop_after`` ends the run after that many epochs (checkpointed; a later call resumes it)."""
    from der.training import fit, seed_everything

    if cfg.surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {cfg.surrogate!r}")
    seed_everything(cfg.seed)
    out = Path(out_dir)
    net = EntropyNet(cfg.net_config())
    ds = make_dataset(cfg, cfg.clouds_per_epoch, cfg.seed)
    net.materialize(ds.tensors[0][: cfg.batch])  # App. G.17: k-means++ seeding of anchors / planes
    if cfg.fixed_ranges:
        net.surrogate.requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # shuffling draws from the global torch RNG, which the checkpoint restores: exact resume
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch, shuffle=True, drop_last=False)

    def loss_fn(model: EntropyNet, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x, mask, eq = batch
        y = model.displace(x)
        task, logs = task_loss(x, y, mask, eq, model.config.sigma, cfg)
        reg = model.surrogate.loss(y)
        return task + reg, {**logs, "H": float(model.surrogate.last_entropy.mean()) if model.surrogate.lam else 0.0,
                            "lam": model.surrogate.lam, "alpha": model.surrogate.alpha}

    t0 = time.perf_counter()
    res = fit(net, opt, loader, loss_fn, epochs=stop_after or cfg.epochs, out_dir=out, config=dataclasses.asdict(cfg),
              eval_fn=_eval_fn(cfg), resume=resume, progress=progress, grad_clip=cfg.grad_clip,
              on_step=lambda _step: net.surrogate.step(), tensorboard=True)
    metrics = {**res.metrics, "train_seconds": time.perf_counter() - t0, "steps": res.step}
    net.eval()
    meta = {"train_config": dataclasses.asdict(cfg), "final_metrics": metrics,
            "command": command or "der train entropynet", "torch": torch.__version__}
    net.save(out / f"entropynet_{cfg.surrogate}", meta=meta)
    if export is not None:
        net.save(export, meta=meta)
    return net, metrics


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``der train entropynet [--surrogate ball] [--lam 0.1] [--seed 42] [--epochs 20] ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    d = TrainConfig()
    ap = argparse.ArgumentParser(prog="der train entropynet", description=__doc__.split("\n\n")[0])
    ap.add_argument("--surrogate", choices=SURROGATES, default=d.surrogate)
    ap.add_argument("--lam", type=_floats, default=[d.lam], help="λ or a comma list (grid)")
    ap.add_argument("--seed", type=_ints, default=[d.seed], help="seed or a comma list")
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--clouds-per-epoch", type=int, default=d.clouds_per_epoch)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--n-points", type=int, default=d.n_points)
    ap.add_argument("--num-anchors", type=int, default=d.num_anchors)
    ap.add_argument("--alpha", type=float, default=d.alpha)
    ap.add_argument("--alpha-final", type=float, default=d.alpha_final)
    ap.add_argument("--widths", type=_ints, default=list(d.widths))
    ap.add_argument("--head", type=int, default=d.head)
    ap.add_argument("--fixed-ranges", action="store_true", help="freeze anchors/planes after seeding")
    ap.add_argument("--out", default="runs/entropynet", help="output folder (checkpoint, logs, weights)")
    ap.add_argument("--export", default=None, help="also write the weights to this path (no suffix)")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    command = "der train entropynet " + " ".join(shlex.quote(v) for v in argv)
    multi = len(a.lam) * len(a.seed) > 1
    for lam in a.lam:
        for seed in a.seed:
            cfg = TrainConfig(surrogate=a.surrogate, lam=lam, seed=seed, epochs=a.epochs,
                              clouds_per_epoch=a.clouds_per_epoch, batch=a.batch, n_points=a.n_points,
                              num_anchors=a.num_anchors, alpha=a.alpha, alpha_final=a.alpha_final,
                              widths=tuple(a.widths), head=a.head, fixed_ranges=a.fixed_ranges)
            out = Path(a.out) / f"lam{lam:g}_seed{seed}" if multi else Path(a.out)
            _, m = train(cfg, out, progress=not a.no_progress, resume=not a.no_resume,
                         export=None if multi else a.export, command=command)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.items()))
            print(f"[entropynet] λ={lam:g} seed={seed} → {out}: {shown}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
