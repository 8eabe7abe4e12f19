"""der exp entropy-validation: the pieces on tiny inputs (the full quick run is a script, not a test)."""

from __future__ import annotations

import numpy as np
import pytest

from der_lab.experiments import entropy_validation as ev


def test_fit_stats_perfect_and_degenerate():
    s = np.arange(6.0)
    r = ev.fit_stats(s, 2 * s + 1)
    assert r["r2"] == pytest.approx(1.0) and r["spearman"] == pytest.approx(1.0)
    assert r["slope"] == pytest.approx(2.0)
    assert np.isnan(ev.fit_stats(s, np.ones(6))["r2"])


def test_truth_and_surrogates_on_a_small_instance():
    pts = ev._family("clusters-3-0.02", 9, np.random.default_rng(0))
    t = ev.truth(pts)
    assert t["hull2d_method"] == "exact" and 0 <= t["hull2d"] <= np.log(9)
    assert t["maxima2d_lower"] <= t["maxima2d"]
    f = ev.fit_surrogates(pts, seed=0, steps=2)
    assert set(f) == {"diff", "soft", "box"} and all(np.isfinite(v) and v >= -1e-12 for v in f.values())


def test_trajectory_records():
    rec = ev.trajectory(n=16, steps=2, every=1, seed=0)
    assert [r["step"] for r in rec] == [0, 1, 2]
    assert all(np.isfinite(r["H_diff"]) and r["hull2d"] >= 0 for r in rec)


def test_bad_seeds():
    with pytest.raises(SystemExit, match="seeds"):
        ev.main(["--quick", "--seeds", "0"])
