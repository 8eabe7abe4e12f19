"""App. E.2: the paper's anchor-gradient closed form and fixed point vs autograd (recorded for claims)."""

import torch

from der_lab.bench import core_gradient_check as E2


def test_derived_closed_form_equals_autograd_and_paper_form_does_not():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(80, 3, generator=g, dtype=torch.float64)
    c = torch.randn(5, 3, generator=g, dtype=torch.float64)
    auto = E2.autograd_gradient(x, c, 1.7)
    torch.testing.assert_close(E2.derived_gradient(x, c, 1.7), auto, rtol=1e-10, atol=1e-12)
    assert E2.rel_err(E2.paper_gradient(x, c, 1.7), auto) > 0.5  # the paper's formula is not the gradient


def test_paper_fixed_point_fails_at_a_stationary_point():
    res = E2.run(seeds=(0,), n=200, k=4, alpha=2.0, steps=800)
    row = res["rows"][0]
    assert row["derived_grad_rel_err_vs_autograd"] < 1e-10
    assert res["verdict"]["paper_gradient_matches_autograd"] is False
    assert row["paper_fixed_point_residual"] > 10 * row["grad_norm_at_stationary"]
