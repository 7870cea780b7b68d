"""What every stage-1 autoencoder shares: its output record, the diagonal Gaussian posterior and the latent
scale and shift that map latents into the prior's space.

The autoencoders themselves live in :mod:`fastlatent.models.autoencoder_kl` (:class:`AutoencoderKL`) and
:mod:`fastlatent.models.discrete_autoencoders` (:class:`VQAutoencoder`, :class:`FSQAutoencoder`); all are
exported from :mod:`fastlatent.models`. The protocol they implement:

* ``encode(x [B, C, H, W] in [-1, 1]) -> latents [B, latent_channels, H/f, W/f]``; ``decode(z) -> images``;
* ``ae(x) -> AutoencoderOutput`` with UNWEIGHTED loss terms (the loss module weighs them);
* ``is_discrete``, ``latent_channels``, ``downsample_factor``, ``scaling_factor``, ``shift_factor`` (prior
  space is ``(z - shift_factor) * scaling_factor``), ``last_layer_weight`` (for the adaptive GAN weight).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from fastlatent.models.base import eval_mode
from fastlatent.models.vae_blocks import check_image_batch


@dataclass
class AutoencoderOutput:
    """What ``autoencoder(x)`` returns.

    Attributes:
        reconstruction: ``[B, C, H, W]``, the decoded images.
        latents: ``[B, latent_channels, h, w]``, what the decoder saw (a posterior sample or mode; quantised
            codes).
        losses: unweighted scalar loss terms ("kl", "commitment", "codebook", "entropy", ...).
        stats: monitoring values, not for backprop ("indices" ``[B, h, w]`` or ``[B, h, w, Q]``, "perplexity",
            "usage" as 0-dim tensors, ...); a KL autoencoder also stores its "posterior".
    """

    reconstruction: torch.Tensor
    latents: torch.Tensor
    losses: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


class DiagonalGaussian:
    """Diagonal Gaussian over latents from the encoder's moments ``[B, 2C, h, w]`` (mean, then log-variance).

    The log-variance is clamped to [-30, 20] as in the LDM/diffusers ``DiagonalGaussianDistribution``, so
    ``mean``, ``std``, ``var``, ``sample`` and ``kl`` equal diffusers' for the same moments and generator.

    Attributes:
        mean, logvar, std, var: ``[B, C, h, w]``.
    """

    def __init__(self, moments: torch.Tensor):
        if not isinstance(moments, torch.Tensor) or moments.dim() < 2 or moments.shape[1] % 2:
            shape = list(moments.shape) if isinstance(moments, torch.Tensor) else type(moments).__name__
            raise ValueError(
                f"DiagonalGaussian: moments must be [B, 2C, ...] (mean and log-variance stacked on dim "
                f"1), got {shape}"
            )
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps``; eps is drawn on the generator's device (the latents' device without one) and
        moved, as diffusers' ``randn_tensor`` does, so a seeded CPU generator gives the same latents
        anywhere."""
        device = self.mean.device if generator is None else generator.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL(self || other) (other: the standard normal when None), summed over all but the batch dim ->
        ``[B]``."""
        dims = tuple(range(1, self.mean.dim()))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` summed over all but the batch dim -> ``[B]``."""
        dims = tuple(range(1, self.mean.dim()))
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=dims
        )


def _images_of(batch, where: str) -> torch.Tensor:
    """The image tensor of a DataLoader batch: a tensor, or the first item of an (images, labels) pair."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"{where}: expected image tensors [B, C, H, W] or (images, labels) batches, got "
            f"{type(batch).__name__}"
        )
    return batch


class GaussianEncoderMixin:
    """``posterior`` and ``encode`` of a KL autoencoder: ``self.encoder`` gives the moments (through the
    optional ``self.quant_conv``) of a diagonal Gaussian; inputs are checked against ``self.in_channels`` and
    ``self.downsample_factor``."""

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """The posterior ``q(z | x)`` of images ``x [B, in_channels, H, W]`` in [-1, 1]; H and W multiples of
        f."""
        check_image_batch(
            type(self).__name__, "x", x, self.in_channels, self.downsample_factor, self.encoder.conv_in.weight
        )
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def encode(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Latents ``[B, latent_channels, H/f, W/f]``: the posterior mean, or a draw with ``sample=True``."""
        posterior = self.posterior(x)
        return posterior.sample(generator) if sample else posterior.mode()


