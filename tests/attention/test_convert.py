import pytest
import torch
from _der_hf_models import images, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit, tokens

from der.attention import BlockLayout, DERConfig, convert, inject, revert
from der.attention import io as der_io
from der.attention.conversion import summary

CASES = {
    "bert": (tiny_bert, lambda m, x: m(input_ids=x).last_hidden_state, lambda: tokens(2, 64)),
    "vit": (tiny_vit, lambda m, x: m(pixel_values=x).logits, images),
    "gpt2": (tiny_gpt2, lambda m, x: m(x).logits, lambda: tokens(2, 64)),
    "llama": (tiny_llama, lambda m, x: m(x).logits, lambda: tokens(2, 64)),
}


def _setup(name, **kw):
    make, fwd, data = CASES[name]
    model, x = make(), data()
    with torch.no_grad():
        ref = fwd(model, x)
    h = inject(model, DERConfig(seq_len=64, block_size=16, **kw))
    return model, fwd, x, ref, h


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_zero_sparsity_equals_dense(name, mode):
    model, fwd, x, ref, h = _setup(name)
    convert(model, min_seq_len=0, sparsity=0.0, mode=mode, calib_inputs=[x] if name != "bert" else [{"input_ids": x}])
    with torch.no_grad():
        torch.testing.assert_close(fwd(model, x), ref, atol=2e-5, rtol=1e-4)
    assert h.dense_fallbacks == {}
    h.remove()
    with torch.no_grad():
        torch.testing.assert_close(fwd(model, x), ref)


@pytest.mark.parametrize("rule", ["auto", "anchors", "bigbird"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_sparse_kernel_equals_masked_dense_reference(name, rule):
    outs, lays = {}, {}
    for backend in ("gather", "dense"):
        model, fwd, x, ref, h = _setup(name)
        calib = [{"input_ids": x}] if name == "bert" else [x]
        convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=calib, backend=backend, rule=rule)
        assert h.converted.rule == {"auto": "attention"}.get(rule, rule)
        with torch.no_grad():
            outs[backend] = fwd(model, x)
        lays[backend] = h.converted.layouts
        info = summary(h)
        assert all(v == pytest.approx(0.5, abs=0.1) for v in info["layout_sparsity"].values())
        assert info["dense_fallbacks"] == {}
    torch.testing.assert_close(outs["gather"], outs["dense"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs["gather"], ref, atol=1e-4)  # really sparse, not dense in disguise
    causal = name != "bert"
    for lay in lays["gather"].values():
        assert isinstance(lay, BlockLayout) and lay.causal == causal and lay.seq_len == 64
        heads = 4 if rule != "bigbird" else h.sites[0].heads  # BigBird: one layout per kv head (GQA-shared)
        assert lay.shape == (1, heads, 4, 4) and (not causal or not bool(lay.mask.triu(1).any()))


@pytest.mark.parametrize("rule", ["auto", "anchors"])
def test_dynamic_layouts_are_per_input_and_gqa_expanded(rule):
    model, fwd, x, ref, h = _setup("llama", mode="dynamic")
    convert(model, min_seq_len=0, sparsity=0.5, rule=rule)
    assert h.converted.rule == {"auto": "moba"}.get(rule, rule)
    seen = []
    import der.attention._swap as C

    orig = C.block_sparse_attention

    def spy(q, k, v, layout, *a, **kw):
        seen.append(layout)
        return orig(q, k, v, layout, *a, **kw)

    C.block_sparse_attention = spy
    try:
        with torch.no_grad():
            fwd(model, x)
    finally:
        C.block_sparse_attention = orig
    assert len(seen) == 2 and seen[0].shape == (2, 4, 4, 4)  # (B, H_query, nb, nb): routed by each query head
    assert bool((seen[0].mask.sum((-1, -2)) == 5).all())  # causal, nb = 4: round(0.5 · 10) blocks per head
    assert h.dense_fallbacks == {}


def test_padding_runs_sparse_and_equals_masked_dense_on_real_tokens():
    am = None
    outs = {}
    for backend in ("gather", "dense"):
        model, fwd, x, ref, h = _setup("bert")
        convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=[{"input_ids": x}], backend=backend)
        am = torch.ones_like(x)
        am[1, 40:] = 0
        with torch.no_grad():
            outs[backend] = model(input_ids=x, attention_mask=am).last_hidden_state
        assert h.dense_fallbacks == {}  # key padding runs block-sparse, not dense
    real = am.bool()
    torch.testing.assert_close(outs["gather"][real], outs["dense"][real], atol=1e-5, rtol=1e-5)
    h.remove()
    with torch.no_grad():
        dense = model(input_ids=x, attention_mask=am).last_hidden_state
    assert not torch.allclose(outs["gather"][real], dense[real], atol=1e-4)


def test_custom_mask_falls_back_loudly():
    from der.attention._swap import _key_padding

    n = 8
    pad = torch.ones(2, 1, n, n, dtype=torch.bool)
    pad[1, :, :, 6:] = False
    torch.testing.assert_close(_key_padding(pad, n, causal=False), pad[:, 0, 0, :])
    odd = pad.clone()
    odd[0, 0, 3, 1] = False  # one real query hides one real key: not key padding
    assert _key_padding(odd, n, causal=False) is None
    causal = pad & torch.ones(n, n, dtype=torch.bool).tril()
    assert _key_padding(causal, n, causal=True) is not None and _key_padding(causal, n, causal=False) is None


def test_longer_than_calibrated_and_too_short():
    model, fwd, x, ref, h = _setup("bert")
    convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=[{"input_ids": x[:, :32]}])
    with torch.no_grad():
        fwd(model, x[:, :24])  # shorter: cropped layout, sparse
        assert h.dense_fallbacks == {}
        with pytest.warns(UserWarning, match="longer than the calibrated"):
            fwd(model, x)
        with pytest.warns(UserWarning, match="shorter than one block"):  # dense, never a crash
            torch.testing.assert_close(fwd(model, x[:, :8]), fwd(tiny_bert(), x[:, :8]), atol=1e-5, rtol=1e-5)
        assert h.dense_fallbacks["an input shorter than one block"] == 2  # once per layer


