r"""Layout rules of ``convert``: per-head block layouts from the learned soft assignments (Sec. 4 "freeze
per-head top-b supports … enforcing block contiguity"; App. E.4, Theorem 2), from the model's own calibrated
attention (``rule="attention"``), and the block selection both share.

The anchor rule
---------------
Let :math:`p_{ij}` be the soft assignment of token :math:`i`'s key to anchor :math:`j` (Eq. 2) for one head,
and split the N tokens into ``nb = ceil(N / bs)`` contiguous blocks of ``bs`` tokens (the last one may be
short; missing tokens carry no mass).

1. **Key-block mass** :math:`M_{bj} = \sum_{i \in b} p_{ij}` and cluster size :math:`n_j = \sum_b M_{bj}`.
2. **Query-block routing** :math:`R_{aj} = \frac{1}{|a|}\sum_{t \in a} r_{tj}` with
   :math:`r_{tj} = \mathrm{softmax}_j\big(s\, q_t\!\cdot c_j + \log n_j\big)` — the attention query
   :math:`t` pays to cluster :math:`j` when every key of the cluster is replaced by its anchor (``s`` is the
   attention's softmax scale, :math:`n_j` the cluster's soft size in this sequence; App. E.4's cluster
   approximation). When the queries are not available (custom targets), :math:`r_{tj} = p_{tj}` — a query
   routes to its own token's key cluster (shared query/key routing, as in the Routing Transformer).
3. **Block score** :math:`S_{ab} = \sum_j R_{aj}\, M_{bj} / n_j` — the attention mass query block
   :math:`a` puts on key block :math:`b` if each query spreads its attention uniformly over the keys of its
   clusters (the cluster approximation behind Theorem 2: attention outside the high-mass clusters
   :math:`S^*` is the truncation error). Every row of :math:`S` sums to 1.
4. **Selection with an exact budget.** With ``nv`` valid blocks (``nb²``, or ``nb(nb+1)/2`` under a causal
   mask) the head keeps exactly ``K = max(nb, round((1 - sparsity) · nv))`` blocks: the diagonal block of
   every query block (a token always sees its own block, so no row is empty) plus the ``K - nb``
   highest-scoring remaining blocks over the whole head (rows whose routing is concentrated keep fewer
   blocks, diffuse rows more — a per-head top-b over blocks, b = K/nb on average). Ties are broken towards
   the diagonal, so equal scores grow contiguous runs. With ``budget="row"`` each query block instead keeps
   its own best ``b = max(1, round((1 - sparsity) · valid))`` blocks (diagonal first): uniform rows, which
   the kernels pad least (per-head budgets can give rows of very different lengths).
5. **Contiguity.** The unit of selection is a block of ``bs`` consecutive keys: a kept support is a union of
   whole contiguous blocks, which is what block-sparse kernels can skip (the paper's block contiguity).

Modes: **static** — :math:`p` is the mean soft assignment per position over calibration sequences,
giving one ``(H, nb, nb)`` layout per layer, frozen; **dynamic** — :math:`p` is computed from the current
input's keys, giving ``(B, H, nb, nb)`` per call (routing through the learned anchors).

The attention rule
------------------
:math:`S_{ab}` = mean over the valid queries of block ``a`` of their attention mass on key block ``b``
(:func:`~der.attention.layout.block_mass`; rows sum to 1, as the anchor rule's), then the same selection.

Every layout function returns a :class:`~der.attention.layout.BlockLayout`; :func:`select_blocks` is the
bare selection on a score tensor.
"""

from __future__ import annotations

import math

import torch

from der.attention.config import BUDGETS, Budget
from der.attention.layout import BlockLayout, num_blocks
from der.functional import soft_assign

__all__ = ["anchor_block_scores", "select_blocks", "static_layout", "dynamic_layout",
           "attention_rule_layout", "query_routing"]


