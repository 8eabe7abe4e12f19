"""The one harness of the experiments, benchmarks and the demo.

* :func:`results_dir` / :func:`result_path` / :func:`docs_dir` — where output goes: ``--out`` or
  ``$DER_RESULTS`` if given, else ``<repo>/benchmarks/results`` inside a source checkout of ``der``
  (:func:`repo_root` walks up from the working directory), else ``./der_results``.
* :func:`parse_config` — a config dataclass from ``--quick`` + one ``--field value`` flag per field.
* :class:`Run` — the metadata of one run (machine, threads, load average at start and end, wall time);
  ``Run().write(path, payload)`` writes the payload with it through :func:`write_json` (atomic, via
  :func:`der._io.atomic_write`).
* :func:`time_calls` — the timer: warm-up, then rounds in which every callable runs once (interleaved, so
  load drift hits all alike), a fixed number of rounds or until a time budget is spent; wall and
  process-CPU seconds. :func:`time_call` and :func:`median_time` are its one-callable forms.
* :func:`bootstrap_median_ci` — percentile bootstrap interval of a median.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from der._io import atomic_write

__all__ = [
    "repo_root",
    "results_dir",
    "docs_dir",
    "result_path",
    "parse_config",
    "load_average",
    "machine_info",
    "Run",
    "write_json",
    "Timing",
    "time_calls",
    "time_call",
    "median_time",
    "bootstrap_median_ci",
]

C = TypeVar("C")

# ----------------------------------------------------------------------------- where results go
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
    here = (Path.cwd() if start is None else Path(start)).resolve()
    for d in (here, *here.parents):
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


# ----------------------------------------------------------------------------- configs on the command line
def _parse_value(tp: Any, text: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple or tp is tuple:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [str]
        return tuple(_parse_value(args[0], t) for t in text.split(",") if t)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() == "none":
            return None
        return _parse_value(args[0], text)
    if tp is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    return tp(text)


def parse_config(cls: type[C], argv: list[str] | None, prog: str, description: str = "") -> tuple[C, argparse.Namespace]:
    """Build the dataclass ``cls`` from ``--quick`` (its ``quick()`` defaults) + ``--field value`` flags
    (comma lists for tuples), plus ``--out``, ``--run-dir``, ``--threads``; bad values exit with status 2.
    ``ns.run`` is the :class:`Run` started here."""
    import torch

    hints = typing.get_type_hints(cls)
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--quick", action="store_true", help="the minutes-scale configuration (what tests run)")
    p.add_argument("--out", type=Path, default=None, help="result JSON path (default <results>/exp_<name>[_quick].json)")
    p.add_argument("--run-dir", type=Path, default=None, help="checkpoints/logs folder (default runs/<name>[_quick])")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2 with --quick, else torch's)")
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=str(getattr(tp, "__name__", tp)),
                       type=lambda s, tp=tp: _parse_value(tp, s), help=f"(default {f.default!r})"
                       if f.default is not dataclasses.MISSING else None)
    ns = p.parse_args(argv)
    threads = ns.threads if ns.threads is not None else (2 if ns.quick else None)
    if threads is not None:
        if threads < 1:
            p.error(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    ns.run = Run()
    base = cls.quick() if ns.quick else cls()  # type: ignore[attr-defined]
    overrides = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if getattr(ns, f.name) is not None}
    try:
        cfg = dataclasses.replace(base, **overrides)
    except ValueError as e:
        p.error(f"invalid config: {e}")
    return cfg, ns


# ----------------------------------------------------------------------------- metadata and JSON
def load_average() -> list[float] | None:
    """1/5/15-minute load averages (``None`` where the OS has none)."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, torch threads and version, accelerator."""
    info: dict[str, Any] = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    if "torch" in sys.modules:  # never import torch only to describe the machine
        torch = sys.modules["torch"]
        info.update(torch=torch.__version__, threads=torch.get_num_threads(),
                    device="cuda" if torch.cuda.is_available() else "cpu")
    return info


class Run:
    """One run's metadata: created when the run starts, added to the result by :meth:`write`."""

    def __init__(self) -> None:
        self.loadavg_start = load_average()
        self.started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        self._t0 = time.perf_counter()

    def meta(self) -> dict[str, Any]:
        """Machine info, start time (UTC), the command line, load averages at start and now, seconds so far."""
        return {**machine_info(), "started_utc": self.started, "argv": sys.argv[1:],
                "loadavg_start": self.loadavg_start, "loadavg_end": load_average(),
                "wall_total_s": time.perf_counter() - self._t0}

    def write(self, path: str | Path, payload: Mapping[str, Any]) -> Path:
        """``payload`` with ``meta`` (its own ``meta`` entries kept, ours added) written atomically to ``path``."""
        return write_json(path, {**payload, "meta": {**self.meta(), **dict(payload.get("meta", {}))}})


