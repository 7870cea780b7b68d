"""When the decoder blocks run GroupNorm + activation + 3x3 conv as one fused kernel.

The fused kernel (:func:`fastlatent.ops.group_norm_conv3x3` with ``algorithm="fused"``) never writes the
normalised activation to memory, but it is an implicit GEMM of our own against cuDNN's tuned convolutions, so
whether it wins depends on the GPU and the shape. The blocks of :mod:`fastlatent.nn.blocks` (and so every
model :func:`fastlatent.patch` touched) route ``conv(act(norm(x))) (+ residual)`` through
:func:`norm_act_conv`, which follows a process-wide mode:

* ``"off"`` (default): the fused GroupNorm kernel, then the module's own ``nn.Conv2d`` (cuDNN).
* ``"on"``: the fused GroupNorm-conv kernel wherever it applies.
* ``"auto"``: on the first call of each (shape, dtype, layout, device) the two are timed side by side
  (CUDA events, a few runs each) and the faster one is kept for that key, as ``cudnn.benchmark`` does.
  While a CUDA graph is being captured or ``torch.compile`` traces, an untimed key runs unfused.

The fused path applies to CUDA fp16/bf16 inference (no gradient needed by the inputs or parameters), a
plain ``nn.Conv2d`` 3x3 with stride 1, padding 1, no dilation or groups and zero padding, and a device of
compute capability 8.0 or newer. Everything else runs the unfused path in every mode.

The default stays ``"off"`` until the GPU validation run (`scripts/gpu_validate.sh`) has measured the fused
kernel against cuDNN on the target GPUs; ``benchmarks/bench_norms.py`` measures both.
"""

from __future__ import annotations

import contextlib
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.ops.group_norm_conv import group_norm_conv3x3

MODES = ("off", "on", "auto")
_state = {"mode": "off"}
_auto_choice: dict[tuple, bool] = {}


def set_fused_conv(mode: str) -> None:
    """Sets the process-wide fused GroupNorm-conv mode: ``"off"``, ``"on"`` or ``"auto"`` (see the module
    doc).

    Switching modes forgets what ``"auto"`` measured.
    """
    if mode not in MODES:
        raise ValueError(f"fastlatent.nn.set_fused_conv: mode must be 'off', 'on' or 'auto', got {mode!r}")
    _state["mode"] = mode
    _auto_choice.clear()


def fused_conv_mode() -> str:
    """The current mode (``"off"``, ``"on"`` or ``"auto"``)."""
    return _state["mode"]


@contextlib.contextmanager
def fused_conv(mode: str = "auto"):
    """``with fastlatent.nn.fused_conv("on"): ...``: the mode for a block of code, restored afterwards."""
    previous = _state["mode"]
    set_fused_conv(mode)
    try:
        yield
    finally:
        set_fused_conv(previous)


def is_plain_conv3x3(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _fusable(norm: nn.Module, conv: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    if not (
        x.is_cuda and x.dim() == 4 and x.dtype in (torch.float16, torch.bfloat16) and is_plain_conv3x3(conv)
    ):
        return False
    if conv.weight.dtype != x.dtype or (conv.bias is not None and conv.bias.dtype != x.dtype):
        return False
    if residual is not None and (residual.dtype != x.dtype or residual.shape[1] != conv.out_channels):
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in (*norm.parameters(), *conv.parameters()))
    ):
        return False  # training keeps the unfused path, whose backward is the group_norm kernel's
    return torch.cuda.get_device_capability(x.device)[0] >= 8


