"""Reference Lloyd iteration: one k-means step written with cdist and index_add."""

from __future__ import annotations

import torch


def kmeans_step(x: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One l2 Lloyd step from ``centres``: returns (new centres, counts); empty clusters stay."""
    x64, c64 = x.double(), centres.double()
    indices = torch.cdist(x64, c64).argmin(dim=1)
    counts = torch.zeros(len(centres), dtype=torch.float64).index_add_(
        0, indices, torch.ones(len(x), dtype=torch.float64)
    )
    sums = torch.zeros_like(c64).index_add_(0, indices, x64)
    means = sums / counts.clamp_min(1)[:, None]
    return torch.where((counts > 0)[:, None], means, c64).float(), counts.float()
