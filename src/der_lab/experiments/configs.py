"""Full-scale configurations of the paper's settings (for users with GPUs and the datasets on disk).

Each is a dataclass with the paper's hyper-parameters (App. G.10 table: α = 5, k = √N, λ = 0.01,
75% block sparsity) and a :meth:`load` that builds the real data loader from local files
(:mod:`der.data`) — nothing downloads. Model weights come from a local folder (``model_path``) loaded with
``HF_HUB_OFFLINE=1``. These are not run here (no GPU, no datasets); tests load each from tiny generated files.

``der exp configs [--name NAME]`` prints them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from torch.utils.data import Dataset

from der.data import cifar_dataset, cnndm_dataset, glue_dataset, imagenet_folder, wikitext_dataset

__all__ = [
    "FullConfig",
    "ViTSmallCIFAR100",
    "ViTBaseImageNet",
    "BertGLUE",
    "LlamaCNNDMLoRA",
    "Phi2WikiText103",
    "main",
]


@dataclasses.dataclass
class FullConfig:
    data_root: str = ""
    model_path: str = ""
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-4
    block_size: int = 64
    sparsity: float = 0.75
    alpha: float = 5.0
    lam: float = 0.01
    seed: int = 0

    def _root(self) -> Path:
        if not self.data_root:
            raise ValueError(f"{type(self).__name__}.data_root is empty: point it at the local dataset folder")
        return Path(self.data_root)

    def load(self, split: str, tokenizer=None) -> Dataset:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclasses.dataclass
class ViTSmallCIFAR100(FullConfig):
    """Table 5: ViT-S/16 at 224 px on CIFAR-100 (python pickles), 300 epochs."""

    epochs: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    image_size: int = 224

    def load(self, split: str, tokenizer=None) -> Dataset:
        return cifar_dataset(self._root(), split, num_classes=100)


@dataclasses.dataclass
class ViTBaseImageNet(FullConfig):
    """Table 5 / abstract: ViT-B/16 on ImageNet-1K (``root/{train,val}/<wnid>/*.JPEG``)."""

    epochs: int = 300
    batch_size: int = 256
    lr: float = 1e-3
    image_size: int = 224

    def load(self, split: str, tokenizer=None) -> Dataset:
        return imagenet_folder(self._root(), "val" if split == "test" else split, image_size=self.image_size)


@dataclasses.dataclass
class BertGLUE(FullConfig):
    """Table 11: BERT-base fine-tuned per GLUE task (``glue_data/<TASK>/*.tsv``), 3 epochs, lr 2e-5."""

    task: str = "SST-2"
    epochs: int = 3
    lr: float = 2e-5
    max_length: int = 128

    def load(self, split: str, tokenizer=None) -> Dataset:
        split = {"test": "dev_matched" if self.task == "MNLI" else "dev"}.get(split, split)
        return glue_dataset(self._root(), self.task, split, tokenizer=tokenizer, max_length=self.max_length)


@dataclasses.dataclass
class LlamaCNNDMLoRA(FullConfig):
    """Tables 3/7: LLaMA-2-7B, 4-bit LoRA (r = 8, last 12 layers), CNN/DailyMail, context 1024 (8K in Table 7)."""

    batch_size: int = 4
    lr: float = 2e-4
    lora_rank: int = 8
    lora_layers: int = 12
    max_length: int = 1024
    target_max_length: int = 128
    quantize_4bit: bool = True

    def load(self, split: str, tokenizer=None) -> Dataset:
        name = {"train": "train", "val": "validation", "test": "test"}.get(split, split)
        root = self._root()
        path = next((root / f"{name}{ext}" for ext in (".csv", ".jsonl") if (root / f"{name}{ext}").is_file()),
                    root / f"{name}.csv")
        return cnndm_dataset(path, tokenizer=tokenizer, max_length=self.max_length,
                             target_max_length=self.target_max_length)


@dataclasses.dataclass
class Phi2WikiText103(FullConfig):
    """Table 3: Phi-2 (2.7B), 4-bit LoRA, WikiText-103 raw, context 1024, perplexity."""

    batch_size: int = 4
    lr: float = 2e-4
    lora_rank: int = 8
    context: int = 1024
    quantize_4bit: bool = True

    def load(self, split: str, tokenizer=None) -> Dataset:
        return wikitext_dataset(self._root(), {"val": "valid"}.get(split, split), context=self.context,
                                tokenizer=tokenizer)


FULL_CONFIGS: dict[str, type[FullConfig]] = {
    "vit-s-cifar100": ViTSmallCIFAR100,
    "vit-b-imagenet": ViTBaseImageNet,
    "bert-glue": BertGLUE,
    "llama2-7b-cnndm-lora": LlamaCNNDMLoRA,
    "phi2-wikitext103": Phi2WikiText103,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="der exp configs", description="print the full-scale configurations")
    p.add_argument("--name", choices=sorted(FULL_CONFIGS), default=None)
    p.add_argument("--quick", action="store_true", help="accepted for uniformity (printing is instant)")
    a = p.parse_args(argv)
    names = [a.name] if a.name else sorted(FULL_CONFIGS)
    print(json.dumps({n: dataclasses.asdict(FULL_CONFIGS[n]()) for n in names}, indent=2))
    return 0
