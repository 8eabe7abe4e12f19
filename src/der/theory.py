r"""The paper's theory quantities, each with its statement, and the corrections our property tests forced.

Everything is float64 NumPy (reference math, not training code). Status of each statement, as checked by
``tests/test_theory.py`` on random and constructed instances:

* **Theorem 4** (App. H.3, Eq. 15) — *counterexample kept*: as written it bounds
  :math:`|H_\mathcal{R}(S) - H_\text{soft}(S;\Theta,\tau)|` for *any* learned Θ, but :math:`H_\mathcal{R}`
  is a minimum over partitions while :math:`H_\text{soft}` follows the given Θ: a triangle whose interior
  points are split in two by one well-separated plane has :math:`H_\mathcal{R}=0`,
  :math:`H_\text{soft}\approx\log 2`, and a bound over 5x smaller (n = 40 003, τ = 0.005, C = 1; test). The entropy
  continuity step it uses, :math:`|H(p)-H(q)|\le\|p-q\|_1\log(K/\|p-q\|_1)`, also needs
  :math:`\|p-q\|_1\le 1/2` (Cover & Thomas, Thm. 17.3.3): ``K = 3``, ``p = (1, 0, 0)``, ``q`` uniform breaks
  it (log 3 = 1.099 > 1.081).
* **Proposition 1** (App. E.4) — *false as stated*: :math:`R\le\lceil e^{H}/\delta\rceil` fails, e.g. one
  cluster of mass 1/2 and M = 1000 clusters of mass 1/(2M) with δ = 1/4 need R = 501 clusters but the bound
  gives 253. What does hold (proved in :func:`prop1_corrected_bound`) is :math:`R\le\lceil e^{H/\delta}\rceil`.
* **Lemma 2** (App. E.4) — *holds* (the proof is right); the sharp constant is 2Bδ_t, not 4Bδ_t.
* **Theorem 2** (App. E.4, Eqs. 8–10) — the FLOP bound (10) holds whenever |S*| ≤ R and Assumption 2
  hold (it is a count), but the error claim (9) inherits Prop. 1's failure: with R from (8) the top-R
  clusters can miss more than δ of the mass, and uniform attention (which satisfies Assumption 1 with
  C_align = 1) then has error 2Bδ_t > ε (constructed in the tests). Using the corrected Prop. 1 in (8)
  restores (9).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from der.functional import empirical_margin as _margin
from der.functional import entropy_from_counts

__all__ = [
    "block_sparse_flops",
    "empirical_margin",
    "entropy_continuity_bound",
    "lemma2_truncation",
    "min_clusters_for_mass",
    "prop1_bound",
    "prop1_corrected_bound",
    "shannon_entropy",
    "theorem2_R",
    "theorem2_flop_bound",
    "theorem4_bound",
    "theorem4_epsilon",
]


def _pos(name: str, v: float, strict: bool = True) -> float:
    v = float(v)
    if not math.isfinite(v) or (v <= 0 if strict else v < 0):
        raise ValueError(f"{name} must be a finite {'positive' if strict else 'non-negative'} number, got {v}")
    return v


def _prob(name: str, v: float) -> float:
    v = float(v)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {v}")
    return v


def shannon_entropy(p) -> float:
    """:math:`-\\sum p\\log p` (nats) of a probability vector (normalised here; zeros ignored)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    if p.size == 0 or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"p must be a non-empty, finite, non-negative vector with positive sum, got {p}")
    return float(entropy_from_counts(torch.from_numpy(p)))


def empirical_margin(x, normals, offsets) -> float:
    r"""Empirical margin :math:`\hat\gamma(S)=\min_{i,t}|w_t^\top x_i-b_t|/\|w_t\|` (App. H.3) of NumPy
    inputs, as a float: :func:`der.functional.empirical_margin` in float64.

    Args: ``x (n, d)``, ``normals (m, d)``, ``offsets (m,)``.
    """
    x, w, b = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in (x, normals, offsets))
    if x.ndim != 2 or w.ndim != 2 or b.ndim != 1:
        raise ValueError(f"expected x (n, d), normals (m, d), offsets (m,); got {x.shape}, {w.shape}, {b.shape}")
    return float(_margin(x, w, b))


