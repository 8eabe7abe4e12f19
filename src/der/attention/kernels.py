r"""Block-sparse self-attention: ``block_sparse_attention(q, k, v, layout, block_size)``.

The frozen per-head block supports of Sec. 4 / App. E.4 turn dense :math:`O(N^2 d)` attention into
:math:`O(N b d)`: query block :math:`i` of head :math:`h` attends only to the key blocks :math:`j` with
``layout[b, h, i, j] == True``,

.. math::

    \mathrm{out}_t = \sum_{s \in \mathcal{K}(t)} \mathrm{softmax}_s\!\big(\tfrac{q_t \cdot k_s}{\sqrt{d}}\big) v_s,
    \qquad \mathcal{K}(t) = \{ s : \mathrm{layout}[\lfloor t/bs \rfloor, \lfloor s/bs \rfloor] \}
    \ (\cap\ \{s \le t\} \text{ if causal}).

Backends
--------
``"cpu"``  (ours; runs on any device, trains): :mod:`der.attention._cpu_kernel`. Rows of the layout are
    bucketed by their number of kept key blocks (no padding to the longest row), the kept key/value blocks
    of a chunk of query blocks are gathered into reused buffers, then scores (scale fused), softmax and
    values are batched matmuls. A custom ``autograd.Function`` saves ``q, k, v`` and the output and
    recomputes the probabilities in backward (FlashAttention-style), so memory stays :math:`O(N d)` plus
    one chunk. Speed vs dense SDPA at 75% block sparsity: benchmarks/results/attention_kernel.json
    (``der bench attention-kernel``).
``"flex"``  ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built by
    ``BlockMask.from_kv_blocks``; compiled once with ``torch.compile`` (automatic dynamic shapes: one
    static and one dynamic-shape compile serve all N). Block masks are cached on (layout bytes, N, block
    size, causal).
    FlexAttention has no CPU backward in torch 2.13, so ``"flex"`` on CPU with ``requires_grad`` raises.
``"dense"``  masked dense SDPA: the reference (:math:`O(N^2)` memory).
``"auto"``  ``"flex"`` on CUDA, ``"cpu"`` elsewhere (the only path that trains on CPU).

Conventions
-----------
* ``q, k, v: (B, H, N, Dh)``; ``layout: (B or 1, H, nb, nb)`` bool with ``nb = ceil(N / block_size)``.
  ``N`` not divisible by ``block_size`` is padded internally; padded keys are masked, padded queries dropped.
* ``causal=True`` additionally masks keys after the query (element level); key blocks above the block
  diagonal are dropped from the layout.
* ``key_padding_mask: (B, N)`` bool (True = real key) additionally hides padded keys (backends "cpu",
  "dense"; "auto" routes to "cpu" when it is given).
* A query whose set of allowed keys is empty (its layout row is all ``False``, all its kept blocks lie
  after it under ``causal``, or all their keys are padding) gets an output of **zeros** and zero
  gradient (not NaN). All backends agree.
* float16 / bfloat16 inputs are computed in float32 inside and returned in the input dtype (except
  ``"flex"`` on CUDA, which runs in the input dtype).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F

from der.attention import _cpu_kernel

__all__ = ["block_sparse_attention", "BACKENDS", "expand_layout"]

BACKENDS = ("auto", "cpu", "flex", "dense")
_CACHE_SIZE = 64


class _LRU(OrderedDict):
    """Tiny LRU dict for cached layout-derived index tensors and block masks."""

    def get_or(self, key: Any, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        val = make()
        self[key] = val
        if len(self) > _CACHE_SIZE:
            self.popitem(last=False)
        return val


_INDEX_CACHE = _LRU()
_MASK_CACHE = _LRU()


# ----------------------------------------------------------------------------------------------- checks
def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor, block_size: int,
              backend: str) -> tuple[int, int, int, int, int]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, t in (("q", q), ("k", k), ("v", v), ("layout", layout)):
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
    if layout.dtype != torch.bool:
        raise ValueError(f"layout must be a bool tensor, got {layout.dtype}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    B, H, N, Dh = q.shape
    if N < block_size:
        raise ValueError(f"sequence length N={N} is smaller than one block (block_size={block_size})")
    nb = math.ceil(N / block_size)
    if layout.dim() != 4 or layout.shape[0] not in (1, B) or tuple(layout.shape[1:]) != (H, nb, nb):
        raise ValueError(f"layout must be (1 or B={B}, H={H}, nb={nb}, nb={nb}) for N={N}, "
                         f"block_size={block_size}, got {tuple(layout.shape)}")
    return B, H, N, Dh, nb


def _check_padding_mask(mask: torch.Tensor, q: torch.Tensor) -> None:
    B, N = q.shape[0], q.shape[2]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, N):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"key_padding_mask must be a bool (B={B}, N={N}) tensor, got {got}")
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask must be on {q.device}, got {mask.device}")


_KEY_MEMO: dict[int, tuple] = {}  # id(layout) → (weakref to it, its _version, key)


def _layout_key(layout: torch.Tensor) -> tuple:
    """Cache key of a layout's contents. Hashing the bytes (and, on CUDA, copying them to the host) costs
    a few µs per call, a visible share of a small attention call; the key is therefore memoised per
    tensor object and in-place version (a weak reference: a new tensor at a reused id is never mistaken
    for the old one, and any in-place edit bumps ``_version``). Inference tensors have no version counter:
    their key is computed every call."""
    memo = not layout.is_inference()
    hit = _KEY_MEMO.get(id(layout)) if memo else None
    if hit is not None and hit[0]() is layout and hit[1] == layout._version:
        return hit[2]
    lay = layout.detach().to("cpu").contiguous()
    key = (tuple(lay.shape), hash(lay.numpy().tobytes()), str(layout.device))
    if not memo:
        return key
    if len(_KEY_MEMO) >= _CACHE_SIZE:
        _KEY_MEMO.clear()
    _KEY_MEMO[id(layout)] = (weakref.ref(layout), layout._version, key)
    return key


def _causal_layout(layout: torch.Tensor, causal: bool) -> torch.Tensor:
    if not causal:
        return layout
    nb = layout.shape[-1]
    return layout & torch.ones(nb, nb, dtype=torch.bool, device=layout.device).tril()


def expand_layout(layout: torch.Tensor, block_size: int, n: int, causal: bool = False) -> torch.Tensor:
    """Element mask ``(B or 1, H, n, n)`` (True = attend) of a block layout, cropped to ``n``, causal applied."""
    m = layout.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :n, :n]
    if causal:
        m = m & torch.ones(n, n, dtype=torch.bool, device=layout.device).tril()
    return m


# ----------------------------------------------------------------------------------------------- dense
def _dense(q, k, v, layout, block_size, causal, scale, key_padding_mask=None):
    n = q.shape[-2]
    mask = expand_layout(layout, block_size, n, causal)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    empty = ~mask.any(-1, keepdim=True)  # (Bl, H, n, 1): rows with nothing to attend → zeros
    mask = mask | empty
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(empty, 0.0)


# ----------------------------------------------------------------------------------------------- ours
def _gather_path(q, k, v, layout, block_size, causal, scale, key_padding_mask=None):
    """The ``"cpu"`` backend (:mod:`der.attention._cpu_kernel`) with its plan cached per layout."""
    key = (_layout_key(layout), block_size, q.shape[2], causal)
    plan = _INDEX_CACHE.get_or(key, lambda: _cpu_kernel.make_plan(layout, block_size, q.shape[2], causal))
    return _cpu_kernel.attention(q, k, v, plan, block_size, scale, key_padding_mask)


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


def _block_mask(layout: torch.Tensor, block_size: int, n: int, causal: bool):
    """``BlockMask`` of a layout: kept blocks touching the diagonal (causal) or the padded tail are
    "partial" (``mask_mod`` evaluated), the others "full". ``mask_mod`` also encodes the layout itself,
    because eager (uncompiled) FlexAttention evaluates ``mask_mod`` on every element."""
    from torch.nn.attention.flex_attention import BlockMask

    lay = _causal_layout(layout, causal)
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


def _flex(q, k, v, layout, block_size, causal, scale, compiled: bool = True):
    n = q.shape[-2]
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                               or v.requires_grad):
        raise ValueError("backend='flex' has no CPU backward in torch 2.13; use backend='cpu' (or 'auto') "
                         "to train on CPU")
    key = (_layout_key(layout), block_size, n, causal)
    bm = _MASK_CACHE.get_or(key, lambda: _block_mask(layout, block_size, n, causal))
    if compiled:
        fn = _compiled_flex()
    else:
        from torch.nn.attention.flex_attention import flex_attention as fn
    out = fn(q, k, v, block_mask=bm, scale=scale)
    empty = ~expand_layout(_causal_layout(layout, causal).any(-1, keepdim=True), block_size, n)[..., :1]
    return out.masked_fill(empty, 0.0)


# ----------------------------------------------------------------------------------------------- public
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor,
                           block_size: int, causal: bool = False, backend: str = "auto",
                           scale: float | None = None, key_padding_mask: torch.Tensor | None = None
                           ) -> torch.Tensor:
    r"""Attention restricted to the kept key blocks of ``layout`` (Sec. 4, App. E.4).

    Args:
        q, k, v: ``(B, H, N, Dh)``, one dtype (float16/bfloat16/float32/float64) and one device.
        layout: bool ``(B or 1, H, ceil(N/block_size), ceil(N/block_size))``; ``layout[b, h, i, j]`` keeps
            key block ``j`` for query block ``i``.
        block_size: tokens per block (query and key).
        causal: also mask keys after each query.
        backend: ``"auto" | "cpu" | "flex" | "dense"`` (see module docstring).
        scale: softmax scale, default ``1/sqrt(Dh)``.
        key_padding_mask: optional bool ``(B, N)``, ``True`` = real key (HF ``attention_mask`` convention);
            padded keys are never attended to. Backends ``"cpu"`` and ``"dense"`` (``"auto"`` then picks
            ``"cpu"`` on every device); ``"flex"`` raises.

    Returns:
        ``(B, H, N, Dh)`` in the input dtype; queries with no allowed key get zeros.

    Example:
        >>> q = k = v = torch.randn(1, 2, 128, 16)
        >>> lay = torch.eye(2, dtype=torch.bool).expand(1, 2, 2, 2)
        >>> block_sparse_attention(q, k, v, lay, block_size=64).shape
        torch.Size([1, 2, 128, 16])
    """
    B, H, N, Dh, nb = _validate(q, k, v, layout, block_size, backend)
    scale = 1.0 / math.sqrt(Dh) if scale is None else float(scale)
    if key_padding_mask is not None:
        _check_padding_mask(key_padding_mask, q)
        if backend == "flex":
            raise ValueError("key_padding_mask is not supported by backend='flex'; use 'cpu' or 'dense'")
    if backend == "auto":
        backend = "flex" if q.device.type == "cuda" and key_padding_mask is None else "cpu"
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16) and (backend != "flex" or q.device.type == "cpu"):
        q, k, v = q.float(), k.float(), v.float()
    if backend == "dense":
        out = _dense(q, k, v, layout, block_size, causal, scale, key_padding_mask)
    elif backend == "flex":
        out = _flex(q, k, v, layout, block_size, causal, scale)
    else:
        out = _gather_path(q, k, v, layout, block_size, causal, scale, key_padding_mask)
    return out.to(dtype)
