"""der_lab.report.distill renders what minilm-distill writes; the grid's tuning selection."""

import pytest

from der_lab.experiments.minilm_distill import SETTINGS, _summary, _tunes, merge
from der_lab.report.distill import is_der, render, verdict


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
    md = render({"minilm_distill.json": d})
    assert "| static/anchors@0.75/none | 2 | 0.9600 ± 0.0141 |" in md and "complete: True" in md


def _stat(mean, sd=0.01):
    return {"mean": mean, "sd": sd, "values": [mean - sd, mean + sd]}


def test_verdict_compares_the_best_der_row_with_the_best_other_beyond_the_spread():
    assert is_der("static/anchors@0.75/none") and is_der("static/attention@0.75/distill+mass")
    assert not is_der("static/bigbird@0.75/distill") and not is_der("dynamic/moba@0.5/none")
    summ = {"static/anchors@0.75/none": {"cos_mean": _stat(0.90)},
            "static/attention@0.75/distill+mass": {"cos_mean": _stat(0.95, 0.02)},
            "static/bigbird@0.75/none": {"cos_mean": _stat(0.94)},
            "static/bigbird@0.5/none": {"cos_mean": _stat(0.97)},
            "dynamic/anchors@0.5/none": {"cos_mean": _stat(0.99, 0.001)}}
    v = {x["sparsity"]: x for x in verdict({"summary": summ})}
    assert v[0.75]["best_der"] == "static/attention@0.75/distill+mass" and v[0.75]["best_other"] == "static/bigbird@0.75/none"
    assert v[0.75]["gap"] == pytest.approx(0.01) and not v[0.75]["der_wins"]  # 0.01 is not beyond sd 0.02
    assert v[0.5]["der_wins"] and v[0.5]["best"] == "dynamic/anchors@0.5/none"


def test_byte_lm_section_judges_perplexity_lower_is_better():
    from der_lab.report.distill import BYTE_LM_FILE

    summ = {"der/anchors@0.75/none": {"val_ppl": _stat(7.7), "ppl_increase_pct": _stat(6.0, 1.0),
                                      "recall": _stat(0.6), "kept_causal_pairs": _stat(0.25, 0.0)},
            "static/bigbird@0.75/none": {"val_ppl": _stat(7.2), "ppl_increase_pct": _stat(0.3, 0.1),
                                         "recall": _stat(0.7), "kept_causal_pairs": _stat(0.25, 0.0)}}
    v = verdict({"summary": summ}, "ppl_increase_pct", higher=False)[0]
    assert v["best_other"] == "static/bigbird@0.75/none" and v["gap"] == pytest.approx(-5.7) and not v["der_wins"]
    cfg = {"layers": 2, "hidden": 64, "heads": 4, "steps": 600, "context": 2048, "block_size": 64, "val_windows": 16,
           "distill_steps": 40, "distill_lr": 5e-4, "lam": 0.01}
    d = {"meta": {"config": cfg}, "summary": summ, "dense_models": {"dense": [{"val_ppl": 7.0}, {"val_ppl": 7.4}]},
         "oracle": {"0": {"0.75": {"dynamic": 0.8, "static": 0.8, "chance": 0.25}}}}
    md = render({BYTE_LM_FILE: d})
    assert "met by `static/bigbird@0.75/none`." in md and "der/anchors@0.75/none`." not in md
    assert "75%: 0.800, chance 0.250" in md and "| static/bigbird@0.75/none | 2 | 7.2000 ± 0.0100 |" in md


def test_merge_adds_rows_only_for_the_same_settings():
    base = {k: 1 for k in SETTINGS} | {"seeds": [0, 1, 2], "complete": True, "oracle": {"0.75": {"dynamic": 0.6}}}
    old = base | {"rows": {"a@0.75/none": [1]}, "summary": {"a@0.75/none": {"x": 1}}}
    new = base | {"rows": {"a@0.5/distill": [2]}, "summary": {"a@0.5/distill": {"x": 2}}, "oracle": {}}
    m = merge(old, new)
    assert set(m["rows"]) == {"a@0.75/none", "a@0.5/distill"} and m["oracle"] == old["oracle"] and m["complete"]
    with pytest.raises(SystemExit, match="lr"):
        merge(old, new | {"lr": 2})
