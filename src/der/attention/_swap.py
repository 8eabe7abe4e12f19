"""The attention swap of ``convert``: the per-call block-sparse logic and how it is installed.

HF models that dispatch through ``AttentionInterface`` get the attention function ``"der_block_sparse"``
(registered with the SDPA mask builder, so padding and causal masks arrive exactly as SDPA would see them);
timm ``Attention`` modules get their ``forward`` replaced per instance. Whatever cannot run block-sparse runs
the previous dense implementation and is counted in ``handle.dense_fallbacks`` (never silent).
"""

from __future__ import annotations

import copy
import types
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from der.attention.baselines import moba_layout
from der.attention.injection import DERHandle, DERSite
from der.attention.kernels import block_sparse_attention
from der.attention.layout import BlockLayout, block_mass, num_blocks
from der.attention.rules import dynamic_layout, reselect, valid_blocks

__all__ = ["ConvertState", "IMPL_NAME", "STATE_ATTR", "der_attention_forward", "install", "COLLECT_CHUNK_BYTES",
           "MIN_SKIPPED_BLOCKS", "AUTO_MIN_SEQ_LEN", "resolve_min_seq_len"]

IMPL_NAME = "der_block_sparse"
STATE_ATTR = "_der_convert"


@dataclass
class ConvertState:
    """What ``convert`` changed (``handle.converted``)."""

    handle: DERHandle
    sparsity: float
    block_size: int
    mode: str
    backend: str
    budget: str = "head"
    rule: str = "anchors"
    collecting: bool = False  # rule="attention" calibration: dense attention, block masses accumulated
    layouts: dict[str, BlockLayout] = field(default_factory=dict)  # site name → (1, H, nb, nb) (static)
    distill: dict[str, float] = field(default_factory=dict)  # layer-term weights (der.attention.distill)
    bypass: bool = False  # run the previous dense attention, uncounted (der.attention.distill.dense)
    dense_layers: list[str] = field(default_factory=list)
    hf_models: list[tuple[nn.Module, str]] = field(default_factory=list)  # (model, previous impl)
    timm_modules: list[nn.Module] = field(default_factory=list)
    min_seq_len: int = 0  # shorter inputs run dense (resolved from convert's min_seq_len)
    _undo: list = field(default_factory=list, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)  # per-call caches (mask check, re-selected layouts)

    def restore(self) -> None:
        """Put back everything the swap changed (called by ``revert``; idempotent)."""
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()

    def distill_loss(self) -> torch.Tensor:
        """Σ weight · layer term over the converted layers that ran in the last forward (mean over layers);
        a zero tensor when no term is enabled or recorded."""
        parts = []
        for s in self.handle.sites:
            terms = s.extra.get("distill_terms")
            if terms:
                parts.append(sum(self.distill[name] * val for name, val in terms.items()))
        if not parts:
            ref = next((p for p in self.handle.model.parameters()), None)
            return torch.zeros((), device=None if ref is None else ref.device)
        return torch.stack(parts).mean()

    def last_terms(self) -> dict[str, float]:
        """Each layer term of the last forward, unweighted, mean over the layers that recorded it."""
        acc: dict[str, list[float]] = {}
        for s in self.handle.sites:
            for name, val in (s.extra.get("distill_terms") or {}).items():
                acc.setdefault(name, []).append(float(val.detach()))
        return {name: sum(v) / len(v) for name, v in acc.items()}

    def settings(self) -> dict:
        """The conversion arguments (JSON-able)."""
        return {"sparsity": self.sparsity, "block_size": self.block_size, "mode": self.mode,
                "backend": self.backend, "budget": self.budget, "rule": self.rule, "min_seq_len": self.min_seq_len}

    def __repr__(self) -> str:
        s = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"ConvertState({s}, layers={len(self.handle.sites)}, dense_layers={len(self.dense_layers)})"


