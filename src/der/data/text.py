"""Text corpora: Python's stdlib sources as a byte-level corpus, and WikiText raw files.

The stdlib corpus is real text that every Python install ships: ``*.py`` files under
``sysconfig.get_paths()["stdlib"]`` (``site-packages`` and test suites excluded), split into train and
validation **by file** (a stable hash of the relative path), so no validation text leaks into training.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = ["stdlib_corpus", "ByteWindows", "wikitext_dataset", "TokenBlocks", "Corpus"]

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test", "lib2to3"}


@dataclass
class Corpus:
    """Train/val byte tensors (uint8) and the files each came from."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: list[str]
    val_files: list[str]


def _is_val(rel: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:8], "big")
    return (h / 2**64) < val_fraction


def stdlib_corpus(max_bytes: int = 8_000_000, val_fraction: float = 0.1, root: str | Path | None = None,
                  pattern: str = "*.py") -> Corpus:
    """Byte-level corpus of the stdlib (or any folder ``root``), split by file; ``max_bytes`` caps the total.

    Files are visited in sorted order; train and validation keep the same proportion under the cap.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_bytes < 1024:
        raise ValueError(f"max_bytes must be >= 1024, got {max_bytes}")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob(pattern) if p.is_file() and not _SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    if not files:
        raise FileNotFoundError(f"no files matching {pattern!r} under {root}")
    budget = {True: int(max_bytes * val_fraction), False: max_bytes - int(max_bytes * val_fraction)}
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    names: dict[bool, list[str]] = {True: [], False: []}
    for p in files:
        rel = p.relative_to(root).as_posix()
        v = _is_val(rel, val_fraction)
        if budget[v] <= 0:
            continue
        data = p.read_bytes()[: budget[v]]
        budget[v] -= len(data)
        parts[v].append(data)
        names[v].append(rel)
        if budget[True] <= 0 and budget[False] <= 0:
            break
    if not parts[True] or not parts[False]:
        raise ValueError(f"too few files under {root} to split train/val by file ({len(files)} files)")

    def cat(bs: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(bs)), dtype=torch.uint8).clone()

    return Corpus(cat(parts[False]), cat(parts[True]), names[False], names[True])


class ByteWindows(Dataset):
    """Windows of ``context + 1`` tokens: ``(input ids (context,), targets (context,))`` (int64).

    ``stride`` defaults to ``context`` (non-overlapping windows, the usual perplexity protocol).
    """

    def __init__(self, data: torch.Tensor, context: int, stride: int | None = None) -> None:
        if data.ndim != 1:
            raise ValueError(f"data must be a 1-D token tensor, got shape {tuple(data.shape)}")
        if context < 1 or len(data) < context + 1:
            raise ValueError(f"need context >= 1 and len(data) >= context + 1, got {context} and {len(data)}")
        self.data, self.context, self.stride = data, context, stride or context
        self.n = (len(data) - context - 1) // self.stride + 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = i * self.stride
        w = self.data[s : s + self.context + 1].long()
        return w[:-1], w[1:]


TokenBlocks = ByteWindows  # same windowing for tokenizer ids


def wikitext_dataset(root: str | Path, split: str = "train", context: int = 1024, tokenizer=None,
                     variant: str = "wikitext-103-raw") -> ByteWindows:
    """WikiText raw files (``wiki.{train,valid,test}.raw``, or ``*.tokens``) → fixed-length token windows.

    ``tokenizer``: an HF tokenizer (ids via ``tokenizer(text)["input_ids"]``); ``None`` gives bytes.
    ``root`` may be the folder holding the files or its parent containing ``variant/``.
    """
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be train/valid/test, got {split!r}")
    root = Path(root)
    cands = [root / f"wiki.{split}.raw", root / f"wiki.{split}.tokens",
             root / variant / f"wiki.{split}.raw", root / variant / f"wiki.{split}.tokens"]
    path = next((c for c in cands if c.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no WikiText file for split {split!r}; looked for {[str(c) for c in cands]}")
    text = path.read_text(encoding="utf-8")
    if tokenizer is None:
        ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()
    else:
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    return ByteWindows(ids, context)
