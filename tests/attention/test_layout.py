"""BlockLayout: validation, sparsity over the valid (causal) region, to_dense, resize, device, state, repr."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from der.attention.layout import BlockLayout, as_layout, block_mass


def _naive_sparsity(mask: torch.Tensor, bs: int, q_len: int, kv_len: int, causal: bool) -> float:
    """Float64 loop reference: a block is valid when some (query, key) pair inside it is allowed."""
    B, H, nbq, nbk = mask.shape
    off = kv_len - q_len
    kept = valid = 0
    for i in range(nbq):
        for j in range(nbk):
            ok = any(not causal or s <= t + off for t in range(i * bs, min(q_len, (i + 1) * bs))
                     for s in range(j * bs, min(kv_len, (j + 1) * bs)))
            if ok:
                valid += B * H
                kept += int(mask[:, :, i, j].sum())
    return 1.0 - kept / valid


@settings(max_examples=30, deadline=None)
@given(bs=st.sampled_from([1, 3, 8]), nq=st.integers(1, 40), extra=st.integers(0, 20), causal=st.booleans(),
       B=st.integers(1, 2), H=st.integers(1, 3), seed=st.integers(0, 999))
def test_sparsity_and_to_dense_match_reference(bs, nq, extra, causal, B, H, seed):
    nk = nq + extra
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, H, math.ceil(nq / bs), math.ceil(nk / bs), generator=g) < 0.5
    lay = BlockLayout(mask, bs, (nq, nk), causal)
    assert lay.sparsity() == pytest.approx(_naive_sparsity(mask, bs, nq, nk, causal))
    assert lay.density() == pytest.approx(1 - lay.sparsity())
    dense = lay.to_dense()
    assert dense.shape == (B, H, nq, nk)
    for t in range(nq):
        for s in range(nk):
            want = mask[:, :, t // bs, s // bs] & (not causal or s <= t + nk - nq)
            assert torch.equal(dense[:, :, t, s], want)
    per_head = lay.sparsity(per_head=True)
    assert per_head.shape == (B, H) and float(per_head.mean()) == pytest.approx(lay.sparsity())


def test_causal_sparsity_counts_the_lower_triangle_only():
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 2, 0] = False
    assert BlockLayout(mask, 4, 12, causal=False).sparsity() == pytest.approx(1 / 9)
    assert BlockLayout(mask, 4, 12, causal=True).sparsity() == pytest.approx(1 / 6)
    assert BlockLayout(mask.triu(), 4, 12, causal=True).sparsity() == pytest.approx(1 - 3 / 6)


def test_resize_crop_pad_repeat_and_cache():
    g = torch.Generator().manual_seed(0)
    lay = BlockLayout(torch.rand(1, 2, 4, 4, generator=g) < 0.5, 8, 32)
    short = lay.resize(20)
    assert short.n_blocks == (3, 3) and short.seq_len == 20 and torch.equal(short.mask, lay.mask[..., :3, :3])
    assert lay.resize(20) is short and lay.crop(20) is short  # cached
    assert lay.resize(30).n_blocks == (4, 4) and lay.resize(30).seq_len == 30
    big = lay.pad(50)
    assert big.n_blocks == (7, 7) and torch.equal(big.mask[..., :4, :4], lay.mask)
    assert big.mask[..., 4:, :].diagonal(offset=4, dim1=-2, dim2=-1).all()  # new rows keep their diagonal
    assert not big.mask[..., :4, 4:].any()
    assert lay.pad(50, fill=True).mask[..., :4, 4:].all()
    with pytest.raises(ValueError, match="crop"):
        lay.crop(40)
    with pytest.raises(ValueError, match="pad"):
        lay.pad(10)
    gqa = lay.repeat_heads(3)
    assert gqa.heads == 6 and torch.equal(gqa.mask[:, 3:6], lay.mask[:, 1:2].expand(1, 3, 4, 4))
    assert lay.to("cpu") is lay
    lay.mask[0, 0].fill_(True)  # in-place edit drops everything derived from the old contents
    assert torch.equal(lay.resize(20).mask, lay.mask[..., :3, :3])


def test_validation_and_clear_errors():
    m = torch.ones(2, 3, 3, dtype=torch.bool)
    assert BlockLayout(m, 4).shape == (1, 2, 3, 3) and BlockLayout(m, 4).seq_len == 12
    with pytest.raises(TypeError, match="bool tensor"):
        BlockLayout(m.float(), 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockLayout(m, 0)
    with pytest.raises(ValueError, match="needs ceil"):
        BlockLayout(m, 4, 20)
    with pytest.raises(ValueError, match="q_len <= kv_len"):
        BlockLayout(torch.ones(1, 1, 3, 2, dtype=torch.bool), 4, (12, 8), causal=True)
    with pytest.raises(ValueError, match=r"\(H, nbq, nbk\)"):
        BlockLayout(torch.ones(3, 3, dtype=torch.bool), 4)
    with pytest.raises(TypeError, match="from_mask"):
        as_layout(m)
    assert as_layout(BlockLayout(m, 4)) == BlockLayout.from_mask(m, 4, 12)


def test_repr_is_short_and_equality():
    lay = BlockLayout(torch.eye(8, dtype=torch.bool).expand(1, 12, 8, 8), 64, 500, causal=True)
    r = repr(lay)
    assert len(r) < 140 and "heads=12" in r and "blocks=8x8" in r and "seq_len=500" in r
    assert lay == BlockLayout(lay.mask.clone(), 64, 500, causal=True)
    assert lay != BlockLayout(lay.mask.clone(), 64, 500, causal=False)


def test_save_load_round_trip_and_damaged_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    lay = BlockLayout(torch.rand(2, 3, 5, 5, generator=g) < 0.4, 16, 70, causal=True)
    path = lay.save(tmp_path / "lay.safetensors")
    back = BlockLayout.load(path)
    assert back == lay and back.sparsity() == lay.sparsity()
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="lay"):
        BlockLayout.load(path)


def test_block_mass_matches_loops_and_weights():
    g = torch.Generator().manual_seed(2)
    p = torch.rand(2, 11, 13, generator=g, dtype=torch.float64)
    w = (torch.rand(11, generator=g) < 0.7).double()
    m = block_mass(p, 4, query_weight=w)
    assert m.shape == (2, 3, 4) and m.dtype == torch.float64
    for a in range(3):
        for b in range(4):
            ref = (p[:, a * 4:(a + 1) * 4, b * 4:(b + 1) * 4] * w[a * 4:(a + 1) * 4, None]).sum((-1, -2))
            torch.testing.assert_close(m[:, a, b], ref)
