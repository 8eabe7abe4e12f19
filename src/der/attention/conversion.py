r"""``convert``: freeze DER block layouts and swap attention for the block-sparse kernel (Sec. 4, App. G).

``convert(model, sparsity=0.75, block_size=64, mode="static")`` works on a model that went through
:func:`der.attention.inject` (the anchors are needed):

* **static** — per layer one :class:`~der.attention.layout.BlockLayout` ``(1, H, nb, nb)`` from the per-position soft assignments accumulated
  under ``handle.calibrate()`` (pass ``calib_inputs`` to run them here), see :mod:`der.attention.rules`;
  shorter inputs use the top-left crop of the layout; longer inputs than calibrated fall back to dense
  (warning + ``handle.dense_fallbacks``);
* **dynamic** — ``(B, H, nb, nb)`` per call, routed through the anchors from the keys the key hooks see.

Static layouts come from one of two rules (``rule=``): ``"anchors"`` (default, the paper's: the anchors'
calibrated soft assignments, :mod:`der.attention.rules`) or ``"attention"``: the model's own attention
probabilities on the calibration inputs, :math:`S_{ab}` = mean over the valid queries of block ``a`` of
their attention mass on key block ``b`` (rows sum to 1, as the anchor rule's), then the same selection
(:func:`~der.attention.rules.select_blocks`: diagonal kept, exact budget, ties towards the diagonal).
The attention is computed exactly (post-RoPE queries and keys, the model's masks) by the swapped attention
function during calibration. The paper's rule is the default; docs/experiments.md compares the two.

The swap: HF models that dispatch through ``AttentionInterface`` (BERT/MiniLM, ViT, GPT-2, LLaMA, Mistral,
Phi in transformers ≥ 5) get the attention function ``"der_block_sparse"`` registered in
``AttentionInterface`` and ``AttentionMaskInterface`` (with the SDPA mask builder, so padding and causal
masks arrive exactly as SDPA would see them) and ``model.set_attn_implementation("der_block_sparse")``.
timm ``Attention`` modules (fused ``qkv``, no interface) get their ``forward`` replaced per instance.
Layers not matched by the config keep their previous implementation (listed in ``handle.converted.dense_layers``).

Lifecycle: ``convert`` and :func:`revert` are the one pair that installs and undoes the swap
(``handle.remove()`` reverts first); ``DERHandle.state_dict()`` holds the conversion (settings and
layouts) so a checkpoint restores it with ``handle.load_state_dict``.

Never silent: whatever cannot run block-sparse — a custom mask that is not key padding (key padding runs
sparse, through the kernel's ``key_padding_mask``), cached decoding (query length ≠ key length), inputs longer than the calibrated layout — runs the previous dense
implementation, warns once per reason and counts it in ``handle.dense_fallbacks``. Attention dropout is not
applied by the kernel (warned, counted as ``"dropout_ignored"``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from der.attention._swap import ConvertState, install, resolve_min_seq_len
from der.attention.baselines import bigbird_layout
from der.attention.config import BUDGETS, RULES, Budget, Mode, Rule, check_block_args, infer_seq_len
from der.attention.injection import DERHandle, get_handle
from der.attention.kernels import Backend, resolve_backend
from der.attention.layout import BlockLayout, as_layout
from der.attention.rules import attention_rule_layout, select_blocks, static_layout

__all__ = ["convert", "revert", "resolve_rule", "summary", "ConvertState"]

_STATE_FORMAT = "der.attention.conversion/1"


def convert(model: nn.Module, sparsity: float | None = None, block_size: int | None = None,
            mode: Mode | None = None, *, calib_inputs=None, backend: Backend = "auto",
            layouts: dict[str, BlockLayout] | None = None, budget: Budget | None = None,
            rule: Rule = "auto", min_seq_len: int | str = "auto") -> DERHandle:
    """Freeze DER layouts and swap in block-sparse attention; returns the (same) handle.

    Args:
        model: a model that went through :func:`der.attention.inject`.
        sparsity / block_size / mode: default to the handle's :class:`DERConfig`.
        calib_inputs: iterable of batches (dict → ``model(**b)``, tensor → ``model(b)``) run under
            ``handle.calibrate()`` before freezing static layouts (else the handle's accumulated stats).
        backend: kernel backend of :func:`block_sparse_attention`.
        layouts: precomputed static layouts ``{site name: BlockLayout}`` (e.g. from a saved handle).
        budget: ``"head"`` | ``"row"`` block budget (default: the config's); see :mod:`der.attention.rules`.
        rule: layouts from the anchors' soft assignments (``"anchors"``, the paper's; static or dynamic),
            from the model's own attention on ``calib_inputs`` (``"attention"``, static; see the module
            docstring), BigBird's global + window + random blocks (``"bigbird"``, static, training-free:
            :func:`~der.attention.baselines.bigbird_layout` over ``DERConfig.seq_len`` tokens, seeded by
            ``DERConfig.seed``), or training-free per input from mean-pooled query/key blocks (``"moba"``,
            dynamic: :func:`~der.attention.baselines.moba_layout`; the anchors are not used). ``"auto"``
            (default): the rule that kept quality best in the project's measurements (docs/quality.md) among
            those the arguments allow — static: ``"attention"`` with ``calib_inputs``, else ``"bigbird"``;
            dynamic: ``"moba"`` (see :func:`resolve_rule`).
        min_seq_len: inputs shorter than this many tokens run the previous dense attention (warned once,
            counted in ``handle.dense_fallbacks``); ``"auto"``: the break-even length measured by
            ``der bench end-to-end --breakeven`` (``der.attention._swap.AUTO_MIN_SEQ_LEN`` tokens, at least two
            blocks; docs/speed.md);
            ``0``: always block-sparse where possible (also where fewer than
            ``MIN_SKIPPED_BLOCKS`` key blocks per query block are skipped, which otherwise runs dense).

    Undo with :func:`revert`.
    """
    handle = get_handle(model)
    cfg = handle.config
    sparsity = cfg.sparsity if sparsity is None else sparsity
    block_size = cfg.block_size if block_size is None else block_size
    mode = cfg.mode if mode is None else mode
    budget = cfg.budget if budget is None else budget
    check_block_args(block_size, sparsity, mode)
    backend = resolve_backend(backend)
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if handle.converted is not None:
        raise ValueError("model is already converted; call der.attention.revert(model) first")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    rule = resolve_rule(rule, mode, calib_inputs is not None, layouts is not None, handle)
    if rule == "bigbird" and mode != "static":
        raise ValueError('rule="bigbird" is a fixed layout: pass mode="static"')
    if rule == "moba" and mode != "dynamic":
        raise ValueError('rule="moba" routes every input by its own queries and keys: pass mode="dynamic"')
    if rule == "attention" and (mode != "static" or (calib_inputs is None and layouts is None)):
        raise ValueError('rule="attention" builds static layouts from calib_inputs: pass mode="static" and calib_inputs=...')
    state = ConvertState(handle, float(sparsity), int(block_size), mode, backend, budget, rule,
                         min_seq_len=resolve_min_seq_len(min_seq_len, int(block_size)))
    if layouts is not None and mode != "static":
        raise ValueError(f"layouts are static; mode={mode!r} builds its layouts per input")
    if layouts is not None:
        missing = sorted({s.name for s in handle.sites} - set(layouts))
        if missing:
            raise ValueError(f"layouts lack the converted layers {missing}")
        for s in handle.sites:
            lay = as_layout(layouts[s.name], f"layouts[{s.name!r}]")
            if lay.block_size != block_size:
                raise ValueError(f"layouts[{s.name!r}] has block_size={lay.block_size}, convert uses {block_size}")
            state.layouts[s.name] = lay
    elif mode == "static" and rule == "bigbird":
        n = handle.config.seq_len or infer_seq_len(model)
        for i, s in enumerate(handle.sites):
            causal = bool(getattr(s.attention, "is_causal", False))
            sc = bigbird_layout(n, block_size, s.heads, sparsity, seed=handle.config.seed + i, causal=causal).scores
            # re-selected from its own ranking at the exact budget of the other rules (causal rows included)
            state.layouts[s.name] = BlockLayout(select_blocks(sc, sparsity, causal, budget), block_size, n, causal, sc)
    elif mode == "static" and rule == "anchors":
        if calib_inputs is not None:
            _calibrate(model, handle, calib_inputs)
        for s in handle.sites:
            if s.stats_mass is None:
                raise ValueError("static layouts need calibration: pass calib_inputs=..., or run forwards "
                                 "inside `with handle.calibrate():` before convert")
            causal = bool(getattr(s.attention, "is_causal", False))
            state.layouts[s.name] = static_layout(s.stats_mass, s.stats_count, block_size, sparsity, causal,
                                                  route=s.stats_route, budget=budget)
    install(state, model)
    if rule == "attention" and layouts is None:
        _calibrate_attention(model, state, calib_inputs)
    if layouts is None:
        _warn_unreachable(state)
    handle.keep_keys = mode == "dynamic" and rule != "moba"  # moba reads q, k at the attention call
    handle.regularize = False
    handle.converted = state
    return handle


def resolve_rule(rule: Rule, mode: Mode, has_calib: bool, has_layouts: bool = False,
                 handle: DERHandle | None = None) -> Rule:
    """The rule ``convert(rule="auto")`` uses (any other rule is returned as is).

    Follows the measured ranking (``der exp minilm-distill``, docs/quality.md): the model's own calibrated
    attention, then BigBird, were the best static layouts at equal budget and the anchor rule worse than
    both; per input, MoBA's pooled-block routing beat routing through the anchors. Given ``layouts`` the rule
    only labels them (``"auto"`` stays). A handle with DER calibration statistics but no ``calib_inputs``
    gets ``"bigbird"`` with a warning naming ``rule="anchors"``.
    """
    if rule != "auto" or has_layouts:
        return rule
    if mode == "dynamic":
        return "moba"
    if has_calib:
        return "attention"
    if handle is not None and any(s.stats_mass is not None for s in handle.sites):
        warnings.warn('convert(rule="auto") without calib_inputs uses BigBird layouts, which kept quality better '
                      'than the anchor rule (docs/quality.md); the DER calibration statistics are unused — pass '
                      'rule="anchors" to build layouts from them', stacklevel=3)
    return "bigbird"


def _warn_unreachable(state: ConvertState) -> None:
    """Warn once when the static layouts are denser than asked beyond rounding to whole blocks: every head
    keeps at least its diagonal blocks (:func:`~der.attention.rules.select_blocks`), so with ``nb`` blocks
    the sparsity is at most ``1 - nb / valid blocks`` (0.875 for 8 blocks, non-causal)."""
    lays = list(state.layouts.values())
    if not lays:
        return
    got = [lay.sparsity() for lay in lays]
    unit = min(lay.n_blocks[1] if state.budget == "row" else int(lay.valid_blocks().sum()) for lay in lays)
    if state.sparsity - min(got) > 0.5 / max(unit, 1) + 1e-9:
        warnings.warn(f"convert: sparsity={state.sparsity:g} is not reachable with {lays[0].n_blocks[1]} blocks "
                      f"per row (the diagonal blocks are always kept); achieved {min(got):.4g}"
                      f"{'' if max(got) == min(got) else f'–{max(got):.4g}'} (summary(handle)['layout_sparsity']). "
                      "Use a smaller block_size or longer calibration inputs for more blocks.", stacklevel=3)


def revert(model: nn.Module) -> DERHandle:
    """Undo :func:`convert` (anchors and hooks stay; the handle regularizes again); returns the handle.

    After ``revert`` the model can be converted again."""
    handle = get_handle(model)
    if handle.converted is None:
        raise ValueError("model is not converted")
    handle.converted.restore()
    handle.converted = None
    handle.keep_keys = False
    handle.regularize = True
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
        for key in ("attn_mass", "attn_count", "attn_len"):
            s.extra.pop(key, None)
    state.collecting = True
    try:
        _calibrate(model, state.handle, batches, stats=False)
    except BaseException:
        state.restore()
        raise
    finally:
        state.collecting = False
    for s in state.handle.sites:
        if "attn_mass" not in s.extra:
            state.restore()
            raise ValueError(f"no attention reached {s.name} during calibration (did calib_inputs run the model?)")
        causal = bool(getattr(s.attention, "is_causal", False))
        mass, count, n = (s.extra.pop(k) for k in ("attn_mass", "attn_count", "attn_len"))
        state.layouts[s.name] = attention_rule_layout(mass, count, state.block_size, n, state.sparsity, causal,
                                                      state.budget)


def summary(handle: DERHandle) -> dict:
    """Achieved block sparsity per converted layer (static mode) and the fallback counters."""
    st = handle.converted
    if st is None:
        raise ValueError("model is not converted")
    out = {"mode": st.mode, "block_size": st.block_size, "target_sparsity": st.sparsity,
           "dense_layers": list(st.dense_layers), "dense_fallbacks": dict(handle.dense_fallbacks)}
    if st.mode == "static":
        out["layout_sparsity"] = {s.name: st.layouts[s.name].sparsity() for s in handle.sites}
    return out


# --------------------------------------------------------------------------- handle state
def conversion_state(handle: DERHandle) -> dict[str, Any] | None:
    """The conversion part of ``handle.state_dict()``: settings and static layouts (tensors, plain values)."""
    st = handle.converted
    if st is None:
        return None
    lays = {name: {**lay.tensors(), **lay.meta()} for name, lay in st.layouts.items()}
    return {"format": _STATE_FORMAT, **st.settings(), "layouts": lays}


def load_conversion_state(handle: DERHandle, state: dict[str, Any] | None) -> None:
    """Make ``handle``'s conversion match ``state`` (from :func:`conversion_state`): revert, then convert
    with the saved settings and layouts (no calibration needed)."""
    if state is not None and (not isinstance(state, dict) or state.get("format") != _STATE_FORMAT):
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"converted state must be a dict with format {_STATE_FORMAT!r}, got {got!r}")
    if handle.converted is not None:
        revert(handle.model)
    if state is None:
        return
    device = next((p.device for p in handle.model.parameters()), torch.device("cpu"))
    try:
        layouts = {n: BlockLayout.from_meta(d["mask"], d, d.get("scores")).to(device)
                   for n, d in state["layouts"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"damaged converted state: layouts must map layer names to mask + metadata ({e})") from None
    convert(handle.model, state["sparsity"], state["block_size"], state["mode"], backend=state["backend"],
            layouts=layouts if state["mode"] == "static" else None, budget=state["budget"], rule=state["rule"],
            min_seq_len=state.get("min_seq_len", "auto"))
