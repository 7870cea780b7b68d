"""Latent quantisation (Hsu et al., https://arxiv.org/abs/2305.18378): vqp's ``LatentQuantize``."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class LevelsError(ValueError, RuntimeError):
    """A bad ``levels``/``codebook_dim`` pair: a ValueError, and a RuntimeError as vqp raises there."""


class LatentQuantize(nn.Module):
    """Per-dimension scalar codebooks of learnable values: vqp's ``LatentQuantize`` (same keywords, defaults).

    Each latent dim ``i`` has ``levels[i]`` values (initialised evenly in [-0.5, 0.5], zero in the middle);
    a latent snaps to its nearest value with a straight-through gradient. ``forward(z)`` takes
    channel-first ``z [B, dim, ...]`` (always, as vqp) and returns ``(out, indices, loss)`` with
    ``loss = commitment_loss_weight * mse(z.detach(), out) + quantization_loss_weight * mse(out.detach(), z)``
    in training (0 in eval). ``values_per_latent`` are parameters when ``optimize_values`` (train them
    with your optimiser), fixed tensors otherwise.

    Differs from vqp: ``indices`` are int64, the mixed-radix index of the chosen value positions (vqp
    derives it from the chosen values through the initial grid: the same while the values sit on it);
    ``indices_to_codes`` returns the current ``values_per_latent`` at those positions (vqp: the initial
    grid, which for e.g. 7 levels differs from the forward's values in the last bit), and NaN for
    indices outside ``[0, codebook_size)`` (vqp wraps them around). ``in_place_codebook_optimizer`` is
    refused: vqp 1.32's forward fails with it (``optimize_values`` is never stored).
    """

    def __init__(
        self,
        levels: list[int] | int,
        dim: int,
        commitment_loss_weight: float | None = 0.1,
        quantization_loss_weight: float | None = 0.1,
        num_codebooks: int = 1,
        codebook_dim: int = -1,
        keep_num_codebooks_dim: bool | None = None,
        optimize_values: bool | None = True,
        in_place_codebook_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    ):
        super().__init__()
        if in_place_codebook_optimizer is not None:
            raise ValueError(
                "in_place_codebook_optimizer is not supported (vector-quantize-pytorch 1.32 "
                "fails with it too); use optimize_values=True and put values_per_latent in your "
                "optimiser"
            )
        if isinstance(levels, int):
            if codebook_dim < 1:
                raise LevelsError(f"levels given as an int needs codebook_dim >= 1, got {codebook_dim}")
            levels = [levels] * codebook_dim
        levels = list(levels)
        if not levels or any(not isinstance(level, int) or level < 2 for level in levels):
            raise ValueError(f"levels must be ints >= 2, got {levels}")
        if codebook_dim > 0 and codebook_dim != len(levels):
            raise ValueError(f"codebook_dim={codebook_dim} differs from len(levels)={len(levels)}")
        self.dim = dim
        self.levels = levels
        self.in_place_codebook_optimizer = None
        self.register_buffer(
            "commitment_loss_weight", torch.tensor(commitment_loss_weight or 0.0), persistent=False
        )
        self.register_buffer(
            "quantization_loss_weight", torch.tensor(quantization_loss_weight or 0.0), persistent=False
        )
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer(
            "_basis", torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.int64), 0), persistent=False
        )
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        keep = keep_num_codebooks_dim if keep_num_codebooks_dim else num_codebooks > 1
        if num_codebooks > 1 and not keep:
            raise ValueError("keep_num_codebooks_dim must be True when num_codebooks > 1")
        self.keep_num_codebooks_dim = keep
        self.has_projections = dim != self.effective_codebook_dim
        inner = self.effective_codebook_dim
        self.project_in = nn.Linear(dim, inner) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if self.has_projections else nn.Identity()
        self.codebook_size = int(torch.tensor(levels).prod())
        values = [
            torch.linspace(-0.5, 0.5, level) if level % 2 == 1 else torch.arange(level) / level - 0.5
            for level in levels
        ]
        self.optimize_values = bool(optimize_values)
        if optimize_values:
            self.values_per_latent = nn.ParameterList([nn.Parameter(v) for v in values])
        else:
            self.values_per_latent = values

    @property
    def implicit_codebook(self) -> torch.Tensor:
        """Codes of every index on the initial grid, ``[codebook_size, codebook_dim]``."""
        idx = torch.arange(self.codebook_size, device=self._levels.device)
        return self._grid_codes(self.indices_to_level_indices(idx))

    def _grid_codes(self, level_indices: torch.Tensor) -> torch.Tensor:
        half_width = self._levels // 2
        return (level_indices - half_width) / half_width / 2

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Per-dim level positions ``[..., codebook_dim]``; -1 for indices outside ``[0, codebook_size)``."""
        indices = indices.long()
        valid = (indices >= 0) & (indices < self.codebook_size)
        levels = (indices[..., None] // self._basis) % self._levels
        return levels.masked_fill(~valid[..., None], -1)

    def quantize_with_indices(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest value per latent dim of ``z [..., codebook_dim]``: (straight-through values, positions)."""
        positions, values = [], []
        for i in range(self.codebook_dim):
            table = self.values_per_latent[i].to(z.device)
            position = (z[..., i, None] - table).abs().argmin(-1)
            positions.append(position)
            values.append(table[position])
        quantized = torch.stack(values, dim=-1)
        return z + (quantized - z).detach(), torch.stack(positions, dim=-1)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        return self.quantize_with_indices(z)[0]

    def quantization_loss(self, z: torch.Tensor, zhat: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        return F.mse_loss(zhat.detach(), z, reduction=reduce)

    def commitment_loss(self, z: torch.Tensor, zhat: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        return F.mse_loss(z.detach(), zhat, reduction=reduce)

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Codes (values) of ``indices``, projected out, channel-first ``[B, d, ...]`` (as vqp)."""
        level_indices = self.indices_to_level_indices(indices)
        valid = level_indices >= 0
        positions = level_indices.clamp_min(0)
        codes = torch.stack(
            [
                self.values_per_latent[i].to(indices.device)[positions[..., i]]
                for i in range(self.codebook_dim)
            ],
            dim=-1,
        )
        codes = codes.detach().masked_fill(~valid, float("nan"))
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        return codes.movedim(-1, 1)

    def forward(self, z: torch.Tensor):
        if z.dim() < 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected channel-first input [B, {self.dim}, ...], got shape {list(z.shape)}")
        original_input = z
        z = self.project_in(z.movedim(1, -1)).unflatten(-1, (self.num_codebooks, self.codebook_dim))
        codes, positions = self.quantize_with_indices(z)
        indices = (positions * self._basis).sum(-1)
        out = self.project_out(codes.flatten(-2)).movedim(-1, 1)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        zero = torch.zeros((), device=z.device)
        commitment = quantization = zero
        if self.training:
            if self.commitment_loss_weight != 0:
                commitment = self.commitment_loss(original_input, out)
            if self.quantization_loss_weight != 0:
                quantization = self.quantization_loss(original_input, out)
        loss = self.commitment_loss_weight * commitment + self.quantization_loss_weight * quantization
        return out, indices, loss
