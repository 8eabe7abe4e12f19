r"""The paper's cost reducers for the soft counts (App. A, G.4, G.11): subsampling and truncation.

Both approximate :math:`n_j = \sum_i \operatorname{softmax}_j(f_i^\top W_j + b_j)` (see :mod:`der._ops`):

* :func:`subsampled_counts` — the counts of ``m`` random points per set, scaled by ``N/m`` (unbiased for
  ``n``; the entropy of the estimate is biased low by ``O(k/m)``).
* :func:`truncated_counts` — each point's softmax restricted to its ``r`` largest logits (= its ``r``
  nearest anchors for the sqeuclidean form), found exactly (chunked top-r, no gradient) or by FAISS
  maximum-inner-product search on the augmented vectors ``[f, 1]·[W_j, b_j]`` (App. G.11: IVF index;
  ``IndexFlatIP`` when there are too few anchors to train one). Per point the truncated softmax differs
  from the full one by ``2ε_i`` in L1, with ``ε_i`` the dropped mass, so ``‖n̂ − n‖₁ ≤ 2Σ_i ε_i``
  (checked in the tests). The gathered logits cost ``O(N·r·f)``; chunks are checkpointed so the memory
  kept for backward is ``O(N·r)`` (the indices), not ``O(N·r·f)``.

:func:`approximation_error` measures either reducer against the exact streaming value.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from der._ops.streaming import DEFAULT_CHUNK_ELEMS, _Layout, _rows_per_chunk

__all__ = ["approximation_error", "nearest_anchors", "subsampled_counts", "truncated_counts"]


def subsampled_counts(
    feat: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(N/num)·Σ_{i∈S} softmax(f_i W^T + b)`` over ``num`` points drawn without replacement (same rows for
    every set in the batch): ``(..., k)``. ``num ≥ N`` gives the exact counts."""
    from der._ops import softmax_counts

    n = feat.shape[-2]
    if not (isinstance(num, int) and num >= 1):
        raise ValueError(f"num must be an int ≥ 1, got {num!r}")
    if num >= n:
        return softmax_counts(feat, weight, bias)
    rows = torch.randperm(n, generator=generator, device="cpu")[:num].to(feat.device)
    return softmax_counts(feat.index_select(-2, rows), weight, bias) * (n / num)


