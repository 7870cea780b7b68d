"""nearest_code: fused nearest-codebook search (distance GEMM with the argmin fused in)."""

from __future__ import annotations

import torch

from fastlatent._extension import extension_available, require_device
from fastlatent.ops import _checks

METRICS = ("l2", "cosine")
PRECISIONS = ("ieee", "tf32")


def check_code_search_shapes(op: str, x: torch.Tensor, codebook: torch.Tensor) -> None:
    """Shapes, device and dtype of a codebook search: ``[N, D]`` x ``[K, D]`` or ``[B, N, D]`` x ``[B, K, D]``
    (shared by nearest_code and sample_code, same messages as their bindings)."""
    batched = x.dim() == 3
    if batched:
        _checks.check_dim(op, "codebook", codebook, 3, "[B, K, D] (x is batched [B, N, D])")
    else:
        _checks.check_dim(op, "x", x, 2, "[N, D] or [B, N, D]")
        _checks.check_dim(op, "codebook", codebook, 2, "[K, D]")
    _checks.check_same_device(op, "x", x, "codebook", codebook)
    _checks.check_float(op, "x", x)
    _checks.check_same_dtype(op, "x", x, "codebook", codebook)
    if batched and x.shape[0] != codebook.shape[0]:
        raise ValueError(
            f"fastlatent.{op}: x is [B, N, D] with B={x.shape[0]} but codebook is [B, K, D] "
            f"with B={codebook.shape[0]}"
        )
    if codebook.shape[-2] < 1:
        raise ValueError(
            f"fastlatent.{op}: codebook must hold at least one code (K >= 1), "
            f"got shape {list(codebook.shape)}"
        )
    if x.shape[-1] < 1:
        raise ValueError(f"fastlatent.{op}: x must have D >= 1, got shape {list(x.shape)}")
    if x.shape[-1] != codebook.shape[-1]:
        raise ValueError(
            f"fastlatent.{op}: x is [N, D] with D={x.shape[-1]} but codebook is [K, D] "
            f"with D={codebook.shape[-1]}"
        )


def check_nearest_code_args(
    x: torch.Tensor, codebook: torch.Tensor, metric: str, precision: str = "ieee"
) -> None:
    op = "nearest_code"
    check_code_search_shapes(op, x, codebook)
    _checks.check_choice(op, "metric", metric, METRICS)
    _checks.check_choice(op, "precision", precision, PRECISIONS)


def nearest_code(
    x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest codebook entry for every row of ``x``, without an N x K matrix.

    Args:
        x: ``[N, D]`` vectors, float32/float16/bfloat16, any strides; or ``[B, N, D]``: ``B``
            independent searches (one per head of a multi-head quantiser) in one call, row
            block ``x[b]`` against ``codebook[b]`` (CUDA: one launch per kernel for all of them,
            ``B <= 65535``).
        codebook: ``[K, D]`` codes (``[B, K, D]`` with batched ``x``), same dtype and device as
            ``x``, ``K >= 1``.
        metric: ``"l2"`` (squared Euclidean distance) or ``"cosine"`` (``1 - cos(x, c)``,
            norms clamped at 1e-12 as :func:`torch.nn.functional.normalize`).
        precision: how CUDA searches with float32 inputs: ``"ieee"`` (exact fp32 FMAs,
            default) or ``"tf32"`` (TF32 tensor cores: products of inputs rounded to a
            10-bit mantissa, fp32 sums; faster, may pick a code whose distance exceeds the
            minimum by about 1e-3 relative). float16/bfloat16 inputs always use tensor cores
            (exact products, fp32 sums) where D allows. The CPU always computes in fp32.

    Returns:
        ``(indices, distances)``: ``indices`` int64 ``[N]`` (``[B, N]``), ``distances`` float32
        ``[N]`` (``[B, N]``)
        holding the distance to the chosen code, recomputed directly in fp32 (not from the
        expanded ``|c|^2 - 2<x, c>`` form used for the search).

    All arithmetic is fp32 whatever the input dtype. Ties go to the lowest index and the
    result is deterministic. A row of ``x`` holding NaN or Inf maps to index 0; a code
    holding NaN or Inf wins every finite row (NaN compares smallest, as in
    :func:`torch.argmin`); the distance is then non-finite. Extra memory is O(K) on CUDA and
    O(K * D) on CPU (a packed fp32 copy of the codebook), never O(N * K).

    ``distances`` carries no gradient: use the returned indices to gather codes for losses.
    """
    require_device("nearest_code", x, codebook)
    return torch.ops.fastlatent.nearest_code.default(x, codebook, metric, precision)


if extension_available():

    @torch.library.register_fake("fastlatent::nearest_code")
    def _nearest_code_fake(x, codebook, metric="l2", precision="ieee"):
        check_nearest_code_args(x, codebook, metric, precision)
        rows = x.shape[:-1]
        return x.new_empty(rows, dtype=torch.int64), x.new_empty(rows, dtype=torch.float32)

    def _nearest_code_setup_context(ctx, inputs, output):
        # Indices are integers and the distances are reported, not trained through.
        ctx.mark_non_differentiable(*output)

    def _nearest_code_backward(ctx, grad_indices, grad_distances):
        return None, None, None, None

    torch.library.register_autograd(
        "fastlatent::nearest_code", _nearest_code_backward, setup_context=_nearest_code_setup_context
    )
