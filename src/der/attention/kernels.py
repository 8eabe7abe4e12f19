r"""Block-sparse self-attention: ``block_sparse_attention(q, k, v, layout)`` with a ``BlockLayout``.

The frozen per-head block supports of Sec. 4 / App. E.4 turn dense :math:`O(N^2 d)` attention into
:math:`O(N b d)`: query block :math:`i` of head :math:`h` attends only to the key blocks :math:`j` with
``layout[b, h, i, j] == True``,

.. math::

    \mathrm{out}_t = \sum_{s \in \mathcal{K}(t)} \mathrm{softmax}_s\!\big(\tfrac{q_t \cdot k_s}{\sqrt{d}}\big) v_s,
    \qquad \mathcal{K}(t) = \{ s : \mathrm{layout}[\lfloor t/bs \rfloor, \lfloor s/bs \rfloor] \}
    \ (\cap\ \{s \le t\} \text{ if causal}).

Backends
--------
``"gather"``  (ours; any device, trains): :mod:`der.attention._gather`. Rows of the layout are bucketed by
    their number of kept key blocks (no padding to the longest row), the kept key/value blocks of a chunk of
    query blocks are gathered into reused buffers, then scores (scale fused), softmax and values are batched
    matmuls. A custom ``autograd.Function`` saves ``q, k, v`` and the output and recomputes the
    probabilities in backward (FlashAttention-style), so memory stays :math:`O(N d)` plus one chunk.
    ``"cpu"`` is a deprecated alias (the backend was never CPU-only).
``"flex"``  ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built by
    ``BlockMask.from_kv_blocks``; compiled once with ``torch.compile`` (automatic dynamic shapes: one
    static and one dynamic-shape compile serve all N). FlexAttention has no CPU backward in torch 2.13,
    so ``"flex"`` on CPU with ``requires_grad`` raises.
``"dense"``  masked dense SDPA: the reference (:math:`O(N^2)` memory).
``"auto"``  ``"flex"`` on CUDA, ``"gather"`` elsewhere (the only path that trains on CPU).

The gather plan and the ``BlockMask`` are derived once per :class:`~der.attention.layout.BlockLayout` and
cached on it (:meth:`~der.attention.layout.BlockLayout.derived`).

Conventions
-----------
* ``q, k, v: (B, H, N, Dh)``; ``layout``: a :class:`~der.attention.layout.BlockLayout` for ``N`` tokens
  with ``B`` or 1 batch rows and ``H`` heads (a bare bool tensor raises ``TypeError``: wrap it with
  ``BlockLayout.from_mask``). ``N`` not divisible by the block size is padded internally; padded keys are
  masked, padded queries dropped.
* ``layout.causal`` additionally masks keys after the query (element level); key blocks above the block
  diagonal are dropped.
* ``key_padding_mask: (B, N)`` bool (True = real key) additionally hides padded keys (backends "gather",
  "dense"; "auto" routes to "gather" when it is given).
* A query whose set of allowed keys is empty (its layout row is all ``False``, all its kept blocks lie
  after it under ``causal``, or all their keys are padding) gets an output of **zeros** and zero
  gradient (not NaN). All backends agree.
* float16 / bfloat16 inputs are computed in float32 inside and returned in the input dtype (except
  ``"flex"`` on CUDA, which runs in the input dtype).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F

from der.attention import _gather
from der.attention.layout import BlockLayout, as_layout

__all__ = ["block_sparse_attention", "BACKENDS", "Backend", "resolve_backend"]

Backend = Literal["auto", "gather", "flex", "dense"]
BACKENDS: tuple[str, ...] = ("auto", "gather", "flex", "dense")
_ALIASES = {"cpu": "gather"}


def resolve_backend(backend: str) -> str:
    """Canonical backend name (``"cpu"`` → ``"gather"`` with a ``DeprecationWarning``)."""
    if backend in _ALIASES:
        warnings.warn(f"backend={backend!r} is deprecated; use {_ALIASES[backend]!r}", DeprecationWarning,
                      stacklevel=3)
        return _ALIASES[backend]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


# ----------------------------------------------------------------------------------------------- checks
def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, N, Dh), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape (B, H, N, Dh), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.device == k.device == v.device == layout.device):
        raise ValueError(f"q, k, v, layout must be on one device, got {q.device}, {k.device}, {v.device}, "
                         f"{layout.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")
    B, H, N, _ = q.shape
    if N < layout.block_size:
        raise ValueError(f"sequence length N={N} is smaller than one block (block_size={layout.block_size})")
    if layout.q_len != N or layout.kv_len != N:
        raise ValueError(f"layout is for seq_len={layout.seq_len}, inputs have N={N}; use layout.resize(N)")
    if layout.batch not in (1, B) or layout.heads != H:
        raise ValueError(f"layout must have 1 or B={B} batch rows and H={H} heads, got {layout!r}")


def _check_padding_mask(mask: torch.Tensor, q: torch.Tensor) -> None:
    B, N = q.shape[0], q.shape[2]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, N):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"key_padding_mask must be a bool (B={B}, N={N}) tensor, got {got}")
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask must be on {q.device}, got {mask.device}")


# ----------------------------------------------------------------------------------------------- dense
def _dense(q, k, v, layout: BlockLayout, scale, key_padding_mask=None):
    mask = layout.to_dense()
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    empty = ~mask.any(-1, keepdim=True)  # (Bl, H, n, 1): rows with nothing to attend → zeros
    mask = mask | empty
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(empty, 0.0)


# ----------------------------------------------------------------------------------------------- ours
def _gather_path(q, k, v, layout: BlockLayout, scale, key_padding_mask=None):
    """The ``"gather"`` backend (:mod:`der.attention._gather`) with its plan cached on the layout."""
    bs, n = layout.block_size, layout.q_len
    plan = layout.derived("gather_plan", lambda: _gather.make_plan(layout.mask, bs, n, layout.causal))
    return _gather.attention(q, k, v, plan, bs, scale, key_padding_mask)


# ----------------------------------------------------------------------------------------------- flex
@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=None: the first shape compiles static; a second shape triggers one dynamic-shape compile that
    # then serves every further (B, H, N), so varying N does not recompile on every call (nor hit dynamo's
    # recompile limit and silently fall back to eager).
    return torch.compile(flex_attention, dynamic=None)


def _kv_blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = mask.sum(-1).to(torch.int32)
    return counts, torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)


def _block_mask(layout: BlockLayout):
    """``BlockMask`` of a layout: kept blocks touching the diagonal (causal) or the padded tail are
    "partial" (``mask_mod`` evaluated), the others "full". ``mask_mod`` also encodes the layout itself,
    because eager (uncompiled) FlexAttention evaluates ``mask_mod`` on every element."""
    from torch.nn.attention.flex_attention import BlockMask

    block_size, n, causal = layout.block_size, layout.q_len, layout.causal
    lay = layout.kept_blocks()
    nb = lay.shape[-1]
    partial = torch.zeros(nb, nb, dtype=torch.bool, device=lay.device)
    if causal:
        partial |= torch.eye(nb, dtype=torch.bool, device=lay.device)
    if n % block_size:
        partial[:, -1] = True
    lay_c = lay.contiguous()
    per_batch = lay.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        ok = lay_c[b if per_batch else 0, h, q_idx // block_size, kv_idx // block_size] & (kv_idx < n)
        return ok & (q_idx >= kv_idx) if causal else ok

    counts, indices = _kv_blocks(lay & partial)
    full_counts, full_indices = _kv_blocks(lay & ~partial)
    return BlockMask.from_kv_blocks(counts, indices, full_counts, full_indices, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(n, n))


def _flex(q, k, v, layout: BlockLayout, scale, compiled: bool = True):
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                               or v.requires_grad):
        raise ValueError("backend='flex' has no CPU backward in torch 2.13; use backend='cpu' (or 'auto') "
                         "to train on CPU")
    bm = layout.derived("flex_block_mask", lambda: _block_mask(layout))
    if compiled:
        fn = _compiled_flex()
    else:
        from torch.nn.attention.flex_attention import flex_attention as fn
    out = fn(q, k, v, block_mask=bm, scale=scale)
    empty = ~layout.kept_blocks().any(-1, keepdim=True)  # (Bl, H, nb, 1): query blocks with no key block
    empty = empty.repeat_interleave(layout.block_size, -2)[..., :layout.q_len, :]
    return out.masked_fill(empty, 0.0)


# ----------------------------------------------------------------------------------------------- public
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                           backend: Backend = "auto", scale: float | None = None,
                           key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Attention restricted to the kept key blocks of ``layout`` (Sec. 4, App. E.4).

    Args:
        q, k, v: ``(B, H, N, Dh)``, one dtype (float16/bfloat16/float32/float64) and one device.
        layout: :class:`~der.attention.layout.BlockLayout` for ``N`` tokens, ``H`` heads, 1 or ``B`` batch
            rows (block size and causality come from it).
        backend: ``"auto" | "gather" | "flex" | "dense"`` (see module docstring).
        scale: softmax scale, default ``1/sqrt(Dh)``.
        key_padding_mask: optional bool ``(B, N)``, ``True`` = real key (HF ``attention_mask`` convention);
            padded keys are never attended to. Backends ``"gather"`` and ``"dense"`` (``"auto"`` then picks
            ``"gather"`` on every device); ``"flex"`` raises.

    Returns:
        ``(B, H, N, Dh)`` in the input dtype; queries with no allowed key get zeros.

    Example:
        >>> from der.attention import BlockLayout
        >>> q = k = v = torch.randn(1, 2, 128, 16)
        >>> lay = BlockLayout.from_mask(torch.eye(2, dtype=torch.bool).expand(2, 2, 2), block_size=64)
        >>> block_sparse_attention(q, k, v, lay).shape
        torch.Size([1, 2, 128, 16])
    """
    layout = as_layout(layout)
    backend = resolve_backend(backend)
    _validate(q, k, v, layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if key_padding_mask is not None:
        _check_padding_mask(key_padding_mask, q)
        if backend == "flex":
            raise ValueError("key_padding_mask is not supported by backend='flex'; use 'gather' or 'dense'")
    if backend == "auto":
        backend = "flex" if q.device.type == "cuda" and key_padding_mask is None else "gather"
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16) and (backend != "flex" or q.device.type == "cpu"):
        q, k, v = q.float(), k.float(), v.float()
    if backend == "dense":
        out = _dense(q, k, v, layout, scale, key_padding_mask)
    elif backend == "flex":
        out = _flex(q, k, v, layout, scale)
    else:
        out = _gather_path(q, k, v, layout, scale, key_padding_mask)
    return out.to(dtype)
