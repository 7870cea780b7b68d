"""code_stats: per-code counts and vector sums, without a one-hot N x K matmul."""

from __future__ import annotations

import torch

from fastlatent._extension import extension_available, require_device
from fastlatent.ops import _checks


def check_code_stats_args(x: torch.Tensor, indices: torch.Tensor, num_codes: int) -> None:
    op = "code_stats"
    _checks.check_dim(op, "x", x, 2, "[N, D]")
    _checks.check_dim(op, "indices", indices, 1, "[N]")
    _checks.check_same_device(op, "x", x, "indices", indices)
    _checks.check_float(op, "x", x)
    _checks.check_int64(op, "indices", indices)
    if indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"fastlatent.{op}: indices must have one entry per row of x: x is {list(x.shape)}, "
            f"indices is {list(indices.shape)}"
        )
    if num_codes < 1:
        raise ValueError(f"fastlatent.{op}: num_codes must be >= 1, got {num_codes}")
    if x.shape[1] < 1:
        raise ValueError(f"fastlatent.{op}: x must have D >= 1, got shape {list(x.shape)}")


def code_stats(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int, deterministic: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """How many rows of ``x`` each code got, and their sum.

    Args:
        x: ``[N, D]`` vectors, float32/float16/bfloat16.
        indices: ``[N]`` int64 code of each row; entries outside ``[0, num_codes)`` (such as
            ``-1`` for masked padding) are skipped.
        num_codes: ``K``, the codebook size.
        deterministic: CUDA only. ``True`` (default) groups rows by a stable sort and sums each
            code's rows in a fixed order (pieces of 128 rows in row order, combined pairwise), so
            results are bitwise reproducible and equal to the CPU's, with a rounding error that grows
            like log N for a code of N rows; ``False`` uses float atomics (one pass, order-dependent
            rounding). The CPU is always deterministic.

    Returns:
        ``(counts, sums)``: float32 ``[K]`` and float32 ``[K, D]``.

    ``sums`` is differentiable with respect to ``x`` (its gradient is a gather of the
    incoming gradient by ``indices``); ``counts`` is not differentiable.
    """
    require_device("code_stats", x, indices)
    return torch.ops.fastlatent.code_stats.default(x, indices, num_codes, deterministic)


if extension_available():

    @torch.library.register_fake("fastlatent::code_stats")
    def _code_stats_fake(x, indices, num_codes, deterministic=True):
        check_code_stats_args(x, indices, num_codes)
        return x.new_empty((num_codes,), dtype=torch.float32), x.new_empty(
            (num_codes, x.shape[1]), dtype=torch.float32
        )

    def _setup_context(ctx, inputs, output):
        x, indices, num_codes, _ = inputs
        ctx.save_for_backward(indices)
        ctx.x_dtype = x.dtype
        ctx.mark_non_differentiable(output[0])

    def _backward(ctx, grad_counts, grad_sums):
        (indices,) = ctx.saved_tensors
        valid = (indices >= 0) & (indices < grad_sums.shape[0])
        grad_x = grad_sums[indices.clamp(0, grad_sums.shape[0] - 1)] * valid[:, None]
        return grad_x.to(ctx.x_dtype), None, None, None

    torch.library.register_autograd("fastlatent::code_stats", _backward, setup_context=_setup_context)
