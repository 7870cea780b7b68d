"""Residual FSQ: every layer of a residual stack of symmetric, hard-clamped FSQ quantisers in one pass."""

from __future__ import annotations

from typing import Sequence

import torch

from fastlatent._extension import extension_available, require_device
from fastlatent.ops import _checks
from fastlatent.ops.fsq import check_levels

MAX_LAYERS = 255


def check_residual_fsq_args(op: str, z: torch.Tensor, scales: torch.Tensor, levels) -> list[int]:
    """The checks of the C++ binding, in its order and with its messages; returns levels as a list."""
    levels = check_levels(op, levels)
    _checks.check_float(op, "z", z, allow_double=_checks.allows_double(z))
    _checks.check_last_dim(op, "z", z, len(levels), "len(levels)")
    _checks.check_same_device(op, "scales", scales, "z", z)
    if not scales.is_floating_point():
        raise TypeError(f"fastlatent.{op}: scales must be a floating tensor, got {scales.dtype}")
    if scales.dim() != 2 or scales.shape[1] != len(levels) or not 1 <= scales.shape[0] <= MAX_LAYERS:
        raise ValueError(
            f"fastlatent.{op}: scales must be [num_quantizers, len(levels)] with 1 <= num_quantizers <= "
            f"{MAX_LAYERS} and len(levels) = {len(levels)}, got shape {list(scales.shape)}"
        )
    return levels


def residual_fsq(
    z: torch.Tensor, scales: torch.Tensor, levels: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual finite scalar quantisation, all layers fused (vector-quantize-pytorch's ``ResidualFSQ``
    layer stack with ``bound_hard_clamp=True``; residual quantisation: https://arxiv.org/abs/2107.03312,
    the symmetric FSQ bound: https://arxiv.org/abs/2411.19842).

    Layer ``l`` quantises ``r_l / scales[l]`` with the symmetric, hard-clamped FSQ bound, level
    ``k = floor((clamp(b, -1, 1) + 1) * (L - 1) / 2 + 0.5)`` and code ``(k * 2 / (L - 1) - 1)``, scaled
    back by ``scales[l]``; the residual ``r_{l+1} = r_l - code_l * scales[l]`` goes to the next layer and
    ``z_hat`` is the sum of the scaled codes.

    Args:
        z: ``[..., d]`` channel-last, ``d = len(levels)``; float32/float16/bfloat16 (float64 on the
            CPU); any strides and leading dims, including empty ones. vqp's ResidualFSQ feeds the
            soft-clamped input ``tanh(x / c) * c``.
        scales: ``[num_quantizers, d]`` floating, positive, on ``z``'s device, 1 to 255 layers
            (vqp: ``levels ** -l``); rounded to the math dtype (float32, float64 for float64 ``z``).
        levels: levels per channel, each ``>= 2``, product ``<= 2^31``.

    Returns:
        ``(z_hat, indices)``: ``z_hat`` like ``z`` (contiguous); ``indices`` int64 ``[..., num_quantizers]``,
        mixed radix with channel 0 least significant.

    Gradient (straight-through, the residual detached as in vqp): ``grad_z = grad_z_hat * n`` with ``n``
    the number of layers whose input ``|r_l / scales[l]| <= 1`` (the hard clamp passes gradients on
    ``[-1, 1]``). No gradient for ``scales``. The backward is one multiply, differentiable again.

    Numerics: each step is a single IEEE fp32 operation in vqp's order (fp64 for float64 input), with
    no FMA contraction, so ``z_hat`` and ``indices`` equal vqp's bit for bit and the CPU equals CUDA;
    float16/bfloat16 are computed in fp32 and rounded once. A row holding NaN gives NaN in ``z_hat`` and
    index -1 in every layer. Deterministic.
    """
    require_device("residual_fsq", z)
    levels = check_levels("residual_fsq", levels)
    z_hat, indices, _ = torch.ops.fastlatent.residual_fsq.default(z, scales, levels)
    return z_hat, indices


if extension_available():

    @torch.library.register_fake("fastlatent::residual_fsq")
    def _residual_fsq_fake(z, scales, levels):
        check_residual_fsq_args("residual_fsq", z, scales, levels)
        z_hat = torch.empty_like(z, memory_format=torch.contiguous_format)
        indices = z.new_empty((*z.shape[:-1], scales.shape[0]), dtype=torch.int64)
        pass_count = torch.empty_like(z, dtype=torch.uint8, memory_format=torch.contiguous_format)
        return z_hat, indices, pass_count

    def _residual_fsq_setup_context(ctx, inputs, output):
        _, indices, pass_count = output
        ctx.save_for_backward(pass_count)
        ctx.mark_non_differentiable(indices, pass_count)

    def _residual_fsq_backward(ctx, grad_z_hat, grad_indices, grad_pass_count):
        (pass_count,) = ctx.saved_tensors
        # a plain multiply: first-order in one pass, and differentiable again for create_graph=True
        return grad_z_hat * pass_count.to(grad_z_hat.dtype), None, None

    torch.library.register_autograd(
        "fastlatent::residual_fsq", _residual_fsq_backward, setup_context=_residual_fsq_setup_context
    )
