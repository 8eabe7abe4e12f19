"""DER for transformers: inject into existing models, regularize keys, convert to block-sparse attention.

Lifecycle (as in torch.ao pruning): ``inject`` (attach anchors) → train with ``handle.loss()`` →
``convert`` (freeze per-head block layouts, swap in a block-sparse kernel) → save/load.
"""

from der._lazy import lazy_getattr

_TABLE = {
    "DERConfig": ".config",
    "inject": ".injection",
    "list_matches": ".injection",
    "convert": ".conversion",
    "revert": ".conversion",
    "DERHandle": ".injection",
    "block_sparse_attention": ".kernels",
    "dense_layout": ".baselines",
    "magnitude_layout": ".baselines",
    "bigbird_layout": ".baselines",
    "longformer_layout": ".baselines",
    "KMeansRouter": ".baselines",
    "l1_attention_penalty": ".baselines",
    "topb_layout": ".baselines",
    "attention_sparsity": ".metrics",
    "block_sparsity": ".metrics",
    "mean_block_length": ".metrics",
    "block_sparse_attention_flops": ".metrics",
    "model_flops": ".metrics",
    "median_latency": ".metrics",
    "peak_memory": ".metrics",
}
__all__ = sorted(_TABLE)
__getattr__ = lazy_getattr(__name__, _TABLE)
