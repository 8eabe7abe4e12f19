"""docs/claims.md generation: missing results, known schemas, unknown schemas."""

from __future__ import annotations

import json

from der_lab.report import claims as mc


def test_missing_results_say_not_measured(tmp_path):
    text = mc.render(tmp_path)
    assert text.count("not measured yet") == sum(1 for c in mc.CLAIMS if not c.untestable)
    assert "not testable here" in text


def test_known_and_unknown_files(tmp_path):
    rows = [{"table": "9", "scenario": "x", "stated_batches": 10.0, "recomputed_batches": 20.0, "consistent": False}]
    (tmp_path / "breakeven_paper_check.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "attention_kernel.json").write_text(json.dumps({"speedup": 3.25, "nested": {"n": 4}}))
    vit = {"meta": {"quick": True}, "methods": {
        "dense": {"top1": 90.0, "flops": 2.0, "latency_ms": 10.0},
        "der@0.75": {"top1": 89.8, "flops": 1.0, "latency_ms": 5.0, "mean_block_length": 3.0},
        "l1@0.75": {"top1": 80.0, "mean_block_length": 1.5},
        "magnitude_topb@0.75": {"top1": 85.0, "mean_block_length": 1.2}}}
    (tmp_path / "exp_vit_digits_quick.json").write_text(json.dumps(vit))
    text = mc.render(tmp_path)
    line = next(li for li in text.splitlines() if li.startswith("| Kernel"))
    assert "fields not recognised (KeyError" in line and "measured — see file" in line  # unknown layout
    assert "Table 9 x (stated 10, recomputed 20)" in text
    line = next(li for li in text.splitlines() if li.startswith("| Table 4 (analog)"))
    assert "reproduced (ordering" in line and "not reproduced" not in line
    line = next(li for li in text.splitlines() if li.startswith("| Table 24 (analog)"))
    assert "gap 0.20" in line and "| reproduced" in line
