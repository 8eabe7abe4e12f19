"""Data generators, preprocessing and the QuickDraw ndjson loader."""

from __future__ import annotations

import numpy as np
import pytest

from der.geometry import data
from der.geometry.quickdraw import drawing_points, iter_ndjson, load_quickdraw, write_ndjson


@pytest.mark.parametrize("name", list(data.DISTRIBUTIONS))
def test_shapes_and_determinism(name):
    a = data.generate(name, 1000, seed=3)
    b = data.generate(name, 1000, seed=3)
    c = data.generate(name, 1000, seed=4)
    assert a.shape == (1000, 2) and a.dtype == np.float64 and a.flags.c_contiguous
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.isfinite(a).all()
    assert data.generate(name, 0, seed=1).shape == (0, 2)


def test_distribution_properties():
    sq = data.uniform_square(20_000, 0)
    assert sq.min() >= 0 and sq.max() < 1 and abs(sq.mean() - 0.5) < 0.01
    disk = data.uniform_disk(20_000, 0)
    r = np.hypot(*disk.T)
    assert r.max() <= 1 and abs(np.mean(r**2) - 0.5) < 0.01  # uniform area: E r^2 = 1/2
    g = data.gaussian(20_000, 0)
    assert abs(g.std() - 1) < 0.02
    circ = data.circle(1000, 0)
    np.testing.assert_allclose(np.hypot(*circ.T), 1.0, atol=1e-15)
    par = data.parabola(20_000, 0, noise=0.01)
    resid = par[:, 1] - par[:, 0] ** 2
    assert abs(resid.std() - 0.01) < 5e-4 and abs(resid.mean()) < 5e-4
    assert par[:, 0].min() >= -1 and par[:, 0].max() <= 1
    np.testing.assert_array_equal(data.parabola(10, 1, noise=0.0)[:, 1], data.parabola(10, 1, noise=0.0)[:, 0] ** 2)
    cl = data.clustered(5000, 0, k=3, spread=0.01)
    assert cl.shape == (5000, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown distribution"):
        data.generate("torus", 10)
    with pytest.raises(ValueError, match="non-negative"):
        data.uniform_square(-1)
    with pytest.raises(ValueError):
        data.parabola(10, noise=-1)
    with pytest.raises(ValueError):
        data.clustered(10, k=0)


def test_normalize_and_dedup():
    P = np.array([[2.0, 5.0], [4.0, 5.0], [3.0, 9.0], [2.0, 5.0]])
    N = data.normalize_unit_square(P)
    assert N.min() == 0 and N.max() == 1
    np.testing.assert_allclose(N[2], [0.5, 1.0])
    K = data.normalize_unit_square(P, keep_aspect=True)
    np.testing.assert_allclose(K[1], [0.5, 0.0])
    const = data.normalize_unit_square(np.ones((3, 2)))
    np.testing.assert_array_equal(const, 0.0)
    U, idx = data.dedup(np.array([[1.0, 0.0], [0.0, -0.0], [1.0, 0.0], [0.0, 0.0], [2.0, 2.0]]), return_index=True)
    np.testing.assert_array_equal(idx, [0, 1, 4])
    np.testing.assert_array_equal(U, [[1, 0], [0, 0], [2, 2]])
    assert data.dedup(np.zeros((0, 2))).shape == (0, 2)


def test_check_points_errors():
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        data.check_points(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="finite"):
        data.check_points([[0.0, np.nan]])
    with pytest.raises(ValueError, match="numeric"):
        data.check_points(np.array([["x", "y"]]))
    out = data.check_points(np.arange(6, dtype=np.int32).reshape(3, 2))
    assert out.dtype == np.float64 and out.flags.c_contiguous


@pytest.mark.parametrize("gz", [False, True])
def test_quickdraw_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(0)
    drawings = [[rng.integers(0, 256, (5, 2)), rng.integers(0, 256, (3, 2))] for _ in range(4)]
    drawings.append([np.array([[0, 0], [0, 0], [255, 128]])])  # a duplicate point
    path = write_ndjson(tmp_path / ("cat.ndjson" + (".gz" if gz else "")), drawings, word="cat", raw=gz)
    raw = load_quickdraw(path, preprocess=False)
    assert len(raw) == 5
    np.testing.assert_array_equal(raw[0], np.concatenate(drawings[0]).astype(float))
    pre = load_quickdraw(path)
    assert all(p.min() >= 0 and p.max() <= 1 for p in pre)
    np.testing.assert_allclose(pre[4], [[0, 0], [1, 128 / 255]])
    assert len(load_quickdraw(path, limit=2)) == 2
    assert len(load_quickdraw(path, recognized=True)) == 3
    assert len(load_quickdraw(path, word="dog")) == 0
    assert [r["key_id"] for r in iter_ndjson(path, word="cat")] == ["0", "1", "2", "3", "4"]


def test_quickdraw_bad_files(tmp_path):
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"word": "x", "drawing": []}\nnot json\n')
    with pytest.raises(ValueError, match="bad.ndjson:2"):
        load_quickdraw(bad)
    with pytest.raises(ValueError, match="stroke 0"):
        drawing_points([[[1, 2, 3], [1, 2]]])
