"""Discrete stage-1 autoencoders: VQGAN-style vector quantisation and scalar quantisation (FSQ, LFQ, BSQ)
between the SD-VAE encoder and decoder of :mod:`fastlatent.models.vae_blocks`.

Layout, as taming's VQModel and diffusers' VQModel: ``encoder -> quant_conv (z_channels -> latent_channels) ->
quantizer -> post_quant_conv (latent_channels -> z_channels) -> decoder``. The prior sees the quantiser's
indices (``encode_indices``) or its codes (``encode``, ``[B, latent_channels, h, w]``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.models.autoencoders import AutoencoderOutput
from fastlatent.models.base import ConfigMixin, eval_mode, register_model
from fastlatent.models.vae_blocks import Decoder, Encoder, check_image_batch, check_positive_int
from fastlatent.nn.residual_vq import ResidualVQ
from fastlatent.nn.scalar_quantizers import BSQ, FSQ, LFQ, codebook_usage
from fastlatent.nn.vq import VectorQuantize
from fastlatent.ops.lfq import MAX_ENTROPY_DIMS

SCALAR_QUANTIZERS = ("fsq", "lfq", "bsq")
VECTOR_QUANTIZERS = ("vq", "rvq")


class _DiscreteAutoencoder(nn.Module):
    """Encoder, quant convs and decoder shared by :class:`VQAutoencoder` and :class:`FSQAutoencoder`.

    Subclasses build ``self.quantizer`` and implement ``_quantize(h) -> (codes, indices, losses)`` (losses
    unweighted) and ``_codes_from_indices(indices) -> codes [B, latent_channels, h, w]``.
    """

    is_discrete = True
    scaling_factor = 1.0  # the prior sees indices; codes stay as the quantiser made them
    shift_factor = 0.0

    def _build(
        self,
        owner: str,
        in_channels,
        out_channels,
        block_out_channels,
        layers_per_block,
        norm_num_groups,
        mid_block_add_attention,
        latent_channels,
        z_channels,
    ):
        if not isinstance(mid_block_add_attention, bool):
            raise TypeError(
                f"{owner}: mid_block_add_attention must be a bool, got {mid_block_add_attention!r}"
            )
        z_channels = (
            latent_channels if z_channels is None else check_positive_int(owner, "z_channels", z_channels)
        )
        self.encoder = Encoder(
            in_channels,
            z_channels,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            double_z=False,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.decoder = Decoder(
            z_channels,
            out_channels,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.quant_conv = nn.Conv2d(z_channels, latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, z_channels, 1)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.latent_channels, self.z_channels = latent_channels, z_channels
        self.downsample_factor = self.encoder.downsample_factor
        self._owner = owner

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's final conv weight, the layer the adaptive GAN weight differentiates through."""
        return self.decoder.conv_out.weight

    def enable_gradient_checkpointing(self, enabled: bool = True):
        """Recompute each encoder/decoder stage in the backward pass instead of storing its activations."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = bool(enabled)
        return self

    def _pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(
            self._owner, "x", x, self.in_channels, self.downsample_factor, self.encoder.conv_in.weight
        )
        return self.quant_conv(self.encoder(x))

    def _indices_shape_suffix(self) -> tuple:
        return ()

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        """Encode, quantise (in training: straight-through gradients and codebook updates) and decode ``x``.

        ``losses`` holds the quantiser's unweighted terms, ``stats`` the indices and the batch's codebook
        usage (fraction of codes used) and perplexity."""
        codes, indices, losses = self._quantize(self._pre_quant(x))
        stats = {"indices": indices}
        stats.update(self._usage(indices))
        return AutoencoderOutput(reconstruction=self.decode(codes), latents=codes, losses=losses, stats=stats)

    def _usage(self, indices: torch.Tensor) -> dict:
        usage = codebook_usage(indices.detach(), self.codebook_size)
        return {"usage": usage.fraction_used, "perplexity": usage.perplexity}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised latents ``[B, latent_channels, H/f, W/f]`` of images ``x [B, C, H, W]`` in [-1, 1]. Never
        updates the codebook, whatever the training mode."""
        with eval_mode(self.quantizer):
            return self._quantize(self._pre_quant(x))[0]

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Code indices ``int64 [B, H/f, W/f]`` (residual VQ: ``[B, H/f, W/f, num_quantizers]``)."""
        with eval_mode(self.quantizer):
            return self._quantize(self._pre_quant(x))[1]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``[B, out_channels, h*f, w*f]`` from quantised latents ``z [B, latent_channels, h, w]``."""
        check_image_batch(
            f"{self._owner}.decode", "z", z, self.latent_channels, 1, self.decoder.conv_in.weight
        )
        return self.decoder(self.post_quant_conv(z))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Images from code indices as :meth:`encode_indices` returns them. Checks that every index is in
        ``[0, codebook_size)`` (one host sync)."""
        where = f"{self._owner}.decode_indices"
        suffix = self._indices_shape_suffix()
        expected = "[B, h, w" + "".join(f", {s}" for s in suffix) + "]"
        if not isinstance(indices, torch.Tensor):
            raise TypeError(
                f"{where}: indices must be an int64 tensor {expected}, got {type(indices).__name__}"
            )
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"{where}: indices must be an integer tensor {expected}, got {indices.dtype}")
        if indices.dim() != 3 + len(suffix) or tuple(indices.shape[3:]) != suffix:
            raise ValueError(f"{where}: indices must have shape {expected}, got {list(indices.shape)}")
        if indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.codebook_size:
                raise ValueError(
                    f"{where}: indices must be in [0, {self.codebook_size}), got values in [{low}, {high}]"
                )
        indices = indices.to(device=self.quant_conv.weight.device, dtype=torch.int64)
        codes = self._codes_from_indices(indices).to(self.quant_conv.weight.dtype)
        return self.decode(codes)


@register_model
class VQAutoencoder(_DiscreteAutoencoder, ConfigMixin):
    """VQGAN (Esser et al., 2021, https://arxiv.org/abs/2012.09841): SD-VAE encoder/decoder around a vector
    quantiser (:class:`fastlatent.nn.VectorQuantize`, or :class:`fastlatent.nn.ResidualVQ` with
    ``quantizer="rvq"``).

    Args:
        in_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups,
            mid_block_add_attention: the encoder/decoder, as :class:`AutoencoderKL`.
        latent_channels: codebook dimension, the channels of the quantised latents.
        codebook_size: codes per codebook, K.
        z_channels: encoder output / decoder input channels (default: latent_channels); quant_conv maps them
            to the codebook dimension.
        quantizer: "vq" or "rvq" (residual, ``num_quantizers`` deep; indices gain a last axis of that size).
        num_quantizers: depth of the residual VQ (only with "rvq").
        learnable_codebook: codebook trained by the codebook loss (VQGAN); otherwise updated by EMA with
            ``decay`` (the default, more stable).
        decay, kmeans_init, threshold_ema_dead_code, use_cosine_sim, rotation_trick: as
            :class:`fastlatent.nn.VectorQuantize`.

    ``losses``: "commitment" (``||z - sg(q)||^2``, mean) and, with a learnable codebook, "codebook"
    (``||sg(z) - q||^2``), unweighted; residual VQ sums them over depths. ``stats``: "indices", batch "usage"
    and "perplexity" (residual VQ: averaged over depths).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
        latent_channels: int = 8,
        codebook_size: int = 1024,
        z_channels: int | None = None,
        quantizer: str = "vq",
        num_quantizers: int = 1,
        learnable_codebook: bool = False,
        decay: float = 0.99,
        kmeans_init: bool = False,
        threshold_ema_dead_code: float = 0.0,
        use_cosine_sim: bool = False,
        rotation_trick: bool = True,
    ):
        super().__init__()
        owner = "VQAutoencoder"
        check_positive_int(owner, "latent_channels", latent_channels)
        check_positive_int(owner, "codebook_size", codebook_size)
        check_positive_int(owner, "num_quantizers", num_quantizers)
        if quantizer not in VECTOR_QUANTIZERS:
            raise ValueError(
                f"{owner}: quantizer must be one of {VECTOR_QUANTIZERS}, got {quantizer!r} (scalar "
                f"quantisers {SCALAR_QUANTIZERS} are FSQAutoencoder's)"
            )
        if quantizer == "vq" and num_quantizers != 1:
            raise ValueError(f"{owner}: num_quantizers={num_quantizers} needs quantizer='rvq'")
        if not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"{owner}: decay must be in [0, 1], got {decay!r}")
        if threshold_ema_dead_code < 0:
            raise ValueError(
                f"{owner}: threshold_ema_dead_code must be >= 0, got {threshold_ema_dead_code!r}"
            )
        self._build(
            owner,
            in_channels,
            out_channels,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            mid_block_add_attention,
            latent_channels,
            z_channels,
        )
        vq_kwargs = dict(
            decay=decay,
            kmeans_init=kmeans_init,
            threshold_ema_dead_code=threshold_ema_dead_code,
            use_cosine_sim=use_cosine_sim,
            learnable_codebook=learnable_codebook,
            rotation_trick=rotation_trick,
            commitment_weight=0.0 if learnable_codebook else 1.0,
            accept_image_fmap=True,
        )
        if quantizer == "vq":
            self.quantizer = VectorQuantize(latent_channels, codebook_size, **vq_kwargs)
        else:
            self.quantizer = ResidualVQ(latent_channels, num_quantizers, codebook_size, **vq_kwargs)
        self.codebook_size = codebook_size
        self.num_quantizers = num_quantizers
        self.residual = quantizer == "rvq"
        self.learnable_codebook = learnable_codebook

    def _indices_shape_suffix(self) -> tuple:
        return (self.num_quantizers,) if self.residual else ()

    def _quantize(self, h: torch.Tensor):
        codes, indices, vq_loss = self.quantizer(h)
        vq_loss = vq_loss.sum()  # residual VQ: one term per depth
        if not self.learnable_codebook:
            # EMA codebook: the quantiser's loss is exactly the commitment (commitment_weight=1, no codebook
            # loss)
            return codes, indices, {"commitment": vq_loss}
        # learnable codebook: the commitment and codebook terms are computed here, depth by depth, against the
        # codes the quantiser chose (its own loss is vector-quantize-pytorch's mse(q, z), both ways at once)
        commitment = torch.zeros((), device=h.device)
        codebook = torch.zeros((), device=h.device)
        if self.quantizer.training:
            layers = self.quantizer.layers if self.residual else [self.quantizer]
            depth_indices = indices if self.residual else indices[..., None]
            residual = h.movedim(1, -1)
            for depth, layer in enumerate(layers):
                rows = F.normalize(residual, dim=-1) if layer.use_cosine_sim else residual
                code = F.embedding(depth_indices[..., depth], layer.codebook)
                commitment = commitment + F.mse_loss(rows, code.detach())
                codebook = codebook + F.mse_loss(code, rows.detach())
                residual = residual - code.detach()
        return codes, indices, {"commitment": commitment, "codebook": codebook}

    def _usage(self, indices: torch.Tensor) -> dict:
        if not self.residual:
            return super()._usage(indices)
        per_depth = [
            codebook_usage(indices[..., q].detach(), self.codebook_size) for q in range(indices.shape[-1])
        ]
        return {
            "usage": torch.stack([u.fraction_used for u in per_depth]).mean(),
            "perplexity": torch.stack([u.perplexity for u in per_depth]).mean(),
        }

    def _codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.quantizer.get_output_from_indices(indices)


