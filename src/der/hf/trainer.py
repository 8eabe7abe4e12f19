"""DER in Hugging Face's ``Trainer``: one callback, or a small ``Trainer`` mixin.

``Trainer(model, args, train_dataset=..., callbacks=[DERCallback()])`` with a model that went through
:func:`der.attention.inject`:

* **loss** — a forward hook on the model adds ``handle.loss()`` (λ·H_diff, Eq. 3) to ``outputs.loss`` on
  every training forward (the model must compute its own loss, i.e. receive ``labels``). When the Trainer
  normalises the loss over the whole accumulated batch (``num_items_in_batch`` reaches the model) the term
  is divided by the gradient-accumulation steps, so its weight is λ per optimizer step either way. After
  :func:`der.attention.convert` ``handle.loss()`` is the distillation layer term
  (:mod:`der.attention.distill`; zero, and the model trains on its task loss alone, until
  :func:`der.attention.distill.enable` gives it a weight);
* **schedule** — ``handle.step()`` once per optimizer step (``on_step_end``);
* **logs** — at every Trainer log: ``der/loss`` (the added term, mean since the last log), ``der/entropy``
  and ``der/entropy/<layer>`` (H_diff per layer, nats), and after conversion ``der/distill/<term>`` (the
  unweighted layer terms, when enabled), ``der/sparsity`` (mean static layout sparsity) and
  ``der/dense_fallbacks``. They go into ``trainer.state.log_history`` and the ``logs``
  of every callback after this one (reporters such as TensorBoard are registered *before* user callbacks:
  use :class:`DERTrainer` for them to see the DER metrics too);
* **checkpoints** — every checkpoint folder gets :data:`HANDLE_FILE` (:func:`der.attention.io.save`:
  anchors, α step count, conversion with its layouts); resuming restores it (``on_train_begin``) from
  ``resume_from`` or ``<output_dir>/checkpoint-<global step>``, so a resumed run equals an uninterrupted one.

:class:`DERTrainerMixin` (and ``DERTrainer = DERTrainerMixin + Trainer``) does the same through
``compute_loss`` (no forward hook; works when the loss is computed outside the model, e.g.
``compute_loss_func``) and ``log`` (every reporter sees the DER metrics), and passes the exact
``resume_from_checkpoint`` folder to its callback.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from der.attention import io as der_io
from der.attention.injection import DERHandle, get_handle

__all__ = ["DERCallback", "DERTrainerMixin", "DERTrainer", "HANDLE_FILE"]

HANDLE_FILE = "der_handle.safetensors"
_CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and getattr(model, "_der_handle", None) is None:
        model = model.module  # DDP / DataParallel wrappers
    return model


class DERCallback(TrainerCallback):
    """Adds λ·H to the loss, steps the handle, logs DER metrics and keeps the handle in checkpoints.

    Args:
        handle: the :class:`~der.attention.injection.DERHandle` (default: the trained model's own).
        add_loss: add ``handle.loss()`` to ``outputs.loss`` through a forward hook (``False`` when something
            else adds it, as :class:`DERTrainerMixin` does).
        log_layers: also log the entropy of every layer (``der/entropy/<layer>``).
        resume_from: checkpoint folder to restore the handle from at ``on_train_begin`` (default: the
            Trainer's ``<output_dir>/checkpoint-<global step>`` when training resumes).
    """

    def __init__(self, handle: DERHandle | None = None, *, add_loss: bool = True, log_layers: bool = True,
                 resume_from: str | os.PathLike | None = None) -> None:
        if handle is not None and not isinstance(handle, DERHandle):
            raise TypeError(f"handle must be a DERHandle (der.attention.inject), got {type(handle).__name__}")
        self.handle, self.add_loss, self.log_layers, self.resume_from = handle, add_loss, log_layers, resume_from
        self._hook = None
        self._warned_no_loss = False
        self._reset()

    # ------------------------------------------------------------------ metrics
    def _reset(self) -> None:
        self._n = 0
        self._loss = 0.0
        self._layers: dict[str, float] = {}
        self._distill: dict[str, float] = {}

    def record(self, term: torch.Tensor) -> None:
        """Record one micro-batch's DER term (λ·H, or the distillation term after conversion) and the
        per-layer entropies (or unweighted distillation terms) of that forward."""
        self._n += 1
        self._loss += float(term.detach())
        if self.handle.converted is not None:
            for k, v in self.handle.converted.last_terms().items():
                self._distill[k] = self._distill.get(k, 0.0) + v
            return
        for s in self.handle.sites:
            if s.entropy is not None:
                key = f"layer_{s.layer}" if s.layer is not None else s.name
                self._layers[key] = self._layers.get(key, 0.0) + float(s.entropy.detach().mean())

    def pop_metrics(self) -> dict[str, float]:
        """The DER metrics since the last call (means over the recorded micro-batches), then reset."""
        out: dict[str, float] = {}
        h = self.handle
        if h is None:
            return out
        if self._n:
            out["der/loss"] = self._loss / self._n
            if self._layers:
                out["der/entropy"] = sum(self._layers.values()) / (len(self._layers) * self._n)
                if self.log_layers:
                    out.update({f"der/entropy/{k}": v / self._n for k, v in self._layers.items()})
            out.update({f"der/distill/{k}": v / self._n for k, v in self._distill.items()})
        if h.converted is not None:
            if h.converted.layouts:
                out["der/sparsity"] = sum(lay.sparsity() for lay in h.converted.layouts.values()) / len(h.converted.layouts)
            out["der/dense_fallbacks"] = float(sum(v for k, v in h.dense_fallbacks.items() if k != "dropout_ignored"))
        self._reset()
        return out

    # ------------------------------------------------------------------ loss hook
    def _loss_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        h = self.handle
        if not module.training or (h.converted is None and not h.regularize):  # regularization paused
            return output
        loss = output.get("loss") if isinstance(output, dict) else None
        if loss is None:
            if not self._warned_no_loss:
                warnings.warn("DERCallback: the model returned no loss (no labels?), so the DER term cannot be "
                              "added to it; use DERTrainer (compute_loss) or add handle.loss() yourself", stacklevel=2)
                self._warned_no_loss = True
            return output
        term = h.loss()
        self.record(term)
        if kwargs.get("num_items_in_batch") is not None:  # the Trainer will not divide by the GA steps
            term = term / self._ga_steps
            if self._avg_tokens and self._world > 1:  # ... and multiplies the loss by the world size
                term = term / self._world
        output["loss"] = loss + term
        return output

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.handle is None:
            if model is None:
                raise ValueError("DERCallback: no model given by the Trainer; pass DERCallback(handle)")
            self.handle = get_handle(_unwrap(model))
        self._ga_steps = max(1, int(args.gradient_accumulation_steps))
        self._avg_tokens = bool(getattr(args, "average_tokens_across_devices", False))
        self._world = max(1, int(getattr(args, "world_size", 1)))
        if self.add_loss and self._hook is None:
            self._hook = self.handle.model.register_forward_hook(self._loss_hook, with_kwargs=True)
        self._restore(args, state)
        self._reset()

    def _restore(self, args, state) -> None:
        folder = self.resume_from
        if folder is None and state.global_step > 0:
            folder = os.path.join(args.output_dir, f"{_CHECKPOINT_PREFIX}-{state.global_step}")
        if folder is None:
            return
        path = Path(folder) / HANDLE_FILE
        if path.is_file():
            der_io.restore(self.handle, path)
        elif state.global_step > 0:
            warnings.warn(f"DERCallback: resuming at step {state.global_step} without {path}; the DER step count "
                          "is set to the global step (the anchors come from the model weights)", stacklevel=2)
            self.handle.steps = int(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.handle.step()

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{_CHECKPOINT_PREFIX}-{state.global_step}"
        if not folder.is_dir():
            warnings.warn(f"DERCallback: checkpoint folder {folder} not found; DER state not saved", stacklevel=2)
            return
        der_io.save(self.handle, folder / HANDLE_FILE)

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = self.pop_metrics()
        if not metrics or logs is None:
            return
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class DERTrainerMixin:
    """Mix into a ``transformers.Trainer`` (first base): DER through ``compute_loss`` and ``log``.

    ``der_handle=`` (keyword) picks the handle; default: the model's own. The mixin registers a
    :class:`DERCallback` with ``add_loss=False`` for stepping, checkpoints and metrics (``self.der_callback``).
    """

    def __init__(self, *args: Any, der_handle: DERHandle | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        handle = der_handle if der_handle is not None else get_handle(_unwrap(self.model))
        self.der_callback = DERCallback(handle, add_loss=False)
        self.add_callback(self.der_callback)

    @property
    def der_handle(self) -> DERHandle:
        return self.der_callback.handle

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        h = self.der_handle
        if model.training and (h.converted is not None or h.regularize):
            term = h.loss()
            self.der_callback.record(term)
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:  # the Trainer's own rule (training_step)
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                    self.compute_loss_func is not None
            if scaled:
                term = term / self.current_gradient_accumulation_steps
            loss = loss + term.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        logs.update(self.der_callback.pop_metrics())
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        folder = resume_from_checkpoint
        if folder is True:
            from transformers.trainer_utils import get_last_checkpoint

            folder = get_last_checkpoint(self.args.output_dir)  # None: the Trainer raises for True
        self.der_callback.resume_from = folder if isinstance(folder, (str, os.PathLike)) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)


class DERTrainer(DERTrainerMixin, Trainer):
    """``transformers.Trainer`` with DER (see :class:`DERTrainerMixin`)."""
