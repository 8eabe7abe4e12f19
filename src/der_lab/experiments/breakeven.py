r"""Break-even calculator for DER's training overhead (App. C.1).

With training overhead :math:`T` (seconds), inference speedup :math:`S` and dense per-batch inference time
:math:`t_\text{batch}`, DER pays off after

.. math::  N_\text{min} = \frac{T}{(1 - 1/S)\, t_\text{batch}}

inference batches. ``der breakeven --overhead-hours H --speedup S --batch-ms T`` prints :math:`N_\text{min}`
(and the days to reach it at ``--daily`` batches/day); ``--plot out.png`` draws cumulative savings minus
overhead against N; ``--check-paper`` recomputes the paper's Tables 8–9 and prints where their rows are
(in)consistent with the formula, writing ``benchmarks/results/breakeven_paper_check.json`` when ``--json``
is given.

Example::

    >>> round(break_even_batches(3.4 * 3600, 1.47, 0.085))
    450383
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["break_even_batches", "implied_batch_seconds", "PaperRow", "PAPER_ROWS", "check_paper", "main"]


def _check(overhead_s: float, speedup: float, batch_s: float) -> None:
    if not (math.isfinite(overhead_s) and overhead_s >= 0):
        raise ValueError(f"training overhead must be a finite number >= 0, got {overhead_s!r}")
    if not (math.isfinite(speedup) and speedup > 1.0):
        raise ValueError(f"speedup must be > 1 (no speedup never breaks even), got {speedup!r}")
    if not (math.isfinite(batch_s) and batch_s > 0):
        raise ValueError(f"per-batch inference time must be > 0, got {batch_s!r}")


def break_even_batches(overhead_s: float, speedup: float, batch_s: float) -> float:
    """N_min = T / ((1 − 1/S) · t_batch) of App. C.1 (all times in seconds)."""
    _check(overhead_s, speedup, batch_s)
    return overhead_s / ((1.0 - 1.0 / speedup) * batch_s)


def implied_batch_seconds(overhead_s: float, speedup: float, n_batches: float) -> float:
    """The dense per-batch time t_batch that makes a stated (T, S, N_min) row consistent."""
    _check(overhead_s, speedup, 1.0)
    if n_batches <= 0:
        raise ValueError(f"n_batches must be > 0, got {n_batches!r}")
    return overhead_s / ((1.0 - 1.0 / speedup) * n_batches)


@dataclass(frozen=True)
class PaperRow:
    """One row of Table 8 / 9 as printed; ``batch_ms`` is the dense latency the paper reports elsewhere."""

    table: str
    scenario: str
    overhead_h: float
    speedup: float
    stated_batches: float
    stated_daily: float | None
    stated_days: float | None
    batch_ms: float | None
    batch_ms_source: str


PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow("8", "EntropyNet (Geometry)", 3 / 60, 4.1, 1.5e3, None, 1, 8.7, "Table 2 raw hull runtime 8.7 ms"),
    PaperRow("8", "ViT-Base (ImageNet)", 3.4, 1.60, 450e3, None, 5.5, 85, "App. C.1 text / Table 5 dense 85 ms"),
    PaperRow("8", "LLaMA-2 7B (Summ.)", 48, 1.60, 180e3, None, 3, 850, "Table 7 dense latency 850 ms"),
    PaperRow("9", "EntropyNet (Geometry)", 3 / 60, 4.1, 1.5e3, 1.5e3, 1, 8.7, "Table 2 raw hull runtime 8.7 ms"),
    PaperRow("9", "ViT-Base (CIFAR-100)", 3.4, 1.47, 450e3, 85e3, 5.5, 85, "App. C.1 text: t_batch = 85 ms"),
    PaperRow("9", "LLaMA-2 7B (Summarization)", 48, 1.6, 180e3, 60e3, 3, 850, "Table 7 dense latency 850 ms"),
    PaperRow("9", "GPT-J 6B (Long-context)", 72, 1.4, 420e3, 140e3, 3, None, "no latency given in the paper"),
)


def check_paper(rel_tol: float = 0.05) -> list[dict]:
    """Recompute every Table 8–9 row; flag rows whose N_min is off by more than ``rel_tol``."""
    out = []
    for r in PAPER_ROWS:
        t = r.overhead_h * 3600
        implied = implied_batch_seconds(t, r.speedup, r.stated_batches) * 1e3
        row = {**asdict(r), "implied_batch_ms": implied}
        if r.batch_ms is not None:
            n = break_even_batches(t, r.speedup, r.batch_ms / 1e3)
            row["recomputed_batches"] = n
            row["ratio_stated_over_recomputed"] = r.stated_batches / n
            row["consistent"] = abs(r.stated_batches / n - 1) <= rel_tol
        else:
            row["recomputed_batches"] = None
            row["ratio_stated_over_recomputed"] = None
            row["consistent"] = None
        if r.stated_daily and r.stated_days:
            row["days_from_daily"] = r.stated_batches / r.stated_daily
            row["days_consistent"] = abs(row["days_from_daily"] - r.stated_days) <= 0.5 + 0.1 * r.stated_days
        out.append(row)
    return out


def _plot(path: Path, overhead_s: float, speedup: float, batch_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_min = break_even_batches(overhead_s, speedup, batch_s)
    n = [i * 2.5 * n_min / 200 for i in range(201)]
    net_h = [(x * (1 - 1 / speedup) * batch_s - overhead_s) / 3600 for x in n]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(n, net_h)
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(n_min, ls="--", color="C3", label=f"break-even N = {n_min:,.0f}")
    ax.set_xlabel("inference batches N")
    ax.set_ylabel("net saving (hours)")
    ax.set_title(f"App. C.1: T = {overhead_s / 3600:g} h, S = {speedup:g}x, t = {batch_s * 1e3:g} ms")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_check(rows: list[dict]) -> None:
    print(f"{'tab':>3} {'scenario':<28} {'T(h)':>6} {'S':>5} {'stated N':>10} {'t(ms)':>7} {'recomp. N':>10} "
          f"{'ratio':>6} {'implied t(ms)':>13}  ok")
    for r in rows:
        rec = f"{r['recomputed_batches']:,.0f}" if r["recomputed_batches"] else "-"
        ratio = f"{r['ratio_stated_over_recomputed']:.2f}" if r["ratio_stated_over_recomputed"] else "-"
        tms = f"{r['batch_ms']:g}" if r["batch_ms"] else "-"
        print(f"{r['table']:>3} {r['scenario']:<28} {r['overhead_h']:>6.3g} {r['speedup']:>5.2f} "
              f"{r['stated_batches']:>10,.0f} {tms:>7} {rec:>10} {ratio:>6} {r['implied_batch_ms']:>13.1f}  "
              f"{r['consistent']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="der breakeven", description=__doc__.split("\n\n")[0])
    p.add_argument("--overhead-hours", type=float, help="extra training time T caused by DER (hours)")
    p.add_argument("--speedup", type=float, help="inference speedup S (> 1)")
    p.add_argument("--batch-ms", type=float, help="dense inference time per batch t_batch (ms)")
    p.add_argument("--daily", type=float, default=None, help="inference batches per day (prints days to break even)")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of net savings vs N")
    p.add_argument("--check-paper", action="store_true", help="recompute the paper's Tables 8-9")
    p.add_argument("--json", type=Path, default=None, help="write the --check-paper rows as JSON")
    a = p.parse_args(argv)
    if a.check_paper:
        rows = check_paper()
        _print_check(rows)
        if a.json:
            from der.training import write_json

            write_json(a.json, {"formula": "N_min = T / ((1 - 1/S) * t_batch)", "rows": rows})
        return 0
    missing = [n for n in ("overhead_hours", "speedup", "batch_ms") if getattr(a, n) is None]
    if missing:
        p.error("missing " + ", ".join("--" + m.replace("_", "-") for m in missing))
    try:
        t, s, b = a.overhead_hours * 3600, a.speedup, a.batch_ms / 1e3
        n = break_even_batches(t, s, b)
    except ValueError as e:
        p.error(str(e))
    print(f"saving per batch: {(1 - 1 / s) * b * 1e3:.3f} ms; break-even after N = {n:,.0f} inference batches")
    if a.daily:
        print(f"at {a.daily:,.0f} batches/day: {n / a.daily:.2f} days")
    if a.plot:
        _plot(a.plot, t, s, b)
        print(f"plot: {a.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
