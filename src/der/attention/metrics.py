r"""Attention efficiency metrics: sparsity (App. G.13), block sparsity, mean block length (Table 4), FLOPs,
latency, peak memory.

FLOPs formula (documented here, used by :func:`block_sparse_attention_flops` and :func:`model_flops`):
the dense attention op's FLOPs :math:`F_\text{attn}` are counted by ``torch.utils.flop_counter`` (on meta
tensors, where SDPA decomposes into its two batched matmuls: :math:`4BHN^2D_h` forward, twice that more
for backward) and scaled by the kept-block density :math:`\rho = \#\text{kept blocks} / \#\text{blocks}`;
everything else in a model is counted unscaled:

.. math:: F_\text{sparse} = F_\text{other} + \rho\, F_\text{attn}.

Softmax/exp work is not counted (as in fvcore/flop_counter), and block padding of the last partial block
is ignored (:math:`\rho` is a block fraction).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = [
    "attention_sparsity",
    "block_sparsity",
    "block_density",
    "mean_block_length",
    "dense_attention_flops",
    "block_sparse_attention_flops",
    "model_flops",
    "median_latency",
    "peak_memory",
]

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


def _check_layout(layout: torch.Tensor) -> None:
    if layout.dtype != torch.bool or layout.dim() < 2 or layout.shape[-1] != layout.shape[-2]:
        raise ValueError(f"layout must be a bool (..., nb, nb) tensor, got {layout.dtype} {tuple(layout.shape)}")


def block_density(layout: torch.Tensor, causal: bool = False) -> float:
    """Kept fraction of the block grid (under ``causal``, of the ``nb(nb+1)/2`` lower-triangular blocks)."""
    _check_layout(layout)
    if not causal:
        return float(layout.float().mean())
    tri = torch.ones(layout.shape[-2:], dtype=torch.bool, device=layout.device).tril()
    return float((layout & tri).float().sum() / (tri.sum() * layout[..., 0, 0].numel()))


def block_sparsity(layout: torch.Tensor, causal: bool = False) -> float:
    """``1 - block_density``: fraction of (query block, key block) tiles the kernel skips."""
    return 1.0 - block_density(layout, causal)


def mean_block_length(layout: torch.Tensor) -> float:
    """Mean length of maximal runs of consecutive kept key blocks in a query-block row (Table 4).

    Pooled over all runs of all rows/heads/batches: ``#kept blocks / #runs``; empty rows have no runs.
    """
    _check_layout(layout)
    lay = layout.to(torch.int8)
    starts = lay.clone()
    starts[..., 1:] = (lay[..., 1:] > lay[..., :-1]).to(torch.int8)
    runs = int(starts.sum())
    if runs == 0:
        raise ValueError("layout keeps no block: mean block length undefined")
    return float(lay.sum()) / runs


def dense_attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, backward: bool = False) -> int:
    """FLOPs of dense SDPA counted by ``torch.utils.flop_counter`` on meta tensors (``4BHN²Dh`` forward)."""
    q = torch.empty(batch, heads, seq_len, head_dim, device="meta", requires_grad=backward)
    with FlopCounterMode(display=False) as fc:
        out = F.scaled_dot_product_attention(q, q, q)
        if backward:
            out.sum().backward()
    return int(fc.get_total_flops())


def block_sparse_attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, layout: torch.Tensor,
                                 backward: bool = False, causal: bool = False) -> int:
    """``ρ · dense_attention_flops`` with ``ρ = block_density(layout)`` (module docstring formula)."""
    return round(block_density(layout, causal) * dense_attention_flops(batch, heads, seq_len, head_dim,
                                                                         backward))


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


def model_flops(fn: Callable[..., Any], *args: Any, density: float = 1.0, **kwargs: Any) -> dict[str, float]:
    """Forward FLOPs of ``fn(*args, **kwargs)`` with attention scaled by ``density`` (module docstring).

    Non-attention FLOPs come from ``FlopCounterMode``; every ``F.scaled_dot_product_attention`` call is
    counted as ``sdpa_flop_count`` of its shapes (``4·B·H·Nq·Nk·Dh``), whatever backend runs it (the CPU
    flash kernel is invisible to the counter). Models with eager (matmul) attention count it as "other".
    Returns ``{"total", "attention_dense", "attention", "other"}``.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
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
