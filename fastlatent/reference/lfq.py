"""Reference LFQ: sign quantisation, and the entropy terms from the materialised soft assignment.

``lfq_entropy`` builds the ``N x 2^d`` softmax in float64, exactly as vector-quantize-pytorch's
LFQ writes it (``softmax(-(-2 <x, c>) * inv_temperature)`` over the codes ``c``), without the
1e-5 clamp vqp puts inside its logs: it is the ground truth the factorised kernels must match.
"""

from __future__ import annotations

import torch

from fastlatent.ops.checks.lfq import check_lfq_entropy_args, check_lfq_quantize_args, math_dtype


class _StraightThrough(torch.autograd.Function):
    """Forward `value`, backward the identity to `x` (no x - x.detach(): Inf - Inf is NaN)."""

    @staticmethod
    def forward(ctx, x, value):
        return value

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def bit_weights(d: int, device) -> torch.Tensor:
    """2^(d - 1 - i): channel 0 is the most significant bit, as vector-quantize-pytorch."""
    return 2 ** torch.arange(d - 1, -1, -1, device=device, dtype=torch.int64)


def lfq_quantize(x: torch.Tensor, codebook_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth for :func:`fastlatent.ops.lfq_quantize`."""
    check_lfq_quantize_args(x, codebook_scale)
    bits = x > 0
    nan = torch.isnan(x)
    s = torch.tensor(codebook_scale, dtype=math_dtype(x), device=x.device)
    value = torch.where(bits, s, -s).to(x.dtype).masked_fill(nan, float("nan"))
    indices = (bits.long() * bit_weights(x.shape[-1], x.device)).sum(-1).masked_fill(nan.any(-1), -1)
    return _StraightThrough.apply(x, value), indices


def all_codes(d: int, codebook_scale: float, device, dtype=torch.float64) -> torch.Tensor:
    """The 2^d codes in index order, [2^d, d], entries +-codebook_scale."""
    idx = torch.arange(2**d, device=device)
    bits = (idx[:, None] & bit_weights(d, device)) != 0
    return (bits.to(dtype) * 2 - 1) * codebook_scale


def lfq_entropy(
    x: torch.Tensor, codebook_scale: float = 1.0, inv_temperature: float = 100.0, chunk_rows: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth for :func:`fastlatent.ops.lfq_entropy` (float64, chunked over rows)."""
    d = check_lfq_entropy_args("lfq_entropy", x, codebook_scale, inv_temperature)
    codebook = all_codes(d, codebook_scale, x.device)
    flat = x.double().reshape(-1, d)
    per_sample, prob_sum = [], torch.zeros(2**d, dtype=torch.float64, device=x.device)
    for start in range(0, flat.shape[0], chunk_rows):
        distance = -2 * flat[start : start + chunk_rows] @ codebook.T
        prob = (-distance * inv_temperature).softmax(dim=-1)
        per_sample.append(-torch.special.xlogy(prob, prob).sum(-1))
        prob_sum = prob_sum + prob.sum(0)
    per_sample = torch.cat(per_sample) if per_sample else flat.new_zeros(0)
    avg_probs = prob_sum / flat.shape[0] if flat.shape[0] else prob_sum * float("nan")
    mt = math_dtype(x)
    return per_sample.reshape(x.shape[:-1]).to(mt), avg_probs.to(mt)
