"""Anchor initialization: k-means++ seeding, random subsets, FAISS k-means (extra `faiss`).

The paper (Sec. 3, App. F) initializes anchors with k-means++ or random subsets; FAISS is its tool for
large sets (App. A, G.11).
"""

from __future__ import annotations

import torch

INIT_METHODS = ("kmeans++", "random", "faiss")
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


def init_anchors(x: torch.Tensor, k: int, method: str, seed: int) -> torch.Tensor:
    """Anchors ``(k, d)`` from data ``x: (N, d)`` by ``method`` in :data:`INIT_METHODS`."""
    if method not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {method!r}")
    x = x.detach().reshape(-1, x.shape[-1])
    gen = torch.Generator().manual_seed(seed)
    if method == "faiss":
        return faiss_kmeans(x, k, seed)
    x = x.cpu()
    return kmeans_plus_plus(x, k, gen) if method == "kmeans++" else random_subset(x, k, gen)
