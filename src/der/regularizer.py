r"""``EntropyRegularizer``: the surrogate entropy as an ``nn.Module`` with learnable ranges (Eq. 7).

.. math:: \mathcal L(\theta, \Theta) = \mathcal L_\text{task}(\theta) + \lambda\, H_\star(S_\theta;\Theta)

Families: ``ball`` (anchors, :math:`H_\text{diff}`, Eq. 2–3), ``halfspace`` (m planes,
:math:`H_\text{soft}`, Eq. 4–6) and ``box`` (m axis-aligned rectangles, App. H.4). For the two gated
families ``num_anchors`` is the number of ranges m (2^m sign-pattern cells); the heuristics give the
number of cells k and then m = ⌈log2 k⌉.

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

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from der import functional as F
from der._io import atomic_write
from der.initializers import INIT_METHODS, init_anchors
from der.schedules import LambdaWindow, anchor_heuristic, cosine_anneal

FAMILIES = ("ball", "halfspace", "box")


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
        init: ``"kmeans++"`` | ``"random"`` | ``"faiss"`` (data-dependent seeding of the ranges).
        lam, lam_start, lam_stop: λ and its active window in steps (App. G.11).
        subsample: at most this many points per set per call (a fresh random subset each call).
        heuristic: ``"geometry"`` (min(16, n/4)), ``"sqrt"`` (⌊√N⌋, attention) or ``"lite"`` (N^{1/3}).
        seed: seeds initialization and subsampling. sync_distributed: all-reduce counts across ranks.

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
    ) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        if init not in INIT_METHODS:
            raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
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
        self.family, self.dim, self.num_anchors = family, dim, num_anchors
        self.alpha0, self.alpha_final, self.anneal_steps = float(alpha), alpha_final, anneal_steps
        self.tau, self.metric, self.init, self.heuristic = float(tau), metric, init, heuristic
        self.window = LambdaWindow(float(lam), lam_start, lam_stop)
        self.subsample, self.seed, self.sync_distributed = subsample, seed, sync_distributed
        self.register_buffer("L", None if L is None else L.detach().clone())
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("data_initialized", torch.zeros((), dtype=torch.bool))
        self._gen = torch.Generator().manual_seed(seed + 1)
        self.last_entropy: torch.Tensor | None = None
        if dim is not None and num_anchors is not None:
            self._create(dim, num_anchors, torch.float32, torch.device("cpu"))

    # ------------------------------------------------------------------ parameters
    @property
    def materialized(self) -> bool:
        return len(self._parameters) > 0

    def _create(self, d: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        g = torch.Generator().manual_seed(self.seed)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=g).to(device=device, dtype=dtype))

        if self.family == "ball":
            self.anchors = param(k, d)
        elif self.family == "halfspace":
            self.normals, self.offsets = param(k, d), param(k)
        else:
            self.centers, self.log_half_widths = param(k, d), param(k, d)
        self.dim, self.num_anchors = d, k

    def _num_ranges(self, n: int) -> int:
        if self.num_anchors is not None:
            return self.num_anchors
        k = anchor_heuristic(n, self.heuristic)
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
        centers = init_anchors(pts, self.num_anchors, self.init, self.seed).to(pts)
        if self.family == "ball":
            self.anchors.copy_(centers)
        elif self.family == "halfspace":  # planes through seeded points, random unit normals
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
        dist = torch.distributed
        return self.sync_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _broadcast_from_rank0(self) -> None:
        if self._distributed():
            for p in self.parameters():
                torch.distributed.broadcast(p.data, src=0)

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
        if self.alpha_final is None:
            return self.alpha0
        return cosine_anneal(int(self.step_count), self.alpha0, self.alpha_final, self.anneal_steps)

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
        x = self._maybe_subsample(x)
        if self.family == "ball":
            c = F.anchor_counts(x, self.anchors, self.alpha, self.metric, self.L)
        elif self.family == "halfspace":
            c = F.halfspace_counts(x, self.normals, self.offsets, self.tau)
        else:
            c = F.box_counts(x, self.lows, self.highs, self.tau)
        if self._distributed():
            import torch.distributed.nn.functional as dist_fn

            c = dist_fn.all_reduce(c)
        return c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Surrogate entropy (nats) of ``x: (N, d)`` → scalar, or ``(B, N, d)`` → ``(B,)``."""
        h = F.entropy_from_counts(self.counts(x))
        self.last_entropy = h.detach()
        return h

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """``λ(step) · H`` (mean over sets). Outside the λ window this is an exact zero that still touches
        every parameter, so DDP never sees unused parameters."""
        lam = self.lam
        if lam == 0.0:
            self.materialize(x)
            return sum(p.sum() * 0.0 for p in self.parameters())
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
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = {"ball": "anchors", "halfspace": "normals", "box": "centers"}[self.family]
        if not self.materialized and prefix + key in state_dict:
            t = state_dict[prefix + key]
            self._create(t.shape[-1], t.shape[0], t.dtype, t.device)
        if self.L is None and prefix + "L" in state_dict and state_dict[prefix + "L"] is not None:
            self.L = torch.empty_like(state_dict[prefix + "L"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (safetensors: parameters and buffers) and ``path`` with ``.json`` (config), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if v is not None}
        atomic_write(path, lambda p: save_file(tensors, str(p)))
        cfg = json.dumps({"der_version": 1, "class": "EntropyRegularizer", "config": self.config()}, indent=2)
        atomic_write(path.with_suffix(".json"), lambda p: Path(p).write_text(cfg))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EntropyRegularizer:
        """Inverse of :meth:`save`."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("class") != "EntropyRegularizer":
            raise ValueError(f"{path.with_suffix('.json')} does not describe an EntropyRegularizer")
        cfg = dict(meta["config"])
        dim, k = cfg.pop("dim"), cfg.pop("num_anchors")
        reg = cls(**cfg, num_anchors=k)
        reg.load_state_dict(load_file(str(path)))
        if reg.dim != dim:
            raise ValueError(f"{path}: stored dim {dim} does not match tensors ({reg.dim})")
        return reg