@register_model
class FSQAutoencoder(_DiscreteAutoencoder, ConfigMixin):
    """SD-VAE encoder/decoder around a scalar quantiser: FSQ (Mentzer et al., 2023,
    https://arxiv.org/abs/2309.15505; no codebook, no auxiliary loss), LFQ (MAGVIT-v2) or BSQ.

    Args:
        in_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups,
            mid_block_add_attention: the encoder/decoder, as :class:`AutoencoderKL`.
        quantizer: "fsq", "lfq" or "bsq".
        levels: FSQ levels per latent channel (default ``[8, 5, 5, 5]``, 1000 codes); latent_channels is
            ``len(levels)``. FSQ only.
        codebook_size: LFQ/BSQ: a power of 2; latent_channels is its log2. FSQ: leave None (it is
            ``prod(levels)``).
        z_channels: encoder output / decoder input channels (default: latent_channels).
        quantizer_kwargs: extra arguments for :class:`fastlatent.nn.LFQ` / :class:`fastlatent.nn.BSQ`
            (``diversity_gamma``, ``codebook_scale``, ``inv_temperature``, ...) or :class:`fastlatent.nn.FSQ`
            (``preserve_symmetry``). Loss weights are the loss module's, not the quantiser's.

    ``losses`` (LFQ/BSQ, training only): "entropy" (per-sample entropy minus ``diversity_gamma`` times the
    batch code entropy) and "commitment", unweighted; FSQ has none. ``stats``: "indices" ``[B, h, w]``, batch
    "usage" and "perplexity".
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
        quantizer: str = "fsq",
        levels: Sequence[int] | None = None,
        codebook_size: int | None = None,
        z_channels: int | None = None,
        quantizer_kwargs: dict | None = None,
    ):
        super().__init__()
        owner = "FSQAutoencoder"
        if quantizer not in SCALAR_QUANTIZERS:
            raise ValueError(
                f"{owner}: quantizer must be one of {SCALAR_QUANTIZERS}, got {quantizer!r} (vector "
                f"quantisers {VECTOR_QUANTIZERS} are VQAutoencoder's)"
            )
        kwargs = dict(quantizer_kwargs or {})
        if not isinstance(quantizer_kwargs, (dict, type(None))):
            raise TypeError(
                f"{owner}: quantizer_kwargs must be a dict or None, got {type(quantizer_kwargs).__name__}"
            )
        reserved = {
            "dim",
            "levels",
            "codebook_size",
            "channel_first",
            "num_codebooks",
            "entropy_loss_weight",
            "commitment_loss_weight",
            "return_indices",
            "keep_num_codebooks_dim",
            "has_projections",
            "experimental_softplus_entropy_loss",
        }
        if reserved & set(kwargs):
            raise ValueError(
                f"{owner}: quantizer_kwargs may not set {sorted(reserved & set(kwargs))} (set by the "
                "autoencoder; loss weights belong to the loss module)"
            )
        if quantizer == "fsq":
            if codebook_size is not None:
                raise ValueError(
                    f"{owner}: codebook_size is prod(levels) for quantizer='fsq'; pass levels instead "
                    f"(got codebook_size={codebook_size!r})"
                )
            levels = [8, 5, 5, 5] if levels is None else levels
            if isinstance(levels, (list, tuple)) and not levels:
                raise ValueError(f"{owner}: levels must be a non-empty list of ints >= 2, got {list(levels)}")
            try:
                self.quantizer = FSQ(levels, channel_first=True, **kwargs)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{owner}: bad levels or quantizer_kwargs: {e}") from None
            latent_channels = len(self.quantizer.levels)
        else:
            if levels is not None:
                raise ValueError(
                    f"{owner}: levels applies to quantizer='fsq' only; {quantizer!r} takes codebook_size"
                )
            if (
                not isinstance(codebook_size, int)
                or isinstance(codebook_size, bool)
                or codebook_size < 2
                or codebook_size & (codebook_size - 1)
            ):
                raise ValueError(
                    f"{owner}: codebook_size must be a power of 2 >= 2 for quantizer={quantizer!r} "
                    f"(latent_channels = log2(codebook_size)), got {codebook_size!r}"
                )
            latent_channels = codebook_size.bit_length() - 1
            if quantizer == "lfq" and latent_channels > MAX_ENTROPY_DIMS:
                # the training loss keeps 2^d code probabilities: refuse here rather than at the first step
                raise ValueError(
                    f"{owner}: codebook_size must be <= 2^{MAX_ENTROPY_DIMS} for "
                    f"quantizer='lfq' (its entropy loss keeps one probability per code), got "
                    f"{codebook_size}; quantizer='bsq' factorises the entropy (up to 2^62)"
                )
            cls = LFQ if quantizer == "lfq" else BSQ
            try:
                # weight 1 on both terms: the returned breakdown carries them unweighted
                self.quantizer = cls(
                    dim=latent_channels,
                    codebook_size=codebook_size,
                    channel_first=True,
                    entropy_loss_weight=1.0,
                    commitment_loss_weight=1.0,
                    **kwargs,
                )
            except (TypeError, ValueError) as e:
                raise type(e)(f"{owner}: bad quantizer_kwargs for {quantizer!r}: {e}") from None
        self.quantizer_name = quantizer
        self.codebook_size = int(self.quantizer.codebook_size)
        self._build(
            owner,
            in_channels,
            out_channels,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            mid_block_add_attention,
            latent_channels,
            z_channels,
        )

    def _quantize(self, h: torch.Tensor):
        if self.quantizer_name == "fsq":
            codes, indices = self.quantizer(h)
            return codes, indices, {}
        (codes, indices, _), breakdown = self.quantizer(h, return_loss_breakdown=True)
        losses = {}
        if self.quantizer.training:
            gamma = self.quantizer.diversity_gamma
            losses = {
                "entropy": breakdown.per_sample_entropy - gamma * breakdown.batch_entropy,
                "commitment": breakdown.commitment,
            }
        return codes, indices, losses

    def _codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.quantizer.indices_to_codes(indices)
