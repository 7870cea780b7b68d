"""The stage graph of a VAE decoder or encoder, built from its modules (diffusers' attribute names)."""

from __future__ import annotations

import torch
from torch import nn

from fastlatent.nn.blocks import unsupported_attention_reason
from fastlatent.tiling.stages import (
    AttentionStage,
    ConvSpec,
    ConvStage,
    InputStage,
    NormSpec,
    ResidualStage,
    Stage,
)


class StageGraph:
    """The stages of one network, in topological order (``stages[0]`` is the input tensor), built by the
    methods below from the modules they are given; each method returns the index of the stage it added."""

    def __init__(self, tensor, cell, query_chunk):
        self.stages: list[Stage] = [InputStage(tensor, cell)]
        self.query_chunk = query_chunk

    def add(self, stage: Stage) -> int:
        self.stages.append(stage)
        return len(self.stages) - 1

    def conv(self, x: int, conv: ConvSpec, name: str, norm=None, upsample=False) -> int:
        dep = self.stages[x]
        num, den = 1, 1
        if not upsample and conv.stride != (1, 1):
            if conv.stride[0] != conv.stride[1] or any(c % conv.stride[0] for c in dep.cell):
                raise ValueError(
                    f"fastlatent.tiled: {name} has stride {conv.stride}; the tile size must be a "
                    f"multiple of every downsampling factor"
                )
            den = conv.stride[0]
        return self.add(ConvStage(name, dep, x, conv, norm, upsample, num, den))

    def resnet(self, x: int, block: nn.Module, where: str) -> int:
        for attr in ("norm1", "conv1", "norm2", "conv2"):
            if getattr(block, attr, None) is None:
                raise ValueError(
                    f"fastlatent.tiled: {where} has no {attr}; expected a diffusers-style ResnetBlock2D"
                )
        if getattr(block, "time_emb_proj", None) is not None:
            raise ValueError(
                f"fastlatent.tiled: {where} has a time_emb_proj; VAE blocks take no time embedding"
            )
        if getattr(block, "upsample", None) is not None or getattr(block, "downsample", None) is not None:
            raise ValueError(
                f"fastlatent.tiled: {where} resamples inside the block, which the tiled path does not support"
            )
        if getattr(block, "time_embedding_norm", "default") not in ("default", "group"):
            raise ValueError(
                f"fastlatent.tiled: {where} has time_embedding_norm="
                f"{block.time_embedding_norm!r}; expected 'default' or 'group'"
            )
        dropout = getattr(block, "dropout", None)
        if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
            raise ValueError(
                f"fastlatent.tiled: {where}.dropout is active (training mode, p={dropout.p}); call "
                "vae.eval() first"
            )
        act = getattr(block, "nonlinearity", None)
        norm1 = NormSpec.of(
            block.norm1, None if getattr(block.norm1, "activation", None) else act, where + ".norm1"
        )
        norm2 = NormSpec.of(
            block.norm2, None if getattr(block.norm2, "activation", None) else act, where + ".norm2"
        )
        h = self.conv(x, ConvSpec.of(block.conv1, where + ".conv1"), where + ".conv1", norm=norm1)
        shortcut = getattr(block, "conv_shortcut", None)
        if shortcut is None and self.stages[x].channels != block.conv2.out_channels:
            raise ValueError(f"fastlatent.tiled: {where} changes the channel count without a conv_shortcut")
        if shortcut is not None:
            shortcut = ConvSpec.of(shortcut, where + ".conv_shortcut")
            if shortcut.kernel != (1, 1) or shortcut.stride != (1, 1) or any(shortcut.pad):
                raise ValueError(f"fastlatent.tiled: {where}.conv_shortcut must be a 1x1 convolution")
        scale = float(getattr(block, "output_scale_factor", 1.0))
        return self.add(
            ResidualStage(
                where + ".conv2",
                self.stages[h],
                h,
                x,
                ConvSpec.of(block.conv2, where + ".conv2"),
                norm2,
                shortcut,
                scale,
            )
        )

    def attention(self, x: int, attn: nn.Module, where: str) -> int:
        for attr in ("group_norm", "to_q", "to_k", "to_v", "to_out", "heads"):
            if getattr(attn, attr, None) is None:
                raise ValueError(
                    f"fastlatent.tiled: {where} has no {attr}; expected diffusers' Attention or "
                    "fastlatent.nn.AttnBlock"
                )
        if hasattr(attn, "processor"):  # diffusers' Attention: the same checks fastlatent.patch makes
            norm = attn.group_norm
            reason = unsupported_attention_reason(attn) if type(norm) is nn.GroupNorm else None
            if reason is not None:
                raise ValueError(
                    f"fastlatent.tiled: {where} {reason}, which the tiled attention does not compute"
                )
        channels = self.stages[x].channels
        if attn.to_q.out_features != channels or channels % int(attn.heads):
            raise ValueError(
                f"fastlatent.tiled: {where} has an inner width different from its {channels} channels"
            )
        norm = NormSpec.of(attn.group_norm, None, where + ".group_norm")
        return self.add(AttentionStage(where, self.stages[x], x, attn, norm, self.query_chunk))

    def mid_block(self, x: int, mid: nn.Module, where: str) -> int:
        resnets = list(mid.resnets)
        attentions = list(getattr(mid, "attentions", None) or [None] * (len(resnets) - 1))
        x = self.resnet(x, resnets[0], f"{where}.resnets.0")
        for i, (attn, block) in enumerate(zip(attentions, resnets[1:])):
            if attn is not None:
                x = self.attention(x, attn, f"{where}.attentions.{i}")
            x = self.resnet(x, block, f"{where}.resnets.{i + 1}")
        return x

    def norm_act_conv(self, x: int, coder: nn.Module, where: str) -> int:
        norm = getattr(coder, "conv_norm_out", None)
        if norm is None:
            raise ValueError(f"fastlatent.tiled: {where} has no conv_norm_out")
        act = getattr(coder, "conv_act", None)
        return self.conv(
            x,
            ConvSpec.of(coder.conv_out, where + ".conv_out"),
            where + ".conv_out",
            norm=NormSpec.of(norm, act, where + ".conv_norm_out"),
        )


