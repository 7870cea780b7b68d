"""DGAE: an autoencoder whose decoder is a conditional diffusion (flow-matching) model.

Liu et al., "DGAE: Diffusion-Guided Autoencoder for Efficient Latent Representation Learning", 2025,
https://arxiv.org/abs/2506.09644. The encoder is the SD-VAE's (a diagonal Gaussian posterior with a KL term);
the decoder is a UNet denoiser that sees pure-image noise concatenated with the latent, nearest-upsampled to
pixel resolution, and predicts the flow velocity. Training (per image ``x``, latent ``z ~ q(z | x)``)::

    s ~ U(0, 1) (or logit-normal), then shifted: s' = shift s / (1 + (shift - 1) s)
    x_s   = (1 - s) x + s noise                      # fastlatent.sampling.FlowSchedule's convention
    v     = unet(x_s, s * T, cond=z)                  # T = num_train_timesteps
    flow  = mean((v - (noise - x))^2)                 # the paper's L_DSM, velocity form
    x0    = x_s - s v                                 # one-step estimate of x; LPIPS(x, x0) is the
                                                      # paper's L_LPIPS
    loss  = flow_weight flow + kl_weight KL + perceptual_weight LPIPS(x, x0)
            [+ reconstruction_weight mse(x0, x)]

Decoding integrates the learned flow from noise with a few steps of :class:`fastlatent.sampling.Sampler`
(euler or dpmpp_2m over the same :class:`~fastlatent.sampling.FlowSchedule`), so a decoded image depends on
the starting noise: pass a ``generator`` (or ``noise``) for reproducible decodes.

:class:`DGAETask` is the trainer-facing task (the training protocol) with the weights above.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.models.autoencoders import (
    AutoencoderOutput,
    GaussianEncoderMixin,
    LatentScaleMixin,
    _images_of,
)
from fastlatent.models.base import ConfigMixin, evaluating, register_model
from fastlatent.models.latent_diffusion import FLOW_TIME_SAMPLING
from fastlatent.models.losses import LPIPS, check_loss_weight, reconstruction_metrics
from fastlatent.models.unet import UNet
from fastlatent.models.vae_blocks import Encoder, check_image_batch, check_positive_int
from fastlatent.sampling import FlowSchedule, Sampler

DECODE_METHODS = ("euler", "dpmpp_2m")
_OWNER = "DiffusionDecoderAutoencoder"


def _draw(kind: str, shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float32 ``randn``/``rand`` drawn on the generator's device (``device`` without one) and moved to
    ``device``, as :class:`~fastlatent.models.DiagonalGaussian` and the sampler draw: a seeded CPU generator
    gives the same numbers on any device."""
    source = device if generator is None else generator.device
    draw = torch.randn if kind == "normal" else torch.rand
    return draw(shape, generator=generator, device=source, dtype=torch.float32).to(device)


