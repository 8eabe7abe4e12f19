r"""The ``"gather"`` backend of :func:`der.attention.block_sparse_attention`: bucketed gather + batched matmuls
over the kept key blocks (Sec. 4 / App. E.4), with a FlashAttention-2 style recompute backward.

Plan (cached on the BlockLayout)
--------------------------------
Layout rows (one per (batch-of-layout, head, query block)) are grouped into **buckets** of rows that keep
the same number ``K`` of key blocks and need the same *tail mask*, so no row is padded to a longer one
(uneven DER layouts, ``budget="head"``, cost only what they keep). Kept blocks are listed in ascending
order, so the only element-level masking ever needed sits in the **last** kept slot:

* ``causal``: a row that keeps its diagonal block has it last (blocks above the diagonal are dropped); the
  strict upper triangle of that slot gets ``-inf``;
* ``N % block_size != 0`` (non-causal): a row that keeps the last, partly padded key block has it last;
  the padded keys of that slot get ``-inf``. (Under ``causal`` only padded queries could see padded keys;
  they are dropped and get zero gradient, so no extra mask is needed.)

Rows that keep nothing are in no bucket: their output and gradients are zeros. A bucket whose rows form
one contiguous range (every uniform layout) reads queries and writes outputs through slices (no copy).

Forward (per bucket, per chunk of ``c`` rows sized to stay in cache; temporaries are reused buffers)
------------------------------------------------------------------------------------------------------
``kg, vg`` = the kept K, V blocks gathered with ``index_select(out=)``;
``S = baddbmm(bias, q, kgᵀ, alpha=scale)`` (scale and the key-padding bias fused into the matmul, the tail
mask added to the last slot); ``P = softmax(S)`` in place; ``O = P vg``. ``torch.softmax`` (one fused
kernel with a fast vectorised exp) is cheaper on CPU than separate max / ``exp_`` / sum passes (``exp_``
alone costs more than the whole softmax), so no log-sum-exp is kept: the backward recomputes ``P`` the
same way. A query with no allowed key (all its keys padding) has an all ``-inf`` row: ``P = 0``, zero
output and gradient, never NaN.

Backward, per chunk (``P`` recomputed, or kept from forward when all probabilities take at most
``KEEP_P_BYTES``; 1 of the 5 backward matmuls and the softmax saved): ``δ = rowsum(dO ∘ O)``, ``dV_g = Pᵀ dO``, ``dS = P ∘ (dO vgᵀ − δ)``,
``dQ = scale · dS kg``, ``dK_g = scale · dSᵀ q`` (scale fused into ``baddbmm``); ``dK_g, dV_g`` are
scattered back with ``index_add_``.

Threads: per-chunk matmuls are small, so one intra-op thread is the robust setting on a loaded machine
(more OpenMP threads mostly add synchronisation).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Plan", "make_plan", "attention", "CHUNK_BYTES", "KEEP_P_BYTES", "MAX_RUN"]

# Bytes of gathered key+value blocks per chunk (the score/probability buffer is about as large at Dh = bs):
# about one L2 cache, so a chunk's gathers and matmuls stay in cache while batches stay large
# (benchmarks/results/attention_kernel.json).
CHUNK_BYTES = 2 << 20
# Training: the probabilities are kept from forward (no score matmul, no softmax in backward) when all of
# them fit in this many bytes; larger problems recompute them (memory O(N·Dh) plus one chunk).
KEEP_P_BYTES = 32 << 20
# Most query blocks merged into one run (one gather, one (m·bs × K·bs) score matrix). Runs are used only
# when they at least halve the number of rows: otherwise bucketing by run length would split contiguous
# buckets and cost a gather of q and a scatter of the output per row.
MAX_RUN = 8


@dataclass
class _Bucket:
    """Runs of ``m`` consecutive layout rows (query blocks of one head) with the same ``K`` kept key blocks
    and one tail kind (0: none, 1: causal diagonal, 2: padding). Host-side (numpy) index arrays."""

    rows: np.ndarray  # (n,) first layout row id of each run (Bl*H*nb level)
    idx: np.ndarray  # (n, K) kept key-block ids of the runs, ascending (within the row's head)
    K: int
    tail: int
    m: int


@dataclass
class Plan:
    """Layout-derived buckets of the gather path (cached on the :class:`~der.attention.layout.BlockLayout`)."""

    buckets: list[_Bucket]
    L: int  # layout rows Bl*H*nb
    nb: int
    H: int
    has_empty: bool
    tails: dict[int, torch.Tensor]  # tail kind → bool (bs or 1, bs) allowed mask of the last kept slot
    device: torch.device = torch.device("cpu")
    _memo: dict = field(default_factory=dict)

    def expand(self, B: int, dtype: torch.dtype, Dh: int, bs: int) -> tuple[list[tuple], int]:
        """Per bucket at batch ``B``: ``(K, tail_bias, chunks)``; ``tail_bias`` a float ``0/-inf`` tensor or
        None; ``chunks`` a list of ``(rows, c, m, ids, p_off)``: ``c`` runs of ``m`` query blocks, ``rows``
        their ``c*m`` rows of the flattened ``(B*H*nb)`` blocks (a slice when contiguous, else an index
        tensor), ``ids`` the ``(c*K,)`` key-block rows, ``p_off`` the chunk's offset in a flat store of all
        probabilities; and the store's size. Memoised per (B, dtype, Dh, bs). Index arithmetic runs in
        numpy (a dynamic layout builds a fresh plan on every call); each bucket's indices go to the device
        as one tensor, chunks are views of it."""
        key = (B, dtype, Dh, bs)
        if key not in self._memo:
            out, p_numel, biases = [], 0, {}
            reps = B * self.H * self.nb // self.L  # 1 for per-batch layouts, B for a shared one
            off = np.arange(reps, dtype=np.int64) * self.L
            elsize = torch.empty((), dtype=dtype).element_size()
            for bk in self.buckets:
                m, K = bk.m, bk.K
                starts = (bk.rows[None, :] + off[:, None]).reshape(-1)
                rows = (starts[:, None] + np.arange(m)).reshape(-1)  # ascending
                n = starts.size
                run = int(rows[-1] - rows[0]) == rows.size - 1
                rows_t = None if run else torch.from_numpy(rows).to(self.device)
                ids_t = torch.from_numpy((bk.idx[None] + off[:, None, None]).reshape(-1)).to(self.device)
                c = max(1, CHUNK_BYTES // (K * bs * elsize * (2 * Dh + (m - 1) * bs)))
                chunks = [(slice(int(rows[c0 * m]), int(rows[c0 * m]) + min(c, n - c0) * m) if run
                           else rows_t[c0 * m:(c0 + c) * m], min(c, n - c0), m, ids_t[c0 * K:(c0 + c) * K],
                           p_numel + c0 * m * bs * K * bs) for c0 in range(0, n, c)]
                p_numel += n * m * bs * K * bs
                if bk.tail and bk.tail not in biases:
                    t = self.tails[bk.tail]
                    biases[bk.tail] = torch.zeros(t.shape, dtype=dtype, device=t.device).masked_fill_(~t, float("-inf"))
                out.append((K, biases.get(bk.tail), chunks))
            self._memo[key] = (out, p_numel)
        return self._memo[key]


def make_plan(layout: torch.Tensor, block_size: int, n: int, causal: bool) -> Plan:
    """Buckets of a ``(Bl, H, nb, nb)`` layout (see module docstring); index arithmetic in numpy."""
    Bl, H, nb, _ = layout.shape
    bs, dev = block_size, layout.device
    lay = layout.detach().cpu().numpy().reshape(-1, nb)
    if causal:
        lay = (lay.reshape(-1, nb, nb) & np.tri(nb, dtype=bool)).reshape(-1, nb)
    L = lay.shape[0]
    counts = lay.sum(-1)
    order = np.argsort(~lay, axis=-1, kind="stable")  # kept blocks first, ascending
    last = np.take_along_axis(order, np.maximum(counts - 1, 0)[:, None], 1)[:, 0]
    ar = np.arange(L)
    qblock = ar % nb
    tail = np.zeros(L, dtype=np.int64)
    tails = {}
    if causal:
        tail[last == qblock] = 1
        tails[1] = torch.from_numpy(np.tri(bs, dtype=bool)).to(dev)  # (torch's bool tril is slow on CPU)
    elif n % bs:
        tail[last == nb - 1] = 2
        tails[2] = (torch.arange(bs, device=dev) < n - (nb - 1) * bs)[None, :]
    base = ar // nb * nb  # first key block of the row's (batch, head)
    # runs: consecutive query blocks of one head with the same kept set share one gather and one matmul
    # (not across a causal diagonal tail); at most MAX_RUN query blocks per run
    same = np.zeros(L, dtype=bool)
    same[1:] = (lay[1:] == lay[:-1]).all(-1) & (qblock[1:] != 0) & (tail[1:] == tail[:-1]) & (tail[1:] != 1)
    run_start = np.maximum.accumulate(np.where(same, 0, ar))
    start = (ar - run_start) % MAX_RUN == 0
    if int(start.sum()) > L // 2:  # few merges: not worth splitting one contiguous bucket (copies of q, out)
        start[:] = True
    starts = np.flatnonzero(start)
    length = np.diff(starts, append=L)
    Ks, ts = counts[starts], tail[starts]
    perm = np.lexsort((length, ts, Ks))  # stable: rows ascending within a bucket
    starts, length, Ks, ts = starts[perm], length[perm], Ks[perm], ts[perm]
    cut = np.flatnonzero(np.diff(Ks) | np.diff(ts) | np.diff(length)) + 1
    buckets = []
    for lo, hi in zip(np.r_[0, cut], np.r_[cut, starts.size], strict=True):
        K = int(Ks[lo])
        if K == 0 or lo == hi:
            continue
        sel = starts[lo:hi]
        buckets.append(_Bucket(rows=sel, idx=order[sel, :K] + base[sel, None], K=K, tail=int(ts[lo]),
                               m=int(length[lo])))
    return Plan(buckets=buckets, L=L, nb=nb, H=H, has_empty=bool((counts == 0).any()), tails=tails, device=dev)


class _Buffers:
    """Scratch tensors reused across chunks and calls (fresh large temporaries cost page faults on every
    call). One set per thread, dtype and device (:func:`_scratch`); at most a few chunk sizes in bytes."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        numel = math.prod(shape)
        b = self.bufs.get(name)
        if b is None or b.numel() < numel:
            b = self.bufs[name] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return b[:numel].view(shape)


