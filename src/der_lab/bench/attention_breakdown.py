"""Where the CPU block-sparse kernel's time goes, next to this CPU's matmul rate (issue 7's 3× goal vs a 4× limit).

For shapes of ``der bench attention-kernel`` (its BigBird layout at 75% block sparsity, Dh = 64, block 64,
one thread, forward): the kernel's own time split by ATen op (``torch.profiler`` self CPU time of the
batched matmuls, the softmax, the gathers and everything else), the GFLOP/s of its matmuls (2·Dh FLOPs per
kept (query, key) pair, two products), and in the same process the single-thread SGEMM rate of a square
512³ product and the dense SDPA time. If the matmuls already run at the SGEMM rate, what separates the
kernel from 4× dense is the rest (softmax, gathers, Python).

    der bench attention-breakdown [--repeats R]   → benchmarks/results/attention_breakdown.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from der.attention.baselines import bigbird_layout
from der.attention.kernels import block_sparse_attention
from der_lab.harness import Run, result_path, time_call, time_calls

__all__ = ["sgemm_gflops", "breakdown", "main"]

BLOCK, DH, SPARSITY = 64, 64, 0.75
SHAPES = ((1, 6, 256), (8, 6, 256), (1, 6, 1024), (1, 12, 4096))
GROUPS = {"matmul": ("aten::baddbmm", "aten::bmm"), "softmax": ("aten::_softmax",),
          "gather": ("aten::index_select",)}


def sgemm_gflops(n: int = 512, repeats: int = 20) -> float:
    """Single-process square SGEMM rate (GFLOP/s) at the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / time_call(lambda: a @ b, repeats=repeats).median_s / 1e9


def breakdown(B: int, H: int, N: int, repeats: int) -> dict:
    lay = bigbird_layout(N, BLOCK, H, SPARSITY, seed=0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, DH, generator=g) for _ in range(3))
    with torch.no_grad():
        t = time_calls({"ours": lambda: block_sparse_attention(q, k, v, lay, backend="gather"),
                        "dense": lambda: F.scaled_dot_product_attention(q, k, v)}, repeats=repeats)
        ours, dense = t["ours"].median_s, t["dense"].median_s
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(repeats):
                block_sparse_attention(q, k, v, lay, backend="gather")
    self_us = {e.key: e.self_cpu_time_total / repeats for e in prof.key_averages()}
    total = sum(self_us.values())
    shares = {grp: sum(self_us.get(n, 0.0) for n in names) / total for grp, names in GROUPS.items()}
    shares["other"] = 1.0 - sum(shares.values())
    pairs = int(lay.mask.sum()) * B * BLOCK * BLOCK  # kept (query, key) pairs
    mm_s = sum(self_us.get(n, 0.0) for n in GROUPS["matmul"]) * 1e-6
    return {"B": B, "H": H, "N": N, "ours_ms": 1e3 * ours, "dense_sdpa_ms": 1e3 * dense,
            "speedup": dense / ours, "op_share_of_kernel": shares,
            "matmul_gflops": 2 * 2 * DH * pairs / mm_s / 1e9 if mm_s else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der bench attention-breakdown", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default <results>/attention_breakdown.json)")
    args = ap.parse_args(argv)
    args.out = result_path("attention_breakdown.json", args.out)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    torch.set_num_threads(1)
    meta = Run()
    peak = sgemm_gflops()
    rows = [breakdown(B, H, N, max(3, args.repeats // (4 if N >= 4096 else 1))) for B, H, N in SHAPES]
    for r in rows:
        r["matmul_fraction_of_sgemm"] = r["matmul_gflops"] / peak if r["matmul_gflops"] else None
    res = {"benchmark": "attention_breakdown", "threads": 1, "sgemm_512_gflops": peak,
           "layout": "bigbird_layout(N, 64, H, sparsity=0.75, seed=0)", "rows": rows}
    meta.write(args.out, res)
    print(f"single-thread SGEMM 512³: {peak:.1f} GFLOP/s")
    for r in rows:
        sh = r["op_share_of_kernel"]
        print(f"B={r['B']} H={r['H']:>2} N={r['N']:>4}: ours {r['ours_ms']:8.3f} ms, dense {r['dense_sdpa_ms']:8.3f} ms "
              f"({r['speedup']:.2f}x); matmuls {r['matmul_gflops']:.1f} GFLOP/s = {r['matmul_fraction_of_sgemm']:.0%} "
              f"of SGEMM; shares matmul {sh['matmul']:.0%} softmax {sh['softmax']:.0%} gather {sh['gather']:.0%} "
              f"other {sh['other']:.0%}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
