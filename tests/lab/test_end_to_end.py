"""der bench end-to-end: the Amdahl ceiling, the profiled attention share, one tiny shape end to end."""

import math

import pytest
import torch

pytest.importorskip("transformers")

from der_lab.bench.end_to_end import Shape, _fwd, _fwd_bwd, _vit, amdahl_ceiling, attention_share, bench_shape


def test_amdahl_ceiling_values_and_bad_input():
    assert amdahl_ceiling(0.0, 0.25) == 1.0
    assert amdahl_ceiling(1.0, 0.25) == pytest.approx(4.0)
    assert amdahl_ceiling(0.5, 0.25) == pytest.approx(1 / 0.625)
    for share, kept in ((-0.1, 0.5), (1.1, 0.5), (0.5, 0.0), (0.5, 1.5)):
        with pytest.raises(ValueError):
            amdahl_ceiling(share, kept)


def test_attention_share_is_a_fraction():
    torch.set_num_threads(1)
    model, batch = _vit(Shape("vit", 1, 17, 4))
    model.eval()
    s = attention_share(_fwd(model, batch), backward=False)
    assert 0.0 < s["share"] < 1.0 and s["attention_ms"] <= s["total_ms"]
    model, batch = _vit(Shape("vit", 1, 65, 4))
    sb = attention_share(_fwd_bwd(model, batch), backward=True)
    assert 0.0 < sb["share"] < 1.0


def test_bench_shape_tiny_vit_reports_every_mode():
    row = bench_shape(Shape("vit", 1, 17, 4), sparsity=0.5, repeats=1)
    assert row["kept_fraction"] is not None and 0.0 < row["kept_fraction"] <= 1.0
    for mode in ("fwd", "fwd+bwd"):
        r = row[mode]
        assert r["ceiling"] >= 1.0
        for name in ("static", "dynamic"):
            assert r[name]["speedup"] > 0 and math.isfinite(r[name]["of_ceiling"])


def test_bench_shape_reports_quality_and_the_speed_doc_renders(tmp_path):
    import json

    from der_lab.report.speed import render

    row = bench_shape(Shape("vit", 1, 17, 4), sparsity=0.5, repeats=1, min_seq_len=0)
    for name in ("static", "dynamic"):
        q = row["quality"][name]
        assert -1.0 <= q["cosine_min"] <= q["cosine_mean"] <= 1.0 + 1e-6
        assert math.isfinite(row["fwd"][name]["speedup_cpu"])
    (tmp_path / "end_to_end_quick.json").write_text(json.dumps({"sparsity": 0.5, "rows": [row]}))
    text = render(tmp_path)
    assert "vit:1x17/b4" in text and "| fwd+bwd |" in text
