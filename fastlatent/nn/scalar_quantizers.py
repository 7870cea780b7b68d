"""Scalar quantisers as nn.Modules: FSQ, LFQ and BSQ over fastlatent's fused ops.

Constructor names, defaults and return tuples follow vector-quantize-pytorch (vqp) 1.32 where
they make sense; each class says where it differs. Common differences:

* Layout is never guessed from ``ndim``: vqp moves channels last for any input of 4 or more
  dims; here that happens only with ``channel_first=True`` (channel dim 1), otherwise the last
  dim is the feature dim and any number of leading dims is fine.
* Indices are int64 (vqp: int32 for FSQ), with -1 for rows holding NaN.
* The quantisation math is fp32 for every input dtype (vqp's ``force_quantization_f32``) and
  is always on; outputs keep the input dtype.
* Entropies are exact (``0 log 0 = 0``); vqp clamps probabilities at 1e-5 inside its logs.
"""

from __future__ import annotations

import math
from collections import namedtuple
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.ops.bsq import bsq_entropy, bsq_quantize
from fastlatent.ops.fsq import check_levels, fsq_indices_to_codes, fsq_quantize
from fastlatent.ops.lfq import lfq_entropy, lfq_quantize

Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])
CodebookUsage = namedtuple("CodebookUsage", ["fraction_used", "perplexity"])


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> CodebookUsage:
    """Fraction of the (implicit) codebook used by ``indices`` and the perplexity of their histogram.

    Works for codebooks far larger than the batch (FSQ up to 2^31 codes): it sorts the indices
    instead of building a histogram of ``codebook_size`` bins, and never syncs with the host
    (both results are 0-dim tensors). Negative indices (NaN rows) are ignored. Perplexity is
    ``exp(H)`` of the empirical code distribution, between 1 and the number of codes used;
    both are NaN when there are no valid indices.
    """
    flat = indices.reshape(-1)
    ordered, _ = flat.sort()
    valid = ordered >= 0
    n_valid = valid.sum()
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    distinct = (first & valid).sum()
    segment = first.cumsum(0) - 1
    counts = torch.zeros(flat.numel(), dtype=torch.float64, device=flat.device).index_add_(
        0, segment, torch.ones_like(ordered, dtype=torch.float64))
    freq = counts[segment] / n_valid
    entropy = -torch.where(valid, torch.log(torch.where(valid, freq, 1.0)), 0.0).sum() / n_valid
    return CodebookUsage((distinct / codebook_size).float(), torch.exp(entropy).float())


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last dim, with 0 log 0 = 0 and a zero (not NaN) gradient there."""
    safe = torch.where(probs > 0, probs, torch.ones_like(probs))
    return -(probs * torch.log(safe)).sum(-1)


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    return _entropy(torch.stack([p, 1 - p], dim=-1))


def _binary_codebook_size(owner: str, dim: int | None, codebook_size: int | None) -> int:
    """LFQ/BSQ: one bit per codebook dim, so the codebook size is a power of 2 (2^dim when not given)."""
    if dim is None and codebook_size is None:
        raise ValueError(f"{owner} needs dim or codebook_size")
    if codebook_size is None:
        codebook_size = 2**dim
    if codebook_size < 2 or codebook_size & (codebook_size - 1):
        raise ValueError(f"codebook_size must be a power of 2 (>= 2), got {codebook_size}")
    return codebook_size


class _ScalarQuantizerBase(nn.Module):
    """Projection, channel-first handling and codebook splitting shared by the three modules."""

    def _setup(self, dim, codebook_dim, num_codebooks, keep_num_codebooks_dim, has_projections,
               projection_has_bias, channel_first):
        if num_codebooks < 1:
            raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
        keep = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep:
            raise ValueError("keep_num_codebooks_dim must be True when num_codebooks > 1")
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        self.keep_num_codebooks_dim = keep
        self.effective_codebook_dim = codebook_dim * num_codebooks
        self.dim = self.effective_codebook_dim if dim is None else dim
        self.channel_first = channel_first
        if has_projections is None:
            has_projections = self.dim != self.effective_codebook_dim
        if not has_projections and self.dim != self.effective_codebook_dim:
            raise ValueError(f"dim={self.dim} differs from codebook_dim * num_codebooks={self.effective_codebook_dim}: "
                             "projections are needed")
        self.has_projections = has_projections
        linear = lambda i, o: nn.Linear(i, o, bias=projection_has_bias)  # noqa: E731
        self.project_in = linear(self.dim, self.effective_codebook_dim) if has_projections else nn.Identity()
        self.project_out = linear(self.effective_codebook_dim, self.dim) if has_projections else nn.Identity()

    def _to_codebooks(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_first:
            if x.dim() < 2:
                raise ValueError(f"channel_first input must be [B, C, ...], got shape {list(x.shape)}")
            x = x.movedim(1, -1)
        if x.shape[-1] != self.dim:
            where = "dim 1" if self.channel_first else "the last dim"
            raise ValueError(f"expected {self.dim} features in {where}, got shape {list(x.shape)}")
        x = self.project_in(x)
        return x.unflatten(-1, (self.num_codebooks, self.codebook_dim))

    def _from_codebooks(self, codes: torch.Tensor, indices: torch.Tensor | None):
        out = self.project_out(codes.flatten(-2))
        if self.channel_first:
            out = out.movedim(-1, 1)
        if indices is not None and not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return out, indices

    def _codes_out(self, codes: torch.Tensor) -> torch.Tensor:
        out = self.project_out(codes.flatten(-2))
        return out.movedim(-1, 1) if self.channel_first else out

    def usage(self, indices: torch.Tensor) -> CodebookUsage:
        """Fraction of the implicit codebook used and perplexity (pooled over codebooks)."""
        return codebook_usage(indices, self.codebook_size)


class FSQ(_ScalarQuantizerBase):
    """Finite scalar quantisation (https://arxiv.org/abs/2309.15505), as vqp's ``FSQ``.

    ``forward(z)`` returns ``(out, indices)``: ``out`` like ``z`` (after the optional
    projections), ``indices`` int64 ``[...]`` (``[..., num_codebooks]`` when
    ``keep_num_codebooks_dim``). One fused kernel does bound, round, normalise and index; one
    fused kernel does the straight-through backward.

    Differs from vqp: no ``scale`` (unused there), ``noise_dropout``, ``bound_hard_clamp`` or
    ``orthogonal_rotation``; levels equal to 2 are allowed without ``preserve_symmetry`` (they
    give codes {-1, 0}, vqp refuses them); int64 indices; ``allowed_dtypes`` and
    ``force_quantization_f32`` are implied (fp32 math for every dtype).
    """

    def __init__(self, levels: Sequence[int], dim: int | None = None, num_codebooks: int = 1,
                 keep_num_codebooks_dim: bool | None = None, channel_first: bool = False,
                 projection_has_bias: bool = True, return_indices: bool = True, preserve_symmetry: bool = False):
        super().__init__()
        self.levels = check_levels("FSQ", list(levels))
        self.preserve_symmetry = preserve_symmetry
        self.return_indices = return_indices
        self.codebook_size = math.prod(self.levels)
        self._setup(dim, len(self.levels), num_codebooks, keep_num_codebooks_dim, None, projection_has_bias,
                    channel_first)

    def forward(self, z: torch.Tensor):
        z = self._to_codebooks(z)
        codes, indices = fsq_quantize(z, self.levels, self.preserve_symmetry)
        return self._from_codebooks(codes, indices if self.return_indices else None)

    @property
    def implicit_codebook(self) -> torch.Tensor:
        """All ``codebook_size`` codes, ``[codebook_size, len(levels)]`` (built on demand)."""
        device = next(self.parameters()).device if self.has_projections else None
        idx = torch.arange(self.codebook_size, device=device)
        return fsq_indices_to_codes(idx, self.levels, self.preserve_symmetry)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (projected out, channel-first if configured) of ``indices`` as returned by forward."""
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        dtype = self.project_out.weight.dtype if self.has_projections else torch.float32
        codes = fsq_indices_to_codes(indices, self.levels, self.preserve_symmetry, dtype=dtype)
        return self._codes_out(codes)


class LFQ(_ScalarQuantizerBase):
    """Lookup-free quantisation (MAGVIT-v2, https://arxiv.org/abs/2310.05737), as vqp's ``LFQ``.

    ``forward(x, inv_temperature=100., return_loss_breakdown=False)`` returns
    ``Return(quantized, indices, entropy_aux_loss)`` (and ``LossBreakdown(per_sample_entropy,
    batch_entropy, commitment)`` when asked). In training mode the entropy loss is vqp's
    ``per_sample_entropy - diversity_gamma * codebook_entropy`` computed by the factorised
    ``lfq_entropy`` kernel: O(N + 2^d) memory instead of vqp's N x 2^d soft assignments, so
    ``frac_per_sample_entropy`` is not needed. In eval mode the losses are 0, as in vqp.

    Differs from vqp: no ``straight_through_activation``, ``spherical`` (use :class:`BSQ`),
    ``cosine_sim_project_in``, ``orthogonal_rotation``, ``frac_per_sample_entropy`` or ``mask``;
    entropies are exact (vqp clamps probabilities at 1e-5 in its logs, which lowers its entropies
    when many codes have probability below 1e-5); ``codebook_size`` up to 2^18.
    """

    def __init__(self, *, dim: int | None = None, codebook_size: int | None = None,
                 entropy_loss_weight: float = 0.1, commitment_loss_weight: float = 0.0, diversity_gamma: float = 1.0,
                 num_codebooks: int = 1, keep_num_codebooks_dim: bool | None = None, codebook_scale: float = 1.0,
                 has_projections: bool | None = None, projection_has_bias: bool = True,
                 soft_clamp_input_value: float | None = None, channel_first: bool = False,
                 experimental_softplus_entropy_loss: bool = False, entropy_loss_offset: float = 5.0):
        super().__init__()
        codebook_size = _binary_codebook_size("LFQ", dim, codebook_size)
        codebook_dim = codebook_size.bit_length() - 1
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError("soft_clamp_input_value must be >= codebook_scale")
        self.codebook_size = codebook_size
        self.codebook_scale = codebook_scale
        self.entropy_loss_weight = entropy_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.diversity_gamma = diversity_gamma
        self.soft_clamp_input_value = soft_clamp_input_value
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.entropy_loss_offset = entropy_loss_offset
        self._setup(dim, codebook_dim, num_codebooks, keep_num_codebooks_dim, has_projections, projection_has_bias,
                    channel_first)

    def _prepare(self, x):
        x = self._to_codebooks(x)
        if self.soft_clamp_input_value is not None:
            x = (x / self.soft_clamp_input_value).tanh() * self.soft_clamp_input_value
        return x

    def _entropy_terms(self, x, inv_temperature):
        per_sample, batch = [], []
        for c in range(self.num_codebooks):
            ps, avg = lfq_entropy(x[..., c, :], self.codebook_scale, inv_temperature)
            per_sample.append(ps.reshape(-1))
            batch.append(_entropy(avg))
        return torch.cat(per_sample).mean(), torch.stack(batch).mean()

    def forward(self, x: torch.Tensor, inv_temperature: float = 100.0, return_loss_breakdown: bool = False):
        x = self._prepare(x)
        quantized, indices = lfq_quantize(x, self.codebook_scale)
        zero = x.new_zeros((), dtype=torch.float32)
        per_sample_entropy = codebook_entropy = commit_loss = entropy_aux_loss = zero
        if self.training:
            per_sample_entropy, codebook_entropy = self._entropy_terms(x, inv_temperature)
            entropy_aux_loss = per_sample_entropy - self.diversity_gamma * codebook_entropy
            if self.experimental_softplus_entropy_loss:
                entropy_aux_loss = F.softplus(entropy_aux_loss + self.entropy_loss_offset)
            if self.commitment_loss_weight > 0:
                commit_loss = F.mse_loss(x.float(), quantized.detach().float())
        aux_loss = entropy_aux_loss * self.entropy_loss_weight + commit_loss * self.commitment_loss_weight
        out, indices = self._from_codebooks(quantized, indices)
        ret = Return(out, indices, aux_loss)
        if not return_loss_breakdown:
            return ret
        return ret, LossBreakdown(per_sample_entropy, codebook_entropy, commit_loss)

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        bits = (indices[..., None] >> torch.arange(self.codebook_dim - 1, -1, -1, device=indices.device)) & 1
        codes = (bits.float() * 2 - 1) * self.codebook_scale
        if not project_out:
            codes = codes.flatten(-2)
            return codes.movedim(-1, 1) if self.channel_first else codes
        return self._codes_out(codes.to(self.project_out.weight.dtype if self.has_projections else torch.float32))


class BSQ(_ScalarQuantizerBase):
    """Binary spherical quantisation (https://arxiv.org/abs/2406.07548).

    Projects each code group onto the unit sphere, quantises to ``sign / sqrt(codebook_dim)``
    with the straight-through gradient of the projection, and in training adds the paper's
    factorised entropy loss ``per_sample_entropy - diversity_gamma * sum_i h(mean_n p_i)`` (per-dim
    binary entropies; the paper's ``gamma0 = 1``, ``gamma = diversity_gamma``) times
    ``entropy_loss_weight``, plus ``commitment_loss_weight * mean ||u - q||^2``. The interface
    mirrors :class:`LFQ` (vqp has BSQ only as ``LFQ(spherical=True)``, whose entropy is not
    factorised); ``inv_temperature`` defaults to the paper's 1.0.
    """

    def __init__(self, *, dim: int | None = None, codebook_size: int | None = None,
                 entropy_loss_weight: float = 0.1, commitment_loss_weight: float = 0.0, diversity_gamma: float = 1.0,
                 inv_temperature: float = 1.0, num_codebooks: int = 1, keep_num_codebooks_dim: bool | None = None,
                 has_projections: bool | None = None, projection_has_bias: bool = True, channel_first: bool = False):
        super().__init__()
        codebook_size = _binary_codebook_size("BSQ", dim, codebook_size)
        self.codebook_size = codebook_size
        self.entropy_loss_weight = entropy_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.diversity_gamma = diversity_gamma
        self.inv_temperature = inv_temperature
        self._setup(dim, codebook_size.bit_length() - 1, num_codebooks, keep_num_codebooks_dim, has_projections,
                    projection_has_bias, channel_first)

    def forward(self, x: torch.Tensor, inv_temperature: float | None = None, return_loss_breakdown: bool = False):
        inv_temperature = self.inv_temperature if inv_temperature is None else inv_temperature
        x = self._to_codebooks(x)
        quantized, indices = bsq_quantize(x)
        zero = x.new_zeros((), dtype=torch.float32)
        per_sample_entropy = codebook_entropy = commit_loss = entropy_aux_loss = zero
        if self.training:
            per_sample, batch = [], []
            for c in range(self.num_codebooks):
                ps, avg = bsq_entropy(x[..., c, :], inv_temperature)
                per_sample.append(ps.reshape(-1))
                batch.append(_binary_entropy(avg).sum())
            per_sample_entropy, codebook_entropy = torch.cat(per_sample).mean(), torch.stack(batch).mean()
            entropy_aux_loss = per_sample_entropy - self.diversity_gamma * codebook_entropy
            if self.commitment_loss_weight > 0:
                u = F.normalize(x.float(), dim=-1)
                commit_loss = ((u - quantized.detach().float()) ** 2).sum(-1).mean()
        aux_loss = entropy_aux_loss * self.entropy_loss_weight + commit_loss * self.commitment_loss_weight
        out, indices = self._from_codebooks(quantized, indices)
        ret = Return(out, indices, aux_loss)
        if not return_loss_breakdown:
            return ret
        return ret, LossBreakdown(per_sample_entropy, codebook_entropy, commit_loss)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        bits = (indices[..., None] >> torch.arange(self.codebook_dim - 1, -1, -1, device=indices.device)) & 1
        codes = (bits.float() * 2 - 1) / math.sqrt(self.codebook_dim)
        return self._codes_out(codes.to(self.project_out.weight.dtype if self.has_projections else torch.float32))
