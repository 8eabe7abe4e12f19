"""Exact orient / incircle (der.geometry._kernels, der.geometry._incircle) against rational arithmetic."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from der.geometry._incircle import _stage_b, incircle, incircle_exact, incircle_limbs
from der.geometry._kernels import _orient_adapt, _orient_limbs, orient


def _sgn(x) -> int:
    return int(x > 0) - int(x < 0)


def incircle_ref(ax, ay, bx, by, cx, cy, dx, dy) -> int:
    a, b, c, d = [(Fraction(x), Fraction(y)) for x, y in ((ax, ay), (bx, by), (cx, cy), (dx, dy))]
    (adx, ady), (bdx, bdy), (cdx, cdy) = [(p[0] - d[0], p[1] - d[1]) for p in (a, b, c)]
    return _sgn((adx * adx + ady * ady) * (bdx * cdy - cdx * bdy) + (bdx * bdx + bdy * bdy) * (cdx * ady - adx * cdy)
                + (cdx * cdx + cdy * cdy) * (adx * bdy - bdx * ady))


def orient_ref(ax, ay, bx, by, cx, cy) -> int:
    ax, ay, bx, by, cx, cy = map(Fraction, (ax, ay, bx, by, cx, cy))
    return _sgn((ax - cx) * (by - cy) - (ay - cy) * (bx - cx))


any_float = st.floats(allow_nan=False, allow_infinity=False, width=64)
unit = st.floats(-1.0, 1.0, allow_nan=False)
lattice = st.integers(-6, 6).map(float)


@st.composite
def cocircular(draw):
    """Four points on one circle (rounded to float64: nearly cocircular), at a random scale/offset."""
    t = draw(st.lists(st.floats(0, 2 * np.pi), min_size=4, max_size=4))
    r = draw(st.floats(1e-3, 1e3))
    cx, cy = draw(unit), draw(unit)
    pts = [v for a in t for v in (cx + r * np.cos(a), cy + r * np.sin(a))]
    return pts


@st.composite
def near_degenerate(draw):
    """d (for incircle) or c (for orient) a few ulps from a special position."""
    p = [draw(unit) for _ in range(6)]
    s = draw(st.floats(0, 1))
    x, y = p[0] + s * (p[2] - p[0]), p[1] + s * (p[3] - p[1])  # on the segment a-b, rounded
    k = draw(st.integers(-3, 3))
    x, y = x + k * np.spacing(x), y
    return p[:4] + [x, y] + [draw(unit), draw(unit)]


def _check_incircle(p) -> None:
    want = incircle_ref(*p)
    assert _sgn(incircle(*p)) == want
    assert incircle_limbs(*p) == want


def _check_orient(p) -> None:
    want = orient_ref(*p)
    assert _sgn(orient(*p)) == want
    assert _orient_limbs(*p) == want


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(unit, min_size=8, max_size=8), st.lists(lattice, min_size=8, max_size=8),
                 cocircular(), near_degenerate()))
def test_incircle_exact_ordinary(p):
    _check_incircle(p)
    _check_orient(p[:6])
    _check_orient(p[2:])


@settings(max_examples=300, deadline=None)
@given(st.lists(any_float, min_size=8, max_size=8))
def test_predicates_exact_any_doubles(p):
    """Any finite doubles, subnormal and huge included (the superaccumulator paths)."""
    _check_incircle(p)
    _check_orient(p[:6])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-4, 4), min_size=8, max_size=8), st.integers(-200, 200), st.sampled_from([0.5, 0.75, 3.0]))
def test_incircle_scaled_lattices(k, e, step):
    """Lattices with exact differences that are not integers (expansion stage B) or are."""
    p = [float(np.ldexp(v * step, e)) for v in k]
    _check_incircle(p)
    _check_orient(p[:6])


def test_stages_directly():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.random(8)
        want = incircle_ref(*p)
        assert incircle_exact(*p) == want  # stage D alone
        d = [p[0] - p[6], p[1] - p[7], p[2] - p[6], p[3] - p[7], p[4] - p[6], p[5] - p[7]]
        fin = np.empty(96)
        n = _stage_b(*d, fin)
        assert _sgn(fin[n - 1]) == incircle_ref(d[0], d[1], d[2], d[3], d[4], d[5], 0.0, 0.0)
        q = p[:6]
        detsum = abs((q[0] - q[4]) * (q[3] - q[5])) + abs((q[1] - q[5]) * (q[2] - q[4]))
        assert _sgn(_orient_adapt(*q, detsum)) == orient_ref(*q)


@pytest.mark.parametrize("p", [
    (1.0, 2.2e-313, 2.2e-313, 0.0, 0.0, 0.0),  # the subnormal hull bug
    (5e-324, 5e-324, -5e-324, 1e308, 1e308, -1e308),
    (1e-300, 1e-300, 3e-300, 3e-300, 1e300, 1e300),
])
def test_orient_extremes(p):
    _check_orient(p)


def test_exact_cocircular_and_collinear_are_zero():
    assert incircle(0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0) == 0.0
    assert incircle(0.0, 0.0, 2.0**-600, 0.0, 2.0**-600, 2.0**-600, 0.0, 2.0**-600) == 0.0
    assert orient(0.0, 0.0, 1.0, 1.0, 3.0, 3.0) == 0.0
    assert orient(0.1, 0.1, 0.2, 0.2, 0.3, 0.3) == orient_ref(0.1, 0.1, 0.2, 0.2, 0.3, 0.3)
