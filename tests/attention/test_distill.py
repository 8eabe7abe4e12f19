"""Sparse-aware fine-tuning (der.attention.distill): layer terms vs a float64 reference, the dense teacher,
handle.loss() after convert, fit, and bad input."""

import pytest
import torch
from _der_hf_models import tiny_bert, tiny_gpt2, tiny_llama, tokens

from der.attention import BlockLayout, DERConfig, convert, distill, inject, revert
from der.attention.metrics import attention_mass_recall


def _bert_converted(sparsity=0.75, mode="static", **kw):
    model = tiny_bert()
    x = tokens(2, 64)
    with torch.no_grad():
        ref = model(input_ids=x).last_hidden_state
    h = inject(model, DERConfig(seq_len=64, block_size=16))
    convert(model, sparsity=sparsity, mode=mode, calib_inputs=[{"input_ids": x}], min_seq_len=0, **kw)
    return model, h, x, ref


def _ref_mass(q, k, lay, scale, causal, valid):
    """float64 reference of the attention-mass term."""
    q, k = q.double(), k.double()
    s = q @ k.transpose(-1, -2) * scale
    n = s.shape[-1]
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    p = s.softmax(-1)
    w = valid.double()[:, None, :]
    inside = lay.to_dense().double()
    return ((1 - (p * inside).sum(-1)) * w).sum() / (w.sum() * q.shape[1]), p


@pytest.mark.parametrize("causal", [False, True])
def test_layer_terms_equal_float64_reference(causal):
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 3, 48, 8
    q, k = (torch.randn(B, H, N, D, generator=g) for _ in range(2))
    mask = torch.rand(1, H, 3, 3, generator=g) < 0.5
    mask |= torch.eye(3, dtype=torch.bool)
    lay = BlockLayout(mask, 16, N, causal)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, 40:] = False
    got = distill.layer_terms(q, k, lay, None, 0.3, causal, valid, {"mass": 1.0})
    mass, p = _ref_mass(q, k, lay, 0.3, causal, valid)
    torch.testing.assert_close(got["mass"].double(), mass, rtol=1e-5, atol=1e-7)
    # the mass term is 1 - attention-mass recall of the layout (the metric of der.attention.metrics)
    rec = attention_mass_recall(p.float(), lay, query_mask=valid)
    assert abs(float(got["mass"]) - (1 - rec.overall)) < 1e-5


def test_mass_term_is_differentiable_in_queries_and_keys():
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 2, 32, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    lay = BlockLayout(torch.eye(2, dtype=torch.bool)[None].expand(2, 2, 2).clone(), 16, 32)

    def f(q, k):
        return distill.layer_terms(q, k, lay, None, 0.5, False, None, {"mass": 1.0})["mass"]

    assert torch.autograd.gradcheck(f, (q, k))


def test_loss_after_convert_is_zero_then_the_weighted_layer_terms():
    model, h, x, _ = _bert_converted()
    model(input_ids=x)
    z = h.loss()
    assert float(z.detach()) == 0.0  # converted, no term enabled: zero (and no raise)
    distill.enable(model, mass=0.5)
    model(input_ids=x)
    terms = h.converted.last_terms()
    assert set(terms) == {"mass"} and 0 < terms["mass"] < 1
    loss = h.loss()
    torch.testing.assert_close(float(loss), 0.5 * terms["mass"], rtol=1e-5, atol=1e-7)
    loss.backward()
    wq = model.encoder.layer[0].attention.self.query.weight
    assert wq.grad is not None and wq.grad.abs().sum() > 0
    with torch.no_grad():  # no grad: nothing recorded, the loss is zero
        model(input_ids=x)
    assert float(h.loss()) == 0.0
    distill.disable(model)
    model(input_ids=x)
    assert float(h.loss()) == 0.0


