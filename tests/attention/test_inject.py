import pytest
import torch
from _der_hf_models import images, lora_llama, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit, tokens

from der import functional as DF
from der.attention import DERConfig, inject, list_matches


def _capture(module_fn, model, target_name, fwd):
    """Record the output of ``target_name`` with an independent hook (reference for our key reader)."""
    seen = {}
    h = model.get_submodule(target_name).register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    fwd()
    h.remove()
    return module_fn(seen["o"])


@pytest.mark.parametrize("make,fwd,arch", [
    (tiny_bert, lambda m: m(input_ids=tokens()), "bert"),
    (tiny_vit, lambda m: m(pixel_values=images()), "vit"),
    (tiny_gpt2, lambda m: m(tokens()), "gpt2"),
    (tiny_llama, lambda m: m(tokens()), "llama"),
])
def test_inject_entropy_matches_float64_reference(make, fwd, arch):
    model = make()
    names = list_matches(model, DERConfig())
    assert len(names) == 2 and all(str(i) in n for i, n in enumerate(names))
    h = inject(model, DERConfig(seq_len=64))
    assert h.arch == arch and h.sites[0].anchors.anchors.shape[1] == 8  # ⌊√64⌋
    s = h.sites[0]
    heads, dh = s.heads, s.head_dim

    def reader(o):
        if arch == "gpt2":  # fused [q | k | v]
            o = o[..., 64:128]
        return o.reshape(o.shape[0], o.shape[1], heads, dh).transpose(1, 2)

    keys = _capture(reader, model, s.name, lambda: fwd(model))
    ent = h.entropy()
    assert ent.shape == (2, heads)
    ref = DF.anchor_entropy(keys.double(), s.anchors.anchors.detach().double(), alpha=5.0).mean(0)
    torch.testing.assert_close(ent[0].double(), ref, rtol=1e-5, atol=1e-6)
    assert bool((ent >= 0).all()) and bool((ent <= torch.log(torch.tensor(8.0)) + 1e-5).all())
    if arch == "llama":
        assert heads == 2  # GQA: anchors on the key/value heads


def test_anchors_are_model_parameters_and_train():
    model = tiny_bert()
    n0 = sum(1 for _ in model.parameters())
    h = inject(model, DERConfig(seq_len=64))
    names = [n for n, _ in model.named_parameters() if "der_anchors" in n]
    assert len(names) == 2 and sum(1 for _ in model.parameters()) == n0 + 2
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.train()
    model(input_ids=tokens())
    before = [p.detach().clone() for p in h.parameters()]
    loss = h.loss()
    assert loss.item() == pytest.approx(0.01 * h.entropy().mean().item(), rel=1e-5)
    loss.backward()
    key_w = model.get_submodule(h.sites[0].name).weight
    assert key_w.grad is not None and key_w.grad.abs().sum() > 0  # gradient reaches the keys too
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, h.parameters(), strict=True))


def test_every_anchor_takes_part_even_if_a_layer_did_not_run():
    model = tiny_bert()
    h = inject(model, DERConfig(seq_len=64))
    model(input_ids=tokens())
    h.sites[1].pending = None  # as if layer 1 were skipped (e.g. layer drop)
    h.loss().backward()
    assert all(p.grad is not None for p in h.parameters())


def test_padding_tokens_are_excluded():
    model = tiny_bert()
    h = inject(model, DERConfig(seq_len=64, alpha=50.0))
    x = tokens(2, 48)
    am = torch.ones(2, 48, dtype=torch.long)
    am[1, 30:] = 0
    model(input_ids=x, attention_mask=am)
    e_masked = h.entropy_by_layer()[h.sites[0].name]
    s = h.sites[0]
    keys = {}
    hook = model.get_submodule(s.name).register_forward_hook(lambda m, i, o: keys.setdefault("k", o))
    model(input_ids=x[1:, :30])
    hook.remove()
    k1 = keys["k"].reshape(1, 30, s.heads, s.head_dim).transpose(1, 2)
    ref1 = DF.anchor_entropy(k1.double(), s.anchors.anchors.detach().double(), alpha=50.0)[0]
    h.entropy()
    full = s.entropy  # (B, H) of the last (unpadded) forward
    torch.testing.assert_close(full[0].double(), ref1, rtol=1e-4, atol=1e-5)
    assert e_masked.shape == (s.heads,)


def test_every_nth_step_and_batched_layers_agree():
    model = tiny_bert()
    h = inject(model, DERConfig(seq_len=64, every=2))
    x = tokens()
    model(input_ids=x)
    e0 = h.entropy().detach()
    per_layer = []
    for s in h.sites:  # one layer at a time must equal the stacked evaluation
        s_keys = {}
        hk = model.get_submodule(s.name).register_forward_hook(lambda m, i, o, d=s_keys: d.setdefault("k", o))
        model(input_ids=x)
        hk.remove()
        k = s_keys["k"].reshape(2, -1, s.heads, s.head_dim).transpose(1, 2)
        per_layer.append(DF.anchor_entropy(k, s.anchors.anchors, alpha=5.0).mean(0).detach())
    torch.testing.assert_close(e0, torch.stack(per_layer), rtol=1e-5, atol=1e-6)
    h.step()  # odd step: no H, loss is 0·Σ anchors but still reaches every anchor
    model(input_ids=x)
    loss = h.loss()
    assert float(loss) == 0.0
    loss.backward()
    assert all(p.grad is not None for p in h.parameters())
    h.step()
    model(input_ids=x)
    assert float(h.loss()) > 0


