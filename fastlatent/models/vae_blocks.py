"""SD-VAE encoder and decoder on fastlatent's fused blocks, laid out exactly as diffusers'
``Encoder``/``Decoder``.

Module attributes and parameter names are diffusers' (``conv_in``, ``down_blocks.{i}.resnets.{j}``,
``down_blocks.{i}.downsamplers.0.conv``, ``mid_block.resnets.{0,1}``, ``mid_block.attentions.0``,
``up_blocks.{i}.resnets.{j}``, ``up_blocks.{i}.upsamplers.0.conv``, ``conv_norm_out``, ``conv_act``,
``conv_out``), so a diffusers ``AutoencoderKL`` encoder/decoder state dict loads without renaming and code
that walks diffusers' structure (tiled decoding, hooks) walks this one. Two differences, both numerical
no-ops:

* every GroupNorm + SiLU pair is one fused kernel (:class:`fastlatent.nn.GroupNormAct`); ``conv_norm_out`` is
  a ``GroupNormAct(activation="silu")`` and ``conv_act`` is an ``nn.Identity`` (``conv_act(conv_norm_out(x))``
  still computes diffusers' ``SiLU(GroupNorm(x))``; code that replaces ``conv_norm_out`` must apply
  ``conv_norm_out.activation`` itself), as :func:`fastlatent.patch` leaves a patched diffusers model;
* the mid-block attention is :class:`fastlatent.nn.AttnBlock` (diffusers' ``Attention`` parameter names).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastlatent.nn.blocks import AttnBlock, Downsample, GroupNormAct, ResnetBlock, Upsample

# diffusers' Encoder/Decoder hard-code this epsilon for every GroupNorm
VAE_NORM_EPS = 1e-6


def check_vae_architecture(
    owner: str, block_out_channels, layers_per_block, norm_num_groups, max_levels: int = 6
) -> tuple[int, ...]:
    """Validates the arguments shared by the SD-VAE encoder and decoder; returns block_out_channels as a
    tuple."""
    if isinstance(block_out_channels, (str, bytes)) or not isinstance(block_out_channels, Sequence):
        raise TypeError(
            f"{owner}: block_out_channels must be a list of ints (one per resolution level), got "
            f"{block_out_channels!r}"
        )
    channels = tuple(block_out_channels)
    if not 1 <= len(channels) <= max_levels:
        raise ValueError(
            f"{owner}: block_out_channels must have 1 to {max_levels} entries (downsampling factor "
            f"2^(len-1)), got {len(channels)}"
        )
    if not isinstance(norm_num_groups, int) or isinstance(norm_num_groups, bool) or norm_num_groups < 1:
        raise ValueError(f"{owner}: norm_num_groups must be an int >= 1, got {norm_num_groups!r}")
    for i, c in enumerate(channels):
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(f"{owner}: block_out_channels[{i}] must be an int >= 1, got {c!r}")
        if c % norm_num_groups:
            raise ValueError(
                f"{owner}: block_out_channels[{i}]={c} must be divisible by norm_num_groups="
                f"{norm_num_groups} (GroupNorm splits the channels into equal groups)"
            )
    if not isinstance(layers_per_block, int) or isinstance(layers_per_block, bool) or layers_per_block < 1:
        raise ValueError(f"{owner}: layers_per_block must be an int >= 1, got {layers_per_block!r}")
    return channels


def check_positive_int(owner: str, name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")
    return value


def check_image_batch(
    owner: str, name: str, x, channels: int, multiple_of: int, reference: torch.Tensor
) -> None:
    """Raises a ValueError/TypeError naming ``name`` unless ``x`` is a float ``[B, channels, H, W]`` tensor
    with H and W multiples of ``multiple_of``, on ``reference``'s device and (outside autocast) of its
    dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{owner}: {name} must be a torch.Tensor [B, {channels}, H, W], got {type(x).__name__}"
        )
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{owner}: {name} must have shape [B, {channels}, H, W], got {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(
            f"{owner}: {name} must be a floating-point tensor (images scaled to [-1, 1]), got "
            f"{x.dtype}; convert with x.float() / 127.5 - 1 for uint8 images"
        )
    if x.shape[2] % multiple_of or x.shape[3] % multiple_of:
        raise ValueError(
            f"{owner}: {name} height and width must be multiples of the downsampling factor "
            f"{multiple_of}, got {x.shape[2]}x{x.shape[3]} (pad or crop the images)"
        )
    if x.device != reference.device:
        raise ValueError(f"{owner}: {name} is on {x.device} but the model is on {reference.device}")
    if x.dtype != reference.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{owner}: {name} has dtype {x.dtype} but the model's parameters are {reference.dtype}; "
            f"cast one to the other or run under torch.autocast"
        )


