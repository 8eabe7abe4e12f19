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
giving one ``(H, nb, nb)`` layout per layer, frozen; **dynamic** — from the current input's keys, giving
``(B, H, nb, nb)`` per call (routing through the learned anchors) from **pooled blocks**: each block is
represented by the mean :math:`\bar k_b` of its real keys (and :math:`\bar q_a` of its queries), so
:math:`M_{bj} \approx |b|\, p_j(\bar k_b)` and :math:`R_{aj} \approx \mathrm{softmax}_j(s\, \bar q_a\cdot c_j +
\log n_j)`: ``bs`` times less work than per-token assignments (one batched pass for all heads and
sequences), the approximation MoBA makes for its block scores.

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

__all__ = ["anchor_block_scores", "select_blocks", "reselect", "static_layout", "dynamic_layout",
           "attention_rule_layout", "query_routing", "valid_blocks", "block_means"]


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
    w = torch.ones(p.shape[:-1], dtype=p.dtype, device=p.device) if weight is None else weight.to(p.dtype)
    wp = _blocked(p * w.unsqueeze(-1), block_size)  # (..., nb, bs, k), in p's dtype
    ww = _blocked(w.unsqueeze(-1), block_size).sum(-2).double()  # (..., nb, 1): valid tokens per block
    mass = wp.sum(-2).double()  # M (..., nb, k): the block sums, then float64
    size = mass.sum(-2, keepdim=True).clamp_min(1e-12)  # n_j
    cols = mass / size
    if route is None:
        rows = mass / ww.clamp_min(1e-12)  # R: mean assignment of the block's tokens
    else:
        g = route.shape[-3] // p.shape[-3] if p.dim() >= 3 else 1
        if g > 1:
            cols, ww, w = (t.repeat_interleave(g, dim=-3) for t in (cols, ww, w.unsqueeze(-1)))
            w = w.squeeze(-1)
        rows = _blocked(route * w.unsqueeze(-1).to(route.dtype), block_size).sum(-2).double() / ww.clamp_min(1e-12)
    return rows @ cols.transpose(-1, -2)


def select_blocks(scores: torch.Tensor, sparsity: float, causal: bool = False, budget: Budget = "head",
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Step 4 of the rule: ``scores: (..., nb, nb)`` → bool block mask at the target sparsity.

    ``budget="head"``: exactly ``K`` blocks per head, spread over rows by score (default). ``budget="row"``:
    every query block keeps its own ``b = max(1, round((1 - sparsity) · valid))`` best blocks (valid: nb, or
    the row's causal prefix) — uniform rows, which a block-sparse kernel pads least (the paper's "top-b").

    ``valid: (..., nb)`` bool (broadcast with ``scores.shape[:-1]``; e.g. ``(B, 1, nb)``) marks the blocks
    that cover real tokens of a padded sequence: blocks of pure padding are never kept (their rows stay
    empty) and the budget is the same fraction of the valid blocks only (``nv`` counted over valid rows
    and columns).
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
    if valid is not None:
        return _select_valid(s, sparsity, causal, budget, valid)
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


def _select_valid(s: torch.Tensor, sparsity: float, causal: bool, budget: str, valid: torch.Tensor) -> torch.Tensor:
    """:func:`select_blocks` restricted to the ``valid`` blocks (``s``: tie-broken scores, diagonal ``+inf``,
    causal future ``-inf``); budgets vary per leading index, so top-k takes the largest and masks slots."""
    nb = s.shape[-1]
    if valid.dtype != torch.bool or valid.shape[-1] != nb:
        raise ValueError(f"valid must be a bool (..., nb={nb}) tensor, got {valid.dtype} {tuple(valid.shape)}")
    lead = torch.broadcast_shapes(s.shape[:-1], valid.shape)  # e.g. (1, H, nb) scores × (B, 1, nb) valid
    valid, s = valid.to(s.device).expand(lead), s.expand(*lead, nb)
    pair = valid[..., :, None] & valid[..., None, :]
    if causal:
        pair = pair & torch.ones(nb, nb, dtype=torch.bool, device=s.device).tril()
    s = s.masked_fill(~pair, -math.inf)
    per_row = pair.sum(-1)  # (..., nb) valid key blocks of each query block (0 for padding rows)
    if budget == "row":
        b = (per_row.double() * (1.0 - sparsity)).round().long().clamp(min=1) * valid
        top = s.topk(max(1, int(b.max())), dim=-1).indices
        slot_ok = torch.arange(top.shape[-1], device=s.device) < b[..., None]
        return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, slot_ok)
    nv = per_row.sum(-1)  # (...,)
    k = torch.maximum(valid.sum(-1), ((1.0 - sparsity) * nv.double()).round().long())
    flat = s.reshape(*s.shape[:-2], nb * nb)
    top = flat.topk(max(1, int(k.max())), dim=-1).indices
    slot_ok = torch.arange(top.shape[-1], device=s.device) < k[..., None]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top, slot_ok).reshape(s.shape)