def test_dense_bypass_is_the_unconverted_model_and_uncounted():
    model, h, x, ref = _bert_converted()
    with torch.no_grad():
        sparse = model(input_ids=x).last_hidden_state
        with distill.dense(model):
            teach = model(input_ids=x).last_hidden_state
    assert not torch.allclose(sparse, ref, atol=1e-3)
    torch.testing.assert_close(teach, ref)
    assert h.dense_fallbacks == {}
    t = distill.teacher_outputs(model, [{"input_ids": x}])
    torch.testing.assert_close(t[0], ref)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_fit_moves_causal_lm_towards_dense(make):
    model = make()
    xs = [tokens(2, 64, seed=s) for s in range(3)]
    h = inject(model, DERConfig(seq_len=64, block_size=16))
    convert(model, sparsity=0.75, calib_inputs=xs[:1], min_seq_len=0)
    teacher = distill.teacher_outputs(model, xs)

    def gap():
        with torch.no_grad():
            return float(torch.stack([distill.output_loss(model(x).logits, t, "logits")
                                      for x, t in zip(xs, teacher)]).mean())

    before = gap()
    hist = distill.fit(model, xs, steps=12, lr=1e-4, teacher=teacher, mass_weight=0.1)
    assert len(hist["loss"]) == 12 and all(0 < m < 1 for m in hist["mass"])
    assert gap() < before
    assert h.converted is not None and h.converted.distill == {}  # fit restores the weights it set


def test_fit_bert_hidden_states_with_padding():
    model, h, x, ref = _bert_converted()
    mask = torch.ones_like(x)
    mask[1, 40:] = 0
    batch = {"input_ids": x, "attention_mask": mask}
    teacher = distill.teacher_outputs(model, [batch])
    with torch.no_grad():
        before = distill.output_loss(model(**batch).last_hidden_state, teacher[0], "hidden", mask.bool())
    hist = distill.fit(model, [batch], steps=15, lr=3e-5, teacher=teacher)
    with torch.no_grad():
        after = distill.output_loss(model(**batch).last_hidden_state, teacher[0], "hidden", mask.bool())
    assert float(after) < float(before)
    assert hist["mass"] == [0.0] * 15 and hist["output"][0] > hist["output"][-1]


def test_output_loss_reference_and_masking():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ref = ((s - t) ** 2).sum(-1)[m].sum() / (t**2).sum(-1)[m].sum()
    torch.testing.assert_close(distill.output_loss(s, t, "hidden", m), ref)
    kl = torch.nn.functional.kl_div(s.log_softmax(-1)[m], t.log_softmax(-1)[m], log_target=True, reduction="batchmean")
    torch.testing.assert_close(distill.output_loss(s, t, "logits", m), kl)
    assert float(distill.output_loss(t, t, "logits")) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        distill.output_loss(s, t[:, :3])
    with pytest.raises(ValueError, match="kind"):
        distill.output_loss(s, t, "mse")


def test_bad_input_clear_errors():
    model = tiny_bert()
    x = tokens(2, 64)
    inject(model, DERConfig(seq_len=64, block_size=16))
    with pytest.raises(ValueError, match="convert"):
        distill.enable(model)
    with pytest.raises(ValueError, match="convert"):
        distill.fit(model, [{"input_ids": x}], steps=1)
    convert(model, sparsity=0.5, calib_inputs=[{"input_ids": x}], min_seq_len=0)
    with pytest.raises(ValueError, match="weight"):
        distill.enable(model, mass=float("nan"))
    with pytest.raises(ValueError, match="teacher has 2"):
        distill.fit(model, [{"input_ids": x}], steps=1, teacher=[x, x])
    with pytest.raises(ValueError, match="at least one batch"):
        distill.fit(model, [], steps=1)
    with pytest.raises(ValueError, match="zero"):
        distill.fit(model, [{"input_ids": x}], steps=1, output_weight=0)
    revert(model)
    with pytest.raises(ValueError, match="convert"):
        distill.teacher_outputs(model, [{"input_ids": x}])


def test_nan_in_training_queries_raises_naming_the_term():
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 1, 16, 4, generator=g) for _ in range(2))
    q[0, 0, 3, 0] = float("nan")
    lay = BlockLayout(torch.ones(1, 1, 1, dtype=torch.bool), 16, 16)
    with pytest.raises(ValueError, match="non-finite"):
        distill.layer_terms(q, k, lay, None, None, False, None, {"mass": 1.0})
