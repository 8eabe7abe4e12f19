"""Save / load DER attention state (anchors, frozen layouts) as one safetensors file.

``save(handle, path)`` writes ``path.safetensors`` atomically (:func:`der._io.save_state`): tensors
``anchors/<site>``, ``layouts/<site>`` and, in its metadata, the config, site names, α step and conversion
settings. ``load(model, path)`` injects the same config into a fresh copy of the architecture, copies the
anchors in and, if the saved handle was converted, converts with the saved layouts (static) or settings
(dynamic); ``restore(handle, path)`` does the same for a model that is already injected (checkpoint resume). Files of the older two-file layout (``path.safetensors`` + ``path.json``) still load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from der._io import load_state, save_state
from der.attention.config import DERConfig
from der.attention.injection import DERHandle, inject
from der.attention.layout import BlockLayout

__all__ = ["save", "load", "restore", "FORMAT", "STATE_KIND"]

FORMAT = "der.attention/1"  # the legacy two-file layout's JSON "format"
STATE_KIND = "der.attention.DERHandle"


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save(handle: DERHandle, path: str | Path) -> Path:
    """Write anchors (+ static layouts) and metadata as one file, atomically; returns its path."""
    st_path, _ = _paths(path)
    tensors = {k: v.cpu().contiguous() for k, v in handle.anchor_tensors().items()}
    conv = handle.converted
    meta: dict = {"format": FORMAT, "config": handle.config.to_dict(), "arch": handle.arch,
                  "sites": [s.name for s in handle.sites], "steps": handle.steps, "converted": None}
    if conv is not None:
        meta["converted"] = {**conv.settings(), "layouts": {n: lay.meta() for n, lay in conv.layouts.items()}}
        for name, lay in conv.layouts.items():
            t = lay.tensors()
            tensors[f"layouts/{name}"] = t["mask"]
            if "scores" in t:
                tensors[f"layout_scores/{name}"] = t["scores"]
    return save_state(st_path, tensors, meta, kind=STATE_KIND)


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    st_path, js_path = _paths(path)
    try:
        tensors, meta = load_state(st_path, kind=STATE_KIND)
        return tensors, meta, st_path
    except ValueError:
        if not (js_path.is_file() and st_path.is_file()):
            raise
    try:  # the legacy layout: tensors in path.safetensors, metadata in path.json
        from safetensors.torch import load_file

        meta = json.loads(js_path.read_text())
        tensors = load_file(str(st_path))
    except Exception as e:  # noqa: BLE001 - any damage is reported with the file's name
        raise ValueError(f"{st_path} / {js_path}: not a readable DER attention file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{js_path} is not a DER attention file (format={got!r}, expected {FORMAT!r})")
    return tensors, meta, st_path


def load(model: nn.Module, path: str | Path) -> DERHandle:
    """Inject the saved config into ``model``, restore anchors, and re-convert if it was converted."""
    tensors, meta, st_path = _read(path)
    handle = inject(model, DERConfig.from_dict(meta["config"]))
    try:
        _restore(handle, tensors, meta, st_path)
    except ValueError:
        handle.remove()
        raise
    return handle


def restore(handle: DERHandle, path: str | Path) -> DERHandle:
    """Load a :func:`save` file into an existing ``handle`` (same sites): anchors, α step count and the
    conversion (reverting or converting to match), e.g. when resuming a checkpoint. Returns ``handle``."""
    tensors, meta, st_path = _read(path)
    _restore(handle, tensors, meta, st_path)
    return handle


def _restore(handle: DERHandle, tensors: dict[str, torch.Tensor], meta: dict, st_path: Path) -> None:
    names = [s.name for s in handle.sites]
    if names != meta["sites"]:
        raise ValueError(f"{st_path}: saved DER sites {meta['sites']} do not match this model's matches {names}")
    handle.load_anchor_tensors(tensors, str(st_path))
    handle.steps = int(meta.get("steps", 0))
    if handle.converted is not None:
        from der.attention.conversion import revert

        revert(handle.model)
    conv = meta.get("converted")
    if conv is not None:
        from der.attention.conversion import convert

        layouts = None
        if conv["mode"] == "static":
            lay_meta = conv.get("layouts") or {}
            layouts = {}
            for s in handle.sites:
                mask = tensors[f"layouts/{s.name}"].bool()
                if s.name in lay_meta:
                    layouts[s.name] = BlockLayout.from_meta(mask, lay_meta[s.name], tensors.get(f"layout_scores/{s.name}"))
                else:  # files written before layouts carried their metadata: whole blocks, causal as the layer
                    layouts[s.name] = BlockLayout(mask, conv["block_size"], None,
                                                  bool(getattr(s.attention, "is_causal", False)))
        convert(handle.model, conv["sparsity"], conv["block_size"], conv["mode"], backend=conv["backend"],
                layouts=layouts, budget=conv.get("budget"), rule=conv.get("rule", "anchors"),
                min_seq_len=conv.get("min_seq_len", "auto"))
