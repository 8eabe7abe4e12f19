"""The sharp edges of issue 16: each gives a clear error or warning instead of a silent surprise."""

from __future__ import annotations

import warnings

import pytest
import torch
from _hf_helpers import lora_llama, tiny_bert, tokens

import der.attention as A
from der.attention import DERConfig, convert, inject, revert, summary


def test_convert_does_not_touch_a_second_model_built_from_the_same_config():
    from transformers import BertModel

    a = tiny_bert()
    cfg = a.config
    b = BertModel(cfg).eval()
    impl = cfg._attn_implementation
    inject(a, DERConfig(block_size=16))
    convert(a, sparsity=0.5, calib_inputs=[tokens()])
    assert a.config._attn_implementation == "der_block_sparse"
    assert cfg._attn_implementation == impl and b.config._attn_implementation == impl
    hb = inject(b, DERConfig(block_size=16))
    convert(b, sparsity=0.5, calib_inputs=[tokens()])  # was: "model is already converted"
    assert hb.converted is not None
    revert(a)
    assert a.config is cfg and cfg._attn_implementation == impl  # the original object is back
    x = tokens()
    with torch.no_grad():  # back to dense: same outputs as the untouched twin with the same weights
        b2 = BertModel(cfg).eval()
        b2.load_state_dict({k: v for k, v in a.state_dict().items() if "der_anchors" not in k})
        assert torch.equal(a(input_ids=x).last_hidden_state, b2(input_ids=x).last_hidden_state)


def test_model_built_from_a_converted_models_config_warns_and_converts():
    from transformers import BertModel

    a = tiny_bert()
    inject(a, DERConfig(block_size=16))
    convert(a, sparsity=0.5, calib_inputs=[tokens()])
    b = BertModel(a.config).eval()  # inherits the name "der_block_sparse", but nothing is swapped in it
    inject(b, DERConfig(block_size=16))
    with pytest.warns(UserWarning, match="not converted"):
        convert(b, sparsity=0.5, calib_inputs=[tokens()])
    assert summary(b._der_handle)["layout_sparsity"]


@pytest.mark.parametrize("target", [["self.query"], ["self.value"], ["attention.output.dense"]])
def test_non_key_targets_are_refused_naming_the_module(target):
    with pytest.raises(ValueError, match=r"not key projection.*'key'"):
        inject(tiny_bert(), DERConfig(target_modules=target))


def test_non_key_targets_allowed_with_an_explicit_key_kind():
    h = inject(tiny_bert(), DERConfig(target_modules=["self.query"], key_kind="linear"))
    assert h.sites[0].name.endswith("self.query")


def test_unreachable_sparsity_warns_with_the_achieved_value():
    m = tiny_bert()
    h = inject(m, DERConfig(block_size=16))
    with pytest.warns(UserWarning, match=r"sparsity=0.99 is not reachable.*achieved 0.75"):
        convert(m, sparsity=0.99, calib_inputs=[tokens(2, 64)])  # 4 blocks: the diagonal floor is 0.75
    assert set(summary(h)["layout_sparsity"].values()) == {0.75}


def test_reachable_sparsity_does_not_warn():
    m = tiny_bert()
    inject(m, DERConfig(block_size=16))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="convert: sparsity")
        convert(m, sparsity=0.5, calib_inputs=[tokens(2, 64)])
        revert(m)
        convert(m, sparsity=0.5, calib_inputs=[tokens(2, 64)], budget="row")


def test_dense_layers_lists_attention_modules_only_under_lora():
    m = lora_llama()
    h = inject(m, DERConfig(block_size=16, layers_to_transform=[0]))
    convert(m, sparsity=0.5, calib_inputs=[tokens()])
    assert h.converted.dense_layers == ["base_model.model.model.layers.1.self_attn"]
    m2 = lora_llama()
    h2 = inject(m2, DERConfig(block_size=16))
    convert(m2, sparsity=0.5, calib_inputs=[tokens()])
    assert h2.converted.dense_layers == []


def test_summary_is_exported_and_repr_is_short():
    assert "summary" in A.__all__ and A.summary is summary
    m = tiny_bert()
    h = inject(m, DERConfig(block_size=16))
    convert(m, sparsity=0.5, calib_inputs=[tokens()])
    r = repr(h.converted)
    assert len(r) < 300 and "ConvertState(" in r and "BertModel" not in r
    assert len(repr(h)) < 300

