r"""Differentiable range-partition entropy surrogates (pure tensor functions).

All entropies are in **nats**. Shapes broadcast over leading batch dimensions: points ``x: (..., N, d)``,
parameters ``(..., k, d)``; an entropy has shape ``(...)`` (a scalar for a single set). Inputs in
float16/bfloat16 are computed in float32 inside; float64 stays float64.

* :func:`anchor_entropy` — :math:`H_\text{diff}` (Eq. 2–3), ball ranges around learnable anchors.
* :func:`halfspace_entropy` — :math:`H_\text{soft}` (Eq. 4–6, App. H.1), sign-pattern cells of m halfspaces.
* :func:`box_entropy` — the same gating over axis-aligned rectangles (App. E.5, H.4).
* :func:`partition_entropy` — the hard entropy of a partition (Eq. 1, divided by n).
* :func:`empirical_margin` — :math:`\hat\gamma(S)` of App. H.3.

>>> import torch
>>> from der import functional as dfn
>>> x = torch.randn(100, 2); c = torch.randn(4, 2)
>>> bool(0 <= dfn.anchor_entropy(x, c, alpha=10.0) <= torch.log(torch.tensor(4.0)))
True
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from der import _ops
from der._validate import (
    broadcast_batch,
    check_finite,
    check_params,
    check_points,
    check_positive,
    common_dtype,
    finite_absmax,
    float_tensor,
)

__all__ = [
    "MAX_DENSE_PLANES",
    "METRICS",
    "anchor_counts",
    "anchor_entropy",
    "box_counts",
    "box_entropy",
    "box_signed_distance",
    "cell_codes",
    "empirical_margin",
    "entropy_from_counts",
    "halfspace_counts",
    "halfspace_entropy",
    "pairwise_distance",
    "partition_entropy",
    "soft_assign",
]

METRICS = ("sqeuclidean", "euclidean", "cosine", "mahalanobis")
MAX_DENSE_PLANES = 16  # 2^16 = 65,536 dense sign-pattern cells; beyond that pass explicit `cells`.
# Bounds on the magnitude of logits and their intermediates: float32 work switches to float64 above
# 2^100 (float32 overflows at 2^128); above 2^1000 even float64 would overflow, and a clear error is raised.
_F32_SAFE, _F64_SAFE = 2.0**100, 2.0**1000

# kept for callers of the former private names (the regularizer)
_check_points, _check_positive = check_points, check_positive


# --------------------------------------------------------------------------- validation and dtypes
def _work_dtype(dtype: torch.dtype, bound: float, what: str) -> torch.dtype:
    """``dtype``, or float64 when values up to ``bound`` could overflow float32; error beyond float64."""
    if bound > _F64_SAFE or not math.isfinite(bound):
        raise ValueError(
            f"{what}: values of magnitude ~{bound:.3g} exceed the float64 range; rescale the inputs"
        )
    return torch.float64 if dtype == torch.float32 and bound > _F32_SAFE else dtype


def _check_metric(metric: str, L: torch.Tensor | None, d: int) -> torch.Tensor | None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric != "mahalanobis":
        return None
    if L is None:
        raise ValueError("metric='mahalanobis' needs the factor L: (d, d) with d(x, c) = ||L (x - c)||^2")
    L = float_tensor(L, "L")
    if L.dim() != 2 or L.shape[-1] != d:
        raise ValueError(f"L must be (r, {d}), got shape {tuple(L.shape)}")
    return L


def _unit(v: torch.Tensor) -> torch.Tensor:
    """Rows of ``v`` scaled to unit length; zero rows stay zero (with zero gradient).

    Each row is first divided by its largest magnitude (a constant for the gradient, since the direction
    does not depend on it), so rows near the float range limits neither overflow nor underflow."""
    s = v.detach().abs().amax(dim=-1, keepdim=True)
    nz = s > 0
    vs = v / torch.where(nz, s, torch.ones_like(s))
    n = vs.norm(dim=-1, keepdim=True)
    return torch.where(nz, vs / torch.where(nz, n, torch.ones_like(n)), torch.zeros_like(vs))


def _prepare_anchor_inputs(x, anchors, alpha, metric, L):
    """Validated ``(x, anchors, L)`` in one working dtype, and the dtype of the result."""
    x = check_points(x)
    d = x.shape[-1]
    anchors = check_params(anchors, "anchors", d)
    check_positive(alpha, "alpha")
    L = _check_metric(metric, L, d)
    broadcast_batch(x=x.shape[:-2], anchors=anchors.shape[:-2])
    ts = (x, anchors) if L is None else (x, anchors, L)
    out = common_dtype(*ts)
    m = max(finite_absmax(t, n) for t, n in zip(ts, ("x", "anchors", "L")))
    scalar = max(alpha, 1.0 / alpha)  # α itself must be representable
    if metric == "cosine":  # rows are normalized first: logits are at most α
        work = _work_dtype(out, scalar, "anchor distances")
    elif metric == "euclidean":
        bound = max(4 * d * m * m, alpha * 2 * math.sqrt(d) * m, scalar)
        work = _work_dtype(out, bound, "anchor distances")
    else:
        m = m * m * d if L is not None else m  # |L x| ≤ d·max|L|·max|x|
        work = _work_dtype(out, max(1.0, alpha) * 8 * d * m * m + scalar, "anchor distances")
    return (*(None if t is None else t.to(work) for t in (x, anchors, L)), out)


# --------------------------------------------------------------------------- ball ranges (Eq. 2–3)
def _pairwise(x, anchors, metric, L):
    if metric == "mahalanobis":
        x, anchors, metric = x @ L.T, anchors @ L.T, "sqeuclidean"
    if metric == "cosine":
        return 1.0 - _unit(x) @ _unit(anchors).transpose(-1, -2)
    diff = x.unsqueeze(-2) - anchors.unsqueeze(-3)  # reference formulation, exact
    sq = (diff * diff).sum(-1)
    if metric == "sqeuclidean":
        return sq
    return torch.sqrt(sq.clamp_min(torch.finfo(sq.dtype).tiny))


def pairwise_distance(
    x: torch.Tensor, anchors: torch.Tensor, metric: str = "sqeuclidean", L: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Distances ``d(x_i, c_j)``: ``(..., N, d) × (..., k, d) → (..., N, k)``.

    ``sqeuclidean`` :math:`\|x-c\|^2`; ``euclidean`` :math:`\|x-c\|`; ``cosine`` :math:`1-\cos(x,c)`;
    ``mahalanobis`` :math:`\|L(x-c)\|^2` (App. H.6). For ``cosine`` a zero vector has cosine similarity 0
    with every vector (distance 1) and receives a zero gradient.
    """
    x, anchors, L, out = _prepare_anchor_inputs(x, anchors, 1.0, metric, L)
    return _pairwise(x, anchors, metric, L).to(out)


