"""Finite scalar quantisation: fused bound + round (straight-through) + normalise + index."""

from __future__ import annotations

from typing import Sequence

import torch

from fastlatent._extension import extension_available, require_device
from fastlatent.ops import _checks
from fastlatent.ops._autograd import differentiable_vjp, wants_double_backward
from fastlatent.ops.checks.fsq import (  # noqa: F401 (re-exported: public names of this module)
    MAX_CODEBOOK_SIZE,
    check_fsq_quantize_args,
    check_levels,
)
from fastlatent.reference.fsq import fsq_quantize as _reference_fsq_quantize


def fsq_quantize(
    z: torch.Tensor, levels: Sequence[int], preserve_symmetry: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite scalar quantisation of ``z`` (Mentzer et al., https://arxiv.org/abs/2309.15505).

    Args:
        z: ``[..., d]`` channel-last, ``d = len(levels)``; float32/float16/bfloat16 (float64 on
            the CPU, for gradcheck); any strides; any number of leading dims, including none
            and empty ones.
        levels: quantisation levels per channel, each ``>= 2``, product ``<= 2^31``.
        preserve_symmetry: the symmetric bound of arXiv:2411.19842 (vector-quantize-pytorch's
            ``preserve_symmetry=True``): codes ``(2k - (L - 1)) / (L - 1)``, symmetric in [-1, 1],
            so ``L = 2`` gives {-1, +1}. Default: the paper's bound, codes ``(k - L//2) / (L//2)``
            (for even ``L`` the grid is shifted by half a step: ``L = 2`` gives {-1, 0}).

    Returns:
        ``(z_hat, indices)``: ``z_hat`` like ``z`` (contiguous) holding the normalised codes;
        ``indices`` int64 ``[...]``, mixed radix with channel 0 least significant (as
        vector-quantize-pytorch, whose indices are int32).

    Default bound, per channel: ``tanh(z + atanh(offset / half_l)) * half_l - offset`` with
    ``half_l = (L - 1)(1 + 1e-3) / 2`` and ``offset = 0.5`` for even ``L``, rounded half to even.
    Gradient (straight-through rounding): ``(1 - tanh^2) * half_l / (L//2)`` (``1 - tanh^2(z)``
    when symmetric), from the fused ``fsq_quantize_backward`` kernel.

    Numerics: fp32 math for every input dtype; elements within 2^-16 of a rounding boundary are
    re-evaluated in fp64, so values and indices equal :func:`fastlatent.reference.fsq_quantize`
    exactly. ``+-Inf`` saturate to the extreme levels (gradient 0); a NaN element gives NaN in
    ``z_hat``, index -1 for its row and a NaN gradient. Deterministic.
    """
    require_device("fsq_quantize", z)
    levels = check_levels("fsq_quantize", levels)
    return torch.ops.fastlatent.fsq_quantize.default(z, levels, preserve_symmetry)


def fsq_indices_to_codes(
    indices: torch.Tensor,
    levels: Sequence[int],
    preserve_symmetry: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Normalised codes ``[..., len(levels)]`` of FSQ indices ``[...]`` (int64 or int32).

    The inverse of :func:`fsq_quantize`: ``fsq_indices_to_codes(fsq_quantize(z, L)[1], L)``
    equals ``z_hat`` exactly. Indices outside ``[0, prod(levels))`` (such as the -1 of a NaN
    row) give a row of NaN. ``dtype`` defaults to float32. Not differentiable (integer input).
    """
    require_device("fsq_indices_to_codes", indices)
    levels = check_levels("fsq_indices_to_codes", levels)
    return torch.ops.fastlatent.fsq_indices_to_codes.default(indices, levels, preserve_symmetry, dtype)


if extension_available():

    @torch.library.register_fake("fastlatent::fsq_quantize")
    def _fsq_quantize_fake(z, levels, preserve_symmetry=False):
        check_fsq_quantize_args("fsq_quantize", z, levels)
        return torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty(
            z.shape[:-1], dtype=torch.int64
        )

    @torch.library.register_fake("fastlatent::fsq_quantize_backward")
    def _fsq_quantize_backward_fake(grad_z_hat, z, levels, preserve_symmetry=False):
        op = "fsq_quantize_backward"
        check_fsq_quantize_args(op, z, levels)
        _checks.check_same_device(op, "grad_z_hat", grad_z_hat, "z", z)
        _checks.check_same_dtype(op, "grad_z_hat", grad_z_hat, "z", z)
        _checks.check_same_shape(op, "grad_z_hat", grad_z_hat, "z", z)
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastlatent::fsq_indices_to_codes")
    def _fsq_indices_to_codes_fake(indices, levels, preserve_symmetry=False, dtype=None):
        op = "fsq_indices_to_codes"
        levels = check_levels(op, levels)
        _checks.check_index(op, "indices", indices)
        dtype = torch.float32 if dtype is None else dtype
        _checks.check_float_dtype(op, "dtype", dtype, allow_double=_checks.allows_double(indices))
        return indices.new_empty((*indices.shape, len(levels)), dtype=dtype)

    def _fsq_setup_context(ctx, inputs, output):
        z, levels, preserve_symmetry = inputs
        ctx.save_for_backward(z)
        ctx.levels = levels
        ctx.preserve_symmetry = preserve_symmetry
        ctx.mark_non_differentiable(output[1])

    def _fsq_backward(ctx, grad_z_hat, grad_indices):
        (z,) = ctx.saved_tensors
        if wants_double_backward():  # create_graph=True: the straight-through gradient of the reference
            (grad_z,) = differentiable_vjp(
                lambda z_: _reference_fsq_quantize(z_, ctx.levels, ctx.preserve_symmetry),
                (z,),
                (True,),
                (grad_z_hat, None),
            )
            return grad_z, None, None
        grad_z = torch.ops.fastlatent.fsq_quantize_backward.default(
            grad_z_hat, z, ctx.levels, ctx.preserve_symmetry
        )
        return grad_z, None, None

    torch.library.register_autograd(
        "fastlatent::fsq_quantize", _fsq_backward, setup_context=_fsq_setup_context
    )
