"""der exp aggregate-seeds: mean / std / per-seed values, strict config checks."""

import json

import pytest

from der_lab.experiments.aggregate_seeds import aggregate, main


def _res(seed, top1, extra_method=False, lr=0.002):
    methods = {"dense": {"top1": top1, "latency_ms": 10.0 + seed, "dense_fallbacks": {}},
               "der@0.75": {"top1": top1 - 10, "block_sparsity": 0.75, "dense_fallbacks": {"x": seed}}}
    if extra_method:
        methods["only_here@0.75"] = {"top1": 1.0}
    return {"meta": {"config": {"seed": seed, "lr": lr}, "quick": True, "config_hash": "h"},
            "methods": methods, "n_tokens": 257, "wall_seconds": 100.0}


def test_aggregate_means_std_and_seed_values():
    out = aggregate([_res(0, 90.0), _res(1, 80.0, extra_method=True), _res(2, 85.0)])
    d = out["methods"]["dense"]
    assert d["top1"] == pytest.approx(85.0) and d["top1_std"] == pytest.approx(5.0)
    assert d["top1_seeds"] == [90.0, 80.0, 85.0]
    assert out["methods"]["der@0.75"]["top1"] == pytest.approx(75.0)
    assert out["methods"]["der@0.75"]["block_sparsity_std"] == 0.0
    assert out["methods"]["der@0.75"]["dense_fallbacks"] == {"x": 0}  # non-numeric: first seed's
    assert out["meta"]["seeds"] == [0, 1, 2] and out["meta"]["dropped"] == ["only_here@0.75"]
    assert out["meta"]["quick"] is True and "config_hash" not in out["meta"]
    assert out["n_tokens"] == 257 and out["wall_seconds"] == 300.0


def test_aggregate_keeps_per_seed_top_level_fields_that_differ():
    rs = [_res(s, 90.0) for s in range(3)]
    for s, r in enumerate(rs):
        r["oracle_recall"] = {"0.75": {"dynamic": 0.3 + s / 100, "static": 0.28, "chance": 0.25}}
    out = aggregate(rs)
    assert [o["0.75"]["dynamic"] for o in out["oracle_recall"]] == [0.3, 0.31, 0.32] and out["n_tokens"] == 257


def test_aggregate_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="at least two"):
        aggregate([_res(0, 90.0)])
    with pytest.raises(ValueError, match="lr"):
        aggregate([_res(0, 90.0), _res(1, 80.0, lr=0.1)])
    with pytest.raises(ValueError, match="repeat"):
        aggregate([_res(0, 90.0), _res(0, 80.0)])


def test_cli_writes_file(tmp_path):
    paths = []
    for s in (0, 1):
        p = tmp_path / f"r{s}.json"
        p.write_text(json.dumps(_res(s, 90.0 - s)))
        paths.append(str(p))
    assert main([*paths, "--out", str(tmp_path / "agg.json")]) == 0
    agg = json.loads((tmp_path / "agg.json").read_text())
    assert agg["meta"]["sources"] == ["r0.json", "r1.json"] and agg["methods"]["dense"]["top1"] == 89.5
