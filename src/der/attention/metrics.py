r"""Attention metrics: attention-mass recall of a layout and its oracle, sparsity (App. G.13), mean block
length (Table 4), FLOPs, latency, peak memory. Block sparsity itself is
:meth:`der.attention.layout.BlockLayout.sparsity` (defined once).

Attention-mass recall of a layout :math:`\mathcal{K}` for head :math:`h` is the fraction of the dense
attention probability that the kernel keeps, over the valid queries :math:`t` of every sequence :math:`b`:

.. math:: R_h = \frac{\sum_{b,t} \sum_{s \in \mathcal{K}_{bh}(t)} p_{bhts}}{\sum_{b,t} \sum_s p_{bhts}},

and overall :math:`R = \sum_h (\text{numerator}) / \sum_h (\text{denominator})`. The oracle recall is the
largest :math:`R_h` any layout with the same number of kept valid blocks per head can reach: the top blocks
by attention mass.

FLOPs formula (documented here, used by :func:`block_sparse_attention_flops` and :func:`model_flops`):
the dense attention op's FLOPs :math:`F_\text{attn}` are counted by ``torch.utils.flop_counter`` (on meta
tensors, where SDPA decomposes into its two batched matmuls: :math:`4BHN^2D_h` forward, twice that more
for backward) and scaled by the kept-block density :math:`\rho = 1 - \text{sparsity}` (kept / valid blocks);
everything else in a model is counted unscaled:

.. math:: F_\text{sparse} = F_\text{other} + \rho\, F_\text{attn}.

Softmax/exp work is not counted (as in fvcore/flop_counter), and block padding of the last partial block
is ignored (:math:`\rho` is a block fraction).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from der.attention.layout import BlockLayout, as_layout, block_mass

__all__ = [
    "Recall",
    "attention_mass_recall",
    "oracle_recall",
    "oracle_layout",
    "attention_sparsity",
    "mean_block_length",
    "real_density",
    "dense_attention_flops",
    "block_sparse_attention_flops",
    "model_flops",
    "median_latency",
    "peak_memory",
]

class Recall(NamedTuple):
    """Attention-mass recall: ``overall`` (float) and ``per_head`` (float64 ``(H,)``)."""

    overall: float
    per_head: torch.Tensor


def _check_probs(probs: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
    """``probs (B, H, Nq, Nk)`` as float64 with padded query rows zeroed (``query_mask (B, Nq)``, True = real)."""
    if not isinstance(probs, torch.Tensor) or probs.dim() != 4 or not probs.is_floating_point():
        got = f"{probs.dtype} {tuple(probs.shape)}" if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs must be floating attention probabilities (B, H, Nq, Nk), got {got}")
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
        raise ValueError("probs must be finite and non-negative (attention probabilities)")
    p = probs.detach().double()
    if query_mask is not None:
        if query_mask.dtype != torch.bool or tuple(query_mask.shape) != (p.shape[0], p.shape[2]):
            raise ValueError(f"query_mask must be bool (B={p.shape[0]}, Nq={p.shape[2]}), got "
                             f"{query_mask.dtype} {tuple(query_mask.shape)}")
        p = p * query_mask[:, None, :, None].to(p.device)
    return p


def _recall(inside: torch.Tensor, total: torch.Tensor) -> Recall:
    if bool((total <= 0).any()):
        raise ValueError("a head has no attention mass on valid queries (all queries masked?)")
    return Recall(float(inside.sum() / total.sum()), inside / total)


def attention_mass_recall(probs: torch.Tensor, layout: BlockLayout, query_mask: torch.Tensor | None = None
                          ) -> Recall:
    """Fraction of dense attention mass inside ``layout`` (module docstring), per head and overall.

    Args:
        probs: dense attention probabilities ``(B, H, Nq, Nk)`` (e.g. ``output_attentions``).
        layout: :class:`~der.attention.layout.BlockLayout` with 1 or ``B`` batch rows and ``H`` heads for
            these lengths (its causal region applies).
        query_mask: optional bool ``(B, Nq)``; padded queries (False) are not counted.
    """
    layout = as_layout(layout)
    p = _check_probs(probs, query_mask)
    B, H, nq, nk = p.shape
    if (layout.q_len, layout.kv_len) != (nq, nk) or layout.heads != H or layout.batch not in (1, B):
        raise ValueError(f"layout {layout!r} does not fit probs of shape {tuple(p.shape)}")
    inside = (p * layout.to(p.device).to_dense()).sum((0, 2, 3))
    return _recall(inside, p.sum((0, 2, 3)))


def oracle_layout(probs: torch.Tensor, budget: BlockLayout, query_mask: torch.Tensor | None = None
                  ) -> BlockLayout:
    """The layout of ``budget``'s size with the most attention mass: per head (and per batch row when
    ``budget`` has ``B`` rows) the ``K`` valid blocks of largest mass, ``K`` = that head's kept valid blocks
    in ``budget``. A ``budget`` with one batch row gives one layout shared by the batch (static)."""
    budget = as_layout(budget)
    p = _check_probs(probs, query_mask)
    B, H, nq, nk = p.shape
    if (budget.q_len, budget.kv_len) != (nq, nk) or budget.heads != H or budget.batch not in (1, B):
        raise ValueError(f"budget {budget!r} does not fit probs of shape {tuple(p.shape)}")
    if budget.causal:  # only the allowed (causal) part of a diagonal block counts
        p = p * torch.ones(nq, nk, dtype=torch.bool, device=p.device).tril(nk - nq)
    mass = block_mass(p, budget.block_size)
    if budget.batch == 1:
        mass = mass.sum(0, keepdim=True)
    valid = budget.valid_blocks().to(p.device)
    flat = mass.masked_fill(~valid, -1.0).flatten(-2)  # invalid blocks never chosen (mass >= 0 elsewhere)
    k = budget.kept_blocks().flatten(-2).sum(-1).to(p.device)  # (Bl, H)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=p.device).expand_as(order))
    keep = (rank < k[..., None]).view(mass.shape)
    return BlockLayout(keep.to(budget.device), budget.block_size, (nq, nk), budget.causal)


def oracle_recall(probs: torch.Tensor, budget: BlockLayout, query_mask: torch.Tensor | None = None) -> Recall:
    """Recall of :func:`oracle_layout` — the best any layout with ``budget``'s kept blocks per head can do."""
    return attention_mass_recall(probs, oracle_layout(probs, budget, query_mask), query_mask)


