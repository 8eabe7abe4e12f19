"""der_lab.bench.geometry_peers: rows, checks and the docs section on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest

from der_lab.bench import geometry_peers as G


def test_points_and_floor():
    g = G.points("grid", 10)
    assert g.shape == (10, 2) and (g == np.round(g)).all()
    for d in G.DISTS:
        assert G.points(d, 100).shape == (100, 2)
    P = np.random.default_rng(0).random((1000, 2))
    assert G.read_floor(P) == P.max()


def test_rows_and_markdown():
    pytest.importorskip("triangle")
    pytest.importorskip("shapely")
    rows: list = []
    G.bench_delaunay([2000], ["uniform", "grid"], 1, 10**4, rows)
    G.bench_hull([2000], ["gaussian"], 1, 10**4, rows)
    assert all(r["same_as_triangle"] for r in rows if r["task"] == "delaunay")
    assert all(r["methods"]["ours"]["exact"] for r in rows)
    res = {"date": "d", "machine": "m", "load_avg_1m_at_start": 0.0, "load_avg_1m_at_end": 0.0, "repeats": 1,
           "rows": rows}
    md = "\n".join(G.peers_markdown(res))
    assert "| 2e+03 | uniform |" in md and "| 2e+03 | gaussian |" in md
    assert "Hull ahead of QHull on every row timed with QHull: met" in md  # the goals section


def test_merge_results_replaces_same_rows():
    def row(task, n, dist, v):
        return {"task": task, "n": n, "dist": dist, "v": v}

    old = {"date": "d0", "repeats": 5, "rows": [row("hull", 10, "uniform", 0), row("delaunay", 10, "grid", 0),
                                               row("delaunay", 10, "uniform", 0)]}
    new = {"date": "d1", "repeats": 3, "rows": [row("delaunay", 10, "uniform", 1), row("delaunay", 5, "circle", 1)]}
    got = G.merge_results(old, new, {"date": "d1", "repeats": 3})
    assert [(r["task"], r["n"], r["dist"], r["v"]) for r in got["rows"]] == [
        ("delaunay", 5, "circle", 1), ("delaunay", 10, "uniform", 1), ("delaunay", 10, "grid", 0),
        ("hull", 10, "uniform", 0)]
    assert [r["date"] for r in got["runs"]] == ["d0", "d1"] and got["repeats"] == 3
    again = G.merge_results(got, {"date": "d2", "repeats": 5, "rows": [row("hull", 10, "uniform", 2)]},
                            {"date": "d2", "repeats": 5})
    assert [r["date"] for r in again["runs"]] == ["d0", "d1", "d2"] and len(again["rows"]) == 4
