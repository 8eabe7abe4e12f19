r"""Attention efficiency metrics: sparsity (App. G.13), mean block length (Table 4), FLOPs, latency, peak
memory. Block sparsity itself is :meth:`der.attention.layout.BlockLayout.sparsity` (defined once).

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
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from der.attention.layout import BlockLayout, as_layout

__all__ = [
    "attention_sparsity",
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
