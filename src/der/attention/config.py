r"""Configuration of DER for attention (Sec. 3 "attention", App. A, App. G.10) and per-architecture defaults.

:class:`DERConfig` says *where* the regularizer goes (PEFT-style module matching: ``target_modules`` as
suffixes or one regex, ``exclude_modules``, ``layers_to_transform``) and *how* it behaves (anchors per
head, α, λ, block size, target block sparsity, static/dynamic layouts).

:data:`ARCH_DEFAULTS` is the one table of per-architecture defaults: which module produces the keys and
how a key tensor ``(B, H, N, Dh)`` is read from that module's output.

* ``linear``    — a projection ``(B, N, H·Dh)`` (HF BERT/MiniLM ``self.key``, HF ViT / LLaMA / Mistral /
  Phi ``k_proj``; with GQA ``H`` is the number of key/value heads).
* ``fused_qkv`` — GPT-2's ``c_attn`` returns ``(B, N, 3E)`` = ``[q | k | v]``; the keys are the middle third.
* ``heads``     — the module already returns ``(B, H, N, Dh)``. timm's ``Attention`` computes
  ``qkv`` once and, on its fused path, calls ``F.scaled_dot_product_attention`` directly, so a hook on
  ``qkv`` sees the fused projection but nothing per head; ``attn.k_norm`` (an ``Identity`` unless
  ``qk_norm=True``) is *always* called on the per-head keys right before attention, on both the fused and
  the eager path, so that is where keys are captured.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Literal, get_args

from der._anchors import check_anchor_options
from der.initializers import check_init
from der.schedules import alpha_schedule, anchor_heuristic

__all__ = ["DERConfig", "ArchSpec", "ARCH_DEFAULTS", "detect_architecture", "infer_seq_len", "check_block_args",
           "Mode", "Budget", "Rule", "MODES", "BUDGETS", "RULES", "ANCHOR_RULES", "KEY_KINDS", "DEFAULT_ALPHA",
           "DEFAULT_LAM"]

# App. G.10 (ViT/BERT, GPT-2, LLaMA-2 columns): α = 5, k = √N, λ = 0.01 (0.03 for GPT-2).
DEFAULT_ALPHA = 5.0
DEFAULT_LAM = 0.01
Mode = Literal["static", "dynamic"]  # frozen per-layer layouts, or per-input layouts at every call
Budget = Literal["head", "row"]  # exact block budget per head, or top-b per query block
Rule = Literal["auto", "anchors", "attention", "bigbird", "moba"]  # where layouts come from (convert)
MODES: tuple[str, ...] = get_args(Mode)
BUDGETS: tuple[str, ...] = get_args(Budget)
RULES: tuple[str, ...] = get_args(Rule)
ANCHOR_RULES = ("sqrt", "cbrt", "lite")  # App. A: k = ⌊√N⌋; "H_diff-lite": ⌈N^{1/3}⌉ ("lite" = "cbrt")
KEY_KINDS = ("linear", "fused_qkv", "heads")


@dataclass(frozen=True)
class ArchSpec:
    """How to find and read the keys of one architecture family."""

    target_modules: tuple[str, ...]
    key_kind: str  # one of KEY_KINDS
    backend: str  # "hf" (AttentionInterface) or "timm" (forward replacement)
    lam: float = DEFAULT_LAM
    # sibling module giving the queries ("" = the same fused module), used to route query blocks
    query_sibling: str | None = None


ARCH_DEFAULTS: dict[str, ArchSpec] = {
    # HF BERT family (all-MiniLM-L6-v2 is a BertModel): BertSelfAttention.key
    "bert": ArchSpec(("self.key",), "linear", "hf", query_sibling="query"),
    "roberta": ArchSpec(("self.key",), "linear", "hf", query_sibling="query"),
    # HF ViT (transformers 5.x: ViTAttention.k_proj)
    "vit": ArchSpec(("attention.k_proj",), "linear", "hf", query_sibling="q_proj"),
    # GPT-2: fused Conv1D c_attn → split the keys out (App. G.10: λ = 0.03)
    "gpt2": ArchSpec(("attn.c_attn",), "fused_qkv", "hf", lam=0.03, query_sibling=""),
    # decoder LMs with separate projections (App. G.9: DER on the key embeddings)
    "llama": ArchSpec(("self_attn.k_proj",), "linear", "hf", query_sibling="q_proj"),
    "mistral": ArchSpec(("self_attn.k_proj",), "linear", "hf", query_sibling="q_proj"),
    "phi": ArchSpec(("self_attn.k_proj",), "linear", "hf", query_sibling="q_proj"),
    "qwen2": ArchSpec(("self_attn.k_proj",), "linear", "hf", query_sibling="q_proj"),
    # timm VisionTransformer: keys captured at attn.k_norm (see module docstring)
    "timm_vit": ArchSpec(("attn.k_norm",), "heads", "timm", query_sibling="q_norm"),
}


def detect_architecture(model) -> str:
    """Key of :data:`ARCH_DEFAULTS` for ``model`` (HF ``config.model_type``, or timm by class module).

    Raises ``ValueError`` naming what was found when the architecture is not in the table.
    """
    base = model
    for attr in ("get_base_model",):  # PEFT wrappers
        if hasattr(base, attr) and callable(getattr(base, attr)):
            try:
                base = getattr(base, attr)()
            except Exception:  # noqa: BLE001 - not a PEFT model after all
                pass
    if type(base).__module__.startswith("timm."):
        return "timm_vit"
    cfg = getattr(base, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt in ARCH_DEFAULTS:
        return mt
    raise ValueError(
        f"no DER defaults for this model (class {type(base).__name__}, model_type={mt!r}); "
        f"known: {sorted(ARCH_DEFAULTS)}. Pass DERConfig(target_modules=..., key_kind=...) explicitly."
    )


@dataclass
class DERConfig:
    r"""Where and how DER is applied to attention keys.

    Args:
        target_modules: module-name suffixes (matched on whole dotted components) or one regex string
            (full match). ``None`` → the architecture's default from :data:`ARCH_DEFAULTS`.
        exclude_modules: suffixes or a regex of names to skip.
        layers_to_transform: layer indices (the first integer component of the module name) to keep.
        num_anchors: ``"sqrt"`` (k = ⌊√N⌋, App. A/G.10), ``"cbrt"`` (H_diff-lite, k = ⌈N^{1/3}⌉) or an int.
        seq_len: N used by the ``"sqrt"``/``"cbrt"`` rules; ``None`` → read from the model config
            (ViT: patches + 1; text models: ``max_position_embeddings``).
        alpha: assignment sharpness α (App. G.10: 5 for transformers). ``alpha_final``/``anneal_steps``:
            cosine anneal α → α_final over that many ``handle.step()`` calls (App. A: 10 → 5).
        lam: λ (App. G.10: 0.01 for ViT/BERT/LLaMA, 0.03 for GPT-2; ``None`` → architecture default).
        metric: distance of Eq. 2 (``sqeuclidean`` default).
        block_size / sparsity / mode: what :func:`der.attention.convert` uses by default.
        budget: ``"head"`` (exact block budget per head, rows uneven) or ``"row"`` (top-b per query block,
            uniform rows); see :mod:`der.attention.rules`.
        every: compute H_diff only on every ``every``-th ``handle.step()`` (App. A "H_diff-lite": reduced
            update frequency; on the other steps ``handle.loss()`` is ``0·Σ anchors``, so anchors still take part).
        init: one meaning for point sets and keys (:mod:`der.initializers`): ``"data"`` = ``"random"`` —
            anchors are random keys of the first forward (App. A: random subsets work as well as
            k-means++); ``"kmeans++"`` per head; ``"normal"`` — a standard-normal draw, no data.
        anchor_update: ``"gradient"`` (the paper's: anchors are parameters minimised with the loss;
            degenerate with ``objective="entropy"``: H → 0 with one live anchor) | ``"ema"`` (stop-gradient
            EMA k-means, dead anchors re-seeded) | ``"frozen"``; see :mod:`der._anchors`.
        objective: ``"entropy"`` (Eq. 3, the paper's) | ``"marginal"`` (mean per-key assignment entropy
            − H) | ``"commitment"`` (distance of each key to its stop-gradient anchor under a balanced
            Sinkhorn assignment). geometry: ``"raw"`` | ``"normalized"`` | ``"spread"`` (scale-free).
        ema_decay: γ of the EMA step (``anchor_update="ema"``; the step runs when the loss is computed in
            training mode).
        key_kind: override the architecture table (``linear`` | ``fused_qkv`` | ``heads``).
        architecture: override detection (a key of :data:`ARCH_DEFAULTS`).
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    num_anchors: int | Literal["sqrt", "cbrt", "lite"] = "sqrt"
    seq_len: int | None = None
    alpha: float = DEFAULT_ALPHA
    alpha_final: float | None = None
    anneal_steps: int = 0
    lam: float | None = None
    metric: str = "sqeuclidean"
    block_size: int = 64
    sparsity: float = 0.75
    mode: Mode = "static"
    budget: Budget = "head"
    every: int = 1
    init: Literal["data", "random", "kmeans++", "faiss", "normal"] = "data"
    anchor_update: Literal["gradient", "ema", "frozen"] = "gradient"
    objective: Literal["entropy", "marginal", "commitment"] = "entropy"
    geometry: Literal["raw", "normalized", "spread"] = "raw"
    ema_decay: float = 0.99
    key_kind: str | None = None
    architecture: str | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise ValueError("target_modules is an empty list; give suffixes, a regex, or None for defaults")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.num_anchors, str):
            if self.num_anchors not in ANCHOR_RULES:
                raise ValueError(f"num_anchors must be an int ≥ 1 or one of {ANCHOR_RULES}, got {self.num_anchors!r}")
        elif not (isinstance(self.num_anchors, int) and self.num_anchors >= 1):
            raise ValueError(f"num_anchors must be an int ≥ 1 or one of {ANCHOR_RULES}, got {self.num_anchors!r}")
        if self.seq_len is not None and not (isinstance(self.seq_len, int) and self.seq_len >= 1):
            raise ValueError(f"seq_len must be a positive int or None, got {self.seq_len!r}")
        for name in ("alpha",) + (("alpha_final",) if self.alpha_final is not None else ()):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if self.lam is not None and not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number ≥ 0, got {self.lam!r}")
        if not (isinstance(self.anneal_steps, int) and self.anneal_steps >= 0):
            raise ValueError(f"anneal_steps must be an int ≥ 0, got {self.anneal_steps!r}")
        check_block_args(self.block_size, self.sparsity, self.mode)
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"every must be an int ≥ 1, got {self.every!r}")
        check_init(self.init)
        check_anchor_options(self.anchor_update, self.objective, self.geometry, self.ema_decay, self.metric)
        if self.key_kind is not None and self.key_kind not in KEY_KINDS:
            raise ValueError(f"key_kind must be one of {KEY_KINDS}, got {self.key_kind!r}")
        if self.architecture is not None and self.architecture not in ARCH_DEFAULTS:
            raise ValueError(f"architecture must be one of {sorted(ARCH_DEFAULTS)}, got {self.architecture!r}")
        for name in ("target_modules", "exclude_modules"):
            v = getattr(self, name)
            if isinstance(v, str):
                try:
                    re.compile(v)
                except re.error as e:
                    raise ValueError(f"{name} is not a valid regex: {v!r} ({e})") from e

    # ------------------------------------------------------------------ derived values
    def resolve_num_anchors(self, n: int) -> int:
        """k for sequence length ``n`` (App. A: ⌊√N⌋; at least 2 so that H can be > 0)."""
        if isinstance(self.num_anchors, int):
            return self.num_anchors
        return anchor_heuristic(n, self.num_anchors, minimum=2)

    def alpha_at(self, step: int) -> float:
        """α after ``step`` calls of ``handle.step()`` (cosine anneal α → α_final, App. A/G.11)."""
        return alpha_schedule(step, self.alpha, self.alpha_final, self.anneal_steps)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> DERConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DERConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


def check_block_args(block_size: int, sparsity: float, mode: str) -> None:
    """Validate the conversion arguments shared by :class:`DERConfig` and ``convert``."""
    if not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def infer_seq_len(model) -> int:
    """N for the anchor rule from a model's config (ViT: (image/patch)² + 1; else max positions)."""
    cfg = getattr(model, "config", None)
    if cfg is None and hasattr(model, "patch_embed"):  # timm
        grid = getattr(model.patch_embed, "grid_size", None)
        if grid is not None:
            return int(grid[0] * grid[1]) + int(getattr(model, "num_prefix_tokens", 1))
    if cfg is not None:
        if getattr(cfg, "model_type", None) == "vit":
            img, patch = cfg.image_size, cfg.patch_size
            img = img if isinstance(img, int) else img[0]
            patch = patch if isinstance(patch, int) else patch[0]
            return (img // patch) ** 2 + 1
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            v = getattr(cfg, name, None)
            if isinstance(v, int) and v > 0:
                return v
    raise ValueError("cannot infer the sequence length from the model; pass DERConfig(seq_len=N)")
