"""GLUE (TSV) and CNN/DailyMail (CSV or JSONL) as lists of raw text examples, tokenized by a collate.

GLUE layouts follow the official ``glue_data/<TASK>/{train,dev}.tsv`` files: which columns hold the
text(s) and the label differs by task (table :data:`GLUE_TASKS`); CoLA's train/dev files have no header.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = ["GLUE_TASKS", "glue_dataset", "cnndm_dataset", "TextPairs"]

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(frozen=True)
class GlueTask:
    text_a: str | int
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...] | None  # None: regression (STS-B)
    header: bool = True


GLUE_TASKS: dict[str, GlueTask] = {
    "CoLA": GlueTask(3, None, 1, ("0", "1"), header=False),
    "SST-2": GlueTask("sentence", None, "label", ("0", "1")),
    "MRPC": GlueTask("#1 String", "#2 String", "Quality", ("0", "1")),
    "STS-B": GlueTask("sentence1", "sentence2", "score", None),
    "QQP": GlueTask("question1", "question2", "is_duplicate", ("0", "1")),
    "MNLI": GlueTask("sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral")),
    "QNLI": GlueTask("question", "sentence", "label", ("entailment", "not_entailment")),
    "RTE": GlueTask("sentence1", "sentence2", "label", ("entailment", "not_entailment")),
    "WNLI": GlueTask("sentence1", "sentence2", "label", ("0", "1")),
}


class TextPairs(Dataset):
    """``(text_a, text_b or None, label)`` examples; :meth:`collate` tokenizes a batch with an HF tokenizer."""

    def __init__(self, examples: list[tuple[str, str | None, float | int]], tokenizer=None, max_length: int = 128,
                 target_max_length: int | None = None) -> None:
        if not examples:
            raise ValueError("no examples")
        self.examples, self.tokenizer = examples, tokenizer
        self.max_length, self.target_max_length = max_length, target_max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        return self.examples[i]

    def collate(self, batch: list) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("TextPairs.collate needs a tokenizer (pass tokenizer=...)")
        a = [b[0] for b in batch]
        bs = [b[1] for b in batch]
        enc = self.tokenizer(a, bs if all(x is not None for x in bs) else None, truncation=True,
                             max_length=self.max_length, padding=True, return_tensors="pt")
        labels = [b[2] for b in batch]
        if isinstance(labels[0], str):  # seq2seq target (summaries)
            tgt = self.tokenizer(labels, truncation=True, max_length=self.target_max_length or self.max_length,
                                 padding=True, return_tensors="pt")
            enc["labels"] = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
        else:
            enc["labels"] = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.int64)
        return dict(enc)


def glue_dataset(root: str | Path, task: str, split: str = "train", tokenizer=None, max_length: int = 128) -> TextPairs:
    """Read ``root/<task>/<split>.tsv`` (split: train, dev, dev_matched, dev_mismatched)."""
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {sorted(GLUE_TASKS)}")
    spec = GLUE_TASKS[task]
    path = Path(root) / task / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"expected GLUE file {path}")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if spec.header:
        head, rows = rows[0], rows[1:]

        def col(c: str | int | None) -> int | None:
            if c is None or isinstance(c, int):
                return c
            if c not in head:
                raise ValueError(f"{path}: expected column {c!r}, header has {head}")
            return head.index(c)
    else:
        def col(c: str | int | None) -> int | None:
            return c  # type: ignore[return-value]

    ia, ib, il = col(spec.text_a), col(spec.text_b), col(spec.label)
    ex = []
    for r in rows:
        if not r or il >= len(r):
            continue
        raw = r[il]
        if spec.labels is None:
            label: float | int = float(raw)
        elif raw in spec.labels:
            label = spec.labels.index(raw)
        else:
            raise ValueError(f"{path}: label {raw!r} not in {spec.labels}")
        ex.append((r[ia], r[ib] if ib is not None else None, label))
    return TextPairs(ex, tokenizer=tokenizer, max_length=max_length)


def cnndm_dataset(path: str | Path, tokenizer=None, max_length: int = 1024, target_max_length: int = 128,
                  article_key: str = "article", summary_key: str = "highlights") -> TextPairs:
    """CNN/DailyMail from a CSV (Kaggle/HF export: ``id,article,highlights``) or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a CNN/DailyMail .csv or .jsonl file at {path}")
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise ValueError(f"expected .csv or .jsonl, got {path.suffix!r}")
    if rows and (article_key not in rows[0] or summary_key not in rows[0]):
        raise ValueError(f"{path}: expected fields {article_key!r}, {summary_key!r}; got {sorted(rows[0])}")
    ex = [(r[article_key], None, r[summary_key]) for r in rows]
    return TextPairs(ex, tokenizer=tokenizer, max_length=max_length, target_max_length=target_max_length)