_LOCAL = threading.local()


def _scratch(like: torch.Tensor) -> _Buffers:
    """This thread's scratch buffers for ``like``'s dtype and device."""
    pool = _LOCAL.__dict__.setdefault("pool", {})
    key = (like.dtype, like.device)
    if key not in pool:
        pool[key] = _Buffers(like.dtype, like.device)
    return pool[key]


def _take(t: torch.Tensor, r, buf: _Buffers, name: str, c: int) -> torch.Tensor:
    """Rows ``r`` (slice or index tensor of ``c*m`` blocks) of ``t (R, bs, d)`` as ``(c, m*bs, d)``."""
    if isinstance(r, slice):
        sub = t[r]
    else:
        sub = torch.index_select(t, 0, r, out=buf.get(name, r.numel(), *t.shape[1:]))
    return sub.view(c, -1, t.shape[-1])


def _dest(t: torch.Tensor, r, buf: _Buffers, c: int, rows: int) -> torch.Tensor:
    """Where a chunk's ``(c, rows, d)`` result goes: straight into ``t`` for a slice, else a buffer."""
    if isinstance(r, slice):
        return t[r].view(c, rows, t.shape[-1])
    return buf.get("o", c, rows, t.shape[-1])


def _put(t: torch.Tensor, r, res: torch.Tensor) -> None:
    if not isinstance(r, slice):
        t.index_copy_(0, r, res.view(-1, *t.shape[1:]))


