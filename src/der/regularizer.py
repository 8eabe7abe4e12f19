r"""``EntropyRegularizer``: the surrogate entropy as an ``nn.Module`` with learnable ranges (Eq. 7).

.. math:: \mathcal L(\theta, \Theta) = \mathcal L_\text{task}(\theta) + \lambda\, H_\star(S_\theta;\Theta)

Families: ``ball`` (anchors, :math:`H_\text{diff}`, Eq. 2–3), ``halfspace`` (m planes,
:math:`H_\text{soft}`, Eq. 4–6) and ``box`` (m axis-aligned rectangles, App. H.4). For the two gated
families ``num_anchors`` is the number of ranges m (2^m sign-pattern cells); the heuristics give the
number of cells k and then m = ⌈log2 k⌉.

The ball family keeps its anchors in a :class:`der._anchors.AnchorSet` (the same building block the
attention handle uses per head), so the anchor update rule (``anchor_update``), the objective and the
geometry are options of the one implementation (see :mod:`der._anchors`).

Lifecycle: parameters are created eagerly when ``dim`` and ``num_anchors`` are given (Gaussian draw) or
at the first call; either way, with a data-dependent ``init`` they are (re)seeded *in place* from the
first batch, so an optimizer built before the first forward keeps working. Under ``torch.distributed``
the soft counts :math:`\sum_i p_{ij}` are all-reduced (summed) before the entropy is taken: the result is
the entropy of the union of all ranks' points, not a mean of per-rank entropies. Its gradient follows
DDP's convention (``torch.distributed.nn.functional.all_reduce``): each rank's local gradient is
``world_size`` × the gradient of the union's entropy, so after DDP averages gradients, replicated
parameters receive exactly :math:`\partial H(\cup S_r)/\partial\Theta`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from der import functional as F
from der._anchors import (
    AnchorSet,
    all_reduce_sum,
    apply_geometry,
    broadcast_from_rank0,
    check_anchor_options,
    distributed,
    global_max,
    zero_touch,
)
from der._io import load_state, save_state
from der._validate import check_points
from der.initializers import check_init, init_anchors
from der.schedules import LambdaWindow, alpha_schedule, anchor_heuristic

__all__ = ["FAMILIES", "EntropyRegularizer"]

FAMILIES = ("ball", "halfspace", "box")
STATE_KIND = "der.EntropyRegularizer"
_GEN_KEY = "_subsample_generator"
_SET_KEYS = ("anchors", "ema_count", "ema_sum")  # AnchorSet tensors, stored flat: "anchors" as before


def _flat_state(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    """State-dict hook: ``anchor_set.anchors`` → ``anchors`` (keys as in checkpoints of the ball family)."""
    for name in _SET_KEYS:
        if f"{prefix}anchor_set.{name}" in state:
            state[prefix + name] = state.pop(f"{prefix}anchor_set.{name}")
    state.pop(f"{prefix}anchor_set.initialized", None)  # the regularizer's data_initialized says it


_ANCHOR_DEFAULTS = {"anchor_update": "gradient", "objective": "entropy", "geometry": "raw"}


class EntropyRegularizer(nn.Module):
    r"""Differentiable entropy regularizer with learnable ranges.

    Args:
        family: ``"ball"`` | ``"halfspace"`` | ``"box"``.
        dim: point dimension d (optional; inferred at the first call).
        num_anchors: anchors (ball) or ranges m (halfspace/box); ``None`` = the paper's heuristic decided
            at the first call from N (``heuristic``).
        alpha: α of Eq. 2 (ball), start of the anneal. alpha_final/anneal_steps: cosine anneal
            α → ``alpha_final`` over ``anneal_steps`` calls of :meth:`step` (App. A: 10 → 5).
        tau: τ of Eq. 4 (halfspace/box). metric, L: distance of Eq. 2 (see :func:`der.functional.soft_assign`).
        init: ``"kmeans++"`` | ``"random"`` (alias ``"data"``) | ``"faiss"`` (data-dependent seeding of the
            ranges) | ``"normal"`` (keep the Gaussian draw); see :mod:`der.initializers`.
        lam, lam_start, lam_stop: λ and its active window in steps (App. G.11).
        subsample: at most this many points per set per call (a fresh random subset each call).
        heuristic: ``"geometry"`` (min(16, n/4)), ``"sqrt"`` (⌊√N⌋, attention) or ``"cbrt"``/``"lite"``
            (⌈N^{1/3}⌉); under torch.distributed N is the largest local N of all ranks, so k agrees.
        seed: seeds initialization and subsampling. sync_distributed: all-reduce counts across ranks.
        anchor_update: ``"gradient"`` (the paper's; degenerate with ``objective="entropy"``, see
            :mod:`der._anchors`) | ``"ema"`` | ``"frozen"`` — ball family only.
        objective: ``"entropy"`` (Eq. 3) | ``"marginal"`` | ``"commitment"`` — ball family only.
        geometry: ``"raw"`` | ``"normalized"`` | ``"spread"`` (scale-free) — ball family only.
        ema_decay: γ of the EMA k-means step (``anchor_update="ema"``; the step runs in training mode).

    Example:
        >>> import torch
        >>> reg = EntropyRegularizer("ball", num_anchors=8, lam=0.1)
        >>> x = torch.randn(256, 2, requires_grad=True)
        >>> reg.loss(x).backward()
        >>> reg.anchors.shape
        torch.Size([8, 2])
    """

    def __init__(
        self,
        family: str = "ball",
        dim: int | None = None,
        num_anchors: int | None = None,
        *,
        alpha: float = 10.0,
        alpha_final: float | None = None,
        anneal_steps: int | None = None,
        tau: float = 0.1,
        metric: str = "sqeuclidean",
        L: torch.Tensor | None = None,
        init: str = "kmeans++",
        lam: float = 0.1,
        lam_start: int = 0,
        lam_stop: int | None = None,
        subsample: int | None = None,
        heuristic: str = "geometry",
        seed: int = 0,
        sync_distributed: bool = True,
        anchor_update: str = "gradient",
        objective: str = "entropy",
        geometry: str = "raw",
        ema_decay: float = 0.99,
    ) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        check_init(init)
        for name, v in (("alpha", alpha), ("tau", tau)) + ((("alpha_final", alpha_final),) if alpha_final else ()):
            F._check_positive(v, name)
        if metric not in F.METRICS:
            raise ValueError(f"metric must be one of {F.METRICS}, got {metric!r}")
        if (alpha_final is None) != (anneal_steps is None):
            raise ValueError("give both alpha_final and anneal_steps for the anneal, or neither")
        for name, v in (("dim", dim), ("num_anchors", num_anchors), ("subsample", subsample)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        anchor_heuristic(1, heuristic)  # validates the rule name
        check_anchor_options(anchor_update, objective, geometry, ema_decay, metric)
        opts = {"anchor_update": anchor_update, "objective": objective, "geometry": geometry}
        if family != "ball" and opts != _ANCHOR_DEFAULTS:
            raise ValueError(f"anchor_update/objective/geometry apply to family='ball', got family={family!r} "
                             f"with {opts}")
        self.anchor_update, self.objective, self.geometry = anchor_update, objective, geometry
        self.ema_decay = float(ema_decay)
        self.family, self.dim, self.num_anchors = family, dim, num_anchors
        self.alpha0, self.alpha_final, self.anneal_steps = float(alpha), alpha_final, anneal_steps
        self.tau, self.metric, self.init, self.heuristic = float(tau), metric, init, heuristic
        self.window = LambdaWindow(float(lam), lam_start, lam_stop)
        self.subsample, self.seed, self.sync_distributed = subsample, seed, sync_distributed
        self.register_buffer("L", None if L is None else L.detach().clone())
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("data_initialized", torch.zeros((), dtype=torch.bool))
        self._gen = torch.Generator().manual_seed(seed + 1)
        self._register_state_dict_hook(_flat_state)
        self.last_entropy: torch.Tensor | None = None
        if dim is not None and num_anchors is not None:
            self._create(dim, num_anchors, torch.float32, torch.device("cpu"))

    # ------------------------------------------------------------------ parameters
    @property
    def materialized(self) -> bool:
        return len(self._parameters) > 0 or "anchor_set" in self._modules

    @property
    def anchors(self) -> torch.Tensor:
        """Ball anchors ``(k, d)`` (a parameter for ``anchor_update="gradient"``, else a buffer)."""
        if self.family != "ball" or "anchor_set" not in self._modules:
            raise AttributeError(f"no anchors: family={self.family!r}, materialized={self.materialized}")
        return self.anchor_set.anchors

    def _create(self, d: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        g = torch.Generator().manual_seed(self.seed)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=g).to(device=device, dtype=dtype))

        if self.family == "ball":
            self.anchor_set = AnchorSet((k, d), update=self.anchor_update, init=self.init, geometry=self.geometry,
                                        ema_decay=self.ema_decay, seed=self.seed, dtype=dtype, device=device,
                                        initial=torch.randn(k, d, generator=g))
        elif self.family == "halfspace":
            self.normals, self.offsets = param(k, d), param(k)
        else:
            self.centers, self.log_half_widths = param(k, d), param(k, d)
        self.dim, self.num_anchors = d, k

    def _num_ranges(self, n: int) -> int:
        if self.num_anchors is not None:
            return self.num_anchors
        k = anchor_heuristic(global_max(n) if self.sync_distributed else n, self.heuristic)
        return k if self.family == "ball" else max(1, math.ceil(math.log2(max(k, 2))))

    @torch.no_grad()
    def materialize(self, x: torch.Tensor) -> None:
        """Create the parameters (if needed) and seed them from data ``x: (..., N, d)`` (if ``init`` asks)."""
        x = F._check_points(x)
        if not self.materialized:
            self._create(x.shape[-1], self._num_ranges(x.shape[-2]), x.dtype, x.device)
        elif x.shape[-1] != self.dim:
            raise ValueError(f"points have dimension {x.shape[-1]} but the regularizer was built for {self.dim}")
        if bool(self.data_initialized):
            return
        pts = x.reshape(-1, x.shape[-1])
        if self.family == "ball":
            self.anchor_set.seed_from(pts, seed=self.seed, sync=self.sync_distributed)
            self.data_initialized.fill_(True)
            return
        centers = init_anchors(pts, self.num_anchors, self.init, self.seed).to(pts)
        if self.family == "halfspace":  # planes through seeded points, random unit normals
            normals = torch.randn(self.normals.shape, generator=torch.Generator().manual_seed(self.seed))
            normals = (normals / normals.norm(dim=-1, keepdim=True)).to(pts)
            self.normals.copy_(normals)
            self.offsets.copy_((normals * centers).sum(-1))
        else:
            half = 0.5 * pts.std(dim=0).clamp_min(1e-6) / max(1.0, self.num_anchors ** (1.0 / pts.shape[-1]))
            self.centers.copy_(centers)
            self.log_half_widths.copy_(half.log().expand_as(self.log_half_widths))
        self._broadcast_from_rank0()
        self.data_initialized.fill_(True)

    def _distributed(self) -> bool:
        return distributed(self.sync_distributed)

    def _broadcast_from_rank0(self) -> None:
        if self._distributed():
            broadcast_from_rank0(self.parameters())

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t) if self._distributed() else t

    @property
    def lows(self) -> torch.Tensor:
        return self.centers - self.log_half_widths.exp()

    @property
    def highs(self) -> torch.Tensor:
        return self.centers + self.log_half_widths.exp()

    # ------------------------------------------------------------------ schedules
    @property
    def alpha(self) -> float:
        """Current α (cosine-annealed when ``alpha_final`` is set)."""
        return alpha_schedule(int(self.step_count), self.alpha0, self.alpha_final, self.anneal_steps)

    @property
    def lam(self) -> float:
        """Current λ under the window."""
        return self.window(int(self.step_count))

    def step(self) -> None:
        """Advance the schedules by one training step."""
        self.step_count += 1

    # ------------------------------------------------------------------ forward
    def _maybe_subsample(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-2]
        if self.subsample is None or n <= self.subsample:
            return x
        idx = torch.randperm(n, generator=self._gen)[: self.subsample].to(x.device)
        return x.index_select(-2, idx)

    def counts(self, x: torch.Tensor) -> torch.Tensor:
        """Soft counts per range cell ``(..., K)`` (summed across ranks under torch.distributed)."""
        self.materialize(x)
        return self._counts(self._maybe_subsample(x))

    def _counts(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "ball":
            xg, cg = apply_geometry(check_points(x), self.anchor_set.current().to(x.dtype), self.geometry)
            c = F.anchor_counts(xg, cg, self.alpha, self.metric, self.L)
        elif self.family == "halfspace":
            c = F.halfspace_counts(x, self.normals, self.offsets, self.tau)
        else:
            c = F.box_counts(x, self.lows, self.highs, self.tau)
        return self._reduce(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The objective of ``x: (N, d)`` → scalar, or ``(B, N, d)`` → ``(B,)``: the surrogate entropy (nats)
        for ``objective="entropy"``. With ``anchor_update="ema"`` in training mode, one EMA k-means step
        follows on the same points."""
        self.materialize(x)
        x = self._maybe_subsample(x)
        if self.family != "ball":
            h = F.entropy_from_counts(self._counts(x))
        else:
            h = self.anchor_set.objective(x, self.alpha, objective=self.objective, metric=self.metric, L=self.L,
                                          reduce=self._reduce)
            if self.anchor_update == "ema" and self.training:
                self.anchor_set.ema_update(x.reshape(-1, x.shape[-1]), sync=self.sync_distributed)
        self.last_entropy = h.detach()
        return h

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """``λ(step) · H`` (mean over sets). Outside the λ window this is an exact zero that still touches
        every parameter, so DDP never sees unused parameters."""
        lam = self.lam
        if lam == 0.0:
            self.materialize(x)
            return zero_touch([*self.parameters(), x])
        return lam * self(x).mean()

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        """Empirical margin γ̂(S) of the learned planes (App. H.3); halfspace family only."""
        if self.family != "halfspace":
            raise ValueError("margin() is defined for the halfspace family")
        self.materialize(x)
        return F.empirical_margin(x, self.normals, self.offsets)

    def extra_repr(self) -> str:
        return f"family={self.family}, dim={self.dim}, num_anchors={self.num_anchors}, lam={self.window.lam}"

    # ------------------------------------------------------------------ state
    def config(self) -> dict[str, Any]:
        """JSON-serializable constructor arguments (with the sizes fixed at materialization)."""
        return {
            "family": self.family, "dim": self.dim, "num_anchors": self.num_anchors,
            "alpha": self.alpha0, "alpha_final": self.alpha_final, "anneal_steps": self.anneal_steps,
            "tau": self.tau, "metric": self.metric, "init": self.init, "lam": self.window.lam,
            "lam_start": self.window.start, "lam_stop": self.window.stop, "subsample": self.subsample,
            "heuristic": self.heuristic, "seed": self.seed, "sync_distributed": self.sync_distributed,
            "anchor_update": self.anchor_update, "objective": self.objective, "geometry": self.geometry,
            "ema_decay": self.ema_decay,
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.family == "ball" and prefix + "anchors" in state_dict:  # the flat keys of _flat_state
            for name in _SET_KEYS:
                if prefix + name in state_dict:
                    state_dict[f"{prefix}anchor_set.{name}"] = state_dict.pop(prefix + name)
            if prefix + "data_initialized" in state_dict:
                state_dict.setdefault(prefix + "anchor_set.initialized", state_dict[prefix + "data_initialized"])
        key = {"ball": "anchor_set.anchors", "halfspace": "normals", "box": "centers"}[self.family]
        if not self.materialized and prefix + key in state_dict:
            t = state_dict[prefix + key]
            self._create(t.shape[-1], t.shape[0], t.dtype, t.device)
        if self.L is None and prefix + "L" in state_dict and state_dict[prefix + "L"] is not None:
            self.L = torch.empty_like(state_dict[prefix + "L"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file at ``path`` (atomically): parameters, buffers and the subsample
        generator's state as tensors, :meth:`config` in its metadata (:func:`der._io.save_state`)."""
        tensors = {k: v for k, v in self.state_dict().items() if v is not None}
        tensors[_GEN_KEY] = self._gen.get_state()
        return save_state(path, tensors, {"config": self.config()}, kind=STATE_KIND)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EntropyRegularizer:
        """Inverse of :meth:`save`: the same config, tensors and subsample stream. ``ValueError`` naming the
        file for a missing, damaged, foreign or non-finite file, or one whose config does not fit."""
        tensors, meta = load_state(path, kind=STATE_KIND)
        gen = tensors.pop(_GEN_KEY, None)
        try:
            cfg = dict(meta["config"])
            dim, k = cfg.pop("dim"), cfg.pop("num_anchors")
            reg = cls(**cfg, num_anchors=k)
            reg.load_state_dict(tensors)
            if gen is not None:
                reg._gen.set_state(gen)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: not a loadable EntropyRegularizer state ({e})") from None
        if reg.dim != dim:
            raise ValueError(f"{path}: stored dim {dim} does not match tensors ({reg.dim})")
        return reg
