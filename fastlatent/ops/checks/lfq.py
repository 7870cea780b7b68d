"""Argument checks of lfq_quantize and lfq_entropy (and helpers BSQ shares)."""

from __future__ import annotations

import math

import torch

from fastlatent.ops import _checks

MAX_QUANTIZE_DIMS = 62
MAX_ENTROPY_DIMS = 18


def check_channels(op: str, name: str, t: torch.Tensor, max_d: int, what: str) -> int:
    if t.dim() < 1 or not 1 <= t.shape[-1] <= max_d:
        raise ValueError(
            f"fastlatent.{op}: {name} must be [..., d] with 1 <= d <= {max_d} ({what}) in its last dim, "
            f"got shape {list(t.shape)}"
        )
    return t.shape[-1]


def check_positive(op: str, name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise ValueError(f"fastlatent.{op}: {name} must be a positive finite number, got {value}")


def math_dtype(t: torch.Tensor) -> torch.dtype:
    """Dtype of an op's float outputs: float64 for float64 inputs (CPU gradcheck), else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_tensor_like(
    op: str, name: str, g: torch.Tensor, shape, dtype: torch.dtype, ref: torch.Tensor
) -> None:
    if g.device != ref.device:
        raise RuntimeError(f"fastlatent.{op}: {name} must be on {ref.device}, got {g.device}")
    if g.dtype != dtype:
        raise TypeError(f"fastlatent.{op}: {name} must be {dtype}, got {g.dtype}")
    if list(g.shape) != list(shape):
        raise ValueError(f"fastlatent.{op}: {name} must have shape {list(shape)}, got {list(g.shape)}")


_QUANTIZE_WHAT = "bits per code, for int64 indices"
_ENTROPY_WHAT = "bits per code; the loss keeps 2^d probabilities"


def check_lfq_quantize_args(x, codebook_scale):
    op = "lfq_quantize"
    _checks.check_float(op, "x", x, allow_double=_checks.allows_double(x))
    check_channels(op, "x", x, MAX_QUANTIZE_DIMS, _QUANTIZE_WHAT)
    check_positive(op, "codebook_scale", codebook_scale)


def check_lfq_entropy_args(op, x, codebook_scale, inv_temperature) -> int:
    _checks.check_float(op, "x", x, allow_double=_checks.allows_double(x))
    d = check_channels(op, "x", x, MAX_ENTROPY_DIMS, _ENTROPY_WHAT)
    check_positive(op, "codebook_scale", codebook_scale)
    check_positive(op, "inv_temperature", inv_temperature)
    return d