def _blocked(p: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(..., N, k) → (..., nb, bs, k)`` with zero padding at the end."""
    n = p.shape[-2]
    nb = num_blocks(n, block_size)
    pad = nb * block_size - n
    if pad:
        p = torch.nn.functional.pad(p, (0, 0, 0, pad))
    return p.reshape(*p.shape[:-2], nb, block_size, p.shape[-1])


def query_routing(q: torch.Tensor, anchors: torch.Tensor, counts: torch.Tensor, scale: float) -> torch.Tensor:
    r"""Step 2's :math:`r_{tj} = \mathrm{softmax}_j(s\, q_t\cdot c_j + \log n_j)`: ``(B, Hq, N, k)``.

    ``q: (B, Hq, N, Dh)``, ``anchors: (Hkv, k, Dh)``, ``counts: (B, Hkv, k)`` soft cluster sizes; with
    grouped-query attention (Hq = g·Hkv) query head ``h`` uses kv head ``h // g``.
    """
    g = q.shape[1] // anchors.shape[0]
    if g * anchors.shape[0] != q.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {anchors.shape[0]} key heads")
    a = anchors.to(q.dtype).repeat_interleave(g, dim=0)
    logn = torch.log(counts.to(q.dtype).clamp_min(1e-12)).repeat_interleave(g, dim=1)
    return torch.softmax(scale * q @ a.transpose(-1, -2) + logn.unsqueeze(-2), dim=-1)


def anchor_block_scores(p: torch.Tensor, block_size: int, weight: torch.Tensor | None = None,
                        route: torch.Tensor | None = None) -> torch.Tensor:
    r"""Steps 1–3 of the rule: ``p: (..., N, k)`` → ``S: (..., nb, nb)`` (float64, rows sum to 1).

    ``weight: (..., N)`` (0/1 or counts) marks valid tokens; default all valid. ``route: (..., Hq, N, k)``
    is the query routing :math:`r` (default ``p``); with more query heads than ``p`` has key heads the key
    masses are shared by groups of consecutive query heads (GQA).
    """
    if p.dim() < 2:
        raise ValueError(f"p must be (..., N, k), got shape {tuple(p.shape)}")
    p = p.double()
    w = torch.ones(p.shape[:-1], dtype=p.dtype, device=p.device) if weight is None else weight.double()
    wp = _blocked(p * w.unsqueeze(-1), block_size)  # (..., nb, bs, k)
    ww = _blocked(w.unsqueeze(-1), block_size).sum(-2)  # (..., nb, 1): valid tokens per block
    mass = wp.sum(-2)  # M (..., nb, k)
    size = mass.sum(-2, keepdim=True).clamp_min(1e-12)  # n_j
    cols = mass / size
    if route is None:
        rows = mass / ww.clamp_min(1e-12)  # R: mean assignment of the block's tokens
    else:
        g = route.shape[-3] // p.shape[-3] if p.dim() >= 3 else 1
        if g > 1:
            cols, ww, w = (t.repeat_interleave(g, dim=-3) for t in (cols, ww, w.unsqueeze(-1)))
            w = w.squeeze(-1)
        rows = _blocked(route.double() * w.unsqueeze(-1), block_size).sum(-2) / ww.clamp_min(1e-12)
    return rows @ cols.transpose(-1, -2)


def select_blocks(scores: torch.Tensor, sparsity: float, causal: bool = False, budget: Budget = "head"
                  ) -> torch.Tensor:
    """Step 4 of the rule: ``scores: (..., nb, nb)`` → bool block mask at the target sparsity.

    ``budget="head"``: exactly ``K`` blocks per head, spread over rows by score (default). ``budget="row"``:
    every query block keeps its own ``b = max(1, round((1 - sparsity) · valid))`` best blocks (valid: nb, or
    the row's causal prefix) — uniform rows, which a block-sparse kernel pads least (the paper's "top-b").
    """
    if not (0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    nb = scores.shape[-1]
    if scores.dim() < 2 or scores.shape[-2] != nb:
        raise ValueError(f"scores must be (..., nb, nb), got shape {tuple(scores.shape)}")
    idx = torch.arange(nb, device=scores.device)
    dist = (idx[:, None] - idx[None, :]).abs().double()
    s = scores.double() - 1e-9 * dist  # ties → nearer the diagonal
    s = s.masked_fill(torch.eye(nb, dtype=torch.bool, device=s.device), math.inf)
    if causal:
        s = s.masked_fill(idx[None, :] > idx[:, None], -math.inf)
    if budget == "row":
        valid = (idx + 1) if causal else torch.full_like(idx, nb)
        b = (valid.double() * (1.0 - sparsity)).round().long().clamp(min=1)  # (nb,) blocks per row
        top = s.topk(int(b.max()), dim=-1).indices  # (..., nb, bmax), best first
        slot_ok = torch.arange(top.shape[-1], device=s.device)[None, :] < b[:, None]
        out = torch.zeros_like(s, dtype=torch.bool)
        return out.scatter_(-1, top, slot_ok.expand_as(top))
    nv = nb * (nb + 1) // 2 if causal else nb * nb
    k = max(nb, int(round((1.0 - sparsity) * nv)))
    flat = s.reshape(*s.shape[:-2], nb * nb)
    top = flat.topk(k, dim=-1).indices
    out = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top, True)
    return out.reshape(s.shape)


def static_layout(mass: torch.Tensor, count: torch.Tensor, block_size: int, sparsity: float,
                  causal: bool = False, route: torch.Tensor | None = None, budget: Budget = "head") -> BlockLayout:
    """Static ``(1, H, nb, nb)`` layout for N tokens from calibration sums: ``mass: (H, N, k)`` = Σ p,
    ``count: (N,)``, optional ``route: (Hq, N, k)`` = Σ r (then the layout has ``Hq`` heads).

    Positions never seen in calibration get the uniform assignment 1/k (they carry no information).
    """
    if mass.dim() != 3 or count.shape != mass.shape[1:2]:
        raise ValueError(f"mass must be (H, N, k) and count (N,), got {tuple(mass.shape)} and {tuple(count.shape)}")
    k = mass.shape[-1]
    c = count.double()[None, :, None]

    def mean(t: torch.Tensor) -> torch.Tensor:
        return torch.where(c > 0, t.double() / c.clamp_min(1e-12), torch.full_like(t, 1.0 / k, dtype=torch.float64))

    r = None if route is None else mean(route)
    mask = select_blocks(anchor_block_scores(mean(mass), block_size, route=r), sparsity, causal, budget)
    return BlockLayout(mask, block_size, mass.shape[1], causal)


def dynamic_layout(keys: torch.Tensor, anchors: torch.Tensor, block_size: int, sparsity: float,
                   alpha: float, metric: str = "sqeuclidean", causal: bool = False,
                   key_mask: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                   scale: float | None = None, budget: Budget = "head") -> BlockLayout:
    """Per-input ``(B, H, nb, nb)`` layout: ``keys: (B, H, N, Dh)``, ``anchors: (H, k, Dh)``; with
    ``queries: (B, Hq, N, Dh)`` the query blocks are routed by :func:`query_routing` (``Hq`` heads out)."""
    with torch.no_grad():
        p = soft_assign(keys, anchors, alpha=alpha, metric=metric)
        w = None if key_mask is None else key_mask[:, None, :].expand(p.shape[:-1])
        r = None
        if queries is not None:
            pw = p if w is None else p * w.unsqueeze(-1)
            r = query_routing(queries.to(p.dtype), anchors.to(p.dtype), pw.sum(-2),
                              scale if scale is not None else queries.shape[-1] ** -0.5)
        mask = select_blocks(anchor_block_scores(p, block_size, w, route=r), sparsity, causal, budget)
        return BlockLayout(mask, block_size, keys.shape[2], causal)


def attention_rule_layout(mass: torch.Tensor, count: torch.Tensor, block_size: int, seq_len: int,
                          sparsity: float, causal: bool = False, budget: Budget = "head") -> BlockLayout:
    """Static layout of ``rule="attention"`` from calibration sums: ``mass (H, nb, nb)`` of attention
    probabilities per (query block, key block) over valid queries (:func:`~der.attention.layout.block_mass`),
    ``count (nb,)`` valid queries per query block (blocks never seen get a uniform row)."""
    nb = mass.shape[-1]
    if mass.dim() != 3 or mass.shape[1] != nb or count.shape != (nb,):
        raise ValueError(f"mass must be (H, nb, nb) and count (nb,), got {tuple(mass.shape)}, {tuple(count.shape)}")
    c = count.double()[None, :, None]
    scores = torch.where(c > 0, mass.double() / c.clamp_min(1e-12), torch.full_like(mass, 1.0 / nb, dtype=torch.float64))
    return BlockLayout(select_blocks(scores, sparsity, causal, budget), block_size, seq_len, causal)
