"""Shewchuk's floating-point expansion arithmetic in numba, on stack buffers (no heap allocation).

An *expansion* is a sum of non-overlapping float64 components stored in increasing magnitude in
``buf[:len]``; the zero expansion is ``[0.0]`` (length 1). The primitives are Shewchuk's (1997,
"Adaptive precision floating-point arithmetic and fast robust geometric predicates"): ``two_sum``,
``two_diff_tail``, ``two_prod`` (by a fused multiply-add), ``two_two_diff``, ``fast_expansion_sum_zeroelim``
(here with ``two_sum`` in every step: exact for all operand orders), ``scale_expansion_zeroelim``
and ``estimate``. They are exact as long as no product underflows or overflows; callers check the
range of their inputs (see :mod:`der.geometry._kernels` and :mod:`der.geometry._incircle`).

:func:`stack_f64` reserves ``n`` (a compile-time constant) float64 slots in the calling function's
stack frame (an LLVM ``alloca`` in its entry block), so an exact fallback costs no ``malloc``.
"""

from __future__ import annotations

from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["estimate", "fast_expansion_sum", "fma", "fast_two_sum", "scale_expansion", "stack_f64", "stack_i64",
           "store4", "two_diff_tail", "two_prod", "two_sum", "two_two_diff"]

def _alloca(dtype):
    @intrinsic
    def alloca(typingctx, size):
        if not isinstance(size, types.IntegerLiteral):
            return None

        def codegen(context, builder, signature, args):
            return cgutils.alloca_once(builder, context.get_value_type(dtype), size=size.literal_value)

        return types.CPointer(dtype)(size), codegen

    return alloca


_alloca_f64 = _alloca(types.float64)
_alloca_i64 = _alloca(types.int64)


@njit(inline="always")
def stack_f64(n):
    """A float64 array of ``n`` uninitialised slots (``n`` a literal) in the caller's stack frame;
    valid until the calling function returns."""
    return carray(_alloca_f64(n), n)


@njit(inline="always")
def stack_i64(n):
    """An int64 array of ``n`` uninitialised slots in the caller's stack frame (as :func:`stack_f64`)."""
    return carray(_alloca_i64(n), n)


@njit(cache=True, inline="always")
def two_sum(a: float, b: float):
    x = a + b
    bv = x - a
    av = x - bv
    return x, (a - av) + (b - bv)


@njit(cache=True, inline="always")
def fast_two_sum(a: float, b: float):
    """Exact ``a + b`` for ``|a| >= |b|`` (or ``a`` zero)."""
    x = a + b
    return x, b - (x - a)


@njit(cache=True, inline="always")
def two_diff_tail(a: float, b: float, x: float) -> float:
    """Rounding error of ``x = fl(a - b)``: ``a - b == x + tail`` exactly."""
    bv = a - x
    av = x + bv
    return (a - av) + (bv - b)


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` with one rounding (LLVM ``llvm.fma.f64``: the FMA instruction where the CPU has
    one, else libm's ``fma``, which is exact too)."""
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        d = ir.DoubleType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(d, [d, d, d]), "llvm.fma.f64")
        return builder.call(fn, args)

    return sig, codegen


@njit(cache=True, inline="always")
def two_prod(a: float, b: float):
    """Exact ``a * b == x + y`` (the error of the rounded product by one fused multiply-add)."""
    x = a * b
    return x, fma(a, b, -x)


@njit(cache=True, inline="always")
def _two_one_diff(a1, a0, b):
    i, x0 = two_sum(a0, -b)
    x2, x1 = two_sum(a1, i)
    return x2, x1, x0


@njit(cache=True, inline="always")
def two_two_diff(a1, a0, b1, b0):
    """Exact ``(a1 + a0) - (b1 + b0)`` as four components ``(x3, x2, x1, x0)`` (x3 largest)."""
    j, z, x0 = _two_one_diff(a1, a0, b0)
    x3, x2, x1 = _two_one_diff(j, z, b1)
    return x3, x2, x1, x0


@njit(cache=True, inline="always")
def store4(h, x) -> int:
    """Write the four-component expansion ``x = (x3, x2, x1, x0)`` (as :func:`two_two_diff` returns
    it) into ``h``, smallest first; returns 4."""
    h[0], h[1], h[2], h[3] = x[3], x[2], x[1], x[0]
    return 4


@njit(cache=True)
def fast_expansion_sum(elen: int, e, flen: int, f, h) -> int:
    """``h = e + f`` (zero-eliminated), merging by magnitude; returns the length of ``h``."""
    i = j = k = 0
    en, fn = e[0], f[0]
    if (fn > en) == (fn > -en):
        q = en
        i = 1
    else:
        q = fn
        j = 1
    while i < elen or j < flen:
        if j >= flen or (i < elen and (f[j] > e[i]) == (f[j] > -e[i])):
            q, hh = two_sum(q, e[i])
            i += 1
        else:
            q, hh = two_sum(q, f[j])
            j += 1
        if hh != 0.0:
            h[k] = hh
            k += 1
    if q != 0.0 or k == 0:
        h[k] = q
        k += 1
    return k


@njit(cache=True)
def scale_expansion(elen: int, e, b: float, h) -> int:
    """``h = e * b`` (zero-eliminated); returns the length of ``h``."""
    q, hh = two_prod(e[0], b)
    k = 0
    if hh != 0.0:
        h[k] = hh
        k += 1
    for i in range(1, elen):
        p1, p0 = two_prod(e[i], b)
        s, hh = two_sum(q, p0)
        if hh != 0.0:
            h[k] = hh
            k += 1
        q, hh = fast_two_sum(p1, s)
        if hh != 0.0:
            h[k] = hh
            k += 1
    if q != 0.0 or k == 0:
        h[k] = q
        k += 1
    return k


@njit(cache=True, inline="always")
def estimate(elen: int, e) -> float:
    """Float approximation of the expansion (sum of its components)."""
    s = e[0]
    for i in range(1, elen):
        s += e[i]
    return s
