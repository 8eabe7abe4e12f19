"""DER in the Hugging Face workflow: ``Trainer`` integration, ``save_pretrained`` / ``from_pretrained`` of
converted models, and the ``der sparsify`` command.

* training — :class:`DERCallback` (HF's own ``Trainer`` plus one callback: adds λ·H to the loss, steps the
  α schedule once per optimizer step, logs the DER term and per-layer entropy, keeps the handle's state in
  every checkpoint folder, resume is exact), :class:`DERTrainerMixin` / :class:`DERTrainer` (the same through
  ``compute_loss`` and ``log``, so every reporter sees the DER metrics) (trainer);
* saving — :func:`save_pretrained` / :func:`from_pretrained`: the HF files (config + safetensors weights, or
  a PEFT adapter) plus one DER file beside them (anchors, handle state, conversion settings and layouts),
  no pickle; the folder alone reloads the model converted, with its layouts (pretrained);
* one command — :func:`sparsify_folder` (``der sparsify MODEL_DIR --sparsity 0.75 --out OUT_DIR``): load a
  saved HF folder offline, inject, calibrate, convert, (optionally distill), save, and measure (sparsify).

Every module here needs ``transformers`` (the ``hf`` extra); ``import der`` never imports it.
"""

from der._lazy import lazy_getattr

_TABLE = {
    "DERCallback": ".trainer",
    "DERTrainerMixin": ".trainer",
    "DERTrainer": ".trainer",
    "HANDLE_FILE": ".trainer",
    "save_pretrained": ".pretrained",
    "from_pretrained": ".pretrained",
    "DER_FILE": ".pretrained",
    "sparsify_folder": ".sparsify",
}
__all__ = sorted(_TABLE)
__getattr__ = lazy_getattr(__name__, _TABLE)
