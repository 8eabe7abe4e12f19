"""Atomic file writes and the one on-disk state format of ``der``.

Every saved object (EntropyNet weights, regularizer anchors, attention anchors and layouts) is a single
safetensors file whose header metadata is ``{"der_format": kind, "der_version": "1", "meta": <JSON>}``:
tensors and configuration are one file, so they are replaced together or not at all.

Writes go to a temporary file in the target's folder, are flushed with ``fsync`` and moved onto the target
with ``os.replace``; a crash at any point leaves the old file or the new one, never a mix. The temporary
file is removed on every failure the process can see (exceptions, ``KeyboardInterrupt``); temporaries left
by a process that was killed outright are removed by the next write to the same target once their writer
is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT_VERSION", "MissingStateError", "atomic_write", "first_nonfinite", "load_state", "merge_json", "save_state"]

FORMAT_VERSION = "1"


class MissingStateError(FileNotFoundError, ValueError):
    """A state file that does not exist (both a ``ValueError`` and a ``FileNotFoundError``)."""


def _host() -> str:
    return "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:32] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (EPERM) or unknown: keep its file
        return True
    return True


def _sweep_orphans(path: Path) -> None:
    """Remove temporaries of ``path`` whose writer (same host) no longer runs."""
    host = _host()
    for tmp in path.parent.glob(f".{_glob_escape(path.name)}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 :].split(".")
        if len(parts) != 4 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid != os.getpid() and not _alive(pid):
            tmp.unlink(missing_ok=True)


def _glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped (for ``Path.glob``)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _fsync_dir(folder: Path) -> None:
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:  # not POSIX: os.replace is still atomic, the folder entry is flushed by the OS
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_file_mode(path: Path) -> int:
    """Mode for the file that replaces ``path``: its current mode, else what ``open`` would create."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    mask = os.umask(0o022)  # read the umask (there is no getter) and put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, ``fsync`` it, then ``os.replace`` it
    onto ``path``. The temporary file is removed if anything fails, ``KeyboardInterrupt`` included."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_orphans(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_host()}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode(path))  # mkstemp (and some writers) make 0600 files
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def merge_json(path: Path, key: str, value: Any, default: dict | None = None) -> dict:
    """Set ``key`` in the JSON object stored at ``path`` (``default`` if the file is missing), atomically."""
    doc = json.loads(path.read_text()) if path.exists() else dict(default or {})
    doc[key] = value
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
    return doc


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"kind must be a non-empty str, got {kind!r}")
    return kind


def save_state(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *,
               kind: str) -> Path:
    """Write ``tensors`` and the JSON-serializable ``meta`` to the safetensors file ``path``, atomically.

    ``kind`` names what is stored (e.g. ``"der.EntropyNet"``); :func:`load_state` refuses a file of another
    kind. Tensors are copied to CPU and made contiguous; ``meta`` reloads as its JSON image (tuples come
    back as lists). Returns ``Path(path)``.

    >>> import tempfile, torch
    >>> p = save_state(tempfile.mkdtemp() + "/s.safetensors", {"w": torch.ones(2)}, {"lr": 0.1}, kind="demo")
    >>> load_state(p, kind="demo")
    ({'w': tensor([1., 1.])}, {'lr': 0.1})
    """
    from safetensors.torch import save_file

    kind = _check_kind(kind)
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of str -> Tensor, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors must map str -> Tensor, got {key!r} -> {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        span = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and span in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(span)
        out[key] = t
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        meta_json = json.dumps(dict(meta), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta must be JSON-serializable with finite numbers: {e}") from None
    header = {"der_format": kind, "der_version": FORMAT_VERSION, "meta": meta_json}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(out, tmp, metadata=header))
    return path


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Key of the first floating-point tensor holding NaN or Inf, or ``None``."""
    for key, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            return key
    return None


def load_state(path: str | os.PathLike, *, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_state` with the same ``kind``: ``(tensors, meta)`` on CPU.

    Raises ``ValueError`` naming the file if it is missing (:class:`MissingStateError`), not a safetensors
    file or damaged, not a ``der`` state file, of another kind, of an unknown format version, or holds NaN
    or Inf in a floating-point tensor.
    """
    from safetensors import safe_open

    kind = _check_kind(kind)
    path = Path(path)
    if not path.is_file():
        raise MissingStateError(f"no {kind} state file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # SafetensorError, OSError, decoding errors: all mean "not a readable file"
        raise ValueError(f"{path} is not a readable safetensors file (damaged or another format): {e}") from None
    found = header.get("der_format")
    if found is None:
        raise ValueError(f"{path} is not a der state file (no 'der_format' in its metadata); expected {kind!r}")
    if found != kind:
        raise ValueError(f"{path} holds {found!r} state, expected {kind!r}")
    version = header.get("der_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has der_version {version!r}; this der reads version {FORMAT_VERSION!r}")
    try:
        meta = json.loads(header.get("meta", "{}"), parse_constant=_no_constant)
    except ValueError as e:
        raise ValueError(f"{path} has damaged metadata: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} has damaged metadata: expected a JSON object, got {type(meta).__name__}")
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise ValueError(f"{path}: tensor {bad!r} contains NaN or Inf")
    return tensors, meta


def _no_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} in metadata")

