"""Under torch.distributed (2 gloo processes on CPU) the entropy is that of the union of all ranks' points."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import der


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, family: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        union = torch.randn(2 * 96, 2, generator=g, dtype=torch.float64)
        local = union[rank * 96:(rank + 1) * 96].clone().requires_grad_(True)
        reg = der.EntropyRegularizer(family, num_anchors=5, seed=rank).double()  # seeds differ per rank
        h = reg(local)
        h.backward()
        grads = [p.grad.clone() for p in reg.parameters()]
        for gr in grads:
            dist.all_reduce(gr)
            gr /= world  # what DDP does
        out[rank] = {"h": h.item(), "xgrad": local.grad.clone(), "pgrads": grads,
                     "params": [p.detach().clone() for p in reg.parameters()], "union": union}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["ball", "halfspace"])
def test_two_gloo_ranks_equal_single_process_union(family):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as mgr:
        out = mgr.dict()
        mp.start_processes(_worker, args=(2, _free_port(), family, out), nprocs=2, join=True, start_method="spawn")
        res = dict(out)
    # anchors were broadcast from rank 0: identical on both ranks
    for a, b in zip(res[0]["params"], res[1]["params"]):
        torch.testing.assert_close(a, b)
    assert res[0]["h"] == pytest.approx(res[1]["h"], abs=1e-12)
    union = res[0]["union"].clone().requires_grad_(True)
    ref = der.EntropyRegularizer(family, num_anchors=5, sync_distributed=False).double()
    ref.materialize(union[:96])  # create, then overwrite with rank 0's parameters
    with torch.no_grad():
        for p, q in zip(ref.parameters(), res[0]["params"]):
            p.copy_(q)
    h = ref(union)
    h.backward()
    assert res[0]["h"] == pytest.approx(h.item(), abs=1e-6)
    # DDP convention: local point grads are world_size × ∂H(union)/∂x; averaged parameter grads are exact
    torch.testing.assert_close(res[0]["xgrad"] / 2, union.grad[:96], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(res[1]["xgrad"] / 2, union.grad[96:], atol=1e-6, rtol=1e-6)
    for got, p in zip(res[0]["pgrads"], ref.parameters()):
        torch.testing.assert_close(got, p.grad, atol=1e-6, rtol=1e-6)


def _worker_local_n(rank: int, world: int, port: int, out: dict) -> None:
    """Ranks see different local N with ``num_anchors=None``; EMA anchors stay identical across ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(rank)
        local = torch.randn(100 + 60 * rank, 2, generator=g, dtype=torch.float64)
        reg = der.EntropyRegularizer("ball", heuristic="sqrt", seed=rank).double()
        h = reg(local)
        ema = der.EntropyRegularizer("ball", num_anchors=4, anchor_update="ema", ema_decay=0.5,
                                     seed=rank).double()
        for _ in range(3):
            ema(local + rank)
        out[rank] = {"k": reg.num_anchors, "h": h.item(), "ema": ema.anchors.clone(),
                     "count": ema.anchor_set.ema_count.clone()}
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_different_n_agree_on_k_and_ema_state():
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as mgr:
        out = mgr.dict()
        mp.start_processes(_worker_local_n, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
        res = dict(out)
    assert res[0]["k"] == res[1]["k"] == 12  # ⌊√160⌋ from the larger local N, not ⌊√100⌋ = 10
    assert res[0]["h"] == pytest.approx(res[1]["h"], abs=1e-12)  # one entropy of the union
    torch.testing.assert_close(res[0]["ema"], res[1]["ema"])
    torch.testing.assert_close(res[0]["count"], res[1]["count"])
    assert float(res[0]["count"].sum()) == pytest.approx(260.0, rel=1e-6)  # counts of both ranks summed
