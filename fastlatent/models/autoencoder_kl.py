"""AutoencoderKL: the SD-VAE (Rombach et al., 2022, https://arxiv.org/abs/2112.10752) on fused blocks,
weight-for-weight compatible with diffusers' ``AutoencoderKL`` and with the original CompVis/ldm
checkpoints."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from torch import nn

from fastlatent.models.autoencoders import (
    AutoencoderOutput,
    GaussianEncoderMixin,
    LatentScaleMixin,
)
from fastlatent.models.base import ConfigMixin, register_model
from fastlatent.models.vae_blocks import Decoder, Encoder, check_image_batch, check_positive_int

# Keys of CompVis checkpoints that belong to training, not to the autoencoder: the LPIPS + discriminator loss
# module and the EMA bookkeeping. Dropped when loading (reported by load_state_dict_file's return value).
TRAINING_ONLY_PREFIXES = ("loss.", "model_ema.")
# Full Stable Diffusion checkpoints hold the VAE under this prefix.
FULL_CHECKPOINT_VAE_PREFIX = "first_stage_model."

_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OLD_DIFFUSERS_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_KEY = re.compile(r"^(encoder|decoder)\.(down|up)\.\d+\.|^(encoder|decoder)\.(mid\.|norm_out\.)")


def _linear_weight(t: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight ``[C_out, C_in, 1, 1]`` (or conv1d ``[C_out, C_in, 1]``) as a linear weight."""
    return t.reshape(t.shape[0], t.shape[1]) if t.dim() > 2 else t


def is_ldm_vae_state_dict(state: dict) -> bool:
    """True when ``state`` uses the CompVis/ldm names (``encoder.down.0.block.0...``,
    ``encoder.mid.attn_1...``)."""
    return any(_LDM_KEY.match(k) for k in state)


def ldm_to_diffusers_vae_state_dict(state: dict) -> dict:
    """Renames a CompVis/ldm VAE state dict to diffusers' ``AutoencoderKL`` names.

    ``down.{i}.block.{j}`` -> ``down_blocks.{i}.resnets.{j}``, ``down.{i}.downsample`` ->
    ``down_blocks.{i}.downsamplers.0``, ``up.{i}`` -> ``up_blocks.{n-1-i}`` (ldm numbers the decoder's levels
    from the highest resolution, diffusers in the order they run), ``mid.block_{1,2}`` ->
    ``mid_block.resnets.{0,1}``, ``mid.attn_1.{norm,q,k,v,proj_out}`` ->
    ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`` (1x1 conv weights become linear weights),
    ``nin_shortcut`` -> ``conv_shortcut``, ``norm_out`` -> ``conv_norm_out``. The old diffusers attention
    names (``query, key, value, proj_attn``) are renamed too. Other keys (``quant_conv``, ``conv_in``, ...)
    are already the same and pass through, as do unknown keys (for the caller to report).
    """
    up_levels = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    num_up = max(up_levels) + 1 if up_levels else 0
    out = {}
    for key, value in state.items():
        new = key
        if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", key):
            new = f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", key):
            new = f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", key):
            new = f"decoder.up_blocks.{num_up - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", key):
            new = f"decoder.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
            new = f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", key):
            new = f"{m[1]}.mid_block.attentions.0.{_LDM_ATTENTION[m[2]]}.{m[3]}"
            if m[2] != "norm" and m[3] == "weight":
                value = _linear_weight(value)
        elif m := re.fullmatch(
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(query|key|value|proj_attn)\."
            r"(weight|bias)",
            key,
        ):
            new = f"{m[1]}.mid_block.attentions.0.{_OLD_DIFFUSERS_ATTENTION[m[2]]}.{m[3]}"
            value = _linear_weight(value) if m[3] == "weight" else value
        elif m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key):
            new = f"{m[1]}.conv_norm_out.{m[2]}"
        if ".resnets." in new:
            new = new.replace(".nin_shortcut.", ".conv_shortcut.")
        if new in out:
            raise ValueError(
                f"ldm_to_diffusers_vae_state_dict: two keys map to {new!r} (the state dict mixes ldm and "
                "diffusers names)"
            )
        out[new] = value
    return out


