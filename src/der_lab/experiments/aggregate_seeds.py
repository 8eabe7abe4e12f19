"""Combine result files of one experiment run with several seeds into one (mean, std and per-seed values).

At quick scale a single seed moves methods by several points (docs/experiments.md); conclusions need the
spread. ``der exp aggregate-seeds A.json B.json ... --out X.json`` writes the same ``methods`` layout as one
run (so the docs and claims scripts read it unchanged): every numeric field is the mean over seeds, with
``<field>_std`` (sample standard deviation) and ``<field>_seeds`` (the values, in input order) next to it.
A method missing from any input is dropped (listed under ``meta.dropped``); other top-level fields keep one value
where the seeds agree and a per-seed list where they differ. The inputs must share every
config field but ``seed``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from der.training import write_json

__all__ = ["aggregate", "main"]


def aggregate(results: list[dict]) -> dict:
    """One result dict from per-seed result dicts (see module docstring)."""
    if len(results) < 2:
        raise ValueError(f"need at least two seed results, got {len(results)}")
    cfgs = [dict(r["meta"]["config"]) for r in results]
    seeds = [c.pop("seed", None) for c in cfgs]
    if any(c != cfgs[0] for c in cfgs[1:]):
        diff = sorted({k for c in cfgs[1:] for k in c if c.get(k) != cfgs[0].get(k)})
        raise ValueError(f"configs differ in more than the seed: {diff}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}")
    names = [set(r["methods"]) for r in results]
    common = [k for k in results[0]["methods"] if all(k in n for n in names)]
    methods = {}
    for k in common:
        rows = [r["methods"][k] for r in results]
        out = {}
        for f, v in rows[0].items():
            vals = [row.get(f) for row in rows]
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
                out[f] = statistics.fmean(vals)
                out[f"{f}_std"] = statistics.stdev(vals)
                out[f"{f}_seeds"] = vals
            else:
                out[f] = v  # non-numeric (e.g. fallback counters): the first seed's
        methods[k] = out
    meta = dict(results[0]["meta"])
    meta.update(config={**cfgs[0], "seed": seeds}, seeds=seeds, aggregated=True,
                dropped=sorted(set().union(*names) - set(common)),
                loadavg_start=[r["meta"].get("loadavg_start") for r in results],
                loadavg_end=[r["meta"].get("loadavg_end") for r in results])
    meta.pop("config_hash", None)
    extra = {}
    for k in results[0]:
        if k not in ("meta", "methods", "wall_seconds"):
            vals = [r.get(k) for r in results]
            extra[k] = vals[0] if all(v == vals[0] for v in vals) else vals  # per-seed list where they differ
    return {"meta": meta, "methods": methods, **extra,
            "wall_seconds": sum(r.get("wall_seconds", 0.0) for r in results)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="der exp aggregate-seeds", description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", type=Path, help="result JSON files of one experiment, one per seed")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    res = aggregate([json.loads(p.read_text()) for p in args.inputs])
    res["meta"]["sources"] = [p.name for p in args.inputs]
    write_json(args.out, res)
    for k, v in res["methods"].items():
        if "top1" in v:
            print(f"{k:<26} top-1 {v['top1']:6.2f} ± {v['top1_std']:5.2f}  seeds {[round(x, 1) for x in v['top1_seeds']]}")
    print(f"wrote {args.out}")
    return 0