def _probs(qc, kf, ids, bias_fn, tail, scale, buf, c, K, bs, s=None):
    """Softmax probabilities ``(c, m*bs, K*bs)`` of one chunk (in ``s`` or a reused buffer) and the gathered
    key blocks.

    ``torch.softmax`` (fused, with its fast vectorised exp) beats separate max / exp / sum passes on CPU, so
    the backward recomputes it too instead of ``exp(S - logsumexp)``."""
    Dh = qc.shape[-1]
    kg = torch.index_select(kf, 0, ids, out=buf.get("k", c * K, bs, Dh)).view(c, K * bs, Dh)
    s = buf.get("s", c, qc.shape[1], K * bs) if s is None else s
    bias = bias_fn(ids, c) if bias_fn is not None else None
    if bias is None:
        torch.baddbmm(s, qc, kg.transpose(1, 2), beta=0.0, alpha=scale, out=s)
    else:
        torch.baddbmm(bias, qc, kg.transpose(1, 2), alpha=scale, out=s)
    if tail is not None:
        s[:, :, (K - 1) * bs:].add_(tail)
    if bias is None:
        return torch._softmax(s, -1, False, out=s), kg
    # key padding: a query may lose every key ("dead": all -inf) → p = 0, zero output and gradient
    dead = torch.amax(s, -1, keepdim=True, out=buf.get("m", c, qc.shape[1], 1)) == float("-inf")
    return torch._softmax(s, -1, False, out=s).masked_fill_(dead, 0.0), kg


