"""Reference sample_code: float64 logits, the kernels' Philox Gumbel noise (float64 logs), torch.argmax."""

from __future__ import annotations

import numpy as np
import torch

from fastlatent.ops.sample_code import check_sample_code_args
from fastlatent.reference.sampler_steps import philox_words

_EPS = 1e-12
_MIN_SQUARED_DISTANCE = 1e-8


def sample_code_noise(seed: int, offset: int, start: int, count: int) -> torch.Tensor:
    """Elements ``[start, start + count)`` of the kernels' Gumbel stream at ``(seed, offset)``, float64.

    ``u = ((word >> 9) + 0.5) / 2^23`` of Philox word ``e % 4`` of counter group ``e // 4``, then
    ``-ln(-ln u)`` in float64 (the kernels' fp32 logarithm agrees to about 1e-6)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.float64)
    first, last = start // 4, (start + count - 1) // 4
    words = philox_words(int(seed) % 2**64, int(offset) % 2**64, last - first + 1, first).reshape(-1)
    words = words[start - 4 * first : start - 4 * first + count]
    u = ((words >> np.uint64(9)).astype(np.float64) + 0.5) * 2.0**-23
    return torch.from_numpy(-np.log(-np.log(u)))


def sample_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float = 1.0,
    seed: int = 0,
    offset: int = 0,
    metric: str = "l2",
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """Ground truth for :func:`fastlatent.ops.sample_code` (explicit ``seed`` required).

    Logits in float64 (``-sqrt(max(|x - c|^2 expanded, 1e-8))`` or cosine similarity), plus the
    kernels' noise, then :func:`torch.argmax` (ties: lowest index; NaN wins). Rows holding NaN/Inf
    get index 0. ``chunk_rows`` rows at a time.
    """
    check_sample_code_args(x, codebook, temperature, seed, offset, metric)
    if x.dim() == 2:
        return sample_code(x[None], codebook[None], temperature, seed, offset, metric, chunk_rows)[0]
    b, n, _ = x.shape
    k = codebook.shape[1]
    out = torch.zeros(b, n, dtype=torch.int64, device=x.device)
    for h in range(b):
        c64 = codebook[h].double()
        code_bad = ~torch.isfinite(c64).all(dim=1)
        c_norm2 = (c64 * c64).sum(1)
        for start in range(0, n, chunk_rows):
            x64 = x[h, start : start + chunk_rows].double()
            dot = x64 @ c64.T
            if metric == "l2":
                sq = (x64 * x64).sum(1, keepdim=True) + c_norm2 - 2 * dot
                logits = -sq.clamp_min(_MIN_SQUARED_DISTANCE).sqrt()
            else:
                logits = dot / (
                    x64.norm(dim=1, keepdim=True).clamp_min(_EPS) * c_norm2.sqrt().clamp_min(_EPS)
                )
            logits[:, code_bad] = float("nan")
            rows = x64.shape[0]
            noise = sample_code_noise(seed, offset, (h * n + start) * k, rows * k).reshape(rows, k)
            keys = logits / temperature + noise.to(logits.device)
            idx = keys.argmax(dim=1)
            idx[~torch.isfinite(x64).all(dim=1)] = 0
            out[h, start : start + rows] = idx
    return out