def attention_sparsity(attn: torch.Tensor, threshold: float = 0.01, mask: torch.Tensor | None = None) -> float:
    """Fraction of attention weights below ``threshold`` (App. G.13: threshold 0.01).

    ``mask`` (bool, broadcastable to ``attn``) selects the entries that count (e.g. non-padding).
    """
    if not attn.is_floating_point():
        raise ValueError(f"attn must be floating point, got {attn.dtype}")
    small = attn.detach() < threshold
    if mask is None:
        return float(small.float().mean())
    mask = mask.expand_as(small)
    if not mask.any():
        raise ValueError("mask selects no attention weight")
    return float(small[mask].float().mean())


def mean_block_length(layout: BlockLayout) -> float:
    """Mean length of maximal runs of consecutive kept key blocks in a query-block row (Table 4).

    Pooled over all runs of all rows/heads/batches: ``#kept blocks / #runs`` of the kept valid blocks;
    empty rows have no runs.
    """
    lay = as_layout(layout).kept_blocks().to(torch.int8)
    starts = lay.clone()
    starts[..., 1:] = (lay[..., 1:] > lay[..., :-1]).to(torch.int8)
    runs = int(starts.sum())
    if runs == 0:
        raise ValueError("layout keeps no block: mean block length undefined")
    return float(lay.sum()) / runs


