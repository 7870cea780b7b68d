"""Decoder building blocks on the fused GroupNorm + activation op.

Parameter names follow the checkpoints people load, so ``load_state_dict`` works without renaming:

* :class:`GroupNormAct`: ``nn.GroupNorm`` (``weight``, ``bias``) with the activation that follows it.
* :class:`ResnetBlock`: diffusers' ``ResnetBlock2D`` (``norm1, conv1, time_emb_proj, norm2, dropout, conv2,
  conv_shortcut``), as in the SD-VAE and diffusers' UNets.
* :class:`TamingResnetBlock`: taming-transformers' VQGAN ``ResnetBlock`` (``norm1, conv1, temb_proj, norm2,
  dropout, conv2, conv_shortcut | nin_shortcut``).
* :class:`Upsample`, :class:`Downsample`: diffusers' ``Upsample2D``/``Downsample2D`` and taming's
  ``Upsample``/``Downsample`` (all name their convolution ``conv``).
* :class:`AttnBlock`: diffusers' ``Attention`` as the SD-VAE mid block builds it (``group_norm, to_q, to_k,
  to_v, to_out.0``), on ``F.scaled_dot_product_attention``.

The blocks compute what their diffusers/taming counterparts compute; the only numerical difference is the
fused GroupNorm kernel (fp32-or-better statistics, so at most a few ulps of the output dtype apart from
``nn.GroupNorm``). Each has a ``from_diffusers``/``from_taming`` constructor that shares the counterpart's
parameters and submodules (no copies), which is what :func:`fastlatent.patch` uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.nn.conv_fusion import (
    is_plain_conv3x3,
    norm_act_conv,
    upsample_nearest2x_conv3x3,
)
from fastlatent.ops.group_norm import group_norm

# Activation names accepted by the fused op, and the diffusers ``non_linearity`` strings that map onto them.
FUSABLE_ACTIVATIONS = (None, "silu", "gelu")
_DIFFUSERS_ACTIVATIONS = {"swish": "silu", "silu": "silu", "gelu": "gelu"}


def _check_activation(activation) -> None:
    if activation not in FUSABLE_ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'gelu', got {activation!r}")


def _activation_module(activation: str) -> nn.Module:
    return nn.SiLU() if activation == "silu" else nn.GELU()


class GroupNormAct(nn.Module):
    """``act(nn.GroupNorm(x))`` in one fused kernel, state-dict compatible with ``nn.GroupNorm``.

    Args:
        num_groups: G, dividing ``num_channels``.
        num_channels: C.
        eps: added to the variance.
        affine: learnable per-channel ``weight`` (ones) and ``bias`` (zeros), as ``nn.GroupNorm``.
        activation: ``"silu"``, ``"gelu"`` (exact, erf-based, as ``nn.GELU()``) or ``None``.

    ``forward(x, residual=None)``: ``x`` is ``[N, C, *spatial]`` (any number of spatial dims, including none;
    NCHW or channels-last strides, kept in the output), float32/float16/bfloat16 (float64 on the CPU).
    ``residual`` (x's shape and dtype) is added after the activation, in the same pass. Statistics are
    computed in fp32 or better whatever the input dtype; the output has x's dtype (unlike ``nn.GroupNorm``
    under CUDA autocast, which returns fp32).
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        activation: str | None = "silu",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if num_groups < 1 or num_channels < 1 or num_channels % num_groups != 0:
            raise ValueError(
                f"num_channels must be divisible by num_groups (both >= 1), got num_channels="
                f"{num_channels}, num_groups={num_groups}"
            )
        _check_activation(activation)
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.activation = activation
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm, activation: str | None = "silu") -> "GroupNormAct":
        """A GroupNormAct that shares ``gn``'s Parameter objects (no copy) and its training flag."""
        if not isinstance(gn, nn.GroupNorm):
            raise TypeError(f"gn must be an nn.GroupNorm, got {type(gn).__name__}")
        # Built on the meta device so that no throw-away parameters are allocated before sharing gn's.
        new = cls(gn.num_groups, gn.num_channels, gn.eps, gn.affine, activation, device="meta")
        if gn.affine:
            new.weight = gn.weight
            new.bias = gn.bias
        new.train(gn.training)
        return new

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"GroupNormAct: x must be [N, {self.num_channels}, *spatial], got shape {list(x.shape)}"
            )
        return group_norm(
            x,
            self.weight,
            self.bias,
            self.num_groups,
            self.eps,
            "none" if self.activation is None else self.activation,
            residual,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"activation={self.activation}"
        )


