"""Save / load DER attention state (anchors, frozen layouts) as safetensors + JSON.

``save(handle, path)`` writes ``path.safetensors`` (``anchors/<site>``, ``layouts/<site>``) and
``path.json`` (config, site names, α step, conversion settings). ``load(model, path)`` injects the same
config into a fresh copy of the architecture, copies the anchors in and, if the saved handle was converted,
converts with the saved layouts (static) or settings (dynamic).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from der.attention.config import DERConfig
from der.attention.injection import DERHandle, inject
from der.attention.layout import BlockLayout

__all__ = ["save", "load", "FORMAT"]

FORMAT = "der.attention/1"


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save(handle: DERHandle, path: str | Path) -> tuple[Path, Path]:
    """Write anchors (+ static layouts) and metadata; returns the two file paths."""
    from safetensors.torch import save_file

    st_path, js_path = _paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu().contiguous() for k, v in handle.anchor_tensors().items()}
    conv = handle.converted
    meta: dict = {"format": FORMAT, "config": handle.config.to_dict(), "arch": handle.arch,
                  "sites": [s.name for s in handle.sites], "steps": handle.steps, "converted": None}
    if conv is not None:
        meta["converted"] = {**conv.settings(), "layouts": {n: lay.meta() for n, lay in conv.layouts.items()}}
        for name, lay in conv.layouts.items():
            tensors[f"layouts/{name}"] = lay.mask.cpu().to(torch.uint8).contiguous()
    save_file(tensors, str(st_path))
    js_path.write_text(json.dumps(meta, indent=1))
    return st_path, js_path


def load(model: nn.Module, path: str | Path) -> DERHandle:
    """Inject the saved config into ``model``, restore anchors, and re-convert if it was converted."""
    from safetensors.torch import load_file

    st_path, js_path = _paths(path)
    meta = json.loads(js_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{js_path} is not a DER attention file (format={meta.get('format')!r}, expected {FORMAT!r})")
    tensors = load_file(str(st_path))
    handle = inject(model, DERConfig.from_dict(meta["config"]))
    names = [s.name for s in handle.sites]
    if names != meta["sites"]:
        handle.remove()
        raise ValueError(f"saved DER sites {meta['sites']} do not match this model's matches {names}")
    try:
        handle.load_anchor_tensors(tensors, str(st_path))
    except ValueError:
        handle.remove()
        raise
    handle.steps = int(meta.get("steps", 0))
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
                    layouts[s.name] = BlockLayout.from_meta(mask, lay_meta[s.name])
                else:  # files written before layouts carried their metadata: whole blocks, causal as the layer
                    layouts[s.name] = BlockLayout(mask, conv["block_size"], None,
                                                  bool(getattr(s.attention, "is_causal", False)))
        convert(model, conv["sparsity"], conv["block_size"], conv["mode"], backend=conv["backend"], layouts=layouts,
                budget=conv.get("budget"), rule=conv.get("rule", "anchors"))
    return handle
