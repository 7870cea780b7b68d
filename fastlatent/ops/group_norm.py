"""group_norm: GroupNorm with affine, activation and residual add fused, forward and backward."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from fastlatent._extension import extension_available, require_device
from fastlatent.ops._autograd import differentiable_vjp, wants_double_backward
from fastlatent.ops.checks.group_norm import (  # noqa: F401 (re-exported: public names of this module)
    ACTIVATIONS,
    _check_layout_and_groups,
    check_group_norm_apply_args,
    check_group_norm_args,
    check_group_norm_stats_args,
)
from fastlatent.reference.group_norm import group_norm as _reference_group_norm


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
    Differentiable in ``x``, ``weight``, ``bias`` and ``residual``, to any order: the first
    backward is the fused kernel; with ``create_graph=True`` (gradient penalties) the gradient is
    taken through the plain-PyTorch reference instead, so that it can be differentiated again.
    """
    require_device("group_norm", *(t for t in (x, weight, bias, residual) if t is not None))
    return torch.ops.fastlatent.group_norm.default(x, weight, bias, groups, float(eps), activation, residual)[
        0
    ]


if extension_available():

    @torch.library.register_fake("fastlatent::group_norm")
    def _group_norm_fake(x, weight, bias, groups, eps=1e-5, activation="none", residual=None):
        check_group_norm_args(
            x, weight, bias, groups, eps, activation, residual, allow_double=x.device.type != "cuda"
        )
        stats = x.new_empty((x.shape[0], groups), dtype=torch.float32)
        return _empty_like_layout(x), stats, stats.clone()

    @torch.library.register_fake("fastlatent::group_norm_backward")
    def _group_norm_backward_fake(grad_out, x, weight, bias, mean, rstd, groups, activation):
        check_group_norm_args(
            x, weight, bias, groups, 0.0, activation, None, allow_double=x.device.type != "cuda"
        )
        c = x.shape[1]
        return (
            _empty_like_layout(x),
            x.new_empty((c,), dtype=torch.float32),
            x.new_empty((c,), dtype=torch.float32),
        )

    def _setup_context(ctx, inputs, output):
        x, weight, bias, groups, eps, activation, residual = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.eps, ctx.activation = groups, eps, activation
        ctx.has_residual = residual is not None
        ctx.mark_non_differentiable(mean, rstd)

    def _backward(ctx, grad_out, grad_mean, grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_residual = grad_out if ctx.has_residual and ctx.needs_input_grad[6] else None
        if wants_double_backward():  # create_graph=True: a backward autograd can differentiate again
            grad_x, grad_weight, grad_bias = differentiable_vjp(
                lambda x_, w_, b_: _reference_group_norm(x_, w_, b_, ctx.groups, ctx.eps, ctx.activation),
                (x, weight, bias),
                ctx.needs_input_grad[:3],
                (grad_out,),
            )
            return grad_x, grad_weight, grad_bias, None, None, None, grad_residual
        grad_x, grad_weight, grad_bias = torch.ops.fastlatent.group_norm_backward.default(
            grad_out.contiguous() if not _channels_last(x) else grad_out,
            x,
            weight,
            bias,
            mean,
            rstd,
            ctx.groups,
            ctx.activation,
        )
        grad_weight = grad_weight.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = grad_bias.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, grad_residual

    torch.library.register_autograd("fastlatent::group_norm", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------- the forward in two halves


def group_norm_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and M2 = sum of squared deviations from that mean, in one read of ``x``.

    The first half of :func:`group_norm`, for a GroupNorm whose input arrives in parts (tiles of an image
    too large to hold at once): each part's ``(mean, m2)`` with its element count merges with the others by
    Chan's formula (:func:`merge_group_stats`), without the cancellation of summed squares.

    Args:
        x: ``[N, C, *spatial]``, float32/float16/bfloat16 (float64 on the CPU); channels-last read in place.
        groups: number of groups, dividing ``C``.

    Returns:
        ``(mean, m2)``, each ``[N, groups]`` float32. Each group holds ``C / groups * prod(spatial)``
        elements; an empty part (no spatial positions) gives zeros. Accumulated as :func:`group_norm`'s
        statistics (double on the CPU, Welford partials merged in double on CUDA); deterministic.
        Differentiable in ``x`` (the backward is plain PyTorch).
    """
    require_device("group_norm_stats", x)
    return torch.ops.fastlatent.group_norm_stats.default(x, groups)


def group_norm_apply(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str = "none",
) -> torch.Tensor:
    """``act((x - mean) * rstd * weight + bias)`` with given group statistics, in one pass over ``x``.

    The second half of :func:`group_norm`: the statistics may come from a larger tensor that ``x`` is a part
    of (see :func:`group_norm_stats`), so a tile normalises exactly as the whole image would.

    Args:
        x: ``[N, C, *spatial]``, float32/float16/bfloat16 (float64 on the CPU); channels-last read in place
            and kept in the output.
        mean, rstd: ``[N, G]`` float32 with ``G`` dividing ``C``; ``rstd = 1 / sqrt(var + eps)``.
        weight, bias: ``[C]`` or ``None``; any floating dtype (used in fp32).
        activation: ``"none"``, ``"silu"`` or ``"gelu"`` (exact, erf-based).

    Returns:
        ``[N, C, *spatial]`` in x's dtype. Differentiable in every tensor argument (plain-PyTorch backward).
    """
    tensors = (x, mean, rstd) + tuple(t for t in (weight, bias) if t is not None)
    require_device("group_norm_apply", *tensors)
    return torch.ops.fastlatent.group_norm_apply.default(x, mean, rstd, weight, bias, activation)


def merge_group_stats(parts, counts) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Merge per-part ``(mean, m2)`` of :func:`group_norm_stats` into the whole's, by Chan's formula in
    float64.

    Args:
        parts: sequence of ``(mean, m2)``, each ``[N, G]``.
        counts: elements per group in each part (``C / G * prod(spatial)``).

    Returns:
        ``(mean, m2, count)``: float64 ``[N, G]`` tensors and the total count.
    """
    parts, counts = list(parts), list(counts)
    if len(parts) != len(counts):
        raise ValueError(
            f"fastlatent.merge_group_stats: parts and counts must have the same length, got "
            f"{len(parts)} and {len(counts)}"
        )
    for i, count in enumerate(counts):
        if isinstance(count, bool) or not isinstance(count, numbers.Real) or not 0 <= count < math.inf:
            raise ValueError(
                f"fastlatent.merge_group_stats: counts must be finite numbers >= 0, got "
                f"counts[{i}] = {count!r}"
            )
    mean = m2 = None
    total = 0.0
    for (part_mean, part_m2), count in zip(parts, counts):
        if count == 0:
            continue
        part_mean, part_m2 = part_mean.double(), part_m2.double()
        if mean is None:
            mean, m2, total = part_mean, part_m2, float(count)
            continue
        new_total = total + count
        delta = part_mean - mean
        mean = mean + delta * (count / new_total)
        m2 = m2 + part_m2 + delta * delta * (total * count / new_total)
        total = new_total
    if mean is None:
        raise ValueError("fastlatent.merge_group_stats: no part with a nonzero count")
    return mean, m2, total


def _activation_fn(activation: str):
    return {"none": lambda z: z, "silu": F.silu, "gelu": F.gelu}[activation]


if extension_available():

    @torch.library.register_fake("fastlatent::group_norm_stats")
    def _group_norm_stats_fake(x, groups):
        check_group_norm_stats_args(x, groups, allow_double=x.device.type != "cuda")
        stats = x.new_empty((x.shape[0], groups), dtype=torch.float32)
        return stats, stats.clone()

    @torch.library.register_fake("fastlatent::group_norm_apply")
    def _group_norm_apply_fake(x, mean, rstd, weight, bias, activation="none"):
        check_group_norm_apply_args(
            x, mean, rstd, weight, bias, activation, allow_double=x.device.type != "cuda"
        )
        return _empty_like_layout(x)

    def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
        return x.reshape(x.shape[0], groups, x[0:1].numel() // groups if x.shape[0] else 0)

    def _stats_setup_context(ctx, inputs, output):
        x, groups = inputs
        mean, _ = output
        ctx.save_for_backward(x, mean)
        ctx.groups = groups

    def _stats_backward(ctx, grad_mean, grad_m2):
        # d mean / dx = 1 / m;  d m2 / dx = 2 (x - mean) (the mean's own gradient term sums to zero)
        x, mean = ctx.saved_tensors
        xg = _grouped(x, ctx.groups).float()
        m = xg.shape[-1]
        grad = grad_mean.float()[..., None] / m + 2.0 * grad_m2.float()[..., None] * (xg - mean[..., None])
        return grad.reshape(x.shape).to(x.dtype), None

    torch.library.register_autograd(
        "fastlatent::group_norm_stats", _stats_backward, setup_context=_stats_setup_context
    )

    def _apply_setup_context(ctx, inputs, output):
        x, mean, rstd, weight, bias, activation = inputs
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.activation = activation

    def _apply_backward(ctx, grad_out):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        double = wants_double_backward()  # create_graph=True: keep the graph of the gradient itself
        with torch.enable_grad():
            leaves = [
                (t if double and need else t.detach().requires_grad_(need)) if t is not None else None
                for t, need in zip((x, mean, rstd, weight, bias), ctx.needs_input_grad[:5])
            ]
            lx, lmean, lrstd, lw, lb = leaves
            groups = lmean.shape[1]
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            z = (_grouped(lx, groups).to(compute) - lmean[..., None].to(compute)) * lrstd[..., None].to(
                compute
            )
            z = z.reshape(x.shape)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            if lw is not None:
                z = z * lw.to(compute).reshape(shape)
            if lb is not None:
                z = z + lb.to(compute).reshape(shape)
            y = _activation_fn(ctx.activation)(z)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(
                torch.autograd.grad(y, wanted, grad_out.to(compute), create_graph=double) if wanted else ()
            )
        out = []
        for t, leaf in zip((x, mean, rstd, weight, bias), leaves):
            out.append(next(grads).to(t.dtype) if leaf is not None and leaf.requires_grad else None)
        return (*out, None)

    torch.library.register_autograd(
        "fastlatent::group_norm_apply", _apply_backward, setup_context=_apply_setup_context
    )