def reselect(layout: BlockLayout, sparsity: float, budget: Budget = "head", seq_len: int | None = None,
             valid: torch.Tensor | None = None) -> BlockLayout:
    """A layout with calibrated ``scores`` re-selected for ``seq_len`` tokens (its top-left block scores) and,
    with ``valid: (B, nb)`` bool (blocks covering real tokens), per sequence over its valid blocks only —
    the same budget as the calibrated layout, never a crop of its mask. Raises without ``scores``."""
    if layout.scores is None:
        raise ValueError("reselect needs a layout with calibrated block scores (layout.scores is None)")
    n = layout.q_len if seq_len is None else seq_len
    nb = num_blocks(n, layout.block_size)
    if nb > layout.n_blocks[0]:
        raise ValueError(f"cannot re-select {n} tokens from a layout of {layout.q_len}")
    sc = layout.scores[..., :nb, :nb]
    if valid is not None:
        if valid.dim() != 2 or valid.shape[-1] != nb:
            raise ValueError(f"valid must be (B, nb={nb}) bool, got {tuple(valid.shape)}")
        valid = valid[:, None, :]
    mask = select_blocks(sc, sparsity, layout.causal, budget, valid)
    return BlockLayout(mask, layout.block_size, n, layout.causal, sc if valid is None else None)


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
    scores = anchor_block_scores(mean(mass), block_size, route=r)
    mask = select_blocks(scores, sparsity, causal, budget)
    return BlockLayout(mask, block_size, mass.shape[1], causal, scores)