def _forward(qb, kf, vf, plan_b, kbias, scale, has_empty, keep_p):
    """Output ``(R, bs, Dh)`` of the bucketed forward and the flat probability store (None unless ``keep_p``)."""
    R, bs, Dh = qb.shape
    buf = _scratch(qb)
    out = torch.zeros_like(qb) if has_empty else torch.empty_like(qb)
    bias_fn = _bias_fn(kbias, buf)
    plan_b, p_numel = plan_b
    store = qb.new_empty(p_numel) if keep_p else None
    for K, tail, chunks in plan_b:
        for r, c, m, ids, off in chunks:
            dst = None if store is None else store[off:off + c * m * bs * K * bs].view(c, m * bs, K * bs)
            p, _ = _probs(_take(qb, r, buf, "q", c), kf, ids, bias_fn, tail, scale, buf, c, K, bs, dst)
            vg = torch.index_select(vf, 0, ids, out=buf.get("v", c * K, bs, Dh)).view(c, K * bs, Dh)
            _put(out, r, torch.bmm(p, vg, out=_dest(out, r, buf, c, m * bs)))
    return out, store


class BlockSparseCPU(torch.autograd.Function):
    """Bucketed block-sparse attention over ``(R, bs, Dh)`` blocks (R = B*H*nb); see module docstring."""

    @staticmethod
    def forward(ctx, qb, kf, vf, plan_b, kbias, scale, has_empty, keep_p):
        out, store = _forward(qb, kf, vf, plan_b, kbias, scale, has_empty, keep_p)
        ctx.save_for_backward(qb, kf, vf, out, kbias)
        ctx.plan_b, ctx.scale, ctx.has_empty, ctx.store = plan_b[0], scale, has_empty, store
        return out

    @staticmethod
    def backward(ctx, dout):
        qb, kf, vf, out, kbias = ctx.saved_tensors
        plan_b, scale = ctx.plan_b, ctx.scale
        R, bs, Dh = qb.shape
        dout = dout.contiguous()
        buf = _scratch(qb)
        dq = torch.zeros_like(qb) if ctx.has_empty else torch.empty_like(qb)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        bias_fn = _bias_fn(kbias, buf)
        store = ctx.store
        for K, tail, chunks in plan_b:
            for r, c, m, ids, off in chunks:
                qc = _take(qb, r, buf, "q", c)
                if store is None:
                    p, kg = _probs(qc, kf, ids, bias_fn, tail, scale, buf, c, K, bs)
                else:  # probabilities kept from forward: no score matmul, no softmax
                    p = store[off:off + c * m * bs * K * bs].view(c, m * bs, K * bs)
                    kg = torch.index_select(kf, 0, ids, out=buf.get("k", c * K, bs, Dh)).view(c, K * bs, Dh)
                do = _take(dout, r, buf, "do", c)
                g = buf.get("g", c, K * bs, Dh)
                dv.index_add_(0, ids, torch.bmm(p.transpose(1, 2), do, out=g).view(-1, bs, Dh))
                vg = torch.index_select(vf, 0, ids, out=buf.get("v", c * K, bs, Dh)).view(c, K * bs, Dh)
                dp = torch.bmm(do, vg.transpose(1, 2), out=buf.get("dp", c, m * bs, K * bs))
                # δ = rowsum(dO ∘ O) = rowsum(dP ∘ P), per chunk (in cache)
                oc = _take(out, r, buf, "oc", c)
                delta = torch.sum(torch.mul(do, oc, out=buf.get("prod", *do.shape)), -1, keepdim=True,
                                  out=buf.get("delta", c, m * bs, 1))
                ds = dp.sub_(delta).mul_(p)
                dqc = _dest(dq, r, buf, c, m * bs)
                _put(dq, r, torch.baddbmm(dqc, ds, kg, beta=0.0, alpha=scale, out=dqc))
                dkg = torch.baddbmm(g, ds.transpose(1, 2), qc, beta=0.0, alpha=scale, out=g)
                dk.index_add_(0, ids, dkg.view(-1, bs, Dh))
        return dq, dk, dv, None, None, None, None, None


