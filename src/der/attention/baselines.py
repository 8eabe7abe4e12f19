r"""Baseline block layouts at equal block sparsity (Table 4 "same b"), all usable with the same kernel.

Every layout builder keeps exactly ``b = max(1, round((1 - sparsity) * n_blocks))`` key blocks in **every**
query-block row, so all methods have the same block sparsity ``1 - b / n_blocks`` and rows of equal length
(the kernel pads nothing). Builders return a :class:`~der.attention.layout.BlockLayout` (mask
``(B or 1, H, n_blocks, n_blocks)``, ``True`` = keep); :func:`topb_mask` is the bare selection on scores.

* :func:`dense_layout` — everything kept.
* :func:`magnitude_layout` — top-``b`` key blocks by attention mass of a dense forward (magnitude pruning).
* :func:`bigbird_layout` — global key blocks + sliding window + random blocks (Zaheer et al., 2020).
* :func:`longformer_layout` — global key blocks + sliding window (Beltagy et al., 2020).
* :class:`KMeansRouter` — Routing-Transformer-style EMA k-means over queries/keys giving per-input layouts.
* :func:`moba_layout` — training-free per-input routing (MoBA, Lu et al., 2025): query blocks score key
  blocks by the dot product of mean-pooled blocks, top-``b`` plus the diagonal
  (``convert(..., mode="dynamic", rule="moba")``).
* :func:`l1_attention_penalty` — the L1 baseline's loss term (see its docstring: plain L1 of softmax rows is
  constant, so the penalty acts on the probability mass outside the kept support).

Deviation from the original sparse-attention papers, written down on purpose: BigBird/Longformer also let
the *global query* blocks attend to every key block; that would give those rows ``n_blocks`` kept blocks and
break the equal-``b`` budget, so here global blocks are global *keys* only (every query sees them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from der.attention.config import Budget
from der.attention.layout import BlockLayout, block_mass, num_blocks
from der.attention.rules import block_means, select_blocks

__all__ = [
    "blocks_per_row",
    "dense_layout",
    "topb_mask",
    "magnitude_layout",
    "bigbird_layout",
    "longformer_layout",
    "KMeansRouter",
    "moba_layout",
    "l1_attention_penalty",
    "L1_LAMBDA_GRID",
]

# App. A: λ grid searched over {0.01, 0.03, 0.1, 0.3} (0.01–0.03 best for Transformers).
L1_LAMBDA_GRID = (0.01, 0.03, 0.1, 0.3)


def blocks_per_row(n_blocks: int, sparsity: float) -> int:
    """Kept key blocks per query-block row, ``b = max(1, round((1 - sparsity) · n_blocks))``."""
    if not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"n_blocks must be a positive int, got {n_blocks!r}")
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity (dropped-block fraction) must be in [0, 1], got {sparsity!r}")
    return max(1, min(n_blocks, round((1.0 - float(sparsity)) * n_blocks)))


def _check_heads(heads: int) -> None:
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")


def dense_layout(seq_len: int, block_size: int, heads: int, batch: int = 1, causal: bool = False) -> BlockLayout:
    """All blocks kept: ``(batch, heads, nb, nb)`` of ``True`` for ``seq_len`` tokens."""
    _check_heads(heads)
    nb = num_blocks(seq_len, block_size)
    return BlockLayout(torch.ones(batch, heads, nb, nb, dtype=torch.bool), block_size, seq_len, causal)


def topb_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping the ``b`` highest-scoring key blocks of every row of ``scores: (..., nb, nb)``.

    Ties are broken towards the diagonal (a tiny ``-|i-j|`` bias far below any real score difference).
    """
    nb = scores.shape[-1]
    if scores.dim() < 2 or scores.shape[-2] != nb:
        raise ValueError(f"scores must be (..., nb, nb), got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    b = blocks_per_row(nb, sparsity)
    ar = torch.arange(nb, device=scores.device, dtype=torch.float64)
    scale = scores.detach().abs().amax().clamp_min(1e-30).double()
    tie = -(ar[:, None] - ar[None, :]).abs() * (scale * 1e-9 / nb)
    idx = (scores.detach().double() + tie).topk(b, dim=-1).indices
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, idx, True)


