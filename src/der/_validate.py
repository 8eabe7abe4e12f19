"""Input checks shared by ``functional``, the regularizer, ``geometry`` and ``truth`` (one set of checks).

Every check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (wrong shape, dtype, values)
with a message naming the argument, what was expected and what came.

Tensors (``der.functional`` and friends): floating point only; float16/bfloat16 are widened to float32 for
computation; NaN/Inf are found with one reduction per tensor.

Arrays (``geometry``, ``truth``): :func:`as_points` returns a C-contiguous float64 ``(n, d)`` array.
Integer coordinates are converted to float64, which is exact up to ``2**53`` in magnitude; larger
integers are rounded to the nearest float64 (the geometry predicates are exact on the float64 values).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "as_points",
    "broadcast_batch",
    "check_finite",
    "check_params",
    "check_points",
    "check_positive",
    "common_dtype",
    "finite_absmax",
    "float_tensor",
]

_HALF = (torch.float16, torch.bfloat16)
_EXACT_INT = 2**53  # the largest magnitude below which every integer is a float64


# --------------------------------------------------------------------------- tensors
def float_tensor(t: object, name: str) -> torch.Tensor:
    """``t`` as a floating-point tensor (float16/bfloat16 widened to float32)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t.float() if t.dtype in _HALF else t


def finite_absmax(t: torch.Tensor, name: str) -> float:
    """``max |t|`` (0 for an empty tensor); ``ValueError`` counting the rows that hold NaN or Inf."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t.detach())
    big = max(-float(lo), float(hi))
    if math.isfinite(big):
        return big
    bad = ~torch.isfinite(t.detach())
    rows = int(bad.reshape(-1, t.shape[-1]).any(dim=-1).sum()) if t.dim() >= 1 else 1
    raise ValueError(f"{name} contains NaN/Inf in {rows} row(s) of shape {tuple(t.shape)}")


def check_finite(t: torch.Tensor, name: str) -> None:
    """``ValueError`` if ``t`` holds NaN or Inf."""
    finite_absmax(t, name)


def check_points(x: object, name: str = "x") -> torch.Tensor:
    """Points ``(..., N, d)`` with ``N, d ≥ 1``, finite; returned as :func:`float_tensor`."""
    x = float_tensor(x, name)
    if x.dim() < 2:
        raise ValueError(f"{name} must be (..., N, d), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)} (need N ≥ 1 points of dimension d ≥ 1)")
    check_finite(x, name)
    return x


def check_params(p: object, name: str, d: int) -> torch.Tensor:
    """Range parameters ``(..., k, d)`` with ``k ≥ 1``, finite, of the points' dimension ``d``."""
    p = float_tensor(p, name)
    if p.dim() < 2 or p.shape[-2] == 0:
        raise ValueError(f"{name} must be (..., k, d) with k ≥ 1, got shape {tuple(p.shape)}")
    if p.shape[-1] != d:
        raise ValueError(f"{name} has dimension {p.shape[-1]} but points have dimension {d}")
    check_finite(p, name)
    return p


def check_positive(value: object, name: str) -> float:
    """A finite real number ``> 0`` (``bool`` is refused)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The promoted floating dtype of ``tensors`` (``torch.promote_types``), half widened to float32; all
    tensors must be on one device."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"tensors on different devices: {sorted(map(str, devices))}")
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in _HALF else dtype


def broadcast_batch(**shapes: Sequence[int]) -> torch.Size:
    """Broadcast the leading batch shapes given by keyword (``x=x.shape[:-2], anchors=...``)."""
    try:
        return torch.broadcast_shapes(*shapes.values())
    except RuntimeError:
        got = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
        raise ValueError(f"batch dimensions do not broadcast: {got}") from None


# --------------------------------------------------------------------------- arrays
def as_points(points: object, d: int | Sequence[int] | None = 2, name: str = "points", *, min_rows: int = 0,
              check_finite: bool = True) -> np.ndarray:
    """``points`` as a C-contiguous float64 ``(n, d)`` array (no copy when it already is one).

    ``d`` is the required column count, a tuple of allowed counts, or ``None`` for any. ``ValueError`` for a
    wrong shape, fewer than ``min_rows`` rows, a non-numeric dtype, or NaN/Inf (unless
    ``check_finite=False``, for callers that fuse that check into their own pass).
    """
    try:
        arr = np.asarray(points)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a real numeric array, got {type(points).__name__}: {e}") from None
    dims = None if d is None else ((d,) if isinstance(d, int) else tuple(d))
    want = "(n, d)" if dims is None else " or ".join(f"(n, {k})" for k in dims)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a real numeric {want} array, got dtype {arr.dtype}")
    if arr.ndim != 2 or (dims is not None and arr.shape[1] not in dims):
        raise ValueError(f"{name} must be {want}, got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        least = "one point" if min_rows == 1 else f"{min_rows} points"
        raise ValueError(f"{name} must contain at least {least}, got shape {arr.shape}")
    if arr.dtype.kind in "iu" and arr.size:
        big = max(abs(int(arr.max())), abs(int(arr.min())))
        if big > _EXACT_INT:
            warnings.warn(f"{name}: integer coordinates up to {big} exceed 2**53 and are rounded to float64; "
                          "results are exact for the rounded points, not the given integers", stacklevel=3)
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if check_finite and arr.size and not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr).all(axis=1)))
        raise ValueError(f"{name} must be finite, got {bad} row(s) with NaN or Inf")
    return arr
