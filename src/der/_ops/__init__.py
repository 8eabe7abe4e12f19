"""Implementations behind :mod:`der.functional`.

Every surrogate in the paper reduces to one primitive, the *soft counts of an affine softmax*:

.. math::  n_j = \\sum_i \\operatorname{softmax}_j(f_i^\\top W_j + b_j)

* ``sqeuclidean`` anchors: ``-α‖x−c‖² = 2α x·c − α‖c‖² − α‖x‖²`` and the last term cancels in the softmax,
  so ``f = x``, ``W = 2αc``, ``b = −α‖c‖²`` (Mahalanobis: the same after ``x ↦ Lx``; cosine: after
  normalizing, ``W = αĉ``).
* halfspace / box cells (Eq. 5): ``log g_j = α_j·log h + β_j·log(1−h) − log Z`` with ``f = [log h, log(1−h)]``,
  ``W = [α_j, β_j]``, ``b = 0``.

:func:`softmax_counts_reference` is the reference (plain autograd, keeps the ``N×k`` matrix);
:func:`softmax_counts` dispatches to the streaming path of :mod:`der._ops.streaming` (``O((N+k)·f)``
memory, recomputing backward) whenever the problem is larger than one chunk. The reference stays the
fallback for tiny problems (one chunk: nothing to save) and for forward-mode AD (dual tensors), which the
custom backward does not implement. The paper's cost reducers (subsampling, truncation to the r nearest
anchors, App. A / G.4 / G.11) live in :mod:`der._ops.truncated`.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from der._ops.streaming import DEFAULT_CHUNK_ELEMS, streaming_softmax_counts

__all__ = ["softmax_counts", "softmax_counts_reference", "streaming_softmax_counts", "DEFAULT_CHUNK_ELEMS"]


def softmax_counts_reference(feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``Σ_i softmax_j(feat_i · weight_j + bias_j)``; feat ``(..., N, f)``, weight ``(..., k, f)``,
    bias ``(..., k)`` → ``(..., k)``. Plain autograd; memory ``O(N·k)``."""
    logits = feat @ weight.transpose(-1, -2) + bias.unsqueeze(-2)
    return torch.softmax(logits, dim=-1).sum(dim=-2)


def _check_shapes(feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Size:
    for name, t, rank in (("feat", feat, 2), ("weight", weight, 2), ("bias", bias, 1)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating-point torch.Tensor, got {got}")
        if t.dim() < rank:
            raise ValueError(f"{name} needs at least {rank} dims, got shape {tuple(t.shape)}")
    if feat.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"feat (..., N, f) and weight (..., k, f) disagree on f: {feat.shape[-1]} vs {weight.shape[-1]}"
        )
    if weight.shape[-2] != bias.shape[-1]:
        raise ValueError(
            f"weight (..., k, f) and bias (..., k) disagree on k: {weight.shape[-2]} vs {bias.shape[-1]}"
        )
    if not feat.device == weight.device == bias.device:
        raise ValueError(
            f"feat/weight/bias on different devices: {feat.device}, {weight.device}, {bias.device}"
        )
    try:
        return torch.broadcast_shapes(feat.shape[:-2], weight.shape[:-2], bias.shape[:-1])
    except RuntimeError as e:
        raise ValueError(
            f"batch dims do not broadcast: feat {tuple(feat.shape)}, weight {tuple(weight.shape)}, "
            f"bias {tuple(bias.shape)}"
        ) from e


def _is_dual(*ts: torch.Tensor) -> bool:
    return any(fwAD.unpack_dual(t).tangent is not None for t in ts)


def softmax_counts(
    feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> torch.Tensor:
    """Soft counts of an affine softmax (see module docstring): ``(..., k)``, float32 or float64.

    float16/bfloat16 inputs are computed in float32 (one chunk at a time on the streaming path).
    """
    batch = _check_shapes(feat, weight, bias)
    dtype = torch.promote_types(torch.promote_types(feat.dtype, weight.dtype), bias.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    weight, bias = weight.to(dtype), bias.to(dtype)
    n, k = feat.shape[-2], weight.shape[-2]
    small = batch.numel() * n * k <= chunk_elems
    if small or n == 0 or _is_dual(feat, weight, bias):
        return softmax_counts_reference(feat.to(dtype), weight, bias)
    return streaming_softmax_counts(feat.to(dtype), weight, bias, chunk_elems)
