r"""Attach DER to the attention keys of an existing model (Sec. 3 "attention", App. A, App. G.9–G.10).

The keys of each attention head are the point set :math:`S` of Eq. 2–3; each (layer, head) gets its own
``k`` learnable anchors. ``inject(model, config)`` mutates the model in place (PEFT style) and returns a
:class:`DERHandle`:

* anchors are one :class:`der._anchors.AnchorSet` per layer (the regularizer's building block, batched
  over heads), registered on the model as ``<key module>.der_anchors`` with ``anchors`` of shape
  ``(H, k, Dh)``. With ``anchor_update="gradient"`` (the paper's) they are ``nn.Parameter`` s, so
  ``model.parameters()``, optimizers, DDP and FSDP see them, and ``handle.loss()`` adds a zero-weighted
  term for every anchor set whose layer did not run (no DDP "unused parameter" error); with ``"ema"`` /
  ``"frozen"`` they are buffers (the EMA k-means step runs at ``loss()``/``entropy()`` in training mode);
* a forward hook on each matched key module reads the keys ``(B, H, N, Dh)`` (see
  :mod:`der.attention.config` for the per-architecture readers) and computes this forward's
  :math:`H_\text{diff}` per sequence and head (:func:`der.attention._hdiff.key_entropy_layers`, equal to
  :func:`der.functional.anchor_entropy`; padding tokens from a 2-D ``attention_mask`` keyword are excluded);
* ``handle.entropy()`` → ``(L, H)`` (mean over the batch) of the configured objective (:math:`H_\text{diff}`
  for ``objective="entropy"``), ``handle.loss()`` → λ·its mean; non-finite keys raise naming the layer;
* ``with handle.calibrate():`` accumulates per-position soft assignments used by
  :mod:`der.attention.rules` for static layouts;
* ``handle.remove()`` undoes everything (hooks, parameters, attribute, attention swap of ``convert``).

Works on PEFT LoRA models: the LoRA wrapper ``k_proj`` is hooked (its output includes the adapter),
never ``k_proj.base_layer`` or the ``lora_*`` children.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from der import functional as DF
from der._anchors import AnchorSet, anchor_objective, apply_geometry, zero_touch
from der.attention._hdiff import key_entropy_layers
from der.attention._targets import (
    ANCHOR_ATTR,
    _geometry,
    _layer_index,
    _query_module,
    _resolve,
    check_key_targets,
    list_matches,
    read_keys,
)
from der.attention.config import ARCH_DEFAULTS, DERConfig, infer_seq_len

__all__ = ["inject", "get_handle", "list_matches", "read_keys", "DERHandle", "DERSite", "DERAnchors"]

HANDLE_ATTR = "_der_handle"
HANDLE_STATE_FORMAT = "der.attention.handle/1"


# --------------------------------------------------------------------------- state
DERAnchors = AnchorSet  # the per-layer anchor state: AnchorSet of shape (H, k, Dh)


def _new_anchors(heads: int, k: int, head_dim: int, c: DERConfig) -> AnchorSet:
    """Per-head anchors ``(H, k, Dh)`` of one layer (Eq. 2's :math:`c_j`, one set per head) with the
    config's update rule, init and geometry."""
    return AnchorSet((heads, k, head_dim), update=c.anchor_update, init=c.init, geometry=c.geometry,
                     ema_decay=c.ema_decay, seed=c.seed)


@dataclass
class DERSite:
    """One hooked key module."""

    name: str
    module: nn.Module  # produces the keys
    attention: nn.Module  # its parent: the module HF passes to the attention function
    layer: int | None
    heads: int
    head_dim: int
    key_kind: str
    anchors: AnchorSet
    hook: object = None
    entropy: torch.Tensor | None = None  # (B, H) of this forward
    pending: torch.Tensor | None = None  # keys (B, H, N, Dh) of this forward, H not computed yet
    keys: torch.Tensor | None = None  # detached, only while keep_keys
    queries: torch.Tensor | None = None  # (B, Hq, N, Dh) detached, while keep_keys or calibrating
    qmodule: nn.Module | None = None
    qhook: object = None
    scale: float = 1.0  # the attention's softmax scale (for query routing)
    key_mask: torch.Tensor | None = None
    stats_mass: torch.Tensor | None = None  # (H, N, k) Σ over calibration sequences of p_ij
    stats_count: torch.Tensor | None = None  # (N,) number of valid sequences per position
    stats_route: torch.Tensor | None = None  # (Hq, N, k) Σ of query routing (None: keys only)
    extra: dict = field(default_factory=dict)


class DERHandle:
    """What :func:`inject` returns; also reachable as ``model._der_handle``."""

    def __init__(self, model: nn.Module, config: DERConfig, arch: str, sites: list[DERSite]) -> None:
        self.model, self.config, self.arch, self.sites = model, config, arch, sites
        self.lam = config.lam if config.lam is not None else ARCH_DEFAULTS.get(arch, ARCH_DEFAULTS["bert"]).lam
        self.steps = 0
        self.regularize = True  # compute H in the hooks
        self.keep_keys = False  # keep detached keys for dynamic layouts
        self.calibrating = False
        self.converted = None  # set by der.attention.convert
        self.dense_fallbacks: dict[str, int] = {}  # reason → count (convert: never silent)
        self._key_mask: torch.Tensor | None = None
        self._root_hook = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        self._removed = False

    # ---------------------------------------------------------------- schedule
    @property
    def alpha(self) -> float:
        return self.config.alpha_at(self.steps)

    @property
    def active(self) -> bool:
        """Whether this step computes H (``regularize`` and ``steps % config.every == 0``)."""
        return self.regularize and self.steps % self.config.every == 0

    def step(self) -> None:
        """Advance the α anneal (call once per optimizer step)."""
        self.steps += 1

    def parameters(self) -> list[nn.Parameter]:
        """The anchor parameters (empty unless ``anchor_update="gradient"``)."""
        return [s.anchors.anchors for s in self.sites if isinstance(s.anchors.anchors, nn.Parameter)]

    # ---------------------------------------------------------------- anchor state
    def anchor_tensors(self) -> dict[str, torch.Tensor]:
        """Every anchor tensor by file key: ``anchors/<site>`` (and ``anchors/<site>/ema_count|ema_sum``)."""
        out = {}
        for s in self.sites:
            for name, t in s.anchors.state_dict().items():
                if name != "initialized":
                    out[f"anchors/{s.name}" + ("" if name == "anchors" else f"/{name}")] = t.detach()
        return out

    @torch.no_grad()
    def load_anchor_tensors(self, tensors: dict[str, torch.Tensor], source: str = "state") -> None:
        """Inverse of :meth:`anchor_tensors`; raises ``ValueError`` naming ``source`` on a missing or
        mis-shaped tensor."""
        want = self.anchor_tensors()
        for key, cur in want.items():
            t = tensors.get(key)
            if t is None:
                raise ValueError(f"{source} has no {key!r} (anchor_update={self.config.anchor_update!r})")
            if tuple(t.shape) != tuple(cur.shape):
                raise ValueError(f"{source}: {key} is {tuple(t.shape)}, this model needs {tuple(cur.shape)}")
        for s in self.sites:
            for name, t in s.anchors.state_dict(keep_vars=True).items():
                if name != "initialized":
                    t.copy_(tensors[f"anchors/{s.name}" + ("" if name == "anchors" else f"/{name}")])
            s.anchors.initialized.fill_(True)

    # ---------------------------------------------------------------- hooks
    def _on_forward(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._key_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        for s in self.sites:
            s.entropy = s.pending = None
            s.extra.pop("distill_terms", None)

    def _make_hook(self, site: DERSite):
        def hook(module, inputs, output):
            keys = read_keys(output, site.key_kind, site.heads, site.head_dim)
            mask = self._key_mask
            if mask is not None and tuple(mask.shape) != (keys.shape[0], keys.shape[2]):
                mask = None  # a sub-call (e.g. cached decoding) with a different length: no padding info
            site.key_mask = mask
            if not bool(site.anchors.initialized):
                self._init_from_keys(site, keys, mask)
            if site.key_kind == "fused_qkv" and site.qmodule is module and (self.keep_keys or self.calibrating):
                site.queries = read_keys(output, "fused_qkv", -1, site.head_dim, part=0).detach()
            if self.keep_keys:
                site.keys = keys.detach()
            if self.active:  # H is computed lazily for all layers at once (entropy()/loss())
                site.pending = keys
            if self.calibrating:
                self._accumulate(site, keys.detach(), mask)

        return hook

    def _make_qhook(self, site: DERSite):
        def qhook(module, inputs, output):
            if self.keep_keys or self.calibrating:
                kind = "heads" if site.key_kind == "heads" else "linear"
                site.queries = read_keys(output, kind, -1, site.head_dim).detach()

        return qhook

    @staticmethod
    def _pooled(site: DERSite, keys: torch.Tensor, mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys of one forward as per-head point sets ``(H, B·N, Dh)`` and the valid mask ``(B·N,)``."""
        pts = keys.detach().transpose(0, 1).reshape(site.heads, -1, site.head_dim)
        return pts, None if mask is None else mask.reshape(-1)

    def _init_from_keys(self, site: DERSite, keys: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Seed the layer's anchors from this forward's keys by ``config.init`` (App. A: a random subset)."""
        pts, valid = self._pooled(site, keys, mask)
        site.anchors.seed_from(pts, valid, seed=self.config.seed + 7919 * self.sites.index(site))

    def _compute_pending(self) -> None:
        """H_diff (B, H) for every layer whose keys were captured in this forward (Eq. 2–3).

        ``sqeuclidean`` (the default) runs :func:`der.attention._hdiff.key_entropy_layers` once per group
        of layers with one key shape, anchor shape and padding mask (usually all layers: one short chain
        of kernels laid out for tiny ``k``); other metrics call :func:`der.functional.anchor_entropy` (or
        ``soft_assign`` under key padding) per layer.
        """
        alpha, cfg = self.alpha, self.config
        fast = cfg.metric == "sqeuclidean" and cfg.objective == "entropy" and cfg.geometry == "raw"
        groups: dict[tuple, list[DERSite]] = {}
        done: list[DERSite] = []
        for s in self.sites:
            if s.pending is None:
                continue
            x, a, mask = s.pending, s.anchors.current(), s.key_mask
            done.append(s)
            if fast:
                key = (tuple(x.shape), x.dtype, tuple(a.shape), a.dtype, a.device, id(mask))
                groups.setdefault(key, []).append(s)
                continue
            s.entropy = anchor_objective(x, a, alpha, objective=cfg.objective, metric=cfg.metric,
                                         geometry=cfg.geometry, mask=None if mask is None else mask[:, None, :])
        for sites in groups.values():
            anchors = torch.stack([s.anchors.current() for s in sites])
            ent = key_entropy_layers([s.pending for s in sites], anchors, alpha, sites[0].key_mask)
            for s, e in zip(sites, ent.unbind(0), strict=True):
                s.entropy = e
        if done and not bool(torch.stack([torch.isfinite(s.entropy.detach()).all() for s in done]).all()):
            bad = next(s for s in done if not bool(torch.isfinite(s.entropy.detach()).all()))
            for s in done:
                s.entropy = s.pending = None
            raise ValueError(f"DER: non-finite keys (NaN/Inf) in layer {bad.name!r}; the loss would be NaN")
        for s in done:
            if cfg.anchor_update == "ema" and self.model.training:
                s.anchors.ema_update(*self._pooled(s, s.pending, s.key_mask))
            s.pending = None

    def _accumulate(self, site: DERSite, keys: torch.Tensor, mask: torch.Tensor | None) -> None:
        from der.attention.rules import query_routing

        anchors = site.anchors.anchors.detach()
        p = DF.soft_assign(*apply_geometry(keys, anchors.to(keys.dtype), site.anchors.geometry), alpha=self.alpha,
                           metric=self.config.metric)
        w = torch.ones(keys.shape[0], keys.shape[2], device=p.device) if mask is None else mask.float()
        sums = {"mass": (p * w[:, None, :, None]).sum(0), "count": w.sum(0)}  # (H, N, k), (N,)
        q = site.queries
        if q is not None and q.shape[0] == keys.shape[0] and q.shape[2] == keys.shape[2]:
            r = query_routing(q.float(), anchors, (p * w[:, None, :, None]).sum(-2), site.scale)
            sums["route"] = (r * w[:, None, :, None]).sum(0)  # (Hq, N, k)
        n = keys.shape[2]
        for key, val in sums.items():
            attr = f"stats_{key}"
            cur = getattr(site, attr)
            if cur is None:
                cur = torch.zeros_like(val)
            dim = 1 if val.dim() == 3 else 0
            if cur.shape[dim] < n:
                pad = [0, 0] * (val.dim() - 1 - dim) + [0, n - cur.shape[dim]]
                cur = torch.nn.functional.pad(cur, pad)
            cur.narrow(dim, 0, n).add_(val)
            setattr(site, attr, cur)

    @contextlib.contextmanager
    def calibrate(self, reset: bool = True):
        """Accumulate per-position soft assignments (for static layouts) during the forwards inside."""
        if reset:
            for s in self.sites:
                s.stats_mass = s.stats_count = s.stats_route = None
        self.calibrating = True
        try:
            yield self
        finally:
            self.calibrating = False

    # ---------------------------------------------------------------- results
    def entropy_by_layer(self) -> dict[str, torch.Tensor]:
        """``{module name: (H,)}`` — this forward's H_diff per head, mean over the batch (nats)."""
        self._compute_pending()
        out = {s.name: s.entropy.mean(0) for s in self.sites if s.entropy is not None}
        if not out:
            raise RuntimeError("no DER entropy recorded: run a forward pass of the model first (with handle.regularize=True)")
        return out

    def entropy(self) -> torch.Tensor:
        """``(L, H)`` — per-layer, per-head H_diff of the last forward (mean over the batch)."""
        vals = list(self.entropy_by_layer().values())
        if len({v.shape for v in vals}) > 1:
            raise ValueError("layers have different head counts; use handle.entropy_by_layer()")
        return torch.stack(vals)

    def loss(self) -> torch.Tensor:
        """λ·H with H the mean H_diff over layers, heads and sequences of the last forward.

        Anchor sets whose layer did not run contribute ``0·Σ anchors`` so every anchor gets a gradient.
        After :func:`~der.attention.convert` the keys are no longer regularized: the loss is the weighted
        sum of the distillation layer terms of the last forward (:mod:`der.attention.distill`; zero until
        :func:`der.attention.distill.enable` sets a weight).
        """
        if self.converted is not None:
            return self.converted.distill_loss() + zero_touch(self.parameters())
        self._compute_pending()
        ent = [s.entropy.mean() for s in self.sites if s.entropy is not None]
        if not ent and self.regularize and not self.active:  # an off-step of `every`: keep anchors in the graph
            return zero_touch(self.parameters())
        if not ent:
            raise RuntimeError("no DER entropy recorded: run a forward pass of the model first (with handle.regularize=True)")
        h = torch.stack(ent).mean()
        idle = [s.anchors.anchors for s in self.sites if s.entropy is None]
        return self.lam * h + zero_touch(idle)

    # ---------------------------------------------------------------- lookup / undo
    def site_for_attention(self, attention: nn.Module) -> DERSite | None:
        for s in self.sites:
            if s.attention is attention:
                return s
        return None

    def remove(self) -> None:
        """Undo ``inject`` (and ``convert``): hooks, anchor parameters, the handle attribute."""
        if self._removed:
            return
        if self.converted is not None:
            from der.attention.conversion import revert

            revert(self.model)
        self._root_hook.remove()
        for s in self.sites:
            s.hook.remove()
            if s.qhook is not None:
                s.qhook.remove()
            if getattr(s.module, ANCHOR_ATTR, None) is s.anchors:
                delattr(s.module, ANCHOR_ATTR)
            s.entropy = s.keys = s.pending = s.queries = None
        if getattr(self.model, HANDLE_ATTR, None) is self:
            delattr(self.model, HANDLE_ATTR)
        self._removed = True

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Handle state beyond the model's parameters (the anchors are in ``model.state_dict()``): the step
        count (α schedule) and the conversion (settings, rule, static layouts). Plain values and tensors,
        so ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it (e.g. in a Trainer checkpoint)."""
        from der.attention.conversion import conversion_state

        return {"format": HANDLE_STATE_FORMAT, "steps": int(self.steps), "converted": conversion_state(self)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: the step count and the conversion (reverting or converting the model
        to match, with the saved layouts; no calibration needed)."""
        if not isinstance(state, dict) or state.get("format") != HANDLE_STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a DER handle state (expected format {HANDLE_STATE_FORMAT!r}, got {got!r})")
        conv = state.get("converted")
        if conv is not None:
            names = sorted(conv.get("layouts", {})) if conv.get("mode") == "static" else None
            want = sorted(s.name for s in self.sites)
            if names is not None and names != want:
                raise ValueError(f"saved layouts are for layers {names}, this handle has {want}")
        from der.attention.conversion import load_conversion_state

        load_conversion_state(self, conv)
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        k = self.sites[0].anchors.anchors.shape[1] if self.sites else 0
        conv = "no" if self.converted is None else f"{self.converted.mode}@{self.converted.sparsity:g}"
        return (f"DERHandle(arch={self.arch!r}, layers={len(self.sites)}, k={k}, lam={self.lam}, "
                f"alpha={self.alpha:g}, steps={self.steps}, converted={conv})")



def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def inject(model: nn.Module, config: DERConfig | None = None) -> DERHandle:
    """Attach per-head anchors and key hooks to ``model`` (in place); see the module docstring."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise ValueError("model already has DER injected; call handle.remove() first")
    config = config or DERConfig()
    arch, _, key_kind = _resolve(model, config)
    names = list_matches(model, config)
    check_key_targets(names, config, arch)
    n = config.seq_len or infer_seq_len(model)
    k = config.resolve_num_anchors(n)
    ref = next((p for p in model.parameters()), None)
    sites: list[DERSite] = []
    for name in names:
        module = model.get_submodule(name)
        parent = _parent(model, name)
        heads, dh = _geometry(module, parent, key_kind)
        anchors = _new_anchors(heads, k, dh, config)
        if ref is not None:
            # anchors stay fp32 for half-precision models (fp64 models get fp64 anchors)
            anchors.to(device=ref.device, dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32)
        if hasattr(module, ANCHOR_ATTR):
            raise ValueError(f"{name} already has an attribute {ANCHOR_ATTR!r}")
        module.add_module(ANCHOR_ATTR, anchors)
        site = DERSite(name, module, parent, _layer_index(name), heads, dh, key_kind, anchors)
        site.qmodule = _query_module(model, name, arch, key_kind)
        site.scale = float(getattr(parent, "scaling", None) or getattr(parent, "scale", None) or dh**-0.5)
        sites.append(site)
    handle = DERHandle(model, config, arch, sites)
    for s in sites:
        s.hook = s.module.register_forward_hook(handle._make_hook(s))
        if s.qmodule is not None and s.qmodule is not s.module:
            s.qhook = s.qmodule.register_forward_hook(handle._make_qhook(s))
    if k > n:
        warnings.warn(f"DER: {k} anchors for sequences of {n} tokens", stacklevel=2)
    object.__setattr__(model, HANDLE_ATTR, handle)
    return handle


def get_handle(model: nn.Module) -> DERHandle:
    """The handle of an injected model (raises with a hint otherwise)."""
    h = getattr(model, HANDLE_ATTR, None)
    if h is None:
        raise ValueError("model has no DER handle: call der.attention.inject(model, config) first")
    return h
