import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from der.attention.layout import BlockLayout, num_blocks
from der.attention.rules import (
    anchor_block_scores,
    dynamic_layout,
    select_blocks,
    static_layout,
)

block_scores = anchor_block_scores


def _scores_loops(p: torch.Tensor, bs: int) -> torch.Tensor:
    """Float64 reference of the rule's steps 1–3 with explicit loops (one head)."""
    n, k = p.shape
    nb = math.ceil(n / bs)
    blocks = [list(range(a * bs, min(n, (a + 1) * bs))) for a in range(nb)]
    size = [sum(float(p[i, j]) for i in range(n)) for j in range(k)]
    s = torch.zeros(nb, nb, dtype=torch.float64)
    for a in range(nb):
        route = [sum(float(p[t, j]) for t in blocks[a]) / len(blocks[a]) for j in range(k)]
        for b in range(nb):
            s[a, b] = sum(route[j] * sum(float(p[i, j]) for i in blocks[b]) / size[j] for j in range(k))
    return s


@pytest.mark.parametrize("n,bs", [(32, 8), (37, 8), (20, 16)])
def test_block_scores_match_loop_reference(n, bs):
    g = torch.Generator().manual_seed(n)
    p = torch.softmax(torch.randn(n, 5, generator=g, dtype=torch.float64) * 3, -1)
    torch.testing.assert_close(block_scores(p, bs), _scores_loops(p, bs))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(16, 80), bs=st.sampled_from([4, 8, 16]), k=st.integers(2, 9),
       s=st.floats(0.0, 0.95), causal=st.booleans(), seed=st.integers(0, 10_000))
def test_layout_invariants(n, bs, k, s, causal, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(3, n, k, generator=g) * 4, -1)
    sc = block_scores(p, bs)
    nb = num_blocks(n, bs)
    torch.testing.assert_close(sc.sum(-1), torch.ones(3, nb, dtype=torch.float64))  # rows are distributions
    lay = select_blocks(sc, s, causal)
    assert lay.shape == (3, nb, nb) and lay.dtype == torch.bool
    nv = nb * (nb + 1) // 2 if causal else nb * nb
    want = max(nb, round((1 - s) * nv))
    assert bool((lay.sum((-1, -2)) == want).all())  # exact budget for every head
    assert bool(lay.diagonal(dim1=-2, dim2=-1).all())  # no empty row, own block kept
    if causal:
        assert not bool(lay.triu(1).any())
    assert BlockLayout(lay, bs, n, causal).sparsity() == pytest.approx(1 - want / nv)


def test_selection_prefers_high_scores_and_contiguity_on_ties():
    sc = torch.zeros(1, 4, 4, dtype=torch.float64)
    sc[0, 0, 3] = 0.9
    lay = select_blocks(sc, sparsity=1 - 5 / 16)
    assert bool(lay[0, 0, 3]) and int(lay.sum()) == 5
    flat = select_blocks(torch.zeros(1, 4, 4), sparsity=0.5)  # all ties → the band around the diagonal
    band = (torch.arange(4)[:, None] - torch.arange(4)[None, :]).abs() <= 1
    assert bool((flat[0] <= band).all())


def test_clustered_keys_give_cluster_blocks():
    # keys of blocks {0, 2} sit on anchor 0, blocks {1, 3} on anchor 1 → each block keeps its cluster mate
    bs, anchors = 8, torch.tensor([[[0.0, 0.0], [10.0, 10.0]]])
    keys = torch.zeros(1, 1, 32, 2)
    keys[0, 0, 8:16] = 10.0
    keys[0, 0, 24:32] = 10.0
    dyn = dynamic_layout(keys, anchors, bs, sparsity=0.5, alpha=5.0)
    assert isinstance(dyn, BlockLayout) and dyn.seq_len == 32 and dyn.block_size == bs
    lay = dyn.mask[0, 0]
    want = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(lay, want)
    mass = torch.softmax(-5.0 * torch.cdist(keys[0], anchors).pow(2), -1)  # (1, 32, 2)
    assert torch.equal(static_layout(mass, torch.ones(32), bs, 0.5).mask[0, 0], want)


def test_errors():
    with pytest.raises(ValueError, match="shorter than one block"):
        block_scores(torch.rand(10, 3), 16)
    with pytest.raises(ValueError, match="sparsity"):
        select_blocks(torch.rand(4, 4), 1.0)
    with pytest.raises(ValueError, match=r"\(H, N, k\)"):
        static_layout(torch.rand(4, 3), torch.ones(4), 2, 0.5)


def test_query_routing_formula_and_gqa_scores():
    from der.attention.rules import query_routing

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 24, 8, generator=g, dtype=torch.float64)  # 4 query heads
    anchors = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)  # 2 kv heads
    counts = torch.rand(2, 2, 5, generator=g, dtype=torch.float64) * 10 + 0.1
    r = query_routing(q, anchors, counts, 0.3)
    for h in range(4):  # query head h uses kv head h // 2
        logits = 0.3 * q[:, h] @ anchors[h // 2].T + counts[:, h // 2, None, :].log()
        torch.testing.assert_close(r[:, h], torch.softmax(logits, -1))
    p = torch.softmax(torch.randn(2, 2, 24, 5, generator=g, dtype=torch.float64), -1)
    sc = block_scores(p, 8, route=r)
    assert sc.shape == (2, 4, 3, 3)
    torch.testing.assert_close(sc.sum(-1), torch.ones(2, 4, 3, dtype=torch.float64))
    torch.testing.assert_close(sc[:, 1], block_scores(p[:, 0], 8, route=r[:, 1]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_row_budget_keeps_top_b_per_query_block(causal, sparsity):
    from der.attention.rules import select_blocks

    g = torch.Generator().manual_seed(3)
    nb = 12
    scores = torch.rand(2, 3, nb, nb, generator=g, dtype=torch.float64)
    lay = select_blocks(scores, sparsity, causal=causal, budget="row")
    valid = torch.arange(1, nb + 1) if causal else torch.full((nb,), nb)
    b = (valid * (1 - sparsity)).round().long().clamp(min=1)
    assert torch.equal(lay.sum(-1), b.expand(2, 3, nb))  # exactly b_a blocks in row a
    assert bool(lay.diagonal(dim1=-2, dim2=-1).all())  # own block always kept
    if causal:
        assert not bool(lay.triu(1).any())
    # the kept off-diagonal blocks are the row's best ones
    s = scores.masked_fill(torch.eye(nb, dtype=torch.bool), float("inf"))
    if causal:
        s = s.masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))
    worst_kept = s.masked_fill(~lay, float("inf")).amin(-1)
    best_dropped = s.masked_fill(lay, float("-inf")).amax(-1)
    assert bool((worst_kept >= best_dropped).all())
    with pytest.raises(ValueError, match="budget"):
        select_blocks(scores, sparsity, budget="column")
