"""sample_code: Gumbel-max sampling of codebook entries fused into the codebook search."""

from __future__ import annotations

import math

import torch

from fastlatent._extension import extension_available, require_device
from fastlatent.ops import _checks
from fastlatent.ops.nearest_code import METRICS, check_code_search_shapes
from fastlatent.ops.sampler_steps import seed_from_generator

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def check_sample_code_args(
    x: torch.Tensor, codebook: torch.Tensor, temperature: float, seed: int, offset: int, metric: str
) -> None:
    op = "sample_code"
    check_code_search_shapes(op, x, codebook)
    if codebook.shape[-2] >= 2**31 - 64:
        raise ValueError(f"fastlatent.{op}: codebook must hold fewer than 2^31 codes")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0 and math.isfinite(float(torch.tensor(1.0 / t, dtype=torch.float32)))):
        raise ValueError(
            f"fastlatent.{op}: temperature must be a finite float > 0 (use nearest_code for temperature 0), "
            f"got {temperature}"
        )
    for name, value in (("seed", seed), ("offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool) or not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"fastlatent.{op}: {name} must be an int64 integer, got {value!r}")
    _checks.check_choice(op, "metric", metric, METRICS)


def sample_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float = 1.0,
    seed: int | None = None,
    offset: int = 0,
    metric: str = "l2",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw a codebook entry for every row of ``x`` from ``softmax(logits / temperature)``.

    Gumbel-max fused into the search: ``argmax_k(logit(x_n, c_k) / temperature + g_nk)`` with the
    Gumbel noise ``g_nk`` generated inside the kernel, so no ``N x K`` matrix (of logits or of noise)
    is ever stored. The logits are those of vector-quantize-pytorch's ``stochastic_sample_codes``:
    minus the Euclidean distance ``sqrt(max(|x|^2 + |c|^2 - 2<x, c>, 1e-8))`` (``metric="l2"``) or
    the cosine similarity (``metric="cosine"``, norms clamped at 1e-12). Math in fp32.

    Args:
        x: ``[N, D]`` rows, float32/float16/bfloat16; or ``[B, N, D]`` for ``B`` independent draws
            (heads), ``x[b]`` against ``codebook[b]`` (CUDA: ``B <= 65535``).
        codebook: ``[K, D]`` (``[B, K, D]`` with batched ``x``), same dtype and device, ``K >= 1``.
        temperature: finite and ``> 0`` (temperature 0 is the nearest code: :func:`nearest_code`).
        seed, offset: the Philox key of the draw (``csrc/kernels/philox.h``): logit ``e`` of the flat
            ``[B, N, K]`` logits takes noise ``-ln(-ln u_e)`` of the stream ``(seed, offset)``, so the
            same ``(seed, offset)`` gives the same codes, on the CPU and on CUDA up to the fp32 rounding
            of the distances. ``seed=None`` draws it from ``generator`` (default: torch's CPU
            generator, so :func:`torch.manual_seed` makes a run repeatable).
        metric: ``"l2"`` or ``"cosine"``.
        generator: where ``seed=None`` takes its seed from (advanced by one draw).

    Returns:
        int64 ``[N]`` (``[B, N]``) indices. Ties go to the lowest index; a row holding NaN/Inf gets
        index 0 and a code holding NaN/Inf is drawn by every finite row (as :func:`torch.argmax`).
        Not differentiable (integers): straight-through estimators use ``softmax(logits / T)``.
    """
    require_device("sample_code", x, codebook)
    if seed is None:
        seed = seed_from_generator(generator)
    return torch.ops.fastlatent.sample_code.default(x, codebook, float(temperature), seed, offset, metric)


if extension_available():

    @torch.library.register_fake("fastlatent::sample_code")
    def _sample_code_fake(x, codebook, temperature, seed, offset=0, metric="l2"):
        check_sample_code_args(x, codebook, temperature, seed, offset, metric)
        return x.new_empty(x.shape[:-1], dtype=torch.int64)

    def _sample_code_setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output)  # integer codes

    def _sample_code_backward(ctx, grad_indices):
        return None, None, None, None, None, None

    torch.library.register_autograd(
        "fastlatent::sample_code", _sample_code_backward, setup_context=_sample_code_setup_context
    )
