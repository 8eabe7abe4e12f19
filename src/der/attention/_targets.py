"""Where DER attaches: PEFT-style module matching (``target_modules`` / ``exclude_modules`` /
``layers_to_transform``) and reading keys ``(B, H, N, Dh)`` out of a matched module's output (see
:mod:`der.attention.config` for the per-architecture table)."""

from __future__ import annotations

import re

import torch
from torch import nn

from der.attention.config import ARCH_DEFAULTS, DERConfig, detect_architecture

__all__ = ["list_matches", "read_keys", "check_key_targets"]

ANCHOR_ATTR = "der_anchors"
_SKIP_COMPONENTS = ("base_layer", ANCHOR_ATTR)
_CANDIDATE_HINTS = ("key", "k_proj", "qkv", "c_attn", "k_norm", "attn", "attention")
# last name components of modules that are certainly not key projections (queries, values, outputs, MLPs)
_NOT_KEYS = frozenset("query value q_proj v_proj o_proj out_proj c_proj q_norm dense output fc1 fc2 gate_proj "
                      "up_proj down_proj mlp c_fc".split())


# --------------------------------------------------------------------------- matching
def _match_any(name: str, patterns: list[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _layer_index(name: str) -> int | None:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _skippable(name: str) -> bool:
    parts = name.split(".")
    return any(p in _SKIP_COMPONENTS or p.startswith("lora_") for p in parts)


def _resolve(model: nn.Module, config: DERConfig) -> tuple[str, list[str] | str, str]:
    arch = config.architecture
    if config.target_modules is None or config.key_kind is None:
        arch = arch or detect_architecture(model)
    spec = ARCH_DEFAULTS.get(arch) if arch else None
    targets = config.target_modules if config.target_modules is not None else list(spec.target_modules)
    key_kind = config.key_kind or spec.key_kind
    return arch or "custom", targets, key_kind


def _query_module(model: nn.Module, name: str, arch: str, key_kind: str) -> nn.Module | None:
    """The module whose output holds the queries of the same attention (None: route by keys only)."""
    spec = ARCH_DEFAULTS.get(arch)
    if spec is None or spec.query_sibling is None:
        return None
    if spec.query_sibling == "":
        return model.get_submodule(name) if key_kind == "fused_qkv" else None
    sib = name.rsplit(".", 1)[0] + "." + spec.query_sibling if "." in name else spec.query_sibling
    try:
        return model.get_submodule(sib)
    except AttributeError:
        return None


def list_matches(model: nn.Module, config: DERConfig | None = None) -> list[str]:
    """Names of the modules ``inject`` would hook, in model order.

    Raises ``ValueError`` listing candidate module names when nothing matches.
    """
    config = config or DERConfig()
    _, targets, _ = _resolve(model, config)
    found: list[str] = []
    for name, _ in model.named_modules():
        if not name or _skippable(name) or any(name.startswith(f + ".") for f in found):
            continue
        if not _match_any(name, targets) or _match_any(name, config.exclude_modules):
            continue
        if config.layers_to_transform is not None and _layer_index(name) not in config.layers_to_transform:
            continue
        found.append(name)
    if not found:
        names = [n for n, _ in model.named_modules() if n and not _skippable(n)]
        cands = [n for n in names if any(h in n.split(".")[-1].lower() for h in _CANDIDATE_HINTS)]
        raise ValueError(
            f"target_modules={targets!r} (exclude={config.exclude_modules!r}, "
            f"layers={config.layers_to_transform!r}) matched no module of {type(model).__name__}. "
            f"Candidates: {cands[:24] or names[:24]}"
        )
    return found


def check_key_targets(names: list[str], config: DERConfig, arch: str) -> None:
    """Refuse matches that are not key projections: DER regularizes keys (Sec. 3), and e.g.
    ``target_modules=["self.query"]`` would silently regularize the queries. Skipped when the config names
    its own ``key_kind`` (a custom model whose key module is named differently)."""
    if config.target_modules is None or config.key_kind is not None:
        return
    spec = ARCH_DEFAULTS.get(arch)
    want = sorted({t.rsplit(".", 1)[-1] for t in spec.target_modules}) if spec is not None else None
    bad = [n for n in names if n.rsplit(".", 1)[-1] in _NOT_KEYS]
    if bad:
        hint = f"the keys of {arch!r} models come from modules named {want}" if want else "match key projections"
        raise ValueError(f"target_modules={config.target_modules!r} matched {bad[:4]}, which "
                         f"{'is' if len(bad) == 1 else 'are'} not key projection{'s' if len(bad) > 1 else ''}: DER "
                         f"regularizes attention keys ({hint}). Pass DERConfig(key_kind=...) to hook them anyway.")


# --------------------------------------------------------------------------- key readers
def _head_dim(parent: nn.Module) -> int:
    for attr in ("head_dim", "attention_head_size"):
        v = getattr(parent, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ValueError(f"cannot find the head size on {type(parent).__name__} (looked for head_dim, attention_head_size)")


def _out_features(module: nn.Module) -> int:
    for attr in ("out_features", "nf"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        return int(w.shape[0])
    raise ValueError(f"cannot find the output size of {type(module).__name__}")


def _geometry(module: nn.Module, parent: nn.Module, key_kind: str) -> tuple[int, int]:
    """(heads of the key tensor, head dim) for a matched module."""
    dh = _head_dim(parent)
    if key_kind == "heads":
        h = getattr(parent, "num_heads", None)
        if not isinstance(h, int):
            raise ValueError(f"{type(parent).__name__} has no int num_heads for key_kind='heads'")
        return h, dh
    width = _out_features(module)
    if key_kind == "fused_qkv":
        if width % 3:
            raise ValueError(f"fused qkv output size {width} is not divisible by 3")
        width //= 3
    if width % dh:
        raise ValueError(f"key width {width} is not a multiple of head dim {dh}")
    return width // dh, dh


def read_keys(output: torch.Tensor, key_kind: str, heads: int, head_dim: int, part: int = 1) -> torch.Tensor:
    """Keys ``(B, H, N, Dh)`` from a key module's output (see :mod:`der.attention.config`).

    ``part`` picks the third of a fused ``[q | k | v]`` output (1 = keys, 0 = queries). ``heads=-1``: infer.
    """
    if isinstance(output, (tuple, list)):
        output = output[0]
    if key_kind == "heads":
        return output
    if key_kind == "fused_qkv":
        e = output.shape[-1] // 3
        output = output[..., part * e : (part + 1) * e]
    if output.dim() == 2:  # unbatched
        output = output.unsqueeze(0)
    b, n = output.shape[0], output.shape[1]
    return output.reshape(b, n, -1 if heads < 0 else heads, head_dim).transpose(1, 2)