def sample_flow_times(
    batch: int,
    schedule: FlowSchedule,
    time_sampling: str,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """Training times ``s [batch]`` in [0, 1): uniform or ``sigmoid(N(0, 1))`` (SD3's logit-normal), then the
    schedule's shift ``shift s / (1 + (shift - 1) s)``, as :class:`~fastlatent.models.LatentDiffusion` draws
    them."""
    if time_sampling == "logit_normal":
        u = torch.sigmoid(_draw("normal", (batch,), generator, device))
    else:
        u = _draw("uniform", (batch,), generator, device)
    shift = schedule.shift
    return shift * u / (1 + (shift - 1) * u)


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{_OWNER}: {name} must be a bool, got {value!r}")
    return value


@register_model
class DiffusionDecoderAutoencoder(nn.Module, GaussianEncoderMixin, LatentScaleMixin, ConfigMixin):
    """DGAE: SD-VAE encoder with a KL posterior, and a flow-matching UNet decoder conditioned on the latent.

    Args:
        in_channels: image channels (the decoder generates images with as many).
        block_out_channels, layers_per_block, norm_num_groups, mid_block_add_attention: the SD-VAE encoder
            (see :class:`~fastlatent.models.AutoencoderKL`); the downsampling factor is ``f = 2 ** (len -
            1)``.
        latent_channels: channels of the latents.
        use_quant_conv: the 1x1 conv on the encoder's moments, as AutoencoderKL. (There is no post-quant conv:
            the decoder's first 3x3 conv already mixes the latent channels.)
        decoder_channels, decoder_channel_mult, decoder_layers_per_block, decoder_attention_levels,
        decoder_mid_attention, decoder_attention_head_dim, decoder_norm_num_groups, decoder_dropout,
        decoder_time_embed_dim: the :class:`~fastlatent.models.UNet` decoder (``base_channels``,
            ``channel_mult``, ...). The defaults are ADM's 256x256 layout at DGAE-B's width (128 channels, a
            512-wide time embedding, attention at 32, 16 and 8 pixels for 256-pixel images; 120M parameters,
            DGAE-B's decoder has 122M). Image sides must be multiples of ``image_multiple``, the least common
            multiple of ``f`` and the UNet's ``2 ** (len(decoder_channel_mult) - 1)``.
        flow_shift: the FlowSchedule shift used for training times and for decoding (1: none).
        num_train_timesteps: the decoder sees the time ``s`` as ``s * num_train_timesteps``.
        time_sampling: training times: ``"uniform"`` or ``"logit_normal"``.
        decode_steps, decode_method: the default sampler for :meth:`decode` (``"euler"`` or ``"dpmpp_2m"``).
        scaling_factor, shift_factor: prior space is ``(z - shift_factor) * scaling_factor``; see
            :meth:`fit_latent_scale`.

    Protocol: ``encode(x) -> z`` (posterior mode, or a draw with ``sample=True``); ``decode(z, steps, method,
    generator) -> images`` (sampled, no gradients); ``forward(x) -> AutoencoderOutput`` whose ``losses`` hold
    the unweighted "flow" (velocity MSE), "kl" (summed over latent elements, batch mean) and "x0_mse" (MSE of
    the one-step estimate; equals the flow error weighted by ``s^2``), and whose ``reconstruction`` is the
    one-step estimate ``x0`` in training mode (what LPIPS sees) and the sampler's decode in eval mode.
    """

    is_discrete = False

    def __init__(
        self,
        in_channels: int = 3,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
        use_quant_conv: bool = True,
        decoder_channels: int = 128,
        decoder_channel_mult: Sequence[int] = (1, 1, 2, 2, 4, 4),
        decoder_layers_per_block: int = 2,
        decoder_attention_levels: Sequence[int] = (3, 4, 5),
        decoder_mid_attention: bool = True,
        decoder_attention_head_dim: int | None = 64,
        decoder_norm_num_groups: int = 32,
        decoder_dropout: float = 0.0,
        decoder_time_embed_dim: int | None = None,
        flow_shift: float = 1.0,
        num_train_timesteps: int = 1000,
        time_sampling: str = "uniform",
        decode_steps: int = 10,
        decode_method: str = "euler",
        scaling_factor: float = 1.0,
        shift_factor: float | None = 0.0,
    ):
        super().__init__()
        check_positive_int(_OWNER, "in_channels", in_channels)
        check_positive_int(_OWNER, "latent_channels", latent_channels)
        check_positive_int(_OWNER, "num_train_timesteps", num_train_timesteps)
        check_positive_int(_OWNER, "decode_steps", decode_steps)
        _bool("mid_block_add_attention", mid_block_add_attention)
        _bool("use_quant_conv", use_quant_conv)
        _bool("decoder_mid_attention", decoder_mid_attention)
        if time_sampling not in FLOW_TIME_SAMPLING:
            raise ValueError(
                f"{_OWNER}: time_sampling must be one of {FLOW_TIME_SAMPLING}, got {time_sampling!r}"
            )
        if decode_method not in DECODE_METHODS:
            raise ValueError(
                f"{_OWNER}: decode_method must be one of {DECODE_METHODS}, got {decode_method!r}"
            )
        if (
            isinstance(flow_shift, bool)
            or not isinstance(flow_shift, (int, float))
            or not math.isfinite(flow_shift)
            or flow_shift <= 0
        ):
            raise ValueError(f"{_OWNER}: flow_shift must be a finite number > 0, got {flow_shift!r}")
        self.scaling_factor = scaling_factor
        self.shift_factor = 0.0 if shift_factor is None else shift_factor
        self.encoder = Encoder(
            in_channels,
            latent_channels,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            double_z=True,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        try:
            self.decoder = UNet(
                in_channels=in_channels,
                out_channels=in_channels,
                extra_in_channels=latent_channels,
                base_channels=decoder_channels,
                channel_mult=list(decoder_channel_mult),
                layers_per_block=decoder_layers_per_block,
                attention_levels=list(decoder_attention_levels),
                mid_attention=decoder_mid_attention,
                attention_head_dim=decoder_attention_head_dim,
                num_classes=0,
                norm_num_groups=decoder_norm_num_groups,
                dropout=decoder_dropout,
                time_embed_dim=decoder_time_embed_dim,
            )
        except (TypeError, ValueError) as exc:
            raise type(exc)(
                f"{_OWNER}: the decoder's arguments (decoder_channels -> base_channels, "
                f"decoder_channel_mult -> channel_mult, ...) are invalid: {exc}"
            ) from None
        self.flow_schedule = FlowSchedule(shift=float(flow_shift), num_train_timesteps=num_train_timesteps)
        self.in_channels = self.out_channels = in_channels
        self.latent_channels = latent_channels
        self.downsample_factor = self.encoder.downsample_factor
        # image sides must suit the encoder (f) and the UNet's levels
        self.image_multiple = math.lcm(self.downsample_factor, self.decoder.downsample_factor)
        self.time_sampling = time_sampling
        self.decode_steps = decode_steps
        self.decode_method = decode_method
        self._samplers: dict = {}

    def __getstate__(self):
        # Cached samplers may hold CUDA graphs, which cannot be copied: copies (EMA, pickling) start without
        # them.
        state = self.__dict__.copy()
        state["_samplers"] = {}
        return state

    # ------------------------------------------------------------------ protocol

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's final conv weight."""
        return self.decoder.conv_out.weight

    def velocity(self, x_t: torch.Tensor, s, z: torch.Tensor) -> torch.Tensor:
        """The decoder's velocity prediction ``[B, C, H, W]`` at noisy images ``x_t``, flow times ``s``
        (``[B]`` or a number, in [0, 1]) and latents ``z [B, latent_channels, H/f, W/f]``."""
        t = s * self.flow_schedule.num_train_timesteps
        return self.decoder(x_t, t, cond=z)

    def _check_latents(self, where: str, z) -> None:
        check_image_batch(where, "z", z, self.latent_channels, 1, self.decoder.conv_in.weight)
        height, width = z.shape[2] * self.downsample_factor, z.shape[3] * self.downsample_factor
        unet_multiple = self.decoder.downsample_factor
        if height % unet_multiple or width % unet_multiple:
            raise ValueError(
                f"{where}: z of {z.shape[2]}x{z.shape[3]} decodes to {height}x{width} images, but the "
                f"decoder UNet ({self.decoder.num_levels} levels) needs sides that are "
                f"multiples of {unet_multiple}"
            )

    def _sampler(self, method: str, steps: int, clip_x0: float | None):
        key = (method, steps, clip_x0)
        entry = self._samplers.get(key)
        if entry is None:
            sampler = Sampler(method, self.flow_schedule, steps, prediction="flow", clip_x0=clip_x0)

            def model_fn(x, t, z):
                return self.decoder(x, t, cond=z)

            # one model_fn per sampler: a captured CUDA graph is keyed on it, so later calls replay the graph
            entry = self._samplers[key] = (sampler, model_fn)
        return entry

    def decode(
        self,
        z: torch.Tensor,
        steps: int | None = None,
        method: str | None = None,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
        clip_x0: float | None = None,
        capture_graph: bool = False,
        progress: bool = False,
    ) -> torch.Tensor:
        """Images ``[B, in_channels, h*f, w*f]`` from latents ``z [B, latent_channels, h, w]`` (not prior
        space), by integrating the decoder's flow from noise. Runs in eval mode without gradients.

        Args:
            z: latents.
            steps: decoder evaluations (default: the config's ``decode_steps``).
            method: ``"euler"`` or ``"dpmpp_2m"`` (default: the config's ``decode_method``).
            generator: for the starting noise; the same generator state decodes to the same images.
            noise: the starting noise ``[B, in_channels, h*f, w*f]`` itself (instead of drawing it).
            clip_x0: clamp each step's clean-image estimate to ``[-clip_x0, clip_x0]`` (1.0 for [-1, 1]
                images).
            capture_graph: CUDA: capture the whole loop in a CUDA graph, replayed by later calls of the same
                shape.
            progress: a tqdm bar.
        """
        where = f"{_OWNER}.decode"
        self._check_latents(where, z)
        steps = self.decode_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{where}: steps must be an int >= 1, got {steps!r}")
        method = self.decode_method if method is None else method
        if method not in DECODE_METHODS:
            raise ValueError(
                f"{where}: method must be one of {DECODE_METHODS} (the decoder is a flow model), got "
                f"{method!r}"
            )
        if clip_x0 is not None and (
            isinstance(clip_x0, bool) or not isinstance(clip_x0, (int, float)) or not clip_x0 > 0
        ):
            raise ValueError(f"{where}: clip_x0 must be a number > 0 or None, got {clip_x0!r}")
        parameter = self.decoder.conv_in.weight
        shape = (
            z.shape[0],
            self.in_channels,
            z.shape[2] * self.downsample_factor,
            z.shape[3] * self.downsample_factor,
        )
        if noise is not None:
            if (
                not isinstance(noise, torch.Tensor)
                or tuple(noise.shape) != shape
                or not noise.is_floating_point()
            ):
                what = (
                    f"{noise.dtype} {list(noise.shape)}"
                    if isinstance(noise, torch.Tensor)
                    else type(noise).__name__
                )
                raise ValueError(f"{where}: noise must be a float tensor {list(shape)}, got {what}")
            if noise.device != z.device:
                raise ValueError(f"{where}: noise is on {noise.device} but z is on {z.device}")
        sampler, model_fn = self._sampler(method, steps, None if clip_x0 is None else float(clip_x0))
        start = shape if noise is None else noise.to(parameter.dtype)
        with evaluating(self.decoder):
            return sampler.sample(
                model_fn,
                start,
                z.to(parameter.dtype),
                generator=generator,
                capture_graph=capture_graph,
                progress=progress,
                device=z.device,
                dtype=parameter.dtype,
            )

    def flow_loss_terms(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """The flow objective for images ``x`` and their latents ``z``.

        Args:
            x: clean images ``[B, C, H, W]``.
            z: latents ``[B, latent_channels, H/f, W/f]`` (a posterior draw in training).
            noise: the Gaussian noise like ``x`` (drawn from ``generator`` when None).
            timesteps: flow times ``s [B]`` in [0, 1], already shifted (drawn when None).
            generator: for the draws.

        Returns:
            ``({"flow": ..., "x0_mse": ...}, x0_estimate [B, C, H, W], s [B])``; losses are float32 scalars.
        """
        where = f"{_OWNER}.forward"
        b = x.shape[0]
        if noise is None:
            noise = _draw("normal", x.shape, generator, x.device)
        elif not isinstance(noise, torch.Tensor) or noise.shape != x.shape or noise.device != x.device:
            what = (
                f"{list(noise.shape)} on {noise.device}"
                if isinstance(noise, torch.Tensor)
                else type(noise).__name__
            )
            raise ValueError(
                f"{where}: noise must have the shape of x {list(x.shape)} on {x.device}, got {what}"
            )
        if timesteps is None:
            s = sample_flow_times(b, self.flow_schedule, self.time_sampling, generator, x.device)
        else:
            if (
                not isinstance(timesteps, torch.Tensor)
                or timesteps.shape != (b,)
                or not timesteps.is_floating_point()
                or timesteps.device != x.device
            ):
                what = (
                    f"{timesteps.dtype} {list(timesteps.shape)} on {timesteps.device}"
                    if isinstance(timesteps, torch.Tensor)
                    else type(timesteps).__name__
                )
                raise ValueError(
                    f"{where}: timesteps must be a float tensor [B] = [{b}] on {x.device}, got {what}"
                )
            if bool(((timesteps < 0) | (timesteps > 1)).any()):
                raise ValueError(f"{where}: timesteps must be flow times in [0, 1]")
            s = timesteps.float()
        s_ = s.view(b, 1, 1, 1)
        x32, noise32 = x.float(), noise.float()
        x_t = ((1 - s_) * x32 + s_ * noise32).to(x.dtype)
        v = self.velocity(x_t, s, z)
        target = noise32 - x32
        x0 = x_t.float() - s_ * v.float()
        losses = {"flow": F.mse_loss(v.float(), target), "x0_mse": F.mse_loss(x0, x32)}
        return losses, x0.to(x.dtype), s

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool | None = None,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        decode: bool | None = None,
        steps: int | None = None,
        method: str | None = None,
    ) -> AutoencoderOutput:
        """Encodes ``x``, evaluates the flow objective and reconstructs.

        Args:
            x: images ``[B, in_channels, H, W]`` in [-1, 1]; H and W multiples of ``image_multiple``.
            sample_posterior: decode a posterior draw (default in training) or the mean (default in eval).
            generator: for the posterior draw, the decode noise, then the flow noise and times (in that
                order).
            noise, timesteps: fix the flow objective's noise ``[B, C, H, W]`` and times ``s [B]`` in [0, 1].
            decode: reconstruct with the sampler (default in eval mode) instead of the one-step estimate.
            steps, method: the sampler's, with ``decode``.

        Returns:
            :class:`AutoencoderOutput`: ``reconstruction`` (the one-step ``x0`` estimate, or the sampled
            decode), ``latents`` (what the decoder was conditioned on), ``losses`` {"flow", "kl", "x0_mse"}
            (unweighted), ``stats`` {"posterior", "timesteps" (``s``), "x0_estimate"}.
        """
        check_image_batch(_OWNER, "x", x, self.in_channels, self.image_multiple, self.encoder.conv_in.weight)
        posterior = self.posterior(x)
        if sample_posterior is None:
            sample_posterior = self.training
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        if decode is None:
            decode = not self.training
        decoded = self.decode(z, steps, method, generator) if decode else None
        losses, x0, s = self.flow_loss_terms(x, z, noise=noise, timesteps=timesteps, generator=generator)
        losses = {"flow": losses["flow"], "kl": posterior.kl().mean(), "x0_mse": losses["x0_mse"]}
        return AutoencoderOutput(
            reconstruction=x0 if decoded is None else decoded,
            latents=z,
            losses=losses,
            stats={"posterior": posterior, "timesteps": s.detach(), "x0_estimate": x0},
        )


class DGAETask(nn.Module):
    """A :class:`DiffusionDecoderAutoencoder` and its weighted objective, as the trainer drives them (no GAN).

    ``loss = flow_weight * flow + kl_weight * kl + perceptual_weight * mean(LPIPS(x, x0)) +
    reconstruction_weight
    * mse(x0, x)`` with ``x0`` the one-step estimate at the sampled flow time (DGAE's Eq. 8, plus an optional
    pixel term the paper does not use).

    Args:
        autoencoder: the DGAE.
        flow_weight, kl_weight, perceptual_weight, reconstruction_weight: as above (LDM's KL weight 1e-6 by
            default); ``perceptual_weight=0`` builds no LPIPS network.
        lpips_net, pretrained_lpips: see :class:`~fastlatent.models.LPIPS` (the backbone weights must be in
            the torch hub cache; ``pretrained_lpips=False`` is a random backbone, for tests only).

    ``training_step((images, labels) or images, step) -> {"loss", "flow", "kl", "x0_mse",
    "perceptual_loss"}``; ``validation_step(batch)`` decodes with the sampler and reports mse and psnr.
    """

    def __init__(
        self,
        autoencoder: DiffusionDecoderAutoencoder,
        flow_weight: float = 1.0,
        kl_weight: float = 1e-6,
        perceptual_weight: float = 1.0,
        reconstruction_weight: float = 0.0,
        lpips_net: str = "vgg",
        pretrained_lpips: bool = True,
    ):
        super().__init__()
        if not isinstance(autoencoder, DiffusionDecoderAutoencoder):
            raise TypeError(
                f"DGAETask: autoencoder must be a DiffusionDecoderAutoencoder, got "
                f"{type(autoencoder).__name__} (train other autoencoders with AutoencoderTask)"
            )
        self.weights = {
            "flow": check_loss_weight("DGAETask", "flow_weight", flow_weight),
            "kl": check_loss_weight("DGAETask", "kl_weight", kl_weight),
            "x0_mse": check_loss_weight("DGAETask", "reconstruction_weight", reconstruction_weight),
        }
        self.perceptual_weight = check_loss_weight("DGAETask", "perceptual_weight", perceptual_weight)
        if self.perceptual_weight > 0 and autoencoder.in_channels not in (1, 3):
            raise ValueError(
                f"DGAETask: LPIPS compares grey or RGB images, the autoencoder has "
                f"{autoencoder.in_channels} channels; use perceptual_weight=0"
            )
        self.autoencoder = autoencoder
        self.perceptual = LPIPS(lpips_net, pretrained_lpips) if self.perceptual_weight > 0 else None

    def _images(self, batch, where: str) -> torch.Tensor:
        return _images_of(batch, where).to(self.autoencoder.last_layer_weight.device)

    def training_step(self, batch, step: int) -> dict:
        x = self._images(batch, "DGAETask.training_step")
        output = self.autoencoder(x, decode=False)
        loss = sum(self.weights[name] * value.float() for name, value in output.losses.items())
        metrics = {name: value.detach() for name, value in output.losses.items()}
        if self.perceptual is not None:
            perceptual = self.perceptual(x.float(), output.stats["x0_estimate"].float()).mean()
            loss = loss + self.perceptual_weight * perceptual
            metrics["perceptual_loss"] = perceptual.detach()
        return {"loss": loss, **metrics}

    @torch.no_grad()
    def validation_step(
        self, batch, steps: int | None = None, method: str | None = None, seed: int = 0
    ) -> dict:
        """Sampled reconstructions of the posterior mean (noise from ``seed``, so repeated validations agree):
        mse and psnr (images in [-1, 1]), and the flow loss at seeded times."""
        x = self._images(batch, "DGAETask.validation_step")
        generator = torch.Generator(device=x.device).manual_seed(seed)
        with evaluating(self):
            output = self.autoencoder(x, generator=generator, decode=True, steps=steps, method=method)
        return {
            "flow": output.losses["flow"],
            "x0_mse": output.losses["x0_mse"],
            **reconstruction_metrics(x, output.reconstruction),
        }
