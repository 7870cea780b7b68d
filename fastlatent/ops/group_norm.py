"""group_norm: GroupNorm with affine, activation and residual add fused, forward and backward."""

from __future__ import annotations

import torch

from fastlatent._extension import extension_available, require_device
from fastlatent.ops import _checks

ACTIVATIONS = ("none", "silu", "gelu")


def _check_args(x, weight, bias, groups, eps, activation, residual, allow_double=False) -> None:
    op = "group_norm"
    if x.dim() < 2:
        raise ValueError(f"fastlatent.{op}: x must be [N, C, *spatial] (at least 2-D), got shape {list(x.shape)}")
    c = x.shape[1]
    if c < 1:
        raise ValueError(f"fastlatent.{op}: x must have C >= 1 channels, got shape {list(x.shape)}")
    if groups < 1 or c % groups != 0:
        raise ValueError(f"fastlatent.{op}: groups must be >= 1 and divide the {c} channels of x, got groups={groups}")
    if not (x.dtype in _checks.KERNEL_DTYPES or (allow_double and x.dtype == torch.float64)):
        raise TypeError(f"fastlatent.{op}: x must be float32, float16 or bfloat16"
                        f"{' (or float64)' if allow_double else ''}, got {x.dtype}")
    if eps < 0:
        raise ValueError(f"fastlatent.{op}: eps must be >= 0, got {eps}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _checks.check_same_device(op, "x", x, name, t)
        if t.dim() != 1 or t.shape[0] != c:
            raise ValueError(f"fastlatent.{op}: {name} must be [C] = [{c}], got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"fastlatent.{op}: {name} must be a floating tensor, got {t.dtype}")
    if residual is not None:
        _checks.check_same_device(op, "x", x, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"fastlatent.{op}: residual must have the shape of x {list(x.shape)}, "
                             f"got {list(residual.shape)}")
        _checks.check_same_dtype(op, "x", x, "residual", residual)
    _checks.check_choice(op, "activation", activation, ACTIVATIONS)


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    if _channels_last(x):
        return x.new_empty(x.movedim(1, -1).shape).movedim(-1, 1)
    return x.new_empty(x.shape)


def group_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: int,
    eps: float = 1e-5,
    activation: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(GroupNorm(x) * weight + bias) + residual`` in one read of the statistics and one pass.

    Args:
        x: ``[N, C, *spatial]`` (1D/2D/3D spatial), float32/float16/bfloat16 (float64 on the
            CPU, for gradcheck). Channels-last strides (``memory_format=torch.channels_last``
            and the like) are read in place and give channels-last outputs.
        weight, bias: ``[C]`` or ``None``; any floating dtype (used in fp32).
        groups: number of groups, dividing ``C``.
        eps: added to the variance.
        activation: ``"none"``, ``"silu"`` or ``"gelu"`` (exact, erf-based; the kernels use
            an erf approximation with absolute error below 1.5e-7).
        residual: tensor of x's shape and dtype added after the activation, or ``None``.

    Statistics are computed in fp32 or better (double sums on the CPU; Welford partials
    merged in double on CUDA), so they are stable for inputs with a large mean. Deterministic.
    Differentiable in ``x``, ``weight``, ``bias`` and ``residual``.
    """
    require_device("group_norm", *(t for t in (x, weight, bias, residual) if t is not None))
    return torch.ops.fastlatent.group_norm.default(x, weight, bias, groups, float(eps), activation, residual)[0]


if extension_available():

    @torch.library.register_fake("fastlatent::group_norm")
    def _group_norm_fake(x, weight, bias, groups, eps=1e-5, activation="none", residual=None):
        _check_args(x, weight, bias, groups, eps, activation, residual, allow_double=x.device.type != "cuda")
        stats = x.new_empty((x.shape[0], groups), dtype=torch.float32)
        return _empty_like_layout(x), stats, stats.clone()

    @torch.library.register_fake("fastlatent::group_norm_backward")
    def _group_norm_backward_fake(grad_out, x, weight, bias, mean, rstd, groups, activation):
        _check_args(x, weight, bias, groups, 0.0, activation, None, allow_double=x.device.type != "cuda")
        c = x.shape[1]
        return (_empty_like_layout(x), x.new_empty((c,), dtype=torch.float32),
                x.new_empty((c,), dtype=torch.float32))

    def _setup_context(ctx, inputs, output):
        x, weight, bias, groups, _, activation, residual = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.activation = groups, activation
        ctx.has_residual = residual is not None
        ctx.mark_non_differentiable(mean, rstd)

    def _backward(ctx, grad_out, grad_mean, grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.fastlatent.group_norm_backward.default(
            grad_out.contiguous() if not _channels_last(x) else grad_out, x, weight, bias, mean, rstd,
            ctx.groups, ctx.activation)
        grad_weight = grad_weight.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = grad_bias.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        grad_residual = grad_out if ctx.has_residual and ctx.needs_input_grad[6] else None
        return grad_x, grad_weight, grad_bias, None, None, None, grad_residual

    torch.library.register_autograd("fastlatent::group_norm", _backward, setup_context=_setup_context)