def soft_assign(
    x: torch.Tensor,
    anchors: torch.Tensor,
    alpha: float = 10.0,
    metric: str = "sqeuclidean",
    L: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Soft assignment of points to anchors (Eq. 2).

    .. math:: p_{ij} = \frac{\exp(-\alpha d(x_i, c_j))}{\sum_\ell \exp(-\alpha d(x_i, c_\ell))}

    Args:
        x: points ``(..., N, d)``. anchors: ``(..., k, d)``. alpha: sharpness α > 0.
        metric: one of :data:`METRICS`. L: ``(r, d)`` factor for ``mahalanobis``.
    Returns:
        ``(..., N, k)``, rows sum to 1.
    """
    x, anchors, L, out = _prepare_anchor_inputs(x, anchors, alpha, metric, L)
    return torch.softmax(-alpha * _pairwise(x, anchors, metric, L), dim=-1).to(out)


def _affine_form(x, anchors, alpha, metric, L):
    """(feat, weight, bias) with ``-α d(x, c) = feat·weight + bias + (a term constant in j)``."""
    if metric == "cosine":
        weight = alpha * _unit(anchors)
        return _unit(x), weight, torch.zeros(weight.shape[:-1], dtype=weight.dtype, device=weight.device)
    if metric == "mahalanobis":
        x, anchors = x @ L.T, anchors @ L.T
    # H_diff is shift-invariant; centring on the anchors' mean avoids cancellation in 2αx·c − α‖c‖² when
    # the sets sit far from the origin. Only then: the centred copy of x costs an extra N×d tensor.
    shift = anchors.detach().mean(dim=-2, keepdim=True)
    spread = (anchors.detach() - shift).square().sum(-1).mean().sqrt()
    if bool(shift.abs().max() > spread):
        x, anchors = x - shift, anchors - shift
    return x, 2.0 * alpha * anchors, -alpha * (anchors * anchors).sum(-1)


def anchor_counts(
    x: torch.Tensor,
    anchors: torch.Tensor,
    alpha: float = 10.0,
    metric: str = "sqeuclidean",
    L: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Soft counts :math:`n_j = \sum_i p_{ij}` (Eq. 2 without the 1/n): ``(..., k)``.

    This is the quantity that is summed across ranks under ``torch.distributed`` and streamed by the
    fast path (never materializing ``N×k`` for backward, see :mod:`der._ops`). Inputs of mixed dtypes
    are promoted (``torch.promote_types``); float32 inputs too large for float32 arithmetic are computed
    in float64 and returned in float32.
    """
    x, anchors, L, out = _prepare_anchor_inputs(x, anchors, alpha, metric, L)
    if metric == "euclidean":  # not an affine score: plain path
        return torch.softmax(-alpha * _pairwise(x, anchors, metric, L), dim=-1).sum(-2).to(out)
    return _ops.softmax_counts(*_affine_form(x, anchors, alpha, metric, L)).to(out)


def entropy_from_counts(counts: torch.Tensor) -> torch.Tensor:
    r"""Shannon entropy (nats) of the distribution ``counts / Σ counts`` along the last dim.

    Uses :math:`0 \log 0 = 0` with finite gradients (no NaN when a mass underflows to 0). float16/bfloat16
    counts are computed (and returned) in float32. This is the one entropy of a distribution in ``der``.

    >>> float(entropy_from_counts(torch.tensor([1.0, 1.0, 0.0])))  # log 2
    0.6931471824645996
    """
    counts = float_tensor(counts, "counts")
    p = counts / counts.sum(dim=-1, keepdim=True)
    tiny = torch.finfo(p.dtype).tiny
    return -(p * torch.log(p.clamp_min(tiny))).sum(dim=-1)


def anchor_entropy(
    x: torch.Tensor,
    anchors: torch.Tensor,
    alpha: float = 10.0,
    metric: str = "sqeuclidean",
    L: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Anchor entropy surrogate :math:`H_\text{diff}` (Eq. 2–3), in nats.

    .. math:: H_\text{diff}(S) = -\sum_{j=1}^k p_j \log p_j,\qquad p_j = \frac1n\sum_i p_{ij}

    ``0 ≤ H ≤ log k``; ``k > N`` is allowed. Differentiable w.r.t. ``x``, ``anchors`` (and ``L``).

    Args:
        x: ``(N, d)`` or batched ``(..., N, d)`` (one entropy per set).
        anchors: ``(k, d)`` shared, or ``(..., k, d)`` per set (broadcast).
        alpha: sharpness α > 0 (App. A: annealed 10 → 5).
        metric: ``sqeuclidean`` (default) | ``euclidean`` | ``cosine`` | ``mahalanobis`` (needs ``L``).
    Returns:
        ``(...)`` entropies.
    """
    return entropy_from_counts(anchor_counts(x, anchors, alpha, metric, L))


# --------------------------------------------------------------------------- sign-pattern cells (Eq. 4–6)
def cell_codes(m: int, dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""All :math:`2^m` sign patterns as ``(α, β)`` codes, each ``(2^m, m)`` with :math:`\alpha+\beta=1`."""
    if m > MAX_DENSE_PLANES:
        raise ValueError(
            f"m={m} ranges give 2^{m} = {2**m:,} dense cells (limit 2^{MAX_DENSE_PLANES}); "
            "pass explicit cells=(alpha_codes, beta_codes) or use fewer ranges"
        )
    a = torch.tensor(list(itertools.product((0.0, 1.0), repeat=m)), dtype=dtype, device=device)
    return a.reshape(2**m, m), 1.0 - a.reshape(2**m, m)


def _check_cells(cells, m: int, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if cells is None:
        return cell_codes(m, ref.dtype, ref.device)
    try:
        a, b = cells
    except (TypeError, ValueError) as e:
        raise ValueError("cells must be a pair (alpha_codes, beta_codes) of (K, m) 0/1 tensors") from e
    a = torch.as_tensor(a, dtype=ref.dtype, device=ref.device)
    b = torch.as_tensor(b, dtype=ref.dtype, device=ref.device)
    if a.dim() != 2 or a.shape != b.shape or a.shape[1] != m or a.shape[0] == 0:
        raise ValueError(f"cells must be two (K, {m}) tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not bool(((a == 0) | (a == 1)).all() & ((b == 0) | (b == 1)).all()):
        raise ValueError("cell codes must be 0/1")
    return a, b


def _gated_cell_counts(z: torch.Tensor, cells) -> torch.Tensor:
    r"""Soft cell counts :math:`\sum_i g_j(x_i)` of the normalized product gate (Eq. 5) from range logits
    ``z = s_r(x)/τ``: ``(..., N, m) → (..., K)``.

    Computed in log space: :math:`\log h = \log\sigma(z)`, :math:`\log(1-h) = \log\sigma(-z)`, so it is
    stable for small τ (no ``0 · log 0``).
    """
    a, b = _check_cells(cells, z.shape[-1], z)
    feat = torch.cat([torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z)], dim=-1)
    weight = torch.cat([a, b], dim=-1)
    bias = torch.zeros(weight.shape[0], dtype=z.dtype, device=z.device)
    return _ops.softmax_counts(feat, weight, bias)


def _halfspace_inputs(x, normals, offsets):
    """Validated ``(x, normals, offsets)`` in their promoted dtype, and ``(max|x|, max|w|, max|b|)``."""
    x = check_points(x)
    normals = check_params(normals, "normals", x.shape[-1])
    offsets = float_tensor(offsets, "offsets")
    if offsets.shape != normals.shape[:-1]:
        raise ValueError(f"offsets must be {tuple(normals.shape[:-1])}, got {tuple(offsets.shape)}")
    broadcast_batch(x=x.shape[:-2], normals=normals.shape[:-2])
    dtype = common_dtype(x, normals, offsets)
    scales = (finite_absmax(x, "x"), finite_absmax(normals, "normals"), finite_absmax(offsets, "offsets"))
    return x.to(dtype), normals.to(dtype), offsets.to(dtype), scales


def _halfspace_logits(x, normals, offsets, tau):
    """Range logits ``(w·x − b)/τ``: ``(..., N, m)``, in the dtype of the result and the working dtype."""
    x, normals, offsets, (mx, mw, mb) = _halfspace_inputs(x, normals, offsets)
    check_positive(tau, "tau")
    m = normals.shape[-2]
    out = x.dtype
    dot = x.shape[-1] * mx * mw + mb
    work = _work_dtype(out, m * (max(dot, dot / tau, tau, 1.0 / tau) + 1.0), "halfspace logits")
    x, normals, offsets = x.to(work), normals.to(work), offsets.to(work)
    return (x @ normals.transpose(-1, -2) - offsets.unsqueeze(-2)) / tau, out


def halfspace_counts(x, normals, offsets, tau: float = 0.1, cells=None) -> torch.Tensor:
    r"""Soft cell counts :math:`n\,q_j` of Eq. 6 for halfspace ranges: ``(..., K)``."""
    z, out = _halfspace_logits(x, normals, offsets, tau)
    return _gated_cell_counts(z, cells).to(out)


def halfspace_entropy(
    x: torch.Tensor,
    normals: torch.Tensor,
    offsets: torch.Tensor,
    tau: float = 0.1,
    cells=None,
) -> torch.Tensor:
    r"""Range-aware soft entropy :math:`H_\text{soft}` over halfspace cells (Eq. 4–6, App. H.1).

    .. math:: h_t(x) = \sigma\!\left(\frac{w_t^\top x - b_t}{\tau}\right),\quad
              g_j(x) = \frac{\prod_t h_t^{\alpha_{jt}}(1-h_t)^{\beta_{jt}}}{\sum_\ell \prod_t
              h_t^{\alpha_{\ell t}}(1-h_t)^{\beta_{\ell t}}},\quad
              H_\text{soft} = -\sum_j q_j\log q_j,\ q_j=\frac1n\sum_i g_j(x_i)

    Args:
        x: ``(..., N, d)``. normals: ``(..., m, d)`` (``w_t``). offsets: ``(..., m)`` (``b_t``).
        tau: temperature τ > 0. cells: ``None`` for all :math:`2^m` sign patterns (m ≤ 16), or explicit
            ``(alpha_codes, beta_codes)``, each ``(K, m)`` in {0, 1}.
    """
    return entropy_from_counts(halfspace_counts(x, normals, offsets, tau, cells))


def box_signed_distance(x: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor) -> torch.Tensor:
    r"""Signed L∞ distance to each box boundary, positive inside: ``(..., N, m)`` (App. H.4).

    :math:`s_r(x) = \min_k \min(x_k - \ell_{rk},\ u_{rk} - x_k)` — exact inside the box, a lower bound on
    the (negative) distance outside.
    """
    xe = x.unsqueeze(-2)
    return torch.minimum(xe - lows.unsqueeze(-3), highs.unsqueeze(-3) - xe).amin(dim=-1)


def box_counts(x, lows, highs, tau: float = 0.1, cells=None) -> torch.Tensor:
    r"""Soft cell counts for box ranges (App. H.4): ``(..., K)``."""
    x = check_points(x)
    lows = check_params(lows, "lows", x.shape[-1])
    highs = check_params(highs, "highs", x.shape[-1])
    if lows.shape != highs.shape:
        raise ValueError(f"lows {tuple(lows.shape)} and highs {tuple(highs.shape)} must have equal shapes")
    check_positive(tau, "tau")
    broadcast_batch(x=x.shape[:-2], lows=lows.shape[:-2])
    out = common_dtype(x, lows, highs)
    big = max(finite_absmax(x, "x"), finite_absmax(lows, "lows"), finite_absmax(highs, "highs"))
    work = _work_dtype(out, lows.shape[-2] * (max(2 * big, 2 * big / tau, tau, 1.0 / tau) + 1.0), "box logits")
    z = box_signed_distance(x.to(work), lows.to(work), highs.to(work)) / tau
    return _gated_cell_counts(z, cells).to(out)


def box_entropy(
    x: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor, tau: float = 0.1, cells=None
) -> torch.Tensor:
    r"""Soft entropy over axis-aligned rectangle ranges (App. E.5, H.4).

    The halfspace construction with the linear score replaced by the signed distance to each box,
    :math:`h_r(x) = \sigma(s_r(x)/\tau)`, and the same sign-pattern gating (Eq. 5–6).

    Args:
        x: ``(..., N, d)``. lows, highs: ``(..., m, d)`` box corners (``lows < highs``). tau: τ > 0.
        cells: as in :func:`halfspace_entropy`.
    """
    return entropy_from_counts(box_counts(x, lows, highs, tau, cells))


# --------------------------------------------------------------------------- hard quantities
def partition_entropy(labels_or_counts, normalized: bool = True, kind: str = "auto") -> torch.Tensor:
    r"""Hard partition entropy in nats (Eq. 1).

    ``normalized=True`` (default) returns the per-point entropy :math:`\sum_P \frac{|P|}{n}\log\frac{n}{|P|}`
    (Eq. 1 divided by n); ``normalized=False`` returns Eq. 1 itself, :math:`n\cdot H`.

    Args:
        labels_or_counts: a 1-D array/tensor of part labels (``kind="labels"``; integer dtype under
            ``"auto"``) or of part sizes (``kind="counts"``; floating dtype under ``"auto"``; may be soft
            and is then differentiable). Zero counts are ignored.
    """
    t = torch.as_tensor(np.asarray(labels_or_counts) if not isinstance(labels_or_counts, torch.Tensor)
                        else labels_or_counts)
    if kind not in ("auto", "labels", "counts"):
        raise ValueError(f"kind must be 'auto', 'labels' or 'counts', got {kind!r}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D array, got shape {tuple(t.shape)}")
    if kind == "labels" or (kind == "auto" and not t.is_floating_point()):
        _, counts = torch.unique(t, return_counts=True)
        counts = counts.to(torch.float64)
    else:
        counts = float_tensor(t, "counts") if t.is_floating_point() else t.to(torch.float64)
        check_finite(counts, "counts")
        if bool((counts < 0).any()):
            raise ValueError("counts must be non-negative")
        if not bool((counts > 0).any()):
            raise ValueError("counts sum to zero")
    h = entropy_from_counts(counts)
    return h if normalized else h * counts.sum()


def empirical_margin(x: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    r"""Empirical margin :math:`\hat\gamma(S) = \min_{i,t} |w_t^\top x_i - b_t| / \|w_t\|` (App. H.3).

    Computed in float64 with each plane first scaled by its largest coefficient (the margin does not
    change), so norms neither overflow nor lose precision; returned in the inputs' promoted dtype.

    Args:
        x: ``(..., N, d)``; normals ``(..., m, d)``; offsets ``(..., m)``. Returns ``(...)``.
    """
    x, normals, offsets, _ = _halfspace_inputs(x, normals, offsets)
    out = x.dtype
    x, normals, offsets = x.double(), normals.double(), offsets.double()
    s = normals.detach().abs().amax(dim=-1)
    if bool((s == 0).any()):
        raise ValueError("normals must be non-zero")
    w, b = normals / s.unsqueeze(-1), offsets / s
    z = (x @ w.transpose(-1, -2) - b.unsqueeze(-2)).abs() / w.norm(dim=-1).unsqueeze(-2)
    return z.amin(dim=(-1, -2)).to(out)
