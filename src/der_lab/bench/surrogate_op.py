r"""Benchmark: streaming :math:`H_\text{diff}` (Eq. 2–3) forward+backward vs the naive formulation.

Naive: ``cdist → square → softmax → mean → entropy`` with plain autograd (keeps several ``N×k`` tensors).
Ours: :func:`der.functional.anchor_entropy`, which streams through :func:`der._ops.softmax_counts`.

For every ``(N, k, d)`` case, in one process: median fwd+bwd wall time of both (warm-up, then repeats),
their ratio, the FLOP floor and our ratio to it, and the relative error of our float32 value/gradients
against a float64 evaluation. Peak extra memory is measured in a fresh subprocess per case and method
(``ru_maxrss`` after the step minus the resident size before it, after a tiny warm-up that loads the
BLAS/threading libraries).

FLOP floor (issue 3): ``2·N·k·d`` multiply-adds (the distance/logit product once forward, once backward)
= ``4·N·k·d`` flops, divided by the float32 matmul rate measured in this run. The streaming algorithm
performs four such products (forward, recompute, ``∇x``, ``∇c``), so 2.0 is its hard lower bound on that
ratio; ``recompute_floor_s`` (``8·N·k·d`` flops) is reported beside it.

Allocator: where page faults are expensive (this VM: ~1 µs per 4 KiB page, so first-touching a fresh
64 MiB tensor costs ~16 ms; ``der bench surrogate-floor``), the naive path's fresh ``N×k`` temporaries are a
large part of its time. Run the
benchmark again with ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's switch to 2 MiB pages for large tensors; it must
be set before ``import torch``) to see the comparison without that cost; the result records the setting.

Usage: ``der bench surrogate-op [--quick] [--cases N,k,d ...] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from der._io import merge_json
from der_lab.harness import Run, result_path, time_call

__all__ = [
    "naive_entropy",
    "ours_entropy",
    "make_inputs",
    "step",
    "time_step",
    "matmul_rate",
    "accuracy",
    "memory_child",
    "measure_memory",
    "naive_skip_reason",
    "run_case",
    "truncation_errors",
    "print_table",
    "parse_case",
    "main",
]

ALPHA = 10.0
GRID_N = (10_000, 100_000, 1_000_000)
GRID_K = (16, 64, 256, 1024)
GRID_D = (2, 16, 64)
GOAL_CASES = ((1_000_000, 64, 2), (65_536, 256, 64))
#: The naive path keeps ~6 float32 N×k tensors at its peak; above this many N·k entries it would need
#: more than ~1.5 GB on a 23 GB machine shared with other jobs, so it is skipped (and reported as such).
NAIVE_MAX_NK = 64_000_000
RESULT_NAME = "surrogate_op.json"


def naive_entropy(x: torch.Tensor, c: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """The straightforward formulation of Eq. 2–3 (the baseline of issue 3)."""
    p = torch.softmax(-alpha * torch.cdist(x, c) ** 2, dim=-1)
    q = p.mean(dim=0)
    return -(q * torch.log(q.clamp_min(torch.finfo(q.dtype).tiny))).sum()


def ours_entropy(x: torch.Tensor, c: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    from der.functional import anchor_entropy

    return anchor_entropy(x, c, alpha)


METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "naive": naive_entropy,
    "ours": ours_entropy,
}


def make_inputs(n: int, k: int, d: int, dtype=torch.float32, seed: int = 0):
    """Points uniform in the unit cube, anchors among them (k-means-like scale), as leaves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=dtype)
    c = (
        x[torch.randperm(n, generator=g)[:k]].clone()
        if k <= n
        else torch.rand(k, d, generator=g, dtype=dtype)
    )
    return x.requires_grad_(), c.requires_grad_()