def theorem4_epsilon(gamma_hat: float, tau: float, n: int, d: int, m: int, delta: float,
                     C: float = 1.0) -> float:
    r"""The slack of Theorem 4 (Eq. 15):

    .. math:: \varepsilon = e^{-\hat\gamma/(4\tau)} + 2\,\mathrm{Rad}_n + \sqrt{\log(2/\delta)/(2n)},\qquad
              \mathrm{Rad}_n = C\,\frac{1}{4\tau}\sqrt{\frac{d\log m}{n}}

    (``C`` is the paper's unspecified constant; 1 by default).
    """
    gamma_hat = _pos("gamma_hat", gamma_hat, strict=False)
    tau, C = _pos("tau", tau), _pos("C", C, strict=False)
    n, d, m = int(_pos("n", n)), int(_pos("d", d)), int(_pos("m", m))
    delta = _prob("delta", delta)
    rad = C / (4.0 * tau) * math.sqrt(d * math.log(m) / n)
    return math.exp(-gamma_hat / (4.0 * tau)) + 2.0 * rad + math.sqrt(math.log(2.0 / delta) / (2.0 * n))


def theorem4_bound(gamma_hat: float, tau: float, n: int, d: int, m: int, K: int, delta: float,
                   C: float = 1.0) -> float:
    r"""Theorem 4 (App. H.3, Eq. 15): with probability ≥ 1 − δ,
    :math:`|H_\mathcal{R}(S) - H_\text{soft}(S;\Theta,\tau)| \le \varepsilon\log(K/\varepsilon)` with ε from
    :func:`theorem4_epsilon` and K soft cells. Returns ``inf`` when ε > 1/2, where the continuity step it
    relies on no longer applies. **Counterexample in the module docstring.**
    """
    K = int(_pos("K", K))
    eps = theorem4_epsilon(gamma_hat, tau, n, d, m, delta, C)
    return math.inf if eps > 0.5 else eps * math.log(K / eps)


def entropy_continuity_bound(l1: float, K: int, strict: bool = True) -> float:
    r""":math:`|H(p)-H(q)|\le\|p-q\|_1\log(K/\|p-q\|_1)` (used in Theorems 3–4).

    Valid for :math:`\|p-q\|_1\le 1/2` (Cover & Thomas, Thm. 17.3.3); with ``strict=True`` a larger
    ``l1`` raises ``ValueError``; ``strict=False`` evaluates the formula anyway (it can then fail).
    """
    l1, K = _pos("l1", l1, strict=False), int(_pos("K", K))
    if strict and l1 > 0.5:
        raise ValueError(f"the continuity bound needs ||p - q||_1 <= 1/2, got {l1}")
    return 0.0 if l1 == 0 else l1 * math.log(K / l1)


def min_clusters_for_mass(masses, delta: float) -> tuple[int, np.ndarray]:
    """Smallest R with top-R mass ≥ 1 − δ, and those cluster indices (largest first)."""
    p = np.asarray(masses, dtype=np.float64)
    shannon_entropy(p)  # validates
    p = p / p.sum()
    delta = _prob("delta", delta)
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    R = int(np.searchsorted(cum, 1.0 - delta - 1e-12) + 1)
    return min(R, len(p)), order[:R]


def prop1_bound(H: float, delta: float, k: int) -> int:
    r"""Proposition 1 as stated: :math:`R\le\min\{k,\lceil e^{H(p)}/\delta\rceil\}` clusters hold 1 − δ of
    the mass. **False in general** (module docstring); kept to test it."""
    H, delta, k = _pos("H", H, strict=False), _prob("delta", delta), int(_pos("k", k))
    log_b = H - math.log(delta)
    return k if log_b >= math.log(k) else min(k, math.ceil(math.exp(log_b) - 1e-12))


