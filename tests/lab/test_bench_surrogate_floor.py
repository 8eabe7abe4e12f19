"""The alternatives timed by ``der bench surrogate-floor`` compute the same gradients as the streaming op."""

import torch

from der._ops import softmax_counts
from der_lab.bench.surrogate_floor import _affine, _entropy, compiled_step, parts
from der_lab.bench.surrogate_op import make_inputs


def test_compiled_chunks_match_streaming_gradients():
    n, k, d = 5000, 16, 8  # chunk of 2048 rows: two full chunks and a tail
    run, _ = compiled_step(n, k, d, chunk_elems=2048 * k)
    dx, dW, db = run()
    x, c = (t.detach() for t in make_inputs(n, k, d))
    f, W, b = (t.clone().requires_grad_() for t in _affine(x, c))
    _entropy(softmax_counts(f, W, b, chunk_elems=2048 * k)).backward()
    for ours, ref in ((dx, f.grad), (dW, W.grad), (db, b.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_parts_account_for_every_pass():
    res = parts(4096, 32, 16, budget_s=0.01)
    sec, passes = res["seconds"], res["passes"]
    assert set(sec) == set(passes)
    assert all(s > 0 for s in sec.values())
    products = sum(sec[name] * passes[name] for name in sec if name.endswith("product"))
    assert abs(res["products_s"] - products) < 1e-12
    assert res["sum_of_parts_s"] > res["products_s"]
    assert res["product_rate_flops"] == 8.0 * 4096 * 32 * 16 / res["products_s"]