def _vae_resnet(in_channels: int, out_channels: int, groups: int, time_embedding_norm: str = "default"):
    return ResnetBlock(
        in_channels=in_channels,
        out_channels=out_channels,
        temb_channels=None,
        groups=groups,
        eps=VAE_NORM_EPS,
        non_linearity="silu",
        time_embedding_norm=time_embedding_norm,
    )


class DownEncoderBlock(nn.Module):
    """diffusers' ``DownEncoderBlock2D`` as the VAE builds it: ``resnets`` then an optional stride-2 conv
    (``downsamplers.0.conv``, one zero row/column padded at the bottom right). ``[B, Cin, H, W] -> [B, Cout,
    H', W']``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                _vae_resnet(in_channels if i == 0 else out_channels, out_channels, groups)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = (
            nn.ModuleList([Downsample(out_channels, use_conv=True, out_channels=out_channels, padding=0)])
            if add_downsample
            else None
        )

    def forward(self, hidden_states: torch.Tensor, *args) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.downsamplers is not None:
            for downsampler in self.downsamplers:
                hidden_states = downsampler(hidden_states)
        return hidden_states


class UpDecoderBlock(nn.Module):
    """diffusers' ``UpDecoderBlock2D`` as the VAE builds it: ``resnets`` then an optional nearest-x2
    upsampling and 3x3 conv (``upsamplers.0.conv``). ``[B, Cin, H, W] -> [B, Cout, H', W']``."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                _vae_resnet(in_channels if i == 0 else out_channels, out_channels, groups, "group")
                for i in range(num_layers)
            ]
        )
        self.upsamplers = (
            nn.ModuleList([Upsample(out_channels, use_conv=True, out_channels=out_channels)])
            if add_upsample
            else None
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                hidden_states = upsampler(hidden_states)
        return hidden_states


class MidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2D`` as the VAE builds it: ``resnets.0``, then ``attentions.0`` (single-head
    self-attention, or None when ``add_attention`` is False, as in diffusers) and ``resnets.1``."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.add_attention = add_attention
        attention = (
            AttnBlock(channels, dim_head=channels, norm_num_groups=groups, eps=VAE_NORM_EPS)
            if add_attention
            else None
        )
        self.attentions = nn.ModuleList([attention])
        self.resnets = nn.ModuleList([_vae_resnet(channels, channels, groups) for _ in range(2)])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                hidden_states = attn(hidden_states)
            hidden_states = resnet(hidden_states)
        return hidden_states


class _CheckpointedStages(nn.Module):
    """Runs the heavy stages under activation checkpointing when ``gradient_checkpointing`` is on."""

    gradient_checkpointing: bool = False

    def _stage(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(module, x, use_reentrant=False)
        return module(x)


class Encoder(_CheckpointedStages):
    """SD-VAE encoder: ``[B, in_channels, H, W] -> [B, out_channels * (2 if double_z else 1), H/f, W/f]``,
    ``f = 2 ** (len(block_out_channels) - 1)``.

    Args:
        in_channels: image channels.
        out_channels: latent channels (the output has twice as many, mean and log-variance, with
            ``double_z``).
        block_out_channels: width of each resolution level, highest resolution first (SD: 128, 256, 512, 512).
        layers_per_block: ResNet blocks per level (SD: 2).
        norm_num_groups: GroupNorm groups; must divide every width (SD: 32).
        double_z: output the mean and log-variance of a diagonal Gaussian.
        mid_block_add_attention: self-attention in the mid block (SD: True).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 4,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        double_z: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        channels = check_vae_architecture("Encoder", block_out_channels, layers_per_block, norm_num_groups)
        self.in_channels = check_positive_int("Encoder", "in_channels", in_channels)
        check_positive_int("Encoder", "out_channels", out_channels)
        self.layers_per_block = layers_per_block
        self.downsample_factor = 2 ** (len(channels) - 1)
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList()
        output_channel = channels[0]
        for i, width in enumerate(channels):
            input_channel, output_channel = output_channel, width
            self.down_blocks.append(
                DownEncoderBlock(
                    input_channel,
                    output_channel,
                    layers_per_block,
                    norm_num_groups,
                    add_downsample=i < len(channels) - 1,
                )
            )
        self.mid_block = MidBlock(channels[-1], norm_num_groups, mid_block_add_attention)
        self.conv_norm_out = GroupNormAct(norm_num_groups, channels[-1], VAE_NORM_EPS, activation="silu")
        self.conv_act = nn.Identity()  # SiLU runs inside conv_norm_out's fused kernel
        self.conv_out = nn.Conv2d(channels[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        check_image_batch(
            "Encoder", "sample", sample, self.in_channels, self.downsample_factor, self.conv_in.weight
        )
        sample = self.conv_in(sample)
        for down_block in self.down_blocks:
            sample = self._stage(down_block, sample)
        sample = self._stage(self.mid_block, sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class Decoder(_CheckpointedStages):
    """SD-VAE decoder: ``[B, in_channels, h, w] -> [B, out_channels, h*f, w*f]``.

    Args:
        in_channels: latent channels.
        out_channels: image channels.
        block_out_channels, layers_per_block, norm_num_groups, mid_block_add_attention: as :class:`Encoder`
            (the same list; the decoder walks it lowest resolution first, with ``layers_per_block + 1`` ResNet
            blocks per level, as diffusers).
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        channels = check_vae_architecture("Decoder", block_out_channels, layers_per_block, norm_num_groups)
        self.in_channels = check_positive_int("Decoder", "in_channels", in_channels)
        check_positive_int("Decoder", "out_channels", out_channels)
        self.layers_per_block = layers_per_block
        self.upsample_factor = 2 ** (len(channels) - 1)
        self.conv_in = nn.Conv2d(in_channels, channels[-1], kernel_size=3, stride=1, padding=1)
        self.up_blocks = nn.ModuleList()  # registered before mid_block, so state-dict order is diffusers'
        self.mid_block = MidBlock(channels[-1], norm_num_groups, mid_block_add_attention)
        reversed_channels = list(reversed(channels))
        output_channel = reversed_channels[0]
        for i, width in enumerate(reversed_channels):
            prev_output_channel, output_channel = output_channel, width
            self.up_blocks.append(
                UpDecoderBlock(
                    prev_output_channel,
                    output_channel,
                    layers_per_block + 1,
                    norm_num_groups,
                    add_upsample=i < len(channels) - 1,
                )
            )
        self.conv_norm_out = GroupNormAct(norm_num_groups, channels[0], VAE_NORM_EPS, activation="silu")
        self.conv_act = nn.Identity()  # SiLU runs inside conv_norm_out's fused kernel
        self.conv_out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if latent_embeds is not None:
            raise ValueError(
                "Decoder: latent_embeds (diffusers' spatial-norm decoders) is not supported; pass None"
            )
        check_image_batch("Decoder", "sample", sample, self.in_channels, 1, self.conv_in.weight)
        sample = self.conv_in(sample)
        sample = self._stage(self.mid_block, sample)
        for up_block in self.up_blocks:
            sample = self._stage(up_block, sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))
