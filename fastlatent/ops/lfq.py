"""Lookup-free quantisation: sign quantisation with bit indices, and its entropy loss without N x 2^d."""

from __future__ import annotations

import torch

from fastlatent._extension import extension_available, require_device
from fastlatent.ops._autograd import differentiable_vjp, wants_double_backward
from fastlatent.ops.checks.lfq import (  # noqa: F401 (re-exported: public names of this module)
    MAX_ENTROPY_DIMS,
    MAX_QUANTIZE_DIMS,
    check_channels,
    check_lfq_entropy_args,
    check_lfq_quantize_args,
    check_positive,
    check_tensor_like,
    math_dtype,
)
from fastlatent.reference.lfq import lfq_entropy as _reference_lfq_entropy


def lfq_quantize(x: torch.Tensor, codebook_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lookup-free quantisation (MAGVIT-v2, https://arxiv.org/abs/2310.05737) of ``x [..., d]``.

    Returns ``(quantized, indices)``: ``quantized[..., i] = +codebook_scale`` where ``x > 0`` and
    ``-codebook_scale`` elsewhere (0 maps to the negative code, as vector-quantize-pytorch), like ``x``;
    ``indices`` int64 ``[...]`` from the bits, channel 0 the most significant (vqp's bit order).
    The gradient is the straight-through identity. ``d <= 62``. A NaN element gives NaN in
    ``quantized`` and index -1 for its row; ``+-Inf`` quantise by their sign.
    """
    require_device("lfq_quantize", x)
    return torch.ops.fastlatent.lfq_quantize.default(x, float(codebook_scale))


def lfq_entropy(
    x: torch.Tensor, codebook_scale: float = 1.0, inv_temperature: float = 100.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample entropies and the batch-average code distribution of LFQ's soft assignment.

    The soft assignment of vector-quantize-pytorch's LFQ is ``softmax_c(2 <x, c> * inv_temperature)``
    over the ``2^d`` codes ``c in {-s, +s}^d`` (``s = codebook_scale``); it factorises into
    per-dimension Bernoullis with logits ``a = 4 s x inv_temperature``, so nothing of size
    ``N x 2^d`` is built: memory is O(N + 2^d), time O(N 2^d) in GEMM-shaped loops.

    Args:
        x: ``[..., d]`` pre-quantisation values, ``1 <= d <= 18``; float32/float16/bfloat16 (float64 on CPU).

    Returns:
        ``(per_sample_entropy [...], avg_probs [2^d])``, float32 (float64 for float64 input):
        the exact entropy (nats) of each sample's assignment, and the mean assignment over all
        samples, indexed like the indices of :func:`lfq_quantize`. vqp's ``entropy_aux_loss`` is
        ``per_sample_entropy.mean() - diversity_gamma * H(avg_probs)``; see
        :func:`fastlatent.nn.LFQ` (vqp clamps probabilities at 1e-5 inside its logs; these are
        the exact entropies). Both outputs are differentiable (``lfq_entropy_backward``).
        A NaN input makes its sample's entropy and all of ``avg_probs`` NaN; no samples give NaN
        ``avg_probs`` (a mean of nothing). Deterministic.
    """
    require_device("lfq_entropy", x)
    return torch.ops.fastlatent.lfq_entropy.default(x, float(codebook_scale), float(inv_temperature))


if extension_available():

    @torch.library.register_fake("fastlatent::lfq_quantize")
    def _lfq_quantize_fake(x, codebook_scale=1.0):
        check_lfq_quantize_args(x, codebook_scale)
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(
            x.shape[:-1], dtype=torch.int64
        )

    @torch.library.register_fake("fastlatent::lfq_entropy")
    def _lfq_entropy_fake(x, codebook_scale=1.0, inv_temperature=100.0):
        d = check_lfq_entropy_args("lfq_entropy", x, codebook_scale, inv_temperature)
        dt = math_dtype(x)
        return x.new_empty(x.shape[:-1], dtype=dt), x.new_empty((2**d,), dtype=dt)

    @torch.library.register_fake("fastlatent::lfq_entropy_backward")
    def _lfq_entropy_backward_fake(
        grad_per_sample_entropy, grad_avg_probs, x, codebook_scale=1.0, inv_temperature=100.0
    ):
        op = "lfq_entropy_backward"
        d = check_lfq_entropy_args(op, x, codebook_scale, inv_temperature)
        dt = math_dtype(x)
        check_tensor_like(op, "grad_per_sample_entropy", grad_per_sample_entropy, x.shape[:-1], dt, x)
        check_tensor_like(op, "grad_avg_probs", grad_avg_probs, (2**d,), dt, x)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _lfq_quantize_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])

    def _lfq_quantize_backward(ctx, grad_quantized, grad_indices):
        return grad_quantized, None  # straight-through

    torch.library.register_autograd(
        "fastlatent::lfq_quantize", _lfq_quantize_backward, setup_context=_lfq_quantize_setup
    )

    def _lfq_entropy_setup(ctx, inputs, output):
        x, codebook_scale, inv_temperature = inputs
        ctx.save_for_backward(x)
        ctx.codebook_scale = codebook_scale
        ctx.inv_temperature = inv_temperature

    def _lfq_entropy_backward(ctx, grad_per_sample, grad_avg_probs):
        (x,) = ctx.saved_tensors
        if wants_double_backward():  # create_graph=True: through the reference (N x 2^d, chunked over rows)
            return (
                differentiable_vjp(
                    lambda x_: _reference_lfq_entropy(x_, ctx.codebook_scale, ctx.inv_temperature),
                    (x,),
                    (True,),
                    (grad_per_sample, grad_avg_probs),
                )[0],
                None,
                None,
            )
        grad_x = torch.ops.fastlatent.lfq_entropy_backward.default(
            grad_per_sample, grad_avg_probs, x, ctx.codebook_scale, ctx.inv_temperature
        )
        return grad_x, None, None

    torch.library.register_autograd(
        "fastlatent::lfq_entropy", _lfq_entropy_backward, setup_context=_lfq_entropy_setup
    )
