"""DER for transformers: inject into existing models, regularize keys, convert to block-sparse attention.

Lifecycle (as in torch.ao pruning): ``inject`` (attach anchors) → train with ``handle.loss()`` →
``convert`` (freeze per-head :class:`BlockLayout` s, swap in a block-sparse kernel) → ``revert`` or
save/load (``der.attention.io``; ``handle.state_dict()`` for checkpoints).

Index of the public names (modules in parentheses):

* setup and surgery — ``DERConfig`` (config), ``inject``, ``list_matches``, ``get_handle``, ``DERHandle``
  (injection), ``convert``, ``revert``, ``summary`` (conversion);
* layouts — ``BlockLayout``, ``block_mass`` (layout); ``static_layout``, ``dynamic_layout``,
  ``select_blocks`` (rules); baselines ``dense_layout``, ``magnitude_layout``, ``bigbird_layout``,
  ``longformer_layout``, ``topb_mask``, ``KMeansRouter``, ``moba_layout``, ``l1_attention_penalty``
  (baselines);
* kernel — ``block_sparse_attention`` (kernels);
* metrics — ``attention_mass_recall``, ``oracle_recall``, ``oracle_layout``, ``attention_sparsity``, ``mean_block_length``, ``block_sparse_attention_flops``,
  ``model_flops``, ``median_latency``, ``peak_memory`` (metrics).
"""

from der._lazy import lazy_getattr

_TABLE = {
    "DERConfig": ".config",
    "inject": ".injection",
    "list_matches": ".injection",
    "get_handle": ".injection",
    "DERHandle": ".injection",
    "convert": ".conversion",
    "revert": ".conversion",
    "summary": ".conversion",
    "BlockLayout": ".layout",
    "block_mass": ".layout",
    "static_layout": ".rules",
    "dynamic_layout": ".rules",
    "select_blocks": ".rules",
    "block_sparse_attention": ".kernels",
    "dense_layout": ".baselines",
    "magnitude_layout": ".baselines",
    "bigbird_layout": ".baselines",
    "longformer_layout": ".baselines",
    "KMeansRouter": ".baselines",
    "l1_attention_penalty": ".baselines",
    "topb_mask": ".baselines",
    "moba_layout": ".baselines",
    "attention_mass_recall": ".metrics",
    "oracle_recall": ".metrics",
    "oracle_layout": ".metrics",
    "attention_sparsity": ".metrics",
    "mean_block_length": ".metrics",
    "block_sparse_attention_flops": ".metrics",
    "model_flops": ".metrics",
    "median_latency": ".metrics",
    "peak_memory": ".metrics",
}
__all__ = sorted(_TABLE)
__getattr__ = lazy_getattr(__name__, _TABLE)
