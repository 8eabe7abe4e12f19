r"""EntropyNet: the paper's learned geometric preprocessor (Sec. 4, Alg. 1, App. G.7–G.9).

Architecture (App. G.9, Alg. 1): a PointNet-style network. A shared per-point MLP ``d → 64 → 128 → 256``
(Linear + BatchNorm + ReLU) gives features :math:`F_1`; max-pooling gives a global feature :math:`G`;
``concat(F_1, tile(G))`` (512 channels) goes through the output MLP ``512 → 128`` (BN + ReLU, dropout 0.1)
``→ d``, giving :math:`\Delta`; the output is the bounded move

.. math:: S' = S + \sigma \tanh(\Delta),\qquad \sigma = 0.1 \quad\text{(Alg. 1 line 5, App. G.7)}

in coordinates normalized to the unit square (App. G.12). The entropy surrogate (``ball`` = H_diff with
learnable anchors, ``halfspace`` = H_soft with learnable planes, ``box``) is a submodule
(:class:`der.EntropyRegularizer`) trained jointly with the network (Eq. 7, Alg. 1 line 17).

:meth:`EntropyNet.preprocess` is the inference path used by :func:`der.geometry.preprocess_then`:
validate → normalize to the unit square (one scale for both axes) → network (chunked, no grad) → map back
→ the paper's dedup step ("remove duplicate points", App. G.12). Network outputs are never exact
duplicates, so the dedup works on a grid: points whose normalized coordinates fall in the same cell of side
``dedup_grid`` (default ``1e-3``) are duplicates and the first one is kept, unmoved by the grid.
``dedup_grid=0`` removes exact repeats only.

Pretrained weights for the default settings ship in ``der/weights/entropynet_<surrogate>.safetensors``, one
file whose metadata holds the config and the exact training command (``der train entropynet``).
Only ``ball`` (d = 2) is shipped; ``pretrained("halfspace" | "box")`` raises ``FileNotFoundError`` until
someone trains them with ``der train entropynet --surrogate ...``.

The output layer is zero-initialized (our choice, not the paper's) so that training starts from
``S' = S`` with zero hull error. Measured speed and accuracy are in ``docs/entropynet.md``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from der._io import MissingStateError, first_nonfinite, load_state, save_state
from der._validate import as_points

__all__ = ["STATE_KIND", "EntropyNet", "EntropyNetConfig", "SURROGATES", "WEIGHTS_DIR", "grid_dedup", "weights_path"]

SURROGATES = ("ball", "halfspace", "box")
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
STATE_KIND = "der.EntropyNet"
_LEGACY_FORMAT = "der.EntropyNet/1"  # two-file layout: tensors + JSON sidecar {"format", "config", "meta"}


def weights_path(path: str | Path) -> Path:
    """The weights file for ``path``: ``path`` itself if it ends in ``.safetensors``, else with that appended
    (a ``.json`` sidecar name of the earlier layout maps to its ``.safetensors`` file)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return p
    if p.suffix == ".json":
        return p.with_suffix(".safetensors")
    return p.with_name(p.name + ".safetensors")