def _median_ms(fn, runs: int = 5) -> float:
    fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def norm_act_conv(
    norm: nn.Module, conv: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``conv(norm(x)) + residual`` for a :class:`~fastlatent.nn.GroupNormAct` ``norm`` and an ``nn.Conv2d``
    ``conv``, fused into one kernel where the mode and the inputs allow it (see the module doc).

    The unfused path adds the residual in place on the convolution's fresh output (bit-identical to
    ``conv(norm(x)) + residual``).
    """

    def unfused():
        out = conv(norm(x))
        return out if residual is None else out.add_(residual)

    mode = _state["mode"]
    if mode == "off" or not _fusable(norm, conv, x, residual):
        return unfused()

    def fused():
        return group_norm_conv3x3(
            x,
            norm.weight,
            norm.bias,
            norm.num_groups,
            conv.weight,
            conv.bias,
            eps=norm.eps,
            activation=norm.activation or "none",
            residual=residual,
            algorithm="fused",
        )

    if mode == "on":
        return fused()
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    key = (
        x.device.index,
        x.dtype,
        tuple(x.shape),
        channels_last,
        tuple(conv.weight.shape),
        norm.num_groups,
        norm.activation,
        residual is not None,
    )
    choice = _auto_choice.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
            return unfused()
        choice = _auto_choice[key] = _median_ms(fused) < _median_ms(unfused)
    return fused() if choice else unfused()


# ------------------------------------------------------------------ nearest x2 upsampling + 3x3 convolution


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The 3x3 kernel of a convolution that follows a nearest x2 upsampling, as four 2x2 kernels on the input.

    Output row 2i + a of ``conv3x3(upsample(x))`` reads upsampled rows 2i + a - 1 .. 2i + a + 1, which are
    input rows (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1: two distinct rows, so kernel rows merge as
    (w0, w1 + w2) and (w0 + w1, w2); columns likewise. Returns ``[4 C_out, C_in, 2, 2]``, phases
    (a, b) = (0, 0), (0, 1), (1, 0), (1, 1) in that order, computed in fp32 (or better) and cast back.
    """
    w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight

    def merge(t, dim):
        first, middle, last = t.unbind(dim)
        return torch.stack([first, middle + last], dim), torch.stack([first + middle, last], dim)

    phases = [col for row in merge(w, 2) for col in merge(row, 3)]
    return torch.cat(phases, 0).to(weight.dtype)


def upsample_nearest2x_conv3x3(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)`` without the
    upsampled tensor: one 2x2 convolution with the four phase kernels of :func:`subpixel_weight` over x padded
    by one, each phase read at its offset and interleaved into the output. 16 multiply-adds per input pixel
    and channel pair instead of 36 (2.25x fewer FLOPs; measured 1.5-1.9x faster on the CPU at SD-VAE decoder
    sizes). Equal to the two-step form up to the rounding of the merged weights.

    Args:
        x: ``[N, C_in, H, W]``; channels-last in, channels-last out.
        weight, bias: the 3x3 convolution's (``[C_out, C_in, 3, 3]``, ``[C_out]`` or None).
        packed: ``(subpixel_weight(weight), bias.repeat(4))`` when the caller has them. A caller that keeps
            them between calls must refold after every write to the weights, ``.data`` writes included
            (which move no version counter); :class:`~fastlatent.nn.Upsample` folds per call.
    Returns:
        ``[N, C_out, 2H, 2W]``.
    """
    n, _, h, w = x.shape
    cout = weight.shape[0]
    if packed is None:
        packed = (subpixel_weight(weight), None if bias is None else bias.repeat(4))
    phases = F.conv2d(F.pad(x, (1, 1, 1, 1)), packed[0], packed[1])  # [N, 4 C_out, H + 1, W + 1]
    phases = phases.view(n, 2, 2, cout, h + 1, w + 1)
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if channels_last:  # memory [N, H, 2, W, 2, C_out] is the channels-last [N, C_out, 2H, 2W]
        out = x.new_empty(n, h, 2, w, 2, cout).permute(0, 5, 1, 2, 3, 4)
    else:
        out = x.new_empty(n, cout, h, 2, w, 2)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, :, a, :, b] = phases[:, a, b, :, a : a + h, b : b + w]
    return out.view(n, cout, 2 * h, 2 * w)
