"""Integer superaccumulator helpers shared by the exact orientation and incircle fallbacks.

A superaccumulator holds an exact sum of products of doubles as signed 30-bit limbs (``int64``
entries, carries not yet propagated); :func:`mant` splits a double into its integer mantissa and
binary exponent, :func:`limbs_sign` propagates the carries and returns the sign of the sum.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["MASK30", "limbs_sign", "mant"]

MASK30 = (1 << 30) - 1


@njit(cache=True, inline="always")
def mant(v: float):
    """``|v| = m * 2^e`` with integer ``m < 2^53``; ``(m, e)``, ``e >= -1126``."""
    f, e = math.frexp(abs(v))
    return np.int64(f * 9007199254740992.0), e - 53


@njit(cache=True, inline="always")
def limbs_sign(acc, n: int) -> float:
    """Sign (-1.0, 0.0, 1.0) of ``sum(acc[i] * 2^(30 i) for i < n)`` (carries propagated here)."""
    carry = 0
    nonzero = False
    for i in range(n):
        v = acc[i] + carry
        carry = v >> 30
        if v & MASK30:
            nonzero = True
    if carry < 0:
        return -1.0
    return 1.0 if (carry > 0 or nonzero) else 0.0
