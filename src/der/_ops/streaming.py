r"""Streaming soft counts: :math:`n_j = \sum_i \operatorname{softmax}_j(f_i^\top W_j + b_j)` in ``O((N+k)·f)``.

The plain formulation keeps the ``N×k`` probabilities for backward. Here the forward walks over chunks of
points, accumulating only the ``k`` counts, and the backward recomputes each chunk's probabilities
(flash-attention style recomputation). With the upstream gradient :math:`g = \partial L/\partial n`
(for the entropy of Eq. 3, :math:`g_j \propto -(\log p_j + 1)`):

.. math::
    \frac{\partial L}{\partial \ell_{ij}} = p_{ij}\,(g_j - \textstyle\sum_l p_{il} g_l),\qquad
    \nabla f_i = \sum_j \frac{\partial L}{\partial \ell_{ij}} W_j,\quad
    \nabla W_j = \sum_i \frac{\partial L}{\partial \ell_{ij}} f_i,\quad
    \nabla b_j = \sum_i \frac{\partial L}{\partial \ell_{ij}}.

Each softmax is over the ``k`` logits of one point, so chunks over points are independent: no cross-chunk
log-sum-exp is needed. Counts and parameter gradients are accumulated across chunks in float64 (``k·f``
numbers), so float32 results stay within ~1e-6 of a float64 evaluation even for ``N = 10⁶``.

The backward uses only differentiable torch ops on the saved inputs, so it is itself differentiable
(``create_graph=True`` / double backward works; that second-order graph does keep the chunks).

Leading batch dims broadcast (``feat (..., N, f)``, ``weight (..., k, f)``, ``bias (..., k)``): a chunk is
``(B, C, ·)`` with ``B`` the broadcast batch size, so a feature set shared by many heads is expanded one
chunk at a time only, and gradients are summed back to each input's own shape.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DEFAULT_CHUNK_ELEMS",
    "StreamingSoftmaxCounts",
    "streaming_counts_backward",
    "streaming_counts_forward",
    "streaming_softmax_counts",
]

#: Feature widths up to which the backward's gradient products are computed transposed (see below).
_SKINNY_F = 8

#: Elements (``B·C·k``) per chunk: 2^18 float32 = 1 MiB, so a chunk's buffers stay in L2/L3 cache; the ~4
#: chunk-sized temporaries add ~4 MiB of memory, against the naive path's N×k tensors. Pass ``chunk_elems``
#: to trade memory for fewer, larger parallel regions (faster when many threads share few cores).
DEFAULT_CHUNK_ELEMS = 1 << 18


def _rows_per_chunk(batch: int, n: int, k: int, chunk_elems: int) -> int:
    return max(1, min(n, chunk_elems // max(1, batch * k)))


class _Layout:
    """Broadcast bookkeeping: views of the inputs as ``(B, ·, ·)`` batches without copying ``feat``."""

    def __init__(self, feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.batch_shape = torch.broadcast_shapes(feat.shape[:-2], weight.shape[:-2], bias.shape[:-1])
        self.B = math.prod(self.batch_shape)
        self.N, self.f = feat.shape[-2], feat.shape[-1]
        self.k = weight.shape[-2]
        self.feat_shape = feat.shape
        bs = self.batch_shape
        # Parameters are O(B·k·f): materializing them per batch is cheap.
        self.W = weight.expand(*bs, self.k, self.f).reshape(self.B, self.k, self.f)
        self.b = bias.expand(*bs, self.k).reshape(self.B, 1, self.k)
        self.Wt = self.W.transpose(1, 2)

    def feat_chunk(self, feat: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """Rows ``s:e`` of every set, as ``(B, e-s, f)`` (a view when ``feat`` is not broadcast)."""
        e = min(e, self.N)
        return feat[..., s:e, :].expand(*self.batch_shape, e - s, self.f).reshape(self.B, e - s, self.f)

    def logits(self, fc: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.b, fc, self.Wt)


class _Chunks:
    """Two reusable ``(B, C, k)`` work buffers (logits, probabilities): one allocation per call.

    Fresh multi-MiB temporaries on every chunk cost page faults (glibc hands large blocks back to the OS);
    with ``out=`` buffers a chunk's logits, probabilities and logit gradients stay in the same memory.
    The softmax is ATen's fused kernel (its ``exp`` is several times faster than ``Tensor.exp_``)."""

    def __init__(self, lay: _Layout, C: int, ref: torch.Tensor) -> None:
        self.C = C
        self.a = ref.new_empty((lay.B, C, lay.k))
        self.b = ref.new_empty((lay.B, C, lay.k))

    def view(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers for a chunk of ``c`` rows (the shorter tail chunk gets its own, once per call)."""
        if c == self.C:
            return self.a, self.b
        return self.a.new_empty((self.a.shape[0], c, self.a.shape[2])), self.b.new_empty(
            (self.b.shape[0], c, self.b.shape[2])
        )


def _softmax_out(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._softmax.out(x, -1, False, out=out)


def streaming_counts_forward(
    feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> torch.Tensor:
    """Soft counts ``(..., k)`` keeping two ``B×C×k`` buffers alive. No autograd."""
    lay = _Layout(feat, weight, bias)
    C = _rows_per_chunk(lay.B, lay.N, lay.k, chunk_elems)
    acc = torch.zeros(lay.B, lay.k, dtype=torch.float64, device=feat.device)
    work = _Chunks(lay, C, feat)
    for s in range(0, lay.N, C):
        fc = lay.feat_chunk(feat, s, s + C)
        logits, p = work.view(fc.shape[1])
        torch.baddbmm(lay.b, fc, lay.Wt, out=logits)
        _softmax_out(logits, p)
        acc += p.sum(dim=1)
    return acc.to(feat.dtype).reshape(*lay.batch_shape, lay.k)


def _dlogits(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``p ⊙ (g − (p·g))`` per row, i.e. the softmax vector-Jacobian product, for ``p (B,C,k)``, ``g (B,1,k)``."""
    return p * (g - (p * g).sum(dim=-1, keepdim=True))


def _finish(lay: _Layout, weight: torch.Tensor, bias: torch.Tensor, dW, db):
    if dW is not None:
        dW = dW.reshape(*lay.batch_shape, lay.k, lay.f).sum_to_size(weight.shape).to(weight.dtype)
    if db is not None:
        db = db.reshape(*lay.batch_shape, lay.k).sum_to_size(bias.shape).to(bias.dtype)
    return dW, db


def _backward_differentiable(grad, feat, weight, bias, needs, chunk_elems):
    """Backward built from differentiable ops (for ``create_graph=True``); keeps the chunks for the
    second-order graph."""
    lay = _Layout(feat, weight, bias)
    C = _rows_per_chunk(lay.B, lay.N, lay.k, chunk_elems)
    g = grad.to(feat.dtype).expand(*lay.batch_shape, lay.k).reshape(lay.B, 1, lay.k)
    need_f, need_w, need_b = needs
    dfeat_parts, dW, db = [], None, None
    for s in range(0, lay.N, C):
        fc = lay.feat_chunk(feat, s, s + C)
        dl = _dlogits(torch.softmax(lay.logits(fc), dim=-1), g)
        if need_f:
            dfc = torch.bmm(dl, lay.W).reshape(*lay.batch_shape, fc.shape[1], lay.f)
            dfeat_parts.append(dfc.sum_to_size(*feat.shape[:-2], fc.shape[1], lay.f))
        if need_w:
            dW = (0 if dW is None else dW) + torch.bmm(dl.transpose(1, 2), fc).double()
        if need_b:
            db = (0 if db is None else db) + dl.sum(dim=1).double()
    dfeat = torch.cat(dfeat_parts, dim=-2) if need_f else None
    return (dfeat, *_finish(lay, weight, bias, dW, db))


def streaming_counts_backward(
    grad: torch.Tensor,
    feat: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    needs: tuple[bool, bool, bool],
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. ``(feat, weight, bias)`` given ``grad = ∂L/∂counts (..., k)``, recomputing chunks.

    Under ``create_graph=True`` a differentiable formulation is used instead (double backward works)."""
    if torch.is_grad_enabled():
        return _backward_differentiable(grad, feat, weight, bias, needs, chunk_elems)
    lay = _Layout(feat, weight, bias)
    C = _rows_per_chunk(lay.B, lay.N, lay.k, chunk_elems)
    g = grad.to(feat.dtype).expand(*lay.batch_shape, lay.k).reshape(lay.B, 1, lay.k)
    need_f, need_w, need_b = needs
    direct = need_f and feat.shape[:-2] == lay.batch_shape and feat.is_contiguous()
    dfeat = feat.new_empty(feat.shape) if need_f else None
    dfeat3 = dfeat.view(lay.B, lay.N, lay.f) if direct else None
    dW = feat.new_zeros((lay.B, lay.k, lay.f), dtype=torch.float64) if need_w else None
    db = feat.new_zeros((lay.B, lay.k), dtype=torch.float64) if need_b else None
    # For few features the two gradient products are tall-skinny (output C×f or k×f); BLAS runs them faster
    # as the transposed products Wᵀ·dlᵀ (f×C) and fcᵀ·dl (f×k) (see benchmarks/ for the f ≤ 8 crossover).
    skinny = lay.f <= _SKINNY_F
    WT = lay.Wt.contiguous() if skinny else None
    work = _Chunks(lay, C, feat)
    for s in range(0, lay.N, C):
        fc = lay.feat_chunk(feat, s, s + C)
        e = s + fc.shape[1]
        a, p = work.view(e - s)
        torch.baddbmm(lay.b, fc, lay.Wt, out=a)
        _softmax_out(a, p)
        # ∂L/∂logits = p ⊙ (g − p·g), written over the logits buffer (g broadcast, never copied)
        dl = torch.ops.aten._softmax_backward_data.out(g.expand_as(p), p, -1, p.dtype, grad_input=a)
        if dfeat3 is not None and not skinny:
            torch.bmm(dl, lay.W, out=dfeat3[:, s:e])
        elif dfeat is not None:
            dfc = torch.bmm(WT, dl.transpose(1, 2)).transpose(1, 2) if skinny else torch.bmm(dl, lay.W)
            if dfeat3 is not None:
                dfeat3[:, s:e] = dfc
            else:
                dfc = dfc.reshape(*lay.batch_shape, e - s, lay.f)
                dfeat[..., s:e, :] = dfc.sum_to_size(*feat.shape[:-2], e - s, lay.f)
        if dW is not None:
            dW += (
                torch.bmm(fc.transpose(1, 2), dl).transpose(1, 2)
                if skinny
                else torch.bmm(dl.transpose(1, 2), fc)
            )
        if db is not None:
            db += dl.sum(dim=1)
    return (dfeat, *_finish(lay, weight, bias, dW, db))


class StreamingSoftmaxCounts(torch.autograd.Function):
    """Custom autograd for :func:`streaming_softmax_counts` (inputs must share one float dtype)."""

    @staticmethod
    def forward(ctx, feat, weight, bias, chunk_elems):  # type: ignore[override]
        ctx.save_for_backward(feat, weight, bias)
        ctx.chunk_elems = chunk_elems
        return streaming_counts_forward(feat, weight, bias, chunk_elems)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        feat, weight, bias = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        dfeat, dW, db = streaming_counts_backward(grad, feat, weight, bias, needs, ctx.chunk_elems)
        return dfeat, dW, db, None


def streaming_softmax_counts(
    feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> torch.Tensor:
    """Memory-light :math:`\\sum_i \\operatorname{softmax}(f_i W^\\top + b)`: ``(..., k)``; same dtype as inputs."""
    return StreamingSoftmaxCounts.apply(feat, weight, bias, int(chunk_elems))
