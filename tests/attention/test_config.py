import math

import pytest
from _der_hf_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_vit

from der.attention import DERConfig
from der.attention.config import ARCH_DEFAULTS, detect_architecture, infer_seq_len


def test_defaults_follow_app_g10():
    c = DERConfig()
    assert c.alpha == 5.0 and c.num_anchors == "sqrt" and c.block_size == 64 and c.sparsity == 0.75
    assert c.mode == "static" and ARCH_DEFAULTS["bert"].lam == 0.01 and ARCH_DEFAULTS["gpt2"].lam == 0.03


@pytest.mark.parametrize("n,k", [(196, 14), (197, 14), (512, 22), (3, 2), (1024, 32)])
def test_sqrt_rule(n, k):
    assert DERConfig().resolve_num_anchors(n) == k
    assert DERConfig(num_anchors=7).resolve_num_anchors(n) == 7
    assert DERConfig(num_anchors="cbrt").resolve_num_anchors(n) == max(2, math.ceil(n ** (1 / 3) - 1e-9))


def test_alpha_cosine_anneal():
    c = DERConfig(alpha=10.0, alpha_final=5.0, anneal_steps=100)
    assert c.alpha_at(0) == pytest.approx(10.0)
    assert c.alpha_at(50) == pytest.approx(7.5)
    assert c.alpha_at(100) == pytest.approx(5.0) and c.alpha_at(500) == pytest.approx(5.0)
    assert DERConfig().alpha_at(1000) == 5.0


@pytest.mark.parametrize("kw,msg", [
    ({"num_anchors": 0}, "num_anchors"), ({"num_anchors": "log"}, "num_anchors"), ({"alpha": -1.0}, "alpha"),
    ({"lam": float("nan")}, "lam"), ({"block_size": 0}, "block_size"), ({"sparsity": 1.0}, "sparsity"),
    ({"mode": "magic"}, "mode"), ({"target_modules": []}, "empty"), ({"target_modules": "(("}, "regex"),
    ({"key_kind": "x"}, "key_kind"), ({"architecture": "rnn"}, "architecture"), ({"seq_len": 0}, "seq_len"),
])
def test_bad_config_raises(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DERConfig(**kw)


def test_roundtrip_dict():
    c = DERConfig(target_modules=["key"], layers_to_transform=1, lam=0.02)
    assert c.layers_to_transform == [1]
    assert DERConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown"):
        DERConfig.from_dict({"nope": 1})


def test_architecture_table_detection():
    assert detect_architecture(tiny_bert()) == "bert"
    assert detect_architecture(tiny_vit()) == "vit"
    assert detect_architecture(tiny_gpt2()) == "gpt2"
    assert detect_architecture(tiny_llama()) == "llama"
    assert infer_seq_len(tiny_vit()) == 65  # (32/4)² patches + CLS
    assert infer_seq_len(tiny_bert(n_pos=96)) == 96
    import torch

    with pytest.raises(ValueError, match="no DER defaults"):
        detect_architecture(torch.nn.Linear(2, 2))
