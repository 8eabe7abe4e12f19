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
``"cpu"``  (ours; runs on any device, trains): for every (batch, head, query block) the kept key blocks are
    gathered (rows with fewer kept blocks are padded to the row maximum and masked with ``-inf``), then
    scores / softmax / values are batched matmuls over chunks of query blocks that fit in cache. A custom
    ``autograd.Function`` saves only ``q, k, v, out`` and the row log-sum-exp and recomputes the gathered
    blocks in backward (FlashAttention-style recompute), so memory stays :math:`O(N d)` plus one chunk.
``"flex"``  ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built by
    ``BlockMask.from_kv_blocks``; compiled with ``torch.compile`` (one compiled callable, per-shape
    specialisations cached by dynamo). Block masks are cached on (layout bytes, N, block size, causal).
    FlexAttention has no CPU backward in torch 2.13, so ``"flex"`` on CPU with ``requires_grad`` raises.
``"dense"``  masked dense SDPA: the reference (:math:`O(N^2)` memory).
``"auto"``  ``"flex"`` on CUDA, ``"cpu"`` elsewhere (the only path that trains on CPU).

Conventions
-----------
* ``q, k, v: (B, H, N, Dh)``; ``layout: (B or 1, H, nb, nb)`` bool with ``nb = ceil(N / block_size)``.
  ``N`` not divisible by ``block_size`` is padded internally; padded keys are masked, padded queries dropped.
* ``causal=True`` additionally masks keys after the query (element level); key blocks above the block
  diagonal are dropped from the layout.
* A query whose set of allowed keys is empty (its layout row is all ``False``, or all its kept blocks lie
  after it under ``causal``) gets an output of **zeros** and zero gradient (not NaN). All backends agree.
* float16 / bfloat16 inputs are computed in float32 inside and returned in the input dtype.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["block_sparse_attention", "BACKENDS", "expand_layout"]

BACKENDS = ("auto", "cpu", "flex", "dense")
_CACHE_SIZE = 64
# Gathered key+value block bytes per chunk of the CPU path (kept well inside L2/L3 on typical CPUs).
_CHUNK_BYTES = 4 << 20


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


def _layout_key(layout: torch.Tensor) -> tuple:
    lay = layout.detach().to("cpu").contiguous()
    return (tuple(lay.shape), hash(lay.numpy().tobytes()), str(layout.device))


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
def _dense(q, k, v, layout, block_size, causal, scale):
    n = q.shape[-2]
    mask = expand_layout(layout, block_size, n, causal)
    empty = ~mask.any(-1, keepdim=True)  # (Bl, H, n, 1): rows with nothing to attend → zeros
    mask = mask | empty
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(empty, 0.0)


# ----------------------------------------------------------------------------------------------- ours
def _row_indices(layout: torch.Tensor, block_size: int, n: int, causal: bool):
    """Per (Bl, H, query block): kept key block ids padded to K, slot validity, per-key positions."""
    lay = _causal_layout(layout, causal)
    Bl, H, nb, _ = lay.shape
    counts = lay.sum(-1)  # (Bl, H, nb)
    K = max(int(counts.max()), 1)
    order = torch.argsort((~lay).to(torch.int8), dim=-1, stable=True)[..., :K]  # kept blocks first
    slot = torch.arange(K, device=lay.device)
    valid = slot < counts[..., None]  # (Bl, H, nb, K)
    empty = counts == 0
    order = torch.where(empty[..., None], torch.zeros_like(order), order)
    t = torch.arange(block_size, device=lay.device)
    kpos = (order[..., None] * block_size + t).reshape(Bl, H, nb, K * block_size)
    kvalid = (valid[..., None] & (kpos.view(Bl, H, nb, K, block_size) < n)).reshape(Bl, H, nb, K * block_size)
    # Empty rows compute against the (fully real) block 0 and are zeroed afterwards: no -inf-only rows.
    kvalid = kvalid | (empty[..., None] & (slot.repeat_interleave(block_size) == 0))
    needs_bias = bool((~kvalid).any()) or causal
    return order, kvalid, kpos, empty, needs_bias


