r"""``convert``: freeze DER block layouts and swap attention for the block-sparse kernel (Sec. 4, App. G).

``convert(model, sparsity=0.75, block_size=64, mode="static")`` works on a model that went through
:func:`der.attention.inject` (the anchors are needed):

* **static** — per layer one ``(H, nb, nb)`` layout from the per-position soft assignments accumulated
  under ``handle.calibrate()`` (pass ``calib_inputs`` to run them here), see :mod:`der.attention.layouts`;
  shorter inputs use the top-left crop of the layout; longer inputs than calibrated fall back to dense
  (warning + ``handle.dense_fallbacks``);
* **dynamic** — ``(B, H, nb, nb)`` per call, routed through the anchors from the keys the key hooks see.

Static layouts come from one of two rules (``rule=``): ``"anchors"`` (default, the paper's: the anchors'
calibrated soft assignments, :mod:`der.attention.layouts`) or ``"attention"``: the model's own attention
probabilities on the calibration inputs, :math:`S_{ab}` = mean over the valid queries of block ``a`` of
their attention mass on key block ``b`` (rows sum to 1, as the anchor rule's), then the same selection
(:func:`~der.attention.layouts.select_blocks`: diagonal kept, exact budget, ties towards the diagonal).
The attention is computed exactly (post-RoPE queries and keys, the model's masks) by the swapped attention
function during calibration. On the digits ViT (``der exp vit-digits``, 3 seeds) the two rules end level
after fine-tuning (76.4 ± 5.9 vs 76.9 ± 1.4 top-1 at 75%; single seeds differ by up to 9 points either
way), so the paper's rule stays the default (docs/experiments.md).

The swap: HF models that dispatch through ``AttentionInterface`` (BERT/MiniLM, ViT, GPT-2, LLaMA, Mistral,
Phi in transformers ≥ 5) get the attention function ``"der_block_sparse"`` registered in
``AttentionInterface`` and ``AttentionMaskInterface`` (with the SDPA mask builder, so padding and causal
masks arrive exactly as SDPA would see them) and ``model.set_attn_implementation("der_block_sparse")``.
timm ``Attention`` modules (fused ``qkv``, no interface) get their ``forward`` replaced per instance.
Layers not matched by the config keep their previous implementation (listed in ``handle.converted.dense_layers``).

Never silent: whatever cannot run block-sparse — a custom mask that is not key padding (key padding runs
sparse, through the kernel's ``key_padding_mask``), cached
decoding (query length ≠ key length), inputs longer than the calibrated layout — runs the previous dense
implementation, warns once per reason and counts it in ``handle.dense_fallbacks``. Attention dropout is not
applied by the kernel (warned, counted as ``"dropout_ignored"``).
"""

from __future__ import annotations

import contextlib
import types
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from der.attention.config import check_block_args
from der.attention.injection import DERHandle, DERSite, get_handle
from der.attention.kernels import block_sparse_attention
from der.attention.layouts import dynamic_layout, layout_sparsity, num_blocks, select_blocks, static_layout

IMPL_NAME = "der_block_sparse"
RULES = ("anchors", "attention")
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
    layouts: dict[str, torch.Tensor] = field(default_factory=dict)  # site name → (H, nb, nb) (static)
    dense_layers: list[str] = field(default_factory=list)
    hf_models: list[tuple[nn.Module, str]] = field(default_factory=list)  # (model, previous impl)
    timm_modules: list[nn.Module] = field(default_factory=list)
    _undo: list = field(default_factory=list)

    def undo(self) -> None:
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()
        self.handle.keep_keys = False
        self.handle.regularize = True


# --------------------------------------------------------------------------- per-call logic
def _fallback(handle: DERHandle, reason: str) -> None:
    if reason not in handle.dense_fallbacks:
        warnings.warn(f"DER block-sparse attention: running dense because of {reason}", stacklevel=4)
    handle.dense_fallbacks[reason] = handle.dense_fallbacks.get(reason, 0) + 1


