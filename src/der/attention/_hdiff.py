r"""The training hook's :math:`H_\text{diff}` of attention keys (Eq. 2–3), laid out for tiny ``k`` on CPU.

Used by :class:`der.attention.injection.DERHandle` for the default ``sqeuclidean`` metric; equal to
:func:`der.functional.anchor_entropy` (tests/attention/test_inject.py), about 2–4× cheaper per training
step on the small BERT / ViT of ``der bench der-overhead``.
"""

from __future__ import annotations

import torch

from der import functional as DF

__all__ = ["key_entropy"]


class _AnchorLogits(torch.autograd.Function):
    """``baddbmm(bias, W, xT)`` whose input gradient comes out token-major: ``dx = (dLᵀ W)ᵀ`` is a view of a
    contiguous ``(H, B·N, Dh)`` tensor, so adding it to the key projection's gradient (``(B, N, H·Dh)``)
    runs over contiguous ``Dh`` rows instead of a transposing element-wise add."""

    @staticmethod
    def forward(ctx, xT, w, b):
        ctx.save_for_backward(xT, w)
        return torch.baddbmm(b, w, xT)

    @staticmethod
    def backward(ctx, g):
        xT, w = ctx.saved_tensors
        gx = torch.bmm(g.transpose(1, 2), w).transpose(1, 2) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(g, xT.transpose(1, 2)) if ctx.needs_input_grad[1] else None
        return gx, gw, g.sum(-1, keepdim=True)


def key_entropy(keys: torch.Tensor, anchors: torch.Tensor, alpha: float, mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
    r"""Per-sequence, per-head :math:`H_\text{diff}` ``(B, H)`` of keys ``(B, H, N, Dh)`` with per-head
    anchors ``(H, k, Dh)`` (Eq. 2–3, ``sqeuclidean``), optionally over the tokens with ``mask (B, N)`` True.

    Same value as :func:`der.functional.anchor_entropy`, laid out for the training hook: the logits
    :math:`-\alpha\|x-c_j\|^2 + \text{const} = 2\alpha\,x\cdot c'_j - \alpha\|c'_j\|^2 - 2\alpha\,s\cdot c'_j`
    (:math:`c' = c - s`, :math:`s` the detached anchor mean: no cancellation for keys far from the
    origin) are computed as ``(H, k, B·N)`` by one ``baddbmm`` that reads the key projection's
    ``(B, N, H·Dh)`` output in place (no copy), and the softmax runs over ``k`` along the contiguous
    token axis (a last-dim softmax over ``k ≈ 10`` is ~10× slower on CPU)."""
    B, H, N, D = keys.shape
    k = anchors.shape[-2]
    keys = keys.to(anchors.dtype)
    shift = anchors.detach().mean(-2, keepdim=True)
    c = anchors - shift
    bias = (c * (c + 2.0 * shift)).sum(-1, keepdim=True).mul(-alpha)  # (H, k, 1)
    xT = keys.permute(1, 3, 0, 2).reshape(H, D, B * N)
    p = torch.softmax(_AnchorLogits.apply(xT, c.mul(2.0 * alpha), bias), 1)
    if mask is not None:
        p = p * mask.reshape(1, 1, B * N).to(p.dtype)
    return DF.entropy_from_counts(p.view(H, k, B, N).sum(-1).permute(2, 0, 1))
