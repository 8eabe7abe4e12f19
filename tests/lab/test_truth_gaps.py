"""The large-n upper bound never undercuts the exact H_R on small random instances."""

from der_lab.bench.truth_gaps import run


def test_upper_bound_dominates_exact_on_small_instances():
    res = run({"hull2d": (6, 7), "maxima2d": (8,)}, seeds=2)
    assert len(res["rows"]) == 4 * 2 * 2 + 4 * 1 * 2
    for r in res["rows"]:
        assert r["upper"] >= r["exact"] - 1e-9, r
        assert r["exact"] >= 0
        if "work_per_point" in r:
            assert r["work_per_point"] >= 1.0  # every point is touched at least once
    assert res["summary"]["hull2d"]["upper_below_exact"] == 0