def _key_padding(mask: torch.Tensor, n: int, causal: bool) -> torch.Tensor | None:
    """``(B, N)`` bool key mask (True = real token) when ``mask`` is exactly key padding (plus the causal
    triangle when ``causal``) on every real query row, else ``None``. Rows of padded queries are not
    compared: their outputs are padding, and their keys are masked for every real query."""
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if allowed.dim() != 4 or allowed.shape[-2:] != (n, n):
        return None
    kpm = allowed.any(dim=-2).all(dim=1)  # (B, N): a key some query may see
    want = kpm[:, None, None, :].expand_as(allowed)
    if causal:
        want = want & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    real_rows = kpm[:, None, :, None]
    if not bool(((allowed == want) | ~real_rows).all()) or not bool(kpm.any(dim=-1).all()):
        return None
    return kpm


def _mask_is_trivial(mask: torch.Tensor | None, n_q: int, n_k: int, causal: bool) -> bool:
    """True when ``mask`` allows exactly everything (or exactly the causal triangle when ``causal``)."""
    if mask is None:
        return True
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if causal:
        ref = torch.ones(n_q, n_k, dtype=torch.bool, device=mask.device).tril()
        return bool((allowed == ref).all())
    return bool(allowed.all())


def _layout_for(state: ConvertState, site: DERSite, n: int, causal: bool, groups: int) -> torch.Tensor | None:
    bs = state.block_size
    nb = num_blocks(n, bs)
    if state.mode == "static":
        lay = state.layouts[site.name]
        if lay.shape[-1] < nb:
            return None
        lay = lay[:, :nb, :nb].unsqueeze(0)
    else:
        keys, q = site.keys, site.queries
        if keys is None or keys.shape[2] != n:
            return None
        if q is not None and (q.shape[0] != keys.shape[0] or q.shape[2] != n):
            q = None
        h = state.handle
        lay = dynamic_layout(keys, site.anchors.anchors.detach(), bs, state.sparsity, h.alpha,
                             h.config.metric, causal, site.key_mask, queries=q, scale=site.scale,
                             budget=state.budget)
    if groups > 1 and lay.shape[1] == site.heads:
        lay = lay.repeat_interleave(groups, dim=1)  # keys-only routing under GQA: share the kv head's layout
    return lay


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
    kpm = None
    if not _mask_is_trivial(mask, n, n, causal):
        kpm = _key_padding(mask, n, causal)
        if kpm is None:
            _fallback(handle, "a custom attention mask (not key padding)")
            return None
    groups = q.shape[1] // k.shape[1]
    lay = _layout_for(state, site, n, causal, groups)
    if lay is None:
        _fallback(handle, "an input longer than the calibrated layout" if state.mode == "static"
                  else "keys not captured for this call")
        return None
    if dropout and module.training:
        if "dropout_ignored" not in handle.dense_fallbacks:
            warnings.warn("DER block-sparse attention: attention dropout is not applied by the kernel", stacklevel=4)
        handle.dense_fallbacks["dropout_ignored"] = handle.dense_fallbacks.get("dropout_ignored", 0) + 1
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return block_sparse_attention(q, k, v, lay.to(q.device), state.block_size, causal=causal,
                                  backend=state.backend, scale=scaling, key_padding_mask=kpm)


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
    pad = (0, nbk * block_size - nk, 0, nb * block_size - n)
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
            pw = torch.nn.functional.pad(p * w[b, None, :, None].to(p.dtype), pad)
            mass[hs] += pw.view(-1, nb, block_size, nbk, block_size).sum((2, 4), dtype=torch.float64)
    cnt = torch.nn.functional.pad(w.sum(0), (0, nb * block_size - n)).view(nb, block_size).sum(-1)
    old_m, old_c = site.extra.get("attn_mass"), site.extra.get("attn_count")
    if old_m is not None:  # calibration batches of different lengths: grow to the largest
        big, bigk = max(nb, old_m.shape[1]), max(nbk, old_m.shape[2])
        grow = lambda t, r, c: torch.nn.functional.pad(t, (0, c - t.shape[-1], 0, r - t.shape[-2]))  # noqa: E731
        mass = grow(mass, big, bigk) + grow(old_m, big, bigk)
        cnt = torch.nn.functional.pad(cnt, (0, big - nb)) + torch.nn.functional.pad(old_c, (0, big - old_c.shape[0]))
    site.extra["attn_mass"], site.extra["attn_count"] = mass, cnt
    return out


