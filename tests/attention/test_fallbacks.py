"""convert never crashes and never runs a shape that cannot win: dense fallbacks (warned once, counted),
the once-per-forward mask check, and sparsity over the real tokens of padded batches."""

import warnings

import pytest
import torch
from _der_hf_models import tiny_bert, tiny_gpt2, tokens
from hypothesis import given, settings
from hypothesis import strategies as st

from der.attention import BlockLayout, DERConfig, _swap, block_sparse_attention, convert, inject
from der.attention.rules import reselect, select_blocks, valid_blocks


def _bert(n=64, bs=16, **kw):
    model = tiny_bert()
    x = tokens(2, n)
    with torch.no_grad():
        ref = model(input_ids=x).last_hidden_state
    h = inject(model, DERConfig(seq_len=n, block_size=bs))
    return model, x, ref, h


def _out(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).last_hidden_state


def test_input_shorter_than_one_block_runs_dense_and_warns_once():
    model, x, _, h = _bert()
    convert(model, sparsity=0.5, calib_inputs=[{"input_ids": x}])
    short = x[:, :9]  # was: ValueError "sequence of 9 tokens is shorter than one block" inside encode
    with pytest.warns(UserWarning, match="shorter than one block") as rec:
        out = _out(model, short)
    assert sum("shorter than one block" in str(w.message) for w in rec) == 1  # once per reason
    assert h.dense_fallbacks == {"an input shorter than one block": 2}  # counted per layer call
    torch.testing.assert_close(out, _out(tiny_bert(), short), atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: no second warning
        _out(model, short)
    assert h.dense_fallbacks["an input shorter than one block"] == 4


def test_min_seq_len_and_auto():
    model, x, ref, h = _bert()
    convert(model, sparsity=0.5, calib_inputs=[{"input_ids": x}], min_seq_len=48)
    assert h.converted.min_seq_len == 48 and h.converted.settings()["min_seq_len"] == 48
    with pytest.warns(UserWarning, match="min_seq_len=48"):
        torch.testing.assert_close(_out(model, x[:, :40]), _out(tiny_bert(), x[:, :40]), atol=1e-5, rtol=1e-5)
    h.dense_fallbacks.clear()
    _out(model, x)  # 64 tokens: block-sparse
    assert h.dense_fallbacks == {}
    assert _swap.resolve_min_seq_len("auto", 16) == max(_swap.AUTO_MIN_SEQ_LEN, 32)
    assert _swap.resolve_min_seq_len("auto", 1024) == 2048
    for bad in (-1, 1.5, "long", True):
        with pytest.raises(ValueError, match="min_seq_len"):
            _swap.resolve_min_seq_len(bad, 16)


def test_too_few_blocks_skipped_runs_dense():
    model, x, ref, h = _bert()
    convert(model, sparsity=0.25, calib_inputs=[{"input_ids": x}], min_seq_len=16)  # 4 blocks: 1 skipped/row
    with pytest.warns(UserWarning, match="too few key blocks skipped"):
        torch.testing.assert_close(_out(model, x), ref, atol=1e-5, rtol=1e-5)
    # causal: a query block has (nb + 1) / 2 valid key blocks on average
    st_ = _swap.ConvertState(h, 0.75, 16, "static", "auto", min_seq_len=16)
    assert _swap._cannot_win(st_, 64, causal=True) is not None  # 0.75 · 2.5 < 2
    assert _swap._cannot_win(st_, 128, causal=True) is None  # 0.75 · 4.5 ≥ 2
    st_.min_seq_len = 0  # 0: no break-even checks, only the one-block limit
    assert _swap._cannot_win(st_, 64, causal=True) is None and _swap._cannot_win(st_, 8, False) is not None


def test_mask_is_checked_once_per_forward(monkeypatch):
    model, x, ref, h = _bert()
    convert(model, sparsity=0.5, calib_inputs=[{"input_ids": x}], min_seq_len=0)
    calls = []
    real = _swap._key_padding
    monkeypatch.setattr(_swap, "_key_padding", lambda *a: calls.append(1) or real(*a))
    am = torch.ones_like(x)
    am[1, 40:] = 0
    _out(model, x, attention_mask=am)
    assert len(calls) == 1  # two layers, one mask object: checked once
    _out(model, x, attention_mask=am)
    assert len(calls) == 2  # a new forward builds a new mask
    assert h.dense_fallbacks == {}


@settings(max_examples=30, deadline=None)
@given(nb=st.integers(2, 9), s=st.floats(0.0, 0.9), causal=st.booleans(), budget=st.sampled_from(["head", "row"]),
       lens=st.lists(st.integers(1, 9), min_size=1, max_size=3), seed=st.integers(0, 999))
def test_selection_over_valid_blocks(nb, s, causal, budget, lens, seed):
    g = torch.Generator().manual_seed(seed)
    valid = torch.stack([torch.arange(nb) < min(n, nb) for n in lens])  # (B, nb) real prefixes
    scores = torch.rand(1, 2, nb, nb, generator=g, dtype=torch.float64)
    lay = select_blocks(scores, s, causal, budget, valid[:, None, :])
    B = len(lens)
    assert lay.shape == (B, 2, nb, nb)
    for b in range(B):
        r = int(valid[b].sum())
        pair = valid[b][:, None] & valid[b][None, :]
        if causal:
            pair &= torch.ones(nb, nb, dtype=torch.bool).tril()
        assert not bool((lay[b] & ~pair).any())  # nothing of pure padding, nothing in the future
        assert bool(lay[b].diagonal(dim1=-2, dim2=-1)[:, :r].all())  # every real query block sees itself
        nv = int(pair.sum())
        kept = lay[b].sum((-1, -2))
        if budget == "head":
            assert bool((kept == max(r, round((1 - s) * nv))).all())
            assert bool(((kept - (1 - s) * nv).abs() <= r).all())  # target within one block per row
        else:
            per_row = pair.sum(-1)
            want = ((per_row.double() * (1 - s)).round().long().clamp(min=1) * valid[b])
            assert torch.equal(lay[b].sum(-1), want.expand(2, nb))
    if bool(valid.all()):  # no padding: exactly the unpadded selection
        assert torch.equal(lay, select_blocks(scores, s, causal, budget).expand_as(lay))


def _reference(q, k, v, lay: BlockLayout, kpm, scale):
    """Float64 masked dense attention (explicit softmax)."""
    m = lay.to_dense() & kpm[:, None, None, :]
    sc = (q.double() @ k.double().transpose(-1, -2)) * scale
    p = torch.softmax(sc.masked_fill(~m, float("-inf")), -1).nan_to_num(0.0)
    return p @ v.double()


@pytest.mark.parametrize("causal", [False, True])
def test_reselect_padded_batch_matches_float64_reference(causal):
    g = torch.Generator().manual_seed(0)
    B, H, N, D, bs, s = 3, 2, 70, 8, 8, 0.6
    nb = 9
    scores = torch.rand(1, H, nb, nb, generator=g, dtype=torch.float64)
    full = BlockLayout(select_blocks(scores, s, causal), bs, N, causal, scores)
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, 37:] = False  # 5 real blocks (the 5th partly padding)
    kpm[2, 20:] = False  # 3 real blocks
    real = valid_blocks(kpm, bs)
    assert real.sum(-1).tolist() == [9, 5, 3]
    lay = reselect(full, s, "head", N, real)
    assert lay.shape == (B, H, nb, nb)
    assert torch.equal(lay.mask[0], full.mask[0])  # an unpadded sequence keeps the calibrated layout
    for b in range(B):
        r = int(real[b].sum())
        nv = r * (r + 1) // 2 if causal else r * r
        kept = lay.mask[b].sum((-1, -2))
        assert bool((kept == max(r, round((1 - s) * nv))).all())  # the budget over the real blocks
        assert not bool(lay.mask[b, :, r:].any() or lay.mask[b, :, :, r:].any())  # pure padding skipped
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    out = block_sparse_attention(q, k, v, lay, backend="gather", key_padding_mask=kpm)
    ref = _reference(q, k, v, lay, kpm, D ** -0.5)
    rows = kpm[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[rows].double(), ref[rows], atol=1e-5, rtol=1e-5)  # real rows only
    assert reselect(full, s, "head", N) == full  # same length, no padding: as calibrated
    short = reselect(full, s, "head", 40)  # fewer blocks: re-selected at the same budget, not cropped
    nv = 25 if not causal else 15
    assert bool((short.mask.sum((-1, -2)) == max(5, round((1 - s) * nv))).all())
    with pytest.raises(ValueError, match="scores"):
        reselect(BlockLayout(full.mask, bs, N, causal), s)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2])
