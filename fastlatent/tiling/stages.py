"""The stages of a tiled network: a GroupNorm (whole-image statistics) followed by convolutions and per-pixel
ops, a residual add, or the mid-block attention; each computes a region from the regions of its inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.ops.group_norm import group_norm_apply
from fastlatent.tiling.regions import Region, clamp, crop


def activation_name(module, where: str) -> str | None:
    """The name ("silu", "gelu") of an activation module; None for an identity (fastlatent.patch's FusedAway
    included)."""
    if module is None or isinstance(module, nn.Identity):
        return None
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    raise ValueError(
        f"fastlatent.tiled: {where} is {module!r}; the tiled path fuses SiLU and exact GELU only"
    )


@dataclass
class NormSpec:
    """A GroupNorm (+ activation) applied to a stage's input; its statistics are those of the whole input."""

    groups: int
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    activation: str  # "none", "silu", "gelu"

    @classmethod
    def of(cls, norm: nn.Module, activation_module, where: str) -> "NormSpec":
        """``norm`` is an ``nn.GroupNorm`` or a :class:`fastlatent.nn.GroupNormAct` (which may carry the
        activation
        itself); ``activation_module`` is what the model applies after it."""
        if not all(hasattr(norm, a) for a in ("num_groups", "eps", "weight", "bias")):
            raise ValueError(
                f"fastlatent.tiled: {where} must be a GroupNorm (num_groups, eps, weight, bias), got "
                f"{type(norm).__name__}"
            )
        inner = getattr(norm, "activation", None)  # GroupNormAct
        outer = activation_name(activation_module, where + " activation")
        if inner is not None and outer is not None:
            raise ValueError(f"fastlatent.tiled: {where} applies two activations ({inner}, {outer})")
        act = inner or outer or "none"
        return cls(int(norm.num_groups), float(norm.eps), norm.weight, norm.bias, act)

    def __call__(self, x: torch.Tensor, run, stage: int) -> torch.Tensor:
        """Normalise ``x``, a part of stage ``stage``'s output, with that whole output's statistics."""
        mean, rstd = run.stats[(stage, self.groups)].mean_rstd(self.eps)
        return group_norm_apply(x, mean, rstd, self.weight, self.bias, self.activation)


@dataclass
class ConvSpec:
    """A 2-D convolution (or 2x2 average pool) with explicit zero padding (top, bottom, left, right)."""

    module: nn.Module
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]
    pool: bool = False

    @classmethod
    def of(cls, conv: nn.Module, where: str, extra_pad=(0, 0, 0, 0)) -> "ConvSpec":
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
            raise ValueError(
                f"fastlatent.tiled: {where} must be a zero-padded, undilated Conv2d with integer "
                f"padding, got {conv!r}"
            )
        ph, pw = conv.padding
        pad = (ph + extra_pad[0], ph + extra_pad[1], pw + extra_pad[2], pw + extra_pad[3])
        return cls(conv, tuple(conv.kernel_size), tuple(conv.stride), pad)

    def out_size(self, size):
        return tuple(
            (size[d] + self.pad[2 * d] + self.pad[2 * d + 1] - self.kernel[d]) // self.stride[d] + 1
            for d in range(2)
        )

    def input_region(self, r: Region) -> Region:
        """Rows and columns of the (unpadded) input that output region ``r`` reads, before clamping."""
        out = []
        for d in range(2):
            a, b = r[2 * d], r[2 * d + 1]
            lo = a * self.stride[d] - self.pad[2 * d]
            out += [lo, (b - 1) * self.stride[d] - self.pad[2 * d] + self.kernel[d]]
        return tuple(out)

    def __call__(self, x: torch.Tensor, have: Region, size, r: Region) -> torch.Tensor:
        """Output region ``r`` from ``x``, which holds input region ``have`` (input of size ``size``)."""
        want = self.input_region(r)
        inside = clamp(want, size)
        x = crop(x, have, inside)
        pads = (inside[2] - want[2], want[3] - inside[3], inside[0] - want[0], want[1] - inside[1])
        if any(pads):
            x = F.pad(x, pads)
        if self.pool:
            return F.avg_pool2d(x, self.kernel, self.stride)
        m = self.module
        return F.conv2d(x, m.weight, m.bias, m.stride, 0, 1, m.groups)


# ---------------------------------------------------------------- stages


class Stage:
    """A node of the schedule: output ``size`` [H, W] with ``channels``; a tile is ``cell`` of its pixels."""

    deps: tuple = ()
    norm: NormSpec | None = None  # normalises deps[0]

    def __init__(self, name, size, channels, cell):
        self.name, self.size, self.channels, self.cell = name, tuple(size), channels, tuple(cell)

    def input_region(self, pos: int, r: Region) -> Region:
        raise NotImplementedError

    def compute(self, r: Region, inputs, run) -> torch.Tensor:
        raise NotImplementedError


