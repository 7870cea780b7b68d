"""Argument checks of bsq_quantize and bsq_entropy."""

from __future__ import annotations

from fastlatent.ops import _checks
from fastlatent.ops.checks.lfq import check_channels

MAX_DIMS = 62
_WHAT = "bits per code, for int64 indices"


def check_bsq_args(op, z) -> int:
    _checks.check_float(op, "z", z, allow_double=_checks.allows_double(z))
    return check_channels(op, "z", z, MAX_DIMS, _WHAT)