def magnitude_layout(attn: torch.Tensor, block_size: int, sparsity: float, per_input: bool = True,
                     causal: bool = False) -> BlockLayout:
    """Magnitude top-``b``: keep each row's ``b`` key blocks with the largest dense attention mass
    (:func:`~der.attention.layout.block_mass` of ``|attn|``).

    Args:
        attn: dense attention probabilities ``(B, H, N, N)`` (or ``(H, N, N)``).
        per_input: ``True`` → ``(B, H, nb, nb)`` per-input layouts; ``False`` → one static ``(1, H, nb, nb)``
            layout from the batch-summed mass (frozen like the paper's static masks).
    """
    if attn.dim() == 3:
        attn = attn[None]
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be (B, H, N, N) or (H, N, N), got {tuple(attn.shape)}")
    s = block_mass(attn.detach().abs(), block_size)
    if not per_input:
        s = s.sum(0, keepdim=True)
    return BlockLayout(topb_mask(s, sparsity), block_size, attn.shape[-1], causal)


def _band_order(nb: int) -> torch.Tensor:
    """``(nb, nb)`` key-block ids of each row sorted by distance to the diagonal (left before right)."""
    ar = torch.arange(nb)
    dist = (ar[None, :] - ar[:, None]).abs() * 2 + (ar[None, :] > ar[:, None])
    return dist.argsort(-1)


def _structured_layout(n_blocks: int, heads: int, sparsity: float, num_global: int, num_random: int,
                       seed: int) -> torch.Tensor:
    """Per row: ``num_global`` global key blocks, then ``num_random`` random blocks, rest nearest-window."""
    _check_heads(heads)
    b = blocks_per_row(n_blocks, sparsity)
    if num_global < 0 or num_random < 0:
        raise ValueError(f"num_global and num_random must be >= 0, got {num_global}, {num_random}")
    g = min(num_global, b)
    lay = torch.zeros(1, heads, n_blocks, n_blocks, dtype=torch.bool)
    lay[..., :g] = True
    band = _band_order(n_blocks)
    gen = torch.Generator().manual_seed(seed)
    n_win = max(0, b - g - num_random)
    for i in range(n_blocks):
        win = [j for j in band[i].tolist() if j >= g][:n_win]
        lay[0, :, i, win] = True
        for h in range(heads):
            free = (~lay[0, h, i]).nonzero().flatten()
            need = b - int(lay[0, h, i].sum())
            pick = free[torch.randperm(len(free), generator=gen)[:need]]
            lay[0, h, i, pick] = True
    return lay


def longformer_layout(seq_len: int, block_size: int, heads: int, sparsity: float, num_global: int = 1,
                      causal: bool = False) -> BlockLayout:
    """Longformer: ``num_global`` global key blocks + a sliding window filling the row budget ``b``."""
    nb = num_blocks(seq_len, block_size)
    mask = _structured_layout(nb, heads, sparsity, num_global, 0, seed=0)
    return BlockLayout(mask, block_size, seq_len, causal)


def bigbird_layout(seq_len: int, block_size: int, heads: int, sparsity: float, seed: int = 0,
                   num_global: int = 1, num_random: int | None = None, causal: bool = False) -> BlockLayout:
    """BigBird: global key blocks + window + random blocks (per head, seeded), ``b`` per row.

    ``num_random`` defaults to a third of the non-global budget (BigBird-ITC's 3 window + 2 random +
    2 global blocks of 7 has the same flavour). The layout carries block ``scores`` ranking its own blocks
    (global, then window by distance, then random, then the nearest dropped ones), so a padded or shorter
    input is re-selected at the same budget over its real blocks
    (:func:`~der.attention.rules.reselect`) instead of cropped.
    """
    nb = num_blocks(seq_len, block_size)
    b = blocks_per_row(nb, sparsity)
    if num_random is None:
        num_random = max(0, b - min(num_global, b)) // 3
    mask = _structured_layout(nb, heads, sparsity, num_global, num_random, seed)
    near = 1.0 - _band_order(nb).argsort(-1).double() / nb  # 1 on the diagonal, falling with distance
    scores = torch.where(mask, 1.0 + 0.25 * near, 0.1 * near)
    scores[..., : min(num_global, b)] += 0.5 * mask[..., : min(num_global, b)]
    return BlockLayout(mask, block_size, seq_len, causal, scores)


