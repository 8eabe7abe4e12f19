"""Fast implementations behind :mod:`der.functional` (streaming, custom autograd, numba)."""
