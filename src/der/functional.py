r"""Differentiable range-partition entropy surrogates (pure tensor functions).

All entropies are in **nats**. Shapes broadcast over leading batch dimensions: points ``x: (..., N, d)``,
parameters ``(..., k, d)``; an entropy has shape ``(...)`` (a scalar for a single set). Inputs in
float16/bfloat16 are computed in float32 inside; float64 stays float64.

* :func:`anchor_entropy` — :math:`H_\text{diff}` (Eq. 2–3), ball ranges around learnable anchors.
* :func:`halfspace_entropy` — :math:`H_\text{soft}` (Eq. 4–6, App. H.1), sign-pattern cells of m halfspaces.
* :func:`box_entropy` — the same gating over axis-aligned rectangles (App. E.5, H.4).
* :func:`partition_entropy` — the hard entropy of a partition (Eq. 1, divided by n).
* :func:`empirical_margin` — :math:`\hat\gamma(S)` of App. H.3.

>>> import torch, der.functional as F
>>> x = torch.randn(100, 2); c = torch.randn(4, 2)
>>> bool(0 <= F.anchor_entropy(x, c, alpha=10.0) <= torch.log(torch.tensor(4.0)))
True
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from der import _ops

__all__ = [
    "anchor_counts",
    "anchor_entropy",
    "box_counts",
    "box_entropy",
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
_COSINE_EPS = 1e-12


# --------------------------------------------------------------------------- validation
def _as_float(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_finite_rows(t: torch.Tensor, name: str) -> None:
    if bool(torch.isfinite(t.detach().sum())):  # one reduction: a finite sum means every entry is finite
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        rows = int(bad.reshape(-1, t.shape[-1]).any(dim=-1).sum()) if t.dim() >= 1 else 1
        raise ValueError(f"{name} contains NaN/Inf in {rows} row(s) of shape {tuple(t.shape)}")


def _check_points(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    x = _as_float(x, name)
    if x.dim() < 2:
        raise ValueError(f"{name} must be (..., N, d), got shape {tuple(x.shape)}")
    if x.shape[-2] == 0 or x.shape[-1] == 0 or x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)} (need N ≥ 1 points of dimension d ≥ 1)")
    _check_finite_rows(x, name)
    return x


def _check_params(p: torch.Tensor, name: str, d: int, x: torch.Tensor) -> torch.Tensor:
    p = _as_float(p, name)
    if p.dim() < 2 or p.shape[-2] == 0:
        raise ValueError(f"{name} must be (..., k, d) with k ≥ 1, got shape {tuple(p.shape)}")
    if p.shape[-1] != d:
        raise ValueError(f"{name} has dimension {p.shape[-1]} but points have dimension {d}")
    _check_finite_rows(p, name)
    return _promote(p, x)


def _promote(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if p.device != x.device:
        raise ValueError(f"parameters on {p.device} but points on {x.device}")
    return p.to(torch.promote_types(p.dtype, x.dtype))


def _check_positive(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_metric(metric: str, L: torch.Tensor | None, d: int) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "mahalanobis":
        if L is None:
            raise ValueError("metric='mahalanobis' needs the factor L: (d, d) with d(x, c) = ||L (x - c)||^2")
        if L.dim() != 2 or L.shape[-1] != d:
            raise ValueError(f"L must be (r, {d}), got shape {tuple(L.shape)}")
        _check_finite_rows(L, "L")


# --------------------------------------------------------------------------- ball ranges (Eq. 2–3)
def pairwise_distance(
    x: torch.Tensor, anchors: torch.Tensor, metric: str = "sqeuclidean", L: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Distances ``d(x_i, c_j)``: ``(..., N, d) × (..., k, d) → (..., N, k)``.

    ``sqeuclidean`` :math:`\|x-c\|^2`; ``euclidean`` :math:`\|x-c\|`; ``cosine`` :math:`1-\cos(x,c)`;
    ``mahalanobis`` :math:`\|L(x-c)\|^2` (App. H.6).
    """
    if metric == "mahalanobis":
        x, anchors, metric = x @ L.T, anchors @ L.T, "sqeuclidean"
    if metric == "cosine":
        xn = x / x.norm(dim=-1, keepdim=True).clamp_min(_COSINE_EPS)
        cn = anchors / anchors.norm(dim=-1, keepdim=True).clamp_min(_COSINE_EPS)
        return 1.0 - xn @ cn.transpose(-1, -2)
    diff = x.unsqueeze(-2) - anchors.unsqueeze(-3)  # reference formulation, exact
    sq = (diff * diff).sum(-1)
    if metric == "sqeuclidean":
        return sq
    return torch.sqrt(sq.clamp_min(torch.finfo(sq.dtype).tiny))


