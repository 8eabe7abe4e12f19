"""Break-even calculator (App. C.1) and the paper's Tables 8-9 arithmetic."""

from __future__ import annotations

import pytest

from der_lab.experiments.breakeven import break_even_batches, check_paper, implied_batch_seconds, main


def test_formula_matches_hand_computation_and_roundtrips():
    # App. C.1 example: 12,240 s / ((1 - 1/1.47) * 0.085 s) ~= 453K (paper), exactly 450,383
    n = break_even_batches(12240.0, 1.47, 0.085)
    assert n == pytest.approx(12240.0 / ((1 - 1 / 1.47) * 0.085))
    assert 4.50e5 < n < 4.51e5
    assert implied_batch_seconds(12240.0, 1.47, n) == pytest.approx(0.085)


@pytest.mark.parametrize("args", [(-1.0, 1.5, 0.1), (1.0, 1.0, 0.1), (1.0, 0.9, 0.1), (1.0, 1.5, 0.0),
                                  (float("nan"), 1.5, 0.1)])
def test_bad_input_raises(args):
    with pytest.raises(ValueError):
        break_even_batches(*args)


def test_paper_tables_check():
    rows = {(r["table"], r["scenario"]): r for r in check_paper()}
    assert rows[("9", "ViT-Base (CIFAR-100)")]["consistent"] is True  # the recomputed row holds
    assert rows[("8", "ViT-Base (ImageNet)")]["consistent"] is False  # Table 8 uses S=1.60 with the S=1.47 N
    assert rows[("9", "LLaMA-2 7B (Summarization)")]["implied_batch_ms"] == pytest.approx(2560.0)


def test_cli_prints_and_plots(tmp_path, capsys):
    assert main(["--overhead-hours", "3.4", "--speedup", "1.47", "--batch-ms", "85", "--daily", "85000",
                 "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "450,383" in out and "5.30 days" in out
    assert (tmp_path / "p.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["--overhead-hours", "1", "--speedup", "0.5", "--batch-ms", "10"])
    with pytest.raises(SystemExit):
        main(["--speedup", "2"])