def test_needs_calibration_and_injection():
    model, fwd, x, ref, h = _setup("bert")
    with pytest.raises(ValueError, match="calibration"):
        convert(model, rule="anchors")
    with pytest.raises(ValueError, match="inject"):
        convert(tiny_bert())
    with pytest.raises(ValueError, match="sparsity"):
        convert(model, min_seq_len=0, sparsity=1.5)


def test_auto_rule_follows_what_was_passed():
    model, fwd, x, ref, h = _setup("bert")
    calib = [{"input_ids": x}]
    convert(model, min_seq_len=0, sparsity=0.5)  # nothing passed: training-free BigBird, no warning
    assert h.converted.rule == "bigbird"
    lay = next(iter(h.converted.layouts.values()))
    assert lay.scores is not None and lay.sparsity() == pytest.approx(0.5)
    revert(model)
    with h.calibrate(), torch.no_grad():
        model(input_ids=x)
    with pytest.warns(UserWarning, match='rule="anchors"'):  # DER statistics present but unused: said so
        convert(model, min_seq_len=0, sparsity=0.5)
    revert(model)
    convert(model, min_seq_len=0, sparsity=0.5, rule="anchors")
    assert h.converted.rule == "anchors"
    revert(model)
    convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=calib)
    assert h.converted.rule == "attention"
    revert(model)
    with pytest.raises(ValueError, match="static"):
        convert(model, min_seq_len=0, sparsity=0.5, mode="dynamic", rule="bigbird")


def test_trains_through_block_sparse_kernel():
    model, fwd, x, ref, h = _setup("bert")
    convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=[{"input_ids": x}])
    model.train()
    h.regularize = True  # keep regularizing while fine-tuning the converted model
    out = fwd(model, x)
    (out.pow(2).mean() + h.loss()).backward()
    w = model.encoder.layer[0].attention.self.query.weight
    assert w.grad is not None and bool(torch.isfinite(w.grad).all()) and w.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_save_load_roundtrip(tmp_path, mode):
    model, fwd, x, ref, h = _setup("gpt2", mode=mode)
    model(x)  # initializes anchors from data
    convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=[x])
    with torch.no_grad():
        want = fwd(model, x)
    der_io.save(h, tmp_path / "der")
    fresh = tiny_gpt2()
    h2 = der_io.load(fresh, tmp_path / "der.json")
    for a, b in zip(h.parameters(), h2.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    if mode == "static":
        for n, lay in h.converted.layouts.items():
            assert lay == h2.converted.layouts[n]
    with torch.no_grad():
        torch.testing.assert_close(fwd(fresh, x), want)
    with pytest.raises(ValueError, match="do not match"):
        der_io.load(tiny_llama(), tmp_path / "der")


def test_row_budget_convert_gives_uniform_rows_and_matches_reference():
    outs = {}
    for backend in ("gather", "dense"):
        model, fwd, x, ref, h = _setup("bert", budget="row")
        convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=[{"input_ids": x}], backend=backend)
        with torch.no_grad():
            outs[backend] = fwd(model, x)
        for lay in h.converted.layouts.values():
            assert bool((lay.mask.sum(-1) == 2).all())  # nb = 4 blocks, 50%: 2 per query block
    torch.testing.assert_close(outs["gather"], outs["dense"], atol=1e-5, rtol=1e-5)


