"""OpInfo-lite: one OpSpec per fastlatent op, consumed by tests/test_ops_generic.py.

Each spec knows how to make sample inputs (shapes including odd and empty ones), error
inputs (with the message the error must match), which dtypes each device supports, and
how to compare the op's output with its reference.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch

import fastlatent
from fastlatent import reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Sample:
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    name: str = ""


@dataclasses.dataclass
class ErrorSample:
    args: tuple
    kwargs: dict
    error: type
    match: str


@dataclasses.dataclass
class OpSpec:
    name: str
    op: Callable
    reference: Callable
    sample_inputs: Callable[[torch.device, torch.dtype], Iterator[Sample]]
    error_inputs: Callable[[torch.device], Iterator[ErrorSample]]
    compare: Callable[[Sample, tuple, tuple], None]  # (sample, ours, reference) -> assert
    dtypes: tuple = FLOAT_DTYPES
    # Positions of the tensor arguments that may be non-contiguous (None: all of them).
    non_contiguous_args: tuple | None = None


def returning_mutated(fn: Callable, count: int) -> Callable:
    """For in-place ops: run `fn` on clones of the first `count` args and return the clones."""

    def run(*args, **kwargs):
        mutated = [a.clone() for a in args[:count]]
        fn(*mutated, *args[count:], **kwargs)
        return tuple(mutated)

    return run


# ---------------------------------------------------------------- nearest_code


def _nearest_code_samples(device, dtype):
    gen = torch.Generator().manual_seed(1234)
    shapes = [(0, 8, 5), (1, 1, 1), (3, 3, 17), (7, 17, 1), (33, 7, 3), (257, 33, 257),
              (100, 64, 1000), (65, 8, 512), (70, 130, 40)]
    for n, d, k in shapes:
        codebook = torch.randn(k, d, generator=gen)
        x = torch.randn(n, d, generator=gen)
        for metric in ("l2", "cosine"):
            yield Sample((x.to(device, dtype), codebook.to(device, dtype)), {"metric": metric},
                         name=f"N{n}_D{d}_K{k}_{metric}")


def assert_near_ties(x, codebook, indices, ref_indices, metric):
    """Indices equal, except where both codes are equally near up to fp32 rounding."""
    if torch.equal(indices, ref_indices):
        return
    x64, c64 = x.double(), codebook.double()
    if metric == "l2":
        def dist(idx):
            return ((x64 - c64[idx]) ** 2).sum(1)
        scale = (x64 * x64).sum(1) + (c64 * c64).sum(1).max()
    else:
        cn = c64 / c64.norm(dim=1, keepdim=True).clamp_min(1e-12)
        xn = x64 / x64.norm(dim=1, keepdim=True).clamp_min(1e-12)

        def dist(idx):
            return 1 - (xn * cn[idx]).sum(1)
        scale = torch.ones_like(x64[:, 0])
    excess = dist(indices) - dist(ref_indices)
    tolerance = 1e-5 * x.shape[1] * scale  # fp32 accumulation over D terms
    bad = excess > tolerance
    assert not bad.any(), (
        f"{int(bad.sum())} rows picked a code farther than the nearest by more than rounding: "
        f"excess {excess[bad][:5].tolist()} > tolerance {tolerance[bad][:5].tolist()}")


def _nearest_code_compare(sample, ours, ref):
    x, codebook = sample.args
    metric = sample.kwargs.get("metric", "l2")
    indices, distances = ours
    ref_indices, _ = ref
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    assert indices.shape == distances.shape == (x.shape[0],)
    assert_near_ties(x, codebook, indices, ref_indices, metric)
    # The returned distance is that of the returned index, recomputed exactly in fp32.
    xf, cf = x.double(), codebook.double()[indices]
    if metric == "l2":
        exact = ((xf - cf) ** 2).sum(1)
    else:
        exact = 1 - (xf * cf).sum(1) / (xf.norm(dim=1).clamp_min(1e-12) * cf.norm(dim=1).clamp_min(1e-12))
    torch.testing.assert_close(distances.double(), exact, rtol=1e-5, atol=1e-5)


def _nearest_code_errors(device):
    x = torch.randn(4, 8, device=device)
    c = torch.randn(16, 8, device=device)
    yield ErrorSample((x[0], c), {}, ValueError, r"x must be 2-D \[N, D\], got shape \[8\]")
    yield ErrorSample((x, c[None]), {}, ValueError, r"codebook must be 2-D \[K, D\]")
    yield ErrorSample((x, torch.randn(16, 9, device=device)), {}, ValueError,
                      r"x is \[N, D\] with D=8 but codebook is \[K, D\] with D=9")
    yield ErrorSample((x, c[:0]), {}, ValueError, r"at least one code \(K >= 1\)")
    yield ErrorSample((x[:, :0], c[:, :0]), {}, ValueError, r"x must have D >= 1")
    yield ErrorSample((x.long(), c.long()), {}, TypeError, r"x must be float32, float16 or bfloat16, got torch.int64")
    yield ErrorSample((x, c.half()), {}, TypeError, r"x and codebook must have the same dtype, got torch.float32 and torch.float16")
    yield ErrorSample((x, c), {"metric": "dot"}, ValueError, r'metric must be "l2" or "cosine", got "dot"')
    yield ErrorSample((x, c), {"precision": "fp16"}, ValueError, r'precision must be "ieee" or "tf32", got "fp16"')
    other = "meta" if device.type == "cpu" else "cpu"
    yield ErrorSample((x, torch.randn(16, 8, device=other)), {}, RuntimeError, r"x and codebook must be on the same device")


# ---------------------------------------------------------------- code_stats


def _code_stats_samples(device, dtype):
    gen = torch.Generator().manual_seed(99)
    for n, d, k in [(0, 4, 3), (1, 1, 1), (5, 3, 17), (100, 7, 3), (333, 33, 64), (2000, 64, 300), (64, 8, 1000)]:
        x = torch.randn(n, d, generator=gen).to(device, dtype)
        indices = torch.randint(-1, k, (n,), generator=gen).to(device)  # -1: skipped
        yield Sample((x, indices, k), name=f"N{n}_D{d}_K{k}")


def _code_stats_compare(sample, ours, ref):
    assert ours[0].dtype == ours[1].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-4)


def _code_stats_errors(device):
    x = torch.randn(6, 4, device=device)
    idx = torch.zeros(6, dtype=torch.int64, device=device)
    yield ErrorSample((x[0], idx, 3), {}, ValueError, r"x must be 2-D \[N, D\]")
    yield ErrorSample((x, idx[None], 3), {}, ValueError, r"indices must be 1-D \[N\]")
    yield ErrorSample((x, idx[:5], 3), {}, ValueError, r"indices must have one entry per row of x")
    yield ErrorSample((x, idx.int(), 3), {}, TypeError, r"indices must be torch.int64, got torch.int32")
    yield ErrorSample((x.long(), idx, 3), {}, TypeError, r"x must be float32, float16 or bfloat16")
    yield ErrorSample((x, idx, 0), {}, ValueError, r"num_codes must be >= 1, got 0")


# ---------------------------------------------------------------- ema_update_


def _ema_update_samples(device, dtype):
    gen = torch.Generator().manual_seed(7)
    for k, d, decay in [(1, 1, 0.8), (3, 5, 0.0), (17, 8, 0.99), (256, 64, 0.8), (1000, 3, 1.0), (77, 130, 0.5)]:
        cluster_size = (torch.rand(k, generator=gen) * 5).to(device)
        embed_sum = torch.randn(k, d, generator=gen).to(device)
        codebook = torch.empty(k, d, device=device, dtype=dtype)
        counts = torch.randint(0, 10, (k,), generator=gen).float().to(device)
        sums = torch.randn(k, d, generator=gen).to(device)
        yield Sample((cluster_size, embed_sum, codebook, counts, sums, decay, 1e-5), name=f"K{k}_D{d}_decay{decay}")


def _ema_update_compare(sample, ours, ref):
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-6, atol=1e-6)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[ours[2].dtype]
    torch.testing.assert_close(ours[2], ref[2], rtol=tol, atol=tol)


def _ema_update_errors(device):
    def args(**over):
        base = dict(cluster_size=torch.ones(4, device=device), embed_sum=torch.zeros(4, 3, device=device),
                    codebook=torch.zeros(4, 3, device=device), counts=torch.ones(4, device=device),
                    sums=torch.zeros(4, 3, device=device), decay=0.8, eps=1e-5)
        base.update(over)
        return tuple(base.values())

    yield ErrorSample(args(codebook=torch.zeros(4, device=device)), {}, ValueError, r"codebook must be 2-D \[K, D\]")
    yield ErrorSample(args(cluster_size=torch.ones(5, device=device)), {}, ValueError,
                      r"cluster_size must be \[K\] = \[4\]")
    yield ErrorSample(args(sums=torch.zeros(4, 2, device=device)), {}, ValueError, r"sums must be \[K, D\]")
    yield ErrorSample(args(counts=torch.ones(4, device=device, dtype=torch.float64)), {}, TypeError,
                      r"counts must be torch.float32, got torch.float64")
    yield ErrorSample(args(embed_sum=torch.zeros(3, 4, device=device).T), {}, ValueError,
                      r"embed_sum is updated in place and must be contiguous")
    yield ErrorSample(args(decay=1.5), {}, ValueError, r"decay must be in \[0, 1\], got 1.5")
    yield ErrorSample(args(eps=-1.0), {}, ValueError, r"eps must be >= 0")


OP_SPECS = [
    OpSpec(
        name="nearest_code",
        op=fastlatent.ops.nearest_code,
        reference=reference.nearest_code,
        sample_inputs=_nearest_code_samples,
        error_inputs=_nearest_code_errors,
        compare=_nearest_code_compare,
    ),
    OpSpec(
        name="code_stats",
        op=fastlatent.ops.code_stats,
        reference=reference.code_stats,
        sample_inputs=_code_stats_samples,
        error_inputs=_code_stats_errors,
        compare=_code_stats_compare,
    ),
    OpSpec(
        name="ema_update_",
        op=returning_mutated(fastlatent.ops.ema_update_, 3),
        reference=returning_mutated(reference.ema_update_, 3),
        sample_inputs=_ema_update_samples,
        error_inputs=_ema_update_errors,
        compare=_ema_update_compare,
        non_contiguous_args=(3, 4),  # counts and sums; the updated tensors must be contiguous
    ),
]