class KMeansRouter(nn.Module):
    r"""Routing-Transformer-style baseline (Roy et al., 2021): EMA k-means centroids per head over
    unit-normalised queries and keys; query block ``i`` keeps the ``b`` key blocks sharing the most
    same-cluster (query, key) pairs,

    .. math:: S_{ij} = \sum_c n^{Q}_{ic}\, n^{K}_{jc}, \qquad n^{Q}_{ic} = \#\{t \in \text{block } i :
              \arg\max_{c'} \langle \hat q_t, \mu_{c'} \rangle = c\}.

    In training mode each forward moves the centroids by EMA: :math:`\mu_c \leftarrow \gamma\mu_c +
    (1-\gamma)\,\overline{x}_c` (then re-normalised), using the queries and keys assigned to ``c``.
    Centroids are buffers (no gradient), like the original; the first training forward initialises them
    by farthest-point sampling of its queries/keys (random unit vectors until then).
    """

    def __init__(self, heads: int, head_dim: int, num_clusters: int, decay: float = 0.999, seed: int = 0):
        super().__init__()
        _check_heads(heads)
        if num_clusters < 1 or head_dim < 1:
            raise ValueError(f"num_clusters and head_dim must be >= 1, got {num_clusters}, {head_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        g = torch.Generator().manual_seed(seed)
        self.decay = decay
        self.register_buffer("centroids", F.normalize(torch.randn(heads, num_clusters, head_dim, generator=g),
                                                      dim=-1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, max_points: int = 4096) -> None:
        """Farthest-point initialisation from ``x: (B, H, N, Dh)`` (first point: the head's mean direction)."""
        H, C, D = self.centroids.shape
        pts = F.normalize(x.detach().float().transpose(0, 1).reshape(H, -1, D), dim=-1)[:, :max_points]
        chosen = [F.normalize(pts.mean(1), dim=-1)]
        for _ in range(C):
            sim = torch.stack([torch.einsum("hnd,hd->hn", pts, c) for c in chosen], -1).amax(-1)
            chosen.append(pts[torch.arange(H), sim.argmin(-1)])
        self.centroids.copy_(torch.stack(chosen[1:], 1).to(self.centroids.dtype))
        self.initialized.fill_(True)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest centroid (cosine) of ``x: (B, H, N, Dh)`` → ``(B, H, N)`` cluster ids."""
        return torch.einsum("bhnd,hcd->bhnc", F.normalize(x.detach().float(), dim=-1),
                            self.centroids.float()).argmax(-1)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """One EMA k-means step on ``x: (B, H, N, Dh)``."""
        if not bool(self.initialized):
            self.init_from(x)
        H, C, D = self.centroids.shape
        xn = F.normalize(x.detach().float(), dim=-1)
        onehot = F.one_hot(self.assign(x), C).float()  # (B, H, N, C)
        sums = torch.einsum("bhnc,bhnd->hcd", onehot, xn)
        counts = onehot.sum((0, 2))[..., None]  # (H, C, 1)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), self.centroids.float())
        mixed = self.decay * self.centroids.float() + (1 - self.decay) * new
        self.centroids.copy_(F.normalize(mixed, dim=-1).to(self.centroids.dtype))

    def forward(self, q: torch.Tensor, k: torch.Tensor, block_size: int, sparsity: float,
                causal: bool = False) -> BlockLayout:
        """Per-input layout ``(B, H, nb, nb)`` from ``q, k: (B, H, N, Dh)``; EMA update when training."""
        if q.dim() != 4 or q.shape != k.shape:
            raise ValueError(f"q, k must be (B, H, N, Dh) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}")
        H, C, D = self.centroids.shape
        if q.shape[1] != H or q.shape[3] != D:
            raise ValueError(f"expected H={H}, Dh={D}, got q of shape {tuple(q.shape)}")
        if self.training:
            self.update(torch.cat([q, k], dim=2))
        B, _, N, _ = q.shape
        nb = math.ceil(N / block_size)
        pad = nb * block_size - N

        def hist(x):  # (B, H, nb, C) cluster counts per block (padding rows count nowhere)
            oh = F.pad(F.one_hot(self.assign(x), C).float(), (0, 0, 0, pad))
            return oh.view(B, H, nb, block_size, C).sum(3)

        scores = torch.einsum("bhic,bhjc->bhij", hist(q), hist(k))
        return BlockLayout(topb_mask(scores, sparsity), block_size, N, causal)


@torch.no_grad()
def moba_layout(q: torch.Tensor, k: torch.Tensor, block_size: int, sparsity: float, causal: bool = False,
                key_padding_mask: torch.Tensor | None = None, budget: Budget = "row") -> BlockLayout:
    r"""MoBA-style per-input layout: :math:`S_{ij} = ar q_i \cdot ar k_j` of mean-pooled query block
    :math:`i` and key block :math:`j`, then :func:`~der.attention.rules.select_blocks` (the diagonal block is
    always kept, future blocks dropped under ``causal``, top-``b`` per row for ``budget="row"``).

    Args:
        q: ``(B, Hq, N, Dh)`` queries; k: ``(B, Hkv, N, Dh)`` keys (``Hq`` a multiple of ``Hkv``: GQA).
        key_padding_mask: optional bool ``(B, N)`` (True = real token): padded tokens are left out of the
            means; blocks with no real token are skipped (as keys and as queries) and the budget is a
            fraction of the real blocks (:func:`~der.attention.rules.select_blocks` with ``valid``).

    Returns:
        :class:`~der.attention.layout.BlockLayout` ``(B, Hq, nb, nb)``.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q, k must be (B, H, N, Dh) with one B, N, Dh, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key heads")
    B, _, N, _ = q.shape
    if key_padding_mask is None:
        w = None
    elif key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, N):
        raise ValueError(f"key_padding_mask must be bool (B={B}, N={N}), got {key_padding_mask.dtype} "
                         f"{tuple(key_padding_mask.shape)}")
    else:
        w = key_padding_mask.float()
    qm, _ = block_means(q.float(), block_size, w)
    km, kcnt = block_means(k.float(), block_size, w)
    km = km.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (qm @ km.transpose(-1, -2)).double()  # (B, Hq, nb, nb): one batched matmul
    valid = None if key_padding_mask is None else (kcnt > 0)[:, None, :]  # blocks of padding only: skipped
    return BlockLayout(select_blocks(scores, sparsity, causal, budget, valid), block_size, N, causal)


def l1_attention_penalty(attn: torch.Tensor, lam: float = 0.01, block_size: int | None = None,
                         sparsity: float | None = None) -> torch.Tensor:
    r"""L1 baseline loss on attention probabilities ``attn: (B, H, N, N)`` (rows sum to 1).

    The plain L1 norm of a softmax row is identically 1 (zero gradient), so an L1 penalty only sparsifies
    when it acts on the weights that would be *pruned*. With ``block_size`` and ``sparsity``: the L1 norm of
    the probabilities outside each row's top-``b`` key blocks (chosen without gradient), averaged over rows,

    .. math:: \mathcal{L} = \lambda\,\frac{1}{BHN}\sum_{b,h,t}\ \sum_{s \notin \mathcal{K}_b(t)} |p_{ts}|.

    Without them, the mass outside each row's top-``ceil((1 - sparsity)·N)`` single entries is used
    (``sparsity`` default 0.75). Tune ``lam`` over :data:`L1_LAMBDA_GRID` (App. A).
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be (B, H, N, N), got {tuple(attn.shape)}")
    sp = 0.75 if sparsity is None else float(sparsity)
    if block_size is not None:
        mask = magnitude_layout(attn, block_size, sp, per_input=True).to_dense()
    else:
        kk = max(1, math.ceil((1.0 - sp) * attn.shape[-1]))
        idx = attn.detach().abs().topk(kk, dim=-1).indices
        mask = torch.zeros(attn.shape, dtype=torch.bool, device=attn.device).scatter_(-1, idx, True)
    return lam * attn.abs().masked_fill(mask, 0.0).sum(-1).mean()
