"""k-means on the fused ops: nearest_code for assignment, code_stats for the update."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fastlatent.ops.code_stats import code_stats
from fastlatent.ops.nearest_code import nearest_code

INITS = ("kmeans++", "random")


def _sample_rows(x: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    n = x.shape[0]
    if n >= count:
        picks = torch.randperm(n, generator=generator, device="cpu")[:count]
    else:
        picks = torch.randint(0, n, (count,), generator=generator, device="cpu")
    return x[picks.to(x.device)]


def _kmeans_plus_plus(x: torch.Tensor, k: int, metric: str, generator) -> torch.Tensor:
    """Arthur & Vassilvitskii (2007): each next centre drawn with probability ~ D(x)^2."""
    n = x.shape[0]
    first = torch.randint(0, n, (1,), generator=generator, device="cpu").item()
    centres = [x[first]]
    _, best = nearest_code(x, x[first : first + 1], metric)
    for _ in range(1, k):
        weights = best.double().clamp_min(0).cpu()
        if not torch.isfinite(weights).all() or weights.sum() <= 0:
            choice = torch.randint(0, n, (1,), generator=generator).item()
        else:
            choice = torch.multinomial(weights, 1, generator=generator).item()
        centres.append(x[choice])
        _, dist = nearest_code(x, x[choice : choice + 1], metric)
        best = torch.minimum(best, dist)
    return torch.stack(centres)


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    num_iters: int = 10,
    init: str = "kmeans++",
    metric: str = "l2",
    generator: torch.Generator | None = None,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means over the rows of ``x`` (for codebook initialisation).

    Args:
        x: ``[N, D]`` float32/float16/bfloat16 samples (math in fp32).
        num_clusters: ``K >= 1``.
        num_iters: Lloyd iterations after the initialisation (``>= 0``).
        init: ``"kmeans++"`` (D^2 sampling, better starts; K sequential passes over x) or
            ``"random"`` (K distinct rows, or with replacement when N < K).
        metric: ``"l2"`` or ``"cosine"`` (spherical k-means: centres are renormalised).
        generator: CPU ``torch.Generator`` for reproducible initialisation.
        all_reduce: called in place on the per-iteration counts and sums, for example
            ``torch.distributed.all_reduce``, so every process computes the same centres from
            its shard. The initial centres must then be made equal across processes by the
            caller (e.g. a broadcast), as :class:`fastlatent.nn.VectorQuantize` does.

    Returns:
        ``(centres [K, D] float32, counts [K] float32)``: the counts are those of the last
        assignment. A cluster that receives no rows keeps its previous centre.
    """
    if x.dim() != 2:
        raise ValueError(f"fastlatent.kmeans: x must be 2-D [N, D], got shape {list(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError("fastlatent.kmeans: x must hold at least one row")
    if num_clusters < 1:
        raise ValueError(f"fastlatent.kmeans: num_clusters must be >= 1, got {num_clusters}")
    if num_iters < 0:
        raise ValueError(f"fastlatent.kmeans: num_iters must be >= 0, got {num_iters}")
    if init not in INITS:
        raise ValueError(f'fastlatent.kmeans: init must be "kmeans++" or "random", got "{init}"')
    x = x.float()
    if metric == "cosine":
        x = F.normalize(x, dim=-1)
    centres = (_kmeans_plus_plus(x, num_clusters, metric, generator) if init == "kmeans++"
               else _sample_rows(x, num_clusters, generator)).clone()
    counts = torch.zeros(num_clusters, device=x.device)
    for _ in range(num_iters):
        indices, _ = nearest_code(x, centres, metric)
        counts, sums = code_stats(x, indices, num_clusters)
        if all_reduce is not None:
            all_reduce(counts)
            all_reduce(sums)
        means = sums / counts.clamp_min(1)[:, None]
        if metric == "cosine":
            means = F.normalize(means, dim=-1)
        centres = torch.where((counts > 0)[:, None], means, centres)
    if num_iters == 0:
        counts, _ = code_stats(x, nearest_code(x, centres, metric)[0], num_clusters)
    return centres, counts