def real_density(layout: BlockLayout, key_valid: torch.Tensor | None = None) -> float:
    """Fraction of the (query block, key block) pairs over real tokens that ``layout`` keeps — the block
    budget a padded batch actually spends, mean over sequences and heads.

    ``key_valid: (B, N)`` bool marks real tokens (None: all real); a block is real when it holds one. With no
    padding this is :meth:`BlockLayout.density`; with padding, layouts that keep padded blocks or ignore them
    are compared at the budget they spend on real tokens.
    """
    lay = as_layout(layout)
    kept = lay.kept_blocks()
    nbq, nbk = lay.n_blocks
    if key_valid is None:
        real = torch.ones(kept.shape[0], nbk, dtype=torch.bool, device=kept.device)
    else:
        if key_valid.dim() != 2 or key_valid.shape[1] != lay.kv_len:
            raise ValueError(f"key_valid must be (B, kv_len={lay.kv_len}) bool, got {tuple(key_valid.shape)}")
        pad = nbk * lay.block_size - lay.kv_len
        real = F.pad(key_valid.bool().to(kept.device), (0, pad)).view(-1, nbk, lay.block_size).any(-1)
    rq = real[:, -nbq:] if lay.q_len == lay.kv_len else torch.ones(real.shape[0], nbq, dtype=torch.bool,
                                                                      device=real.device)
    pairs = (rq[:, :, None] & real[:, None, :] & lay.valid_blocks()).unsqueeze(1)  # (B, 1, nbq, nbk)
    n_pairs = pairs.sum((-1, -2)).double().clamp_min(1)
    got = (kept & pairs).sum((-1, -2)).double() / n_pairs  # (B, H)
    return float(got.mean())


def dense_attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, backward: bool = False) -> int:
    """FLOPs of dense SDPA counted by ``torch.utils.flop_counter`` on meta tensors (``4BHN²Dh`` forward)."""
    q = torch.empty(batch, heads, seq_len, head_dim, device="meta", requires_grad=backward)
    with FlopCounterMode(display=False) as fc:
        out = F.scaled_dot_product_attention(q, q, q)
        if backward:
            out.sum().backward()
    return int(fc.get_total_flops())


def block_sparse_attention_flops(layout: BlockLayout, head_dim: int, batch: int | None = None,
                                 backward: bool = False) -> int:
    """``ρ · dense_attention_flops`` with ``ρ = layout.density()`` (module docstring formula); heads and
    ``N`` come from the layout, ``batch`` defaults to its batch rows."""
    layout = as_layout(layout)
    if layout.q_len != layout.kv_len:
        raise ValueError(f"needs q_len == kv_len, got {layout.seq_len}")
    b = layout.batch if batch is None else batch
    return round(layout.density() * dense_attention_flops(b, layout.heads, layout.q_len, head_dim, backward))


class _AttentionCalls(TorchFunctionMode):
    """Records the dense FLOPs of each SDPA call and how many of them a running FlopCounterMode saw."""

    def __init__(self, counter: FlopCounterMode):
        super().__init__()
        self.counter, self.dense, self.seen = counter, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = (args + tuple(kwargs[n] for n in ("query", "key", "value") if n in kwargs))[:3]
        self.dense += sdpa_flop_count(q.shape, k.shape, v.shape)
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        self.seen += self.counter.get_total_flops() - before
        return out


def model_flops(fn: Callable[..., Any], *args: Any, sparsity: float = 0.0, **kwargs: Any) -> dict[str, float]:
    """Forward FLOPs of ``fn(*args, **kwargs)`` with attention scaled by ``1 - sparsity`` (module docstring).

    Non-attention FLOPs come from ``FlopCounterMode``; every ``F.scaled_dot_product_attention`` call is
    counted as ``sdpa_flop_count`` of its shapes (``4·B·H·Nq·Nk·Dh``), whatever backend runs it (the CPU
    flash kernel is invisible to the counter). Models with eager (matmul) attention count it as "other".
    Returns ``{"total", "attention_dense", "attention", "other"}``.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    density = 1.0 - sparsity
    with FlopCounterMode(display=False) as fc, _AttentionCalls(fc) as calls:
        fn(*args, **kwargs)
    other = fc.get_total_flops() - calls.seen
    return {"total": float(other + density * calls.dense), "attention_dense": float(calls.dense),
            "attention": float(density * calls.dense), "other": float(other)}


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_latency(fn: Callable[[], Any], warmup: int = 2, repeats: int = 10,
                   device: torch.device | str | None = None) -> dict[str, float]:
    """Median wall-clock seconds of ``fn()`` after ``warmup`` calls (CUDA synchronised when ``device`` is).

    Returns ``{"median_s", "min_s", "max_s", "repeats"}``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": repeats}


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by torch during ``fn()`` above what was allocated before the call.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: replay of the allocations and frees recorded by
    ``torch.profiler`` (``profile_memory=True``), attributed to the start of the op that made them, so a
    free inside an op is seen at that op's start (slight under-estimate of transient peaks).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return int(peak)