def valid_blocks(key_padding_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(B, nb)`` bool: the blocks of ``key_padding_mask: (B, N)`` (True = real token) holding a real token."""
    B, n = key_padding_mask.shape
    nb = num_blocks(n, block_size)
    m = torch.nn.functional.pad(key_padding_mask.bool(), (0, nb * block_size - n))
    return m.view(B, nb, block_size).any(-1)


def block_means(x: torch.Tensor, block_size: int, w: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of ``x: (B, H, N, D)`` over each block's tokens (weights ``w: (B, N)``, default 1) →
    ``(B, H, nb, D)``, and the blocks' weight sums ``(B, nb)`` (a block of zero weight has mean 0).
    Sums in the memory order of ``x`` (HF projections are ``(B, N, H, D)`` underneath), no padded copy."""
    B, H, N, D = x.shape
    nb = num_blocks(N, block_size)
    full = N // block_size
    xt = x.transpose(1, 2)  # (B, N, H, D): contiguous for heads split out of a projection
    if w is not None:
        xt = xt * w[:, :, None, None].to(x.dtype)
    sums = xt[:, :full * block_size].unflatten(1, (full, block_size)).sum(2)  # (B, full, H, D)
    if full < nb:  # the short last block
        sums = torch.cat([sums, xt[:, full * block_size:].sum(1, keepdim=True)], dim=1)
    if w is None:
        cnt = torch.full((B, nb), float(block_size), dtype=x.dtype, device=x.device)
        cnt[:, -1] = N - (nb - 1) * block_size
    else:
        cnt = torch.nn.functional.pad(w.to(x.dtype), (0, nb * block_size - N)).view(B, nb, block_size).sum(-1)
    return (sums / cnt[:, :, None, None].clamp_min(1.0)).transpose(1, 2), cnt


def _assign(x: torch.Tensor, anchors: torch.Tensor, alpha: float, metric: str) -> torch.Tensor:
    r"""Soft assignments (Eq. 2) of the pooled blocks ``x (B, H, nb, D)`` in float32 for block selection.
    ``sqeuclidean``: one batched matmul on anchor-centred points, :math:`-\alpha\|x-c\|^2 = 2\alpha x\cdot c
    - \alpha\|c\|^2 + \text{const}` (selection needs ranks, not :func:`~der.functional.soft_assign`'s
    exact float64 promotion); other metrics: :func:`~der.functional.soft_assign`."""
    if metric != "sqeuclidean":
        return soft_assign(x, anchors, alpha=alpha, metric=metric).float()
    c = anchors.float()
    shift = c.mean(-2, keepdim=True)
    c = c - shift
    logits = torch.matmul(x.float() - shift, c.transpose(-1, -2)).mul_(2.0 * alpha)
    return torch.softmax(logits.sub_(alpha * (c * c).sum(-1).unsqueeze(-2)), dim=-1)


def dynamic_layout(keys: torch.Tensor, anchors: torch.Tensor, block_size: int, sparsity: float,
                   alpha: float, metric: str = "sqeuclidean", causal: bool = False,
                   key_mask: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                   scale: float | None = None, budget: Budget = "head") -> BlockLayout:
    """Per-input ``(B, H, nb, nb)`` layout from pooled blocks (module docstring): ``keys: (B, H, N, Dh)``,
    ``anchors: (H, k, Dh)``; with ``queries: (B, Hq, N, Dh)`` the query blocks are routed by
    :func:`query_routing` of their mean query (``Hq`` heads out). With ``key_mask (B, N)`` padded tokens
    are left out of the means, blocks of pure padding are skipped and the budget counts real blocks only."""
    with torch.no_grad():
        N = keys.shape[2]
        w = None if key_mask is None else key_mask.float()
        kbar, cnt = block_means(keys.float(), block_size, w)  # (B, H, nb, Dh), (B, nb)
        mass = _assign(kbar, anchors, alpha, metric) * cnt[:, None, :, None]  # M ≈ |b| p(k̄_b)
        r = None
        if queries is not None:
            qbar, _ = block_means(queries.float(), block_size, w)
            r = query_routing(qbar, anchors.float(), mass.sum(-2), scale if scale is not None else queries.shape[-1] ** -0.5)
        valid = None if key_mask is None else (cnt > 0)[:, None, :]
        scores = _pooled_scores(mass, r)
        mask = select_blocks(scores, sparsity, causal, budget, valid)
        return BlockLayout(mask, block_size, N, causal)


def _pooled_scores(mass: torch.Tensor, route: torch.Tensor | None) -> torch.Tensor:
    r""":math:`S = R\,(M / n)^\top` from block masses ``mass (B, H, nb, k)`` and the routing ``route (B, Hq, nb, k)``
    (None: :math:`R = M / |b|`, shared query/key routing); float64 ``(B, Hq, nb, nb)``."""
    m = mass.double()
    cols = m / m.sum(-2, keepdim=True).clamp_min(1e-12)
    if route is None:
        rows = m / m.sum(-1, keepdim=True).clamp_min(1e-12)
    else:
        rows = route.double()
        g = rows.shape[1] // cols.shape[1]
        cols = cols.repeat_interleave(g, dim=1) if g > 1 else cols
    return rows @ cols.transpose(-1, -2)


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
    return BlockLayout(select_blocks(scores, sparsity, causal, budget), block_size, seq_len, causal, scores)
