"""Argument checks of group_norm, group_norm_stats and group_norm_apply (group_norm_conv3x3 shares some)."""

from __future__ import annotations

import torch

from fastlatent.ops import _checks

ACTIVATIONS = ("none", "silu", "gelu")


def _check_layout_and_groups(op: str, x, groups) -> int:
    """x is [N, C, *spatial] with C >= 1 divisible by groups; returns C."""
    if x.dim() < 2:
        raise ValueError(
            f"fastlatent.{op}: x must be [N, C, *spatial] (at least 2-D), got shape {list(x.shape)}"
        )
    c = x.shape[1]
    if c < 1:
        raise ValueError(f"fastlatent.{op}: x must have C >= 1 channels, got shape {list(x.shape)}")
    if groups < 1 or c % groups != 0:
        raise ValueError(
            f"fastlatent.{op}: groups must be >= 1 and divide the {c} channels of x, got groups={groups}"
        )
    return c


def _check_affine(op: str, x, c: int, weight, bias) -> None:
    """weight and bias (each optional): floating [C] tensors on x's device."""
    _checks.check_floating_vector(op, x, "weight", weight, c, "C")
    _checks.check_floating_vector(op, x, "bias", bias, c, "C")


def check_group_norm_args(x, weight, bias, groups, eps, activation, residual, allow_double=False) -> None:
    op = "group_norm"
    c = _check_layout_and_groups(op, x, groups)
    if not (x.dtype in _checks.KERNEL_DTYPES or (allow_double and x.dtype == torch.float64)):
        raise TypeError(
            f"fastlatent.{op}: x must be float32, float16 or bfloat16"
            f"{' (or float64)' if allow_double else ''}, got {x.dtype}"
        )
    if eps < 0:
        raise ValueError(f"fastlatent.{op}: eps must be >= 0, got {eps}")
    _check_affine(op, x, c, weight, bias)
    if residual is not None:
        _checks.check_same_device(op, "x", x, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(
                f"fastlatent.{op}: residual must have the shape of x {list(x.shape)}, "
                f"got {list(residual.shape)}"
            )
        _checks.check_same_dtype(op, "x", x, "residual", residual)
    _checks.check_choice(op, "activation", activation, ACTIVATIONS)


def check_group_norm_stats_args(x, groups, allow_double=False) -> None:
    op = "group_norm_stats"
    _check_layout_and_groups(op, x, groups)
    _checks.check_float(op, "x", x, allow_double)


def check_group_norm_apply_args(x, mean, rstd, weight, bias, activation, allow_double=False) -> None:
    op = "group_norm_apply"
    if x.dim() < 2:
        raise ValueError(
            f"fastlatent.{op}: x must be [N, C, *spatial] (at least 2-D), got shape {list(x.shape)}"
        )
    for name, t in (("mean", mean), ("rstd", rstd)):
        _checks.check_same_device(op, "x", x, name, t)
        if t.dim() != 2 or t.shape[0] != x.shape[0] or t.shape[1] < 1:
            raise ValueError(
                f"fastlatent.{op}: {name} must be [N, groups] with N = {x.shape[0]}, "
                f"got shape {list(t.shape)}"
            )
        _checks.check_fp32(op, name, t)
    if rstd.shape != mean.shape:
        raise ValueError(
            f"fastlatent.{op}: mean and rstd must have the same shape, got {list(mean.shape)} and "
            f"{list(rstd.shape)}"
        )
    c, groups = x.shape[1], mean.shape[1]
    if c < 1 or c % groups != 0:
        raise ValueError(
            f"fastlatent.{op}: mean and rstd must be [N, groups] with groups dividing the {c} channels "
            f"of x, got groups={groups}"
        )
    _checks.check_float(op, "x", x, allow_double)
    _check_affine(op, x, c, weight, bias)
    _checks.check_choice(op, "activation", activation, ACTIVATIONS)