def _bias_fn(kbias: torch.Tensor | None, buf: _Buffers):
    """Key-padding bias ``(c, 1, K*bs)`` of a chunk from the ``(B*H*nb, bs)`` per-block bias (None: no mask)."""
    if kbias is None:
        return None
    bs = kbias.shape[-1]
    return lambda ids, c: torch.index_select(kbias, 0, ids, out=buf.get("kb", ids.numel(), bs)).view(c, 1, -1)


def attention(q, k, v, plan: Plan, block_size: int, scale: float, key_padding_mask=None) -> torch.Tensor:
    """``(B, H, N, Dh)`` block-sparse attention with a cached :class:`Plan`."""
    B, H, N, Dh = q.shape
    nb = plan.nb
    npad, R = nb * block_size, B * H * nb

    def blocks(t):
        if npad != N:
            t = F.pad(t, (0, 0, 0, npad - N))
        return t.reshape(R, block_size, Dh)

    kbias = None
    if key_padding_mask is not None:  # (B*H*nb, bs) additive 0/-inf bias per key block
        kpm = F.pad(key_padding_mask, (0, npad - N), value=False).view(B, 1, nb, block_size)
        kbias = torch.zeros(B, H, nb, block_size, dtype=q.dtype, device=q.device)
        kbias.masked_fill_(~kpm, float("-inf"))
        kbias = kbias.view(R, block_size)
    plan_b = plan.expand(B, q.dtype, Dh, block_size)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    keep_p = grad and plan_b[1] * q.element_size() <= KEEP_P_BYTES
    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    if grad:
        out = BlockSparseCPU.apply(qb, kb, vb, plan_b, kbias, scale, plan.has_empty, keep_p)
    else:  # inference: no autograd.Function bookkeeping (per-call overhead at short N)
        out = _forward(qb, kb, vb, plan_b, kbias, scale, plan.has_empty, False)[0]
    return out.view(B, H, npad, Dh)[:, :, :N]
