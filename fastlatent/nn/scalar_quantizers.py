"""Scalar quantisers as nn.Modules: FSQ, LFQ (and its spherical form, BSQ) over fastlatent's fused ops.

Drop-ins for vector-quantize-pytorch (vqp) 1.32: the same constructor and forward keywords, defaults,
return tuples, loss definitions, attribute names and input layouts. Where a class differs, its
docstring says so; the differences common to all:

* Layout (as vqp): an input with 4 or more dims is channel-first ``[B, C, ...]``; ``channel_first``
  forces it for 3-dim inputs (``LFQ(channel_first=False)`` turns it off, as in vqp). Channel-last
  inputs may have any number of leading dims (vqp: exactly ``[B, N, D]``).
* Indices are int64 (vqp: int32 for FSQ); a row holding NaN gets index -1.
* Index -1, and any index outside ``[0, codebook_size)``, decodes to NaN in every quantiser's
  ``indices_to_codes`` (vqp wraps it around to the last code); in the residual quantisers -1 marks a
  dropped layer and contributes zero, as in vqp.
* LFQ's entropies are exact (``0 log 0 = 0``); vqp clamps probabilities at 1e-5 inside its logs,
  which changes its entropies (and their gradients) only where probabilities fall below 1e-5.
"""

from __future__ import annotations

import math
from collections import namedtuple
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.ops import _checks
from fastlatent.ops.bsq import bsq_entropy
from fastlatent.ops.fsq import check_levels, fsq_indices_to_codes, fsq_quantize
from fastlatent.ops.lfq import MAX_ENTROPY_DIMS, lfq_entropy, lfq_quantize

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
        0, segment, torch.ones_like(ordered, dtype=torch.float64)
    )
    freq = counts[segment] / n_valid
    entropy = -torch.where(valid, torch.log(torch.where(valid, freq, 1.0)), 0.0).sum() / n_valid
    return CodebookUsage((distinct / codebook_size).float(), torch.exp(entropy).float())


# Largest codebook_dim whose exact codebook entropy LFQ computes in training: 2^d probabilities (256 MiB
# in fp32 at 26 bits, about four such tensors with the gradient). vqp keeps an N x 2^d matrix and a
# 2^d x d codebook there (7 GiB at 26 bits), so it stops well below this in practice.
MAX_SPLIT_ENTROPY_DIMS = 26


def _bit_patterns(m: int, device) -> torch.Tensor:
    """``[m, 2^m]`` float: entry (i, j) is bit i of code j, the first dim the most significant (as LFQ)."""
    codes = torch.arange(2**m, device=device)
    return ((codes[None] >> torch.arange(m - 1, -1, -1, device=device)[:, None]) & 1).float()


def split_lfq_entropy(x: torch.Tensor, code_value: float, inv_temperature: float):
    """Exact LFQ entropies for any ``d`` with O(N 2^(d/2) + 2^d) memory, differentiable in plain PyTorch.

    ``x [N, d]`` (fp32). The soft assignment ``softmax_j(2 inv_temperature <x, c_j>)`` over the 2^d
    codes ``c_j in {-v, v}^d`` factorises over bits: ``p_n(j) = prod_i p_ni(bit_ij)`` with
    ``p_ni(1) = sigmoid(4 inv_temperature v x_ni)``. So the per-sample entropy is the sum of the bits'
    binary entropies, and with the bits split into a high half (H) and a low half (L),
    ``p_n(h, l) = P^H_n(h) P^L_n(l)`` and the batch mean is one matrix product,
    ``avg = (P^H)^T P^L / N``, ``[2^H, 2^L]``: nothing N x 2^d is formed.
    Returns ``(per_sample [N], avg_probs [2^d])`` like :func:`fastlatent.ops.lfq_entropy`.
    """
    n, d = x.shape
    z = (4.0 * inv_temperature * code_value) * x
    log_pos, log_neg = F.logsigmoid(z), F.logsigmoid(-z)
    per_sample = -(log_pos.exp() * log_pos + log_neg.exp() * log_neg).sum(-1)
    high = d // 2
    halves = []
    for lo, hi in ((0, high), (high, d)):
        bits = _bit_patterns(hi - lo, x.device)
        halves.append((log_pos[:, lo:hi] @ bits + log_neg[:, lo:hi] @ (1.0 - bits)).exp())
    avg = (halves[0].T @ halves[1]) / n
    return per_sample, avg.reshape(-1)


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


