r"""``BlockLayout``: a block-sparse attention pattern as one object (in the manner of FlexAttention's ``BlockMask``).

A layout carries everything a kernel, a metric or a saved file needs, so callers never pass the block size,
the sequence lengths or causality again:

* ``mask``: bool ``(B or 1, H, nbq, nbk)``, ``mask[b, h, i, j]`` keeps key block ``j`` for query block ``i``
  (``nbq = ceil(q_len / block_size)``, ``nbk = ceil(kv_len / block_size)``; the last block may be short);
* ``block_size``, ``q_len``, ``kv_len`` and ``causal`` (keys after the query are masked at element level;
  for ``q_len < kv_len`` the queries are the last ``q_len`` positions, as in cached decoding);
* optionally ``scores``: the float ``(B or 1, H, nbq, nbk)`` block scores the mask was selected from
  (static layouts of ``convert``), so a shorter or padded input can re-select its blocks at the same
  budget (:func:`der.attention.rules.reselect`) instead of cropping the mask; saved with the layout;
* derived plans (the gather kernel's bucket plan, FlexAttention's ``BlockMask``, crops, device copies) are
  cached on the object (:meth:`BlockLayout.derived`). The mask is treated as immutable; an in-place edit of
  it is detected through the tensor's version counter and drops the cache.

**Sparsity** is defined here only (:meth:`BlockLayout.sparsity`): the fraction of the *valid* blocks that
are dropped, a block being valid when it holds at least one (query, key) pair the causal region allows
(every block when not causal; the lower block triangle, diagonal included, for causal ``q_len = kv_len``).

:func:`block_mass` is the one block-sum of attention probabilities (magnitude baseline, the attention rule's
calibration, attention-mass recall).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["BlockLayout", "as_layout", "block_mass", "num_blocks"]

_KIND = "der.attention.BlockLayout"


def num_blocks(n: int, block_size: int) -> int:
    """``ceil(n / block_size)``; raises if the sequence is shorter than one block."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if n < block_size:
        raise ValueError(
            f"sequence of {n} tokens is shorter than one block (block_size={block_size}); "
            f"use a block_size ≤ {n} or longer inputs"
        )
    return math.ceil(n / block_size)