def test_data_init_uses_keys():
    model = tiny_bert()
    h = inject(model, DERConfig(seq_len=64))
    s = h.sites[0]
    assert not bool(s.anchors.initialized)
    seen = {}
    hk = model.get_submodule(s.name).register_forward_hook(lambda m, i, o: seen.setdefault("k", o))
    model(input_ids=tokens())
    hk.remove()
    keys = seen["k"].reshape(-1, s.heads, s.head_dim).transpose(0, 1)  # (H, B·N, Dh)
    a = s.anchors.anchors.detach()
    d = (a[:, :, None] - keys.detach()[:, None]).pow(2).sum(-1).amin(-1)
    assert bool(s.anchors.initialized) and float(d.max()) < 1e-10  # every anchor is one of the keys


def test_remove_undoes_everything():
    model = tiny_gpt2()
    x = tokens()
    ref = model(x).logits
    sd_keys = set(model.state_dict())
    h = inject(model, DERConfig(seq_len=64))
    assert any("der_anchors" in k for k in model.state_dict())
    h.remove()
    assert set(model.state_dict()) == sd_keys and not hasattr(model, "_der_handle")
    torch.testing.assert_close(model(x).logits, ref)
    assert not model._forward_pre_hooks and all(not m._forward_hooks for m in model.modules())
    inject(model, DERConfig(seq_len=64)).remove()  # can inject again


def test_layers_exclude_and_regex():
    model = tiny_llama()
    assert list_matches(model, DERConfig(layers_to_transform=[1])) == ["model.layers.1.self_attn.k_proj"]
    assert list_matches(model, DERConfig(exclude_modules=["layers.0.self_attn.k_proj"])) == [
        "model.layers.1.self_attn.k_proj"]
    assert len(list_matches(model, DERConfig(target_modules=r".*\.k_proj", key_kind="linear"))) == 2


def test_unmatched_pattern_raises_with_candidates():
    with pytest.raises(ValueError, match=r"matched no module.*k_proj"):
        list_matches(tiny_llama(), DERConfig(target_modules=["wk"]))
    with pytest.raises(ValueError, match="no DER defaults"):
        inject(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    m = tiny_bert()
    inject(m, DERConfig(seq_len=64))
    with pytest.raises(ValueError, match="already"):
        inject(m)


def test_peft_lora_skips_base_layer_and_trains():
    model = lora_llama()
    names = list_matches(model, DERConfig())
    assert len(names) == 2 and all(n.endswith("self_attn.k_proj") for n in names)
    assert not any("base_layer" in n or "lora_" in n for n in names)
    h = inject(model, DERConfig(seq_len=64))
    model.train()
    out = model(input_ids=tokens())
    (out.logits.float().pow(2).mean() + h.loss()).backward()
    assert all(p.grad is not None for p in h.parameters())
    lora_k = [p for n, p in model.named_parameters() if "k_proj.lora_B" in n]  # B starts at 0, A gets no grad
    assert lora_k and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_k)
    h.remove()
    assert not any("der_anchors" in n for n, _ in model.named_parameters())


def test_timm_vit_keys_via_k_norm():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=3).eval()
    h = inject(model, DERConfig(layers_to_transform=[0, 1]))
    model(torch.randn(2, 3, 64, 64))
    ent = h.entropy()
    assert ent.shape == (2, model.blocks[0].attn.num_heads) and bool(torch.isfinite(ent).all())


def test_ddp_sees_anchors_and_every_step_reduces(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = tiny_bert()
        h = inject(model, DERConfig(seq_len=64, every=2))
        model(input_ids=tokens())  # data init before wrapping
        ddp = DDP(model)  # find_unused_parameters=False: an anchor without grad would fail the next step
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for _ in range(3):  # steps 0, 2 regularize; step 1 is an `every` off-step
            out = ddp(input_ids=tokens())
            loss = out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean() + h.loss()
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is not None for p in h.parameters())
            opt.step()
            h.step()
    finally:
        dist.destroy_process_group()


def test_key_entropy_matches_functional_and_gradcheck():
    """The hook's fast H_diff layout equals der.functional (also far from the origin, with padding)."""
    from der.attention._hdiff import key_entropy as _key_entropy

    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 7, 3 * 4, generator=g, dtype=torch.float64) + 20.0  # a key projection's output
    keys = out.view(2, 7, 3, 4).transpose(1, 2)
    anchors = torch.randn(3, 5, 4, generator=g, dtype=torch.float64) + 20.0
    torch.testing.assert_close(_key_entropy(keys, anchors, 0.5), DF.anchor_entropy(keys, anchors, alpha=0.5))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    ref = DF.anchor_entropy(keys[1:, :, :4], anchors, alpha=0.5)[0]
    torch.testing.assert_close(_key_entropy(keys, anchors, 0.5, mask)[1], ref)
    out.requires_grad_()
    anchors.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda o, a: _key_entropy(o.view(2, 7, 3, 4).transpose(1, 2), a, 0.5, mask), (out, anchors))