def _orthogonal_rotation(n: int) -> torch.Tensor:
    rot = torch.empty(n, n)
    nn.init.orthogonal_(rot)
    return rot


def _bits(indices: torch.Tensor, bit_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bits ``[..., d]`` of ``indices`` (channel 0 the most significant) and where the index is valid."""
    indices = indices.long()
    valid = (indices >= 0) & (indices < 2 * bit_values[0])
    return (indices[..., None] & bit_values) != 0, valid


class CosineSimLinear(nn.Module):
    """vqp's cosine-similarity projection: ``normalize(x) @ normalize(weight, dim=0) * scale``
    (``weight [dim_in, dim_out]``, initialised ``randn`` as vqp, so checkpoints load either way)."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0) * self.scale


class _ScalarQuantizerBase(nn.Module):
    """Projections, layout and codebook splitting shared by FSQ and LFQ."""

    def _setup(
        self,
        dim,
        codebook_dim,
        num_codebooks,
        keep_num_codebooks_dim,
        has_projections,
        projection_has_bias,
        channel_first,
        project_in_class=None,
    ):
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
            raise ValueError(
                f"dim={self.dim} differs from codebook_dim * num_codebooks="
                f"{self.effective_codebook_dim}: projections are needed"
            )
        self.has_projections = has_projections
        project_in_class = project_in_class or (lambda i, o: nn.Linear(i, o, bias=projection_has_bias))
        self.project_in = (
            project_in_class(self.dim, self.effective_codebook_dim) if has_projections else nn.Identity()
        )
        self.project_out = (
            nn.Linear(self.effective_codebook_dim, self.dim, bias=projection_has_bias)
            if has_projections
            else nn.Identity()
        )

    def _moves_channels(self, ndim: int) -> bool:
        raise NotImplementedError

    def _to_codebooks(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``x`` -> ``[..., num_codebooks, codebook_dim]`` channel-last, and whether channels were moved."""
        moved = self._moves_channels(x.dim())
        shape = list(x.shape)
        if moved:
            if x.dim() < 2:
                raise ValueError(f"channel-first input must be [B, C, ...], got shape {list(x.shape)}")
            x = x.movedim(1, -1)
        if x.dim() < 1 or x.shape[-1] != self.dim:
            where = "dim 1 (channel-first input)" if moved else "the last dim"
            raise ValueError(f"expected {self.dim} features in {where}, got shape {shape}")
        x = self.project_in(x)
        return x.unflatten(-1, (self.num_codebooks, self.codebook_dim)), moved

    def _from_codebooks(self, codes: torch.Tensor, moved: bool) -> torch.Tensor:
        out = self.project_out(codes.flatten(-2))
        return out.movedim(-1, 1) if moved else out

    def _squeeze_indices(self, indices: torch.Tensor | None) -> torch.Tensor | None:
        if indices is not None and not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return indices

    def _codes_layout(self, indices: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """vqp's ``indices_to_codes`` layout rule: channel-first output for image/video indices."""
        is_img_or_video = indices.dim() >= 3 + int(self.keep_num_codebooks_dim)
        channel_first = self.channel_first if self.channel_first is not None else False
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        return indices, bool(channel_first or is_img_or_video)

    def usage(self, indices: torch.Tensor) -> CodebookUsage:
        """Fraction of the implicit codebook used and perplexity (pooled over codebooks)."""
        return codebook_usage(indices, self.codebook_size)


def _round_ste(z):
    return z + (z.round() - z).detach()


def _floor_ste(z):
    return z + (z.floor() - z).detach()


class FSQ(_ScalarQuantizerBase):
    """Finite scalar quantisation (https://arxiv.org/abs/2309.15505), vqp's ``FSQ`` with every option.

    ``forward(z)`` returns ``(out, indices)``: ``out`` like ``z`` (after the optional projections),
    ``indices`` int64 ``[...]`` (``[..., num_codebooks]`` when ``keep_num_codebooks_dim``; ``None``
    with ``return_indices=False``). Inputs with 4 or more dims, or any input with
    ``channel_first=True``, are channel-first; their indices are channel-last (``[B, H, W]``).

    The default path is one fused kernel (bound, round, normalise, index) and its fused
    straight-through backward, in fp32 for fp16/bf16/fp32 inputs (vqp's default
    ``force_quantization_f32``; float64 inputs are quantised in float64, as in vqp). Options the
    kernel does not cover run vqp's formulas in plain PyTorch: ``bound_hard_clamp``,
    ``noise_dropout`` (training), ``orthogonal_rotation``, and half-precision quantisation
    (``force_quantization_f32=False``, or a half dtype in ``allowed_dtypes``).

    Differs from vqp: levels of 2 are allowed without ``preserve_symmetry`` (codes {-1, 0}; vqp
    refuses them); int64 indices; near a rounding boundary the kernel decides in float64, so
    about 1 element in 10^4 can land on the neighbouring level where vqp's float32 ``tanh``
    rounds the other way; ``implicit_codebook`` is built on demand (a property, not a buffer).
    """

    def __init__(
        self,
        levels: Sequence[int],
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        scale: float | None = None,
        allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
    ):
        super().__init__()
        self.levels = check_levels("FSQ", list(levels))
        if not 0.0 <= noise_dropout <= 1.0:
            raise ValueError(f"noise_dropout must be in [0, 1], got {noise_dropout}")
        if noise_dropout > 0 and not preserve_symmetry:
            raise ValueError("noise_dropout > 0 needs preserve_symmetry=True (as in vector-quantize-pytorch)")
        self.register_buffer("_levels", torch.tensor(self.levels, dtype=torch.int32), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1], dtype=torch.int64), 0)
        self.register_buffer("_basis", basis, persistent=False)
        self.scale = scale
        self.preserve_symmetry = preserve_symmetry
        self.noise_dropout = noise_dropout
        self.return_indices = return_indices
        self.allowed_dtypes = tuple(allowed_dtypes)
        self.force_quantization_f32 = force_quantization_f32
        self.bound_hard_clamp = bound_hard_clamp
        self.codebook_size = math.prod(self.levels)
        self._setup(
            dim,
            len(self.levels),
            num_codebooks,
            keep_num_codebooks_dim,
            None,
            projection_has_bias,
            channel_first,
        )
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            self.register_buffer("orthogonal_rot", _orthogonal_rotation(self.codebook_dim))

    def _moves_channels(self, ndim: int) -> bool:
        return bool(self.channel_first) or ndim >= 4

    # vqp's formulas, for the options the fused kernel does not cover ------------------------

    # The constants below are float32 or int32 tensors, as in vqp, so half-precision inputs are
    # promoted exactly where vqp's are (its bound runs in float32, its symmetric bracket in the
    # input dtype).

    def bound(self, z: torch.Tensor, eps: float = 1e-3, hard_clamp: bool = False) -> torch.Tensor:
        """vqp's bound and straight-through round: normalised codes of ``z [..., d]`` (plain PyTorch)."""
        half_l = (self._levels - 1) * (1 + eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        if hard_clamp:
            bounded = (z + offset / half_l).clamp(-1.0, 1.0) * half_l - offset
        else:
            bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
        return _round_ste(bounded) / (self._levels // 2)

    def symmetry_preserving_bound(self, z: torch.Tensor, hard_clamp: bool = False) -> torch.Tensor:
        """vqp's symmetric bound (arXiv:2411.19842, section 3.2) with a straight-through floor."""
        levels_minus_1 = self._levels - 1
        squashed = z.clamp(-1.0, 1.0) if hard_clamp else torch.tanh(z)
        bracket = _floor_ste(levels_minus_1 * (squashed + 1) / 2.0 + 0.5)
        # vqp writes 2 / (L - 1) * k - 1 (two roundings); (2k - (L - 1)) / (L - 1) is the exact code
        # rounded once, as the kernel and indices_to_codes form it, with the same gradient
        return (2 * bracket - levels_minus_1) / levels_minus_1

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        bound = self.symmetry_preserving_bound if self.preserve_symmetry else self.bound
        return bound(z, hard_clamp=self.bound_hard_clamp)

    def _scale_and_shift(self, zhat_normalized: torch.Tensor) -> torch.Tensor:
        if self.preserve_symmetry:
            return (zhat_normalized + 1.0) / (2.0 / (self._levels - 1))
        half_width = self._levels // 2
        return zhat_normalized * half_width + half_width

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        """Index of each normalised code ``[..., len(levels)]`` (int64; -1 for a row holding NaN)."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"codes must have {self.codebook_dim} values in the last dim, got {list(zhat.shape)}"
            )
        level = self._scale_and_shift(zhat.detach().double()).round()
        nan = level.isnan().any(-1)
        return (level.nan_to_num(0).long() * self._basis).sum(-1).masked_fill(nan, -1)

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Per-channel level indices ``[..., len(levels)]`` of ``indices`` (for factorised embeddings)."""
        return (indices.long()[..., None] // self._basis) % self._levels

    # ----------------------------------------------------------------------------------------

    def _quantize_codebooks(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Quantise channel-last ``z [..., codebook_dim]``: (codes in the math dtype, int64 indices)."""
        if self.force_quantization_f32 and z.dtype not in self.allowed_dtypes:
            z = z.float()
        # the kernel quantises in fp32 (float64 on the CPU); a half dtype left here means vqp's
        # quantisation in that dtype, which only its own formulas reproduce
        fused = not self.bound_hard_clamp and (
            z.dtype == torch.float32 or (z.dtype == torch.float64 and _checks.allows_double(z))
        )
        if fused:
            codes, indices = fsq_quantize(z, self.levels, self.preserve_symmetry)
        else:
            codes = self.quantize(z)
            indices = self.codes_to_indices(codes) if self.return_indices else None
        if self.training and self.noise_dropout > 0:
            offset_mask = torch.full_like(codes, self.noise_dropout).bernoulli_().bool()
            offset = torch.rand_like(codes) - 0.5
            codes = torch.where(offset_mask, codes + offset, codes).clamp(-1.0, 1.0)
        return codes, indices

    def _quantize_tokens(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward`` on channel-last ``z [..., codebook_dim * num_codebooks]`` after ``project_in``."""
        z = z.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        if self.orthogonal_rotation:
            z = z @ self.orthogonal_rot
        orig_dtype = z.dtype
        codes, indices = self._quantize_codebooks(z)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        indices = self._squeeze_indices(indices) if self.return_indices else None
        return codes.to(orig_dtype).flatten(-2), indices

    def forward(self, z: torch.Tensor):
        z, moved = self._to_codebooks(z)
        codes, indices = self._quantize_tokens(z.flatten(-2))
        codes = codes.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        return self._from_codebooks(codes, moved), indices

    @property
    def implicit_codebook(self) -> torch.Tensor:
        """All ``codebook_size`` codes, ``[codebook_size, len(levels)]`` (built on demand)."""
        idx = torch.arange(self.codebook_size, device=self._levels.device)
        return fsq_indices_to_codes(idx, self.levels, self.preserve_symmetry)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of ``indices`` as returned by forward: projected out, rotated back, channel-first for
        image/video indices (or with ``channel_first``), as vqp. Out-of-range indices give NaN."""
        indices, channel_first = self._codes_layout(indices)
        dtype = self.project_out.weight.dtype if self.has_projections else torch.float32
        codes = fsq_indices_to_codes(indices, self.levels, self.preserve_symmetry, dtype=dtype)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t().to(dtype)
        return self._from_codebooks(codes, channel_first)


class LFQ(_ScalarQuantizerBase):
    """Lookup-free quantisation (MAGVIT-v2, https://arxiv.org/abs/2310.05737): vqp's ``LFQ``, every option.

    ``forward(x, inv_temperature=100., return_loss_breakdown=False, mask=None)`` returns
    ``Return(quantized, indices, entropy_aux_loss)`` (and ``LossBreakdown(per_sample_entropy,
    batch_entropy, commitment)`` when asked). In training the loss is
    ``entropy_loss_weight * (per_sample_entropy - diversity_gamma * codebook_entropy) +
    commitment_loss_weight * mse(x, quantized)``; in eval mode the losses are 0, as in vqp.

    The entropies come from the factorised ``lfq_entropy`` kernel: O(N + 2^d) memory instead of
    vqp's N x 2^d soft assignments, so ``frac_per_sample_entropy < 1`` (vqp's memory saver) only
    subsamples tokens, drawn with vqp's random calls, and costs no extra memory either way.
    ``spherical=True`` is BSQ (https://arxiv.org/abs/2406.07548): inputs and codes on the sphere of
    radius ``codebook_scale``, codes ``+-codebook_scale / sqrt(d)``; see also :class:`BSQ`.
    ``mask`` (bool, one entry per token) keeps masked-out tokens out of both entropies and the
    commitment loss.

    Differs from vqp: entropies are exact (vqp clamps probabilities at 1e-5 in its logs);
    ``force_quantization_f32=False`` changes nothing (the sign is exact in every dtype and the
    entropy kernel accumulates in fp32); with ``mask``, vqp 1.32 flattens the codebook axis into the
    tokens, so its batch entropy becomes the per-sample entropy (no diversity pressure): here the
    masked batch entropy is the entropy of the mean over the kept tokens. Above ``codebook_dim = 18``
    (the kernel's table) the exact entropies come from :func:`split_lfq_entropy` (plain PyTorch,
    O(N 2^(d/2) + 2^d) memory, where vqp needs N x 2^d), up to ``codebook_dim = 26`` in training.
    """

    def __init__(
        self,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        straight_through_activation: nn.Module | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        codebook_scale: float = 1.0,
        frac_per_sample_entropy: float = 1.0,
        has_projections: bool | None = None,
        projection_has_bias: bool = True,
        soft_clamp_input_value: float | None = None,
        cosine_sim_project_in: bool = False,
        cosine_sim_project_in_scale: float | None = None,
        channel_first: bool | None = None,
        experimental_softplus_entropy_loss: bool = False,
        entropy_loss_offset: float = 5.0,
        spherical: bool = False,
        force_quantization_f32: bool = True,
        orthogonal_rotation: bool = False,
    ):
        super().__init__()
        codebook_size = _binary_codebook_size(type(self).__name__, dim, codebook_size)
        codebook_dim = codebook_size.bit_length() - 1
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError("soft_clamp_input_value must be >= codebook_scale")
        if not 0 < frac_per_sample_entropy <= 1:
            raise ValueError(f"frac_per_sample_entropy must be in (0, 1], got {frac_per_sample_entropy}")
        if not (isinstance(codebook_scale, (int, float)) and 0 < codebook_scale < math.inf):
            raise ValueError(f"codebook_scale must be a positive finite number, got {codebook_scale}")
        self.codebook_size = codebook_size
        self.codebook_scale = codebook_scale
        self.entropy_loss_weight = entropy_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.diversity_gamma = diversity_gamma
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.soft_clamp_input_value = soft_clamp_input_value
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.entropy_loss_offset = entropy_loss_offset
        self.spherical = spherical
        self.force_quantization_f32 = force_quantization_f32
        self.activation = straight_through_activation
        if straight_through_activation is None:
            self.activation = nn.Identity()
        project_in_class = None
        if cosine_sim_project_in:
            cos_scale = codebook_scale if cosine_sim_project_in_scale is None else cosine_sim_project_in_scale
            project_in_class = lambda i, o: CosineSimLinear(i, o, scale=cos_scale)  # noqa: E731
        self._setup(
            dim,
            codebook_dim,
            num_codebooks,
            keep_num_codebooks_dim,
            has_projections,
            projection_has_bias,
            channel_first,
            project_in_class,
        )
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            self.register_buffer("orthogonal_rot", _orthogonal_rotation(codebook_dim))
        # vqp keeps the bit values as a persistent buffer named "mask": kept, so its checkpoints load
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))

    def _moves_channels(self, ndim: int) -> bool:
        return ndim >= 4 if self.channel_first is None else bool(self.channel_first)

    @property
    def code_value(self) -> float:
        """Magnitude of each code entry: ``codebook_scale`` (``codebook_scale / sqrt(d)`` when spherical)."""
        return self.codebook_scale / math.sqrt(self.codebook_dim) if self.spherical else self.codebook_scale

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        return bits * self.codebook_scale * 2 - self.codebook_scale

    @property
    def codebook(self) -> torch.Tensor:
        """Every code ``[codebook_size, codebook_dim]``, +-codebook_scale (vqp's ``codebook``; on demand)."""
        bits, _ = _bits(torch.arange(self.codebook_size, device=self.mask.device), self.mask)
        return self.bits_to_codes(bits.float())

    def _maybe_l2norm(self, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(t, dim=-1) * self.codebook_scale if self.spherical else t

    def _flat_mask(self, mask: torch.Tensor | None, tokens_shape: torch.Size) -> torch.Tensor | None:
        """``mask`` over the leading token dims (``[B]`` or ``[B, N]`` as vqp; ``[B, H * W]`` or
        ``[B, H, W]`` for channel-first images), flattened to one entry per token."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        k = mask.dim()
        if 1 <= k <= len(tokens_shape) and mask.shape == tokens_shape[:k]:
            mask = mask.reshape(*mask.shape, *[1] * (len(tokens_shape) - k)).expand(tokens_shape)
        elif k == 2 and mask.shape[0] == tokens_shape[0] and mask.shape[1] == math.prod(tokens_shape[1:]):
            mask = mask.reshape(tokens_shape)
        else:
            raise ValueError(
                f"mask must cover the leading token dims of {list(tokens_shape)} (e.g. [B] or "
                f"[B, N]), got shape {list(mask.shape)}"
            )
        return mask.reshape(-1).to(self.mask.device)

    def _entropy_terms(self, x: torch.Tensor, mask: torch.Tensor | None, inv_temperature: float):
        """Mean per-sample entropy and mean codebook entropy over codebooks; ``x [N, c, d]`` (fp32)."""
        if mask is not None:
            x = x[mask]
        if self.frac_per_sample_entropy < 1.0:
            num_tokens = x.shape[0]
            num_sampled = int(num_tokens * self.frac_per_sample_entropy)
            keep = torch.randn(num_tokens).argsort(dim=-1) < num_sampled  # vqp's draw, on the CPU as in vqp
            x = x[keep.to(x.device)]
        if self._factorized_entropy():
            return self._factorized_entropy_terms(x, inv_temperature)
        split = self.codebook_dim > MAX_ENTROPY_DIMS  # past the kernel's 2^18 table: the split product
        if self.codebook_dim > MAX_SPLIT_ENTROPY_DIMS:
            raise ValueError(
                f"{type(self).__name__}: the entropy loss in training needs codebook_dim <= "
                f"{MAX_SPLIT_ENTROPY_DIMS} (its codebook entropy keeps 2^d probabilities), got "
                f"{self.codebook_dim}; use num_codebooks > 1 with smaller codebooks, or BSQ (its "
                "factorised entropy), or run in eval mode"
            )
        per_sample, batch = [], []
        for c in range(self.num_codebooks):
            entropy_of = split_lfq_entropy if split else lfq_entropy
            ps, avg = entropy_of(x[:, c], self.code_value, inv_temperature)
            per_sample.append(ps)
            batch.append(_entropy(avg))
        return torch.cat(per_sample).mean(), torch.stack(batch).mean()

    def _factorized_entropy(self) -> bool:
        return False

    def _factorized_entropy_terms(self, x: torch.Tensor, inv_temperature: float):
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        inv_temperature: float = 100.0,
        return_loss_breakdown: bool = False,
        mask: torch.Tensor | None = None,
    ):
        x, moved = self._to_codebooks(x)
        mask = self._flat_mask(mask, x.shape[:-2])
        if self.soft_clamp_input_value is not None:
            x = (x / self.soft_clamp_input_value).tanh() * self.soft_clamp_input_value
        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot
        x = self._maybe_l2norm(x)
        orig_dtype = x.dtype
        quantized, indices = lfq_quantize(x, self.code_value)
        zero = x.new_zeros((), dtype=torch.float32)
        per_sample_entropy = codebook_entropy = commit_loss = entropy_aux_loss = zero
        if self.training:
            if not isinstance(self.activation, nn.Identity):
                activated = self.activation(x)
                quantized = activated + (quantized - activated).detach()
            x32 = x.float().reshape(-1, self.num_codebooks, self.codebook_dim)
            per_sample_entropy, codebook_entropy = self._entropy_terms(x32, mask, inv_temperature)
            entropy_aux_loss = per_sample_entropy - self.diversity_gamma * codebook_entropy
            if self.experimental_softplus_entropy_loss:
                entropy_aux_loss = F.softplus(entropy_aux_loss + self.entropy_loss_offset)
            if self.commitment_loss_weight > 0:
                commit = F.mse_loss(x32, quantized.detach().float().reshape(x32.shape), reduction="none")
                commit_loss = (commit[mask] if mask is not None else commit).mean()
        else:
            quantized = quantized.detach()  # as vqp: no straight-through gradient in eval mode
        if self.orthogonal_rotation:
            quantized = quantized @ self.orthogonal_rot.t()
        aux_loss = entropy_aux_loss * self.entropy_loss_weight + commit_loss * self.commitment_loss_weight
        out = self._from_codebooks(quantized.to(orig_dtype), moved)
        ret = Return(out, self._squeeze_indices(indices), aux_loss)
        if not return_loss_breakdown:
            return ret
        return ret, LossBreakdown(per_sample_entropy, codebook_entropy, commit_loss)

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Codes of ``indices`` as returned by forward (rotated back, projected out unless
        ``project_out=False``, channel-first for image/video indices or ``channel_first``), as vqp.
        Indices outside ``[0, codebook_size)`` give NaN."""
        indices, channel_first = self._codes_layout(indices)
        if self.channel_first is not None:
            channel_first = bool(self.channel_first)
        bits, valid = _bits(indices, self.mask)
        dtype = self.project_out.weight.dtype if (self.has_projections and project_out) else torch.float32
        codes = torch.where(bits, self.code_value, -self.code_value).to(dtype)
        codes = codes.masked_fill(~valid[..., None], float("nan"))
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t().to(dtype)
        codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        return codes.movedim(-1, 1) if channel_first else codes


class BSQ(LFQ):
    """Binary spherical quantisation (https://arxiv.org/abs/2406.07548): ``LFQ(spherical=True)``.

    The same module, losses and defaults as vqp's ``LFQ(spherical=True)`` (so the same codebook
    usage on the same data and seed), with ``inv_temperature`` settable at construction (default
    100, vqp's forward default). By default the entropies are exact up to ``codebook_dim = 18`` (the
    kernel's table); above it (or with ``factorized_entropy=True``) the paper's factorised estimate
    is used instead: the per-sample entropy is still exact, the codebook entropy is
    ``sum_i h(mean_n p_i)`` over the per-bit probabilities (an upper bound that spreads codes less:
    on a 10-bit toy run it used 893 codes where the exact entropy used all 1012).
    ``factorized_entropy=False`` keeps the exact entropies up to ``codebook_dim = 26``: LFQ's
    split product over the two halves of the bits (:func:`split_lfq_entropy`), whose ``2^d``
    batch probabilities pass 256 MiB above 26 bits.
    """

    def __init__(
        self,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        inv_temperature: float = 100.0,
        factorized_entropy: bool | None = None,
        **lfq_kwargs,
    ):
        if lfq_kwargs.pop("spherical", True) is not True:
            raise ValueError("BSQ is LFQ(spherical=True); use LFQ for spherical=False")
        super().__init__(dim=dim, codebook_size=codebook_size, spherical=True, **lfq_kwargs)
        if factorized_entropy is False and self.codebook_dim > MAX_SPLIT_ENTROPY_DIMS:
            raise ValueError(
                f"factorized_entropy=False needs codebook_dim <= {MAX_SPLIT_ENTROPY_DIMS} (the exact "
                f"codebook entropy keeps 2^d probabilities), got {self.codebook_dim}; leave it None"
            )
        self.inv_temperature = inv_temperature
        self.factorized_entropy = (
            self.codebook_dim > MAX_ENTROPY_DIMS if factorized_entropy is None else factorized_entropy
        )

    def _factorized_entropy(self) -> bool:
        return self.factorized_entropy

    def _factorized_entropy_terms(self, x: torch.Tensor, inv_temperature: float):
        # bsq_entropy projects onto the unit sphere itself; LFQ's logits 4 s^2 u inv_t / sqrt(d) for
        # radius s are its logits at inv_temperature * s^2.
        per_sample, batch = [], []
        for c in range(self.num_codebooks):
            ps, avg = bsq_entropy(x[:, c], inv_temperature * self.codebook_scale**2)
            per_sample.append(ps)
            batch.append(_binary_entropy(avg).sum())
        return torch.cat(per_sample).mean(), torch.stack(batch).mean()

    def forward(
        self,
        x: torch.Tensor,
        inv_temperature: float | None = None,
        return_loss_breakdown: bool = False,
        mask: torch.Tensor | None = None,
    ):
        inv_temperature = self.inv_temperature if inv_temperature is None else inv_temperature
        return super().forward(x, inv_temperature, return_loss_breakdown, mask)
