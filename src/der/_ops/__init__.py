"""Implementations behind :mod:`der.functional`.

Every surrogate in the paper reduces to one primitive, the *soft counts of an affine softmax*:

.. math::  n_j = \\sum_i \\operatorname{softmax}_j(f_i^\\top W_j + b_j)

* ``sqeuclidean`` anchors: ``-α‖x−c‖² = 2α x·c − α‖c‖² − α‖x‖²`` and the last term cancels in the softmax,
  so ``f = x``, ``W = 2αc``, ``b = −α‖c‖²`` (Mahalanobis: the same after ``x ↦ Lx``; cosine: after
  normalizing, ``W = αĉ``).
* halfspace / box cells (Eq. 5): ``log g_j = α_j·log h + β_j·log(1−h) − log Z`` with ``f = [log h, log(1−h)]``,
  ``W = [α_j, β_j]``, ``b = 0``.

:func:`softmax_counts` is the reference (plain autograd, keeps the ``N×k`` matrix); the fast streaming
path replaces it where it applies.
"""

from __future__ import annotations

import torch


def softmax_counts_reference(feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``Σ_i softmax_j(feat_i · weight_j + bias_j)``; feat ``(..., N, f)``, weight ``(..., k, f)``,
    bias ``(..., k)`` → ``(..., k)``. Plain autograd; memory ``O(N·k)``."""
    logits = feat @ weight.transpose(-1, -2) + bias.unsqueeze(-2)
    return torch.softmax(logits, dim=-1).sum(dim=-2)


def softmax_counts(feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Soft counts of an affine softmax (see module docstring). Dispatches to the fastest exact path."""
    return softmax_counts_reference(feat, weight, bias)