def _prepare_anchor_inputs(x, anchors, alpha, metric, L):
    x = _check_points(x)
    anchors = _check_params(anchors, "anchors", x.shape[-1], x)
    _check_positive(alpha, "alpha")
    _check_metric(metric, L, x.shape[-1])
    if L is not None:
        L = _promote(_as_float(L, "L"), x)
    return x, anchors, L


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
    x, anchors, L = _prepare_anchor_inputs(x, anchors, alpha, metric, L)
    return torch.softmax(-alpha * pairwise_distance(x, anchors, metric, L), dim=-1)


def _affine_form(x, anchors, alpha, metric, L):
    """(feat, weight, bias) with ``-α d(x, c) = feat·weight + bias + (a term constant in j)``."""
    if metric == "cosine":
        feat = x / x.norm(dim=-1, keepdim=True).clamp_min(_COSINE_EPS)
        weight = alpha * anchors / anchors.norm(dim=-1, keepdim=True).clamp_min(_COSINE_EPS)
        return feat, weight, torch.zeros(weight.shape[:-1], dtype=weight.dtype, device=weight.device)
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
    fast path (never materializing ``N×k`` for backward, see :mod:`der._ops`).
    """
    x, anchors, L = _prepare_anchor_inputs(x, anchors, alpha, metric, L)
    if metric == "euclidean":  # not an affine score: plain path
        return torch.softmax(-alpha * pairwise_distance(x, anchors, metric), dim=-1).sum(-2)
    return _ops.softmax_counts(*_affine_form(x, anchors, alpha, metric, L))


def entropy_from_counts(counts: torch.Tensor) -> torch.Tensor:
    r"""Shannon entropy (nats) of the distribution ``counts / Σ counts`` along the last dim.

    Uses :math:`0 \log 0 = 0` with finite gradients (no NaN when a mass underflows to 0).
    """
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


def _halfspace_logits(x, normals, offsets, tau):
    x = _check_points(x)
    normals = _check_params(normals, "normals", x.shape[-1], x)
    offsets = _promote(_as_float(offsets, "offsets"), x)
    if offsets.shape != normals.shape[:-1]:
        raise ValueError(f"offsets must be {tuple(normals.shape[:-1])}, got {tuple(offsets.shape)}")
    _check_finite_rows(offsets.unsqueeze(-1), "offsets")
    _check_positive(tau, "tau")
    return (x @ normals.transpose(-1, -2) - offsets.unsqueeze(-2)) / tau


def halfspace_counts(x, normals, offsets, tau: float = 0.1, cells=None) -> torch.Tensor:
    r"""Soft cell counts :math:`n\,q_j` of Eq. 6 for halfspace ranges: ``(..., K)``."""
    return _gated_cell_counts(_halfspace_logits(x, normals, offsets, tau), cells)


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
    x = _check_points(x)
    lows = _check_params(lows, "lows", x.shape[-1], x)
    highs = _check_params(highs, "highs", x.shape[-1], x)
    if lows.shape != highs.shape:
        raise ValueError(f"lows {tuple(lows.shape)} and highs {tuple(highs.shape)} must have equal shapes")
    _check_positive(tau, "tau")
    return _gated_cell_counts(box_signed_distance(x, lows, highs) / tau, cells)


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
        counts = t if t.is_floating_point() else t.to(torch.float64)
        _check_finite_rows(counts.unsqueeze(-1), "counts")
        if bool((counts < 0).any()):
            raise ValueError("counts must be non-negative")
        if not bool((counts > 0).any()):
            raise ValueError("counts sum to zero")
    h = entropy_from_counts(counts)
    return h if normalized else h * counts.sum()


def empirical_margin(x: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    r"""Empirical margin :math:`\hat\gamma(S) = \min_{i,t} |w_t^\top x_i - b_t| / \|w_t\|` (App. H.3).

    Args:
        x: ``(..., N, d)``; normals ``(..., m, d)``; offsets ``(..., m)``. Returns ``(...)``.
    """
    z = _halfspace_logits(x, normals, offsets, 1.0)
    norms = normals.norm(dim=-1).to(z.dtype)
    if bool((norms == 0).any()):
        raise ValueError("normals must be non-zero")
    return (z.abs() / norms.unsqueeze(-2)).amin(dim=(-1, -2))
