"""der_lab.harness: results-folder resolution, atomic JSON with run metadata, the timer, the bootstrap CI."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from der_lab import harness as H


def _pyproject(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(f'[build-system]\nrequires = []\n\n[project]\nname = "{name}"\n')
    return folder


# ----------------------------------------------------------------------------- results folder
def test_results_dir_in_a_checkout_walks_up_from_cwd(tmp_path, monkeypatch):
    root = _pyproject(tmp_path / "repo", "der")
    deep = root / "src" / "x" / "y"
    deep.mkdir(parents=True)
    monkeypatch.delenv("DER_RESULTS", raising=False)
    monkeypatch.chdir(deep)
    assert H.repo_root() == root.resolve()
    assert H.results_dir() == root.resolve() / "benchmarks" / "results"
    assert H.docs_dir() == root.resolve() / "docs"
    assert H.result_path("a.json") == root.resolve() / "benchmarks" / "results" / "a.json"


def test_results_dir_outside_a_checkout(tmp_path, monkeypatch):
    _pyproject(tmp_path / "other", "not-der")  # another project's pyproject does not count
    monkeypatch.delenv("DER_RESULTS", raising=False)
    monkeypatch.chdir(tmp_path / "other")
    assert H.repo_root() is None  # pytest's tmp_path is never inside a der checkout
    assert H.results_dir() == Path("der_results")
    assert H.docs_dir() == Path("der_results") / "docs"


def test_env_and_out_override(tmp_path, monkeypatch):
    root = _pyproject(tmp_path / "repo", "der")
    monkeypatch.chdir(root)
    monkeypatch.setenv("DER_RESULTS", str(tmp_path / "env"))
    assert H.results_dir() == tmp_path / "env"
    assert H.docs_dir() == tmp_path / "env" / "docs"  # a forced results folder never writes a checkout's docs
    assert H.results_dir(tmp_path / "cli") == tmp_path / "cli"  # --out wins over the environment
    assert H.result_path("a.json", tmp_path / "b.json") == tmp_path / "b.json"
    assert H.result_path("a.json") == tmp_path / "env" / "a.json"


def test_project_name_is_read_from_the_project_table_only(tmp_path):
    p = tmp_path / "pyproject.toml"
    p.write_text('[tool.x]\nname = "der"\n\n[project]\nversion = "1"\nname = "dera"\n')
    assert H._project_name(p) == "dera"
    p.write_text('[tool.x]\nname = "der"\n')
    assert H._project_name(p) is None
    p.write_text("[project]\nversion = '1'\nname = 'der'\n[tool.setuptools]\nname = 'zzz'\n")
    assert H._project_name(p) == "der"


def test_this_repository_is_found(monkeypatch):
    here = Path(__file__).resolve()
    monkeypatch.chdir(here.parent)
    root = H.repo_root()
    assert root is not None and (root / "src" / "der_lab" / "harness.py").is_file()


# ----------------------------------------------------------------------------- JSON and metadata
def test_write_json_is_atomic_and_plain(tmp_path):
    @dataclasses.dataclass
    class Cfg:
        a: int = 1

    path = tmp_path / "sub" / "r.json"
    obj = {"x": np.float32(1.5), "t": torch.tensor([1, 2]), "p": Path("a/b"), "c": Cfg(), "nan": math.nan}
    assert H.write_json(path, obj) == path
    back = json.loads(path.read_text())
    assert back["x"] == 1.5 and back["t"] == [1, 2] and back["p"] == "a/b" and back["c"] == {"a": 1}
    assert math.isnan(back["nan"])
    assert [f.name for f in path.parent.iterdir()] == ["r.json"]  # no temporary file left behind


def test_write_json_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    H.write_json(path, {"ok": 1})

    class Bad:
        def __repr__(self):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError, match="cannot serialise"):
        H.write_json(path, {"bad": Bad()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]


def test_run_metadata(tmp_path):
    run = H.Run()
    path = run.write(tmp_path / "r.json", {"rows": [1], "meta": {"device": "cpu:7", "mine": 1}})
    meta = json.loads(path.read_text())["meta"]
    assert meta["device"] == "cpu:7" and meta["mine"] == 1  # the payload's own meta entries win
    for key in ("machine", "cpu_count", "threads", "torch", "loadavg_start", "loadavg_end", "started_utc",
                "wall_total_s", "argv"):
        assert key in meta, key
    assert meta["wall_total_s"] >= 0 and meta["torch"] == torch.__version__
    assert meta["loadavg_start"] is None or len(meta["loadavg_start"]) == 3


# ----------------------------------------------------------------------------- timer
def test_timer_counts_warmup_repeats_and_interleaves():
    calls: list[str] = []
    t = H.time_calls({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2},
                     repeats=3, warmup=2)
    assert calls == ["a", "b"] * 5
    assert t["a"].repeats == t["b"].repeats == 3 and len(t["a"].warmup_s) == 2
    assert t["a"].result == 1 and t["b"].result == 2
    calls.clear()
    H.time_calls({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=0,
                 alternate=True)
    assert calls == ["a", "b", "b", "a", "a", "b"]


def test_timer_medians_match_the_measured_times():
    t = H.time_call(lambda: time.sleep(0.002), repeats=5, warmup=1)
    assert t.median_s == statistics.median(t.wall_s) and t.min_s == min(t.wall_s)
    assert t.median_s >= 0.002 * 0.9  # sleep never returns early (beyond clock granularity)
    assert 0 <= t.cpu_median_s < t.median_s  # sleeping uses no CPU
    s = t.summary()
    assert s["repeats"] == 5 and s["median_s"] == t.median_s
    sec, out = H.median_time(lambda: 7, repeats=3)
    assert out == 7 and sec >= 0


def test_timer_budget_and_cap():
    t = H.time_call(lambda: time.sleep(0.001), repeats=2, warmup=0, budget_s=0.03, max_repeats=6)
    assert 2 <= t.repeats <= 6
    t = H.time_call(lambda: None, repeats=2, warmup=0, budget_s=0.05, max_repeats=4)
    assert t.repeats == 4  # a fast call hits the cap before the budget
    t = H.time_call(lambda: None, repeats=3, warmup=0, budget_s=0.0)
    assert t.repeats == 3  # the budget never cuts the minimum


def test_timer_sync_and_warmup_only():
    synced: list[int] = []
    t = H.time_call(lambda: None, repeats=0, warmup=2, sync=lambda: synced.append(1))
    assert t.repeats == 0 and len(t.warmup_s) == 2 and len(synced) == 4  # before and after each call
    assert math.isnan(t.median_s)


@pytest.mark.parametrize("kw", [dict(repeats=-1), dict(repeats=0, warmup=0), dict(warmup=-1), dict(budget_s=-1.0)])
def test_timer_rejects_bad_arguments(kw):
    with pytest.raises(ValueError, match="must be"):
        H.time_call(lambda: None, **kw)


def test_timer_needs_a_callable():
    with pytest.raises(ValueError, match="at least one callable"):
        H.time_calls({})
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        H.median_time(lambda: None, repeats=0)


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_covers_a_known_median():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(40):
        x = rng.normal(1.0, 0.2, size=60).tolist()  # true median 1.0
        lo, hi = H.bootstrap_median_ci(x, resamples=1000, seed=int(rng.integers(1 << 30)))
        assert lo <= statistics.median(x) <= hi
        hits += lo <= 1.0 <= hi
    assert hits >= 32  # nominal 95%: at least 80% coverage over 40 draws


def test_bootstrap_ci_is_deterministic_and_checks_input():
    x = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert H.bootstrap_median_ci(x, seed=3) == H.bootstrap_median_ci(x, seed=3)
    assert H.bootstrap_median_ci([2.0] * 5) == (2.0, 2.0)
    with pytest.raises(ValueError, match="must not be empty"):
        H.bootstrap_median_ci([])
    with pytest.raises(ValueError, match="level"):
        H.bootstrap_median_ci(x, level=1.5)