def attention_rule_layout(mass: torch.Tensor, count: torch.Tensor, sparsity: float, causal: bool = False,
                          budget: str = "head") -> torch.Tensor:
    """Static ``(H, nb, nb)`` layout of ``rule="attention"`` from calibration sums: ``mass (H, nb, nb)`` of
    attention probabilities per (query block, key block) over valid queries, ``count (nb,)`` valid queries
    per query block (blocks never seen get a uniform row)."""
    nb = mass.shape[-1]
    if mass.dim() != 3 or mass.shape[1] != nb or count.shape != (nb,):
        raise ValueError(f"mass must be (H, nb, nb) and count (nb,), got {tuple(mass.shape)}, {tuple(count.shape)}")
    c = count.double()[None, :, None]
    scores = torch.where(c > 0, mass.double() / c.clamp_min(1e-12), torch.full_like(mass, 1.0 / nb, dtype=torch.float64))
    return select_blocks(scores, sparsity, causal, budget)


def der_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """HF ``AttentionInterface`` function: block-sparse for converted layers, previous impl otherwise."""
    rec = getattr(module, STATE_ATTR, None)
    prev = getattr(module, "_der_prev_impl", "sdpa")
    if rec is not None:
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


def _swap_hf(state: ConvertState, hf: nn.Module) -> None:
    if not hf._can_set_attn_implementation():
        raise ValueError(f"{type(hf).__name__} does not dispatch through AttentionInterface; no DER swap path")
    _register_hf()
    prev = hf.config._attn_implementation or "sdpa"
    if prev == IMPL_NAME:
        raise ValueError("model is already converted")
    hf.set_attn_implementation(IMPL_NAME)
    state.hf_models.append((hf, prev))
    state._undo.append(lambda: hf.set_attn_implementation(prev))
    for m in hf.modules():  # layers without DER keep the previous implementation
        if hasattr(m, "is_causal") or hasattr(m, "scaling"):
            object.__setattr__(m, "_der_prev_impl", prev)
            state._undo.append(lambda m=m: m.__dict__.pop("_der_prev_impl", None))


def _timm_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """timm ``Attention.forward`` with the SDPA call replaced by the block-sparse kernel.

    Mirrors timm ≥ 1.0 (``qkv`` → reshape → ``q_norm``/``k_norm`` → attention → ``norm`` → ``proj``).
    Not exercised here: timm is not installed on this machine.
    """
    state, site = getattr(self, STATE_ATTR)
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)  # the k_norm hook captures the keys (dynamic mode)
    out = _sparse_call(state, site, self, q, k, v, attn_mask, self.attn_drop.p, self.scale, False)
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