def prop1_corrected_bound(H: float, delta: float, k: int) -> int:
    r"""Corrected Proposition 1: the smallest R with top-R mass ≥ 1 − δ satisfies
    :math:`R\le\min\{k,\lceil e^{H/\delta}\rceil\}`.

    Proof: with R minimal, the clusters ranked ≥ R carry mass > δ, and each has mass
    :math:`m_{(i)}\le 1/i\le 1/R`, so :math:`H\ge\sum_{i\ge R}m_{(i)}\log(1/m_{(i)}) > \delta\log R`.
    """
    H, delta, k = _pos("H", H, strict=False), _prob("delta", delta), int(_pos("k", k))
    log_b = H / delta
    return k if log_b >= math.log(k) else min(k, math.ceil(math.exp(log_b) - 1e-12))


def lemma2_truncation(w, v, keep) -> dict:
    r"""Lemma 2 (App. E.4): restricting attention weights ``w (n,)`` (≥ 0, sum 1) to ``keep`` and
    renormalising moves :math:`y=\sum_j w_jv_j` by at most :math:`4B\delta_t` when the dropped mass
    :math:`\delta_t\le 1/2`, :math:`B=\max_j\|v_j\|`.

    Returns ``{"error", "delta_t", "B", "bound": 4Bδ_t, "sharp": 2Bδ_t}``.
    """
    w = np.asarray(w, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if w.ndim != 1 or v.ndim != 2 or v.shape[0] != w.shape[0]:
        raise ValueError(f"expected w (n,) and v (n, d), got {w.shape} and {v.shape}")
    if (w < 0).any() or not math.isclose(float(w.sum()), 1.0, rel_tol=1e-9):
        raise ValueError("w must be non-negative and sum to 1")
    mask = np.zeros(len(w), dtype=bool)
    mask[np.asarray(keep, dtype=np.int64)] = True
    delta_t = float(w[~mask].sum())
    if delta_t >= 1.0:
        raise ValueError("the kept set carries no attention mass (δ_t = 1)")
    y = w @ v
    y_t = (w * mask) @ v / (1.0 - delta_t)
    B = float(np.linalg.norm(v, axis=1).max())
    return {"error": float(np.linalg.norm(y - y_t)), "delta_t": delta_t, "B": B,
            "bound": 4.0 * B * delta_t, "sharp": 2.0 * B * delta_t}


def theorem2_R(H: float, eps: float, B: float, C_align: float, k: int, corrected: bool = False) -> int:
    r"""Eq. 8: :math:`R\le\min\{k,\lceil e^{H}/\delta\rceil\}` with :math:`\delta=\varepsilon/(4BC_\text{align})`
    (``corrected=True`` uses :func:`prop1_corrected_bound` instead)."""
    B, C_align = _pos("B", B), _pos("C_align", C_align)
    if not 0 < eps < B or C_align < 1:
        raise ValueError(f"Theorem 2 needs 0 < eps < B and C_align >= 1, got eps={eps}, B={B}, C_align={C_align}")
    delta = eps / (4.0 * B * C_align)
    return (prop1_corrected_bound if corrected else prop1_bound)(H, delta, k)


def theorem2_flop_bound(n: int, d: int, k: int, R: int, c_max: float) -> float:
    r"""Eq. 10: :math:`\text{FLOPs}(\tilde Y)\le C_\text{FLOP}\,\frac{R}{k}\,n^2d` with
    :math:`C_\text{FLOP}=2c_\text{max}` (one multiply-add = one FLOP, as in Eq. 14)."""
    return 2.0 * _pos("c_max", c_max) * int(R) / int(_pos("k", k)) * int(n) ** 2 * int(d)


def block_sparse_flops(cluster_sizes, selected, n_queries: int, d: int) -> int:
    """Multiply-adds of attention restricted to the keys of clusters ``selected``: ``2·n_q·a·d``
    (QKᵀ and the value aggregation), ``a`` = number of active keys."""
    sizes = np.asarray(cluster_sizes, dtype=np.int64)
    a = int(sizes[np.asarray(selected, dtype=np.int64)].sum())
    return 2 * int(n_queries) * a * int(d)
