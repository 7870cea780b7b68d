"""k-means on the fused ops: nearest_code for assignment, code_stats for the update."""

from __future__ import annotations

import math
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
    if x.device.type != "cpu":
        return _kmeans_plus_plus_on_device(x, k, metric, generator)
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


def _kmeans_plus_plus_on_device(x: torch.Tensor, k: int, metric: str, generator) -> torch.Tensor:
    """kmeans++ without a host round trip per centre: the uniforms (and the fallback rows) are drawn from the
    CPU generator up front and moved once; each draw is an inverse-CDF lookup (``searchsorted`` over the
    fp64 cumulative D^2 weights) on the device, so the loop queues work and never waits for it. Same
    distribution as the CPU path (whose draws use ``torch.multinomial``), different random stream."""
    n = x.shape[0]
    first = torch.randint(0, n, (1,), generator=generator, device="cpu")
    uniforms = torch.rand(max(k - 1, 0), generator=generator, dtype=torch.float64, device="cpu")
    fallback = torch.randint(0, n, (max(k - 1, 0),), generator=generator, device="cpu")
    first, uniforms, fallback = first.to(x.device), uniforms.to(x.device), fallback.to(x.device)
    chosen = [first]
    _, best = nearest_code(x, x.index_select(0, first), metric)
    for step in range(k - 1):
        weights = best.double().clamp_min(0)
        cumulative = weights.cumsum(0)
        total = cumulative[-1:]
        drawn = torch.searchsorted(cumulative, uniforms[step : step + 1] * total, right=True).clamp_max(n - 1)
        usable = torch.isfinite(total) & (total > 0)  # as the CPU path: all-zero or non-finite -> uniform row
        choice = torch.where(usable, drawn, fallback[step : step + 1])
        chosen.append(choice)
        _, dist = nearest_code(x, x.index_select(0, choice), metric)
        best = torch.minimum(best, dist)
    return x.index_select(0, torch.cat(chosen))


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

    Raises:
        TypeError for a non-floating ``x`` (integer, bool, complex); ValueError for NaN or Inf in
        ``x`` or values beyond the float32 range. Data of any other magnitude clusters correctly:
        beyond 2^32 it is scaled down by a power of two for the distance computations (exact) and
        the centres scaled back.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(
            f"fastlatent.kmeans: x must be a real floating-point tensor (float32, float16, "
            f"bfloat16 or float64), got {what}"
        )
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
    x, scale = _scaled_to_safe_range(x)
    x = x.float()
    if metric == "cosine":
        x = F.normalize(x, dim=-1)
        scale = 1.0
    centres = (
        _kmeans_plus_plus(x, num_clusters, metric, generator)
        if init == "kmeans++"
        else _sample_rows(x, num_clusters, generator)
    ).clone()
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
    return (centres if scale == 1.0 else centres * scale), counts


# Squared l2 distances of fp32 rows overflow once D * max|x|^2 nears 3.4e38 (max|x| ~ 1e19 for D = 1): every
# distance is then inf and every row lands in cluster 0. k-means is equivariant under scaling, and a power of
# two scales fp32 values exactly, so data beyond this bound is run at a smaller scale and the centres scaled
# back: the same clustering, bit for bit, as an unbounded fp32 would give.
_SAFE_MAGNITUDE = 2.0**32


def _scaled_to_safe_range(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(x / s, s)`` with ``s`` a power of two that brings max|x| below 2^32 (``s = 1`` when it already is).
    Raises ValueError for non-finite input (one host sync: k-means initialisation is a one-off)."""
    if x.numel() == 0:
        return x, 1.0
    peak = x.abs().amax().item()
    if not math.isfinite(peak):
        raise ValueError("fastlatent.kmeans: x holds NaN or Inf values (drop non-finite rows first)")
    if peak > torch.finfo(torch.float32).max:
        raise ValueError(
            f"fastlatent.kmeans: x holds values beyond the float32 range (max |x| = "
            f"{peak:.3g}), which the float32 centres cannot represent"
        )
    if peak < _SAFE_MAGNITUDE:
        return x, 1.0
    scale = 2.0 ** (math.frexp(peak)[1] - 1)  # peak / scale in [1, 2)
    return x / scale, scale