# --------------------------------------------------------------------------- per-call logic
# A call runs dense when its layout would skip fewer key blocks than this per query block on average: the
# kernel's fixed costs (plan, gathers, chunked matmuls) are not paid back by so little skipped work.
MIN_SKIPPED_BLOCKS = 2.0
# min_seq_len="auto": shorter inputs run dense. The end-to-end break-even length on CPU (MiniLM, blocks of
# 16 and 32: benchmarks/results/end_to_end_breakeven.json, docs/speed.md): below it attention is too small a
# share of the model for the converted one to be measurably faster.
AUTO_MIN_SEQ_LEN = 256
_LRU = 16  # re-selected layouts kept per converted model (padded batches: one per padding pattern)


def resolve_min_seq_len(min_seq_len: int | str, block_size: int) -> int:
    """``min_seq_len`` as tokens: an int ≥ 0 as given, ``"auto"`` → ``max(AUTO_MIN_SEQ_LEN, 2 · block_size)``."""
    if min_seq_len == "auto":
        return max(AUTO_MIN_SEQ_LEN, 2 * block_size)
    if isinstance(min_seq_len, bool) or not isinstance(min_seq_len, int) or min_seq_len < 0:
        raise ValueError(f"min_seq_len must be an int ≥ 0 or 'auto', got {min_seq_len!r}")
    return min_seq_len