def _reference_attention_layouts(model, x, sparsity, causal, bs=16):
    """rule="attention" by hand: eager attention probabilities → mean block mass per query block → select."""
    from der.attention.rules import select_blocks

    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(x, output_attentions=True).attentions  # L × (B, H, N, N)
    model.set_attn_implementation("sdpa")
    out = []
    for a in att:
        b, h, n, _ = a.shape
        nb = n // bs
        scores = a.double().sum(0).view(h, nb, bs, nb, bs).sum((2, 4)) / (b * bs)
        out.append(select_blocks(scores, sparsity, causal))
    return out


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_attention_rule_layouts_equal_reference_and_run_sparse(name):
    """rule="attention": layouts from the model's own attention (post-RoPE, GQA, causal) = a hand reference."""
    model, fwd, x, ref, h = _setup(name)
    want = _reference_attention_layouts(model, x, 0.5, causal=name == "llama")
    calib = [{"input_ids": x}] if name == "bert" else [x]
    convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=calib, rule="attention")
    got = list(h.converted.layouts.values())
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        assert g.shape == (1, 4, 4, 4) and w.shape == (4, 4, 4) and torch.equal(g.mask[0], w)
    with torch.no_grad():
        out = fwd(model, x)
    assert h.dense_fallbacks == {} and torch.isfinite(out).all()
    assert not torch.allclose(out, ref, atol=1e-4)  # really sparse
    revert(model)
    with torch.no_grad():  # the calibration pass left the model dense and unchanged
        torch.testing.assert_close(fwd(model, x), ref)


def test_attention_rule_with_padding_ignores_padded_queries_and_roundtrips(tmp_path):
    model, fwd, x, ref, h = _setup("bert")
    mask = torch.ones_like(x)
    mask[1, 40:] = 0
    from der.attention.rules import select_blocks

    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=x, attention_mask=mask, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    w = mask.double()  # padded queries carry no weight; each query block is averaged over its real queries
    cnt = w.sum(0).view(4, 16).sum(-1)
    want = [select_blocks((a.double() * w[:, None, :, None]).sum(0).view(4, 4, 16, 4, 16).sum((2, 4))
                          / cnt[None, :, None], 0.5) for a in att]
    convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=[{"input_ids": x, "attention_mask": mask}], rule="attention")
    lay = dict(h.converted.layouts)
    for v, wv in zip(lay.values(), want, strict=True):
        assert torch.equal(v.mask[0], wv) and bool(v.mask.diagonal(dim1=-2, dim2=-1).all())
    der_io.save(h, tmp_path / "der")
    h.remove()
    fresh = tiny_bert()
    h2 = der_io.load(fresh, tmp_path / "der")
    assert h2.converted.rule == "attention"
    for n, v in lay.items():
        assert h2.converted.layouts[n] == v


def test_attention_rule_bad_arguments():
    model, fwd, x, ref, h = _setup("bert")
    with pytest.raises(ValueError, match="calib_inputs"):
        convert(model, min_seq_len=0, sparsity=0.5, rule="attention")
    with pytest.raises(ValueError, match="calib_inputs"):
        convert(model, min_seq_len=0, sparsity=0.5, mode="dynamic", calib_inputs=[{"input_ids": x}], rule="attention")
    with pytest.raises(ValueError, match="rule must be"):
        convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=[{"input_ids": x}], rule="magnitude")
    with pytest.raises(ValueError, match="no attention reached"):
        convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=[], rule="attention")
    assert h.converted is None  # a failed conversion leaves nothing behind
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).last_hidden_state, ref)


def test_attention_rule_chunking_does_not_change_layouts(monkeypatch):
    """Scores are formed a few heads at a time; one head per chunk gives the same layouts and outputs."""
    import der.attention._swap as conv

    res = []
    for chunk in (conv.COLLECT_CHUNK_BYTES, 1):
        monkeypatch.setattr(conv, "COLLECT_CHUNK_BYTES", chunk)
        model, fwd, x, ref, h = _setup("llama")
        convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=[x], rule="attention")
        with torch.no_grad():
            res.append((dict(h.converted.layouts), fwd(model, x)))
    for n, lay in res[0][0].items():
        assert lay == res[1][0][n]
    torch.testing.assert_close(res[0][1], res[1][1])


