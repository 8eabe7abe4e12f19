r"""One implementation of anchors for point sets and attention keys: state, init, update rules, objectives.

An :class:`AnchorSet` holds anchors of shape ``(*G, k, d)``: ``G`` empty for one point set
(:class:`der.EntropyRegularizer`, family ``ball``), ``G = (heads,)`` for one attention layer
(:mod:`der.attention.injection`). Everything anchor-specific lives here once: data seeding
(:func:`der.initializers.seed_points`), the update rule, the geometry and the objective, the distributed
reductions, and the exact zero that keeps unused anchor parameters in the graph.

Update rules (``update``):

* ``"gradient"`` — the paper's (Eq. 7): anchors are parameters minimised with the loss. With
  ``objective="entropy"`` this is degenerate: minimised over the anchors alone, :math:`H(\bar p)` goes to
  ~0 with one live anchor (every point assigned to one anchor, the others pushed away), whatever the points.
  Kept to reproduce the paper.
* ``"ema"`` — stop-gradient buffers updated by an EMA k-means step on each training batch (VQ-VAE's EMA
  codebook, Routing Transformer's centroids); anchors whose EMA share of the points falls below
  ``dead_fraction`` of the fair share 1/k are re-seeded at the points farthest from every anchor.
* ``"frozen"`` — stop-gradient buffers kept at their seeded value.

Objectives (``objective``), per point set, with :math:`p_{ij}` of Eq. 2:

* ``"entropy"`` — :math:`H(\bar p)` (Eq. 3), the paper's.
* ``"marginal"`` — :math:`\frac1n\sum_i H(p_i) - H(\bar p)` (IIC / IMSAT): bounded below by
  :math:`-\log k`, reached only by a balanced hard partition; one live anchor gives ≥ 0, so collapse
  is not a minimiser.
* ``"commitment"`` — :math:`\frac1n\sum_{ij} q_{ij}\,\|x_i - \mathrm{sg}(c_j)\|^2` with :math:`q` the
  balanced (Sinkhorn–Knopp, SwAV) assignment of the points to the anchors; rows of :math:`q` sum to 1, so
  the value is never below the k-means distortion of the points, whatever the anchors. Squared Euclidean
  distance (in the chosen geometry); gradients reach the points only.

Geometry (``geometry``): ``"raw"``; ``"normalized"`` (points and anchors L2-normalised: spherical
k-means); ``"spread"`` (distances divided by the set's mean squared distance to its centroid, with
gradient: the value is invariant to scaling the points and anchors together). Both scale-free options stop
points from "clustering" by shrinking.

Under ``torch.distributed`` the soft counts (and EMA statistics) are summed across ranks before an
entropy (or a centroid) is taken, never averaged per rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from der import functional as DF
from der._validate import check_points
from der.initializers import check_init, seed_points

__all__ = [
    "ANCHOR_UPDATES",
    "GEOMETRIES",
    "OBJECTIVES",
    "AnchorSet",
    "all_reduce_sum",
    "anchor_objective",
    "apply_geometry",
    "broadcast_from_rank0",
    "check_anchor_options",
    "distributed",
    "global_max",
    "live_anchors",
    "sinkhorn",
    "zero_touch",
]

ANCHOR_UPDATES = ("gradient", "ema", "frozen")
OBJECTIVES = ("entropy", "marginal", "commitment")
GEOMETRIES = ("raw", "normalized", "spread")
_UNIT_EPS = 1e-12


def check_anchor_options(update: str, objective: str, geometry: str, ema_decay: float, metric: str) -> None:
    """Raise ``ValueError`` naming the option for an unknown rule, objective, geometry or decay."""
    for name, value, allowed in (("anchor_update", update, ANCHOR_UPDATES), ("objective", objective, OBJECTIVES),
                                 ("geometry", geometry, GEOMETRIES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if not (isinstance(ema_decay, (int, float)) and 0.0 <= ema_decay < 1.0):
        raise ValueError(f"ema_decay must be a number in [0, 1), got {ema_decay!r}")
    if objective == "commitment" and metric != "sqeuclidean":
        raise ValueError(f"objective='commitment' uses the squared Euclidean distance; got metric={metric!r}")
    if update != "gradient" and geometry != "raw" and metric not in ("sqeuclidean", "cosine"):
        raise ValueError(f"geometry={geometry!r} with anchor_update={update!r} needs metric 'sqeuclidean' or "
                         f"'cosine', got {metric!r}")


# --------------------------------------------------------------------------- distributed
def distributed(enabled: bool = True) -> bool:
    """Whether a torch.distributed group with more than one rank is active (and ``enabled``)."""
    dist = torch.distributed
    return enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor, differentiable: bool = True) -> torch.Tensor:
    """Sum ``t`` across ranks (identity outside torch.distributed).

    ``differentiable`` uses ``torch.distributed.nn.functional.all_reduce`` (DDP's gradient convention:
    each rank's gradient is ``world_size`` × the gradient of the union's value)."""
    if not distributed():
        return t
    if differentiable:
        import torch.distributed.nn.functional as dist_fn

        return dist_fn.all_reduce(t)
    t = t.clone()
    torch.distributed.all_reduce(t)
    return t


def global_max(n: int) -> int:
    """The largest ``n`` over all ranks (``n`` itself outside torch.distributed)."""
    if not distributed():
        return int(n)
    t = torch.tensor([int(n)], dtype=torch.long)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)


def broadcast_from_rank0(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (no-op outside torch.distributed)."""
    if distributed():
        for t in tensors:
            torch.distributed.broadcast(t.data, src=0)


