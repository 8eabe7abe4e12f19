"""Loader for Google QuickDraw drawings in the public ndjson format (paper §5.1, App. G.12).

One JSON object per line, as in ``quickdraw-dataset`` (``simplified/<word>.ndjson`` or the raw files)::

    {"word": "cat", "countrycode": "US", "timestamp": "...", "recognized": true, "key_id": "...",
     "drawing": [[[x0, x1, ...], [y0, y1, ...]], ...]}        # raw files add a third list: times

Each drawing becomes an ``(m, 2)`` float64 array of all stroke points (x, y as stored: y grows
downwards). With the App. G.12 preprocessing (default) each drawing is normalised into ``[0, 1]^2``
(aspect kept) and exact duplicate points are removed. ``.ndjson.gz`` files are read transparently.
Nothing is downloaded: point ``path`` at a file you already have.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from der.geometry.data import dedup, normalize_unit_square

__all__ = ["drawing_points", "iter_ndjson", "load_quickdraw", "write_ndjson"]


def _open(path: str | Path, mode: str):
    p = Path(path)
    return gzip.open(p, mode + "t", encoding="utf-8") if p.suffix == ".gz" else open(p, mode, encoding="utf-8")


def iter_ndjson(path: str | Path, word: str | None = None, recognized: bool | None = None) -> Iterator[dict]:
    """Yield the records of a QuickDraw ndjson file, optionally only one ``word`` / recognized flag."""
    with _open(path, "r") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: expected one JSON object per line ({exc.msg})") from None
            if not isinstance(rec, dict) or "drawing" not in rec:
                raise ValueError(f"{path}:{lineno}: expected an object with a 'drawing' key")
            if word is not None and rec.get("word") != word:
                continue
            if recognized is not None and bool(rec.get("recognized")) != recognized:
                continue
            yield rec


def drawing_points(drawing) -> np.ndarray:
    """Concatenate the strokes ``[[xs], [ys](, [ts])]`` of one drawing into an (m, 2) float64 array."""
    parts = []
    for k, stroke in enumerate(drawing):
        if not isinstance(stroke, (list, tuple)) or len(stroke) < 2 or len(stroke[0]) != len(stroke[1]):
            raise ValueError(f"stroke {k}: expected [[x...], [y...]] (optionally [t...]) of equal length")
        parts.append(np.column_stack([np.asarray(stroke[0], float), np.asarray(stroke[1], float)]))
    return np.concatenate(parts) if parts else np.zeros((0, 2))


def load_quickdraw(
    path: str | Path,
    limit: int | None = None,
    word: str | None = None,
    recognized: bool | None = None,
    preprocess: bool = True,
) -> list[np.ndarray]:
    """Load up to ``limit`` drawings as point arrays; ``preprocess`` applies App. G.12 (normalise to
    ``[0, 1]^2`` keeping the aspect ratio, then remove duplicate points)."""
    out: list[np.ndarray] = []
    for rec in iter_ndjson(path, word=word, recognized=recognized):
        if limit is not None and len(out) >= limit:
            break
        pts = drawing_points(rec["drawing"])
        if preprocess and len(pts):
            pts = dedup(normalize_unit_square(pts, keep_aspect=True))
        out.append(pts)
    return out


def write_ndjson(path: str | Path, drawings: Iterable, word: str = "unknown", raw: bool = False) -> Path:
    """Write drawings (each a list of (k, 2) stroke arrays) in the QuickDraw ndjson format.

    ``raw=True`` adds the per-point time list of the raw files. Used to make test fixtures.
    """
    p = Path(path)
    with _open(p, "w") as fh:
        for i, strokes in enumerate(drawings):
            enc = []
            for s in strokes:
                s = np.asarray(s)
                st = [s[:, 0].round().astype(int).tolist(), s[:, 1].round().astype(int).tolist()]
                if raw:
                    st.append(list(range(len(s))))
                enc.append(st)
            rec = {"word": word, "countrycode": "XX", "timestamp": "2017-01-01 00:00:00.00000 UTC",
                   "recognized": i % 2 == 0, "key_id": str(i), "drawing": enc}
            fh.write(json.dumps(rec) + "\n")
    return p
