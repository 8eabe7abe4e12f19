"""der._io: one atomic state format (save_state / load_state), bad files, kills mid-save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from der._io import MissingStateError, atomic_write, load_state, save_state

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _tmps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def test_roundtrip_exact_and_meta(tmp_path: Path) -> None:
    t = {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.arange(5), "e": torch.empty(0, 2)}
    p = save_state(tmp_path / "s.safetensors", t, {"k": [1, 2], "x": 0.1, "n": None}, kind="der.Test")
    assert p == tmp_path / "s.safetensors" and _tmps(tmp_path) == []
    back, meta = load_state(p, kind="der.Test")
    assert meta == {"k": [1, 2], "x": 0.1, "n": None}
    assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) and back[k].dtype == t[k].dtype for k in t)


def test_new_file_mode_follows_umask_and_existing_file(tmp_path: Path) -> None:
    p = save_state(tmp_path / "s", {}, {}, kind="k")
    mask = os.umask(0o022)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask
    p.chmod(0o640)
    save_state(p, {}, {"v": 2}, kind="k")
    assert p.stat().st_mode & 0o777 == 0o640


def test_shared_and_noncontiguous_tensors(tmp_path: Path) -> None:
    base = torch.randn(4, 6)
    t = {"w": base, "tied": base, "view": base.t(), "slice": base[1:3]}
    back, _ = load_state(save_state(tmp_path / "s", t, {}, kind="k"), kind="k")
    for k, v in t.items():
        assert torch.equal(back[k], v), k


def _write_raw(path: Path, tensors: dict, metadata: dict | None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    good = save_state(tmp_path / "good.safetensors", {"w": torch.ones(64)}, {"a": 1}, kind="der.A")
    raw = good.read_bytes()
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (tmp_path / "nope.safetensors", "no der.A state file")
    (tmp_path / "garbage").write_bytes(b"not a safetensors file at all")
    cases["garbage"] = (tmp_path / "garbage", "not a readable safetensors")
    (tmp_path / "trunc").write_bytes(raw[:-7])
    cases["truncated"] = (tmp_path / "trunc", "not a readable safetensors")
    (tmp_path / "empty").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty", "not a readable safetensors")
    cases["foreign"] = (_write_raw(tmp_path / "foreign", {"w": torch.ones(2)}, None), "not a der state file")
    cases["kind"] = (good, "holds 'der.A' state, expected 'der.B'")
    meta = {"der_format": "der.B", "der_version": "2", "meta": "{}"}
    cases["version"] = (_write_raw(tmp_path / "v2", {"w": torch.ones(2)}, meta), "der_version '2'")
    meta = {"der_format": "der.B", "der_version": "1", "meta": "{oops"}
    cases["meta"] = (_write_raw(tmp_path / "meta", {"w": torch.ones(2)}, meta), "damaged metadata")
    meta = {"der_format": "der.B", "der_version": "1", "meta": "[1]"}
    cases["meta_list"] = (_write_raw(tmp_path / "meta_list", {"w": torch.ones(2)}, meta), "damaged metadata")
    for name, val in (("nan", float("nan")), ("inf", float("inf"))):
        meta = {"der_format": "der.B", "der_version": "1", "meta": "{}"}
        bad = torch.ones(3, dtype=torch.float16)
        bad[1] = val
        cases[name] = (_write_raw(tmp_path / name, {"ok": torch.ones(1), "anchors": bad}, meta), "'anchors'")
    for name, (path, msg) in cases.items():
        with pytest.raises(ValueError, match=msg) as info:
            load_state(path, kind="der.B" if name != "missing" else "der.A")
        assert str(path) in str(info.value), name
    with pytest.raises(FileNotFoundError):  # a missing file is also a FileNotFoundError
        load_state(tmp_path / "nope", kind="x")
    assert issubclass(MissingStateError, ValueError)


def test_save_rejects_bad_arguments(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with pytest.raises(TypeError, match="str -> Tensor"):
        save_state(p, {"w": [1.0]}, {}, kind="k")  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="JSON"):
        save_state(p, {}, {"x": object()}, kind="k")
    with pytest.raises(TypeError, match="finite"):
        save_state(p, {}, {"x": float("nan")}, kind="k")
    with pytest.raises(TypeError, match="kind"):
        save_state(p, {}, {}, kind="")
    assert not p.exists() and _tmps(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_old_file_and_no_temp(tmp_path: Path, exc: BaseException) -> None:
    p = save_state(tmp_path / "s", {"w": torch.zeros(3)}, {"v": 0}, kind="k")

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(p, write)
    assert _tmps(tmp_path) == []
    assert load_state(p, kind="k")[1] == {"v": 0}


_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from der._io import atomic_write, save_state
    path, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "block":  # stop in the middle of writing the temporary file
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(b"half a file")
                f.flush()
                print("mid", flush=True)
                time.sleep(60)
        atomic_write(path, write)
    else:  # save new versions as fast as possible until killed
        v = 1
        while True:
            save_state(path, {"w": torch.full((1 << 20,), float(v)), "b": torch.full((7,), float(v))},
                       {"v": v}, kind="der.Kill")
            print(v, flush=True)
            v += 1
    """
)


def _child(path: Path, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(path), mode], stdout=subprocess.PIPE, env=env, text=True)


def _consistent(path: Path) -> int:
    tensors, meta = load_state(path, kind="der.Kill")
    v = meta["v"]
    assert torch.all(tensors["w"] == v) and torch.all(tensors["b"] == v), "tensors from two different saves"
    return v


def test_sigkill_mid_write_keeps_old_file(tmp_path: Path) -> None:
    path = save_state(tmp_path / "s.safetensors", {"w": torch.zeros(4), "b": torch.zeros(7)}, {"v": 0}, kind="der.Kill")
    old = path.read_bytes()
    proc = _child(path, "block")
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "mid"
        assert len(_tmps(tmp_path)) == 1  # the half-written temporary exists ...
        assert path.read_bytes() == old  # ... and the target is untouched
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert path.read_bytes() == old and _consistent(path) == 0
    save_state(path, {"w": torch.ones(4), "b": torch.ones(7)}, {"v": 1}, kind="der.Kill")
    assert _tmps(tmp_path) == []  # the next write removed the killed writer's temporary
    assert _consistent(path) == 1


def test_sigkill_at_random_points_never_mixes(tmp_path: Path) -> None:
    path = save_state(tmp_path / "s.safetensors", {"w": torch.zeros(1), "b": torch.zeros(7)}, {"v": 0},
                      kind="der.Kill")
    for i in range(3):
        proc = _child(path, "loop")
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one save done: the child is in its save loop
        time.sleep(0.005 + 0.02 * i)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _consistent(path) >= 1
    assert len(_tmps(tmp_path)) <= 1  # at most the temporary of the last killed writer


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
_dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int32,
           torch.int64, torch.bool]


@st.composite
def _tensor(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(_dtypes))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 10 ** draw(st.integers(-3, 3))
    return x.to(dtype) if dtype.is_floating_point else (x * 50).clamp(-100, 100).to(dtype)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=st.dictionaries(st.text(min_size=1, max_size=10), _tensor(), max_size=4),
       meta=st.dictionaries(st.text(max_size=8), _json, max_size=4), kind=st.text(min_size=1, max_size=12))
def test_roundtrip_property(tmp_path: Path, tensors: dict, meta: dict, kind: str) -> None:
    back, meta2 = load_state(save_state(tmp_path / "p.safetensors", tensors, meta, kind=kind), kind=kind)
    assert meta2 == json.loads(json.dumps(meta))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
