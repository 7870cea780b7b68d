"""Reference FSQ: the bound in float64, values formed in float32 from the integer level.

Written for exactness: the level of every element is decided in float64 (as the kernels do for
elements near a rounding boundary), the value is ``float32(q) / float32(L // 2)`` (or the
symmetric ``float32(2k - (L - 1)) / float32(L - 1)``) rounded once to the input dtype, and the
straight-through gradient flows through the float64 bound by autograd.
"""

from __future__ import annotations

import torch

from fastlatent.ops.checks.fsq import check_fsq_quantize_args, check_levels

_EPS = 1e-3


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' math type: float64 for float64 tensors (CPU), float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _constants(levels: list[int], device) -> dict:
    L = torch.tensor(levels, dtype=torch.float64, device=device)
    Li = torch.tensor(levels, dtype=torch.int64, device=device)
    basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.int64, device=device), 0)
    return {"L": L, "Li": Li, "hw": Li // 2, "basis": basis}


def fsq_quantize(
    z: torch.Tensor, levels: list[int], preserve_symmetry: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth for :func:`fastlatent.ops.fsq_quantize` (same signature, values and NaN rules)."""
    levels = check_fsq_quantize_args("fsq_quantize", z, levels)
    c = _constants(levels, z.device)
    L, Li, hw = c["L"], c["Li"], c["hw"]
    z64 = z.double()
    mt = _math_dtype(z.dtype)
    if preserve_symmetry:
        bracket = (L - 1) * (torch.tanh(z64) + 1) / 2 + 0.5
        k = torch.floor(bracket).nan_to_num(0).long().clamp(torch.zeros_like(Li), Li - 1)
        value = (2 * k - (Li - 1)).to(mt) / (Li - 1).to(mt)
        smooth = (bracket - 0.5) * (2.0 / (L - 1)) - 1  # d/dz: 1 - tanh^2(z)
    else:
        half_l = (L - 1) * (1 + _EPS) / 2
        offset = torch.where(Li % 2 == 0, 0.5, 0.0).double()
        shift = torch.atanh(offset / half_l)
        bounded = torch.tanh(z64 + shift) * half_l - offset
        q = torch.round(bounded).nan_to_num(0).long().clamp(-hw, Li - 1 - hw)
        k = q + hw
        value = q.to(mt) / hw.to(mt)
        smooth = bounded / hw
    nan = torch.isnan(z64)
    value = value.masked_fill(nan, float("nan")).to(z.dtype)
    # Straight-through: the forward value is `value` exactly, the gradient that of `smooth`.
    z_hat = value + (smooth - smooth.detach()).to(z.dtype)
    indices = (k * c["basis"]).sum(-1).masked_fill(nan.any(-1), -1)
    return z_hat, indices


def fsq_indices_to_codes(
    indices: torch.Tensor,
    levels: list[int],
    preserve_symmetry: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Ground truth for :func:`fastlatent.ops.fsq_indices_to_codes`."""
    levels = check_levels("fsq_indices_to_codes", levels)
    c = _constants(levels, indices.device)
    Li, hw = c["Li"], c["hw"]
    dtype = torch.float32 if dtype is None else dtype
    mt = _math_dtype(dtype)
    idx = indices.long()
    valid = (idx >= 0) & (idx < int(torch.prod(Li)))
    k = (idx.clamp_min(0)[..., None] // c["basis"]) % Li
    if preserve_symmetry:
        value = (2 * k - (Li - 1)).to(mt) / (Li - 1).to(mt)
    else:
        value = (k - hw).to(mt) / hw.to(mt)
    value = value.masked_fill(~valid[..., None], float("nan"))
    return value.to(dtype)