class LatentScaleMixin:
    """``scaling_factor`` and ``shift_factor`` kept in the model's config (so ``save_pretrained`` stores the
    current values), and :meth:`fit_latent_scale` to compute them from data. The class must derive from
    :class:`fastlatent.models.ConfigMixin` and take ``scaling_factor`` and ``shift_factor`` arguments."""

    @staticmethod
    def _check_factor(name: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)

    @property
    def scaling_factor(self) -> float:
        return self.__dict__["_config"]["scaling_factor"]

    @scaling_factor.setter
    def scaling_factor(self, value: float) -> None:
        value = self._check_factor("scaling_factor", value)
        if value == 0.0:
            raise ValueError("scaling_factor must be non-zero")
        self.__dict__["_config"]["scaling_factor"] = value

    @property
    def shift_factor(self) -> float:
        return self.__dict__["_config"]["shift_factor"]

    @shift_factor.setter
    def shift_factor(self, value: float) -> None:
        self.__dict__["_config"]["shift_factor"] = self._check_factor("shift_factor", value)

    @torch.no_grad()
    def fit_latent_scale(
        self,
        data,
        max_batches: int | None = None,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[float, float]:
        """Sets ``shift_factor`` to the mean and ``scaling_factor`` to 1/std of the latents of ``data``.

        Statistics are over every latent element (all channels and positions), accumulated in float64, so that
        ``(z - shift) * scale`` has zero mean and unit variance: the LDM recipe (SD: 1/std of the first batch)
        with the FLUX/SD3 shift, over as much data as given.

        Args:
            data: an image tensor ``[N, C, H, W]`` (encoded in one batch), or an iterable of batches (tensors
                or ``(images, labels)`` pairs, as a DataLoader yields).
            max_batches: stop after this many batches of an iterable.
            sample_posterior: KL autoencoders: use posterior samples instead of the mean (the LDM recipe
                samples).
            generator: for ``sample_posterior``.

        Returns:
            ``(shift_factor, scaling_factor)``.
        """
        where = f"{type(self).__name__}.fit_latent_scale"
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f"{where}: max_batches must be an int >= 1 or None, got {max_batches!r}")
        if isinstance(data, torch.Tensor):
            batches = [data]
        elif isinstance(data, Iterable):
            batches = data
        else:
            raise TypeError(
                f"{where}: data must be an image tensor or an iterable of batches, got {type(data).__name__}"
            )
        device = next(self.parameters()).device
        # Chan et al.'s pairwise merge of (count, mean, sum of squared deviations): no cancellation when the
        # latents' mean is large against their spread
        mean = torch.zeros((), dtype=torch.float64, device=device)
        m2 = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        with eval_mode(self):
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                images = _images_of(batch, where).to(device)
                kwargs = {"sample": True, "generator": generator} if sample_posterior else {}
                z = self.encode(images, **kwargs).double()
                n = z.numel()
                if n == 0:
                    continue
                batch_mean = z.mean()
                delta = batch_mean - mean
                m2 += (z - batch_mean).square().sum() + delta.square() * (count * n / (count + n))
                mean += delta * (n / (count + n))
                count += n
        if count < 2:
            raise ValueError(f"{where}: data gave {count} latent values; need at least 2 to estimate a std")
        std = float((m2 / (count - 1)).sqrt())
        if not std > 0.0 or not math.isfinite(std):
            raise ValueError(f"{where}: the latents have std {std}; cannot scale them to unit variance")
        self.shift_factor = float(mean)
        self.scaling_factor = 1.0 / std
        return self.shift_factor, self.scaling_factor