def step(method: str, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One forward+backward; returns the (detached) entropy."""
    x.grad = c.grad = None
    h = METHODS[method](x, c, ALPHA)
    h.backward()
    return h.detach()


def time_step(fn: Callable[[], object], budget_s: float = 3.0, min_rep: int = 3, max_rep: int = 9) -> dict:
    """Median wall time after one warm-up; repeats until ``budget_s`` is spent (within [min_rep, max_rep])."""
    t = time_call(fn, repeats=min_rep, warmup=1, budget_s=budget_s, max_repeats=max_rep)
    return {"median_s": t.median_s, "min_s": t.min_s, "repeats": t.repeats}


def matmul_rate(size: int = 2048) -> float:
    """float32 matmul rate (flop/s) of this machine right now: median of repeats of a square product."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    t = time_step(lambda: a @ b, budget_s=2.0, min_rep=5)["median_s"]
    return 2.0 * size**3 / t


def accuracy(n: int, k: int, d: int) -> dict:
    """Relative error of our float32 value and gradients vs a float64 evaluation of the same inputs.

    The float64 evaluation is the streaming op in float64 (equal to the plain-autograd float64 reference to
    ~1e-12, tests/test_ops.py), so this check needs no N×k memory and runs at every size."""
    x, c = make_inputs(n, k, d, seed=1)
    h = step("ours", x, c)
    gx, gc = x.grad.clone(), c.grad.clone()
    x64, c64 = (t.detach().double().requires_grad_() for t in (x, c))
    h64 = step("ours", x64, c64)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300))

    return {
        "value_rel_err": rel(h, h64),
        "grad_x_rel_err": rel(gx, x64.grad),
        "grad_c_rel_err": rel(gc, c64.grad),
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) of this process; False if not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_child(method: str, n: int, k: int, d: int) -> dict:
    """Run in a fresh process: peak resident bytes added by one fwd+bwd beyond the inputs (the high-water
    mark is reset after imports, warm-up and input creation, so only the step itself is measured)."""
    xs, cs = make_inputs(256, 8, d)
    step(method, xs, cs)  # load libraries and thread pools with a tiny problem
    x, c = make_inputs(n, k, d)
    base = _rss_bytes()
    reset = _reset_peak_rss()
    step(method, x, c)
    peak = _peak_rss_bytes()
    return {"peak_extra_bytes": max(0, peak - base), "hwm_reset": reset, "inputs_bytes": (n + k) * d * 4}