def test_key_entropy_layers_batches_layers_exactly():
    """All layers in one chain == each layer alone == der.functional; gradients reach every layer's keys."""
    from der.attention._hdiff import key_entropy_layers

    g = torch.Generator().manual_seed(1)
    outs = [torch.randn(2, 6, 3 * 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2)]
    anchors = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) + 3.0).requires_grad_()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 5:] = False

    def keys(o):
        return o.view(2, 6, 3, 4).transpose(1, 2)

    ent = key_entropy_layers([keys(o) for o in outs], anchors, 0.7)
    for i, o in enumerate(outs):
        torch.testing.assert_close(ent[i], DF.anchor_entropy(keys(o), anchors[i], alpha=0.7))
    assert torch.autograd.gradcheck(
        lambda a, b, c: key_entropy_layers([keys(a), keys(b)], c, 0.7, mask), (*outs, anchors))


def _keys_of(model, site, fwd):
    seen = {}
    hk = model.get_submodule(site.name).register_forward_hook(lambda m, i, o: seen.setdefault("k", o))
    fwd()
    hk.remove()
    o = seen["k"]
    return o.reshape(o.shape[0], o.shape[1], site.heads, site.head_dim).transpose(1, 2)


def test_ema_anchors_are_buffers_that_follow_the_keys():
    model = tiny_bert()
    h = inject(model, DERConfig(seq_len=64, anchor_update="ema", ema_decay=0.5))
    assert h.parameters() == [] and not any("der_anchors" in n for n, _ in model.named_parameters())
    assert any(k.endswith("der_anchors.ema_count") for k in model.state_dict())
    model.train()
    x = tokens()
    model(input_ids=x)
    before = h.sites[0].anchors.anchors.clone()
    loss = h.loss()  # the EMA k-means step runs here, after the loss used the current anchors
    assert not torch.equal(before, h.sites[0].anchors.anchors)
    loss.backward()
    key_w = model.get_submodule(h.sites[0].name).weight
    assert key_w.grad is not None and key_w.grad.abs().sum() > 0  # the loss moves the keys only
    model.eval()
    model(input_ids=x)
    frozen = h.sites[0].anchors.anchors.clone()
    h.loss()
    assert torch.equal(frozen, h.sites[0].anchors.anchors)  # no EMA step outside training


@pytest.mark.parametrize("objective, geometry", [("marginal", "raw"), ("commitment", "normalized"),
                                                 ("entropy", "spread")])
def test_new_objectives_match_the_core_objective(objective, geometry):
    from der._anchors import anchor_objective

    model = tiny_bert()
    h = inject(model, DERConfig(seq_len=64, objective=objective, geometry=geometry, anchor_update="frozen"))
    x = tokens()
    am = torch.ones(2, 64, dtype=torch.long)
    am[1, 40:] = 0
    s = h.sites[0]
    keys = _keys_of(model, s, lambda: model(input_ids=x, attention_mask=am))
    ent = h.entropy_by_layer()[s.name]
    ref = anchor_objective(keys.double(), s.anchors.anchors.double(), 5.0, objective=objective, geometry=geometry,
                           mask=am.bool()[:, None, :]).mean(0)
    torch.testing.assert_close(ent.double(), ref, rtol=1e-4, atol=1e-5)


def test_nan_keys_raise_naming_the_layer():
    model = tiny_bert()
    h = inject(model, DERConfig(seq_len=64))
    model(input_ids=tokens())
    with torch.no_grad():
        model.get_submodule(h.sites[1].name).weight[0, 0] = float("nan")
    model(input_ids=tokens())
    with pytest.raises(ValueError, match=r"non-finite keys.*layer.*" + h.sites[1].name.replace(".", r"\.")):
        h.loss()


def test_ema_anchor_state_round_trips_through_io(tmp_path):
    from der.attention import io as der_io

    torch.manual_seed(0)
    model = tiny_bert()
    h = inject(model, DERConfig(seq_len=64, anchor_update="ema", geometry="normalized"))
    model.train()
    for _ in range(2):
        model(input_ids=tokens())
        h.loss()
    der_io.save(h, tmp_path / "der")
    torch.manual_seed(0)
    h2 = der_io.load(tiny_bert(), tmp_path / "der")
    for a, b in zip(h.sites, h2.sites, strict=True):
        torch.testing.assert_close(a.anchors.anchors, b.anchors.anchors)
        torch.testing.assert_close(a.anchors.ema_count, b.anchors.ema_count)
        assert bool(b.anchors.initialized)
    assert h2.config.anchor_update == "ema" and h2.config.geometry == "normalized"