def _faiss_topr(
    feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, r: int, nprobe: int
) -> torch.Tensor:
    try:
        import faiss
        import numpy as np
    except ImportError as e:  # pragma: no cover - faiss is an optional extra
        raise ValueError("method='faiss' needs the faiss extra (pip install 'der[faiss]')") from e
    if weight.dim() != 2 or bias.dim() != 1:
        raise ValueError(
            f"method='faiss' needs shared parameters weight (k, f), bias (k,); got {tuple(weight.shape)}, "
            f"{tuple(bias.shape)} (use method='exact' for per-set parameters)"
        )
    k, f = weight.shape
    base = torch.cat([weight, bias[:, None]], 1).detach().float().cpu().numpy()
    q = feat.detach().reshape(-1, f).float().cpu()
    q = torch.cat([q, torch.ones(q.shape[0], 1)], 1).numpy()
    nlist = min(256, k // 39)  # App. G.11: IVF with 256 lists; faiss wants ≥ 39 training points per list
    if nlist >= 2:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(f + 1), f + 1, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(np.ascontiguousarray(base))
        index.nprobe = min(nprobe, nlist)
    else:
        index = faiss.IndexFlatIP(f + 1)
    index.add(np.ascontiguousarray(base))
    _, idx = index.search(np.ascontiguousarray(q), r)
    idx = torch.from_numpy(idx).to(feat.device)
    # IVF may return fewer than r hits (-1): repeat the best hit, whose duplicate is masked out below.
    idx = torch.where(idx < 0, idx[:, :1], idx)
    return idx.reshape(*feat.shape[:-1], r)


def nearest_anchors(
    feat: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    r: int,
    method: str = "exact",
    nprobe: int = 16,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """Indices ``(..., N, r)`` of each point's ``r`` largest logits ``f·W_j + b_j`` (no gradient)."""
    k = weight.shape[-2]
    if not (isinstance(r, int) and 1 <= r <= k):
        raise ValueError(f"r must be an int in [1, k={k}], got {r!r}")
    if method == "faiss":
        return _faiss_topr(feat, weight, bias, r, nprobe)
    if method != "exact":
        raise ValueError(f"method must be 'exact' or 'faiss', got {method!r}")
    with torch.no_grad():
        lay = _Layout(feat, weight, bias)
        C = _rows_per_chunk(lay.B, lay.N, lay.k, chunk_elems)
        parts = [
            lay.logits(lay.feat_chunk(feat, s, s + C)).topk(r, dim=-1).indices for s in range(0, lay.N, C)
        ]
        return torch.cat(parts, dim=1).reshape(*lay.batch_shape, lay.N, r)


def _chunk_truncated_counts(
    fc: torch.Tensor, W: torch.Tensor, b: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """``fc (B,C,f)``, ``W (B,k,f)``, ``b (B,k)``, ``idx (B,C,r)`` → ``(B,k)`` counts of the truncated softmax."""
    B, C, r = idx.shape
    flat = idx.reshape(B, C * r, 1)
    Wg = torch.gather(W, 1, flat.expand(B, C * r, W.shape[-1])).reshape(B, C, r, -1)
    logits = (Wg @ fc.unsqueeze(-1)).squeeze(-1) + torch.gather(b, 1, flat.squeeze(-1)).reshape(B, C, r)
    # a repeated index (FAISS padding) counts once
    dup = torch.zeros_like(idx, dtype=torch.bool)
    dup[..., 1:] = (idx[..., 1:, None] == idx[..., None, :-1]).tril().any(-1)
    p = torch.softmax(logits.masked_fill(dup, -math.inf), dim=-1)
    return torch.zeros_like(b).scatter_add(1, idx.reshape(B, C * r), p.reshape(B, C * r))


def truncated_counts(
    feat: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    r: int,
    method: str = "exact",
    nprobe: int = 16,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """Soft counts with each point's softmax truncated to its ``r`` nearest anchors: ``(..., k)``.

    Differentiable w.r.t. ``feat``, ``weight``, ``bias`` (the neighbour sets are held fixed, as in the
    paper's FAISS schedule). ``r = k`` with ``method='exact'`` equals the exact counts.
    """
    idx = nearest_anchors(feat, weight, bias, r, method, nprobe, chunk_elems)
    lay = _Layout(feat, weight, bias)
    b = lay.b.squeeze(1)
    idx = idx.expand(*lay.batch_shape, lay.N, r).reshape(lay.B, lay.N, r)
    C = _rows_per_chunk(lay.B, lay.N, r * max(1, lay.f), chunk_elems)
    total = None
    for s in range(0, lay.N, C):
        fc, ic = lay.feat_chunk(feat, s, s + C), idx[:, s : s + C]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (feat, weight, bias))
        part = (
            checkpoint(_chunk_truncated_counts, fc, lay.W, b, ic, use_reentrant=False)
            if grad
            else _chunk_truncated_counts(fc, lay.W, b, ic)
        )
        total = part if total is None else total + part
    return total.reshape(*lay.batch_shape, lay.k)


def approximation_error(
    feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approx: torch.Tensor
) -> dict[str, float]:
    """Errors of approximate counts ``approx`` vs the exact streaming counts: relative L1 of the counts and
    absolute error of the entropy (nats) of ``counts/Σcounts`` (Eq. 3), maximized over the batch."""
    from der._ops import softmax_counts
    from der.functional import entropy_from_counts as ent

    with torch.no_grad():
        exact = softmax_counts(feat, weight, bias).double()
        approx = approx.detach().double()
        rel_l1 = ((approx - exact).abs().sum(-1) / exact.sum(-1)).max()
        return {
            "counts_rel_l1": float(rel_l1),
            "entropy_abs_err": float((ent(approx) - ent(exact)).abs().max()),
        }
