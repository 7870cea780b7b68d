"""Seam-free, memory-bounded tiled VAE decode and encode.

``vae.decode`` of a 4096x4096 image holds activations of 256 channels at full resolution (several GiB each)
and runs out of accelerator memory. diffusers' ``enable_tiling()`` decodes overlapping tiles independently and
blends them; each tile then normalises with its own GroupNorm statistics and its attention sees only itself, so
colour and contrast shift from tile to tile and seams show.

:func:`tiled_decode` and :func:`tiled_encode` compute what the untiled VAE computes, tile by tile:

* The network is cut into *stages* at every GroupNorm (and at the mid-block attention). A stage is a short
  chain of per-pixel ops and convolutions, e.g. ``conv1(silu(norm1(x)))`` or
  ``conv2(silu(norm2(h))) + shortcut(x)``; it is computed over one tile plus the halo its convolutions need.
* Every GroupNorm normalises with the statistics of the whole image: a pass over the tiles of its input
  computes per-tile ``(mean, M2)`` with the fused :func:`fastlatent.ops.group_norm_stats`, merged by Chan's
  formula in float64 (no cancellation, whatever the image size), then each tile is normalised with
  :func:`fastlatent.ops.group_norm_apply` (GroupNorm + activation fused).
* The mid-block attention attends over the whole latent: keys and values of every latent pixel are computed tile
  by tile into one buffer, queries stay per tile (``F.scaled_dot_product_attention`` in query chunks).
* Activations that outlive a tile (a stage output read by the next stage and by a residual add) are kept per tile
  with the halo the consumers read, on the host (``store="host"``, pinned memory when the model is on CUDA), on
  the device (``store="device"``), or not at all (``store="recompute"``: each stage recomputes its input chain from
  the latents, so nothing image-sized is kept but the work grows with the number of GroupNorms).

The schedule is derived from the module structure (diffusers' attribute names: ``decoder.conv_in``,
``decoder.mid_block.resnets/attentions``, ``decoder.up_blocks[i].resnets/upsamplers``, ``conv_norm_out``,
``conv_act``, ``conv_out``, ``post_quant_conv``; ``encoder.down_blocks[i].resnets/downsamplers``,
``quant_conv``), not from class checks, so it works on diffusers' ``AutoencoderKL``, the same model after
:func:`fastlatent.patch`, and :class:`fastlatent.models.AutoencoderKL`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.ops.group_norm import group_norm_apply, group_norm_stats, merge_group_stats

__all__ = ["tiled_decode", "tiled_encode", "TiledRunInfo"]

Region = tuple  # (y0, y1, x0, x1): half-open rows and columns in a stage's own pixel grid

STORES = ("host", "device", "recompute")
MODES = ("exact", "fast")


# ---------------------------------------------------------------- regions


def _union(a: Region | None, b: Region | None) -> Region | None:
    if a is None:
        return b
    if b is None:
        return a
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


def _clamp(r: Region, size: tuple[int, int]) -> Region:
    return (max(r[0], 0), min(r[1], size[0]), max(r[2], 0), min(r[3], size[1]))


def _contains(outer: Region, inner: Region) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1] and outer[2] <= inner[2] and inner[3] <= outer[3]


def _crop(t: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    """The part ``want`` of a tensor that holds the region ``have``."""
    return t[:, :, want[0] - have[0]:want[1] - have[0], want[2] - have[2]:want[3] - have[2]]


def _area(r: Region) -> int:
    return max(0, r[1] - r[0]) * max(0, r[3] - r[2])


# ---------------------------------------------------------------- the ops a stage is made of




def _activation_name(module, where: str) -> str | None:
    """"silu"/"gelu" for an activation module, None for an identity (fastlatent.patch's FusedAway included)."""
    if module is None or isinstance(module, nn.Identity):
        return None
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    raise ValueError(f"fastlatent.tiled: {where} is {module!r}; the tiled path fuses SiLU and exact GELU only")


@dataclass
class _Norm:
    """A GroupNorm (+ activation) applied to a stage's input; its statistics are those of the whole input."""

    groups: int
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    activation: str  # "none", "silu", "gelu"

    @classmethod
    def of(cls, norm: nn.Module, activation_module, where: str) -> "_Norm":
        """``norm`` is an ``nn.GroupNorm`` or a :class:`fastlatent.nn.GroupNormAct` (which may carry the activation
        itself); ``activation_module`` is what the model applies after it."""
        if not all(hasattr(norm, a) for a in ("num_groups", "eps", "weight", "bias")):
            raise ValueError(f"fastlatent.tiled: {where} must be a GroupNorm (num_groups, eps, weight, bias), got "
                             f"{type(norm).__name__}")
        inner = getattr(norm, "activation", None)  # GroupNormAct
        outer = _activation_name(activation_module, where + " activation")
        if inner is not None and outer is not None:
            raise ValueError(f"fastlatent.tiled: {where} applies two activations ({inner}, {outer})")
        act = inner or outer or "none"
        return cls(int(norm.num_groups), float(norm.eps), norm.weight, norm.bias, act)

    def __call__(self, x: torch.Tensor, run, stage: int) -> torch.Tensor:
        """Normalise ``x``, a part of stage ``stage``'s output, with that whole output's statistics."""
        mean, rstd = run.stats[(stage, self.groups)].mean_rstd(self.eps)
        return group_norm_apply(x, mean, rstd, self.weight, self.bias, self.activation)


@dataclass
class _ConvSpec:
    """A 2-D convolution (or 2x2 average pool) with explicit zero padding (top, bottom, left, right)."""

    module: nn.Module
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]
    pool: bool = False

    @classmethod
    def of(cls, conv: nn.Module, where: str, extra_pad=(0, 0, 0, 0)) -> "_ConvSpec":
        if isinstance(conv, nn.AvgPool2d):
            k = conv.kernel_size if isinstance(conv.kernel_size, tuple) else (conv.kernel_size,) * 2
            s = conv.stride if isinstance(conv.stride, tuple) else (conv.stride,) * 2
            p = conv.padding if isinstance(conv.padding, tuple) else (conv.padding,) * 2
            if any(p) or conv.ceil_mode:
                raise ValueError(f"fastlatent.tiled: {where} is an AvgPool2d with padding or ceil_mode")
            return cls(conv, tuple(k), tuple(s), tuple(extra_pad), pool=True)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"fastlatent.tiled: {where} must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or tuple(conv.dilation) != (1, 1) or isinstance(conv.padding, str):
            raise ValueError(f"fastlatent.tiled: {where} must be a zero-padded, undilated Conv2d with integer "
                             f"padding, got {conv!r}")
        ph, pw = conv.padding
        pad = (ph + extra_pad[0], ph + extra_pad[1], pw + extra_pad[2], pw + extra_pad[3])
        return cls(conv, tuple(conv.kernel_size), tuple(conv.stride), pad)

    def out_size(self, size):
        return tuple((size[d] + self.pad[2 * d] + self.pad[2 * d + 1] - self.kernel[d]) // self.stride[d] + 1
                     for d in range(2))

    def input_region(self, r: Region) -> Region:
        """Rows and columns of the (unpadded) input that output region ``r`` reads, before clamping."""
        out = []
        for d in range(2):
            a, b = r[2 * d], r[2 * d + 1]
            lo = a * self.stride[d] - self.pad[2 * d]
            out += [lo, (b - 1) * self.stride[d] - self.pad[2 * d] + self.kernel[d]]
        return tuple(out)

    def __call__(self, x: torch.Tensor, have: Region, size, r: Region) -> torch.Tensor:
        """Output region ``r`` from ``x`` holding input region ``have`` (within the input of size ``size``)."""
        want = self.input_region(r)
        inside = _clamp(want, size)
        x = _crop(x, have, inside)
        pads = (inside[2] - want[2], want[3] - inside[3], inside[0] - want[0], want[1] - inside[1])
        if any(pads):
            x = F.pad(x, pads)
        if self.pool:
            return F.avg_pool2d(x, self.kernel, self.stride)
        m = self.module
        return F.conv2d(x, m.weight, m.bias, m.stride, 0, 1, m.groups)


