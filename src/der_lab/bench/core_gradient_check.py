r"""App. E.2 check: the paper's closed form for ∇_{c_j} H_diff and its fixed point, against autograd.

Paper (App. E.2): ∇_{c_j} H = α Σ_i p_ij (p_ij − p_j)(x_i − c_j), stationary point c_j = Σ p_ij² x_i / Σ p_ij².
Derivation for d = ‖x − c‖² (∂H/∂p_l = −(log p_l + 1), ∂p_il/∂s_ij = p_il(δ_lj − p_ij), ∂s_ij/∂c_j = 2α(x_i − c_j)):

    ∇_{c_j} H = (2α/n) Σ_i p_ij (Σ_l p_il log p_l − log p_j)(x_i − c_j)

so a stationary point is c_j = Σ_i w_ij x_i / Σ_i w_ij with w_ij = p_ij (Σ_l p_il log p_l − log p_j)
(weights that can be negative), not the p_ij²-weighted centroid. This script measures both statements.
"""

from __future__ import annotations

import argparse
import json

import torch

import der.functional as F
from der_lab.harness import Run, result_path

__all__ = [
    "paper_gradient",
    "derived_gradient",
    "autograd_gradient",
    "rel_err",
    "stationary_anchors",
    "run",
    "main",
]


def paper_gradient(x, c, alpha):
    p = F.soft_assign(x, c, alpha)
    pj = p.mean(0)
    return alpha * torch.einsum("ij,ijd->jd", p * (p - pj), x[:, None, :] - c[None])


def derived_gradient(x, c, alpha):
    p = F.soft_assign(x, c, alpha)
    logp = torch.log(p.mean(0))
    w = p * ((p * logp).sum(-1, keepdim=True) - logp)
    return (2 * alpha / x.shape[0]) * torch.einsum("ij,ijd->jd", w, x[:, None, :] - c[None])


def autograd_gradient(x, c, alpha):
    c = c.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.anchor_entropy(x, c, alpha), c)
    return g


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def stationary_anchors(x, k, alpha, steps=3000, seed=0):
    """Anchors at a stationary point of H_diff (gradient descent from k-means++), float64."""
    from der.initializers import init_anchors

    c = init_anchors(x, k, "kmeans++", seed).double().requires_grad_(True)
    opt = torch.optim.Adam([c], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.anchor_entropy(x, c, alpha).backward()
        opt.step()
    return c.detach()


def run(seeds=(0, 1, 2), n=400, k=6, alpha=2.0, steps=3000) -> dict:
    rows = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x = torch.cat([torch.randn(n // 2, 2, generator=g, dtype=torch.float64) * 0.5,
                       torch.randn(n - n // 2, 2, generator=g, dtype=torch.float64) * 0.5 + 2.0])
        c = torch.randn(k, 2, generator=g, dtype=torch.float64) + 1.0
        auto = autograd_gradient(x, c, alpha)
        cs = stationary_anchors(x, k, alpha, steps, seed)
        p = F.soft_assign(x, cs, alpha)
        fixed = (p.pow(2).T @ x) / p.pow(2).sum(0)[:, None]
        rows.append({
            "seed": seed,
            "paper_grad_rel_err_vs_autograd": rel_err(paper_gradient(x, c, alpha), auto),
            "paper_grad_cosine_vs_autograd": float(torch.nn.functional.cosine_similarity(
                paper_gradient(x, c, alpha).flatten(), auto.flatten(), dim=0)),
            "derived_grad_rel_err_vs_autograd": rel_err(derived_gradient(x, c, alpha), auto),
            "grad_norm_at_stationary": float(autograd_gradient(x, cs, alpha).norm()),
            "paper_fixed_point_residual": float((fixed - cs).norm(dim=-1).max()),
            "anchor_spread": float(cs.std(0).norm()),
        })
    return {"n": n, "k": k, "alpha": alpha, "rows": rows,
            "verdict": {
                "paper_gradient_matches_autograd": all(r["paper_grad_rel_err_vs_autograd"] < 1e-6 for r in rows),
                "derived_gradient_matches_autograd": all(r["derived_grad_rel_err_vs_autograd"] < 1e-10 for r in rows),
                "paper_fixed_point_holds": all(r["paper_fixed_point_residual"] < 1e-3 for r in rows),
            }}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der bench core-gradient-check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="result JSON (default <results>/core_gradient_check.json)")
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args(argv)
    args.out = result_path("core_gradient_check.json", args.out)
    meta = Run()
    res = run(steps=args.steps)
    meta.write(args.out, res)
    print(f"{'seed':>4} {'paper grad rel.err':>20} {'derived rel.err':>16} {'|grad| at stat.':>16} {'p² fixed-pt resid':>18}")
    for r in res["rows"]:
        print(f"{r['seed']:>4} {r['paper_grad_rel_err_vs_autograd']:>20.3e} {r['derived_grad_rel_err_vs_autograd']:>16.3e} "
              f"{r['grad_norm_at_stationary']:>16.3e} {r['paper_fixed_point_residual']:>18.3e}")
    print(json.dumps(res["verdict"]))
    return 0