def block_mass(probs: torch.Tensor, block_size: int, query_weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""Sum of ``probs: (..., Nq, Nk)`` over each (query block, key block) tile → ``(..., nbq, nbk)`` float64.

    ``query_weight: (..., Nq)`` (broadcastable; e.g. 0/1 for padded queries) weights each query row first:
    :math:`M_{ab} = \sum_{t \in a} w_t \sum_{s \in b} p_{ts}`. Short last blocks sum what they hold.
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() < 2:
        raise ValueError(f"probs must be a (..., Nq, Nk) tensor, got {getattr(probs, 'shape', type(probs))}")
    nq, nk = probs.shape[-2:]
    nbq, nbk = num_blocks(nq, block_size), num_blocks(nk, block_size)
    p = probs.detach().double()
    if query_weight is not None:
        p = p * query_weight.detach().double().unsqueeze(-1)
    p = F.pad(p, (0, nbk * block_size - nk, 0, nbq * block_size - nq))
    return p.reshape(*p.shape[:-2], nbq, block_size, nbk, block_size).sum((-3, -1))


class BlockLayout:
    """A block-sparse attention layout: bool block mask + block size + sequence lengths + causality.

    Build one with :meth:`from_mask` (or the constructor, same arguments); every DER layout function
    returns one.

    Args:
        mask: bool ``(H, nbq, nbk)`` or ``(B, H, nbq, nbk)`` (stored as 4-D).
        block_size: tokens per block (queries and keys).
        seq_len: ``N`` or ``(q_len, kv_len)``; default: whole blocks (``nb * block_size``).
        causal: also mask keys after each query.
        scores: optional float ``(H, nbq, nbk)`` or ``(B or 1, H, nbq, nbk)`` block scores behind the mask.

    Example:
        >>> lay = BlockLayout.from_mask(torch.eye(4, dtype=torch.bool)[None], block_size=16, seq_len=64)
        >>> lay
        BlockLayout(batch=1, heads=1, blocks=4x4, block_size=16, seq_len=64, causal=False, sparsity=0.750)
        >>> lay.to_dense().shape
        torch.Size([1, 1, 64, 64])
    """

    def __init__(self, mask: torch.Tensor, block_size: int, seq_len: int | tuple[int, int] | None = None,
                 causal: bool = False, scores: torch.Tensor | None = None) -> None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = f"{mask.dtype} tensor" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor (H, nbq, nbk) or (B, H, nbq, nbk), got {got}")
        if mask.dim() == 3:
            mask = mask.unsqueeze(0)
        if mask.dim() != 4 or 0 in mask.shape:
            raise ValueError(f"mask must be (H, nbq, nbk) or (B, H, nbq, nbk) with no empty dim, "
                             f"got shape {tuple(mask.shape)}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        nbq, nbk = mask.shape[-2:]
        if seq_len is None:
            seq_len = (nbq * block_size, nbk * block_size)
        q_len, kv_len = (seq_len, seq_len) if isinstance(seq_len, int) else tuple(seq_len)
        for name, n, nb in (("q_len", q_len, nbq), ("kv_len", kv_len, nbk)):
            if not isinstance(n, int) or n < 1 or math.ceil(n / block_size) != nb:
                raise ValueError(f"{name}={n!r} needs ceil({name}/block_size={block_size}) = {nb} blocks "
                                 f"(mask {tuple(mask.shape)}); got {math.ceil(n / block_size) if isinstance(n, int) else n}")
        if causal and q_len > kv_len:
            raise ValueError(f"causal layouts need q_len <= kv_len, got {q_len} > {kv_len}")
        if scores is not None:
            if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
                raise TypeError(f"scores must be a float tensor, got {getattr(scores, 'dtype', type(scores))}")
            if scores.dim() == 3:
                scores = scores.unsqueeze(0)
            if scores.dim() != 4 or scores.shape[1:] != mask.shape[1:] or scores.shape[0] not in (1, mask.shape[0]):
                raise ValueError(f"scores must be (1 or B, H, nbq, nbk) like the mask {tuple(mask.shape)}, "
                                 f"got {tuple(scores.shape)}")
            scores = scores.to(mask.device)
        self._mask, self.scores = mask, scores
        self.block_size, self.q_len, self.kv_len, self.causal = block_size, int(q_len), int(kv_len), bool(causal)
        self._cache: dict[Any, Any] = {}
        self._version = self._mask_version()

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_size: int, seq_len: int | tuple[int, int] | None = None,
                  causal: bool = False, scores: torch.Tensor | None = None) -> BlockLayout:
        """Wrap a bool block mask (the explicit way to turn a bare tensor into a layout)."""
        return cls(mask, block_size, seq_len, causal, scores)

    # ------------------------------------------------------------------------------------------ fields
    @property
    def mask(self) -> torch.Tensor:
        """Bool ``(B or 1, H, nbq, nbk)`` block mask (treat as read-only)."""
        return self._mask

    @property
    def shape(self) -> torch.Size:
        return self._mask.shape

    @property
    def batch(self) -> int:
        return self._mask.shape[0]

    @property
    def heads(self) -> int:
        return self._mask.shape[1]

    @property
    def n_blocks(self) -> tuple[int, int]:
        """``(nbq, nbk)``."""
        return tuple(self._mask.shape[-2:])

    @property
    def seq_len(self) -> int | tuple[int, int]:
        """``N`` when query and key lengths agree, else ``(q_len, kv_len)``."""
        return self.q_len if self.q_len == self.kv_len else (self.q_len, self.kv_len)

    @property
    def device(self) -> torch.device:
        return self._mask.device

    # ------------------------------------------------------------------------------------------ cache
    def _mask_version(self) -> int | None:
        return None if self._mask.is_inference() else self._mask._version

    def derived(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once per ``key`` for this layout (kernel plans, block masks, crops, copies)."""
        v = self._mask_version()
        if v is None:  # an inference tensor has no version counter: in-place edits are invisible, never cache
            return build()
        if v != self._version:  # the mask was edited in place: everything derived from it is stale
            self._cache.clear()
            self._version = v
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # ------------------------------------------------------------------------------------------ structure
    def valid_blocks(self) -> torch.Tensor:
        """Bool ``(nbq, nbk)``: blocks holding at least one (query, key) pair the causal region allows."""
        nbq, nbk = self.n_blocks
        if not self.causal:
            return torch.ones(nbq, nbk, dtype=torch.bool, device=self.device)
        bs, off = self.block_size, self.kv_len - self.q_len
        last_q = torch.clamp((torch.arange(nbq, device=self.device) + 1) * bs, max=self.q_len) - 1 + off
        return (torch.arange(nbk, device=self.device) * bs)[None, :] <= last_q[:, None]

    def kept_blocks(self) -> torch.Tensor:
        """Bool ``(B or 1, H, nbq, nbk)``: the mask restricted to valid blocks (what a kernel computes)."""
        return self._mask & self.valid_blocks()

    def sparsity(self, per_head: bool = False) -> float | torch.Tensor:
        """Fraction of valid blocks dropped (module docstring), over all batch rows and heads, or per
        ``(B or 1, H)`` with ``per_head=True``."""
        nv = int(self.valid_blocks().sum())
        kept = self.kept_blocks().sum((-1, -2)).double()
        if per_head:
            return 1.0 - kept / nv
        return float(1.0 - kept.mean() / nv)

    def density(self) -> float:
        """``1 - sparsity()``: fraction of valid blocks kept."""
        return 1.0 - self.sparsity()

    def to_dense(self) -> torch.Tensor:
        """Element mask bool ``(B or 1, H, q_len, kv_len)`` (True = attend), causal region applied."""
        bs = self.block_size
        m = self._mask.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :self.q_len, :self.kv_len]
        if self.causal:
            m = m & torch.ones(self.q_len, self.kv_len, dtype=torch.bool, device=self.device).tril(
                self.kv_len - self.q_len)
        return m

    # ------------------------------------------------------------------------------------------ derive
    def resize(self, seq_len: int, fill: bool = False) -> BlockLayout:
        """The layout for ``seq_len`` tokens (queries and keys): the top-left crop when shorter; when longer,
        new blocks are ``fill`` (the diagonal of new query rows is always kept, so no row is empty). Cached."""
        if self.q_len != self.kv_len:
            raise ValueError(f"resize needs q_len == kv_len, got {self.q_len}, {self.kv_len}")
        if seq_len == self.q_len:
            return self

        def build() -> BlockLayout:
            nb = num_blocks(seq_len, self.block_size)
            old = self.n_blocks[0]
            if nb <= old:
                sc = None if self.scores is None else self.scores[..., :nb, :nb]
                return BlockLayout(self._mask[..., :nb, :nb], self.block_size, seq_len, self.causal, sc)
            m = torch.full((*self.shape[:2], nb, nb), bool(fill), dtype=torch.bool, device=self.device)
            m[..., :old, :old] = self._mask
            idx = torch.arange(old, nb, device=self.device)
            m[..., idx, idx] = True
            return BlockLayout(m, self.block_size, seq_len, self.causal)

        return self.derived(("resize", seq_len, bool(fill)), build)

    def crop(self, seq_len: int) -> BlockLayout:
        """Top-left crop to ``seq_len <= N`` tokens (raises when longer; see :meth:`resize`)."""
        if seq_len > self.q_len:
            raise ValueError(f"cannot crop a layout of {self.q_len} tokens to {seq_len}; use resize/pad")
        return self.resize(seq_len)

    def pad(self, seq_len: int, fill: bool = False) -> BlockLayout:
        """Grow to ``seq_len >= N`` tokens (new blocks ``fill``, new diagonal blocks kept); see :meth:`resize`."""
        if seq_len < self.q_len:
            raise ValueError(f"cannot pad a layout of {self.q_len} tokens to {seq_len}; use resize/crop")
        return self.resize(seq_len, fill)

    def repeat_heads(self, groups: int) -> BlockLayout:
        """Each head repeated ``groups`` times (grouped-query attention: kv-head layouts for query heads)."""
        if groups == 1:
            return self
        return self.derived(("repeat_heads", groups), lambda: self._with(
            self._mask.repeat_interleave(groups, 1),
            None if self.scores is None else self.scores.repeat_interleave(groups, 1)))

    def to(self, device: torch.device | str) -> BlockLayout:
        """This layout on ``device`` (cached; ``self`` when already there)."""
        device = torch.device(device)
        if device == self.device or (device.index is None and device.type == self.device.type):
            return self
        return self.derived(("to", str(device)), lambda: self._with(
            self._mask.to(device), None if self.scores is None else self.scores.to(device)))

    def cpu(self) -> BlockLayout:
        return self.to("cpu")

    def _with(self, mask: torch.Tensor, scores: torch.Tensor | None = None) -> BlockLayout:
        return BlockLayout(mask, self.block_size, (self.q_len, self.kv_len), self.causal, scores)

    # ------------------------------------------------------------------------------------------ state
    def meta(self) -> dict[str, Any]:
        """JSON-able description (everything but the mask)."""
        return {"block_size": self.block_size, "q_len": self.q_len, "kv_len": self.kv_len, "causal": self.causal}

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a file stores: ``mask`` (uint8) and, when present, ``scores``, on the CPU."""
        out = {"mask": self._mask.cpu().to(torch.uint8).contiguous()}
        if self.scores is not None:
            out["scores"] = self.scores.detach().cpu().contiguous()
        return out

    @classmethod
    def from_meta(cls, mask: torch.Tensor, meta: dict[str, Any], scores: torch.Tensor | None = None) -> BlockLayout:
        """Inverse of :meth:`meta` (``mask`` may be uint8 as stored; ``scores`` optional, as saved)."""
        try:
            return cls(mask.bool(), int(meta["block_size"]), (int(meta["q_len"]), int(meta["kv_len"])),
                       bool(meta["causal"]), scores)
        except KeyError as e:
            raise ValueError(f"layout metadata lacks {e.args[0]!r}: {meta}") from None

    def save(self, path: str | Path) -> Path:
        """Write the layout to one safetensors file (mask, scores if any, metadata), atomically; returns the path."""
        from der._io import save_state

        return save_state(path, self.tensors(), self.meta(), kind=_KIND)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> BlockLayout:
        """Read a file written by :meth:`save` (clear ``ValueError`` for a damaged or foreign file)."""
        from der._io import load_state

        tensors, meta = load_state(path, kind=_KIND)
        if "mask" not in tensors:
            raise ValueError(f"{path}: no 'mask' tensor in the layout file")
        return cls.from_meta(tensors["mask"], meta, tensors.get("scores")).to(device)

    # ------------------------------------------------------------------------------------------ misc
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockLayout):
            return NotImplemented
        return self.meta() == other.meta() and self.shape == other.shape and bool(
            torch.equal(self._mask.cpu(), other._mask.cpu()))

    __hash__ = None  # mutable tensor inside: not hashable

    def __repr__(self) -> str:
        nbq, nbk = self.n_blocks
        seq = self.q_len if self.q_len == self.kv_len else (self.q_len, self.kv_len)
        dev = "" if self.device.type == "cpu" else f", device={self.device}"
        return (f"BlockLayout(batch={self.batch}, heads={self.heads}, blocks={nbq}x{nbk}, "
                f"block_size={self.block_size}, seq_len={seq}, causal={self.causal}, "
                f"sparsity={self.sparsity():.3f}{dev})")


def as_layout(layout: Any, what: str = "layout") -> BlockLayout:
    """``layout`` itself if it is a :class:`BlockLayout`, else a ``TypeError`` pointing to :meth:`BlockLayout.from_mask`."""
    if isinstance(layout, BlockLayout):
        return layout
    got = f"a {layout.dtype} tensor of shape {tuple(layout.shape)}" if isinstance(layout, torch.Tensor) \
        else type(layout).__name__
    raise TypeError(f"{what} must be a der.attention.BlockLayout, got {got}; wrap a bool block mask with "
                    "BlockLayout.from_mask(mask, block_size=..., seq_len=N, causal=...)")
