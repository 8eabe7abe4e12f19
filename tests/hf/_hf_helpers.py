"""Shared by the tests/hf tests: the tiny real HF models of tests/attention (no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "attention"))

from _der_hf_models import images, lora_llama, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit, tokens  # noqa: E402

__all__ = ["images", "lora_llama", "tiny_bert", "tiny_gpt2", "tiny_llama", "tiny_vit", "tokens"]
