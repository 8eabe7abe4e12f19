"""docs/experiments.md measured section: marker replacement, goal lines, missing files."""

from __future__ import annotations

import json

from der_lab.report import experiment_tables as mt


def _vit(der_top1: float) -> dict:
    return {"meta": {"quick": True, "threads": 2, "loadavg_start": [3.0, 2, 1], "loadavg_end": [4.0, 2, 1],
                     "config_hash": "abc"}, "wall_seconds": 300.0, "methods": {
        "dense": {"top1": 95.0, "flops": 2e6, "latency_ms": 10.0, "block_sparsity": 0.0},
        "der@0.75": {"top1": der_top1, "flops": 1e6, "latency_ms": 5.0, "mean_block_length": 3.0, "block_sparsity": 0.75},
        "l1@0.75": {"top1": 90.0, "mean_block_length": 1.5, "block_sparsity": 0.75},
        "magnitude_topb@0.75": {"top1": 91.0, "mean_block_length": 1.2, "block_sparsity": 0.75}}}


def test_replaces_only_the_marked_block(tmp_path):
    doc = tmp_path / "experiments.md"
    doc.write_text(f"# Experiments\nhand text\n\n{mt.BEGIN}\nold\n{mt.END}\ntail text\n")
    (tmp_path / "exp_vit_digits_quick.json").write_text(json.dumps(_vit(94.8)))
    assert mt.main(["--results", str(tmp_path), "--doc", str(doc), "--no-plots"]) == 0
    text = doc.read_text()
    assert text.startswith("# Experiments\nhand text") and text.endswith("tail text\n") and "\nold\n" not in text
    assert "**goal met**" in text and "gap 0.20 points" in text and "load average (1 min) 3.00" in text
    assert "No result file yet (`der exp byte-lm --quick`" in text
    assert mt.main(["--results", str(tmp_path), "--doc", str(doc), "--no-plots"]) == 0
    assert doc.read_text() == text  # idempotent


def test_goal_not_met_is_said(tmp_path):
    (tmp_path / "exp_vit_digits_quick.json").write_text(json.dumps(_vit(89.0)))
    block = mt.render(tmp_path, plots=False)
    assert "**goal NOT met**" in block and "DER beats: none" in block
