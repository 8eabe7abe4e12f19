"""Anchor initialization: k-means++ seeding, random subsets, FAISS k-means (extra `faiss`).

The paper (Sec. 3, App. F) initializes anchors with k-means++ or random subsets; FAISS is its tool for
large sets (App. A, G.11). One meaning of each name, for point sets and attention keys alike:

* ``"random"`` (alias ``"data"``): k distinct data points (App. A: as good as k-means++ for attention);
* ``"kmeans++"``: k-means++ seeding; ``"faiss"``: FAISS Lloyd k-means;
* ``"normal"``: no data; the anchors keep their standard-normal draw.
"""

from __future__ import annotations

import torch

__all__ = ["INIT_METHODS", "check_init", "faiss_kmeans", "init_anchors", "kmeans_plus_plus", "random_subset", "seed_points"]

INIT_METHODS = ("kmeans++", "random", "data", "faiss", "normal")
_MAX_INIT_POINTS = 20_000  # seeding on a random subset keeps init O(k · 20k · d)


def _subset(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    return x[torch.randperm(x.shape[0], generator=gen)[:n]]


def random_subset(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct points of ``x: (N, d)`` (with replacement only when k > N)."""
    n = x.shape[0]
    idx = torch.randperm(n, generator=gen)[:k] if k <= n else torch.randint(n, (k,), generator=gen)
    return x[idx].clone()


def kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) on ``x: (N, d)`` → ``(k, d)``.

    When k exceeds the number of distinct points, the remaining seeds repeat points (H stays defined).
    """
    x = _subset(x, _MAX_INIT_POINTS, gen)
    centers = [x[torch.randint(x.shape[0], (1,), generator=gen)].squeeze(0)]
    d2 = ((x - centers[0]) ** 2).sum(-1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # every point already coincides with a centre
            centers.append(x[torch.randint(x.shape[0], (1,), generator=gen)].squeeze(0))
            continue
        i = torch.multinomial(d2 / total, 1, generator=gen)
        centers.append(x[i].squeeze(0))
        d2 = torch.minimum(d2, ((x - centers[-1]) ** 2).sum(-1))
    return torch.stack(centers).clone()


def faiss_kmeans(x: torch.Tensor, k: int, seed: int, niter: int = 20) -> torch.Tensor:
    """Lloyd k-means by FAISS (extra ``faiss``) → ``(k, d)`` centroids."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ImportError("init='faiss' needs the `faiss` extra: pip install 'der[faiss]'") from e
    data = x.detach().to(torch.float32).cpu().contiguous().numpy()
    if k > data.shape[0]:
        raise ValueError(f"init='faiss' needs k ≤ N, got k={k} > N={data.shape[0]}; use 'kmeans++'")
    km = faiss.Kmeans(data.shape[1], k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1)
    km.train(data)
    return torch.from_numpy(km.centroids.copy()).to(x.dtype)


def check_init(method: str) -> None:
    """Raise ``ValueError`` unless ``method`` is in :data:`INIT_METHODS`."""
    if method not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {method!r}")


def init_anchors(x: torch.Tensor, k: int, method: str, seed: int) -> torch.Tensor:
    """Anchors ``(k, d)`` from data ``x: (N, d)`` by a data-dependent ``method`` of :data:`INIT_METHODS`."""
    return seed_points(x.reshape(-1, x.shape[-1]), k, method, seed)


def seed_points(x: torch.Tensor, k: int, method: str, seed: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Anchors ``(*G, k, d)`` from ``G`` point groups ``x: (*G, M, d)`` (``valid: (M,)`` bool keeps points).

    ``"random"`` picks the same k point indices in every group (a group is a head of one layer: the
    anchors are the keys of k tokens); with fewer valid points than k it samples with replacement and
    jitters the duplicates so that they can separate. ``"kmeans++"``/``"faiss"`` seed each group on its own.
    """
    check_init(method)
    if method == "normal":
        raise ValueError("init='normal' takes no data; it keeps the anchors' standard-normal draw")
    x = x.detach()
    if valid is not None:
        x = x[..., valid.to(x.device), :]
    if x.shape[-2] == 0:
        raise ValueError("cannot seed anchors from an empty point set")
    gen = torch.Generator().manual_seed(seed)
    if method in ("random", "data"):
        n = x.shape[-2]
        replace = n < k
        idx = torch.randint(n, (k,), generator=gen) if replace else torch.randperm(n, generator=gen)[:k]
        out = x.index_select(-2, idx.to(x.device)).clone()
        if replace:
            noise = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out)
            out = out + 1e-3 * out.float().std().clamp_min(1e-6).to(out) * noise
        return out
    groups = x.reshape(-1, *x.shape[-2:])
    if method == "faiss":
        seeds = [faiss_kmeans(g, k, seed) for g in groups]
    else:
        seeds = [kmeans_plus_plus(g.cpu(), k, gen) for g in groups]
    return torch.stack(seeds).reshape(*x.shape[:-2], k, x.shape[-1]).to(x)
