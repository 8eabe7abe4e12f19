"""Tests for EntropyNet (App. G.9), its fused inference, persistence and the training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from der.geometry.entropynet import WEIGHTS_DIR, EntropyNet, EntropyNetConfig
from der.geometry.fast_infer import FusedEntropyNet, first_in_cell

TINY = dict(widths=(8, 16, 16), head=8)


def _trained_like(seed: int = 0, **kw) -> EntropyNet:
    """A tiny net with random (non-zero) weights and BN statistics, in eval mode."""
    torch.manual_seed(seed)
    net = EntropyNet(EntropyNetConfig(**{**TINY, **kw}))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.5)
    net.train()
    with torch.no_grad():
        net.displace(torch.rand(4, 64, net.config.d))  # populate BN running stats
    return net.eval()


def test_architecture_matches_paper_defaults() -> None:
    net = EntropyNet()
    lin = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(2, 64), (64, 128), (128, 256), (512, 128), (128, 2)]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules()) == 4
    assert net.drop.p == 0.1 and net.config.sigma == 0.1
    assert net.surrogate.anchors.shape == (16, 2)


def test_identity_at_init_and_bounded_moves() -> None:
    x = torch.rand(3, 100, 2)
    assert torch.equal(EntropyNet(**TINY).eval().displace(x), x)  # zero-initialized output layer
    net = _trained_like()
    y = net.displace(x)
    assert (y - x).abs().max() <= net.config.sigma + 1e-6
    assert (y - x).abs().max() > 1e-3  # it does move


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_permutation_equivariance(seed: int) -> None:
    net = _trained_like()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 50, 2, generator=g)
    perm = torch.randperm(50, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(net.displace(x)[:, perm], net.displace(x[:, perm]))


def test_fused_matches_torch_float64_reference() -> None:
    net = _trained_like(1)
    x = np.random.default_rng(0).random((3000, 2))
    ref = net.double().displace(torch.from_numpy(x)).detach().numpy()
    net.float()
    np.testing.assert_allclose(FusedEntropyNet(net).displace(x), ref, atol=2e-5)
    np.testing.assert_allclose(net.displace_numpy(x, chunk=700), ref, atol=2e-5)


def test_joint_gradients_reach_network_and_anchors() -> None:
    net = EntropyNet(**TINY)
    x = torch.rand(2, 64, 2)
    net.materialize(x)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    y, h = net(x)
    (h.mean() + y.sum()).backward()
    assert net.surrogate.anchors.grad.abs().sum() > 0
    assert net.point_mlp[0][0].weight.grad.abs().sum() > 0


def test_first_in_cell_matches_unique() -> None:
    rng = np.random.default_rng(3)
    cells = rng.integers(-5, 5, size=(2000, 3))
    _, ref = np.unique(cells, axis=0, return_index=True)
    np.testing.assert_array_equal(first_in_cell(cells), np.sort(ref))


def test_preprocess_dedup_and_index() -> None:
    net = _trained_like(2)
    rng = np.random.default_rng(4)
    pts = rng.random((5000, 2)) * [3.0, 1.0] - 7.0
    out, idx = net.preprocess(pts, return_index=True)
    assert out.shape[1] == 2 and len(out) == len(idx) <= len(pts)
    scale = 3.0 * (1 - 1e-3)
    assert np.abs(out - pts[idx]).max() <= net.config.sigma * 3.0 + 1e-9 and scale > 0
    cells = np.floor((out - pts.min(0)) / (net.config.dedup_grid * np.ptp(pts, 0).max())).astype(np.int64)
    assert len(np.unique(cells, axis=0)) == len(out)  # one point per grid cell
    net0 = EntropyNet(**TINY, dedup_grid=0.0).eval()
    dup = np.vstack([pts[:100], pts[:100]])
    assert len(net0.preprocess(dup)) == 100  # exact-repeat dedup, identity net


@pytest.mark.parametrize("bad", [np.zeros((10, 3)), np.array([[0.0, np.nan]] * 5), np.zeros((0, 2)), np.zeros(4)])
def test_preprocess_bad_input(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        EntropyNet(**TINY).preprocess(bad)
    with pytest.raises(ValueError):
        EntropyNet(**TINY).displace(torch.full((5, 2), float("inf")))


def test_save_load_roundtrip_and_mismatch(tmp_path) -> None:
    net = _trained_like(5)
    net.save(tmp_path / "w", meta={"command": "test"})
    back = EntropyNet.load(tmp_path / "w")
    x = torch.rand(1, 40, 2)
    torch.testing.assert_close(back.displace(x), net.displace(x))
    assert back.meta["command"] == "test"
    with pytest.raises(ValueError, match="d=2"):
        EntropyNet.load(tmp_path / "w", d=3)
    with pytest.raises(ValueError, match="surrogate"):
        EntropyNet.load(tmp_path / "w", surrogate="halfspace")
    # a file whose config claims other sizes than its tensors → clear error, not a shape crash
    from der._io import save_state

    other = _trained_like(5, widths=(8, 16, 32))
    save_state(tmp_path / "o.safetensors", net.state_dict(), {"config": other.config.to_dict()}, kind="der.EntropyNet")
    with pytest.raises(ValueError, match="does not fit"):
        EntropyNet.load(tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="der train entropynet"):
        EntropyNet.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="der train entropynet"):  # also a ValueError (one state format)
        EntropyNet.load(tmp_path / "missing")


def test_save_is_one_file_with_distinct_names(tmp_path) -> None:
    a, b = _trained_like(1), _trained_like(2)
    pa, pb = a.save(tmp_path / "m.v1", meta={"v": 1}), b.save(tmp_path / "m.v2", meta={"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.v1.safetensors", "m.v2.safetensors"]
    for p, net, v in ((pa, a, 1), (pb, b, 2)):
        back = EntropyNet.load(p)
        assert back.meta == {"v": v}
        for (k, x), y in zip(net.state_dict().items(), back.state_dict().values(), strict=True):
            assert torch.equal(x, y), k


def test_load_rejects_foreign_damaged_and_nan(tmp_path) -> None:
    from safetensors.torch import save_file

    from der._io import save_state

    net = _trained_like(3)
    p = net.save(tmp_path / "w")
    (tmp_path / "t.safetensors").write_bytes(p.read_bytes()[:-5])
    with pytest.raises(ValueError, match="t.safetensors"):
        EntropyNet.load(tmp_path / "t")
    save_file({"x": torch.ones(2)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(ValueError, match="not a der state file"):
        EntropyNet.load(tmp_path / "f")
    save_state(tmp_path / "r.safetensors", {"x": torch.ones(2)}, {}, kind="der.EntropyRegularizer")
    with pytest.raises(ValueError, match="expected 'der.EntropyNet'"):
        EntropyNet.load(tmp_path / "r")
    state = net.state_dict()
    state["out.bias"] = torch.full_like(state["out.bias"], float("nan"))
    save_state(tmp_path / "n.safetensors", state, {"config": net.config.to_dict(), "meta": {}}, kind="der.EntropyNet")
    with pytest.raises(ValueError, match="out.bias"):
        EntropyNet.load(tmp_path / "n")
    save_state(tmp_path / "c.safetensors", net.state_dict(), {"config": {"d": "two"}}, kind="der.EntropyNet")
    with pytest.raises(ValueError, match="invalid EntropyNet config"):
        EntropyNet.load(tmp_path / "c")


def test_legacy_two_file_layout_still_loads(tmp_path) -> None:
    import json

    from safetensors.torch import save_file

    net = _trained_like(4)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "old.safetensors"))
    doc = {"format": "der.EntropyNet/1", "config": net.config.to_dict(), "meta": {"command": "old"}}
    (tmp_path / "old.json").write_text(json.dumps(doc))
    for name in ("old", "old.json", "old.safetensors"):
        back = EntropyNet.load(tmp_path / name)
        assert back.meta == {"command": "old"}
        x = torch.rand(1, 30, 2)
        torch.testing.assert_close(back.displace(x), net.eval().displace(x))
    (tmp_path / "old.json").write_text(json.dumps({**doc, "format": "something/else"}))
    with pytest.raises(ValueError, match="not a der state file"):
        EntropyNet.load(tmp_path / "old")


@pytest.mark.parametrize("surrogate", ["halfspace", "box"])
def test_other_surrogates_forward(surrogate: str) -> None:
    net = EntropyNet(**TINY, surrogate=surrogate)
    y, h = net(torch.rand(2, 64, 2))
    assert h.shape == (2,) and torch.isfinite(h).all()


@pytest.mark.skipif(not (WEIGHTS_DIR / "entropynet_ball.safetensors").is_file(), reason="weights not shipped")
def test_pretrained_loads_and_preprocesses() -> None:
    net = EntropyNet.pretrained(surrogate="ball")
    assert "der train entropynet" in net.meta["command"]
    pts = np.random.default_rng(0).random((2000, 2))
    assert net.preprocess(pts).shape[1] == 2
    with pytest.raises(ValueError, match="surrogate"):
        EntropyNet.pretrained(surrogate="cube")


def test_training_resumes_exactly(tmp_path) -> None:
    from der.geometry.train import TrainConfig, train

    cfg = TrainConfig(epochs=2, clouds_per_epoch=8, batch=4, n_points=64, widths=(8, 8, 8), head=8, num_anchors=4)
    a, _ = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False, stop_after=1)  # interrupted after epoch 1 ...
    b, _ = train(cfg, tmp_path / "b", progress=False)  # ... and resumed
    assert (tmp_path / "b" / "metrics.csv").is_file() and (tmp_path / "b" / "entropynet_ball.safetensors").is_file()
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
