"""Binary spherical quantisation: unit-sphere projection, scaled signs, factorised entropy."""

from __future__ import annotations

import torch

from fastlatent._extension import extension_available, require_device
from fastlatent.ops._autograd import differentiable_vjp, wants_double_backward
from fastlatent.ops.checks.bsq import MAX_DIMS, check_bsq_args  # noqa: F401 (re-exported)
from fastlatent.ops.checks.lfq import check_positive, check_tensor_like, math_dtype
from fastlatent.reference.bsq import bsq_entropy as _reference_bsq_entropy
from fastlatent.reference.bsq import bsq_quantize as _reference_bsq_quantize


def bsq_quantize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary spherical quantisation (Zhao et al. 2024, https://arxiv.org/abs/2406.07548) of ``z [..., d]``.

    ``u = z / max(||z||, 1e-12)`` (as ``F.normalize``), ``quantized = sign(u) / sqrt(d)`` with
    ``sign(0) = -1``, and the straight-through gradient of ``u`` (the projection's Jacobian,
    fused in ``bsq_quantize_backward``). ``indices`` int64 ``[...]``, channel 0 the most
    significant bit. A row holding NaN or Inf gives a NaN row and index -1 (``F.normalize``
    makes it NaN). ``d <= 62``.
    """
    require_device("bsq_quantize", z)
    return torch.ops.fastlatent.bsq_quantize.default(z)


def bsq_entropy(z: torch.Tensor, inv_temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """BSQ's factorised entropy terms for ``z [..., d]`` (projected onto the sphere inside).

    Per-dimension Bernoulli logits ``a = 4 inv_temperature u / sqrt(d)`` (the soft assignment of
    ``-||u - c||^2 / tau`` over ``c in {+-1/sqrt(d)}^d``). Returns ``(per_sample_entropy [...],
    avg_probs [d])``: each sample's entropy (a sum of binary entropies, exact) and the batch mean
    of ``sigmoid(a)`` per dimension; the paper's codebook-entropy estimate is
    ``sum_i h(avg_probs[i])`` (:class:`fastlatent.nn.BSQ`). float32 (float64 for float64
    input); differentiable through ``bsq_entropy_backward``; O(N d); deterministic.
    """
    require_device("bsq_entropy", z)
    return torch.ops.fastlatent.bsq_entropy.default(z, float(inv_temperature))


if extension_available():

    @torch.library.register_fake("fastlatent::bsq_quantize")
    def _bsq_quantize_fake(z):
        check_bsq_args("bsq_quantize", z)
        return torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty(
            z.shape[:-1], dtype=torch.int64
        )

    @torch.library.register_fake("fastlatent::bsq_quantize_backward")
    def _bsq_quantize_backward_fake(grad_quantized, z):
        op = "bsq_quantize_backward"
        check_bsq_args(op, z)
        check_tensor_like(op, "grad_quantized", grad_quantized, z.shape, z.dtype, z)
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastlatent::bsq_entropy")
    def _bsq_entropy_fake(z, inv_temperature=1.0):
        op = "bsq_entropy"
        d = check_bsq_args(op, z)
        check_positive(op, "inv_temperature", inv_temperature)
        dt = math_dtype(z)
        return z.new_empty(z.shape[:-1], dtype=dt), z.new_empty((d,), dtype=dt)

    @torch.library.register_fake("fastlatent::bsq_entropy_backward")
    def _bsq_entropy_backward_fake(grad_per_sample_entropy, grad_avg_probs, z, inv_temperature=1.0):
        op = "bsq_entropy_backward"
        d = check_bsq_args(op, z)
        check_positive(op, "inv_temperature", inv_temperature)
        dt = math_dtype(z)
        check_tensor_like(op, "grad_per_sample_entropy", grad_per_sample_entropy, z.shape[:-1], dt, z)
        check_tensor_like(op, "grad_avg_probs", grad_avg_probs, (d,), dt, z)
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    def _bsq_quantize_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.mark_non_differentiable(output[1])

    def _bsq_quantize_backward(ctx, grad_quantized, grad_indices):
        (z,) = ctx.saved_tensors
        if wants_double_backward():  # create_graph=True: the straight-through gradient of the reference
            return differentiable_vjp(_reference_bsq_quantize, (z,), (True,), (grad_quantized, None))[0]
        return torch.ops.fastlatent.bsq_quantize_backward.default(grad_quantized, z)

    torch.library.register_autograd(
        "fastlatent::bsq_quantize", _bsq_quantize_backward, setup_context=_bsq_quantize_setup
    )

    def _bsq_entropy_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.inv_temperature = inputs[1]

    def _bsq_entropy_backward(ctx, grad_per_sample, grad_avg_probs):
        (z,) = ctx.saved_tensors
        if wants_double_backward():  # create_graph=True: through the reference's factorised entropy terms
            return differentiable_vjp(
                lambda z_: _reference_bsq_entropy(z_, ctx.inv_temperature),
                (z,),
                (True,),
                (grad_per_sample, grad_avg_probs),
            )[0], None
        grad_z = torch.ops.fastlatent.bsq_entropy_backward.default(
            grad_per_sample, grad_avg_probs, z, ctx.inv_temperature
        )
        return grad_z, None

    torch.library.register_autograd(
        "fastlatent::bsq_entropy", _bsq_entropy_backward, setup_context=_bsq_entropy_setup
    )