class _GatherAttention(torch.autograd.Function):
    """Chunked gather + batched-matmul attention over kept key blocks, recompute in backward."""

    @staticmethod
    def forward(ctx, qb, kf, vf, flat_idx, kvalid, kpos, keep, scale, causal, nb, chunk):
        # qb: (R, bs, Dh) query blocks; kf, vf: (R_k, bs, Dh) key/value blocks; flat_idx: (R, K) rows into
        # kf; kvalid, kpos: (R, K*bs) or None; keep: (R, 1, 1) 0/1 (0 = empty row → zero output).
        R, bs, Dh = qb.shape
        out = torch.empty_like(qb)
        lse = torch.empty(R, bs, 1, dtype=qb.dtype, device=qb.device)
        for c0 in range(0, R, chunk):
            sl = slice(c0, min(c0 + chunk, R))
            p, vg, _ = _probs(qb, kf, vf, flat_idx, kvalid, kpos, sl, scale, causal, nb, lse_out=lse)
            torch.bmm(p, vg, out=out[sl])
        out.mul_(keep)
        ctx.save_for_backward(qb, kf, vf, flat_idx, kvalid, kpos, keep, out, lse)
        ctx.scale, ctx.causal, ctx.nb, ctx.chunk = scale, causal, nb, chunk
        return out

    @staticmethod
    def backward(ctx, dout):
        qb, kf, vf, flat_idx, kvalid, kpos, keep, out, lse = ctx.saved_tensors
        scale, causal, nb, chunk = ctx.scale, ctx.causal, ctx.nb, ctx.chunk
        dout = dout.contiguous() * keep
        dq = torch.empty_like(qb)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        delta = (dout * out).sum(-1, keepdim=True)  # (R, bs, 1)
        R, bs, Dh = qb.shape
        for c0 in range(0, R, chunk):
            sl = slice(c0, min(c0 + chunk, R))
            p, vg, kg = _probs(qb, kf, vf, flat_idx, kvalid, kpos, sl, scale, causal, nb, lse_in=lse)
            do = dout[sl]
            idx = flat_idx[sl].reshape(-1)
            dv.index_add_(0, idx, torch.bmm(p.transpose(1, 2), do).view(-1, bs, Dh))
            ds = torch.bmm(do, vg.transpose(1, 2)).sub_(delta[sl]).mul_(p)  # dS = P ∘ (dP − δ)
            ds.mul_(scale)
            torch.bmm(ds, kg, out=dq[sl])
            dk.index_add_(0, idx, torch.bmm(ds.transpose(1, 2), qb[sl]).view(-1, bs, Dh))
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _probs(qb, kf, vf, flat_idx, kvalid, kpos, sl, scale, causal, nb, lse_out=None, lse_in=None):
    """Softmax probabilities of one chunk of query blocks; writes or reads the row log-sum-exp."""
    q = qb[sl]
    c, bs, Dh = q.shape
    idx = flat_idx[sl].reshape(-1)
    kg = kf.index_select(0, idx).view(c, -1, Dh)
    vg = vf.index_select(0, idx).view(c, -1, Dh)
    s = torch.bmm(q, kg.transpose(1, 2)).mul_(scale)  # (c, bs, K*bs)
    if kvalid is not None:
        allowed = kvalid[sl][:, None, :]
        if causal:
            rows = torch.arange(sl.start, sl.start + c, device=q.device) % nb
            qpos = rows[:, None] * bs + torch.arange(bs, device=q.device)  # absolute query positions
            allowed = allowed & (kpos[sl][:, None, :] <= qpos[:, :, None])
        s.masked_fill_(~allowed, float("-inf"))
    if lse_in is None:
        m = s.amax(-1, keepdim=True)
        s.sub_(m).exp_()
        denom = s.sum(-1, keepdim=True)
        s.div_(denom)
        lse_out[sl] = m + denom.log()
    else:
        s.sub_(lse_in[sl]).exp_()
    return s, vg, kg


def _gather_path(q, k, v, layout, block_size, causal, scale):
    B, H, N, Dh = q.shape
    nb = math.ceil(N / block_size)
    npad = nb * block_size
    key = (_layout_key(layout), block_size, N, causal)
    order, kvalid, kpos, empty, needs_bias = _INDEX_CACHE.get_or(
        key, lambda: _row_indices(layout, block_size, N, causal))
    K = order.shape[-1]
    base = (torch.arange(B * H, device=q.device) * nb).view(B, H, 1, 1)
    flat_idx = (order.expand(B, H, nb, K) + base).reshape(B * H * nb, K)
    R = B * H * nb

    def blocks(t):
        if npad != N:
            t = F.pad(t, (0, 0, 0, npad - N))
        return t.reshape(R, block_size, Dh)

    keep = (~empty).expand(B, H, nb).reshape(R, 1, 1).to(q.dtype)
    if needs_bias:
        kvalid_f = kvalid.expand(B, H, nb, -1).reshape(R, -1)
        kpos_f = kpos.expand(B, H, nb, -1).reshape(R, -1)
    else:
        kvalid_f = kpos_f = None
    chunk = max(1, _CHUNK_BYTES // (2 * K * block_size * Dh * q.element_size()))
    out = _GatherAttention.apply(blocks(q), blocks(k), blocks(v), flat_idx, kvalid_f, kpos_f, keep,
                                 scale, causal, nb, chunk)
    return out.view(B, H, npad, Dh)[:, :, :N]


# ----------------------------------------------------------------------------------------------- flex
@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _block_mask(layout: torch.Tensor, block_size: int, n: int, causal: bool):
    from torch.nn.attention.flex_attention import BlockMask

    lay = _causal_layout(layout, causal)
    counts = lay.sum(-1).to(torch.int32)
    indices = torch.argsort((~lay).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    need_mod = causal or n % block_size != 0

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx < n
        return ok & (q_idx >= kv_idx) if causal else ok

    return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod if need_mod else None, seq_lengths=(n, n))


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
                           scale: float | None = None) -> torch.Tensor:
    r"""Attention restricted to the kept key blocks of ``layout`` (Sec. 4, App. E.4).

    Args:
        q, k, v: ``(B, H, N, Dh)``, one dtype (float16/bfloat16/float32/float64) and one device.
        layout: bool ``(B or 1, H, ceil(N/block_size), ceil(N/block_size))``; ``layout[b, h, i, j]`` keeps
            key block ``j`` for query block ``i``.
        block_size: tokens per block (query and key).
        causal: also mask keys after each query.
        backend: ``"auto" | "cpu" | "flex" | "dense"`` (see module docstring).
        scale: softmax scale, default ``1/sqrt(Dh)``.

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
    if backend == "auto":
        backend = "flex" if q.device.type == "cuda" else "cpu"
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16) and (backend != "flex" or q.device.type == "cpu"):
        q, k, v = q.float(), k.float(), v.float()
    if backend == "dense":
        out = _dense(q, k, v, layout, block_size, causal, scale)
    elif backend == "flex":
        out = _flex(q, k, v, layout, block_size, causal, scale)
    else:
        out = _gather_path(q, k, v, layout, block_size, causal, scale)
    return out.to(dtype)