def _conv3x3(cin, cout, device, dtype):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, device=device, dtype=dtype)


def _add_shortcut(out: torch.Tensor, shortcut: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``(shortcut + out) / scale``, bit-identical to the eager expression, written into ``out``.

    ``out`` is a convolution's fresh output (its backward needs neither it nor this add's inputs), so the
    in-place add saves one activation-sized allocation per block, which dominates on the CPU at decoder sizes.
    """
    out = out.add_(shortcut)
    # dividing by 1.0 is exact, so skipping it changes no bit
    return out if scale == 1.0 else out.div_(scale)


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` with both GroupNorm + activation pairs fused.

    Constructor arguments and parameter names are diffusers' (``norm1, conv1, time_emb_proj, norm2, dropout,
    conv2, conv_shortcut``); a ``ResnetBlock2D`` state dict loads as is. ``forward(input_tensor [N, Cin, H,
    W], temb [N, temb_channels] or None) -> [N, Cout, H, W]``::

        h = conv1(act(norm1(x)))                      # norm1 + act: one fused kernel
        h = h + time_emb_proj(act(temb))[:, :, None, None]
        h = conv2(dropout(act(norm2(h))))             # norm2 + act: one fused kernel
        out = (shortcut(x) + h) / output_scale_factor

    The residual add follows ``conv2``, so it cannot ride in the GroupNorm kernel; it is done in place on
    ``conv2``'s output (bit-identical to diffusers). Under :func:`fastlatent.nn.set_fused_conv` ("on" or
    "auto"; CUDA fp16/bf16 inference) each ``conv(act(norm(x)))`` pair, with conv2's bias and residual, can
    run as one :func:`fastlatent.ops.group_norm_conv3x3` kernel instead. With
    ``time_embedding_norm="scale_shift"`` norm2 runs without its activation (the per-sample scale and shift
    come in between); with "group" (what diffusers' VAE encoder and decoder pass, with ``temb_channels=None``)
    there is no time embedding.

    Differences from ``ResnetBlock2D``: ``non_linearity`` must be "swish", "silu" or "gelu" (the activations
    the kernel fuses); ``up``/``down`` use nearest-x2 and 2x2 average pooling (diffusers' default ``kernel``;
    ``from_diffusers`` keeps whatever resampler the source block has); a block with a ``time_emb_proj`` raises
    ValueError when called without ``temb`` (diffusers fails inside the activation).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        pre_norm: bool = True,
        eps: float = 1e-6,
        non_linearity: str = "swish",
        skip_time_act: bool = False,
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        use_in_shortcut: bool | None = None,
        up: bool = False,
        down: bool = False,
        conv_shortcut_bias: bool = True,
        conv_2d_out_channels: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if non_linearity not in _DIFFUSERS_ACTIVATIONS:
            raise ValueError(
                f"non_linearity must be one of {sorted(_DIFFUSERS_ACTIVATIONS)} (the activations the "
                f"fused kernel applies), got {non_linearity!r}"
            )
        if time_embedding_norm not in ("default", "scale_shift", "group"):
            raise ValueError(
                f"time_embedding_norm must be 'default', 'scale_shift' or 'group', got "
                f"{time_embedding_norm!r}"
            )
        if time_embedding_norm == "group" and temb_channels is not None:
            raise ValueError(
                "time_embedding_norm='group' (the diffusers VAE's blocks) takes no time embedding: "
                f"temb_channels must be None, got {temb_channels}"
            )
        if up and down:
            raise ValueError("up and down cannot both be True")
        out_channels = in_channels if out_channels is None else out_channels
        conv_2d_out_channels = conv_2d_out_channels or out_channels
        groups_out = groups if groups_out is None else groups_out
        act = _DIFFUSERS_ACTIVATIONS[non_linearity]
        kw = dict(device=device, dtype=dtype)
        self._set_config(
            in_channels,
            out_channels,
            conv_shortcut,
            output_scale_factor,
            time_embedding_norm,
            skip_time_act,
            up,
            down,
            act,
        )
        self.norm1 = GroupNormAct(groups, in_channels, eps, activation=act, **kw)
        self.conv1 = _conv3x3(in_channels, out_channels, **kw)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            proj_out = out_channels * (2 if time_embedding_norm == "scale_shift" else 1)
            self.time_emb_proj = nn.Linear(temb_channels, proj_out, **kw)
        self.norm2 = GroupNormAct(
            groups_out,
            out_channels,
            eps,
            activation=None if time_embedding_norm == "scale_shift" else act,
            **kw,
        )
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(out_channels, conv_2d_out_channels, **kw)
        self.nonlinearity = _activation_module(act)
        self.upsample = Upsample(in_channels) if up else None
        self.downsample = Downsample(in_channels) if down else None
        self.use_in_shortcut = (
            in_channels != conv_2d_out_channels if use_in_shortcut is None else use_in_shortcut
        )
        self.conv_shortcut = (
            nn.Conv2d(in_channels, conv_2d_out_channels, kernel_size=1, bias=conv_shortcut_bias, **kw)
            if self.use_in_shortcut
            else None
        )

    def _set_config(
        self,
        in_channels,
        out_channels,
        conv_shortcut,
        output_scale_factor,
        time_embedding_norm,
        skip_time_act,
        up,
        down,
        act,
    ):
        self.pre_norm = True
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut
        self.output_scale_factor = output_scale_factor
        self.time_embedding_norm = time_embedding_norm
        self.skip_time_act = skip_time_act
        self.up = up
        self.down = down
        self.activation = act

    @classmethod
    def from_diffusers(cls, block: nn.Module) -> "ResnetBlock":
        """A ResnetBlock sharing ``block``'s parameters and submodules (a diffusers ``ResnetBlock2D``).

        Raises ValueError naming the attribute when the block uses something this class does not compute
        (another activation or time-embedding norm, a non-GroupNorm norm).
        """
        act_name = type(block.nonlinearity).__name__
        act = {"SiLU": "silu", "GELU": "gelu"}.get(act_name)
        if act == "gelu" and block.nonlinearity.approximate != "none":
            act = None
        if act is None:
            raise ValueError(
                f"ResnetBlock.from_diffusers: nonlinearity must be nn.SiLU or exact nn.GELU, got "
                f"{block.nonlinearity!r}"
            )
        if block.time_embedding_norm not in ("default", "scale_shift") and block.time_emb_proj is not None:
            raise ValueError(
                f"ResnetBlock.from_diffusers: time_embedding_norm {block.time_embedding_norm!r} with a "
                "time_emb_proj is not supported"
            )
        for name in ("norm1", "norm2"):
            if type(getattr(block, name)) is not nn.GroupNorm:
                raise ValueError(
                    f"ResnetBlock.from_diffusers: {name} must be an nn.GroupNorm, got "
                    f"{type(getattr(block, name)).__name__}"
                )
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._set_config(
            block.in_channels,
            block.out_channels,
            block.use_conv_shortcut,
            block.output_scale_factor,
            block.time_embedding_norm,
            block.skip_time_act,
            block.up,
            block.down,
            act,
        )
        new.norm1 = GroupNormAct.from_group_norm(block.norm1, act)
        new.conv1 = block.conv1
        new.time_emb_proj = block.time_emb_proj
        norm2_act = None if block.time_embedding_norm == "scale_shift" else act
        new.norm2 = GroupNormAct.from_group_norm(block.norm2, norm2_act)
        new.dropout = block.dropout
        new.conv2 = block.conv2
        new.nonlinearity = block.nonlinearity
        # diffusers' resamplers may be modules, lambdas or partials: kept as they are (plain attributes stay
        # plain)
        new.upsample = block.upsample
        new.downsample = block.downsample
        new.use_in_shortcut = block.use_in_shortcut
        new.conv_shortcut = block.conv_shortcut
        new.train(block.training)
        return new

    def forward(
        self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, scale=None
    ) -> torch.Tensor:
        # `scale` is ResnetBlock2D's deprecated (ignored) third argument, accepted so that callers written for
        # it keep working
        if self.upsample is None and self.downsample is None:
            hidden = norm_act_conv(self.norm1, self.conv1, input_tensor)
        else:
            hidden = self.norm1(input_tensor)
            if self.upsample is not None:
                input_tensor = self.upsample(input_tensor)
                hidden = self.upsample(hidden)
            else:
                input_tensor = self.downsample(input_tensor)
                hidden = self.downsample(hidden)
            hidden = self.conv1(hidden)
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResnetBlock: temb is required, this block has a time_emb_proj")
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError("ResnetBlock: temb is required with time_embedding_norm='scale_shift'")
            scale, shift = torch.chunk(temb, 2, dim=1)
            hidden = self.conv2(self.dropout(self.nonlinearity(self.norm2(hidden) * (1 + scale) + shift)))
            return _add_shortcut(hidden, self._shortcut(input_tensor), self.output_scale_factor)
        # "default" adds the time embedding; diffusers' VAE blocks ("group") have none, and temb is ignored as
        # ResnetBlock2D ignores it
        if self.time_embedding_norm == "default" and temb is not None:
            hidden = hidden + temb
        shortcut = self._shortcut(input_tensor)
        if self.training and self.dropout.p > 0:
            hidden = self.conv2(self.dropout(self.norm2(hidden)))
            return _add_shortcut(hidden, shortcut, self.output_scale_factor)
        # conv2(norm2(h)) + shortcut: one kernel where fastlatent.nn.set_fused_conv allows, else the residual
        # is added in place on conv2's output
        out = norm_act_conv(self.norm2, self.conv2, hidden, residual=shortcut)
        return out if self.output_scale_factor == 1.0 else out.div_(self.output_scale_factor)

    def _shortcut(self, input_tensor: torch.Tensor) -> torch.Tensor:
        if self.conv_shortcut is None:
            return input_tensor
        return self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)


class TamingResnetBlock(nn.Module):
    """taming-transformers' VQGAN ``ResnetBlock`` with both GroupNorm + swish pairs fused.

    Parameter names are taming's (``norm1, conv1, temb_proj, norm2, dropout, conv2`` and ``conv_shortcut``
    (3x3) or ``nin_shortcut`` (1x1) when the channel count changes); taming's ``Normalize`` is ``GroupNorm(32,
    C, eps=1e-6, affine=True)`` and its ``nonlinearity`` is ``x * sigmoid(x)`` (= SiLU). ``forward(x [N, Cin,
    H, W], temb [N, temb_channels] or None) -> [N, Cout, H, W]``; as in taming, ``temb`` is optional even when
    the block has a ``temb_proj``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: int = 512,
        num_groups: int = 32,
        eps: float = 1e-6,
        device=None,
        dtype=None,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        kw = dict(device=device, dtype=dtype)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = GroupNormAct(num_groups, in_channels, eps, activation="silu", **kw)
        self.conv1 = _conv3x3(in_channels, out_channels, **kw)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels, **kw)
        self.norm2 = GroupNormAct(num_groups, out_channels, eps, activation="silu", **kw)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(out_channels, out_channels, **kw)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = _conv3x3(in_channels, out_channels, **kw)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, **kw)

    @classmethod
    def from_taming(cls, block: nn.Module) -> "TamingResnetBlock":
        """A TamingResnetBlock sharing ``block``'s parameters and submodules (a taming-style ``ResnetBlock``).

        Only the structure is checked here (GroupNorm norms, the attribute names); that the source computes
        taming's forward is for the caller to establish (:func:`fastlatent.patch` runs both on a probe input).
        """
        for name in ("norm1", "norm2"):
            if type(getattr(block, name, None)) is not nn.GroupNorm:
                raise ValueError(f"TamingResnetBlock.from_taming: {name} must be an nn.GroupNorm")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_channels = block.in_channels
        new.out_channels = block.out_channels
        new.use_conv_shortcut = block.use_conv_shortcut
        new.norm1 = GroupNormAct.from_group_norm(block.norm1, "silu")
        new.conv1 = block.conv1
        if hasattr(block, "temb_proj"):
            new.temb_proj = block.temb_proj
        new.norm2 = GroupNormAct.from_group_norm(block.norm2, "silu")
        new.dropout = block.dropout
        new.conv2 = block.conv2
        for name in ("conv_shortcut", "nin_shortcut"):
            if isinstance(getattr(block, name, None), nn.Module):
                setattr(new, name, getattr(block, name))
        new.train(block.training)
        return new

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = norm_act_conv(self.norm1, self.conv1, x)
        if temb is not None:
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        if self.training and self.dropout.p > 0:
            return _add_shortcut(self.conv2(self.dropout(self.norm2(h))), x)
        return norm_act_conv(self.norm2, self.conv2, h, residual=x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling and an optional 3x3 convolution named ``conv`` (diffusers'
    ``Upsample2D``, taming's ``Upsample``). ``forward(x [N, C, H, W], output_size=None) -> [N, Cout, 2H, 2W]``
    (or ``output_size``)."""

    def __init__(
        self, channels: int, use_conv: bool = False, out_channels: int | None = None, device=None, dtype=None
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if not use_conv and self.out_channels != channels:
            raise ValueError(
                f"out_channels ({out_channels}) must equal channels ({channels}) without use_conv"
            )
        self.conv = _conv3x3(channels, self.out_channels, device, dtype) if use_conv else None

    @classmethod
    def from_diffusers(cls, up: nn.Module) -> "Upsample":
        """An Upsample sharing the convolution of a diffusers ``Upsample2D`` (nearest x2, then a 3x3
        ``conv``).

        Raises ValueError naming the feature when ``up`` does something else (a transposed convolution, a
        norm, no interpolation, the legacy ``Conv2d_0`` name, a convolution other than 3x3 / padding 1).
        """
        checks = (
            (getattr(up, "use_conv_transpose", True), "a transposed convolution"),
            (not getattr(up, "interpolate", False), "no interpolation"),
            (getattr(up, "norm", None) is not None, "a norm"),
            (getattr(up, "name", None) != "conv", f"its convolution named {getattr(up, 'name', None)!r}"),
            (not up.use_conv, "no convolution (nothing to fold the upsampling into)"),
        )
        for bad, what in checks:
            if bad:
                raise ValueError(f"Upsample.from_diffusers: has {what}")
        return cls._sharing(up, "from_diffusers")

    @classmethod
    def from_taming(cls, up: nn.Module) -> "Upsample":
        """An Upsample sharing the ``conv`` of a taming-style ``Upsample`` (``with_conv=True``).

        Only the structure is checked here; :func:`fastlatent.patch` runs both on a probe input first.
        """
        if not getattr(up, "with_conv", False):
            raise ValueError(
                "Upsample.from_taming: with_conv must be True (nothing to fold the upsampling into)"
            )
        return cls._sharing(up, "from_taming")

    @classmethod
    def _sharing(cls, up: nn.Module, how: str) -> "Upsample":
        conv = getattr(up, "conv", None)
        if not is_plain_conv3x3(conv):
            raise ValueError(f"Upsample.{how}: conv must be a 3x3 nn.Conv2d with padding 1, got {conv!r}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.channels, new.out_channels, new.use_conv = conv.in_channels, conv.out_channels, True
        new.conv = conv
        new.train(up.training)
        return new

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"Upsample: x must be [N, {self.channels}, H, W], got shape {list(x.shape)}")
        doubling = output_size is None or tuple(output_size) == (2 * x.shape[2], 2 * x.shape[3])
        if self.conv is not None and doubling and is_plain_conv3x3(self.conv):
            # the upsampling folded into the convolution: 2.25x fewer FLOPs, no upsampled tensor
            # The phase kernels are folded from the live weights on every call: no cache can see writes
            # through `.data` (how EMA code updates weights), which bump no version counter. The fold reads
            # the weight once (measured on a 2-core CPU: 3-25 ms at C = 512 against 0.15-0.5 s for the
            # convolution).
            return upsample_nearest2x_conv3x3(x, self.conv.weight, self.conv.bias)
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class Downsample(nn.Module):
    """Stride-2 downsampling named ``conv`` (diffusers' ``Downsample2D``, taming's ``Downsample``).

    With ``use_conv``, a 3x3 stride-2 convolution; ``padding=0`` pads one zero row and column at the bottom
    right first (the SD-VAE encoder and taming), ``padding=1`` pads all sides. Without, 2x2 average pooling.
    ``forward(x [N, C, H, W]) -> [N, Cout, H', W']``.
    """

    def __init__(
        self,
        channels: int,
        use_conv: bool = False,
        out_channels: int | None = None,
        padding: int = 1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.padding = padding
        if use_conv:
            self.conv = nn.Conv2d(
                channels,
                self.out_channels,
                kernel_size=3,
                stride=2,
                padding=padding,
                device=device,
                dtype=dtype,
            )
        else:
            if self.out_channels != channels:
                raise ValueError(
                    f"out_channels ({out_channels}) must equal channels ({channels}) without use_conv"
                )
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"Downsample: x must be [N, {self.channels}, H, W], got shape {list(x.shape)}")
        if self.use_conv and self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(x)


class AttnBlock(nn.Module):
    """Single-image self-attention as the SD-VAE mid block builds diffusers' ``Attention``.

    Parameter names are diffusers' (``group_norm, to_q, to_k, to_v, to_out.0``; ``to_out.1`` is the dropout).
    ``forward(x [N, C, H, W]) -> [N, C, H, W]``::

        h = group_norm(x).flatten(2).transpose(1, 2)              # [N, HW, C]
        o = to_out(sdpa(to_q(h), to_k(h), to_v(h)))               # heads = C // dim_head
        out = (o.transpose(1, 2).view(N, C, H, W) + x) / rescale_output_factor

    The residual is added straight from the transposed projection (no reshape copy, unlike diffusers).
    ``dim_head`` defaults to ``channels`` (one head, the SD-VAE); the softmax scale is ``dim_head ** -0.5``.
    """

    def __init__(
        self,
        channels: int,
        dim_head: int | None = None,
        norm_num_groups: int = 32,
        eps: float = 1e-6,
        rescale_output_factor: float = 1.0,
        residual_connection: bool = True,
        bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dim_head = channels if dim_head is None else dim_head
        if dim_head < 1 or channels % dim_head != 0:
            raise ValueError(f"dim_head must divide channels ({channels}), got {dim_head}")
        kw = dict(device=device, dtype=dtype)
        self._set_config(channels, channels // dim_head, rescale_output_factor, residual_connection)
        self.group_norm = GroupNormAct(norm_num_groups, channels, eps, activation=None, **kw)
        self.to_q = nn.Linear(channels, channels, bias=bias, **kw)
        self.to_k = nn.Linear(channels, channels, bias=bias, **kw)
        self.to_v = nn.Linear(channels, channels, bias=bias, **kw)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels, bias=out_bias, **kw), nn.Dropout(dropout)])

    def _set_config(self, channels, heads, rescale_output_factor, residual_connection):
        self.channels = channels
        self.heads = heads
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection

    @classmethod
    def from_diffusers(cls, attn: nn.Module) -> "AttnBlock":
        """An AttnBlock sharing the parameters of a diffusers ``Attention`` used as spatial self-attention.

        Raises ValueError naming the feature when ``attn`` does something this block does not
        (cross-attention, spatial or q/k norms, added projections, a custom processor or softmax scale).
        """
        reason = unsupported_attention_reason(attn)
        if reason is not None:
            raise ValueError(f"AttnBlock.from_diffusers: {reason}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._set_config(attn.query_dim, attn.heads, attn.rescale_output_factor, attn.residual_connection)
        new.group_norm = GroupNormAct.from_group_norm(attn.group_norm, None)
        new.to_q, new.to_k, new.to_v, new.to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out
        new.train(attn.training)
        return new

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, temb=None
    ) -> torch.Tensor:
        # temb only feeds diffusers' spatial norm, which this block does not have
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                "AttnBlock is self-attention without a mask: encoder_hidden_states and attention_mask "
                "must be None"
            )
        x = hidden_states
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"AttnBlock: x must be [N, {self.channels}, H, W], got shape {list(x.shape)}")
        n, c, h, w = x.shape
        seq = self.group_norm(x).flatten(2).transpose(1, 2)  # [N, HW, C]
        head_dim = c // self.heads

        def heads(t):
            return t.view(n, -1, self.heads, head_dim).transpose(1, 2)  # [N, heads, HW, head_dim]

        o = F.scaled_dot_product_attention(
            heads(self.to_q(seq)), heads(self.to_k(seq)), heads(self.to_v(seq))
        )
        o = self.to_out[1](self.to_out[0](o.transpose(1, 2).reshape(n, -1, c)))
        o = o.transpose(1, 2).view(n, c, h, w)
        if self.residual_connection:
            # x first: the sum takes x's memory format rather than the transposed view's
            o = x + o
        return o if self.rescale_output_factor == 1.0 else o / self.rescale_output_factor


def unsupported_attention_reason(attn: nn.Module) -> str | None:
    """Why a diffusers ``Attention`` cannot become an :class:`AttnBlock`, or None when it can."""
    if type(getattr(attn, "group_norm", None)) is not nn.GroupNorm:
        return "group_norm must be an nn.GroupNorm"
    checks = (
        (getattr(attn, "is_cross_attention", True), "cross-attention"),
        (getattr(attn, "spatial_norm", None) is not None, "a spatial_norm"),
        (getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None, "q/k norms"),
        (getattr(attn, "norm_cross", None) is not None, "a cross norm"),
        (getattr(attn, "added_kv_proj_dim", None) is not None, "added key/value projections"),
        (getattr(attn, "is_causal", False), "a causal mask"),
        (
            type(getattr(attn, "processor", None)).__name__ not in ("AttnProcessor2_0", "AttnProcessor"),
            f"processor {type(getattr(attn, 'processor', None)).__name__}",
        ),
    )
    for bad, what in checks:
        if bad:
            return f"has {what}"
    to_out = getattr(attn, "to_out", None)
    if not (
        isinstance(to_out, nn.ModuleList)
        and len(to_out) == 2
        and isinstance(to_out[0], nn.Linear)
        and isinstance(to_out[1], nn.Dropout)
    ):
        return "to_out must be [Linear, Dropout]"
    inner = attn.to_q.out_features
    if attn.to_k.out_features != inner or attn.to_v.out_features != inner or inner % attn.heads != 0:
        return "q/k/v projections of different widths"
    if inner != attn.query_dim or to_out[0].out_features != attn.query_dim:
        return "an inner width different from the channel count"
    if not math.isclose(attn.scale, (inner // attn.heads) ** -0.5, rel_tol=1e-12):
        return f"softmax scale {attn.scale} instead of head_dim ** -0.5"
    return None