def diffusers_to_ldm_vae_state_dict(state: dict) -> dict:
    """The inverse of :func:`ldm_to_diffusers_vae_state_dict`: diffusers names to CompVis/ldm names (attention
    projections as 1x1 conv weights), for tools that load original SD-VAE checkpoints."""
    up_levels = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    num_up = max(up_levels) + 1 if up_levels else 0
    inverse_attention = {v: k for k, v in _LDM_ATTENTION.items()}
    out = {}
    for key, value in state.items():
        new = key
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\."
            r"(weight|bias)",
            key,
        ):
            new = f"{m[1]}.mid.attn_1.{inverse_attention[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value[:, :, None, None]
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        if re.match(r"(encoder\.down|decoder\.up)\.\d+\.block\.|(encoder|decoder)\.mid\.block_", new):
            new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out[new] = value
    return out


def _read_vae_state_dict(path: str | os.PathLike, where: str) -> tuple[dict, list[str]]:
    """The VAE tensors of a ``.safetensors`` file and the training-only keys skipped.

    A full SD checkpoint's VAE is read from its ``first_stage_model.*`` keys alone (the UNet and text encoder
    stay on disk); ``loss.*`` and ``model_ema.*`` keys are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {path} not found")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{where}: {path} must be a .safetensors file (pickled .ckpt/.pt/.bin files can run code "
            "when loaded and are refused; convert them once, on a machine you trust, with "
            "safetensors.torch.save_file(torch.load(path, weights_only=True)['state_dict'], out))"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            prefix = (
                FULL_CHECKPOINT_VAE_PREFIX
                if any(k.startswith(FULL_CHECKPOINT_VAE_PREFIX) for k in keys)
                else ""
            )
            names = {k: k[len(prefix) :] for k in keys if k.startswith(prefix)}
            dropped = [n for n in names.values() if n.startswith(TRAINING_ONLY_PREFIXES)]
            state = {n: f.get_tensor(k) for k, n in names.items() if not n.startswith(TRAINING_ONLY_PREFIXES)}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{where}: cannot read {path} as safetensors: {e}") from None
    return state, dropped


def vae_config_from_state_dict(state: dict) -> dict:
    """Architecture arguments of :class:`AutoencoderKL` read off a diffusers-named state dict's shapes.

    ``norm_num_groups`` cannot be seen in the weights and is not returned (the default, 32, is the SD-VAE's).
    """

    def get(key):
        if key not in state:
            raise ValueError(
                f"vae_config_from_state_dict: the state dict has no {key!r}; it does not look like an "
                f"SD-VAE (first keys: {sorted(state)[:5]})"
            )
        return state[key]

    levels = sorted(
        {int(m[1]) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.", k))}
    )
    if not levels:
        raise ValueError("vae_config_from_state_dict: no encoder.down_blocks.{i}.resnets keys found")
    layers = {int(m[1]) for k in state if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}
    return {
        "in_channels": int(get("encoder.conv_in.weight").shape[1]),
        "out_channels": int(get("decoder.conv_out.weight").shape[0]),
        "block_out_channels": [
            int(get(f"encoder.down_blocks.{i}.resnets.0.conv1.weight").shape[0]) for i in levels
        ],
        "layers_per_block": max(layers) + 1,
        "latent_channels": int(get("decoder.conv_in.weight").shape[1]),
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in state,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
    }


def _load_checked(model: nn.Module, state: dict, where: str, source: str) -> None:
    """``model.load_state_dict(state)`` with one error listing every missing, unexpected and mis-shaped
    key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:

        def listing(title, items):
            if not items:
                return ""
            more = f" ... and {len(items) - 12} more" if len(items) > 12 else ""
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:12]) + more

        raise ValueError(
            f"{where}: {source} does not fit this {type(model).__name__} (config "
            f"{getattr(model, 'config', {})})"
            + listing("missing keys", missing)
            + listing("unexpected keys", unexpected)
            + listing("shape mismatches", mismatched)
            + "\n  Build the model from the file's architecture (from_single_file infers it) or pass the "
            "matching config."
        )
    model.load_state_dict(state, strict=True)