def _plain(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy / torch arrays and scalars
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return repr(obj)


def write_json(path: str | Path, obj: Any, indent: int = 1) -> Path:
    """``obj`` as JSON at ``path``, atomically (never a half-written file); arrays become lists."""
    path = Path(path)
    text = json.dumps(obj, indent=indent, default=_plain) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


# ----------------------------------------------------------------------------- timing
@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of the timed calls of one callable (``wall_s``: ``perf_counter``, ``cpu_s``: process CPU),
    of its warm-up calls (``warmup_s``, the first one includes compilation / cache loads), and its last output."""

    wall_s: tuple[float, ...]
    cpu_s: tuple[float, ...]
    warmup_s: tuple[float, ...] = ()
    result: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def repeats(self) -> int:
        return len(self.wall_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall_s) if self.wall_s else math.nan

    @property
    def cpu_median_s(self) -> float:
        return statistics.median(self.cpu_s) if self.cpu_s else math.nan

    @property
    def min_s(self) -> float:
        return min(self.wall_s) if self.wall_s else math.nan

    def summary(self) -> dict[str, float]:
        """``median_s``, ``min_s``, ``cpu_median_s`` and ``repeats``, for result JSON."""
        return {"median_s": self.median_s, "min_s": self.min_s, "cpu_median_s": self.cpu_median_s,
                "repeats": self.repeats}


def time_calls(fns: Mapping[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1,
               budget_s: float | None = None, max_repeats: int | None = None, alternate: bool = False,
               sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time the callables of ``fns`` in one process: ``warmup`` untimed rounds (their times are kept in
    ``warmup_s``), then at least ``repeats`` timed rounds; with ``budget_s``, more rounds until that many
    seconds have passed since the first timed one (at most ``max_repeats``). Each round calls every callable
    once, in order (reversed on odd rounds with ``alternate``), so that load drift hits all alike. ``sync``
    (e.g. ``torch.cuda.synchronize``) runs before and after each call."""
    if not fns:
        raise ValueError("fns must name at least one callable, got none")
    if repeats < 0 or warmup < 0 or repeats + warmup == 0:
        raise ValueError(f"repeats and warmup must be >= 0 and not both 0, got repeats={repeats}, warmup={warmup}")
    if budget_s is not None and budget_s < 0:
        raise ValueError(f"budget_s must be >= 0, got {budget_s}")
    limit = repeats if budget_s is None else max(repeats, max_repeats if max_repeats is not None else 10**6)
    sync = sync or (lambda: None)
    names = list(fns)
    warm: dict[str, list[float]] = {k: [] for k in names}
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    last: dict[str, Any] = dict.fromkeys(names)

    def call(name: str) -> tuple[float, float]:
        sync()
        c0, w0 = time.process_time(), time.perf_counter()
        last[name] = fns[name]()
        sync()
        return time.perf_counter() - w0, time.process_time() - c0

    for _ in range(warmup):
        for k in names:
            warm[k].append(call(k)[0])
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (rounds < limit and time.perf_counter() - start < (budget_s or 0.0)):
        for k in (reversed(names) if alternate and rounds % 2 else names):
            w, c = call(k)
            wall[k].append(w)
            cpu[k].append(c)
        rounds += 1
    return {k: Timing(tuple(wall[k]), tuple(cpu[k]), tuple(warm[k]), last[k]) for k in names}


def time_call(fn: Callable[[], Any], **kw: Any) -> Timing:
    """:func:`time_calls` of one callable (same keywords)."""
    return time_calls({"fn": fn}, **kw)["fn"]


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> tuple[float, Any]:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls, and its last output."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    t = time_call(fn, repeats=repeats, warmup=warmup)
    return t.median_s, t.result


# ----------------------------------------------------------------------------- statistics
def bootstrap_median_ci(values: Sequence[float], level: float = 0.95, resamples: int = 4000, seed: int = 0
                        ) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values`` (e.g. per-pair step-time ratios)."""
    import torch

    if len(values) == 0:
        raise ValueError("values must not be empty")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = torch.tensor(list(values), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    meds = x[torch.randint(len(x), (resamples, len(x)), generator=g)].quantile(0.5, dim=-1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(meds, q).tolist()
    return lo, hi
