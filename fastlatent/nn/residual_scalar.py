"""Residual and grouped residual scalar quantisers: vqp's ResidualFSQ, GroupedResidualFSQ, ResidualLFQ and
GroupedResidualLFQ (Algorithm 1 of https://arxiv.org/abs/2107.03312 over FSQ / LFQ layers).

Constructor and forward keywords, defaults, return tuples, quantize dropout (with vqp's random draws, so
the same seed drops the same layers) and ``get_codes_from_indices`` follow vector-quantize-pytorch 1.32.
"""

from __future__ import annotations

import random
from math import ceil

import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.nn.scalar_quantizers import FSQ, LFQ, _binary_codebook_size
from fastlatent.ops.fsq import fsq_indices_to_codes
from fastlatent.ops.residual_fsq import MAX_LAYERS as RESIDUAL_FSQ_MAX_LAYERS
from fastlatent.ops.residual_fsq import residual_fsq


def _dropout_seed(device) -> int:
    """vqp's seed draw (one ``torch.randint`` on ``device``), so a seeded run drops the same layers."""
    rand_int = torch.randint(0, 10_000, (), device=device)
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        torch.distributed.all_reduce(rand_int)
    return int(rand_int.item())


class _ResidualBase(nn.Module):
    """Quantize dropout and index padding shared by ResidualFSQ and ResidualLFQ."""

    def _setup_dropout(self, num_quantizers, quantize_dropout, cutoff_index, multiple_of):
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1, got {num_quantizers}")
        if cutoff_index < 0:
            raise ValueError(f"quantize_dropout_cutoff_index must be >= 0, got {cutoff_index}")
        self.num_quantizers = num_quantizers
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = cutoff_index
        self.quantize_dropout_multiple_of = multiple_of

    def _dropout_index(self, device, seed: int | None) -> int | None:
        """Last layer kept this step (None: no dropout), drawn as vqp draws it."""
        if not (self.training and self.quantize_dropout and torch.is_grad_enabled()):
            return None
        seed = _dropout_seed(device) if seed is None else seed
        index = random.Random(seed).randrange(self.quantize_dropout_cutoff_index, self.num_quantizers)
        if self.quantize_dropout_multiple_of != 1:
            multiple = self.quantize_dropout_multiple_of
            index = ceil((index + 1) / multiple) * multiple - 1
        return index

    def _pad_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``[..., q']`` indices padded with -1 (dropped layers) up to ``num_quantizers``."""
        given = indices.shape[-1]
        if given > self.num_quantizers:
            raise ValueError(
                f"indices have {given} quantizers in the last dim, more than num_quantizers="
                f"{self.num_quantizers}"
            )
        if given < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError(
                    f"indices have {given} of {self.num_quantizers} quantizers: reconstructing "
                    "from fewer (coarser) indices needs quantize_dropout=True"
                )
            indices = F.pad(indices, (0, self.num_quantizers - given), value=-1)
        return indices

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Sum of the codes of ``indices [..., q]`` over the layers, projected out."""
        return self.project_out(self.get_codes_from_indices(indices).sum(0))


class ResidualFSQ(_ResidualBase):
    """Residual FSQ, vqp's ``ResidualFSQ``: ``num_quantizers`` symmetric FSQ layers, layer ``l``
    quantising the residual at scale ``levels^-l``.

    ``forward(x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None)`` returns
    ``(quantized, indices [..., q])`` (``[B, q, ...]`` with ``is_channel_first``), plus the codes of
    every layer ``[q, ..., d]`` with ``return_all_codes``. Other keywords go to each :class:`FSQ`.

    With the default ``bound_hard_clamp=True`` on float32/float64 inputs the whole stack (up to 255
    layers) runs in one pass of the fused :func:`fastlatent.ops.residual_fsq` op after vqp's soft clamp,
    whose gradient is one multiply (the count of layers whose straight-through clamp passed it) rather
    than autograd through every layer; values and indices are bitwise vqp's, and a row holding NaN
    gives NaN and index -1 (vqp: arbitrary indices). Other settings (float16/bfloat16, orthogonal
    rotation, noise dropout in training, ``bound_hard_clamp=False``) run the :class:`FSQ` layers one
    by one (codes formed as :class:`FSQ` forms them, within an ulp of vqp's).

    Differs from vqp: with ``is_channel_first`` and ``return_all_codes``, the codes are computed from
    the channel-last indices (vqp reads the channel-first indices' last axis as the quantizer axis).
    """

    def __init__(
        self,
        *,
        levels: list[int],
        num_quantizers: int,
        dim: int | None = None,
        is_channel_first: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: float | list[float] | torch.Tensor | None = None,
        bound_hard_clamp: bool = True,
        **kwargs,
    ):
        super().__init__()
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1, got {num_quantizers}")
        if kwargs.get("return_indices", True) is not True:
            raise ValueError("ResidualFSQ needs return_indices=True (it returns the indices of every layer)")
        for name in ("preserve_symmetry", "dim"):
            if name in kwargs:
                raise ValueError(f"ResidualFSQ sets {name} of its FSQ layers itself; do not pass it")
        codebook_dim = len(levels)
        dim = codebook_dim if dim is None else dim
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.is_channel_first = is_channel_first
        self.levels = list(levels)
        self.dim = dim
        self.layers = nn.ModuleList(
            [
                FSQ(
                    levels=levels,
                    dim=codebook_dim,
                    preserve_symmetry=True,
                    bound_hard_clamp=bound_hard_clamp,
                    **kwargs,
                )
                for _ in range(num_quantizers)
            ]
        )
        if any(layer.has_projections for layer in self.layers):
            raise ValueError("ResidualFSQ layers must not project (num_codebooks must be 1)")
        self.codebook_size = self.layers[0].codebook_size
        self._setup_dropout(
            num_quantizers, quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of
        )
        levels_tensor = torch.tensor(levels)
        scales = torch.stack([levels_tensor.float() ** -i for i in range(num_quantizers)])
        self.register_buffer("scales", scales, persistent=False)
        if bound_hard_clamp:
            if soft_clamp_input_value is not None:
                raise ValueError(
                    "soft_clamp_input_value is set by bound_hard_clamp=True (to 1 + 1 / "
                    "(levels - 1)); pass bound_hard_clamp=False to choose it"
                )
            soft_clamp_input_value = 1 + (1 / (levels_tensor - 1))
        if isinstance(soft_clamp_input_value, (list, float, int)):
            soft_clamp_input_value = torch.tensor(soft_clamp_input_value)
        self.register_buffer("soft_clamp_input_value", soft_clamp_input_value, persistent=False)
        self.bound_hard_clamp = bound_hard_clamp
        # vqp's code step 2 / (L - 1) is a float32 division by this int tensor
        self.register_buffer("_levels_minus_1", levels_tensor.to(torch.int32) - 1, persistent=False)

    @property
    def codebooks(self) -> torch.Tensor:
        """Implicit codebooks of the layers, unscaled: ``[q, codebook_size, d]``."""
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Scaled codes ``[q, ..., d]`` of channel-last ``indices [..., q']`` (-1: a dropped layer, zero)."""
        indices = self._pad_indices(indices)
        dropped = indices == -1
        if self.bound_hard_clamp:  # vqp's code formula, as the fused forward forms it
            level = self.layers[0].indices_to_level_indices(indices.masked_fill(dropped, 0))
            valid = ((indices >= 0) & (indices < self.codebook_size))[..., None]
            codes = (2.0 / self._levels_minus_1 * level - 1).masked_fill(~valid, float("nan"))
        else:
            codes = fsq_indices_to_codes(indices.masked_fill(dropped, 0), self.levels, True)
        codes = codes.masked_fill(dropped[..., None], 0.0) * self.scales
        return codes.movedim(-2, 0)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        layer = self.layers[0]
        return (
            self.bound_hard_clamp
            and x.dtype in (torch.float32, torch.float64)
            and x.dtype in layer.allowed_dtypes
            and not layer.orthogonal_rotation
            and not (self.training and layer.noise_dropout > 0)
            and self.num_quantizers <= RESIDUAL_FSQ_MAX_LAYERS
        )

    def _fused_stack(self, x: torch.Tensor, dropout_index: int | None):
        """vqp's soft clamp, then every hard-clamped layer of ``x [..., d]`` in one :func:`residual_fsq` pass.

        Returns (quantized sum, indices ``[..., q]``, -1 for layers dropped). Values and indices are
        bitwise vqp's (the op performs vqp's operations in its order, without FMA contraction); the
        gradient is the op's straight-through count of layers whose clamp passed it, times the soft
        clamp's derivative. A row holding NaN gives NaN and index -1 (vqp: arbitrary indices).
        """
        kept = self.num_quantizers if dropout_index is None else dropout_index + 1
        clamp_value = self.soft_clamp_input_value
        bounded = (x / clamp_value).tanh() * clamp_value  # vqp's soft clamp, as vqp computes it
        out, indices = residual_fsq(bounded, self.scales[:kept], self.levels)
        if kept < self.num_quantizers:
            indices = F.pad(indices, (0, self.num_quantizers - kept), value=-1)
        return out, indices

    def _layered_stack(self, x: torch.Tensor, dropout_index: int | None):
        out, indices = 0.0, []
        residual = x
        for layer_index, (layer, scale) in enumerate(zip(self.layers, self.scales)):
            if dropout_index is not None and layer_index > dropout_index:
                indices.append(torch.full(x.shape[:-1], -1, dtype=torch.long, device=x.device))
                continue
            quantized, layer_indices = layer._quantize_tokens(residual / scale)
            quantized = quantized * scale
            residual = residual - quantized.detach()
            out = out + quantized
            indices.append(layer_indices)
        return out, indices

    def forward(
        self,
        x: torch.Tensor,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        if self.is_channel_first:
            if x.dim() < 2:
                raise ValueError(f"is_channel_first input must be [B, C, ...], got shape {list(x.shape)}")
            x = x.movedim(1, -1)
        if x.dim() < 1 or x.shape[-1] != self.dim:
            where = "dim 1 (is_channel_first)" if self.is_channel_first else "the last dim"
            raise ValueError(f"expected {self.dim} features in {where}, got shape {list(x.shape)}")
        x = self.project_in(x)
        dropout_index = self._dropout_index(x.device, rand_quantize_dropout_fixed_seed)
        if self._fused_ok(x):
            out, indices = self._fused_stack(x, dropout_index)
        else:
            if self.soft_clamp_input_value is not None:
                clamp_value = self.soft_clamp_input_value
                x = (x / clamp_value).tanh() * clamp_value
            out, indices = self._layered_stack(x, dropout_index)
            indices = torch.stack(indices, dim=-1)
        out = self.project_out(out)
        codes_indices = indices
        if self.is_channel_first:
            out = out.movedim(-1, 1)
            indices = indices.movedim(-1, 1)
        if not return_all_codes:
            return out, indices
        return out, indices, self.get_codes_from_indices(codes_indices)


class ResidualLFQ(_ResidualBase):
    """Residual LFQ, vqp's ``ResidualLFQ``: ``num_quantizers`` :class:`LFQ` layers, layer ``l`` with
    ``codebook_scale = 2^-l`` (and half the previous ``soft_clamp_input_value``).

    ``forward(x, mask=None, return_all_codes=False, rand_quantize_dropout_fixed_seed=None)`` returns
    ``(quantized, indices [..., q], aux_losses [q])`` (plus the codes ``[q, ..., d]`` with
    ``return_all_codes``); ``x`` is channel-last. Other keywords go to each layer. Each layer uses the
    fused sign quantiser and entropy kernels (no N x 2^d soft assignment).
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: float | None = None,
        **kwargs,
    ):
        super().__init__()
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1, got {num_quantizers}")
        for name in ("dim", "codebook_scale"):
            if name in kwargs:
                raise ValueError(f"ResidualLFQ sets {name} of its LFQ layers itself; do not pass it")
        codebook_size = _binary_codebook_size("ResidualLFQ", None, codebook_size)
        codebook_dim = codebook_size.bit_length() - 1
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.dim = dim
        layers = []
        for ind in range(num_quantizers):
            layers.append(
                LFQ(
                    dim=codebook_dim,
                    codebook_scale=2**-ind,
                    soft_clamp_input_value=soft_clamp_input_value,
                    **kwargs,
                )
            )
            if soft_clamp_input_value is not None:
                soft_clamp_input_value *= 0.5
        self.layers = nn.ModuleList(layers)
        if any(layer.has_projections for layer in self.layers):
            raise ValueError("ResidualLFQ layers must not project (num_codebooks must be 1)")
        self.codebook_size = codebook_size
        self._setup_dropout(
            num_quantizers, quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of
        )

    @property
    def codebooks(self) -> torch.Tensor:
        """Every layer's codebook ``[q, codebook_size, d]`` (as vqp: +-scale codes, not sphere-projected)."""
        return torch.stack([layer.codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes ``[q, ..., d]`` of channel-last ``indices [..., q']`` (-1: a dropped layer, zero)."""
        indices = self._pad_indices(indices)
        dropped = indices == -1
        codes = [
            layer.indices_to_codes(
                indices[..., q].masked_fill(dropped[..., q], 0), project_out=False
            ).masked_fill(dropped[..., q, None], 0.0)
            for q, layer in enumerate(self.layers)
        ]
        return torch.stack(codes)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"expected {self.dim} features in the last dim, got shape {list(x.shape)}")
        x = self.project_in(x)
        dropout_index = self._dropout_index(x.device, rand_quantize_dropout_fixed_seed)
        out, residual, indices, losses = 0.0, x, [], []
        for layer_index, layer in enumerate(self.layers):
            if dropout_index is not None and layer_index > dropout_index:
                indices.append(torch.full(x.shape[:-1], -1, dtype=torch.long, device=x.device))
                losses.append(torch.zeros((), device=x.device, dtype=x.dtype))
                continue
            quantized, layer_indices, loss = layer(residual, mask=mask)
            residual = residual - quantized.detach()
            out = out + quantized
            indices.append(layer_indices)
            losses.append(loss)
        out = self.project_out(out)
        indices, losses = torch.stack(indices, dim=-1), torch.stack(losses, dim=-1)
        if not return_all_codes:
            return out, indices, losses
        return out, indices, losses, self.get_codes_from_indices(indices)


class _GroupedBase(nn.Module):
    def _setup_groups(self, owner, dim, groups, accept_image_fmap, make):
        if groups < 1 or dim % groups:
            raise ValueError(f"{owner}: dim={dim} must be divisible by groups={groups}")
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = accept_image_fmap
        self.rvqs = nn.ModuleList([make(dim // groups) for _ in range(groups)])
        self.codebook_size = self.rvqs[0].codebook_size

    @property
    def codebooks(self) -> torch.Tensor:
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices [groups, ..., q]`` -> codes ``[groups, q, ..., d / groups]``."""
        return torch.stack([rvq.get_codes_from_indices(chunk) for rvq, chunk in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [rvq.get_output_from_indices(chunk) for rvq, chunk in zip(self.rvqs, indices)], dim=self.split_dim
        )

    def _chunks(self, x: torch.Tensor):
        if x.dim() < 2 or x.shape[self.split_dim] != self.dim:
            raise ValueError(
                f"expected {self.dim} features in dim {self.split_dim}, got shape {list(x.shape)}"
            )
        return x.chunk(self.groups, dim=self.split_dim)

    def _seed(self, x: torch.Tensor) -> int | None:
        return _dropout_seed(x.device) if self.training else None


class GroupedResidualFSQ(_GroupedBase):
    """vqp's ``GroupedResidualFSQ``: the features split into ``groups``, a :class:`ResidualFSQ` per group.
    ``forward`` returns ``(quantized, indices [groups, ..., q])`` (plus codes with ``return_all_codes``)."""

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        self._setup_groups(
            "GroupedResidualFSQ", dim, groups, accept_image_fmap, lambda d: ResidualFSQ(dim=d, **kwargs)
        )

    def forward(self, x: torch.Tensor, return_all_codes: bool = False):
        seed = self._seed(x)
        out = [
            rvq(chunk, return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=seed)
            for rvq, chunk in zip(self.rvqs, self._chunks(x))
        ]
        quantized, indices, *codes = zip(*out)
        return (torch.cat(quantized, dim=self.split_dim), torch.stack(indices), *codes)


class GroupedResidualLFQ(_GroupedBase):
    """vqp's ``GroupedResidualLFQ``: a :class:`ResidualLFQ` per feature group. ``forward(x, mask=None,
    return_all_codes=False)`` returns ``(quantized, indices [groups, ..., q], aux_losses [groups, q])``."""

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        self._setup_groups(
            "GroupedResidualLFQ", dim, groups, accept_image_fmap, lambda d: ResidualLFQ(dim=d, **kwargs)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_all_codes: bool = False):
        seed = self._seed(x)
        out = [
            rvq(chunk, mask=mask, return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=seed)
            for rvq, chunk in zip(self.rvqs, self._chunks(x))
        ]
        quantized, indices, losses, *codes = zip(*out)
        return (torch.cat(quantized, dim=self.split_dim), torch.stack(indices), torch.stack(losses), *codes)