def test_collect_call_output_is_exact_attention():
    """What the model sees during rule="attention" calibration is exact (masked, causal, GQA) attention."""
    from types import SimpleNamespace

    from der.attention._swap import _collect_call

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 40, 8, generator=g)
    k, v = torch.randn(2, 2, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool)
    mask[1, :, :, 30:] = False
    site = SimpleNamespace(extra={})
    for causal in (False, True):
        site.extra.clear()
        m = mask & torch.ones(40, 40, dtype=torch.bool).tril() if causal else mask  # as HF passes it
        out = _collect_call(site, q, k, v, m, None, causal, 16)
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=m))
        assert site.extra["attn_mass"].shape == (4, 3, 3)
        # each real query's row sums to one; the 10 queries at padded positions of sequence 1 carry no weight
        torch.testing.assert_close(site.extra["attn_mass"].sum((1, 2)), torch.full((4,), 70.0, dtype=torch.float64))


def test_revert_then_convert_again_and_remove_after_revert():
    """Regression: the one convert/revert pair owns the undo, so a reverted model converts again."""
    model, fwd, x, ref, h = _setup("gpt2")
    convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=[x])
    with pytest.raises(ValueError, match=r"revert\(model\)"):
        convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=[x])
    with torch.no_grad():
        sparse = fwd(model, x)
    revert(model)
    assert h.converted is None and h.regularize and not h.keep_keys
    with torch.no_grad():
        torch.testing.assert_close(fwd(model, x), ref)
    with pytest.raises(ValueError, match="not converted"):
        revert(model)
    convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=[x])
    with torch.no_grad():
        torch.testing.assert_close(fwd(model, x), sparse)
    h.remove()
    with torch.no_grad():
        torch.testing.assert_close(fwd(model, x), ref)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_handle_state_dict_round_trips_conversion_and_steps(tmp_path, mode):
    model, fwd, x, ref, h = _setup("gpt2", mode=mode)
    model(x)
    for _ in range(3):
        h.step()
    convert(model, min_seq_len=0, sparsity=0.5, calib_inputs=[x], rule="anchors")
    with torch.no_grad():
        want = fwd(model, x)
    torch.save({"model": model.state_dict(), "der": h.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh = tiny_gpt2()
    h2 = inject(fresh, DERConfig(seq_len=64, block_size=16, mode=mode))
    fresh.load_state_dict(ckpt["model"])
    h2.load_state_dict(ckpt["der"])  # no calibration: layouts come from the state
    assert h2.steps == 3 and h2.converted.mode == mode and h2.converted.rule == "anchors"
    for n, lay in h.converted.layouts.items():
        assert lay == h2.converted.layouts[n]
    with torch.no_grad():
        torch.testing.assert_close(fwd(fresh, x), want)
    conv_state = h.state_dict()
    revert(model)
    h2.load_state_dict(h.state_dict())  # a state saved before conversion reverts the model
    assert h2.converted is None and h2.steps == 3
    h2.load_state_dict(conv_state)
    assert h2.converted is not None
    assert "converted=" in repr(h2) and len(repr(h2.converted)) < 200
    with pytest.raises(ValueError, match="DER handle state"):
        h2.load_state_dict({"steps": 1})
    bad = h.state_dict()
    bad["converted"] = conv_state["converted"] | {"layouts": {"nope": {}}} if mode == "static" else {"format": "x"}
    with pytest.raises(ValueError):
        h2.load_state_dict(bad)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_moba_rule_routes_each_input_and_equals_masked_dense(name):
    """convert(mode="dynamic", rule="moba"): per-input layouts from the call's own (post-RoPE) q and k."""
    import der.attention._swap as S
    from der.attention.baselines import moba_layout

    outs, seen = {}, []
    orig = S.block_sparse_attention
    for backend in ("gather", "dense"):
        model, fwd, x, ref, h = _setup(name)
        convert(model, min_seq_len=0, sparsity=0.5, mode="dynamic", rule="moba", backend=backend)
        assert not h.keep_keys

        def spy(q, k, v, layout, *a, **kw):
            seen.append((q, k, layout))
            return orig(q, k, v, layout, *a, **kw)

        S.block_sparse_attention = spy
        try:
            with torch.no_grad():
                outs[backend] = fwd(model, x)
        finally:
            S.block_sparse_attention = orig
        assert h.dense_fallbacks == {}
    torch.testing.assert_close(outs["gather"], outs["dense"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs["gather"], ref, atol=1e-4)
    q, k, lay = seen[0]
    assert lay.shape[0] == 2 and lay.causal == (name == "llama")
    want = moba_layout(q, k, 16, 0.5, causal=lay.causal, budget=h.converted.budget)  # k here: GQA-expanded
    assert torch.equal(lay.mask, want.mask)
    model, fwd, x, ref, h = _setup(name)
    with pytest.raises(ValueError, match="dynamic"):
        convert(model, min_seq_len=0, sparsity=0.5, rule="moba")
