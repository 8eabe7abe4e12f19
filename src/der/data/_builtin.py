"""Built-in offline text sample shipped with the library (package data ``der/data/calibration.txt``).

The file holds 64 short English passages written for this project (one per line, varied domains and
lengths: three quarters are longer than 64 word-piece tokens, a few are longer than 256). It is the
calibration sample a model-conversion command can use when the user gives no text of their own.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["calibration_text"]

_FILE = "calibration.txt"


def calibration_text() -> list[str]:
    """The built-in calibration passages, in file order (a fresh list on every call).

    >>> texts = calibration_text()
    >>> len(texts), all(isinstance(t, str) and t for t in texts)
    (64, True)
    """
    raw = resources.files("der.data").joinpath(_FILE).read_text(encoding="utf-8")
    return [line for line in (s.strip() for s in raw.splitlines()) if line]
