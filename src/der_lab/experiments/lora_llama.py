"""LoRA + DER on a small Llama-architecture model with PEFT (the paper's QLoRA protocol, App. G.9).

``der exp lora-llama [--quick]``:

1. a byte-level ``LlamaForCausalLM`` is pre-trained briefly on the stdlib corpus (the "base model");
2. its weights are frozen and rank-``r`` LoRA adapters (PEFT) go on the attention projections of the
   top ``lora_layers`` layers (App. G.9: last layers only), trained twice: dense LoRA, and LoRA + DER
   (``der.attention.inject`` on the PEFT model's ``k_proj`` of the same layers; anchors train with the
   adapters);
3. the DER model is converted to block-sparse attention at ``sparsity``; validation perplexity on held-out
   files and forward latency are compared with dense LoRA.

4-bit: ``--quantize-4bit true`` loads the base through bitsandbytes NF4 — GPU only; on this CPU machine it
raises a clear error (bitsandbytes' 4-bit kernels need CUDA). The CPU run is the same protocol in fp32.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from der.data import ByteWindows, stdlib_corpus
from der_lab.experiments.byte_lm import ByteLMConfig, evaluate
from der_lab.experiments.common import byte_llama, median_ms, run_experiment, train_lm

__all__ = ["LoraLlamaConfig", "run", "main"]


@dataclasses.dataclass
class LoraLlamaConfig:
    context: int = 512
    block_size: int = 64
    sparsity: float = 0.75
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    pretrain_steps: int = 800
    lora_steps: int = 300
    lora_rank: int = 8
    lora_layers: int = 2
    batch_size: int = 8
    lr: float = 1e-3
    lam: float = 0.01
    max_bytes: int = 4_000_000
    val_windows: int = 48
    quantize_4bit: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.lora_layers <= self.layers:
            raise ValueError(f"lora_layers must be in [1, layers={self.layers}], got {self.lora_layers}")
        if self.quantize_4bit and not torch.cuda.is_available():
            raise ValueError("quantize_4bit needs CUDA (bitsandbytes NF4 kernels); this machine has no GPU")

    @classmethod
    def quick(cls) -> LoraLlamaConfig:
        # a base LM that has learned something (600 steps), then LoRA on the top layer; context 512 = 16 blocks
        return cls(context=512, block_size=32, hidden=64, layers=2, lora_layers=1, pretrain_steps=600, lora_steps=200,
                   lr=2e-3, max_bytes=2_000_000, val_windows=32)

    def lm(self) -> ByteLMConfig:
        return ByteLMConfig(context=self.context, block_size=self.block_size, sparsity=self.sparsity,
                            hidden=self.hidden, layers=self.layers, heads=self.heads, batch_size=self.batch_size,
                            lr=self.lr, lam=self.lam, seed=self.seed)


def _lora(base_state: dict, cfg: LoraLlamaConfig):
    from peft import LoraConfig, get_peft_model

    model = byte_llama(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, context=cfg.context)
    model.load_state_dict(base_state)
    top = list(range(cfg.layers - cfg.lora_layers, cfg.layers))
    pcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0, layers_to_transform=top,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, pcfg), top


def run(cfg: LoraLlamaConfig, run_dir: Path) -> dict:
    from der.attention import DERConfig, convert, inject

    lm = cfg.lm()
    corpus = stdlib_corpus(max_bytes=cfg.max_bytes)
    half = len(corpus.train) // 2  # pre-train on the first half, fine-tune on the second
    pre = ByteWindows(corpus.train[:half], cfg.context, stride=cfg.context // 4)
    ft = ByteWindows(corpus.train[half:], cfg.context, stride=cfg.context // 4)
    val = ByteWindows(corpus.val, cfg.context)

    def fit_lm(model, ds, steps: int, name: str, handle=None) -> None:
        train_lm(model, ds, steps=steps, batch_size=lm.batch_size, lr=lm.lr, seed=lm.seed, out=run_dir / name,
                 config=lm, handle=handle)

    base = byte_llama(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, context=cfg.context)
    fit_lm(base, pre, cfg.pretrain_steps, "base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    out: dict = {"base": evaluate(base, val, cfg.val_windows), "methods": {}}
    xb = torch.stack([val[i][0] for i in range(min(4, len(val)))])

    dense, _ = _lora(base_state, cfg)
    fit_lm(dense, ft, cfg.lora_steps, "lora_dense")
    trainable = sum(p.numel() for p in dense.parameters() if p.requires_grad)
    out["methods"]["dense_lora"] = {**evaluate(dense, val, cfg.val_windows), "trainable_params": trainable,
                                    "latency_ms": median_ms(lambda: dense(input_ids=xb))}
    der, top = _lora(base_state, cfg)
    handle = inject(der, DERConfig(layers_to_transform=top, block_size=cfg.block_size, sparsity=cfg.sparsity,
                                   lam=cfg.lam, seq_len=cfg.context, seed=cfg.seed))
    for p in handle.parameters():
        p.requires_grad_(True)
    fit_lm(der, ft, cfg.lora_steps, "lora_der", handle=handle)
    out["methods"]["der_lora_dense_kernel"] = evaluate(der, val, cfg.val_windows)
    calib = [ft[i][0][None] for i in range(0, min(len(ft), 64), 8)]
    convert(der, sparsity=cfg.sparsity, block_size=cfg.block_size, calib_inputs=calib, rule="anchors")
    lays = list(handle.converted.layouts.values())
    res = {**evaluate(der, val, cfg.val_windows), "sites": [s.name for s in handle.sites],
           "block_sparsity_der_layers": sum(lay.sparsity() for lay in lays) / len(lays),  # causal layouts
           "latency_ms": median_ms(lambda: der(input_ids=xb)), "dense_fallbacks": dict(handle.dense_fallbacks)}
    res["ppl_increase_pct"] = 100 * (res["val_ppl"] / out["methods"]["dense_lora"]["val_ppl"] - 1)
    res["speedup_end_to_end"] = out["methods"]["dense_lora"]["latency_ms"] / res["latency_ms"]
    out["methods"]["der_lora"] = res
    return out


def main(argv: list[str] | None = None) -> int:
    res, path = run_experiment("lora_llama", LoraLlamaConfig, run, argv, __doc__)
    for k, v in res["methods"].items():
        print(f"{k:<24} ppl {v['val_ppl']:8.3f}  latency {v.get('latency_ms', float('nan')):8.1f} ms")
    print(f"wrote {path}")
    return 0