@register_model
class AutoencoderKL(nn.Module, GaussianEncoderMixin, LatentScaleMixin, ConfigMixin):
    """The SD-VAE: a KL-regularised convolutional autoencoder with a diagonal Gaussian posterior.

    Parameter names and module layout are diffusers' ``AutoencoderKL`` (``encoder.*``, ``decoder.*``,
    ``quant_conv``, ``post_quant_conv``); see :mod:`fastlatent.models.vae_blocks`. With the defaults it is the
    Stable Diffusion 1.x/2.x VAE (f8, 4 latent channels, 83.7M parameters).

    Args:
        in_channels, out_channels: image channels in and out.
        block_out_channels: width per resolution level; the downsampling factor is ``f = 2 ** (len - 1)``
            (f4 to f32 with 3 to 6 levels).
        layers_per_block: encoder ResNet blocks per level (the decoder has one more, as diffusers).
        latent_channels: channels of the latents.
        norm_num_groups: GroupNorm groups, dividing every width.
        mid_block_add_attention: self-attention in the encoder and decoder mid blocks.
        use_quant_conv, use_post_quant_conv: the 1x1 convs around the latent (FLUX's VAE has neither).
        scaling_factor, shift_factor: map latents to the prior's space, ``(z - shift_factor) *
            scaling_factor``. Settable; :meth:`fit_latent_scale` computes them from data. Weights do not carry
            them: pass the published values when loading a pretrained VAE (SD 1.x/2.x: 0.18215 and 0; SDXL:
            0.13025 and 0; FLUX: 0.3611 and 0.1159). ``None`` for the shift means 0.

    Protocol: ``encode(x) -> z`` (posterior mode, or a sample with ``sample=True``), ``decode(z) -> images``,
    ``forward(x) -> AutoencoderOutput`` with the unweighted ``losses["kl"]`` (KL to N(0, I) summed over latent
    elements, averaged over the batch, as the LDM loss takes it) and ``stats["posterior"]``.
    """

    is_discrete = False

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        scaling_factor: float = 1.0,
        shift_factor: float | None = 0.0,
    ):
        super().__init__()
        check_positive_int("AutoencoderKL", "latent_channels", latent_channels)
        for name, flag in (
            ("mid_block_add_attention", mid_block_add_attention),
            ("use_quant_conv", use_quant_conv),
            ("use_post_quant_conv", use_post_quant_conv),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"AutoencoderKL: {name} must be a bool, got {flag!r}")
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
        self.decoder = Decoder(
            latent_channels,
            out_channels,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.downsample_factor = self.encoder.downsample_factor

    # ------------------------------------------------------------------ protocol

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's final conv weight, the layer the adaptive GAN weight differentiates through."""
        return self.decoder.conv_out.weight

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``[B, out_channels, h*f, w*f]`` from latents ``z [B, latent_channels, h, w]`` (not prior
        space)."""
        check_image_batch(
            "AutoencoderKL.decode", "z", z, self.latent_channels, 1, self.decoder.conv_in.weight
        )
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool | None = None, generator: torch.Generator | None = None
    ) -> AutoencoderOutput:
        """Encode and decode ``x``. ``sample_posterior`` defaults to ``self.training`` (training decodes a
        posterior sample, evaluation the mean; diffusers' forward decodes the mean unless asked)."""
        posterior = self.posterior(x)
        if sample_posterior is None:
            sample_posterior = self.training
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return AutoencoderOutput(
            reconstruction=self.decode(z),
            latents=z,
            losses={"kl": posterior.kl().mean()},
            stats={"posterior": posterior},
        )

    def enable_gradient_checkpointing(self, enabled: bool = True) -> "AutoencoderKL":
        """Recompute each encoder/decoder stage in the backward pass instead of storing its activations."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = bool(enabled)
        return self

    # ------------------------------------------------------------------ interoperability

    @classmethod
    def from_diffusers(cls, vae: nn.Module) -> "AutoencoderKL":
        """An AutoencoderKL with the config and a copy of the weights of a diffusers ``AutoencoderKL`` (same
        device and dtype). The scaling and shift factors come from ``vae.config``; per-channel
        ``latents_mean``/``latents_std`` are not carried (the prior space here is one scale and one shift)."""
        where = "AutoencoderKL.from_diffusers"
        config = getattr(vae, "config", None)
        if type(vae).__name__ != "AutoencoderKL" or config is None:
            raise TypeError(f"{where}: vae must be a diffusers AutoencoderKL, got {type(vae).__name__}")
        for name, allowed in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            types = list(config[name])
            if any(t != allowed for t in types):
                raise ValueError(
                    f"{where}: vae.config.{name} must all be {allowed!r} (the SD-VAE), got {types}"
                )
        if config.get("act_fn", "silu") not in ("silu", "swish"):
            raise ValueError(f"{where}: vae.config.act_fn must be 'silu', got {config['act_fn']!r}")
        if len(config["up_block_types"]) != len(config["block_out_channels"]):
            raise ValueError(
                f"{where}: vae.config has {len(config['up_block_types'])} up blocks for "
                f"{len(config['block_out_channels'])} block_out_channels"
            )
        model = cls(
            in_channels=config["in_channels"],
            out_channels=config["out_channels"],
            block_out_channels=list(config["block_out_channels"]),
            layers_per_block=config["layers_per_block"],
            latent_channels=config["latent_channels"],
            norm_num_groups=config["norm_num_groups"],
            mid_block_add_attention=config.get("mid_block_add_attention", True),
            use_quant_conv=config.get("use_quant_conv", True),
            use_post_quant_conv=config.get("use_post_quant_conv", True),
            scaling_factor=config.get("scaling_factor", 1.0),
            shift_factor=config.get("shift_factor") or 0.0,
        )
        reference = next(vae.parameters())
        model.to(device=reference.device, dtype=reference.dtype)
        _load_checked(model, vae.state_dict(), where, "the diffusers AutoencoderKL's state dict")
        return model.train(vae.training)

    def load_state_dict_file(self, path: str | os.PathLike) -> list[str]:
        """Loads an SD-VAE ``.safetensors`` state dict in diffusers or CompVis/ldm naming (or a full SD
        checkpoint, whose ``first_stage_model.*`` keys are taken), strictly: one ValueError lists every
        missing, unexpected and mis-shaped key. Returns the training-only keys that were skipped (``loss.*``,
        ``model_ema.*``)."""
        where = f"{type(self).__name__}.load_state_dict_file"
        state, dropped = _read_vae_state_dict(path, where)
        if is_ldm_vae_state_dict(state):
            state = ldm_to_diffusers_vae_state_dict(state)
        _load_checked(self, state, where, str(path))
        return dropped

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, **config) -> "AutoencoderKL":
        """An AutoencoderKL built from the architecture the weights in ``path`` imply (block widths, layers
        per block, channels, mid attention, quant convs) and loaded with them; ``config`` overrides or
        completes it (``norm_num_groups`` if not 32, ``scaling_factor``/``shift_factor``, which weights do not
        carry)."""
        where = f"{cls.__name__}.from_single_file"
        state, _ = _read_vae_state_dict(path, where)
        if is_ldm_vae_state_dict(state):
            state = ldm_to_diffusers_vae_state_dict(state)
        unknown = set(config) - set(inspect.signature(cls.__init__).parameters)
        if unknown:
            raise TypeError(f"{where}: unknown config arguments {sorted(unknown)}")
        model = cls(**{**vae_config_from_state_dict(state), **config})
        _load_checked(model, state, where, str(path))
        return model

    def ldm_state_dict(self) -> dict:
        """This model's weights under CompVis/ldm names (attention projections as 1x1 convs)."""
        return diffusers_to_ldm_vae_state_dict(self.state_dict())
