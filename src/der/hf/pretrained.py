"""``save_pretrained`` / ``from_pretrained`` for models with DER injected (and converted).

A saved folder holds the ordinary Hugging Face files — ``config.json`` and ``model.safetensors`` (the
weights *without* the DER anchors, so ``from_pretrained`` of the folder alone reports no unexpected keys),
or, for a PEFT model, ``adapter_config.json`` + ``adapter_model.safetensors`` — plus one DER file,
:data:`DER_FILE` (:func:`der.attention.io.save`: the anchors, the α step count, the :class:`DERConfig` and
the conversion settings with the frozen layouts, one atomic safetensors file, no pickle).
:func:`from_pretrained` loads the HF part with the given class and re-applies the DER part: the model comes
back converted, with the same layouts, and gives the same outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from der.attention import io as der_io
from der.attention._targets import ANCHOR_ATTR
from der.attention.injection import get_handle

__all__ = ["save_pretrained", "from_pretrained", "DER_FILE", "is_peft_model"]

DER_FILE = "der_attention.safetensors"
_ADAPTER_CONFIG = "adapter_config.json"


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT ``PeftModel`` (its ``save_pretrained`` writes the adapter only)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is part of the hf extra
        return False
    return isinstance(model, PeftModel)


def _without_anchors(model: nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if ANCHOR_ATTR not in k.split(".")}


def save_pretrained(model: nn.Module, folder: str | Path, **kwargs: Any) -> Path:
    """Write ``model`` (DER injected, converted or not) to ``folder``: HF files + :data:`DER_FILE`.

    ``kwargs`` go to the model's own ``save_pretrained`` (e.g. ``max_shard_size``). PEFT models save their
    adapter (PEFT's own format) and the DER file; the base model is the adapter config's
    ``base_model_name_or_path``. Returns the folder.
    """
    handle = get_handle(model)
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"{type(model).__name__} has no save_pretrained (not a transformers/PEFT model); "
                         "use der.attention.io.save(handle, path) for the DER state alone")
    if "state_dict" in kwargs:
        raise ValueError("save_pretrained takes the weights from the model; state_dict= is not supported")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if is_peft_model(model):
        model.save_pretrained(str(folder), **kwargs)  # adapter weights only (no anchors: no "lora_" in them)
    else:
        model.save_pretrained(str(folder), state_dict=_without_anchors(model), **kwargs)
    der_io.save(handle, folder / DER_FILE)
    return folder


def from_pretrained(cls: Any, folder: str | Path, *, base_model: nn.Module | None = None, **kwargs: Any) -> nn.Module:
    """Load a folder written by :func:`save_pretrained`: ``cls.from_pretrained(folder, **kwargs)`` (any HF
    class, e.g. ``AutoModel``), then the DER state (inject, anchors, conversion with the saved layouts).

    A PEFT adapter folder loads its base model with ``cls`` from the adapter config's
    ``base_model_name_or_path`` (or takes ``base_model``, already loaded), then the adapter, then DER.
    The model is returned in eval mode; its handle is ``der.attention.get_handle(model)``.
    """
    folder = Path(folder)
    der_path = folder / DER_FILE
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if not der_path.is_file():
        raise ValueError(f"{folder} has no {DER_FILE}: not written by der.hf.save_pretrained "
                         f"(load it with {getattr(cls, '__name__', cls)}.from_pretrained for the dense model)")
    if kwargs.get("output_loading_info"):
        raise ValueError("output_loading_info is not supported here; call cls.from_pretrained for it")
    if (folder / _ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        if base_model is None:
            try:
                base_path = json.loads((folder / _ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{folder / _ADAPTER_CONFIG}: no base_model_name_or_path ({e}); pass base_model=") from None
            if not base_path:
                raise ValueError(f"{folder / _ADAPTER_CONFIG} names no base model; pass base_model=")
            base_model = cls.from_pretrained(base_path, **kwargs)
        model = PeftModel.from_pretrained(base_model, str(folder))
    elif base_model is not None:
        raise ValueError(f"base_model= is for PEFT adapter folders; {folder} holds a full model")
    else:
        model = cls.from_pretrained(str(folder), **kwargs)
    model.eval()
    try:
        der_io.load(model, der_path)
    except ValueError as e:
        if "do not match" not in str(e):
            raise
        saved = _saved_class(folder)
        raise ValueError(f"{e}. The DER state names layers of the class the folder was saved as"
                         f"{f' ({saved})' if saved else ''}; load it with that class, not "
                         f"{type(model).__name__}") from None
    return model


def _saved_class(folder: Path) -> str | None:
    try:
        names = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return names[0] if names else None