def measure_memory(method: str, n: int, k: int, d: int) -> dict:
    cmd = [sys.executable, "-m", "der_lab.bench.surrogate_op", "--memory-child", method, f"{n},{k},{d}"]
    cmd += ["--threads", str(torch.get_num_threads())]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        return {
            "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc={out.returncode}"
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def naive_skip_reason(n: int, k: int) -> str | None:
    if n * k > NAIVE_MAX_NK:
        gb = 6 * n * k * 4 / 1e9
        return f"naive needs ~{gb:.1f} GB (6 float32 N×k tensors); skipped on this shared 23 GB machine"
    return None


def run_case(n: int, k: int, d: int, rate: float, memory: bool, budget_s: float) -> dict:
    row: dict = {"N": n, "k": k, "d": d}
    x, c = make_inputs(n, k, d)
    skip = naive_skip_reason(n, k)
    methods = ["ours"] if skip else ["naive", "ours"]
    for m in methods:
        row[m] = time_step(lambda m=m: step(m, x, c), budget_s=budget_s)
        if memory:
            row[m].update(measure_memory(m, n, k, d))
    if skip:
        row["naive"] = {"skipped": skip}
    else:
        row["speedup"] = row["naive"]["median_s"] / row["ours"]["median_s"]
        if memory and "peak_extra_bytes" in row["ours"] and row["naive"].get("peak_extra_bytes"):
            row["memory_ratio"] = row["ours"]["peak_extra_bytes"] / row["naive"]["peak_extra_bytes"]
    row["floor_s"] = 4.0 * n * k * d / rate
    row["recompute_floor_s"] = 2 * row["floor_s"]
    row["floor_ratio"] = row["ours"]["median_s"] / row["floor_s"]
    row["accuracy"] = accuracy(n, k, d)
    return row


def truncation_errors(n: int = 100_000, k: int = 64, d: int = 2, alpha: float = 30.0) -> dict:
    """Error and time of the cost reducers (App. A, G.4, G.11) vs the exact counts, on uniform points."""
    from der._ops import softmax_counts
    from der._ops.truncated import approximation_error, subsampled_counts, truncated_counts

    x, c = (t.detach() for t in make_inputs(n, k, d, seed=2))
    W, b = 2 * alpha * c, -alpha * (c * c).sum(-1)
    out: dict = {
        "N": n,
        "k": k,
        "d": d,
        "alpha": alpha,
        "exact_s": time_step(lambda: softmax_counts(x, W, b), 1.0),
    }
    rows = []
    for method in ("exact", "faiss"):
        for r in (1, 2, 4, 8, 16):
            approx = truncated_counts(x, W, b, r, method=method)
            t = time_step(lambda r=r, method=method: truncated_counts(x, W, b, r, method=method), 1.0)
            rows.append(
                {"reducer": f"truncate-{method}", "r": r, **approximation_error(x, W, b, approx), **t}
            )
    g = torch.Generator().manual_seed(0)
    for m in (1_000, 10_000):
        approx = subsampled_counts(x, W, b, m, generator=g)
        t = time_step(lambda m=m: subsampled_counts(x, W, b, m, generator=g), 1.0)
        rows.append({"reducer": "subsample", "m": m, **approximation_error(x, W, b, approx), **t})
    out["rows"] = rows
    print(f"cost reducers at N={n}, k={k}, d={d}, alpha={alpha} (exact: {out['exact_s']['median_s']:.4f}s)")
    for r in rows:
        size = f"r={r['r']}" if "r" in r else f"m={r['m']}"
        print(
            f"  {r['reducer']:>16} {size:>8}: counts rel L1 {r['counts_rel_l1']:.2e}, "
            f"|dH| {r['entropy_abs_err']:.2e} nats, {r['median_s']:.4f}s"
        )
    return out


def _fmt_mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def print_table(rows: list[dict], rate: float) -> None:
    print(f"float32 matmul rate: {rate / 1e9:.1f} GFLOP/s, torch threads: {torch.get_num_threads()}")
    hdr = (
        f"{'N':>9} {'k':>5} {'d':>3} | {'naive s':>8} {'ours s':>8} {'speedup':>7} | {'naive MB':>8} "
        f"{'ours MB':>7} {'mem %':>6} | {'floor s':>8} {'x floor':>7} | {'val err':>8} {'grad err':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        nv, us = r["naive"], r["ours"]
        acc = r.get("accuracy", {})
        gerr = max(acc.get("grad_x_rel_err", float("nan")), acc.get("grad_c_rel_err", float("nan")))
        print(
            f"{r['N']:>9} {r['k']:>5} {r['d']:>3} | "
            f"{nv.get('median_s', float('nan')):>8.4f} {us['median_s']:>8.4f} {r.get('speedup', float('nan')):>7.1f} | "
            f"{_fmt_mb(nv.get('peak_extra_bytes')):>8} {_fmt_mb(us.get('peak_extra_bytes')):>7} "
            f"{100 * r.get('memory_ratio', float('nan')):>6.1f} | "
            f"{r['floor_s']:>8.4f} {r['floor_ratio']:>7.2f} | "
            f"{acc.get('value_rel_err', float('nan')):>8.1e} {gerr:>8.1e}"
        )
    skipped = [r for r in rows if "skipped" in r["naive"]]
    if skipped:
        print(
            f"naive skipped for {len(skipped)} case(s): N·k > {NAIVE_MAX_NK:,} ({skipped[0]['naive']['skipped']})"
        )


def parse_case(s: str) -> tuple[int, int, int]:
    try:
        n, k, d = (int(float(v)) for v in s.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"a case is N,k,d (e.g. 1e6,64,2), got {s!r}") from e
    return n, k, d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der bench surrogate-op", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the two goal cases")
    ap.add_argument("--cases", type=parse_case, nargs="*", help="explicit N,k,d cases (default: full grid)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of repeats per method and case")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default <results>/surrogate_op.json)")
    ap.add_argument(
        "--truncation-only", action="store_true", help="only the cost-reducer errors (merged into --out)"
    )
    ap.add_argument("--memory-child", nargs=2, metavar=("METHOD", "N,k,d"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out = result_path(RESULT_NAME, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], *parse_case(args.memory_child[1]))))
        return 0
    if args.truncation_only:
        merge_json(args.out, "truncation", truncation_errors(), default={"benchmark": "surrogate_op"})
        return 0
    if args.cases:
        cases = list(args.cases)
    elif args.quick:
        cases = list(GOAL_CASES)
    else:
        cases = [(n, k, d) for n in GRID_N for k in GRID_K for d in GRID_D] + [GOAL_CASES[1]]
    run = Run()
    rate = matmul_rate()
    rows = []
    for n, k, d in cases:
        rows.append(run_case(n, k, d, rate, not args.no_memory, args.budget))
        print(
            f"done N={n} k={k} d={d}: ours {rows[-1]['ours']['median_s']:.4f}s", file=sys.stderr, flush=True
        )
    rate_end = matmul_rate()
    print_table(rows, rate)
    result = {
        "benchmark": "surrogate_op",
        "description": __doc__,
        "alpha": ALPHA,
        "matmul_rate_flops": rate,
        "matmul_rate_flops_end": rate_end,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        # PyTorch's huge-page switch (read once, before the first allocation): on this VM a 4 KiB page
        # fault costs ~1 µs (der bench surrogate-floor), a large part of the naive path's time without it.
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "naive_max_nk": NAIVE_MAX_NK,
        "rows": rows,
        "truncation": truncation_errors(),
    }
    run.write(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
