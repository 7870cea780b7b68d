"""Reference nearest_code: float64 keys, torch.argmin, same tie and NaN rules as the kernels."""

from __future__ import annotations

import torch

from fastlatent.ops.nearest_code import check_nearest_code_args

_EPS = 1e-12


def nearest_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    precision: str = "ieee",
    chunk_rows: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth for :func:`fastlatent.ops.nearest_code`.

    Keys are computed in float64 (``|c|^2 - 2<x, c>`` for l2, ``-<x, c/|c|>`` for cosine), so
    the chosen index is exact up to float64 rounding; ties go to the lowest index
    (:func:`torch.argmin`). Keys of rows or codes holding NaN/Inf are NaN, and NaN wins,
    lowest index first. Distances are recomputed directly in float32. Memory is bounded by
    processing ``chunk_rows`` rows of ``x`` at a time. ``precision`` is accepted for signature
    parity and ignored: the reference is always exact. Batched ``[B, N, D]`` against
    ``[B, K, D]`` runs the ``B`` searches one by one.
    """
    check_nearest_code_args(x, codebook, metric, precision)
    if x.dim() == 3:  # batched: independent searches
        pairs = [nearest_code(x[b], codebook[b], metric, precision, chunk_rows) for b in range(x.shape[0])]
        if not pairs:
            rows = x.shape[:-1]
            return x.new_empty(rows, dtype=torch.int64), x.new_empty(rows, dtype=torch.float32)
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    c64 = codebook.double()
    code_bad = ~torch.isfinite(c64).all(dim=1)
    if metric == "l2":
        alpha, beta = -2.0, (c64 * c64).sum(dim=1)
    else:
        alpha, beta = -1.0 / c64.norm(dim=1).clamp_min(_EPS), torch.zeros_like(c64[:, 0])
    beta = beta.masked_fill(code_bad, float("nan"))

    indices = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], chunk_rows):
        x64 = x[start : start + chunk_rows].double()
        keys = beta + alpha * (x64 @ c64.T)
        keys[~torch.isfinite(x64).all(dim=1)] = float("nan")
        indices[start : start + chunk_rows] = keys.argmin(dim=1)

    xf, cf = x.float(), codebook.float()[indices]
    if metric == "l2":
        distances = ((xf - cf) ** 2).sum(dim=1)
    else:
        denom = xf.norm(dim=1).clamp_min(_EPS) * cf.norm(dim=1).clamp_min(_EPS)
        distances = 1.0 - (xf * cf).sum(dim=1) / denom
    return indices, distances
