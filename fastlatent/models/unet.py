"""A small latent UNet denoiser (ADM / Stable Diffusion layout) on fastlatent's fused blocks.

``conv_in -> down levels (ResnetBlocks [+ AttnBlock], Downsample) -> mid (Resnet, Attn, Resnet) -> up levels
(ResnetBlocks on [h; skip] [+ AttnBlock], Upsample) -> GroupNorm+SiLU -> conv_out``. Every GroupNorm + SiLU
pair is one fused kernel (:class:`fastlatent.nn.ResnetBlock`, :class:`fastlatent.nn.GroupNormAct`). The
timestep embedding (sinusoidal, MLP) plus an optional class embedding feeds every ResnetBlock.

Two kinds of conditioning:

* ``labels``: class indices with a null class ``num_classes`` for classifier-free guidance (``num_classes=0``:
  an unconditional model). As with :class:`~fastlatent.models.DiT`, label dropout is the diffusion wrapper's
  job.
* ``cond``: a conditioning image concatenated to the input channels (``extra_in_channels`` of them), e.g. the
  latent of a diffusion-decoder autoencoder (DGAE) or a low-resolution image for super-resolution. ``cond``
  may be smaller than ``x`` by an integer factor; it is then nearest-upsampled to ``x``'s size first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.models.base import ConfigMixin, register_model
from fastlatent.models.dit import check_class_labels, check_timesteps, timestep_embedding
from fastlatent.nn.blocks import AttnBlock, Downsample, GroupNormAct, ResnetBlock, Upsample


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"UNet: {name} must be an int >= 1, got {value!r}")
    return value


@register_model
class UNet(nn.Module, ConfigMixin):
    """Latent UNet denoiser.

    Args:
        in_channels: channels of the noisy input ``x``.
        out_channels: output channels (defaults to ``in_channels``).
        extra_in_channels: channels of the conditioning image ``cond`` concatenated to ``x`` (0: none).
        base_channels: width of the first level.
        channel_mult: width multiplier per level; ``len(channel_mult)`` levels, each but the last halving the
            resolution (so ``x``'s height and width must be divisible by ``2 ** (len(channel_mult) - 1)``).
        layers_per_block: ResnetBlocks per down level (up levels have one more, for the extra skip).
        attention_levels: indices of the levels (0 = full resolution) whose ResnetBlocks are followed by
            self-attention.
        mid_attention: self-attention between the two middle ResnetBlocks.
        attention_head_dim: channels per attention head (``None``: one head per block).
        num_classes: class count; 0 = unconditional. Label ``num_classes`` is the null class.
        norm_num_groups: GroupNorm groups (must divide every level's width).
        dropout: dropout inside the ResnetBlocks.
        time_embed_dim: width of the time/class embedding (default ``4 * base_channels``).

    ``forward(x [B, in_channels, H, W], t [B] or a number, labels [B] int64 or None, cond [B,
    extra_in_channels, H/k, W/k] or None) -> [B, out_channels, H, W]``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int | None = None,
        extra_in_channels: int = 0,
        base_channels: int = 128,
        channel_mult: list[int] = (1, 2, 2),
        layers_per_block: int = 2,
        attention_levels: list[int] = (1,),
        mid_attention: bool = True,
        attention_head_dim: int | None = None,
        num_classes: int = 0,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        time_embed_dim: int | None = None,
    ):
        super().__init__()
        _positive_int(in_channels, "in_channels")
        out_channels = in_channels if out_channels is None else _positive_int(out_channels, "out_channels")
        if (
            isinstance(extra_in_channels, bool)
            or not isinstance(extra_in_channels, int)
            or extra_in_channels < 0
        ):
            raise ValueError(f"UNet: extra_in_channels must be an int >= 0, got {extra_in_channels!r}")
        _positive_int(base_channels, "base_channels")
        _positive_int(layers_per_block, "layers_per_block")
        _positive_int(norm_num_groups, "norm_num_groups")
        channel_mult = list(channel_mult)
        if not channel_mult or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in channel_mult
        ):
            raise ValueError(
                f"UNet: channel_mult must be a non-empty list of ints >= 1, got {channel_mult!r}"
            )
        attention_levels = sorted(set(attention_levels))
        if any(
            not isinstance(level, int) or not 0 <= level < len(channel_mult) for level in attention_levels
        ):
            raise ValueError(
                f"UNet: attention_levels must be level indices in [0, {len(channel_mult)}), "
                f"got {attention_levels!r}"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(
                f"UNet: num_classes must be an int >= 0 (0 = unconditional), got {num_classes!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNet: dropout must be in [0, 1), got {dropout!r}")
        widths = [base_channels * m for m in channel_mult]
        for width in widths:
            if width % norm_num_groups:
                raise ValueError(
                    f"UNet: norm_num_groups ({norm_num_groups}) must divide every level's width "
                    f"base_channels * channel_mult = {widths}"
                )
            if attention_head_dim is not None and width % attention_head_dim:
                raise ValueError(
                    f"UNet: attention_head_dim ({attention_head_dim}) must divide every level's width "
                    f"{widths}"
                )
        time_embed_dim = (
            4 * base_channels if time_embed_dim is None else _positive_int(time_embed_dim, "time_embed_dim")
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.extra_in_channels = extra_in_channels
        self.num_classes = num_classes
        self.base_channels = base_channels
        self.num_levels = len(channel_mult)
        self.downsample_factor = 2 ** (len(channel_mult) - 1)

        self.time_embedding = nn.Sequential(
            nn.Linear(base_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.class_embedding = nn.Embedding(num_classes + 1, time_embed_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_channels + extra_in_channels, widths[0], kernel_size=3, padding=1)

        def resnet(cin, cout):
            return ResnetBlock(
                in_channels=cin,
                out_channels=cout,
                temb_channels=time_embed_dim,
                groups=norm_num_groups,
                dropout=dropout,
                eps=1e-5,
            )

        def attention(width):
            return AttnBlock(width, dim_head=attention_head_dim, norm_num_groups=norm_num_groups, eps=1e-5)

        self.down = nn.ModuleList()
        skip_widths = [widths[0]]
        width = widths[0]
        for level, level_width in enumerate(widths):
            stage = nn.Module()
            stage.resnets = nn.ModuleList()
            stage.attentions = nn.ModuleList()
            for _ in range(layers_per_block):
                stage.resnets.append(resnet(width, level_width))
                width = level_width
                if level in attention_levels:
                    stage.attentions.append(attention(width))
                skip_widths.append(width)
            stage.downsample = None
            if level < len(widths) - 1:
                stage.downsample = Downsample(width, use_conv=True, padding=1)
                skip_widths.append(width)
            self.down.append(stage)

        self.mid_block1 = resnet(width, width)
        self.mid_attention = attention(width) if mid_attention else None
        self.mid_block2 = resnet(width, width)

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            stage = nn.Module()
            stage.resnets = nn.ModuleList()
            stage.attentions = nn.ModuleList()
            for _ in range(layers_per_block + 1):
                stage.resnets.append(resnet(width + skip_widths.pop(), widths[level]))
                width = widths[level]
                if level in attention_levels:
                    stage.attentions.append(attention(width))
            stage.upsample = Upsample(width, use_conv=True) if level > 0 else None
            self.up.append(stage)

        self.norm_out = GroupNormAct(norm_num_groups, width, eps=1e-5, activation="silu")
        self.conv_out = nn.Conv2d(width, out_channels, kernel_size=3, padding=1)
        # Zero output: the untrained model predicts 0 (eps = 0 / velocity = 0), a stable start as in ADM.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _check_inputs(self, x, cond):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"UNet: x must be [B, {self.in_channels}, H, W], got {shape}")
        h, w = x.shape[2:]
        if h % self.downsample_factor or w % self.downsample_factor:
            raise ValueError(
                f"UNet: x's height and width must be divisible by {self.downsample_factor} "
                f"({self.num_levels} levels), got {h}x{w}"
            )
        if self.extra_in_channels == 0:
            if cond is not None:
                raise ValueError("UNet: cond must be None (this UNet was built with extra_in_channels=0)")
            return None
        if (
            not isinstance(cond, torch.Tensor)
            or cond.dim() != 4
            or cond.shape[0] != x.shape[0]
            or cond.shape[1] != self.extra_in_channels
        ):
            shape = list(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(
                f"UNet: cond must be [B, {self.extra_in_channels}, H', W'] with B = {x.shape[0]} "
                f"(extra_in_channels={self.extra_in_channels}), got {shape}"
            )
        if cond.device != x.device:
            raise ValueError(f"UNet: cond is on {cond.device} but x is on {x.device}")
        ch, cw = cond.shape[2:]
        if (ch, cw) != (h, w):
            if ch == 0 or cw == 0 or h % ch or w % cw or h // ch != w // cw:
                raise ValueError(
                    f"UNet: cond's size {ch}x{cw} must equal x's {h}x{w} or divide it by one integer "
                    "factor (nearest upsampling)"
                )
            cond = F.interpolate(cond, size=(h, w), mode="nearest")
        return cond.to(x.dtype)

    def forward(
        self, x: torch.Tensor, t, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        cond = self._check_inputs(x, cond)
        t = check_timesteps("UNet", t, x.shape[0], x.device)
        labels = check_class_labels("UNet", labels, x.shape[0], self.num_classes, x.device)
        temb = self.time_embedding(timestep_embedding(t, self.base_channels).to(self.conv_in.weight.dtype))
        if self.class_embedding is not None:
            temb = temb + self.class_embedding(labels)

        h = self.conv_in(x if cond is None else torch.cat([x, cond], dim=1))
        skips = [h]
        for stage in self.down:
            for i, block in enumerate(stage.resnets):
                h = block(h, temb)
                if len(stage.attentions):
                    h = stage.attentions[i](h)
                skips.append(h)
            if stage.downsample is not None:
                h = stage.downsample(h)
                skips.append(h)

        h = self.mid_block1(h, temb)
        if self.mid_attention is not None:
            h = self.mid_attention(h)
        h = self.mid_block2(h, temb)

        for stage in self.up:
            for i, block in enumerate(stage.resnets):
                h = block(torch.cat([h, skips.pop()], dim=1), temb)
                if len(stage.attentions):
                    h = stage.attentions[i](h)
            if stage.upsample is not None:
                h = stage.upsample(h)
        return self.conv_out(self.norm_out(h))
