r"""Quality of a (block-sparse) sentence-embedding model against its dense original.

* :func:`sentence_embeddings` — mean pooling of the last hidden state over the valid (non-padding)
  tokens, then L2 normalisation: the pooling that sentence-transformers configures for all-MiniLM-L6-v2.
* :func:`cosine_to_reference` — per-sentence cosine of two embedding sets, with its mean and minimum.
* :func:`spearman` — Spearman rank correlation, ties given their average rank (as
  ``scipy.stats.spearmanr``).
* :func:`pair_cosines` / :func:`pair_similarity_spearman` — an STS-style check: the cosine of each
  sentence pair under a model, and the rank correlation of those cosines with a reference model's and
  with the gold scores.

The evaluation text itself (:func:`load_sentences`, :func:`load_pairs`) lives in :mod:`der_lab.data`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from der_lab.data import STSPair, load_pairs, load_sentences

__all__ = ["CosineStats", "load_sentences", "load_pairs", "sentence_embeddings", "cosine_to_reference",
           "spearman", "pair_cosines", "pair_similarity_spearman"]


class CosineStats(NamedTuple):
    """Per-sentence cosines ``(M,)`` and their mean and minimum."""

    mean: float
    min: float
    per_sentence: torch.Tensor


def sentence_embeddings(model: torch.nn.Module, tokenizer, texts: Sequence[str], max_length: int = 128,
                        batch_size: int = 32, pad_to_max_length: bool = False) -> torch.Tensor:
    r"""L2-normalised mean-pooled embeddings ``(M, hidden)`` (float32) of ``texts``, without gradients.

    .. math:: e_i = \frac{\sum_t m_{it} h_{it}}{\lVert \sum_t m_{it} h_{it} \rVert}

    with :math:`m` the tokenizer's attention mask. Texts are truncated to ``max_length`` tokens; batches
    are padded to their longest text, or to ``max_length`` when ``pad_to_max_length`` (a static block
    layout calibrated at that length then covers every batch).
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts must be a sequence of str, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("texts must not be empty")
    if max_length < 2 or batch_size < 1:
        raise ValueError(f"max_length must be >= 2 and batch_size >= 1, got {max_length}, {batch_size}")
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                batch = tokenizer(list(texts[i : i + batch_size]), truncation=True, max_length=max_length,
                                  padding="max_length" if pad_to_max_length else True, return_tensors="pt")
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model(**batch)
                h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
                pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
                outs.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
    finally:
        model.train(was)
    return torch.cat(outs)


def cosine_to_reference(emb: torch.Tensor, ref: torch.Tensor) -> CosineStats:
    """Cosine of each row of ``emb (M, d)`` with the same row of ``ref (M, d)``."""
    if emb.dim() != 2 or emb.shape != ref.shape or emb.shape[0] == 0:
        raise ValueError(f"emb and ref must be equal non-empty (M, d) tensors, got {tuple(emb.shape)}, "
                         f"{tuple(ref.shape)}")
    c = torch.nn.functional.cosine_similarity(emb.double(), ref.double(), dim=-1)
    return CosineStats(float(c.mean()), float(c.min()), c.float())


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing their average rank."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of the last member of each tie group
    return (last - (counts.double() - 1) / 2)[inverse]


def spearman(a, b) -> float:
    r"""Spearman rank correlation of two equal-length 1-D sequences (Pearson correlation of the ranks,
    ties at their average rank). ``nan`` when either input is constant, as in ``scipy.stats.spearmanr``.

    >>> round(spearman([1, 2, 3, 4], [10, 20, 30, 45]), 6)
    1.0
    >>> round(spearman([1, 2, 2, 3], [3, 1, 2, 0]), 6)
    -0.948683
    """
    x = torch.as_tensor(a, dtype=torch.float64).detach().cpu()
    y = torch.as_tensor(b, dtype=torch.float64).detach().cpu()
    if x.dim() != 1 or x.shape != y.shape or x.numel() < 2:
        raise ValueError(f"a and b must be 1-D of equal length >= 2, got shapes {tuple(x.shape)}, {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("a and b must be finite (got nan or inf)")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = (rx.square().sum() * ry.square().sum()).sqrt()
    if den == 0:
        return float("nan")
    return max(-1.0, min(1.0, float((rx * ry).sum() / den)))


def pair_cosines(model: torch.nn.Module, tokenizer, pairs: Sequence[STSPair], max_length: int = 128,
                 batch_size: int = 32, pad_to_max_length: bool = False) -> torch.Tensor:
    """Cosine similarity ``(P,)`` of the two sentences of each pair under ``model``."""
    if len(pairs) == 0:
        raise ValueError("pairs must not be empty")
    kw = dict(max_length=max_length, batch_size=batch_size, pad_to_max_length=pad_to_max_length)
    e1 = sentence_embeddings(model, tokenizer, [p[1] for p in pairs], **kw)
    e2 = sentence_embeddings(model, tokenizer, [p[2] for p in pairs], **kw)
    return (e1.double() * e2.double()).sum(-1)


def pair_similarity_spearman(model: torch.nn.Module, reference: torch.nn.Module | torch.Tensor, tokenizer,
                             pairs: Sequence[STSPair], max_length: int = 128, batch_size: int = 32,
                             pad_to_max_length: bool = False) -> dict[str, float]:
    """STS-style check of ``model`` (e.g. sparse) against ``reference`` (the dense model, or its
    precomputed :func:`pair_cosines`): Spearman of the pair cosines model vs reference, and each vs gold.

    Returns ``{"vs_reference", "model_vs_gold", "reference_vs_gold"}``.
    """
    kw = dict(max_length=max_length, batch_size=batch_size, pad_to_max_length=pad_to_max_length)
    cos = pair_cosines(model, tokenizer, pairs, **kw)
    ref = reference if isinstance(reference, torch.Tensor) else pair_cosines(reference, tokenizer, pairs, **kw)
    if ref.shape != cos.shape:
        raise ValueError(f"reference cosines must be ({len(pairs)},), got {tuple(ref.shape)}")
    gold = [float(p[0]) for p in pairs]
    return {"vs_reference": spearman(cos, ref), "model_vs_gold": spearman(cos, gold),
            "reference_vs_gold": spearman(ref, gold)}
