r"""The training hook's :math:`H_\text{diff}` of attention keys (Eq. 2–3), laid out for tiny ``k`` on CPU.

Used by :class:`der.attention.injection.DERHandle` for the default ``sqeuclidean`` metric; equal to
:func:`der.functional.anchor_entropy` (tests/attention/test_inject.py, with gradcheck).
:func:`key_entropy_layers` computes all layers of one forward as **one autograd node** with a handwritten
backward: anchor terms, one ``baddbmm`` per layer that reads the key projection's output in place, a
softmax over ``k`` along the contiguous token axis (a last-dim softmax over ``k ≈ 10`` is ~10× slower on
CPU), soft counts and entropies. Written with ordinary autograd ops, this chain was about 200 small ops
forward and as many backward nodes per training step, whose dispatch cost as much as its arithmetic on
the small BERT / ViT of ``der bench der-overhead``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["key_entropy", "key_entropy_layers"]


class _KeyEntropy(torch.autograd.Function):
    r"""``(L, B, H)`` entropies of ``L`` layers from anchors ``c_l (H, k, Dh)`` and keys ``xT_l (H, Dh, B·N)``.

    Logits :math:`2\alpha\,x\cdot c'_j - \alpha\|c'_j\|^2 - 2\alpha\,s\cdot c'_j` with :math:`c' = c - s`,
    :math:`s` the detached anchor mean (no cancellation for keys far from the origin): they differ from
    :math:`-\alpha\|x - c_j\|^2` by :math:`\alpha\|x - s\|^2`, the same for every anchor, so the softmax is
    exact and :math:`s` carries no gradient. Backward, analytically (:math:`q = n/\sum n` the normalised
    soft counts, :math:`d_j = \partial H/\partial q_j = -\log q_j - 1` with ``der.functional``'s clamp):
    :math:`\partial H/\partial n_j = (d_j - \sum_i q_i d_i)/\sum n`, broadcast over the sequence's tokens,
    through the softmax, then :math:`\partial/\partial c_j = 2\alpha\sum_t g_{jt}(x_t - c_j)` and the key
    gradient :math:`\sum_j g_{jt}\,2\alpha c'_j`, written by one ``bmm`` per layer into a ``(T, H, Dh)``
    tensor so the view chain back to the projection's ``(B, N, H·Dh)`` output stays views (no copy)."""

    @staticmethod
    def forward(ctx, alpha: float, batch: int, mask: torch.Tensor | None, n_layers: int, *tensors):
        anchors, xTs = tensors[:n_layers], tensors[n_layers:]
        a = torch.stack(anchors)  # (L, H, k, D)
        L, H, k, _ = a.shape
        T = xTs[0].shape[-1]
        c = a - a.mean(2, keepdim=True)
        bias = (c * (2.0 * a - c)).sum(-1, keepdim=True).mul_(-alpha)  # c'·(c' + 2s), s = a - c'
        w = c.mul_(2.0 * alpha)
        logits = a.new_empty(L, H, k, T)
        for i, xT in enumerate(xTs):
            torch.baddbmm(bias[i], w[i], xT, out=logits[i])
        p = torch.softmax(logits, 2)
        m = None if mask is None else mask.reshape(1, 1, 1, T).to(p.dtype)
        counts = (p if m is None else p * m).view(L, H, k, batch, T // batch).sum(-1)  # (L, H, k, B)
        total = counts.sum(2, keepdim=True)
        q = counts / total
        tiny = torch.finfo(q.dtype).tiny
        lq = torch.log(q.clamp_min(tiny))
        ent = -(q * lq).sum(2)  # (L, H, B)
        ctx.save_for_backward(a, w, p, q, lq, total, m, *xTs)
        ctx.alpha, ctx.batch, ctx.n_layers = alpha, batch, n_layers
        return ent.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, g):
        a, w, p, q, lq, total, m, *xTs = ctx.saved_tensors
        L, H, k, T = p.shape
        B = ctx.batch
        d = -(lq + (q >= torch.finfo(q.dtype).tiny).to(q.dtype))  # ∂H/∂q
        gn = g.transpose(1, 2).unsqueeze(2) * (d - (q * d).sum(2, keepdim=True)) / total  # ∂/∂counts
        gp = gn.unsqueeze(-1).expand(L, H, k, B, T // B).reshape(L, H, k, T)
        if m is not None:
            gp = gp * m
        gl = torch._softmax_backward_data(gp, p, 2, p.dtype)  # ∂/∂logits (L, H, k, T)
        need_a = ctx.needs_input_grad[4:4 + ctx.n_layers]
        need_x = ctx.needs_input_grad[4 + ctx.n_layers:]
        gsum = gl.sum(-1, keepdim=True) if any(need_a) else None
        gas, gxs = [], []
        for i, xT in enumerate(xTs):
            ga = gx = None
            if need_a[i]:
                ga = torch.bmm(gl[i], xT.transpose(1, 2))
                ga.sub_(gsum[i] * a[i]).mul_(2.0 * ctx.alpha)
            if need_x[i]:
                _, D, _ = xT.shape
                gx = gl.new_empty(T, H, D)
                torch.bmm(gl[i].transpose(1, 2), w[i], out=gx.transpose(0, 1))
                gx = gx.permute(1, 2, 0)
            gas.append(ga)
            gxs.append(gx)
        return None, None, None, None, *gas, *gxs


def key_entropy_layers(keys: Sequence[torch.Tensor], anchors: torch.Tensor | Sequence[torch.Tensor], alpha: float,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Per-layer, per-sequence, per-head :math:`H_\text{diff}` ``(L, B, H)`` of ``L`` layers' keys
    ``(B, H, N, Dh)`` (one shape; views of key projections' outputs are read in place) with anchors
    ``(L, H, k, Dh)`` or a list of ``L`` ``(H, k, Dh)`` tensors, optionally over the tokens with
    ``mask (B, N)`` True (Eq. 2–3, ``sqeuclidean``): one autograd node (:class:`_KeyEntropy`)."""
    anchors = list(anchors.unbind(0)) if isinstance(anchors, torch.Tensor) else list(anchors)
    if len(anchors) != len(keys):
        raise ValueError(f"{len(keys)} layers of keys but {len(anchors)} anchor sets")
    B, H, N, D = keys[0].shape
    dtype = anchors[0].dtype
    xTs = [x.to(dtype).permute(1, 3, 0, 2).reshape(H, D, B * N) for x in keys]
    return _KeyEntropy.apply(float(alpha), B, mask, len(anchors), *anchors, *xTs)


def key_entropy(keys: torch.Tensor, anchors: torch.Tensor, alpha: float, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
    r"""Per-sequence, per-head :math:`H_\text{diff}` ``(B, H)`` of keys ``(B, H, N, Dh)`` with per-head
    anchors ``(H, k, Dh)``: :func:`key_entropy_layers` of one layer."""
    return key_entropy_layers([keys], [anchors], alpha, mask)[0]
