"""Evaluation text written for this project (original prose, English, many domains).

* ``sentences.txt`` — one sentence or short passage per line (274 lines; about 45 % are longer than 64
  word-piece tokens of the MiniLM tokenizer, a few longer than 256, some only a few words).
* ``sts_pairs.tsv`` — sentence pairs with a graded similarity score 0–5 (header
  ``score\\tsentence1\\tsentence2``): paraphrases, same topic with a different claim, unrelated pairs, and
  hard cases (negations, swapped roles, one changed word or number).

:func:`load_sentences` and :func:`load_pairs` read them.
"""

from __future__ import annotations

from importlib import resources
from typing import NamedTuple

__all__ = ["STSPair", "load_sentences", "load_pairs"]

_HEADER = ["score", "sentence1", "sentence2"]


class STSPair(NamedTuple):
    """One graded pair: ``score`` in [0, 5] (5 = same meaning)."""

    score: float
    sentence1: str
    sentence2: str


def _read(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def load_sentences() -> list[str]:
    """The evaluation sentences/passages, in file order (empty lines skipped)."""
    return [s for s in (line.strip() for line in _read("sentences.txt").splitlines()) if s]


def load_pairs() -> list[STSPair]:
    """The graded sentence pairs, in file order; raises ``ValueError`` naming a malformed line."""
    lines = _read("sts_pairs.tsv").splitlines()
    if not lines or lines[0].split("\t") != _HEADER:
        raise ValueError(f"sts_pairs.tsv must start with the header {_HEADER}, got {lines[:1]}")
    pairs = []
    for no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 3:
            raise ValueError(f"sts_pairs.tsv line {no}: expected 3 tab-separated fields, got {len(cols)}")
        score = float(cols[0])
        if not 0.0 <= score <= 5.0:
            raise ValueError(f"sts_pairs.tsv line {no}: score must be in [0, 5], got {score}")
        pairs.append(STSPair(score, cols[1].strip(), cols[2].strip()))
    return pairs