class InputStage(Stage):
    def __init__(self, tensor, cell):
        super().__init__("input", tensor.shape[-2:], tensor.shape[1], cell)
        self.tensor = tensor


class ConvStage(Stage):
    """``conv(upsample?(act(norm(x))))``."""

    def __init__(
        self,
        name,
        dep: Stage,
        dep_index: int,
        conv: ConvSpec,
        norm: NormSpec | None,
        upsample: bool,
        scale_num: int,
        scale_den: int,
    ):
        in_size = tuple(s * 2 for s in dep.size) if upsample else dep.size
        size = conv.out_size(in_size)
        cell = tuple(c * scale_num // scale_den for c in dep.cell)
        if upsample:
            cell = tuple(c * 2 for c in dep.cell)
        super().__init__(name, size, conv.module.out_channels if not conv.pool else dep.channels, cell)
        self.deps = (dep_index,)
        self.conv, self.norm, self.upsample, self.in_size, self.dep_size = (
            conv,
            norm,
            upsample,
            in_size,
            dep.size,
        )

    def input_region(self, pos, r):
        want = clamp(self.conv.input_region(r), self.in_size)
        if not self.upsample:
            return want
        return (want[0] // 2, (want[1] - 1) // 2 + 1, want[2] // 2, (want[3] - 1) // 2 + 1)

    def compute(self, r, inputs, run):
        have, x = inputs[0]
        if self.upsample:
            low = self.input_region(0, r)
            x = crop(x, have, low)
            if self.norm is not None:
                x = self.norm(x, run, self.deps[0])
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            have = (2 * low[0], 2 * low[1], 2 * low[2], 2 * low[3])
        else:
            x = crop(x, have, self.input_region(0, r))
            have = self.input_region(0, r)
            if self.norm is not None:
                x = self.norm(x, run, self.deps[0])
        return self.conv(x, have, self.in_size, r)


class ResidualStage(Stage):
    """``(conv2(dropout(act(norm2(h)))) + shortcut(x)) / output_scale_factor``: a resnet's second half."""

    def __init__(
        self,
        name,
        h: Stage,
        h_index: int,
        x_index: int,
        conv: ConvSpec,
        norm: NormSpec,
        shortcut: ConvSpec | None,
        output_scale: float,
    ):
        super().__init__(name, h.size, conv.module.out_channels, h.cell)
        self.deps = (h_index, x_index)
        self.conv, self.norm, self.shortcut, self.output_scale = conv, norm, shortcut, output_scale

    def input_region(self, pos, r):
        return clamp(self.conv.input_region(r), self.size) if pos == 0 else r

    def compute(self, r, inputs, run):
        (have_h, h), (have_x, x) = inputs
        need = self.input_region(0, r)
        h = self.norm(crop(h, have_h, need), run, self.deps[0])
        out = self.conv(h, need, self.size, r)
        x = crop(x, have_x, r)
        if self.shortcut is not None:
            x = self.shortcut(x, r, self.size, r)
        out = out.add_(x)
        return out if self.output_scale == 1.0 else out.div_(self.output_scale)


class AttentionStage(Stage):
    """``(x + to_out(sdpa(q, K, V))) / rescale`` with K, V over the whole latent and q per tile."""

    def __init__(self, name, x: Stage, x_index: int, attn: nn.Module, norm: NormSpec, query_chunk: int):
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
        batch = run.batch
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
            keys[:, core[0] : core[1], core[2] : core[3]] = k.view(batch, ty, tx, -1)
            values[:, core[0] : core[1], core[2] : core[3]] = v.view(batch, ty, tx, -1)
            run.tick()
        self.keys = self._heads(keys.view(batch, h * w, -1))
        self.values = self._heads(values.view(batch, h * w, -1))

    def release(self):
        self.keys = self.values = None

    def input_region(self, pos, r):
        return r

    def compute(self, r, inputs, run):
        have, x = inputs[0]
        x = crop(x, have, r)
        n, c, th, tw = x.shape
        q = self._heads(self.attn.to_q(self._tokens(x, run)))
        chunks = [
            F.scaled_dot_product_attention(qc, self.keys, self.values)
            for qc in q.split(self.query_chunk, dim=2)
        ]
        o = torch.cat(chunks, dim=2) if len(chunks) > 1 else chunks[0]
        o = o.transpose(1, 2).reshape(n, th * tw, -1)
        for layer in self.attn.to_out:
            o = layer(o)
        o = o.transpose(1, 2).reshape(n, c, th, tw)
        if self.residual:
            o = x + o
        return o if self.rescale == 1.0 else o / self.rescale