# --------------------------------------------------------------------------- public
def convert(model: nn.Module, sparsity: float | None = None, block_size: int | None = None,
            mode: str | None = None, *, calib_inputs=None, backend: str = "auto",
            layouts: dict[str, torch.Tensor] | None = None, budget: str | None = None,
            rule: str = "anchors") -> DERHandle:
    """Freeze DER layouts and swap in block-sparse attention; returns the (same) handle.

    Args:
        model: a model that went through :func:`der.attention.inject`.
        sparsity / block_size / mode: default to the handle's :class:`DERConfig`.
        calib_inputs: iterable of batches (dict → ``model(**b)``, tensor → ``model(b)``) run under
            ``handle.calibrate()`` before freezing static layouts (else the handle's accumulated stats).
        backend: kernel backend of :func:`block_sparse_attention`.
        layouts: precomputed static layouts ``{site name: (H, nb, nb)}`` (used by ``der.attention.io.load``).
        budget: ``"head"`` | ``"row"`` block budget (default: the config's); see :mod:`der.attention.layouts`.
        rule: static layouts from the anchors' soft assignments (``"anchors"``, the paper's) or from the
            model's own attention on ``calib_inputs`` (``"attention"``; see the module docstring).
    """
    handle = get_handle(model)
    cfg = handle.config
    sparsity = cfg.sparsity if sparsity is None else sparsity
    block_size = cfg.block_size if block_size is None else block_size
    mode = cfg.mode if mode is None else mode
    budget = cfg.budget if budget is None else budget
    check_block_args(block_size, sparsity, mode)
    if budget not in ("head", "row"):
        raise ValueError(f"budget must be 'head' or 'row', got {budget!r}")
    if handle.converted is not None:
        raise ValueError("model is already converted; call handle.converted.undo() first")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "attention" and (mode != "static" or (calib_inputs is None and layouts is None)):
        raise ValueError('rule="attention" builds static layouts from calib_inputs: pass mode="static" and calib_inputs=...')
    state = ConvertState(handle, float(sparsity), int(block_size), mode, backend, budget, rule)
    if mode == "static" and (rule == "anchors" or layouts is not None):
        if layouts is None and calib_inputs is not None:
            _calibrate(model, handle, calib_inputs)
        for s in handle.sites:
            if layouts is not None:
                state.layouts[s.name] = layouts[s.name].bool()
                continue
            if s.stats_mass is None:
                raise ValueError("static layouts need calibration: pass calib_inputs=..., or run forwards "
                                 "inside `with handle.calibrate():` before convert")
            causal = bool(getattr(s.attention, "is_causal", False))
            state.layouts[s.name] = static_layout(s.stats_mass, s.stats_count, block_size, sparsity, causal,
                                                  route=s.stats_route, budget=budget)
    site_by_attn = {id(s.attention): s for s in handle.sites}
    hf = _hf_models(model)
    timm_sites = [s for s in handle.sites if type(s.attention).__module__.startswith("timm.")]
    if not hf and not timm_sites:
        raise ValueError(f"no attention swap path for {type(model).__name__}: need a transformers model "
                         "using AttentionInterface or timm Attention modules")
    for s in handle.sites:
        object.__setattr__(s.attention, STATE_ATTR, (state, s))
        state._undo.append(lambda m=s.attention: m.__dict__.pop(STATE_ATTR, None))
    for m in hf:
        _swap_hf(state, m)
    for s in timm_sites:
        _swap_timm(state, s)
    state.dense_layers = [n for n, m in model.named_modules()
                          if "_der_prev_impl" in m.__dict__ and id(m) not in site_by_attn]
    if rule == "attention" and layouts is None:
        _calibrate_attention(model, state, calib_inputs)
    handle.keep_keys = mode == "dynamic"
    handle.regularize = False
    handle.converted = state
    return handle


def revert(model: nn.Module) -> DERHandle:
    """Undo ``convert`` only (anchors and hooks stay; the handle regularizes again)."""
    handle = get_handle(model)
    if handle.converted is None:
        raise ValueError("model is not converted")
    handle.converted.undo()
    handle.converted = None
    handle.dense_fallbacks.clear()
    return handle


def _calibrate(model: nn.Module, handle: DERHandle, batches, stats: bool = True) -> None:
    """Run ``batches`` in eval mode without grad (``stats``: inside ``handle.calibrate()``)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), (handle.calibrate() if stats else contextlib.nullcontext()):
            for b in batches:
                model(**b) if isinstance(b, dict) else model(b)
    finally:
        model.train(was)


def _calibrate_attention(model: nn.Module, state: ConvertState, batches) -> None:
    """``rule="attention"``: run ``batches`` through the swapped attention in collect mode, then freeze."""
    for s in state.handle.sites:
        s.extra.pop("attn_mass", None)
        s.extra.pop("attn_count", None)
    state.collecting = True
    try:
        _calibrate(model, state.handle, batches, stats=False)
    except BaseException:
        state.undo()
        raise
    finally:
        state.collecting = False
    for s in state.handle.sites:
        if "attn_mass" not in s.extra:
            state.undo()
            raise ValueError(f"no attention reached {s.name} during calibration (did calib_inputs run the model?)")
        causal = bool(getattr(s.attention, "is_causal", False))
        state.layouts[s.name] = attention_rule_layout(s.extra.pop("attn_mass"), s.extra.pop("attn_count"),
                                                      state.sparsity, causal, state.budget)


def summary(handle: DERHandle) -> dict:
    """Achieved block sparsity per converted layer (static mode) and the fallback counters."""
    st = handle.converted
    if st is None:
        raise ValueError("model is not converted")
    out = {"mode": st.mode, "block_size": st.block_size, "target_sparsity": st.sparsity,
           "dense_layers": list(st.dense_layers), "dense_fallbacks": dict(handle.dense_fallbacks)}
    if st.mode == "static":
        out["layout_sparsity"] = {
            n: layout_sparsity(lay, bool(getattr(s.attention, "is_causal", False)))
            for s in handle.sites for n, lay in [(s.name, st.layouts[s.name])]
        }
    return out
