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


def test_speed_doc_goal_line_and_split_byte_llama_files(tmp_path):
    import json

    from der_lab.report.speed import render

    def step(speedup, of_ceiling, fallbacks=0):
        y = {"median_s": 1.0, "speedup": speedup, "of_ceiling": of_ceiling, "speedup_cpu": speedup,
             "of_ceiling_cpu": of_ceiling, "dense_fallbacks": {"short": fallbacks} if fallbacks else {}}
        return {"attention": {"share": 0.5}, "ceiling": 1.6, "dense": {"median_s": 1.0}, "static": y,
                "dynamic": {**y, "speedup": 0.9, "of_ceiling": 0.5}}

    rows = [{"name": f"byte-llama:1x{n}/b64", "shape": {"seq_len": n}, "fwd": step(1.5, 0.9)} for n in (256, 16384)]
    (tmp_path / "end_to_end_byte_llama_16k.json").write_text(json.dumps({"rows": rows}))
    text = render(tmp_path)
    assert "## `end_to_end_byte_llama_16k.json`" in text
    goal = next(line for line in text.splitlines() if line.startswith("Goal"))
    assert "met by 1 of 2" in goal and "1x16384/b64 fwd dynamic (50.0%)" in goal and "1x256" not in goal
    assert "Slower than dense: byte-llama:1x16384/b64 fwd dynamic" in goal


def test_cli_seq_lens_selects_shapes(monkeypatch):
    from der_lab.bench import end_to_end

    seen = []
    monkeypatch.setattr(end_to_end, "bench_shape", lambda s, *a, **k: seen.append(s.seq_len) or {})
    monkeypatch.setattr(end_to_end, "_print", lambda row: None)
    monkeypatch.setattr(end_to_end.Run, "write", lambda self, path, res: None)
    assert end_to_end.main(["--models", "byte-llama", "--seq-lens", "8192,16384"]) == 0
    assert seen == [8192, 16384]
    with pytest.raises(SystemExit):
        end_to_end.main(["--models", "byte-llama", "--seq-lens", "999"])
