"""The one harness of the experiments, benchmarks and the demo.

* :func:`results_dir` / :func:`result_path` — where result JSON goes (``--out`` or ``DER_RESULTS`` if given,
  else ``<repo>/benchmarks/results`` inside a source checkout of ``der``, else ``./der_results``);
  :func:`repo_root` finds that checkout by walking up from the working directory.
* :func:`write_json` — atomic JSON (through :func:`der._io.atomic_write`) with :func:`run_metadata`
  (machine, threads, load averages at start and end).
* :func:`time_interleaved` — the timer: warm-up, repeats (or a time budget), several callables interleaved
  round by round so that load drift hits all alike; wall and process-CPU seconds, medians.
  :func:`median_time` is its one-callable form.
* :func:`bootstrap_median_ci` — percentile bootstrap interval of a median.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["repo_root", "results_dir", "docs_dir", "result_path", "median_time"]

_PROJECT_NAME = re.compile(r'^\[project\]\s*$(?:(?!^\[).)*?^name\s*=\s*["\']([^"\']+)["\']', re.M | re.S)


def _project_name(pyproject: Path) -> str | None:
    try:
        m = _PROJECT_NAME.search(pyproject.read_text())
    except OSError:
        return None
    return m.group(1) if m else None


def repo_root(start: str | Path | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working directory) holding a
    ``pyproject.toml`` whose ``[project]`` name is ``der``; ``None`` outside a source checkout."""
    here = Path.cwd() if start is None else Path(start)
    for d in (here.resolve(), *here.resolve().parents):
        p = d / "pyproject.toml"
        if p.is_file() and _project_name(p) == "der":
            return d
    return None


def results_dir(out: str | Path | None = None) -> Path:
    """Folder for result files: ``out`` if given, else ``$DER_RESULTS`` if set, else
    ``<repo>/benchmarks/results`` in a source checkout (see :func:`repo_root`), else ``./der_results``."""
    if out is not None:
        return Path(out)
    env = os.environ.get("DER_RESULTS")
    if env:
        return Path(env)
    root = repo_root()
    return root / "benchmarks" / "results" if root is not None else Path("der_results")


def docs_dir() -> Path:
    """Folder for generated docs: ``<repo>/docs`` in a source checkout when no results folder is forced
    through ``DER_RESULTS``, else ``results_dir() / "docs"`` (never a checkout's docs from a test run)."""
    root = None if os.environ.get("DER_RESULTS") else repo_root()
    return root / "docs" if root is not None else results_dir() / "docs"


def result_path(name: str, out: str | Path | None = None) -> Path:
    """``out`` (a file path given on the command line) if given, else ``results_dir() / name``."""
    return Path(out) if out is not None else results_dir() / name


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> tuple[float, Any]:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls, and the last result."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out
