r"""The training hook's :math:`H_\text{diff}` of attention keys (Eq. 2–3), laid out for tiny ``k`` on CPU.

Used by :class:`der.attention.injection.DERHandle` for the default ``sqeuclidean`` metric; equal to
:func:`der.functional.anchor_entropy` (tests/attention/test_inject.py), about 2–4× cheaper per training
step on the small BERT / ViT of ``der bench der-overhead``. :func:`key_entropy_layers` computes all
layers of one forward in one chain (the anchor terms, softmax and entropy once for all layers; one
``baddbmm`` per layer), as the hook does at ``loss()`` time.
"""

from __future__ import annotations

import torch

from der import functional as DF

__all__ = ["key_entropy", "key_entropy_layers"]


class _AnchorLogits(torch.autograd.Function):
    """Logits ``(L, H, k, T)`` of ``L`` layers: ``baddbmm(bias[l], W[l], xT[l])`` for each layer's keys
    ``xT[l] (H, Dh, T)`` (views of the key projection's output, read in place), written into one tensor.

    The key gradient comes out in the key projection's own layout: ``dx = (dLᵀ W)ᵀ`` is written by one
    ``bmm`` into a ``(T, H, Dh)`` tensor (``out=`` a strided view), so the view/permute chain back to the
    projection's ``(B, N, H·Dh)`` output stays a chain of views (no copy of the key gradient)."""

    @staticmethod
    def forward(ctx, w, b, *xTs):
        out = w.new_empty(len(xTs), w.shape[1], w.shape[2], xTs[0].shape[-1])
        for i, xT in enumerate(xTs):
            torch.baddbmm(b[i], w[i], xT, out=out[i])
        ctx.save_for_backward(w, *xTs)
        return out

    @staticmethod
    def backward(ctx, g):
        w, *xTs = ctx.saved_tensors
        gw = torch.empty_like(w) if ctx.needs_input_grad[0] else None
        gxs = []
        for i, xT in enumerate(xTs):
            if gw is not None:
                torch.bmm(g[i], xT.transpose(1, 2), out=gw[i])
            gx = None
            if ctx.needs_input_grad[2 + i]:
                H, D, T = xT.shape
                gx = g.new_empty(T, H, D)
                torch.bmm(g[i].transpose(1, 2), w[i], out=gx.transpose(0, 1))
                gx = gx.permute(1, 2, 0)
            gxs.append(gx)
        return gw, g.sum(-1, keepdim=True), *gxs


def key_entropy_layers(keys: list[torch.Tensor], anchors: torch.Tensor, alpha: float,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Per-layer, per-sequence, per-head :math:`H_\text{diff}` ``(L, B, H)`` of ``L`` layers' keys
    ``(B, H, N, Dh)`` (one shape) with anchors ``(L, H, k, Dh)``, optionally over the tokens with ``mask
    (B, N)`` True (Eq. 2–3, ``sqeuclidean``).

    Same value as :func:`der.functional.anchor_entropy` per layer, laid out for the training hook: the logits
    :math:`-\alpha\|x-c_j\|^2 + \text{const} = 2\alpha\,x\cdot c'_j - \alpha\|c'_j\|^2 - 2\alpha\,s\cdot c'_j`
    (:math:`c' = c - s`, :math:`s` the detached anchor mean: no cancellation for keys far from the
    origin) are computed as ``(L, H, k, B·N)`` by one ``baddbmm`` per layer that reads the key projection's
    ``(B, N, H·Dh)`` output in place (no copy), and the softmax runs over ``k`` along the contiguous
    token axis (a last-dim softmax over ``k ≈ 10`` is ~10× slower on CPU). Everything but the ``baddbmm``
    runs once for all layers (a few dozen fewer small kernels per layer, forward and backward)."""
    B, H, N, D = keys[0].shape
    L, k = anchors.shape[0], anchors.shape[-2]
    xTs = [x.to(anchors.dtype).permute(1, 3, 0, 2).reshape(H, D, B * N) for x in keys]
    shift = anchors.detach().mean(-2, keepdim=True)
    c = anchors - shift
    bias = (c * (c + 2.0 * shift)).sum(-1, keepdim=True).mul(-alpha)  # (L, H, k, 1)
    p = torch.softmax(_AnchorLogits.apply(c.mul(2.0 * alpha), bias, *xTs), 2)
    if mask is not None:
        p = p * mask.reshape(1, 1, 1, B * N).to(p.dtype)
    return DF.entropy_from_counts(p.view(L, H, k, B, N).sum(-1).permute(0, 3, 1, 2))


def key_entropy(keys: torch.Tensor, anchors: torch.Tensor, alpha: float, mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
    r"""Per-sequence, per-head :math:`H_\text{diff}` ``(B, H)`` of keys ``(B, H, N, Dh)`` with per-head
    anchors ``(H, k, Dh)``: :func:`key_entropy_layers` of one layer."""
    return key_entropy_layers([keys], anchors[None], alpha, mask)[0]