# ---------------------------------------------------------------- stages


class _Stage:
    """One node of the schedule: output ``size`` [H, W] with ``channels``, a tile ``cell`` in its own pixels."""

    deps: tuple = ()
    norm: _Norm | None = None  # normalises deps[0]

    def __init__(self, name, size, channels, cell):
        self.name, self.size, self.channels, self.cell = name, tuple(size), channels, tuple(cell)

    def input_region(self, pos: int, r: Region) -> Region:
        raise NotImplementedError

    def compute(self, r: Region, inputs, run) -> torch.Tensor:
        raise NotImplementedError


class _InputStage(_Stage):
    def __init__(self, tensor, cell):
        super().__init__("input", tensor.shape[-2:], tensor.shape[1], cell)
        self.tensor = tensor


class _ConvStage(_Stage):
    """``conv(upsample?(act(norm(x))))``."""

    def __init__(self, name, dep: _Stage, dep_index: int, conv: _ConvSpec, norm: _Norm | None, upsample: bool,
                 scale_num: int, scale_den: int):
        in_size = tuple(s * 2 for s in dep.size) if upsample else dep.size
        size = conv.out_size(in_size)
        cell = tuple(c * scale_num // scale_den for c in dep.cell)
        if upsample:
            cell = tuple(c * 2 for c in dep.cell)
        super().__init__(name, size, conv.module.out_channels if not conv.pool else dep.channels, cell)
        self.deps = (dep_index,)
        self.conv, self.norm, self.upsample, self.in_size, self.dep_size = conv, norm, upsample, in_size, dep.size

    def input_region(self, pos, r):
        want = _clamp(self.conv.input_region(r), self.in_size)
        if not self.upsample:
            return want
        return (want[0] // 2, (want[1] - 1) // 2 + 1, want[2] // 2, (want[3] - 1) // 2 + 1)

    def compute(self, r, inputs, run):
        have, x = inputs[0]
        if self.upsample:
            low = self.input_region(0, r)
            x = _crop(x, have, low)
            if self.norm is not None:
                x = self.norm(x, run, self.deps[0])
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            have = (2 * low[0], 2 * low[1], 2 * low[2], 2 * low[3])
        else:
            x = _crop(x, have, self.input_region(0, r))
            have = self.input_region(0, r)
            if self.norm is not None:
                x = self.norm(x, run, self.deps[0])
        return self.conv(x, have, self.in_size, r)


class _ResidualStage(_Stage):
    """``(conv2(dropout(act(norm2(h)))) + shortcut(x)) / output_scale_factor``, the second half of a resnet."""

    def __init__(self, name, h: _Stage, h_index: int, x_index: int, conv: _ConvSpec, norm: _Norm,
                 shortcut: _ConvSpec | None, output_scale: float):
        super().__init__(name, h.size, conv.module.out_channels, h.cell)
        self.deps = (h_index, x_index)
        self.conv, self.norm, self.shortcut, self.output_scale = conv, norm, shortcut, output_scale

    def input_region(self, pos, r):
        return _clamp(self.conv.input_region(r), self.size) if pos == 0 else r

    def compute(self, r, inputs, run):
        (have_h, h), (have_x, x) = inputs
        need = self.input_region(0, r)
        h = self.norm(_crop(h, have_h, need), run, self.deps[0])
        out = self.conv(h, need, self.size, r)
        x = _crop(x, have_x, r)
        if self.shortcut is not None:
            x = self.shortcut(x, r, self.size, r)
        out = out.add_(x)
        return out if self.output_scale == 1.0 else out.div_(self.output_scale)


class _AttentionStage(_Stage):
    """``(x + to_out(sdpa(q, K, V))) / rescale`` with K, V over the whole latent and q per tile."""

    def __init__(self, name, x: _Stage, x_index: int, attn: nn.Module, norm: _Norm, query_chunk: int):
        super().__init__(name, x.size, x.channels, x.cell)
        self.deps = (x_index,)
        self.attn, self.norm, self.query_chunk = attn, norm, query_chunk
        self.heads = int(attn.heads)
        self.residual = bool(getattr(attn, "residual_connection", True))
        self.rescale = float(getattr(attn, "rescale_output_factor", 1.0))
        self.keys = self.values = None

    def _tokens(self, x, run):
        n, c = x.shape[:2]
        return self.norm(x, run, self.deps[0]).flatten(2).transpose(1, 2)  # [N, hw, C]

    def _heads(self, t):
        n, length, c = t.shape
        return t.view(n, length, self.heads, c // self.heads).transpose(1, 2)  # [N, heads, hw, d]

    def prepare(self, run):
        """Keys and values of every position, in row-major order, computed tile by tile."""
        batch, c = run.batch, self.channels
        h, w = self.size
        keys = values = None
        for t in run.tiles:
            core = run.core(self.deps[0], t)
            x = run.evaluate(self.deps[0], t, core)
            tokens = self._tokens(x, run)
            k, v = self.attn.to_k(tokens), self.attn.to_v(tokens)
            if keys is None:
                keys = k.new_empty(batch, h, w, k.shape[-1])
                values = v.new_empty(batch, h, w, v.shape[-1])
            ty, tx = core[1] - core[0], core[3] - core[2]
            keys[:, core[0]:core[1], core[2]:core[3]] = k.view(batch, ty, tx, -1)
            values[:, core[0]:core[1], core[2]:core[3]] = v.view(batch, ty, tx, -1)
            run.tick()
        self.keys = self._heads(keys.view(batch, h * w, -1))
        self.values = self._heads(values.view(batch, h * w, -1))

    def release(self):
        self.keys = self.values = None

    def input_region(self, pos, r):
        return r

    def compute(self, r, inputs, run):
        have, x = inputs[0]
        x = _crop(x, have, r)
        n, c, th, tw = x.shape
        q = self._heads(self.attn.to_q(self._tokens(x, run)))
        chunks = [F.scaled_dot_product_attention(qc, self.keys, self.values)
                  for qc in q.split(self.query_chunk, dim=2)]
        o = torch.cat(chunks, dim=2) if len(chunks) > 1 else chunks[0]
        o = o.transpose(1, 2).reshape(n, th * tw, -1)
        for layer in self.attn.to_out:
            o = layer(o)
        o = o.transpose(1, 2).reshape(n, c, th, tw)
        if self.residual:
            o = x + o
        return o if self.rescale == 1.0 else o / self.rescale


# ---------------------------------------------------------------- building the schedule from the modules


class _Graph:
    def __init__(self, tensor, cell, query_chunk):
        self.stages: list[_Stage] = [_InputStage(tensor, cell)]
        self.query_chunk = query_chunk

    def add(self, stage: _Stage) -> int:
        self.stages.append(stage)
        return len(self.stages) - 1

    def conv(self, x: int, conv: _ConvSpec, name: str, norm=None, upsample=False) -> int:
        dep = self.stages[x]
        num, den = 1, 1
        if not upsample and conv.stride != (1, 1):
            if conv.stride[0] != conv.stride[1] or any(c % conv.stride[0] for c in dep.cell):
                raise ValueError(f"fastlatent.tiled: {name} has stride {conv.stride}; the tile size must be a "
                                 f"multiple of every downsampling factor")
            den = conv.stride[0]
        return self.add(_ConvStage(name, dep, x, conv, norm, upsample, num, den))

    def resnet(self, x: int, block: nn.Module, where: str) -> int:
        for attr in ("norm1", "conv1", "norm2", "conv2"):
            if getattr(block, attr, None) is None:
                raise ValueError(f"fastlatent.tiled: {where} has no {attr}; expected a diffusers-style ResnetBlock2D")
        if getattr(block, "time_emb_proj", None) is not None:
            raise ValueError(f"fastlatent.tiled: {where} has a time_emb_proj; VAE blocks take no time embedding")
        if getattr(block, "upsample", None) is not None or getattr(block, "downsample", None) is not None:
            raise ValueError(f"fastlatent.tiled: {where} resamples inside the block, which the tiled path does not "
                             "support")
        if getattr(block, "time_embedding_norm", "default") not in ("default", "group"):
            raise ValueError(f"fastlatent.tiled: {where} has time_embedding_norm="
                             f"{block.time_embedding_norm!r}; expected 'default' or 'group'")
        dropout = getattr(block, "dropout", None)
        if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
            raise ValueError(f"fastlatent.tiled: {where}.dropout is active (training mode, p={dropout.p}); call "
                             "vae.eval() first")
        act = getattr(block, "nonlinearity", None)
        norm1 = _Norm.of(block.norm1, None if getattr(block.norm1, "activation", None) else act, where + ".norm1")
        norm2 = _Norm.of(block.norm2, None if getattr(block.norm2, "activation", None) else act, where + ".norm2")
        h = self.conv(x, _ConvSpec.of(block.conv1, where + ".conv1"), where + ".conv1", norm=norm1)
        shortcut = getattr(block, "conv_shortcut", None)
        if shortcut is None and self.stages[x].channels != block.conv2.out_channels:
            raise ValueError(f"fastlatent.tiled: {where} changes the channel count without a conv_shortcut")
        if shortcut is not None:
            shortcut = _ConvSpec.of(shortcut, where + ".conv_shortcut")
            if shortcut.kernel != (1, 1) or shortcut.stride != (1, 1) or any(shortcut.pad):
                raise ValueError(f"fastlatent.tiled: {where}.conv_shortcut must be a 1x1 convolution")
        scale = float(getattr(block, "output_scale_factor", 1.0))
        return self.add(_ResidualStage(where + ".conv2", self.stages[h], h, x,
                                       _ConvSpec.of(block.conv2, where + ".conv2"), norm2, shortcut, scale))

    def attention(self, x: int, attn: nn.Module, where: str) -> int:
        for attr in ("group_norm", "to_q", "to_k", "to_v", "to_out", "heads"):
            if getattr(attn, attr, None) is None:
                raise ValueError(f"fastlatent.tiled: {where} has no {attr}; expected diffusers' Attention or "
                                 "fastlatent.nn.AttnBlock")
        if hasattr(attn, "processor"):  # diffusers' Attention: the same checks fastlatent.patch makes
            from fastlatent.nn.blocks import unsupported_attention_reason

            norm = attn.group_norm
            reason = (unsupported_attention_reason(attn) if type(norm) is nn.GroupNorm else None)
            if reason is not None:
                raise ValueError(f"fastlatent.tiled: {where} {reason}, which the tiled attention does not compute")
        channels = self.stages[x].channels
        if attn.to_q.out_features != channels or channels % int(attn.heads):
            raise ValueError(f"fastlatent.tiled: {where} has an inner width different from its {channels} channels")
        norm = _Norm.of(attn.group_norm, None, where + ".group_norm")
        return self.add(_AttentionStage(where, self.stages[x], x, attn, norm, self.query_chunk))

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
        return self.conv(x, _ConvSpec.of(coder.conv_out, where + ".conv_out"), where + ".conv_out",
                         norm=_Norm.of(norm, act, where + ".conv_norm_out"))


def _no_block_attention(block: nn.Module, where: str) -> None:
    if any(a is not None for a in (getattr(block, "attentions", None) or [])):
        raise ValueError(f"fastlatent.tiled: {where} has attention layers at image resolution, which the tiled path "
                         "does not support (only the mid block's)")


def _decoder_graph(vae: nn.Module, latents: torch.Tensor, tile: int, query_chunk: int) -> _Graph:
    dec = vae.decoder
    g = _Graph(latents, (tile, tile), query_chunk)
    x = 0
    pqc = getattr(vae, "post_quant_conv", None)
    if pqc is not None:
        x = g.conv(x, _ConvSpec.of(pqc, "post_quant_conv"), "post_quant_conv")
    x = g.conv(x, _ConvSpec.of(dec.conv_in, "decoder.conv_in"), "decoder.conv_in")
    x = g.mid_block(x, dec.mid_block, "decoder.mid_block")
    for i, block in enumerate(dec.up_blocks):
        where = f"decoder.up_blocks.{i}"
        _no_block_attention(block, where)
        for j, res in enumerate(block.resnets):
            x = g.resnet(x, res, f"{where}.resnets.{j}")
        for j, up in enumerate(getattr(block, "upsamplers", None) or []):
            name = f"{where}.upsamplers.{j}"
            if getattr(up, "use_conv_transpose", False) or getattr(up, "norm", None) is not None or not getattr(
                    up, "interpolate", True):
                raise ValueError(f"fastlatent.tiled: {name} must be nearest x2 interpolation and a convolution")
            conv = getattr(up, "conv", None) if getattr(up, "use_conv", True) else None
            if conv is None:
                raise ValueError(f"fastlatent.tiled: {name} has no convolution (use_conv=False is not supported)")
            x = g.conv(x, _ConvSpec.of(conv, name + ".conv"), name + ".conv", upsample=True)
    g.norm_act_conv(x, dec, "decoder")
    return g


def _encoder_graph(vae: nn.Module, images: torch.Tensor, tile: int, query_chunk: int) -> _Graph:
    enc = vae.encoder
    g = _Graph(images, (tile, tile), query_chunk)
    x = g.conv(0, _ConvSpec.of(enc.conv_in, "encoder.conv_in"), "encoder.conv_in")
    for i, block in enumerate(enc.down_blocks):
        where = f"encoder.down_blocks.{i}"
        _no_block_attention(block, where)
        for j, res in enumerate(block.resnets):
            x = g.resnet(x, res, f"{where}.resnets.{j}")
        for j, down in enumerate(getattr(block, "downsamplers", None) or []):
            name = f"{where}.downsamplers.{j}"
            if getattr(down, "norm", None) is not None:
                raise ValueError(f"fastlatent.tiled: {name} has a norm, which the tiled path does not support")
            extra = (0, 1, 0, 1) if getattr(down, "use_conv", True) and getattr(down, "padding", 1) == 0 else (0,) * 4
            x = g.conv(x, _ConvSpec.of(down.conv, name + ".conv", extra), name + ".conv")
    x = g.mid_block(x, enc.mid_block, "encoder.mid_block")
    x = g.norm_act_conv(x, enc, "encoder")
    qc = getattr(vae, "quant_conv", None)
    if qc is not None:
        g.conv(x, _ConvSpec.of(qc, "quant_conv"), "quant_conv")
    return g


# ---------------------------------------------------------------- running the schedule


@dataclass
class TiledRunInfo:
    """What a tiled run did (pass ``info=TiledRunInfo()`` to fill one in).

    Attributes:
        tiles: tiles per pass (rows x columns of the grid).
        passes: passes over the tiles (statistics, stores, keys/values and the output pass).
        stage_evaluations: stage computations over a tile (the unit of work; an untiled run is one per stage).
        stages: stages of the schedule.
        halo: the largest halo, in input pixels, a tile reads around itself.
        stored_bytes: peak bytes of activations kept between passes (on the host with ``store="host"``).
        stats_from: "image" (exact) or the downscaled size the statistics came from (fast mode).
    """

    tiles: int = 0
    passes: int = 0
    stage_evaluations: int = 0
    stages: int = 0
    halo: int = 0
    stored_bytes: int = 0
    stats_from: str = "image"


class _Stats:
    """Whole-input statistics of one stage for one group count: (mean, var) in float64 [N, G]."""

    def __init__(self, mean, var):
        self.mean, self.var = mean, var
        self._cache = {}

    def mean_rstd(self, eps):
        if eps not in self._cache:
            self._cache[eps] = (self.mean.float(), torch.rsqrt(self.var + eps).float())
        return self._cache[eps]


def _stage_roles(stages, store: str, preset_stats: bool):
    """Consumers of each stage, the group counts whose statistics each stage's output needs, and which stage
    outputs are kept between passes: those read by a GroupNorm (or by two consumers, e.g. a residual add), unless
    everything is recomputed."""
    k = len(stages)
    consumers = [[] for _ in range(k)]
    for i, s in enumerate(stages):
        for d in s.deps:
            consumers[d].append(i)
    stats_groups = [set() for _ in range(k)]
    for s in stages:
        if s.norm is not None:
            stats_groups[s.deps[0]].add(s.norm.groups)
    if store == "recompute" or preset_stats:
        stored = [i == 0 for i in range(k)]
    else:
        stored = [i == 0 or (i != k - 1 and (bool(stats_groups[i]) or len(consumers[i]) > 1)) for i in range(k)]
    return consumers, stats_groups, stored


class _Run:
    def __init__(self, graph: _Graph, store: str, batch: int, device: torch.device, progress,
                 preset_stats: dict | None, info: TiledRunInfo, desc: str):
        self.stages = graph.stages
        self.store_kind = store
        self.batch, self.device = batch, device
        self.info = info
        k = len(self.stages)
        self.consumers, self.stats_groups, self.stored = _stage_roles(self.stages, store, preset_stats is not None)
        self.stats: dict = dict(preset_stats or {})
        self.need_stats_pass = [any((i, g) not in self.stats for g in self.stats_groups[i]) for i in range(k)]
        last = k - 1
        self.pass_stage = [i != 0 and (self.stored[i] or self.need_stats_pass[i] or i == last) for i in range(k)]
        # the last pass that reads each stage (to free stored tiles after it)
        reach = [-1] * k
        for i in reversed(range(k)):
            r = i if self.pass_stage[i] else -1
            for c in self.consumers[i]:
                r = max(r, c if self.stored[c] else reach[c])
            reach[i] = r
        self.last_read = [max([c if self.stored[c] else reach[c] for c in self.consumers[i]], default=-1)
                          for i in range(k)]
        # the last pass that evaluates each stage (attention keys and values are dropped after it)
        self.last_eval = [i if self.stored[i] else reach[i] for i in range(k)]
        base = self.stages[0]
        rows = math.ceil(base.size[0] / base.cell[0])
        cols = math.ceil(base.size[1] / base.cell[1])
        self.tiles = [(i, j) for i in range(rows) for j in range(cols)]
        self.materialized = [i == 0 for i in range(k)]
        self.store: dict = {}
        self.stored_bytes = 0
        self._plans = {t: self._plan(t) for t in self.tiles}
        self.passes = sum(self.pass_stage) + sum(isinstance(s, _AttentionStage) for s in self.stages)
        info.tiles, info.passes, info.stages = len(self.tiles), self.passes, k - 1
        self._bar = None
        if progress is not False:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.passes * len(self.tiles), desc=desc, unit="tile",
                             disable=None if progress is None else False, leave=False)

    # -- geometry

    def core(self, k: int, t) -> Region:
        s = self.stages[k]
        (i, j), (ch, cw) = t, s.cell
        return _clamp((i * ch, (i + 1) * ch, j * cw, (j + 1) * cw), s.size)

    def _propagate(self, targets: dict, stop) -> dict:
        """Regions each stage must produce so that ``targets`` can be computed; stages where ``stop`` holds are
        read as they are."""
        need = dict(targets)
        for j in range(max(need), -1, -1):
            r = need.get(j)
            if r is None or stop(j):
                continue
            s = self.stages[j]
            for pos, d in enumerate(s.deps):
                need[d] = _union(need.get(d), _clamp(s.input_region(pos, r), self.stages[d].size))
        return need

    def _plan(self, t) -> dict:
        """For tile t: the region every stage may be asked for (stored stages keep exactly this)."""
        targets = {k: self.core(k, t) for k in range(1, len(self.stages)) if self.pass_stage[k]}
        return self._propagate(targets, stop=lambda j: j == 0)

    # -- statistics

    def _accumulate(self, parts, k, t, value, have):
        core = self.core(k, t)
        x = _crop(value, have, core)
        for g in self.stats_groups[k]:
            if (k, g) in self.stats:
                continue
            count = (x.shape[1] // g) * x.shape[2] * x.shape[3]
            parts.setdefault(g, []).append((group_norm_stats(x, g), count))

    def _finish_stats(self, k, parts):
        for g, items in parts.items():
            mean, m2, count = merge_group_stats([p for p, _ in items], [c for _, c in items])
            self.stats[(k, g)] = _Stats(mean, m2 / count)

    def stats_by_group(self, k):
        return {g: self.stats[(k, g)] for g in self.stats_groups[k]}

    # -- storage

    def _put(self, k, t, region, value):
        if self.store_kind == "host" and value.is_cuda:
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            value = host
        self.store[(k, t)] = (region, value)
        self.stored_bytes += value.numel() * value.element_size()
        self.info.stored_bytes = max(self.info.stored_bytes, self.stored_bytes)

    def _get(self, k, t, want: Region):
        if k == 0:
            x = self.stages[0].tensor[:, :, want[0]:want[1], want[2]:want[3]]
            return x.to(self.device, non_blocking=True)
        have, value = self.store[(k, t)]
        if not _contains(have, want):
            raise RuntimeError(f"fastlatent.tiled: internal error, stage {self.stages[k].name} tile {t} holds "
                               f"{have} but {want} was asked for")
        # the whole kept tile in one contiguous copy (a strided slice of host memory would copy synchronously)
        return _crop(value.to(self.device, non_blocking=True), have, want)

    def _free_after(self, p):
        for k in range(1, len(self.stages)):
            if self.stored[k] and self.materialized[k] and self.last_read[k] == p:
                for t in self.tiles:
                    _, value = self.store.pop((k, t), (None, None))
                    if value is not None:
                        self.stored_bytes -= value.numel() * value.element_size()
        for k, s in enumerate(self.stages):
            if isinstance(s, _AttentionStage) and self.last_eval[k] <= p:
                s.release()

    # -- evaluation

    def evaluate(self, k: int, t, region: Region) -> torch.Tensor:
        """Stage k over ``region`` of tile t, computing whatever is not stored."""
        available = lambda j: self.materialized[j]  # noqa: E731
        need = self._propagate({k: region}, stop=available)
        uses = {j: 0 for j in need}
        for j in need:
            if not available(j):
                for d in self.stages[j].deps:
                    uses[d] += 1
        values = {}
        for j in sorted(need):
            r = need[j]
            if available(j):
                values[j] = (r, self._get(j, t, r))
                continue
            s = self.stages[j]
            values[j] = (r, s.compute(r, [values[d] for d in s.deps], self))
            self.info.stage_evaluations += 1
            for d in s.deps:
                uses[d] -= 1
                if uses[d] == 0 and d != k:
                    del values[d]
        return values[k][1]

    def tick(self):
        if self._bar is not None:
            self._bar.update(1)

    def run(self, out: torch.Tensor) -> None:
        last = len(self.stages) - 1
        try:
            for k in range(1, len(self.stages)):
                s = self.stages[k]
                if isinstance(s, _AttentionStage):
                    s.prepare(self)
                if not self.pass_stage[k]:
                    continue
                parts = {}
                for t in self.tiles:
                    region = self._plans[t][k] if self.stored[k] else self.core(k, t)
                    value = self.evaluate(k, t, region)
                    if self.need_stats_pass[k]:
                        self._accumulate(parts, k, t, value, region)
                    if self.stored[k]:
                        self._put(k, t, region, value)
                    if k == last:
                        core = self.core(k, t)
                        out[:, :, core[0]:core[1], core[2]:core[3]].copy_(_crop(value, region, core),
                                                                        non_blocking=True)
                    del value
                    self.tick()
                self._finish_stats(k, parts)
                self.materialized[k] = self.stored[k]
                self._free_after(k)
        finally:
            for s in self.stages:
                if isinstance(s, _AttentionStage):
                    s.release()
            self.store.clear()
            if self._bar is not None:
                self._bar.close()
        if out.is_cuda or self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def _halo(graph: _Graph, store: str, fast: bool) -> int:
    """The farthest, in input pixels, that a tile's computation reads beyond the tile (for a tile far from the
    image border, where nothing is clamped)."""
    stages = graph.stages
    _, stats_groups, stored = _stage_roles(stages, store, fast)
    far = 1 << 40
    saved = [(s.size, getattr(s, "in_size", None)) for s in stages]
    try:
        for s in stages:  # an unbounded image
            s.size = (far, far)
            if hasattr(s, "in_size"):
                s.in_size = (far, far)
        mid = 1 << 20

        def interior(j):
            c = stages[j].cell
            return (mid * c[0], (mid + 1) * c[0], mid * c[1], (mid + 1) * c[1])

        worst = 0.0
        for target in range(1, len(stages)):
            if not (stored[target] or stats_groups[target] or target == len(stages) - 1):
                continue
            need = {target: interior(target)}
            for j in range(target, -1, -1):
                r = need.get(j)
                if r is None or (stored[j] and j != target):
                    continue
                for pos, d in enumerate(stages[j].deps):
                    need[d] = _union(need.get(d), stages[j].input_region(pos, r))
            for j, r in need.items():
                base = interior(j)
                beyond = max(base[0] - r[0], r[1] - base[1], base[2] - r[2], r[3] - base[3])
                worst = max(worst, beyond * stages[0].cell[0] / stages[j].cell[0])
    finally:
        for s, (size, in_size) in zip(stages, saved):
            s.size = size
            if in_size is not None:
                s.in_size = in_size
    return math.ceil(worst)


# ---------------------------------------------------------------- public API


def _model_dtype_device(vae: nn.Module, part: str):
    module = getattr(vae, part, None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"fastlatent.tiled_{'decode' if part == 'decoder' else 'encode'}: vae must have a "
                         f"`{part}` module (a diffusers-compatible AutoencoderKL), got {type(vae).__name__}")
    p = next(module.parameters(), None)
    if p is None:
        raise ValueError(f"fastlatent.tiled: vae.{part} has no parameters")
    return p.dtype, p.device


def _check_common(op, name, x, channels, dtype, device, tile_size, store, mode, fast_downscale, query_chunk):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastlatent.{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"fastlatent.{op}: {name} must be 4-D [B, C, H, W], got shape {list(x.shape)}")
    if x.requires_grad and torch.is_grad_enabled():
        # the tiles run under no_grad (their activations are freed or moved off the device): no gradient
        raise ValueError(f"fastlatent.{op}: {name} requires grad, but the tiled path is not differentiable; "
                         f"pass {name}.detach() (or run under torch.no_grad()), or use the untiled model "
                         f"for a gradient")
    if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"fastlatent.{op}: {name} must have B, H, W >= 1, got shape {list(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"fastlatent.{op}: {name} must have {channels} channels (the vae's), got shape "
                         f"{list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"fastlatent.{op}: {name} must be a floating tensor, got {x.dtype}")
    if x.dtype != dtype:
        raise TypeError(f"fastlatent.{op}: {name} must have the vae's dtype {dtype}, got {x.dtype} (cast it, or the "
                        "vae, first)")
    if x.device != device:
        raise RuntimeError(f"fastlatent.{op}: {name} must be on the vae's device {device}, got {x.device}")
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"fastlatent.{op}: tile_size must be a positive int, got {tile_size!r}")
    if store not in STORES:
        raise ValueError(f"fastlatent.{op}: store must be one of {STORES}, got {store!r}")
    if mode not in MODES:
        raise ValueError(f"fastlatent.{op}: mode must be one of {MODES}, got {mode!r}")
    if isinstance(fast_downscale, bool) or not isinstance(fast_downscale, int) or fast_downscale < 1:
        raise ValueError(f"fastlatent.{op}: fast_downscale must be an int >= 1, got {fast_downscale!r}")
    if isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk < 1:
        raise ValueError(f"fastlatent.{op}: attention_chunk must be a positive int, got {query_chunk!r}")


def _run(op, build, x, tile_size, store, mode, fast_downscale, query_chunk, progress, info, downscale_multiple):
    info = TiledRunInfo() if info is None else info
    preset = None
    with torch.no_grad():
        if mode == "fast":
            h, w = x.shape[-2:]
            small = (max(downscale_multiple, h // fast_downscale // downscale_multiple * downscale_multiple),
                     max(downscale_multiple, w // fast_downscale // downscale_multiple * downscale_multiple))
            # nearest (strided) subsampling keeps each pixel's distribution; an area filter would average
            # the latents' fine detail away and shrink every layer's variance
            xs = F.interpolate(x, size=small, mode="nearest-exact") if small != (h, w) else x
            g_small = build(xs, max(small), query_chunk)
            small_out = torch.empty((x.shape[0], g_small.stages[-1].channels) + g_small.stages[-1].size,
                                    dtype=x.dtype, device=x.device)
            run_small = _Run(g_small, "device", x.shape[0], x.device, False, None, TiledRunInfo(), op)
            run_small.run(small_out)
            # stage lists of the two graphs are built from the same modules, so indices match
            preset = dict(run_small.stats)
            info.stats_from = f"{small[0]}x{small[1]}"
        graph = build(x, tile_size, query_chunk)
        halo = _halo(graph, store, mode == "fast")
        info.halo = halo
        if tile_size < halo:
            raise ValueError(f"fastlatent.{op}: tile_size={tile_size} is smaller than the receptive-field halo of "
                             f"{halo} pixels that each tile reads around itself (store={store!r}, mode={mode!r}); "
                             f"use tile_size >= {halo}")
        last = graph.stages[-1]
        out = torch.empty((x.shape[0], last.channels) + last.size, dtype=x.dtype, device=x.device)
        run = _Run(graph, store, x.shape[0], x.device, progress, preset, info, op)
        run.run(out)
    return out


def tiled_decode(vae: nn.Module, latents: torch.Tensor, tile_size: int = 64, *, store: str = "host",
                 mode: str = "exact", fast_downscale: int = 4, attention_chunk: int = 1024, progress=None,
                 info: TiledRunInfo | None = None) -> torch.Tensor:
    """Decode latents tile by tile; in exact mode the result equals ``vae.decode(latents).sample``.

    Args:
        vae: a diffusers-compatible ``AutoencoderKL`` (diffusers', the same after :func:`fastlatent.patch`, or
            :class:`fastlatent.models.AutoencoderKL`), in eval mode. Not modified.
        latents: ``[B, latent_channels, h, w]`` in the vae's dtype and on its device (fp32/fp16/bf16, CPU or
            CUDA), already divided by ``scaling_factor`` as for ``vae.decode``.
        tile_size: tile edge in latent pixels (64 = 512 image pixels for the SD-VAE). Sizes need not divide
            ``h``, ``w``.
        store: where activations that outlive a tile live:

            * ``"host"`` (default): host memory, pinned when on CUDA. Each stage is computed once; the cost is
              one device-to-host and one host-to-device copy of each kept activation. Host memory needed: about
              three activations at the largest resolution (for the SD-VAE at 4096x4096 in bf16, about 17 GB).
            * ``"device"``: as "host" but kept on the device: fastest, but the kept activations grow with the
              image (device memory then scales like an untiled decode's largest few activations).
            * ``"recompute"``: nothing image-sized is kept; each pass recomputes the stages it needs from the
              latents (with their halo). Memory is the smallest; work grows to several times a decode (one pass
              per GroupNorm, each recomputing its prefix: see ``info.stage_evaluations`` and the benchmark).
        mode: ``"exact"`` (default): every GroupNorm uses the whole image's statistics, so the output equals the
            untiled decode to floating-point rounding (no seams). ``"fast"``: the statistics come from an
            untiled decode of the latents downscaled ``fast_downscale`` times (area filter), and then every tile is
            decoded in a single pass (``store`` is not used). The statistics are then estimates: colours and
            contrast can shift slightly, uniformly over the whole image (no seams); the error is measured in
            ``benchmarks/bench_tiled_vae.py`` (max and mean absolute error against the exact decode).
        fast_downscale: the downscaling factor of fast mode's statistics pass.
        attention_chunk: queries per attention call in the mid block (keys and values span the whole latent).
        progress: a tqdm progress bar over the tiles of all passes: True, False, or None (shown when stderr is a
            terminal).
        info: a :class:`TiledRunInfo` to fill in with the passes, tiles and stage evaluations done.

    Returns:
        ``[B, out_channels, 8h, 8w]`` (for the SD-VAE's 3 upsamplings) in the latents' dtype and device.

    Memory: with ``store="host"``, peak device memory is set by the tile, not the image: the largest stage
    working set, about ``6 * C * (s * (tile_size + 2))**2 * bytes`` for the stage at upsampling factor ``s`` with
    ``C`` channels (for the SD-VAE: the 256-channel input of the last up block at ``s = 8``: about 0.8 GB at
    tile 64 in bf16), plus two terms that grow with the image but stay small: the attention's keys and values,
    ``2 * C_mid * h * w * bytes`` (C_mid = 512: 0.5 GB at 4096x4096 in bf16), and the output itself
    (``3 * 64 * h * w * bytes``). ``store="recompute"`` has the same bound with a larger halo.

    Raises:
        ValueError: latents of the wrong shape or channel count, a tile smaller than the halo it must read, an
            unknown option, or a model whose structure the tiled path does not know.
        TypeError: latents not in the vae's dtype.
        RuntimeError: latents not on the vae's device.
    """
    dtype, device = _model_dtype_device(vae, "decoder")
    first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder.conv_in
    _check_common("tiled_decode", "latents", latents, first.in_channels, dtype, device, tile_size, store, mode,
                  fast_downscale, attention_chunk)
    return _run("tiled_decode", lambda x, t, q: _decoder_graph(vae, x, t, q), latents, tile_size, store, mode,
                fast_downscale, attention_chunk, progress, info, 1)


def tiled_encode(vae: nn.Module, images: torch.Tensor, tile_size: int = 512, *, store: str = "host",
                 mode: str = "exact", fast_downscale: int = 4, attention_chunk: int = 1024, progress=None,
                 info: TiledRunInfo | None = None) -> torch.Tensor:
    """Encode images tile by tile; in exact mode the result equals the untiled encoder's output.

    Args:
        vae: a diffusers-compatible ``AutoencoderKL`` in eval mode (see :func:`tiled_decode`).
        images: ``[B, in_channels, H, W]`` in the vae's dtype and on its device, H and W multiples of the
            encoder's downsampling factor (8 for the SD-VAE).
        tile_size: tile edge in image pixels, a multiple of the downsampling factor; need not divide H, W.
        store, mode, fast_downscale, attention_chunk, progress, info: as for :func:`tiled_decode`.

    Returns:
        The moments ``[B, 2 * latent_channels, H / 8, W / 8]`` that ``vae.encode`` wraps in its posterior
        (``quant_conv`` applied): ``mean, logvar = moments.chunk(2, dim=1)``; with diffusers,
        ``DiagonalGaussianDistribution(moments)`` is ``vae.encode(images).latent_dist``.

    Memory: as :func:`tiled_decode`, with the stage sizes of the encoder (its widest full-resolution stage has
    ``block_out_channels[0]`` channels).
    """
    dtype, device = _model_dtype_device(vae, "encoder")
    op = "tiled_encode"
    _check_common(op, "images", images, vae.encoder.conv_in.in_channels, dtype, device, tile_size, store, mode,
                  fast_downscale, attention_chunk)
    factor = 2 ** sum(len(getattr(b, "downsamplers", None) or []) for b in vae.encoder.down_blocks)
    if images.shape[2] % factor or images.shape[3] % factor:
        raise ValueError(f"fastlatent.{op}: images must have H and W divisible by the encoder's downsampling factor "
                         f"{factor}, got shape {list(images.shape)} (pad the images first)")
    if tile_size % factor:
        raise ValueError(f"fastlatent.{op}: tile_size must be a multiple of the encoder's downsampling factor "
                         f"{factor}, got {tile_size}")
    return _run(op, lambda x, t, q: _encoder_graph(vae, x, t, q), images, tile_size, store, mode, fast_downscale,
                attention_chunk, progress, info, factor)
