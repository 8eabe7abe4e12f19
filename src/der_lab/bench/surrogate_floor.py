r"""Where the streaming surrogate's time goes, and what the alternatives cost (issue 3's FLOP-floor goal).

For one ``(N, k, d)`` case, in one process and on the same inputs as ``der bench surrogate-op``:

* **parts** of the streaming fwd+bwd, each timed alone over all chunks with the op's own chunk size and
  ``out=`` buffers: the four ``N·k·d`` products (forward logits, recomputed logits, ``∇x = ∂L/∂ℓ · W``,
  ``∇W = ∂L/∂ℓᵀ · x``), the two softmax passes and the softmax-backward pass. Their sum is what a perfect
  composition of these kernels would take; the products alone are the recompute design's floor *at the
  rate these skinny products actually reach* (inner dimension ``d``, not a square matmul).
* **alternatives** to the eager streaming op: ``torch.compile``'d chunk functions (Inductor fuses the
  softmax with the column sum and the gradient epilogue; compile time reported separately), and the plain
  autograd formulation that keeps the ``N×k`` probabilities (three products instead of four: no
  recompute), with its extra memory.

Writes the result under ``"floor_breakdown"`` of ``benchmarks/results/surrogate_op.json``.
Usage: ``der bench surrogate-floor [--case N,k,d] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from der._io import merge_json
from der._ops import softmax_counts_reference
from der._ops.streaming import DEFAULT_CHUNK_ELEMS, _rows_per_chunk
from der_lab.bench.surrogate_op import (
    ALPHA,
    GOAL_CASES,
    RESULT_NAME,
    make_inputs,
    matmul_rate,
    parse_case,
    step,
    time_step,
)
from der_lab.harness import Run, result_path

__all__ = ["parts", "compiled_step", "alternatives", "first_touch", "breakdown", "main"]


def _affine(x: torch.Tensor, c: torch.Tensor, alpha: float = ALPHA):
    """The sqeuclidean anchors as an affine softmax (see :mod:`der._ops`): ``f = x, W = 2αc, b = −α‖c‖²``."""
    return x, 2 * alpha * c, -alpha * (c * c).sum(-1)


def _entropy(counts: torch.Tensor) -> torch.Tensor:
    p = counts / counts.sum()
    return -(p * p.clamp_min(1e-30).log()).sum()


def parts(n: int, k: int, d: int, budget_s: float) -> dict:
    """Median time of each kernel of the streaming fwd+bwd, alone, over all chunks."""
    x, c = (t.detach() for t in make_inputs(n, k, d))
    f, W, b = _affine(x, c)
    Wt = W.t().contiguous()
    C = _rows_per_chunk(1, n, k, DEFAULT_CHUNK_ELEMS)
    a, p = torch.empty(C, k), torch.empty(C, k)
    g = torch.randn(k).expand(C, k)
    dx = torch.empty(n, d)
    chunks = [(s, min(n, s + C)) for s in range(0, n, C) if min(n, s + C) - s == C]  # full chunks only
    scale = n / (len(chunks) * C)  # extrapolate the (smaller) tail chunk

    def loop(body):
        def run():
            for s, e in chunks:
                body(s, e)

        return run

    kernels = {
        "logits_product": loop(lambda s, e: torch.addmm(b, f[s:e], Wt, out=a)),
        "grad_x_product": loop(lambda s, e: torch.mm(a, W, out=dx[s:e])),
        "grad_W_product": loop(lambda s, e: torch.mm(a.t(), f[s:e])),
        "softmax": loop(lambda s, e: torch.ops.aten._softmax.out(a, -1, False, out=p)),
        "softmax_backward": loop(
            lambda s, e: torch.ops.aten._softmax_backward_data.out(g, p, -1, p.dtype, grad_input=a)
        ),
    }
    torch.addmm(b, f[:C], Wt, out=a)
    out = {name: time_step(fn, budget_s=budget_s)["median_s"] * scale for name, fn in kernels.items()}
    counts = {
        "logits_product": 2,
        "grad_x_product": 1,
        "grad_W_product": 1,
        "softmax": 2,
        "softmax_backward": 1,
    }
    products = sum(out[kk] * counts[kk] for kk in counts if kk.endswith("product"))
    return {
        "seconds": out,
        "passes": counts,
        "products_s": products,
        "sum_of_parts_s": sum(out[kk] * counts[kk] for kk in counts),
        "product_rate_flops": 8.0 * n * k * d / products,
    }


def compiled_step(n: int, k: int, d: int, chunk_elems: int = DEFAULT_CHUNK_ELEMS):
    """Streaming fwd+bwd with ``torch.compile``'d chunk functions (static shapes; full chunks + a tail).

    Returns ``(run, first_call_s)``; ``run()`` returns ``(∇f, ∇W, ∇b)`` of the entropy of the counts."""
    C = _rows_per_chunk(1, n, k, chunk_elems)

    def fwd_chunk(fc, Wt, b):
        return torch.softmax(torch.addmm(b, fc, Wt), -1).sum(0)

    def bwd_chunk(fc, Wt, W, b, g):
        p = torch.softmax(torch.addmm(b, fc, Wt), -1)
        dl = p * (g - (p * g).sum(-1, keepdim=True))
        return dl @ W, dl.t() @ fc, dl.sum(0)

    cf, cb = torch.compile(fwd_chunk, dynamic=False), torch.compile(bwd_chunk, dynamic=False)
    x, c = (t.detach() for t in make_inputs(n, k, d))
    f, W, b = _affine(x, c)

    def run():
        Wt = W.t().contiguous()
        counts = torch.zeros(k, dtype=torch.float64)
        for s in range(0, n, C):
            counts += cf(f[s : s + C], Wt, b)
        cnt = counts.float().requires_grad_()
        (g,) = torch.autograd.grad(_entropy(cnt), cnt)
        dx, dW = torch.empty(n, d), torch.zeros(k, d, dtype=torch.float64)
        db = torch.zeros(k, dtype=torch.float64)
        for s in range(0, n, C):
            gx, gw, gb = cb(f[s : s + C], Wt, W, b, g)
            dx[s : s + C] = gx
            dW += gw
            db += gb
        return dx, dW.float(), db.float()

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def alternatives(n: int, k: int, d: int, budget_s: float) -> dict:
    """Eager streaming (ours) vs compiled chunk functions vs plain autograd that keeps ``N×k`` (no recompute)."""
    from der_lab.bench.surrogate_op import measure_memory

    x, c = make_inputs(n, k, d)
    xk, ck = (t.detach().clone().requires_grad_() for t in (x, c))

    def keep_p():
        xk.grad = ck.grad = None
        f, W, b = _affine(xk, ck)
        _entropy(softmax_counts_reference(f, W, b)).backward()

    compiled, first_call = compiled_step(n, k, d)
    out = {
        "ours_streaming": time_step(lambda: step("ours", x, c), budget_s=budget_s)["median_s"],
        "compiled_chunks": time_step(compiled, budget_s=budget_s)["median_s"],
        "compiled_first_call_s": first_call,
        "keep_probabilities": time_step(keep_p, budget_s=budget_s)["median_s"],
    }
    out["ours_peak_extra_bytes"] = measure_memory("ours", n, k, d).get("peak_extra_bytes")
    out["naive_peak_extra_bytes"] = measure_memory("naive", n, k, d).get("peak_extra_bytes")
    out["keep_probabilities_extra_bytes_lower_bound"] = n * k * 4
    return out


def first_touch(mib: int = 64, budget_s: float = 1.0) -> dict:
    """Cost of page faults: allocate-and-fill ``mib`` MiB fresh vs refill memory already touched.

    Above glibc's largest mmap threshold (32 MiB) every allocation is a fresh mapping, so each 4 KiB page
    faults on first touch (smaller blocks may be recycled from the heap, depending on history); with
    ``THP_MEM_ALLOC_ENABLE=1`` (read before the first allocation) PyTorch asks for 2 MiB pages instead."""
    n = mib * 2**20 // 4
    touched = torch.empty(n)
    touched.fill_(0.0)
    fresh = time_step(lambda: torch.empty(n).fill_(1.0), budget_s=budget_s, min_rep=5)["median_s"]
    warm = time_step(lambda: touched.fill_(1.0), budget_s=budget_s, min_rep=5)["median_s"]
    return {
        "mib": mib,
        "fresh_fill_s": fresh,
        "touched_fill_s": warm,
        "per_4k_page_us": 1e6 * (fresh - warm) / (mib * 256),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }


def breakdown(n: int, k: int, d: int, budget_s: float = 2.0) -> dict:
    run = Run()
    rate = matmul_rate()
    floor = 4.0 * n * k * d / rate
    res = {
        "N": n,
        "k": k,
        "d": d,
        "matmul_rate_flops": rate,
        "floor_s": floor,
        "threads": torch.get_num_threads(),
    }
    res["parts"] = parts(n, k, d, budget_s)
    res["alternatives"] = alt = alternatives(n, k, d, budget_s)
    res["ratios_to_floor"] = {
        "products_only": res["parts"]["products_s"] / floor,
        "sum_of_parts": res["parts"]["sum_of_parts_s"] / floor,
        **{name: alt[name] / floor for name in ("ours_streaming", "compiled_chunks", "keep_probabilities")},
    }
    res["first_touch"] = first_touch()
    res["meta"] = run.meta()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der bench surrogate-floor", description=__doc__.split("\n")[0])
    ap.add_argument("--case", type=parse_case, default=GOAL_CASES[1], help="N,k,d (default 65536,256,64)")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of repeats per timing")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default <results>/surrogate_op.json)")
    args = ap.parse_args(argv)
    args.out = result_path(RESULT_NAME, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = breakdown(*args.case, budget_s=args.budget)
    fl = res["floor_s"]
    print(
        f"N={res['N']} k={res['k']} d={res['d']}: FLOP floor {fl * 1e3:.1f} ms "
        f"(matmul {res['matmul_rate_flops'] / 1e9:.0f} GFLOP/s, {res['threads']} threads)"
    )
    for name, s in res["parts"]["seconds"].items():
        print(f"  {name:>18} x{res['parts']['passes'][name]}: {s * 1e3:7.2f} ms")
    print(f"  skinny-product rate {res['parts']['product_rate_flops'] / 1e9:.0f} GFLOP/s")
    ft = res["first_touch"]
    print(
        f"  first touch of {ft['mib']} MiB: {ft['fresh_fill_s'] * 1e3:.1f} ms fresh vs "
        f"{ft['touched_fill_s'] * 1e3:.2f} ms touched (~{ft['per_4k_page_us']:.1f} µs per 4 KiB page)"
    )
    for name, r in res["ratios_to_floor"].items():
        print(f"  {name:>20}: {r:5.2f} x floor")
    merge_json(args.out, "floor_breakdown", res, default={"benchmark": "surrogate_op"})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