def no_block_attention(block: nn.Module, where: str) -> None:
    if any(a is not None for a in (getattr(block, "attentions", None) or [])):
        raise ValueError(
            f"fastlatent.tiled: {where} has attention layers at image resolution, which the tiled path "
            "does not support (only the mid block's)"
        )


def decoder_graph(vae: nn.Module, latents: torch.Tensor, tile: int, query_chunk: int) -> StageGraph:
    dec = vae.decoder
    g = StageGraph(latents, (tile, tile), query_chunk)
    x = 0
    pqc = getattr(vae, "post_quant_conv", None)
    if pqc is not None:
        x = g.conv(x, ConvSpec.of(pqc, "post_quant_conv"), "post_quant_conv")
    x = g.conv(x, ConvSpec.of(dec.conv_in, "decoder.conv_in"), "decoder.conv_in")
    x = g.mid_block(x, dec.mid_block, "decoder.mid_block")
    for i, block in enumerate(dec.up_blocks):
        where = f"decoder.up_blocks.{i}"
        no_block_attention(block, where)
        for j, res in enumerate(block.resnets):
            x = g.resnet(x, res, f"{where}.resnets.{j}")
        for j, up in enumerate(getattr(block, "upsamplers", None) or []):
            name = f"{where}.upsamplers.{j}"
            if (
                getattr(up, "use_conv_transpose", False)
                or getattr(up, "norm", None) is not None
                or not getattr(up, "interpolate", True)
            ):
                raise ValueError(
                    f"fastlatent.tiled: {name} must be nearest x2 interpolation and a convolution"
                )
            conv = getattr(up, "conv", None) if getattr(up, "use_conv", True) else None
            if conv is None:
                raise ValueError(
                    f"fastlatent.tiled: {name} has no convolution (use_conv=False is not supported)"
                )
            x = g.conv(x, ConvSpec.of(conv, name + ".conv"), name + ".conv", upsample=True)
    g.norm_act_conv(x, dec, "decoder")
    return g


def encoder_graph(vae: nn.Module, images: torch.Tensor, tile: int, query_chunk: int) -> StageGraph:
    enc = vae.encoder
    g = StageGraph(images, (tile, tile), query_chunk)
    x = g.conv(0, ConvSpec.of(enc.conv_in, "encoder.conv_in"), "encoder.conv_in")
    for i, block in enumerate(enc.down_blocks):
        where = f"encoder.down_blocks.{i}"
        no_block_attention(block, where)
        for j, res in enumerate(block.resnets):
            x = g.resnet(x, res, f"{where}.resnets.{j}")
        for j, down in enumerate(getattr(block, "downsamplers", None) or []):
            name = f"{where}.downsamplers.{j}"
            if getattr(down, "norm", None) is not None:
                raise ValueError(
                    f"fastlatent.tiled: {name} has a norm, which the tiled path does not support"
                )
            extra = (
                (0, 1, 0, 1)
                if getattr(down, "use_conv", True) and getattr(down, "padding", 1) == 0
                else (0,) * 4
            )
            x = g.conv(x, ConvSpec.of(down.conv, name + ".conv", extra), name + ".conv")
    x = g.mid_block(x, enc.mid_block, "encoder.mid_block")
    x = g.norm_act_conv(x, enc, "encoder")
    qc = getattr(vae, "quant_conv", None)
    if qc is not None:
        g.conv(x, ConvSpec.of(qc, "quant_conv"), "quant_conv")
    return g
