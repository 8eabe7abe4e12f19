"""der_lab.report.distill renders what minilm-distill writes; the grid's tuning selection."""

from der_lab.experiments.minilm_distill import _summary, _tunes
from der_lab.report.distill import render


def test_tunes_follow_the_method_and_sparsity_lists():
    assert _tunes("static/anchors", 0.75, ["static/anchors"], [], [0.75]) == ["none", "distill"]
    assert _tunes("static/anchors", 0.5, ["static/anchors"], ["static/anchors"], [0.75]) == ["none"]
    assert _tunes("dynamic/moba", 0.75, ["static/anchors"], ["dynamic/moba"], [0.75]) == ["none", "distill+mass"]


def test_summary_and_render_read_the_numbers():
    rows = [{"cos_mean": c, "cos_min": c - 0.1, "sts_spearman_vs_dense": 0.9, "sts_spearman_vs_gold": 0.5,
             "recall": 0.7} for c in (0.95, 0.97)]
    s = _summary(rows)
    assert abs(s["cos_mean"]["mean"] - 0.96) < 1e-12 and abs(s["cos_mean"]["sd"] - 0.0141421356) < 1e-8
    d = {"n_eval_sentences": 210, "n_pairs": 120, "seq_len": 128, "block_size": 16, "steps": 30, "lr": 2e-4,
         "train_batch_size": 8, "mass_weight": 0.1, "dense": {"sts_spearman_vs_gold": 0.75},
         "summary": {"static/anchors@0.75/none": s}, "complete": True}
    md = render(d)
    assert "| static/anchors@0.75/none | 2 | 0.9600 ± 0.0141 |" in md and "complete: True" in md