def zero_touch(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """An exact ``0`` whose graph reaches every tensor that requires grad (DDP never sees an unused
    parameter); a plain ``0`` when none does."""
    terms = [t.sum() * 0.0 for t in tensors if t.requires_grad]
    return sum(terms) if terms else torch.zeros(())


# --------------------------------------------------------------------------- math
def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(_UNIT_EPS)


def _weights(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if mask is None else mask.to(x.dtype).expand(x.shape[:-1])


def apply_geometry(x: torch.Tensor, anchors: torch.Tensor, geometry: str, w: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, anchors)`` in ``geometry`` (``w``: per-point weights ``(..., N)`` for the spread)."""
    if geometry == "normalized":
        return _unit(x), _unit(anchors)
    if geometry == "spread":
        n = x.shape[-2] if w is None else w.sum(-1, keepdim=True).clamp_min(1.0)[..., None]
        ww = 1.0 if w is None else w[..., None]
        mean = (x * ww).sum(-2, keepdim=True) / n
        var = ((x - mean).square().sum(-1, keepdim=True) * ww).sum(-2, keepdim=True) / n
        s = torch.where(var > 0, var, torch.ones_like(var)).sqrt()  # a set of one repeated point: no rescale
        return x / s, anchors / s
    return x, anchors


def sinkhorn(logits: torch.Tensor, mask: torch.Tensor | None = None, iters: int = 3) -> torch.Tensor:
    r"""Balanced assignment ``(..., N, k)`` from ``logits (..., N, k)`` by Sinkhorn–Knopp (SwAV).

    Alternately scales columns to the mass ``n/k`` and rows to 1 (ends on rows: each row of a kept point
    is a probability vector; rows with ``mask`` False are 0)."""
    lq = logits.detach()
    lq = lq if lq.dtype == torch.float64 else lq.float()
    k = lq.shape[-1]
    keep = None if mask is None else mask.bool().expand(lq.shape[:-1])[..., None]
    neg = torch.finfo(lq.dtype).min
    if keep is not None:
        lq = lq.masked_fill(~keep, neg)
    n = lq.new_full(lq.shape[:-2] + (1, 1), lq.shape[-2]) if keep is None else keep.sum(-2, keepdim=True).to(lq)
    log_col = torch.log(n.clamp_min(1.0) / k)
    for _ in range(iters):
        lq = lq - torch.logsumexp(lq, dim=-2, keepdim=True) + log_col
        lq = lq - torch.logsumexp(lq, dim=-1, keepdim=True)
        if keep is not None:
            lq = lq.masked_fill(~keep, neg)
    q = lq.exp()
    return (q if keep is None else q * keep).to(logits.dtype)


def anchor_objective(
    x: torch.Tensor,
    anchors: torch.Tensor,
    alpha: float,
    *,
    objective: str = "entropy",
    metric: str = "sqeuclidean",
    L: torch.Tensor | None = None,
    geometry: str = "raw",
    mask: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""The anchor objective of each point set: ``x: (..., N, d)``, ``anchors: (..., k, d)`` → ``(...)``.

    ``mask`` (broadcastable to ``(..., N)``) keeps points; ``reduce`` sums counts across ranks. See the
    module docstring for the objectives and geometries; ``objective="entropy"`` with ``geometry="raw"``
    equals :func:`der.functional.anchor_entropy`.
    """
    x = check_points(x)
    w = _weights(mask, x)
    xg, cg = apply_geometry(x, anchors.to(x.dtype), geometry, w)
    red = reduce or (lambda t: t)
    if objective == "commitment":
        d = DF.pairwise_distance(xg, cg.detach())
        q = sinkhorn(-alpha * d.detach(), w)
        total = (q * d).sum(-1) if w is None else (q * d).sum(-1) * w
        n = torch.full_like(total[..., :1], x.shape[-2]) if w is None else w.sum(-1, keepdim=True)
        value = red(total.sum(-1, keepdim=True))[..., 0] / red(n)[..., 0].clamp_min(1.0)
        return value + zero_touch([anchors])  # anchor parameters stay in the graph (gradient 0)
    if objective == "entropy" and w is None:
        return DF.entropy_from_counts(red(DF.anchor_counts(xg, cg, alpha, metric, L)))
    p = DF.soft_assign(xg, cg, alpha, metric, L)
    pw = p if w is None else p * w[..., None]
    h_mean = DF.entropy_from_counts(red(pw.sum(-2)))
    if objective == "entropy":
        return h_mean
    if objective != "marginal":
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    h_i = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)
    n = torch.full_like(h_i[..., :1], x.shape[-2]) if w is None else w.sum(-1, keepdim=True)
    hsum = (h_i if w is None else h_i * w).sum(-1, keepdim=True)
    return red(hsum)[..., 0] / red(n)[..., 0].clamp_min(1.0) - h_mean


def live_anchors(x: torch.Tensor, anchors: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per set ``(...)``: how many anchors are the nearest (squared Euclidean) of at least one kept point."""
    d = DF.pairwise_distance(x.detach(), anchors.detach().to(x.dtype))
    hit = torch.nn.functional.one_hot(d.argmin(-1), d.shape[-1]).to(torch.bool)
    if mask is not None:
        hit = hit & mask.bool().expand(hit.shape[:-1])[..., None]
    return hit.any(-2).sum(-1)


# --------------------------------------------------------------------------- state
class AnchorSet(nn.Module):
    r"""Anchors ``(*G, k, d)`` under one update rule (see the module docstring).

    Args:
        shape: ``(k, d)`` for one point set or ``(G, k, d)`` for G sets (heads).
        update: ``"gradient"`` (``anchors`` is an ``nn.Parameter``) | ``"ema"`` | ``"frozen"`` (buffers).
        init: a method of :data:`der.initializers.INIT_METHODS` for :meth:`seed_from`.
        geometry: ``"raw"`` | ``"normalized"`` | ``"spread"``.
        ema_decay: γ of the EMA k-means step (0: a plain Lloyd step). dead_fraction: re-seed threshold.
        seed: seeds the initial standard-normal draw and the data seeding.
    """

    def __init__(self, shape: tuple[int, ...], *, update: str = "gradient", init: str = "random",
                 geometry: str = "raw", ema_decay: float = 0.99, dead_fraction: float = 0.03, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 initial: torch.Tensor | None = None) -> None:
        super().__init__()
        check_anchor_options(update, "entropy", geometry, ema_decay, "sqeuclidean")
        check_init(init)
        if len(shape) < 2 or any(int(s) < 1 for s in shape):
            raise ValueError(f"anchor shape must be (k, d) or (G, k, d) with positive sizes, got {tuple(shape)}")
        self.update, self.init, self.geometry = update, init, geometry
        self.ema_decay, self.dead_fraction, self.seed = float(ema_decay), float(dead_fraction), int(seed)
        if initial is None:
            initial = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        initial = initial.detach().to(device=device, dtype=dtype).clone()
        if geometry == "normalized":
            initial = _unit(initial)
        if update == "gradient":
            self.anchors = nn.Parameter(initial)
        else:
            self.register_buffer("anchors", initial)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        if update == "ema":
            self.register_buffer("ema_count", torch.ones(initial.shape[:-1], dtype=dtype, device=device))
            self.register_buffer("ema_sum", initial.clone())

    @property
    def k(self) -> int:
        return int(self.anchors.shape[-2])

    def extra_repr(self) -> str:
        return f"shape={tuple(self.anchors.shape)}, update={self.update!r}, geometry={self.geometry!r}"

    def current(self) -> torch.Tensor:
        """The anchors for a loss: the parameter (``gradient``) or a stop-gradient copy (EMA updates in place)."""
        if self.update == "gradient":
            return self.anchors
        return self.anchors.detach().clone() if self.update == "ema" else self.anchors.detach()

    def objective(self, x: torch.Tensor, alpha: float, **kwargs) -> torch.Tensor:
        """:func:`anchor_objective` of ``x`` with these anchors and this geometry."""
        return anchor_objective(x, self.current(), alpha, geometry=self.geometry, **kwargs)

    @torch.no_grad()
    def seed_from(self, pts: torch.Tensor, valid: torch.Tensor | None = None, seed: int | None = None,
                  sync: bool = True) -> None:
        """Seed from data ``pts: (*G, M, d)`` (``valid: (M,)``) by ``init``, then mark initialized.

        ``init="normal"`` keeps the standard-normal draw. Under torch.distributed rank 0's anchors win."""
        if self.init != "normal":
            seeds = seed_points(pts.float(), self.k, self.init, self.seed if seed is None else seed, valid)
            self.anchors.copy_(_unit(seeds) if self.geometry == "normalized" else seeds.to(self.anchors))
        if self.update == "ema":
            m = torch.tensor(float(pts.shape[-2] if valid is None else int(valid.sum())))
            m = all_reduce_sum(m, differentiable=False) if sync else m
            self.ema_count.fill_(max(float(m), 1.0) / self.k)
            self.ema_sum.copy_(self.anchors * self.ema_count[..., None])
        if sync:
            broadcast_from_rank0(self._state())
        self.initialized.fill_(True)

    def _state(self) -> list[torch.Tensor]:
        return [self.anchors] + ([self.ema_count, self.ema_sum] if self.update == "ema" else [])

    @torch.no_grad()
    def ema_update(self, pts: torch.Tensor, valid: torch.Tensor | None = None, sync: bool = True) -> None:
        """One EMA k-means step on ``pts: (*G, M, d)`` (``valid: (M,)``), then re-seed dead anchors.

        Statistics are summed across ranks; re-seeding happens on rank 0 and is broadcast."""
        if self.update != "ema":
            raise ValueError(f"ema_update needs anchor_update='ema', this set uses {self.update!r}")
        x = pts.detach().to(self.anchors.dtype)
        if valid is not None:
            x = x[..., valid.to(x.device), :]
        if x.shape[-2] == 0:
            return
        if self.geometry == "normalized":
            x = _unit(x)
        c = self.anchors
        onehot = torch.nn.functional.one_hot(DF.pairwise_distance(x, c).argmin(-1), self.k).to(x.dtype)
        n = all_reduce_sum(onehot.sum(-2), differentiable=False) if sync else onehot.sum(-2)
        s = onehot.transpose(-1, -2) @ x
        s = all_reduce_sum(s, differentiable=False) if sync else s
        g = self.ema_decay
        self.ema_count.mul_(g).add_(n, alpha=1.0 - g)
        self.ema_sum.mul_(g).add_(s, alpha=1.0 - g)
        has = self.ema_count > torch.finfo(x.dtype).tiny
        new = self.ema_sum / self.ema_count.clamp_min(torch.finfo(x.dtype).tiny)[..., None]
        c.copy_(torch.where(has[..., None], new, c))
        if self.geometry == "normalized":
            c.copy_(_unit(c))
        self._reseed_dead(x)
        if sync:
            broadcast_from_rank0(self._state())

    def _reseed_dead(self, x: torch.Tensor) -> None:
        share = self.ema_count / self.ema_count.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        dead = share < self.dead_fraction / self.k  # (*G, k)
        if not bool(dead.any()):
            return
        c, cnt, tot = self.anchors.view(-1, self.k, x.shape[-1]), self.ema_count.view(-1, self.k), self.ema_sum
        tot = tot.view(-1, self.k, x.shape[-1])
        xs = x.reshape(-1, *x.shape[-2:]).expand(c.shape[0], -1, -1) if x.dim() == 2 else x.reshape(-1, *x.shape[-2:])
        far = DF.pairwise_distance(xs, c).amin(-1)  # (G, M): distance to the nearest anchor
        for gi, row in enumerate(dead.view(-1, self.k)):
            idx = row.nonzero().flatten()
            if idx.numel() == 0:
                continue
            pick = far[gi].topk(min(idx.numel(), far.shape[-1])).indices
            idx = idx[: pick.numel()]
            fair = cnt[gi].mean()
            c[gi, idx] = xs[gi, pick]
            cnt[gi, idx] = fair
            tot[gi, idx] = xs[gi, pick] * fair
