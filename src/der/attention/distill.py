r"""Sparse-aware fine-tuning: train a converted model through the block-sparse kernel against its dense self.

After :func:`der.attention.convert` the model runs block-sparse; this module closes the gap to the dense
model it came from, without a second copy of the weights:

* **Layer term** ``mass`` (per converted layer, this forward, recorded by the swapped attention whenever
  grad is enabled and its weight is set with :func:`enable`), averaged over layers into ``handle.loss()``:
  the attention-mass term, the mean over real queries of the dense attention probability that falls
  *outside* the call's block layout, :math:`1 - \sum_{b \in \text{layout}} P_{ab}`, i.e. exactly what the
  kernel drops (differentiable through the queries and keys). Its minimum over the model is not trivial:
  it is zero only when every query's attention lives inside the kept blocks. (A layer term matching the
  sparse attention output to the dense output *of the same weights* is not offered: it has a collapse
  direction — values that are equal across tokens make both outputs equal — and moves the model away from
  its teacher.)

* **Output term** — :func:`output_loss` between the converted model's output and the dense model's
  output on the same batch: KL of the softmax (``logits``) or relative MSE over the real tokens
  (``last_hidden_state``). The teacher is the model itself before fine-tuning: :func:`teacher_outputs`
  runs it with the swap bypassed (:func:`dense`) and keeps only its outputs.

* :func:`fit` — a small training loop over the three terms (AdamW, gradient clipping) for users
  without a trainer; HF ``Trainer`` users add ``handle.loss()`` through :mod:`der.hf`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from der.attention.injection import DERHandle, get_handle
from der.attention.layout import BlockLayout

__all__ = ["enable", "disable", "dense", "layer_terms", "output_loss", "teacher_outputs", "fit", "TERMS"]

TERMS = ("mass",)


def _state(model_or_handle: nn.Module | DERHandle):
    handle = model_or_handle if isinstance(model_or_handle, DERHandle) else get_handle(model_or_handle)
    if handle.converted is None:
        raise ValueError("distillation trains a converted model: call der.attention.convert(model, ...) first")
    return handle, handle.converted


def enable(model: nn.Module | DERHandle, mass: float = 1.0) -> DERHandle:
    """Set the weight of the layer term that ``handle.loss()`` returns after conversion."""
    if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not math.isfinite(mass) or mass < 0:
        raise ValueError(f"mass weight must be a finite number >= 0, got {mass!r}")
    handle, st = _state(model)
    st.distill = {"mass": float(mass)}
    return handle


def disable(model: nn.Module | DERHandle) -> DERHandle:
    """Stop recording layer terms (``handle.loss()`` is zero after conversion)."""
    handle, st = _state(model)
    st.distill = {}
    return handle


@contextlib.contextmanager
def dense(model: nn.Module | DERHandle):
    """Run the converted layers with their previous dense attention inside (the teacher), uncounted."""
    _, st = _state(model)
    prev, st.bypass = st.bypass, True
    try:
        yield
    finally:
        st.bypass = prev


def _dense_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float,
                 causal: bool) -> torch.Tensor:
    """Dense attention probabilities ``(B, H, N, N)`` (float32 at least) under the SDPA-style ``mask``."""
    dt = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(dt)
    if causal:
        n, m = s.shape[-2:]
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool, device=s.device).triu(m - n + 1), float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0)


def layer_terms(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, mask: torch.Tensor | None,
                scale: float | None, causal: bool, query_valid: torch.Tensor | None,
                weights: dict[str, float]) -> dict[str, torch.Tensor]:
    r"""The layer terms of one attention call (module docstring): ``q, k: (B, H, N, Dh)`` (``k`` already
    expanded to ``H`` heads), ``layout`` the call's layout, ``mask`` the SDPA-style mask the call received,
    ``query_valid: (B, N)`` the real tokens. Returns ``{term: scalar}`` for each term with a positive
    weight (unweighted)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, N, _ = q.shape
    w = (torch.ones(B, N, device=q.device) if query_valid is None else query_valid.to(q.device).float())
    out: dict[str, torch.Tensor] = {}
    if weights.get("mass", 0.0) > 0:
        if not bool(torch.isfinite(q.detach()).all() & torch.isfinite(k.detach()).all()):
            raise ValueError("DER distillation: non-finite queries or keys (NaN/Inf); the mass term would be NaN")
        p = _dense_probs(q, k, mask, scale, causal)
        inside = layout.to_dense().to(p.device)  # (B or 1, H, N, N)
        kept = (p * inside.to(p.dtype)).sum(-1)  # (B, H, N)
        out["mass"] = ((1 - kept) * w[:, None]).sum() / (w.sum() * H).clamp_min(1)
    return out


def _output_tensor(out: Any) -> tuple[torch.Tensor, str]:
    """The tensor a model output is judged by: ``logits`` if present, else ``last_hidden_state``."""
    if isinstance(out, torch.Tensor):
        return out, "hidden"
    for name, kind in (("logits", "logits"), ("last_hidden_state", "hidden")):
        t = getattr(out, name, None) if not isinstance(out, dict) else out.get(name)
        if isinstance(t, torch.Tensor):
            return t, kind
    raise ValueError(f"cannot distill a model output of type {type(out).__name__}: it has neither logits nor "
                     "last_hidden_state")


