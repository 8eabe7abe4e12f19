"""der: Differentiable Entropy Regularization.

A differentiable surrogate of range-partition entropy (Shihab et al., Eq. 1–7), used as a plug-in loss
term. The public API is small:

* :mod:`der.functional` — ``anchor_entropy`` (H_diff), ``halfspace_entropy`` (H_soft), ``box_entropy``,
  ``partition_entropy``, ``soft_assign``, ``empirical_margin``;
* :class:`der.EntropyRegularizer` — the module with learnable anchors/planes and schedules;
* subpackages :mod:`der.truth`, :mod:`der.geometry`, :mod:`der.attention`.

Experiments, benchmarks and report generation live in the separate package ``der_lab`` (same repository).
"""

from der import functional
from der.functional import (
    anchor_entropy,
    box_entropy,
    empirical_margin,
    halfspace_entropy,
    partition_entropy,
    soft_assign,
)
from der.regularizer import EntropyRegularizer

__version__ = "0.1.0"
__all__ = [
    "EntropyRegularizer",
    "anchor_entropy",
    "box_entropy",
    "empirical_margin",
    "functional",
    "halfspace_entropy",
    "partition_entropy",
    "soft_assign",
]