def test_converted_padded_batch_counts_real_blocks(monkeypatch, mode, make):
    model = make()
    n, bs, s = 64, 8, 0.5
    x = tokens(2, n)
    fwd = (lambda m, **kw: m(input_ids=x, **kw).last_hidden_state) if make is tiny_bert else \
        (lambda m, **kw: m(input_ids=x, **kw).logits)
    h = inject(model, DERConfig(seq_len=n, block_size=bs))
    convert(model, sparsity=s, mode=mode, calib_inputs=[{"input_ids": x}] if mode == "static" else None,
            min_seq_len=0)
    seen = []
    real_fn = _swap.block_sparse_attention
    monkeypatch.setattr(_swap, "block_sparse_attention", lambda q, k, v, lay, **kw: seen.append(lay) or
                        real_fn(q, k, v, lay, **kw))
    am = torch.ones_like(x)
    am[1, 27:] = 0  # sequence 1: 4 real blocks of 8
    with torch.no_grad():
        out = fwd(model, attention_mask=am)
    assert h.dense_fallbacks == {} and len(seen) == 2
    causal = make is tiny_gpt2
    for lay in seen:
        assert lay.batch == 2
        m1 = lay.mask[1]
        assert not bool(m1[:, 4:].any() or m1[:, :, 4:].any())  # fully padded query and key blocks skipped
        nv = 10 if causal else 16
        assert bool((m1.sum((-1, -2)) == max(4, round((1 - s) * nv))).all())
    # the real rows equal the masked dense reference of the same layouts
    it = iter(seen)
    monkeypatch.setattr(_swap, "block_sparse_attention",
                        lambda q, k, v, lay, **kw: real_fn(q, k, v, next(it), **{**kw, "backend": "dense"}))
    with torch.no_grad():
        ref = fwd(model, attention_mask=am)
    real = am.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def test_layout_scores_saved_and_old_files_load(tmp_path):
    scores = torch.rand(2, 3, 3, dtype=torch.float64)
    lay = BlockLayout(select_blocks(scores, 0.5), 4, 12, False, scores)
    p = lay.save(tmp_path / "lay.safetensors")
    back = BlockLayout.load(p)
    assert back == lay and torch.equal(back.scores, lay.scores)
    old = BlockLayout(lay.mask, 4, 12).save(tmp_path / "old.safetensors")  # no scores: still loads
    assert BlockLayout.load(old).scores is None
    assert lay.repeat_heads(2).scores.shape == (1, 4, 3, 3) and lay.resize(8).scores.shape == (1, 2, 2, 2)
    with pytest.raises(ValueError, match="scores"):
        BlockLayout(lay.mask, 4, 12, False, torch.rand(2, 2, 3))
    with pytest.raises(TypeError, match="scores"):
        BlockLayout(lay.mask, 4, 12, False, torch.ones(2, 3, 3, dtype=torch.bool))


def test_handle_state_keeps_scores_and_min_seq_len():
    model, x, ref, h = _bert()
    convert(model, sparsity=0.5, calib_inputs=[{"input_ids": x}], min_seq_len=32)
    state = h.state_dict()
    lay0 = next(iter(h.converted.layouts.values()))
    assert lay0.scores is not None
    model2 = tiny_bert()
    h2 = inject(model2, DERConfig(seq_len=64, block_size=16))
    h2.load_state_dict(state)
    assert h2.converted.min_seq_len == 32
    lay1 = next(iter(h2.converted.layouts.values()))
    torch.testing.assert_close(lay1.scores, lay0.scores)