def output_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "hidden",
                mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    r"""Distillation loss of one output: ``kind="logits"``: :math:`T^2\,\mathrm{KL}(\mathrm{softmax}(t/T)\,\Vert\,
    \mathrm{softmax}(s/T))` per position; ``"hidden"``: :math:`\lVert s-t\rVert^2/\lVert t\rVert^2`. Means over the
    positions where ``mask`` (``student.shape[:-1]``, or ``(B, N)`` for ``(B, N, C)`` outputs) is true."""
    if student.shape != teacher.shape:
        raise ValueError(f"student output {tuple(student.shape)} does not match the teacher's {tuple(teacher.shape)}")
    teacher = teacher.to(student.device, student.dtype).detach()
    if mask is not None:
        mask = mask.to(student.device)
        if tuple(mask.shape) != tuple(student.shape[:-1]):
            mask = None  # e.g. pooled/classifier outputs: every row counts
    w = torch.ones(student.shape[:-1], device=student.device) if mask is None else mask.float()
    if kind == "logits":
        ls = torch.log_softmax(student.float() / temperature, -1)
        lt = torch.log_softmax(teacher.float() / temperature, -1)
        per = (lt.exp() * (lt - ls)).sum(-1) * temperature**2
        return (per * w).sum() / w.sum().clamp_min(1)
    if kind != "hidden":
        raise ValueError(f"kind must be 'logits' or 'hidden', got {kind!r}")
    d = (student.float() - teacher.float()).pow(2).sum(-1)
    return (d * w).sum() / (teacher.float().pow(2).sum(-1) * w).sum().clamp_min(1e-12)


def _run(model: nn.Module, batch) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(batch)


def _mask_of(batch) -> torch.Tensor | None:
    m = batch.get("attention_mask") if isinstance(batch, dict) else None
    return m.bool() if isinstance(m, torch.Tensor) else None


@torch.no_grad()
def teacher_outputs(model: nn.Module, batches: Sequence) -> list[torch.Tensor]:
    """The dense model's outputs on ``batches`` (detached, on CPU): the converted model run with the swap
    bypassed (:func:`dense`) in eval mode; the teacher of :func:`fit` without a second copy of the weights."""
    was = model.training
    model.eval()
    try:
        with dense(model):
            return [_output_tensor(_run(model, b))[0].detach().cpu() for b in batches]
    finally:
        model.train(was)


def _params(model: nn.Module, handle: DERHandle) -> list[nn.Parameter]:
    skip = {id(p) for p in handle.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in skip]


def fit(model: nn.Module, batches: Sequence, steps: int, *, lr: float = 1e-5, teacher: Sequence | None = None,
        output_weight: float = 1.0, mass_weight: float = 0.0,
        temperature: float = 1.0, grad_clip: float = 1.0, weight_decay: float = 0.0, train_mode: bool = False,
        on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Fine-tune a converted model through its block-sparse kernel against its dense self for ``steps``
    optimizer steps, cycling through ``batches`` (dicts → ``model(**b)``, tensors → ``model(b)``).

    Loss per step: ``output_weight`` · :func:`output_loss` (teacher: ``teacher`` outputs per batch, default
    :func:`teacher_outputs` of the model before the first step) + ``mass_weight`` · the attention-mass
    layer term (``handle.loss()``). The model runs in eval mode
    (no dropout) unless ``train_mode``. Trains every parameter with ``requires_grad`` except DER anchors
    (PEFT: only the adapters). Returns the history ``{"loss", "output", "mass": [...],
    "steps", "seconds"}``.
    """
    handle, _ = _state(model)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("fit needs at least one batch")
    if teacher is not None and len(teacher) != len(batches):
        raise ValueError(f"teacher has {len(teacher)} outputs for {len(batches)} batches")
    if output_weight == 0 and mass_weight == 0:
        raise ValueError("every loss weight is zero: nothing to train")
    params = _params(model, handle)
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    targets = list(teacher) if teacher is not None else (teacher_outputs(model, batches) if output_weight > 0 else None)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    old = dict(handle.converted.distill)
    enable(handle, mass=mass_weight)
    hist: dict[str, list[float]] = {"loss": [], "output": [], "mass": []}
    was = model.training
    model.train(train_mode)
    t0 = time.perf_counter()
    try:
        for step, i in zip(range(steps), itertools.cycle(range(len(batches)))):
            out, kind = _output_tensor(_run(model, batches[i]))
            layer = handle.loss()
            terms = handle.converted.last_terms()
            loss = layer
            o = torch.zeros((), device=out.device)
            if output_weight > 0:
                o = output_loss(out, targets[i], kind, _mask_of(batches[i]), temperature)
                loss = loss + output_weight * o
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            rec = {"loss": float(loss.detach()), "output": float(o.detach()), "mass": terms.get("mass", 0.0)}
            for key, val in rec.items():
                hist[key].append(val)
            if on_step is not None:
                on_step(step, rec)
    finally:
        model.train(was)
        handle.converted.distill = old
    return {**hist, "steps": steps, "seconds": time.perf_counter() - t0}
