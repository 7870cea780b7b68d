"""ema_update_: the in-place EMA codebook update (decay, Laplace smoothing, normalisation)."""

from __future__ import annotations

import torch

from fastlatent._extension import extension_available, require_device
from fastlatent.ops import _checks


def check_ema_update_args(cluster_size, embed_sum, codebook, counts, sums, decay, eps) -> None:
    op = "ema_update_"
    _checks.check_dim(op, "codebook", codebook, 2, "[K, D]")
    k, d = codebook.shape
    if k < 1 or d < 1:
        raise ValueError(
            f"fastlatent.{op}: codebook must be [K, D] with K, D >= 1, got shape {list(codebook.shape)}"
        )
    for name, t in (("cluster_size", cluster_size), ("counts", counts)):
        if t.dim() != 1 or t.shape[0] != k:
            raise ValueError(f"fastlatent.{op}: {name} must be [K] = [{k}], got shape {list(t.shape)}")
    for name, t in (("embed_sum", embed_sum), ("sums", sums)):
        if t.shape != codebook.shape:
            raise ValueError(
                f"fastlatent.{op}: {name} must be [K, D] = {list(codebook.shape)}, got shape {list(t.shape)}"
            )
    for name, t in (
        ("cluster_size", cluster_size),
        ("embed_sum", embed_sum),
        ("counts", counts),
        ("sums", sums),
    ):
        _checks.check_same_device(op, "codebook", codebook, name, t)
        _checks.check_fp32(op, name, t)
    for name, t in (("cluster_size", cluster_size), ("embed_sum", embed_sum), ("codebook", codebook)):
        if not t.is_contiguous():
            raise ValueError(f"fastlatent.{op}: {name} is updated in place and must be contiguous")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"fastlatent.{op}: decay must be in [0, 1], got {decay}")
    # the kernel computes in float32: an eps that is inf (or NaN) there turns the whole codebook into NaN
    if not 0.0 <= eps <= torch.finfo(torch.float32).max:
        raise ValueError(f"fastlatent.{op}: eps must be a finite float32 value >= 0, got {eps}")
    _checks.check_float(op, "codebook", codebook)


def ema_update_(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    codebook: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float,
    eps: float = 1e-5,
) -> None:
    """EMA codebook update, in place, in one pass over the statistics.

    With ``counts, sums = code_stats(x, indices, K)`` (all-reduced across processes first in
    data-parallel training)::

        cluster_size = decay * cluster_size + (1 - decay) * counts
        embed_sum    = decay * embed_sum    + (1 - decay) * sums
        n            = cluster_size.sum()
        codebook     = embed_sum / ((cluster_size + eps) / (n + K * eps) * n)[:, None]

    the same math as vector-quantize-pytorch's EMA codebook. ``cluster_size`` ``[K]``,
    ``embed_sum`` ``[K, D]``, ``counts`` and ``sums`` are float32; ``codebook`` ``[K, D]`` may
    be float32/float16/bfloat16. The three updated tensors must be contiguous. If every
    cluster size is 0, ``n`` is 0 and the codebook becomes NaN: start ``cluster_size`` at
    ones, as the modules do. Deterministic. Like torch's in-place ops, it bumps the autograd
    version counter of the three updated tensors, so a graph that saved one of them raises
    instead of differentiating through the new values.
    """
    require_device("ema_update_", codebook, cluster_size, embed_sum, counts, sums)
    torch.ops.fastlatent.ema_update_.default(
        cluster_size, embed_sum, codebook, counts, sums, float(decay), float(eps)
    )


if extension_available():

    @torch.library.register_fake("fastlatent::ema_update_")
    def _ema_update_fake(cluster_size, embed_sum, codebook, counts, sums, decay, eps):
        check_ema_update_args(cluster_size, embed_sum, codebook, counts, sums, decay, eps)
        return None
