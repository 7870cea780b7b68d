"""Argument checks of the FSQ ops (levels, z)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fastlatent.ops import _checks

MAX_CODEBOOK_SIZE = 2**31


def check_levels(op: str, levels: Sequence[int]) -> list[int]:
    """levels as a list of Python ints; ValueError/TypeError naming the argument otherwise."""
    if isinstance(levels, torch.Tensor) or not isinstance(levels, (list, tuple)):
        raise TypeError(f"fastlatent.{op}: levels must be a list of ints, got {type(levels).__name__}")
    if not all(isinstance(level, int) and not isinstance(level, bool) for level in levels):
        raise TypeError(f"fastlatent.{op}: levels must be a list of ints, got {list(levels)}")
    levels = list(levels)
    if not levels:
        raise ValueError(f"fastlatent.{op}: levels must be a non-empty list of ints, got []")
    if any(level < 2 for level in levels):
        raise ValueError(f"fastlatent.{op}: levels must all be >= 2, got {levels}")
    if math.prod(levels) > MAX_CODEBOOK_SIZE:
        raise ValueError(
            f"fastlatent.{op}: the product of levels (the implicit codebook size) must be <= 2^31, "
            f"got {levels}"
        )
    return levels


def check_fsq_quantize_args(op: str, z: torch.Tensor, levels) -> list[int]:
    levels = check_levels(op, levels)
    _checks.check_float(op, "z", z, allow_double=_checks.allows_double(z))
    _checks.check_last_dim(op, "z", z, len(levels), "len(levels)")
    return levels