def _fallback(handle: DERHandle, reason: str) -> None:
    if reason not in handle.dense_fallbacks:
        warnings.warn(f"DER block-sparse attention: running dense because of {reason}", stacklevel=4)
    handle.dense_fallbacks[reason] = handle.dense_fallbacks.get(reason, 0) + 1


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _tril(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def _key_padding(mask: torch.Tensor, n: int, causal: bool) -> torch.Tensor | None:
    """``(B, N)`` bool key mask (True = real token) when ``mask`` is exactly key padding (plus the causal
    triangle when ``causal``) on every real query row, else ``None``. Rows of padded queries are not
    compared: their outputs are padding, and their keys are masked for every real query."""
    allowed = _allowed(mask)
    if allowed.dim() != 4 or allowed.shape[-2:] != (n, n):
        return None
    kpm = allowed.any(dim=-2).all(dim=1)  # (B, N): a key some query may see
    want = kpm[:, None, None, :].expand_as(allowed)
    if causal:
        want = want & _tril(n, mask.device)
    real_rows = kpm[:, None, :, None]
    if not bool(((allowed == want) | ~real_rows).all()) or not bool(kpm.any(dim=-1).all()):
        return None
    return kpm


def _mask_is_trivial(mask: torch.Tensor | None, n_q: int, n_k: int, causal: bool) -> bool:
    """True when ``mask`` allows exactly everything (or exactly the causal triangle when ``causal``)."""
    if mask is None:
        return True
    allowed = _allowed(mask)
    if causal:
        ref = torch.ones(n_q, n_k, dtype=torch.bool, device=mask.device).tril()
        return bool((allowed == ref).all())
    return bool(allowed.all())


def _padding(state: ConvertState, mask: torch.Tensor | None, n: int, causal: bool
             ) -> tuple[bool, torch.Tensor | None]:
    """``(ok, kpm)``: ``ok`` when ``mask`` is nothing, or exactly key padding (``kpm (B, N)``; None when no
    key is padded). HF builds one mask per forward and passes it to every layer: the check (``O(B·N²)``)
    runs once per mask object, not once per layer."""
    if mask is None:
        return True, None
    memo = state._memo
    key = (mask.data_ptr(), tuple(mask.shape), mask.dtype, n, causal)
    ref = memo.get("mask")
    if ref is not None and ref[0]() is mask and ref[1] == key:
        return memo["padding"]
    if _mask_is_trivial(mask, n, n, causal):
        res = (True, None)
    else:
        kpm = _key_padding(mask, n, causal)
        res = (kpm is not None, kpm)
        if kpm is not None and bool(kpm.all()):
            res = (True, None)
    memo["mask"], memo["padding"] = (weakref.ref(mask), key), res
    return res


def _real_blocks(kpm: torch.Tensor | None, block_size: int) -> torch.Tensor | None:
    """``(B, nb)`` blocks holding a real token, or None when every block does (nothing to skip)."""
    if kpm is None:
        return None
    vb = valid_blocks(kpm, block_size)
    return None if bool(vb.all()) else vb


def _skipped_per_row(lay: BlockLayout) -> float:
    """Mean number of valid key blocks a layout drops per query block (cached on the layout)."""
    def build() -> float:
        nv = lay.valid_blocks()
        return float((nv.sum() * lay.batch * lay.heads - lay.kept_blocks().sum()) / (lay.batch * lay.heads * nv.shape[0]))
    return lay.derived("skipped_per_row", build)


def _static_layout(state: ConvertState, site: DERSite, n: int, causal: bool, real: torch.Tensor | None
                   ) -> BlockLayout | None:
    """The calibrated layout for ``n`` tokens: as is, re-selected at the same budget from its block scores
    for fewer blocks or padded sequences (``real``: ``(B, nb)``), or cropped when it has no scores."""
    bs = state.block_size
    lay = state.layouts[site.name]
    nb = num_blocks(n, bs)
    if lay.n_blocks[0] < nb:
        return None
    if lay.causal != causal:
        lay = lay.derived(("causal", causal), lambda lay=lay: BlockLayout(lay.mask, bs, lay.q_len, causal, lay.scores))
    if lay.scores is None or (real is None and nb == lay.n_blocks[0]):
        return lay.resize(n)
    if real is None:
        return lay.derived(("reselect", n, state.sparsity, state.budget),
                           lambda: reselect(lay, state.sparsity, state.budget, n))
    cache = state._memo.setdefault("reselect", OrderedDict())
    key = (site.name, n, causal, tuple(real.shape), real.cpu().numpy().tobytes())
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    out = cache[key] = reselect(lay, state.sparsity, state.budget, n, real)
    if len(cache) > _LRU * max(1, len(state.handle.sites)):
        cache.popitem(last=False)
    return out


def _layout_for(state: ConvertState, site: DERSite, n: int, causal: bool, groups: int,
                device: torch.device, q: torch.Tensor, k: torch.Tensor, kpm: torch.Tensor | None
                ) -> BlockLayout | None:
    """The layout of this call: the static one for ``n`` tokens (:func:`_static_layout`), or a fresh dynamic
    one (through the anchors, or ``rule="moba"``: from this call's own queries and keys), over the real
    blocks of a padded batch."""
    bs = state.block_size
    if state.rule == "moba":
        return moba_layout(q, k, bs, state.sparsity, causal, kpm, state.budget)
    if state.mode == "static":
        lay = _static_layout(state, site, n, causal, _real_blocks(kpm, bs))
        if lay is None:
            return None
    else:
        keys, q = site.keys, site.queries
        if keys is None or keys.shape[2] != n:
            return None
        if q is not None and (q.shape[0] != keys.shape[0] or q.shape[2] != n):
            q = None
        h = state.handle
        lay = dynamic_layout(keys, site.anchors.anchors.detach(), bs, state.sparsity, h.alpha,
                             h.config.metric, causal, kpm if kpm is not None else site.key_mask, queries=q,
                             scale=site.scale, budget=state.budget)
    if groups > 1 and lay.heads == site.heads:
        lay = lay.repeat_heads(groups)  # keys-only routing under GQA: share the kv head's layout
    return lay.to(device)


def _cannot_win(state: ConvertState, n: int, causal: bool) -> str | None:
    """Why a call of ``n`` tokens runs dense before any layout work, or None (shape checks only;
    ``min_seq_len=0`` keeps only the hard limit of one block)."""
    bs = state.block_size
    if n < bs:
        return "an input shorter than one block"
    if state.min_seq_len == 0:
        return None
    if n < state.min_seq_len:
        return f"an input shorter than min_seq_len={state.min_seq_len}"
    nb = num_blocks(n, bs)
    per_row = (nb + 1) / 2 if causal else nb  # valid key blocks per query block
    if state.sparsity * per_row < MIN_SKIPPED_BLOCKS:
        return f"too few key blocks skipped (< {MIN_SKIPPED_BLOCKS:g} per query block)"
    return None


def _sparse_call(state: ConvertState, site: DERSite, module: nn.Module, q, k, v, mask, dropout, scaling,
                 causal: bool):
    """Block-sparse attention ``(B, H, N, Dh)`` or ``None`` when it must fall back (reason recorded)."""
    handle = state.handle
    if state.collecting:
        return _collect_call(site, q, k, v, mask, scaling, causal, state.block_size)
    n = q.shape[2]
    if k.shape[2] != n:
        _fallback(handle, "query length ≠ key length (cached decoding)")
        return None
    why = _cannot_win(state, n, causal)
    if why is not None:
        _fallback(handle, why)
        return None
    ok, kpm = _padding(state, mask, n, causal)
    if not ok:
        _fallback(handle, "a custom attention mask (not key padding)")
        return None
    groups = q.shape[1] // k.shape[1]
    lay = _layout_for(state, site, n, causal, groups, q.device, q, k, kpm)
    if lay is None:
        _fallback(handle, "an input longer than the calibrated layout" if state.mode == "static"
                  else "keys not captured for this call")
        return None
    if state.mode == "static" and state.min_seq_len and _skipped_per_row(lay) < MIN_SKIPPED_BLOCKS:
        _fallback(handle, f"too few key blocks skipped (< {MIN_SKIPPED_BLOCKS:g} per query block)")
        return None
    site.extra["last_layout"] = (lay, kpm)  # what this call computes (metrics.real_density, recall reports)
    if dropout and module.training:
        if "dropout_ignored" not in handle.dense_fallbacks:
            warnings.warn("DER block-sparse attention: attention dropout is not applied by the kernel", stacklevel=4)
        handle.dense_fallbacks["dropout_ignored"] = handle.dense_fallbacks.get("dropout_ignored", 0) + 1
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = block_sparse_attention(q, k, v, lay, backend=state.backend, scale=scaling, key_padding_mask=kpm)
    if state.distill and torch.is_grad_enabled():
        _record_distill(state, site, q, k, lay, mask, scaling, causal)
    return out


def _record_distill(state: ConvertState, site: DERSite, q, k, lay: BlockLayout, mask, scaling,
                    causal: bool) -> None:
    """Layer terms of this call into ``site.extra["distill_terms"]`` (see :mod:`der.attention.distill`)."""
    from der.attention.distill import layer_terms

    weights = {name: w for name, w in state.distill.items() if w > 0}
    if not weights:
        return
    valid = site.key_mask
    if valid is not None and tuple(valid.shape) != (q.shape[0], q.shape[2]):
        valid = None
    site.extra["distill_terms"] = layer_terms(q, k, lay, mask, scaling, causal, valid, weights)


# bytes of one score chunk in rule="attention" calibration (a (heads, N, N) float32 slice per sequence)
COLLECT_CHUNK_BYTES = 64 << 20


def _collect_call(site: DERSite, q, k, v, mask, scaling, causal: bool, block_size: int) -> torch.Tensor:
    """``rule="attention"`` calibration: exact dense attention ``(B, H, N, Dh)`` whose probabilities are
    summed per (head, query block, key block) over the valid queries into ``site.extra``. Scores are
    formed one sequence and a few heads at a time (at most ``COLLECT_CHUNK_BYTES``), never ``B·H·N²``."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    B, H, n, _ = q.shape
    nk = k.shape[2]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    real = None if mask is None or n != nk else _key_padding(mask, n, causal)
    w = torch.ones(B, n, dtype=torch.float64, device=q.device) if real is None else real.double()
    nb, nbk = num_blocks(n, block_size), num_blocks(nk, block_size)
    tri = torch.ones(n, nk, dtype=torch.bool, device=q.device).triu(nk - n + 1) if causal else None
    hc = max(1, COLLECT_CHUNK_BYTES // (4 * n * nk))
    out = torch.empty(B, H, n, v.shape[-1], dtype=q.dtype, device=q.device)
    mass = torch.zeros(H, nb, nbk, dtype=torch.float64, device=q.device)
    for b in range(B):
        for h0 in range(0, H, hc):
            hs = slice(h0, min(H, h0 + hc))
            sc = (q[b, hs].float() @ k[b, hs].float().transpose(-1, -2)) * scale
            if mask is not None:
                m = mask[b] if mask.shape[1] == 1 else mask[b, hs]
                sc = sc.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else sc + m.float()
            if tri is not None:
                sc = sc.masked_fill(tri, float("-inf"))
            p = torch.softmax(sc, -1).nan_to_num(0.0)  # a query with no allowed key has no mass
            out[b, hs] = (p.to(v.dtype) @ v[b, hs]).to(q.dtype)
            mass[hs] += block_mass(p, block_size, query_weight=w[b])
    cnt = torch.nn.functional.pad(w.sum(0), (0, nb * block_size - n)).view(nb, block_size).sum(-1)
    old_m, old_c = site.extra.get("attn_mass"), site.extra.get("attn_count")
    if old_m is not None:  # calibration batches of different lengths: grow to the largest
        big, bigk = max(nb, old_m.shape[1]), max(nbk, old_m.shape[2])
        grow = lambda t, r, c: torch.nn.functional.pad(t, (0, c - t.shape[-1], 0, r - t.shape[-2]))  # noqa: E731
        mass = grow(mass, big, bigk) + grow(old_m, big, bigk)
        cnt = torch.nn.functional.pad(cnt, (0, big - nb)) + torch.nn.functional.pad(old_c, (0, big - old_c.shape[0]))
    site.extra["attn_mass"], site.extra["attn_count"] = mass, cnt
    site.extra["attn_len"] = max(n, site.extra.get("attn_len", 0))
    return out


def der_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """HF ``AttentionInterface`` function: block-sparse for converted layers, previous impl otherwise."""
    rec = getattr(module, STATE_ATTR, None)
    prev = getattr(module, "_der_prev_impl", "sdpa")
    if rec is not None and not rec[0].bypass:
        state, site = rec
        causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", False))
        out = _sparse_call(state, site, module, query, key, value, attention_mask, dropout, scaling, causal)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = ALL_ATTENTION_FUNCTIONS[prev] if prev != "eager" else _eager_module_fn(module)
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
              **({"is_causal": is_causal} if is_causal is not None else {}), **kwargs)


def _eager_module_fn(module: nn.Module):
    mod = __import__(type(module).__module__, fromlist=["eager_attention_forward"])
    return mod.eager_attention_forward


# --------------------------------------------------------------------------- swaps
def _hf_models(model: nn.Module) -> list[nn.Module]:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is an optional extra
        return []
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and id(m.config) not in seen:
            seen.add(id(m.config))
            out.append(m)
    return out


def _register_hf() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(IMPL_NAME, der_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPL_NAME, sdpa_mask)


def _is_attention(m: nn.Module) -> bool:
    """An HF attention module (``is_causal`` / a float ``scaling``), not a PEFT wrapper of a projection
    (LoRA layers carry a ``scaling`` dict and a ``base_layer``)."""
    if hasattr(m, "base_layer"):
        return False
    return hasattr(m, "is_causal") or isinstance(getattr(m, "scaling", None), float)


def _own_config(state: ConvertState, hf: nn.Module) -> None:
    """Give ``hf`` (and every submodule reading the same config objects) a private copy of its config, so
    setting the attention implementation never reaches another model built from the same config object.
    The original objects are put back on undo."""
    from transformers import PretrainedConfig

    memo: dict[int, object] = {}
    copy.deepcopy(hf.config, memo)
    for m in hf.modules():
        old = m.__dict__.get("config")
        if isinstance(old, PretrainedConfig) and isinstance(memo.get(id(old)), PretrainedConfig):
            m.__dict__["config"] = memo[id(old)]
            state._undo.append(lambda m=m, old=old: m.__dict__.__setitem__("config", old))


def _swap_hf(state: ConvertState, hf: nn.Module) -> None:
    if not hf._can_set_attn_implementation():
        raise ValueError(f"{type(hf).__name__} does not dispatch through AttentionInterface; no DER swap path")
    _register_hf()
    prev = hf.config._attn_implementation or "sdpa"
    if prev == IMPL_NAME:  # built from the config of a converted model: it never ran block-sparse itself
        warnings.warn(f"{type(hf).__name__}.config says {IMPL_NAME!r} but this model is not converted (it was "
                      "built from a converted model's config); treating its attention as 'sdpa'", stacklevel=4)
        prev = "sdpa"
    _own_config(state, hf)
    hf.set_attn_implementation(IMPL_NAME)
    state.hf_models.append((hf, prev))
    state._undo.append(lambda: hf.set_attn_implementation(prev))
    for m in hf.modules():  # layers without DER keep the previous implementation
        if _is_attention(m):
            object.__setattr__(m, "_der_prev_impl", prev)
            state._undo.append(lambda m=m: m.__dict__.pop("_der_prev_impl", None))


def _timm_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """timm ``Attention.forward`` with the SDPA call replaced by the block-sparse kernel.

    Mirrors timm ≥ 1.0 (``qkv`` → reshape → ``q_norm``/``k_norm`` → attention → ``norm`` → ``proj``).
    timm is not a test dependency, so this path has no test of its own.
    """
    state, site = getattr(self, STATE_ATTR)
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)  # the k_norm hook captures the keys (dynamic mode)
    out = None if state.bypass else _sparse_call(state, site, self, q, k, v, attn_mask, self.attn_drop.p,
                                                 self.scale, False)
    if out is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0)
    x = out.transpose(1, 2).reshape(B, N, C)
    x = getattr(self, "norm", nn.Identity())(x)
    return self.proj_drop(self.proj(x))


def _swap_timm(state: ConvertState, site: DERSite) -> None:
    mod = site.attention
    mod.forward = types.MethodType(_timm_forward, mod)
    state.timm_modules.append(mod)
    state._undo.append(lambda: mod.__dict__.pop("forward", None))


def install(state: ConvertState, model: nn.Module) -> None:
    """Swap the attention of every matched layer of ``model`` (HF ``AttentionInterface`` or timm); the undo
    steps are recorded in ``state`` (:meth:`ConvertState.restore`)."""
    handle = state.handle
    hf = _hf_models(model)
    timm_sites = [s for s in handle.sites if type(s.attention).__module__.startswith("timm.")]
    if not hf and not timm_sites:
        raise ValueError(f"no attention swap path for {type(model).__name__}: need a transformers model "
                         "using AttentionInterface or timm Attention modules")
    try:
        for s in handle.sites:
            object.__setattr__(s.attention, STATE_ATTR, (state, s))
            state._undo.append(lambda m=s.attention: m.__dict__.pop(STATE_ATTR, None))
        for m in hf:
            _swap_hf(state, m)
        for s in timm_sites:
            _swap_timm(state, s)
    except BaseException:
        state.restore()
        raise
    site_ids = {id(s.attention) for s in handle.sites}
    state.dense_layers = [n for n, m in model.named_modules()
                          if "_der_prev_impl" in m.__dict__ and id(m) not in site_ids]