def _load_legacy(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Tensors and ``{"config", "meta"}`` of a file in the two-file layout, or ``None`` if it is not one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    sidecar = weights.with_suffix(".json")
    try:
        doc = json.loads(sidecar.read_text())
        with safe_open(str(weights), framework="pt") as f:
            if "der_format" in (f.metadata() or {}):
                return None
        state = load_file(str(weights))
    except Exception:  # no sidecar, unreadable sidecar or tensors: not a legacy file
        return None
    if not isinstance(doc, dict) or doc.get("format") != _LEGACY_FORMAT:
        return None
    bad = first_nonfinite(state)
    if bad is not None:
        raise ValueError(f"{weights}: tensor {bad!r} contains NaN or Inf")
    return state, doc


@dataclasses.dataclass
class EntropyNetConfig:
    """Hyper-parameters of :class:`EntropyNet` (defaults: App. G.9–G.10)."""

    d: int = 2
    widths: tuple[int, ...] = (64, 128, 256)  # App. G.9 shared MLP
    head: int = 128  # App. G.9 output MLP 128 → d
    sigma: float = 0.1  # Alg. 1 line 5 / App. G.7
    dropout: float = 0.1  # App. G.9
    surrogate: str = "ball"
    num_anchors: int = 16  # App. G.10: k = min(16, n/4); also the number of planes / boxes
    alpha: float = 10.0  # App. G.10: α annealed 10 → 5
    alpha_final: float = 5.0
    tau: float = 0.1  # H_soft temperature (Eq. 4)
    lam: float = 0.1  # App. G.10: λ = 0.1
    lam_start: int = 0  # App. G.11: entropy term switched on after a warm-up (steps)
    anneal_steps: int | None = None  # App. G.11: cosine α anneal over the first half of the λ window
    dedup_grid: float = 1e-3  # normalized cell side for the dedup step (0 = exact repeats only)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {self.surrogate!r}")
        if self.d < 1 or not self.widths or min(self.widths) < 1 or self.head < 1:
            raise ValueError(f"d, widths and head must be positive, got d={self.d}, widths={self.widths}")
        if not (self.sigma > 0 and 0 <= self.dropout < 1 and self.num_anchors >= 1 and self.dedup_grid >= 0):
            raise ValueError(
                "need sigma > 0, 0 <= dropout < 1, num_anchors >= 1, dedup_grid >= 0; got "
                f"sigma={self.sigma}, dropout={self.dropout}, num_anchors={self.num_anchors}, "
                f"dedup_grid={self.dedup_grid}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["widths"] = list(self.widths)
        return out


def _block(cin: int, cout: int) -> nn.Sequential:
    """Linear + BatchNorm + ReLU applied to ``(M, cin)`` rows (a 1×1 conv of PointNet)."""
    return nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU())


def make_surrogate(cfg: EntropyNetConfig) -> nn.Module:
    """The entropy surrogate of Alg. 1 lines 6–13 (anchors / planes / boxes learned jointly, Eq. 7)."""
    import math

    from der.regularizer import EntropyRegularizer

    # ball: k anchors. halfspace / box: m = ⌈log2 k⌉ ranges give 2^m = k sign-pattern cells (Eq. 5).
    k = cfg.num_anchors if cfg.surrogate == "ball" else max(1, math.ceil(math.log2(max(cfg.num_anchors, 2))))
    anneal = cfg.anneal_steps is not None and cfg.alpha_final != cfg.alpha
    return EntropyRegularizer(
        family=cfg.surrogate,
        dim=cfg.d,
        num_anchors=k,
        alpha=cfg.alpha,
        alpha_final=cfg.alpha_final if anneal else None,
        anneal_steps=max(1, int(cfg.anneal_steps)) if anneal else None,
        tau=cfg.tau,
        lam=cfg.lam,
        lam_start=cfg.lam_start,
    )


def grid_dedup(points: np.ndarray, grid: float, lo: np.ndarray | None = None, scale: float = 1.0) -> np.ndarray:
    """Indices (sorted) of the first point in each grid cell of side ``grid · scale`` anchored at ``lo``.

    ``grid == 0`` keeps the first of each run of exactly equal rows (:func:`der.geometry.data.dedup`).
    """
    if grid == 0 or len(points) == 0:
        from der.geometry.data import dedup

        return dedup(points, return_index=True)[1]
    lo = points.min(0) if lo is None else lo
    from der.geometry.fast_infer import first_in_cell

    cells = np.floor((points - lo) / (grid * scale)).astype(np.int64)
    return first_in_cell(cells)


class EntropyNet(nn.Module):
    r"""PointNet-style preprocessor :math:`S \mapsto S + \sigma\tanh(\Delta_\theta(S))` (Alg. 1).

    >>> net = EntropyNet(EntropyNetConfig(widths=(8, 8, 8), head=8))
    >>> net.displace(torch.rand(2, 50, 2)).shape
    torch.Size([2, 50, 2])
    """

    def __init__(self, config: EntropyNetConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        cfg = config if config is not None else EntropyNetConfig(**kwargs)
        if config is not None and kwargs:
            cfg = dataclasses.replace(config, **kwargs)
        self.config = cfg
        dims = (cfg.d, *cfg.widths)
        self.point_mlp = nn.Sequential(*[_block(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)])
        self.head = _block(2 * cfg.widths[-1], cfg.head)  # concat(F1, tile(G)) → 128
        self.drop = nn.Dropout(cfg.dropout)  # App. G.9: dropout before the final layer
        self.out = nn.Linear(cfg.head, cfg.d)
        nn.init.zeros_(self.out.weight)  # start at the identity S' = S (no hull error before training)
        nn.init.zeros_(self.out.bias)
        self.surrogate = make_surrogate(cfg)

    # ------------------------------------------------------------------ forward pieces
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.config.d:
            raise ValueError(f"x must be (n, {self.config.d}) or (B, n, {self.config.d}), got {tuple(x.shape)}")
        if x.shape[-2] < 1:
            raise ValueError("x needs at least one point")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or Inf")
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-point features :math:`F_1`: ``(B, n, d) → (B, n, C)`` (Alg. 1 line 1)."""
        b, n, d = x.shape
        return self.point_mlp(x.reshape(b * n, d)).reshape(b, n, -1)

    def delta(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Output MLP on ``concat(F_1, tile(G))`` → Δ: ``(B, n, C), (B, C) → (B, n, d)`` (lines 3–4)."""
        b, n, c = f.shape
        z = torch.cat([f, g[:, None, :].expand(b, n, c)], dim=-1).reshape(b * n, 2 * c)
        return self.out(self.drop(self.head(z))).reshape(b, n, -1)

    def displace(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`S' = S + \\sigma\\tanh(\\Delta)` for ``x: (n, d)`` or ``(B, n, d)`` (lines 1–5)."""
        x = self._check_input(x)
        squeeze = x.dim() == 2
        xb = x[None] if squeeze else x
        f = self.features(xb)
        y = xb + self.config.sigma * torch.tanh(self.delta(f, f.amax(dim=1)))
        return y[0] if squeeze else y

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Alg. 1: returns ``(S', H)`` with ``H`` the surrogate entropy of ``S'`` (one per set)."""
        y = self.displace(x)
        return y, self.surrogate(y)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def displace_numpy(self, x: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Eval-mode :meth:`displace` of one normalized set ``(n, d)`` in float32, in chunks of points."""
        was = self.training
        self.eval()
        try:
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
            g = torch.stack([self.features(t[:, i : i + chunk]).amax(1) for i in range(0, t.shape[1], chunk)])
            g = g.amax(0)
            out = [
                t[:, i : i + chunk] + self.config.sigma * torch.tanh(self.delta(self.features(t[:, i : i + chunk]), g))
                for i in range(0, t.shape[1], chunk)
            ]
            return torch.cat(out, dim=1)[0].double().numpy()
        finally:
            self.train(was)

    def preprocess(self, points: np.ndarray, return_index: bool = False) -> Any:
        """Preprocess a point set for a hull / Delaunay / maxima code (App. G.12 + Alg. 1).

        Args:
            points: ``(n, d)`` finite floats, any coordinate range.
        Returns:
            ``(m, d)`` float64 moved points, ``m ≤ n`` after the dedup step, in input coordinates; with
            ``return_index=True`` also the ``(m,)`` indices of the input rows they came from.
        """
        pts = as_points(points, self.config.d, min_rows=1)
        lo = pts.min(0)
        scale = float((pts.max(0) - lo).max()) or 1.0
        moved = lo + self.displace_numpy((pts - lo) / scale) * scale
        keep = grid_dedup(moved, self.config.dedup_grid, lo, scale)
        out = np.ascontiguousarray(moved[keep])
        return (out, keep) if return_index else out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write one safetensors file (``.safetensors`` appended unless present): weights, config and ``meta``
        (e.g. the training command), atomically (:func:`der._io.save_state`). Returns the file path."""
        doc = {"config": self.config.to_dict(), "meta": meta or {}}
        return save_state(weights_path(path), self.state_dict(), doc, kind=STATE_KIND)

    @classmethod
    def load(cls, path: str | Path, d: int | None = None, surrogate: str | None = None) -> EntropyNet:
        """Load weights saved by :meth:`save`; ``d`` / ``surrogate``, when given, must match the file.

        Files of the earlier two-file layout (``.safetensors`` + ``.json`` sidecar) still load."""
        weights = weights_path(path)
        try:
            state, doc = load_state(weights, kind=STATE_KIND)
        except MissingStateError:
            raise MissingStateError(
                f"no EntropyNet weights at {weights}; train them with `der train entropynet`"
            ) from None
        except ValueError:
            legacy = _load_legacy(weights)
            if legacy is None:
                raise
            state, doc = legacy
        try:
            cfg = EntropyNetConfig(**doc["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{weights} holds an invalid EntropyNet config: {e}") from None
        for name, want in (("d", d), ("surrogate", surrogate)):
            if want is not None and getattr(cfg, name) != want:
                raise ValueError(
                    f"checkpoint {weights.name} has {name}={getattr(cfg, name)!r}, but {name}={want!r} was asked for"
                )
        net = cls(cfg)
        mine = net.state_dict()
        bad = [k for k in state if k not in mine or mine[k].shape != state[k].shape]
        missing = [k for k in mine if k not in state]
        if bad or missing:
            raise ValueError(f"checkpoint {weights.name} does not fit this EntropyNet config: "
                             f"unexpected/mis-shaped {bad[:5]}, missing {missing[:5]}")
        net.load_state_dict(state)
        net.meta = doc.get("meta", {})
        return net.eval()

    def materialize(self, x: torch.Tensor | None = None) -> EntropyNet:
        """Seed the surrogate's anchors / planes from data ``x: (..., N, d)`` (k-means++, once)."""
        if x is None:
            x = torch.rand(1024, self.config.d, generator=torch.Generator().manual_seed(0))
        self.surrogate.materialize(x)
        return self

    @classmethod
    def pretrained(cls, surrogate: str = "ball", d: int = 2) -> EntropyNet:
        """The shipped weights for ``surrogate`` (trained by ``der train entropynet``; see the JSON)."""
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        return cls.load(WEIGHTS_DIR / f"entropynet_{surrogate}", d=d, surrogate=surrogate)
