"""Atomic file writes shared by checkpoints, regularizer files and result JSON (never a half-written file)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then ``os.replace`` it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def merge_json(path: Path, key: str, value: Any, default: dict | None = None) -> dict:
    """Set ``key`` in the JSON object stored at ``path`` (``default`` if the file is missing), atomically."""
    doc = json.loads(path.read_text()) if path.exists() else dict(default or {})
    doc[key] = value
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
    return doc
