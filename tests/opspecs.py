"""OpInfo-lite: one OpSpec per fastlatent op, consumed by tests/test_ops_generic.py.

Each spec knows how to make sample inputs (shapes including odd and empty ones), error
inputs (with the message the error must match), which dtypes each device supports, and
how to compare the op's output with its reference.
"""

from __future__ import annotations

import dataclasses
import math
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
    shapes = [
        (0, 8, 5),
        (1, 1, 1),
        (3, 3, 17),
        (7, 17, 1),
        (33, 7, 3),
        (257, 33, 257),
        (100, 64, 1000),
        (65, 8, 512),
        (70, 130, 40),
    ]
    for n, d, k in shapes:
        codebook = torch.randn(k, d, generator=gen)
        x = torch.randn(n, d, generator=gen)
        for metric in ("l2", "cosine"):
            yield Sample(
                (x.to(device, dtype), codebook.to(device, dtype)),
                {"metric": metric},
                name=f"N{n}_D{d}_K{k}_{metric}",
            )
    # Batched searches (multi-head VQ): [B, N, D] against [B, K, D], incl. empty B and N, every path.
    batched = [(0, 5, 4, 3), (3, 0, 4, 3), (2, 9, 3, 5), (8, 37, 16, 70), (3, 70, 40, 130), (4, 33, 256, 65)]
    for b, n, d, k in batched:
        codebook = torch.randn(b, k, d, generator=gen)
        x = torch.randn(b, n, d, generator=gen)
        for metric in ("l2", "cosine"):
            yield Sample(
                (x.to(device, dtype), codebook.to(device, dtype)),
                {"metric": metric},
                name=f"B{b}_N{n}_D{d}_K{k}_{metric}",
            )


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
        f"excess {excess[bad][:5].tolist()} > tolerance {tolerance[bad][:5].tolist()}"
    )


def _nearest_code_compare(sample, ours, ref):
    x, codebook = sample.args
    metric = sample.kwargs.get("metric", "l2")
    indices, distances = ours
    ref_indices, _ = ref
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    assert indices.shape == distances.shape == x.shape[:-1]
    if x.dim() == 3:  # batched: every search on its own
        for b in range(x.shape[0]):
            one = Sample((x[b], codebook[b]), sample.kwargs, name=sample.name)
            _nearest_code_compare(one, (indices[b], distances[b]), (ref_indices[b], ref[1][b]))
        return
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
    yield ErrorSample((x[0], c), {}, ValueError, r"x must be 2-D \[N, D\] or \[B, N, D\], got shape \[8\]")
    yield ErrorSample((x, c[None]), {}, ValueError, r"codebook must be 2-D \[K, D\]")
    yield ErrorSample((x[None], c), {}, ValueError, r"codebook must be 3-D \[B, K, D\] \(x is batched")
    yield ErrorSample(
        (x[None].expand(2, 4, 8), c[None].expand(3, 16, 8)),
        {},
        ValueError,
        r"x is \[B, N, D\] with B=2 but codebook is \[B, K, D\] with B=3",
    )
    yield ErrorSample((x[None], c[None, :0]), {}, ValueError, r"at least one code \(K >= 1\)")
    yield ErrorSample(
        (x, torch.randn(16, 9, device=device)),
        {},
        ValueError,
        r"x is \[N, D\] with D=8 but codebook is \[K, D\] with D=9",
    )
    yield ErrorSample((x, c[:0]), {}, ValueError, r"at least one code \(K >= 1\)")
    yield ErrorSample((x[:, :0], c[:, :0]), {}, ValueError, r"x must have D >= 1")
    yield ErrorSample(
        (x.long(), c.long()), {}, TypeError, r"x must be float32, float16 or bfloat16, got torch.int64"
    )
    yield ErrorSample(
        (x, c.half()),
        {},
        TypeError,
        r"x and codebook must have the same dtype, got torch.float32 and torch.float16",
    )
    yield ErrorSample((x, c), {"metric": "dot"}, ValueError, r'metric must be "l2" or "cosine", got "dot"')
    yield ErrorSample(
        (x, c), {"precision": "fp16"}, ValueError, r'precision must be "ieee" or "tf32", got "fp16"'
    )
    other = "meta" if device.type == "cpu" else "cpu"
    yield ErrorSample(
        (x, torch.randn(16, 8, device=other)), {}, RuntimeError, r"x and codebook must be on the same device"
    )


# ---------------------------------------------------------------- sample_code


def _sample_code_samples(device, dtype):
    """nearest_code's shapes (odd, empty, every CPU/CUDA path) and batched heads, at two temperatures."""
    for i, sample in enumerate(_nearest_code_samples(device, dtype)):
        temperature = (1.0, 0.3, 4.0)[i % 3]
        kwargs = {"temperature": temperature, "seed": 977 + i, "offset": i, **sample.kwargs}
        yield Sample(sample.args, kwargs, name=f"{sample.name}_T{temperature}")


def sample_code_keys(x, codebook, kwargs, indices, ref):
    """float64 keys logit / T + noise of ``indices`` and of ``ref`` (the reference's draw), per row."""
    if x.dim() == 2:
        x, codebook, indices, ref = x[None], codebook[None], indices[None], ref[None]
    b, n, _ = x.shape
    k = codebook.shape[1]
    temperature, metric = kwargs["temperature"], kwargs.get("metric", "l2")
    x64, c64 = x.double().cpu(), codebook.double().cpu()
    dot = x64 @ c64.transpose(1, 2)
    if metric == "l2":
        sq = x64.pow(2).sum(-1, keepdim=True) + c64.pow(2).sum(-1)[:, None] - 2 * dot
        logits = -sq.clamp_min(1e-8).sqrt()
    else:
        logits = dot / (
            x64.norm(dim=-1, keepdim=True).clamp_min(1e-12) * c64.norm(dim=-1)[:, None].clamp_min(1e-12)
        )
    noise = reference.sample_code_noise(kwargs["seed"], kwargs.get("offset", 0), 0, b * n * k).reshape(
        b, n, k
    )
    keys = logits / temperature + noise
    return keys.gather(2, indices.cpu()[..., None])[..., 0], keys.gather(2, ref.cpu()[..., None])[..., 0]


def _sample_code_compare(sample, ours, ref):
    x, codebook = sample.args
    assert ours.dtype == torch.int64 and ours.shape == x.shape[:-1] and ours.device == x.device
    if torch.equal(ours, ref):
        return
    # Different draws only where two codes' keys tie up to the fp32 rounding of the logits and the noise.
    chosen, best = sample_code_keys(x, codebook, sample.kwargs, ours, ref)
    d, temperature = x.shape[-1], sample.kwargs["temperature"]
    if sample.kwargs.get("metric", "l2") == "l2":
        x64, c64 = x.double().cpu(), codebook.double().cpu()
        scale = (x64.pow(2).sum(-1) + c64.pow(2).sum(-1).amax(-1, keepdim=True)).sqrt()
    else:
        scale = torch.ones(x.shape[:-1], dtype=torch.float64)
    tolerance = 1e-5 * d * scale / temperature + 1e-5
    excess = best - chosen
    bad = excess > tolerance
    assert not bad.any(), (
        f"{int(bad.sum())} rows drew a code whose key is below the best by {excess[bad][:5]}"
    )


def _sample_code_errors(device):
    x = torch.randn(4, 8, device=device)
    c = torch.randn(16, 8, device=device)
    kw = {"temperature": 1.0, "seed": 3}
    yield ErrorSample((x[0], c), kw, ValueError, r"x must be 2-D \[N, D\] or \[B, N, D\], got shape \[8\]")
    yield ErrorSample((x[None], c), kw, ValueError, r"codebook must be 3-D \[B, K, D\] \(x is batched")
    yield ErrorSample(
        (x[None].expand(2, 4, 8), c[None].expand(3, 16, 8)),
        kw,
        ValueError,
        r"x is \[B, N, D\] with B=2 but codebook is \[B, K, D\] with B=3",
    )
    yield ErrorSample((x, c[:0]), kw, ValueError, r"at least one code \(K >= 1\)")
    yield ErrorSample(
        (x, torch.randn(16, 9, device=device)), kw, ValueError, r"x is \[N, D\] with D=8 but codebook"
    )
    yield ErrorSample((x.long(), c.long()), kw, TypeError, r"x must be float32, float16 or bfloat16")
    yield ErrorSample((x, c.half()), kw, TypeError, r"x and codebook must have the same dtype")
    for bad in (0.0, -1.0, float("inf"), float("nan"), 1e-40):
        yield ErrorSample(
            (x, c), {**kw, "temperature": bad}, ValueError, r"temperature must be a finite float > 0"
        )
    yield ErrorSample(
        (x, c), {**kw, "metric": "dot"}, ValueError, r'metric must be "l2" or "cosine", got "dot"'
    )
    other = "meta" if device.type == "cpu" else "cpu"
    yield ErrorSample(
        (x, torch.randn(16, 8, device=other)), kw, RuntimeError, r"x and codebook must be on the same device"
    )


# ---------------------------------------------------------------- code_stats


def _code_stats_samples(device, dtype):
    gen = torch.Generator().manual_seed(99)
    for n, d, k in [
        (0, 4, 3),
        (1, 1, 1),
        (5, 3, 17),
        (100, 7, 3),
        (333, 33, 64),
        (2000, 64, 300),
        (64, 8, 1000),
    ]:
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
    for k, d, decay in [
        (1, 1, 0.8),
        (3, 5, 0.0),
        (17, 8, 0.99),
        (256, 64, 0.8),
        (1000, 3, 1.0),
        (77, 130, 0.5),
    ]:
        cluster_size = (torch.rand(k, generator=gen) * 5).to(device)
        embed_sum = torch.randn(k, d, generator=gen).to(device)
        codebook = torch.empty(k, d, device=device, dtype=dtype)
        counts = torch.randint(0, 10, (k,), generator=gen).float().to(device)
        sums = torch.randn(k, d, generator=gen).to(device)
        yield Sample(
            (cluster_size, embed_sum, codebook, counts, sums, decay, 1e-5), name=f"K{k}_D{d}_decay{decay}"
        )


def _ema_update_compare(sample, ours, ref):
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-6, atol=1e-6)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[ours[2].dtype]
    torch.testing.assert_close(ours[2], ref[2], rtol=tol, atol=tol)


def _ema_update_errors(device):
    def args(**over):
        base = dict(
            cluster_size=torch.ones(4, device=device),
            embed_sum=torch.zeros(4, 3, device=device),
            codebook=torch.zeros(4, 3, device=device),
            counts=torch.ones(4, device=device),
            sums=torch.zeros(4, 3, device=device),
            decay=0.8,
            eps=1e-5,
        )
        base.update(over)
        return tuple(base.values())

    yield ErrorSample(
        args(codebook=torch.zeros(4, device=device)), {}, ValueError, r"codebook must be 2-D \[K, D\]"
    )
    yield ErrorSample(
        args(cluster_size=torch.ones(5, device=device)), {}, ValueError, r"cluster_size must be \[K\] = \[4\]"
    )
    yield ErrorSample(args(sums=torch.zeros(4, 2, device=device)), {}, ValueError, r"sums must be \[K, D\]")
    yield ErrorSample(
        args(counts=torch.ones(4, device=device, dtype=torch.float64)),
        {},
        TypeError,
        r"counts must be torch.float32, got torch.float64",
    )
    yield ErrorSample(
        args(embed_sum=torch.zeros(3, 4, device=device).T),
        {},
        ValueError,
        r"embed_sum is updated in place and must be contiguous",
    )
    yield ErrorSample(args(decay=1.5), {}, ValueError, r"decay must be in \[0, 1\], got 1.5")
    yield ErrorSample(args(eps=-1.0), {}, ValueError, r"eps must be a finite float32 value >= 0")


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
        name="sample_code",
        op=fastlatent.ops.sample_code,
        reference=reference.sample_code,
        sample_inputs=_sample_code_samples,
        error_inputs=_sample_code_errors,
        compare=_sample_code_compare,
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


# ---------------------------------------------------------------- scalar quantisers

FSQ_LEVELS = ([8, 5, 5, 5], [8, 8, 8, 5, 5, 5], [7, 5, 5, 5, 5], [2] * 16)


def _assert_equal(ours, ref):
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _fsq_samples(device, dtype):
    gen = torch.Generator().manual_seed(7)
    shapes = [(0,), (1,), (7,), (33,), (257,), (3, 5), (2, 0, 3)]
    for i, levels in enumerate(FSQ_LEVELS):
        for j, lead in enumerate(shapes):
            z = torch.randn(*lead, len(levels), generator=gen) * 2.5
            sym = (i + j) % 2 == 1
            yield Sample(
                (z.to(device, dtype), levels), {"preserve_symmetry": sym}, name=f"L{levels}_{lead}_sym{sym}"
            )


def _fsq_errors(device):
    z = torch.randn(5, 4, device=device)
    yield ErrorSample((z, [8, 1, 5, 5]), {}, ValueError, r"levels must all be >= 2, got \[8, 1, 5, 5\]")
    yield ErrorSample(
        (torch.randn(5, 2, device=device), [2**16, 2**16]),
        {},
        ValueError,
        r"product of levels \(the implicit codebook size\) must be <= 2\^31",
    )
    yield ErrorSample((z, []), {}, ValueError, r"levels must be a non-empty list of ints")
    yield ErrorSample(
        (z, [8, 5, 5]),
        {},
        ValueError,
        r"z must be \[\.\.\., len\(levels\)\] with len\(levels\)=3 in its last dim, got shape \[5, 4\]",
    )
    yield ErrorSample((z.long(), [8, 5, 5, 5]), {}, TypeError, r"z must be float32, float16 or bfloat16")
    yield ErrorSample((z[0, 0], [8, 5, 5, 5]), {}, ValueError, r"z must be \[\.\.\., len\(levels\)\]")


def _fsq_codes_samples(device, dtype):
    gen = torch.Generator().manual_seed(8)
    for i, levels in enumerate(FSQ_LEVELS):
        size = math.prod(levels)
        for lead in [(0,), (1,), (7,), (3, 11)]:
            idx = torch.randint(-2, size + 2, lead, generator=gen)
            yield Sample(
                (idx.to(device), levels),
                {"preserve_symmetry": bool(i % 2), "dtype": dtype},
                name=f"L{levels}_{lead}",
            )


def _fsq_codes_errors(device):
    idx = torch.randint(0, 100, (5,), device=device)
    yield ErrorSample(
        (idx.float(), [8, 5, 5, 5]), {}, TypeError, r"indices must be torch.int64 or torch.int32"
    )
    yield ErrorSample((idx, [8, 5, 0]), {}, ValueError, r"levels must all be >= 2")
    yield ErrorSample(
        (idx, [8, 5, 5, 5]), {"dtype": torch.int64}, TypeError, r"dtype must be float32, float16"
    )


def _lfq_samples(device, dtype):
    gen = torch.Generator().manual_seed(9)
    for d, lead in [(1, (0,)), (1, (5,)), (4, (7,)), (10, (33,)), (14, (3, 5)), (16, (2, 9)), (62, (4,))]:
        x = torch.randn(*lead, d, generator=gen)
        x[..., 0] = torch.where(
            torch.arange(x[..., 0].numel()).reshape(x.shape[:-1]) % 3 == 0, 0.0, x[..., 0]
        )
        yield Sample((x.to(device, dtype),), {"codebook_scale": 0.5 if d % 2 else 1.0}, name=f"d{d}_{lead}")


def _lfq_quantize_errors(device):
    x = torch.randn(5, 6, device=device)
    yield ErrorSample(
        (torch.randn(5, 63, device=device),), {}, ValueError, r"x must be \[\.\.\., d\] with 1 <= d <= 62"
    )
    yield ErrorSample((x.int(),), {}, TypeError, r"x must be float32, float16 or bfloat16")
    yield ErrorSample(
        (x,), {"codebook_scale": 0.0}, ValueError, r"codebook_scale must be a positive finite number"
    )


def _lfq_entropy_samples(device, dtype):
    gen = torch.Generator().manual_seed(10)
    # The empty sample (NaN avg_probs) comes last: opcheck (first four samples) compares without equal_nan.
    for d, lead, tau_inv in [
        (1, (5,), 3.0),
        (5, (7,), 10.0),
        (8, (33,), 100.0),
        (13, (2, 17), 2.0),
        (14, (40,), 1.0),
        (16, (9,), 0.5),
        (1, (0,), 1.0),
    ]:
        x = torch.randn(*lead, d, generator=gen) * 0.3
        yield Sample(
            (x.to(device, dtype),),
            {"codebook_scale": 1.0 if d % 2 else 0.75, "inv_temperature": tau_inv},
            name=f"d{d}_{lead}",
        )


def _lfq_entropy_compare(sample, ours, ref):
    assert ours[0].dtype == ref[0].dtype == torch.float32 and ours[1].shape == ref[1].shape
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-9, equal_nan=True)


def _lfq_entropy_errors(device):
    x = torch.randn(5, 6, device=device)
    yield ErrorSample(
        (torch.randn(5, 19, device=device),),
        {},
        ValueError,
        r"x must be \[\.\.\., d\] with 1 <= d <= 18 \(bits per code; the loss keeps 2\^d probabilities\)",
    )
    yield ErrorSample((x.bool(),), {}, TypeError, r"x must be float32, float16 or bfloat16")
    yield ErrorSample(
        (x,), {"inv_temperature": -1.0}, ValueError, r"inv_temperature must be a positive finite number"
    )
    yield ErrorSample(
        (x,), {"codebook_scale": float("inf")}, ValueError, r"codebook_scale must be a positive finite"
    )


def _bsq_samples(device, dtype):
    gen = torch.Generator().manual_seed(11)
    for d, lead in [(1, (0,)), (1, (5,)), (4, (7,)), (12, (33,)), (16, (3, 5)), (18, (2, 9)), (33, (4,))]:
        z = torch.randn(*lead, d, generator=gen)
        if z.numel():
            z.reshape(-1, d)[0] = 0.0  # a zero row: u = 0, every bit 0
        yield Sample((z.to(device, dtype),), {}, name=f"d{d}_{lead}")


def _bsq_errors(device):
    z = torch.randn(5, 6, device=device)
    yield ErrorSample(
        (torch.randn(5, 63, device=device),), {}, ValueError, r"z must be \[\.\.\., d\] with 1 <= d <= 62"
    )
    yield ErrorSample((z.long(),), {}, TypeError, r"z must be float32, float16 or bfloat16")
    yield ErrorSample((z[0, 0],), {}, ValueError, r"z must be \[\.\.\., d\]")


def _bsq_entropy_samples(device, dtype):
    samples = list(_bsq_samples(device, dtype))
    samples = samples[1:] + samples[:1]  # empty (NaN avg_probs) last, out of opcheck's first four
    for i, sample in enumerate(samples):
        yield Sample(sample.args, {"inv_temperature": (0.5, 1.0, 4.0)[i % 3]}, name=sample.name)


def _bsq_entropy_errors(device):
    yield from _bsq_errors(device)
    yield ErrorSample(
        (torch.randn(5, 6, device=device),),
        {"inv_temperature": 0.0},
        ValueError,
        r"inv_temperature must be a positive finite number",
    )


OP_SPECS += [
    OpSpec(
        "fsq_quantize",
        fastlatent.ops.fsq_quantize,
        reference.fsq_quantize,
        _fsq_samples,
        _fsq_errors,
        lambda s, o, r: _assert_equal(o, r),
    ),
    OpSpec(
        "fsq_indices_to_codes",
        fastlatent.ops.fsq_indices_to_codes,
        reference.fsq_indices_to_codes,
        _fsq_codes_samples,
        _fsq_codes_errors,
        lambda s, o, r: _assert_equal((o,), (r,)),
    ),
    OpSpec(
        "lfq_quantize",
        fastlatent.ops.lfq_quantize,
        reference.lfq_quantize,
        _lfq_samples,
        _lfq_quantize_errors,
        lambda s, o, r: _assert_equal(o, r),
    ),
    OpSpec(
        "lfq_entropy",
        fastlatent.ops.lfq_entropy,
        reference.lfq_entropy,
        _lfq_entropy_samples,
        _lfq_entropy_errors,
        _lfq_entropy_compare,
    ),
    OpSpec(
        "bsq_quantize",
        fastlatent.ops.bsq_quantize,
        reference.bsq_quantize,
        _bsq_samples,
        _bsq_errors,
        lambda s, o, r: _assert_equal(o, r),
    ),
    OpSpec(
        "bsq_entropy",
        fastlatent.ops.bsq_entropy,
        reference.bsq_entropy,
        _bsq_entropy_samples,
        _bsq_entropy_errors,
        _lfq_entropy_compare,
    ),
]


# ---------------------------------------------------------------- sampler steps

# (B, rest): odd sizes hit the CPU chunk tails and the scalar CUDA path; B = 0 is empty.
_STEP_SHAPES = [
    (2, (4, 8, 8)),
    (1, (3, 5, 7)),
    (3, (33,)),
    (0, (4, 4)),
    (2, (4, 32, 32)),
    (5, (1,)),
    (2, (257,)),
]
_STEP_OPTIONS = [
    {},
    {"guidance_scale": 7.5},
    {"guidance_scale": 5.0, "guidance_rescale": 0.7},
    {"guidance_scale": 3.0, "clip_x0": 1.0},
    {"guidance_scale": 2.0, "threshold_quantile": 0.9, "threshold_max": 1.5},
    {"threshold_quantile": 0.995, "threshold_max": 3.0},
]


def _step_inputs(device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    for (b, rest), options in zip(_STEP_SHAPES, _STEP_OPTIONS + _STEP_OPTIONS[:1]):
        if options.get("guidance_rescale") and math.prod(rest) < 2:
            continue
        sample = torch.randn(b, *rest, generator=gen).to(device, dtype)
        groups = 2 if "guidance_scale" in options else 1
        model_output = (1.5 * torch.randn(groups * b, *rest, generator=gen)).to(device, dtype)
        yield (
            model_output,
            sample,
            dict(options),
            f"B{b}_{'x'.join(map(str, rest))}_{'_'.join(options) or 'plain'}",
        )


def _ddpm_samples(device, dtype):
    predictions = ["epsilon", "v_prediction", "sample", "flow"]
    steps = [(0.3, 0.5), (0.05, 0.08), (0.9, 1.0), (0.6, 0.6)]
    for i, (model_output, sample, options, name) in enumerate(_step_inputs(device, dtype, 11)):
        ab_t, ab_prev = steps[i % len(steps)]
        options.update(prediction=predictions[i % 4], seed=1000 + i, offset=i)
        yield Sample((model_output, sample, ab_t, ab_prev), options, name=f"{name}_{predictions[i % 4]}")


def _ddim_samples(device, dtype):
    predictions = ["epsilon", "sample", "v_prediction", "flow"]
    for i, (model_output, sample, options, name) in enumerate(_step_inputs(device, dtype, 12)):
        eta = (0.0, 1.0, 0.3)[i % 3]
        options.update(prediction=predictions[i % 4], use_clipped_model_output=i % 2 == 1, seed=77, offset=i)
        if i == 2:
            options["noise"] = torch.randn(sample.shape, generator=torch.Generator().manual_seed(3)).to(
                device, dtype
            )
        yield Sample((model_output, sample, 0.2 + 0.1 * (i % 3), 0.7, eta), options, name=f"{name}_eta{eta}")


def _euler_samples(device, dtype):
    predictions = ["epsilon", "v_prediction", "sample", "flow"]
    for i, (model_output, sample, options, name) in enumerate(_step_inputs(device, dtype, 13)):
        prediction = predictions[i % 4]
        sigma, sigma_next = (0.9, 0.7) if prediction == "flow" else (14.6, 12.9) if i % 2 else (0.5, 0.0)
        options["prediction"] = prediction
        yield Sample((model_output, sample, sigma, sigma_next), options, name=f"{name}_{prediction}")


def _vp(sigma):
    alpha = 1 / math.sqrt(sigma * sigma + 1)
    return alpha, sigma * alpha


def _dpmpp_samples(device, dtype):
    predictions = ["epsilon", "v_prediction", "sample", "flow"]
    for i, (model_output, sample, options, name) in enumerate(_step_inputs(device, dtype, 14)):
        prediction = predictions[i % 4]
        if prediction == "flow":
            (a_p, s_p), (a_t, s_t), (a_n, s_n) = (0.2, 0.8), (0.4, 0.6), (0.6, 0.4)
        else:
            (a_p, s_p), (a_t, s_t), (a_n, s_n) = _vp(3.0), _vp(2.0), _vp(1.2 if i % 3 else 0.0)
        second = i % 3 != 0
        prev = (
            torch.randn(sample.shape, generator=torch.Generator().manual_seed(i)).to(device, dtype)
            if second
            else None
        )
        options["prediction"] = prediction
        yield Sample(
            (model_output, sample, prev, a_t, s_t, a_n, s_n, a_p, s_p),
            options,
            name=f"{name}_{prediction}_{'2nd' if second else '1st'}",
        )


def _convert_samples(device, dtype):
    predictions = ["epsilon", "v_prediction", "sample", "flow"]
    for i, (model_output, sample, options, name) in enumerate(_step_inputs(device, dtype, 15)):
        options.pop("clip_x0", None)
        options.pop("threshold_quantile", None)
        options.pop("threshold_max", None)
        source, target = predictions[i % 4], predictions[(i + 1 + i // 4) % 4]
        alpha, sigma = (0.4, 0.6) if "flow" in (source, target) else _vp(0.8)
        yield Sample(
            (model_output, sample, alpha, sigma, source, target), options, name=f"{name}_{source}_{target}"
        )


def assert_step_close(ours, ref, dtype, scale_floor=1.0):
    """max |ours - ref| <= tol * max(|ref|, scale_floor): relative to the tensor's magnitude, as fp32
    rounding of a value near zero is relative to the operands, not to the value."""
    ours_t = ours if isinstance(ours, tuple) else (ours,)
    ref_t = ref if isinstance(ref, tuple) else (ref,)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for a, b in zip(ours_t, ref_t):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        if a.numel() == 0:
            continue
        scale = max(b.double().abs().max().item(), scale_floor)
        err = (a.double() - b.double()).abs().max().item()
        assert err <= tol * scale, f"max error {err:.3g} > {tol:g} * {scale:.3g}"


def _step_compare(sample, ours, ref):
    assert_step_close(ours, ref, sample.args[1].dtype)


def _common_step_errors(device, op_args):
    """Errors every step shares; op_args(model_output, sample) gives the op's positional args."""
    x = torch.randn(2, 4, 8, 8, device=device)
    m = torch.randn(2, 4, 8, 8, device=device)
    yield ErrorSample(
        op_args(torch.randn(3, 4, 8, 8, device=device), x),
        {"guidance_scale": 5.0},
        ValueError,
        r"guidance needs model_output = \[uncond; cond\] stacked in the batch \(an even batch of 2B\)",
    )
    yield ErrorSample(
        op_args(torch.randn(6, 4, 8, 8, device=device), x),
        {"guidance_scale": 5.0},
        ValueError,
        r"with guidance model_output must be \[2B, ...\] for sample \[2, 4, 8, 8\]",
    )
    yield ErrorSample(
        op_args(torch.randn(2, 4, 8, 7, device=device), x),
        {},
        ValueError,
        r"model_output must have the shape of sample \[2, 4, 8, 8\]",
    )
    yield ErrorSample(
        op_args(m.half(), x),
        {},
        TypeError,
        r"sample and model_output must have the same dtype, got torch.float32 and torch.float16",
    )
    yield ErrorSample(
        op_args(m.long(), x.long()), {}, TypeError, r"sample must be float32, float16 or bfloat16"
    )
    yield ErrorSample(op_args(m[0, 0, 0, 0], x[0, 0, 0, 0]), {}, ValueError, r"sample must be at least 1-D")
    yield ErrorSample(
        op_args(m, x), {"guidance_rescale": 0.5}, ValueError, r"guidance_rescale needs guidance_scale"
    )
    yield ErrorSample(
        op_args(torch.cat([m, m]), x),
        {"guidance_scale": 2.0, "guidance_rescale": 1.5},
        ValueError,
        r"guidance_rescale must be in \[0, 1\], got 1.5",
    )
    yield ErrorSample(
        op_args(m, x),
        {"clip_x0": 1.0, "threshold_quantile": 0.9},
        ValueError,
        r"clip_x0 and threshold_quantile are exclusive",
    )
    yield ErrorSample(op_args(m, x), {"clip_x0": 0.0}, ValueError, r"clip_x0 must be > 0, got 0")
    yield ErrorSample(
        op_args(m, x), {"threshold_quantile": 1.5}, ValueError, r"threshold_quantile must be in \(0, 1\]"
    )
    yield ErrorSample(
        op_args(m, x),
        {"threshold_quantile": 0.9, "threshold_max": 0.5},
        ValueError,
        r"threshold_max must be >= 1, got 0.5",
    )
    other = "meta" if device.type == "cpu" else "cpu"
    yield ErrorSample(
        op_args(torch.randn(2, 4, 8, 8, device=other), x),
        {},
        RuntimeError,
        r"sample and model_output must be on the same device",
    )


def _ddpm_errors(device):
    yield from _common_step_errors(device, lambda m, x: (m, x, 0.3, 0.5))
    x = torch.randn(2, 3, device=device)
    yield ErrorSample((x, x, 1.0, 1.0), {}, ValueError, r"alpha_bar_t must be in \(0, 1\), got 1")
    yield ErrorSample((x, x, 0.5, 0.4), {}, ValueError, r"alpha_bar_prev must be in \[alpha_bar_t, 1\]")
    yield ErrorSample(
        (x, x, 0.5, 0.6),
        {"prediction": "noise"},
        ValueError,
        r'prediction must be "epsilon", "v_prediction", "sample" or "flow", got "noise"',
    )
    yield ErrorSample(
        (x, x, 0.5, 0.6),
        {"noise": torch.randn(2, 4, device=device)},
        ValueError,
        r"noise must have the shape of sample \[2, 3\]",
    )
    yield ErrorSample(
        (x, x, 0.5, 0.6),
        {"seed_offset": torch.zeros(3, dtype=torch.int64, device=device)},
        ValueError,
        r"seed_offset must be \[2\] \(seed, offset\)",
    )


def _ddim_errors(device):
    yield from _common_step_errors(device, lambda m, x: (m, x, 0.3, 0.5, 0.0))
    x = torch.randn(2, 3, device=device)
    yield ErrorSample((x, x, 0.3, 0.5, -1.0), {}, ValueError, r"eta must be >= 0, got -1")
    yield ErrorSample((x, x, 0.0, 0.5, 0.0), {}, ValueError, r"alpha_bar_t must be in \(0, 1\), got 0")


def _euler_errors(device):
    yield from _common_step_errors(device, lambda m, x: (m, x, 1.0, 0.5))
    x = torch.randn(2, 3, device=device)
    yield ErrorSample((x, x, 0.0, 0.0), {}, ValueError, r"sigma must be > 0 and finite, got 0")
    yield ErrorSample((x, x, 1.0, -0.5), {}, ValueError, r"sigma_next must be >= 0 and finite, got -0.5")
    yield ErrorSample(
        (x, x, 2.0, 0.5),
        {"prediction": "flow"},
        ValueError,
        r'sigma must be in \(0, 1\] for prediction "flow", got 2',
    )


def _dpmpp_errors(device):
    yield from _common_step_errors(device, lambda m, x: (m, x, None, 0.6, 0.8, 0.8, 0.6))
    x = torch.randn(2, 3, device=device)
    yield ErrorSample(
        (x, x, x, 0.6, 0.8, 1.0, 0.0, 0.4, 0.9),
        {},
        ValueError,
        r"a second-order step \(prev_x0 given\) to sigma_next = 0 is undefined",
    )
    yield ErrorSample(
        (x, x, x, 0.6, 0.8, 0.8, 0.6, 0.6, 0.8),
        {},
        ValueError,
        r"the previous step must be at another noise level than the current one",
    )
    yield ErrorSample(
        (x, x, x[:1], 0.6, 0.8, 0.8, 0.6, 0.4, 0.9),
        {},
        ValueError,
        r"prev_x0 must have the shape of sample \[2, 3\]",
    )
    yield ErrorSample((x, x, None, 0.0, 0.8, 0.8, 0.6), {}, ValueError, r"alpha_t must be > 0, got 0")


def _convert_errors(device):
    x = torch.randn(2, 3, device=device)
    yield ErrorSample(
        (x, x, 0.6, 0.8, "eps", "sample"),
        {},
        ValueError,
        r'source must be "epsilon", "v_prediction", "sample" or "flow", got "eps"',
    )
    yield ErrorSample((x, x, 0.6, 0.0, "epsilon", "sample"), {}, ValueError, r"sigma_t must be > 0, got 0")
    yield ErrorSample(
        (torch.cat([x, x[:1]]), x, 0.6, 0.8, "epsilon", "sample"),
        {"guidance_scale": 2.0},
        ValueError,
        r"an even batch of 2B",
    )


def _generic_samples(device, dtype):
    """sampler_step with 0-3 history tensors, noise given or drawn, every x0 mode via the shared options."""
    gen = torch.Generator().manual_seed(16)
    for i, (model_output, sample, options, name) in enumerate(_step_inputs(device, dtype, 16)):
        count = i % 4
        history = [torch.randn(sample.shape, generator=gen).to(device, dtype) for _ in range(count)]
        coefficients = (0.9 - 0.1 * i, -0.3, 0.8, -0.25 + 0.05 * i, 1.1)
        out_history = [0.5, -0.3, 0.15][:count]
        out_noise = (0.0, 0.4)[i % 2]
        options.update(seed=300 + i, offset=i)
        if i == 3:
            options["noise"] = torch.randn(sample.shape, generator=gen).to(device, dtype)
        yield Sample(
            (model_output, sample, *coefficients, history, out_history, out_noise),
            options,
            name=f"{name}_h{count}_z{out_noise}",
        )


def _generic_errors(device):
    yield from _common_step_errors(device, lambda m, x: (m, x, 1.0, -0.5, 0.5, 0.0, 0.5, [], []))
    x = torch.randn(2, 3, device=device)
    yield ErrorSample(
        (x, x, 1.0, -0.5, 0.5, 0.0, 0.5, [x, x, x, x], [1.0, 1.0, 1.0, 1.0]),
        {},
        ValueError,
        r"history takes at most 3 tensors, got 4",
    )
    yield ErrorSample(
        (x, x, 1.0, -0.5, 0.5, 0.0, 0.5, [x], []),
        {},
        ValueError,
        r"out_history must have one coefficient per history tensor \(1\), got 0",
    )
    yield ErrorSample(
        (x, x, 1.0, -0.5, 0.5, 0.0, 0.5, [x[:1]], [1.0]),
        {},
        ValueError,
        r"history tensors must have the shape of sample \[2, 3\]",
    )
    yield ErrorSample(
        (x, x, float("inf"), -0.5, 0.5, 0.0, 0.5, [], []), {}, ValueError, r"x0_x must be finite, got inf"
    )


OP_SPECS += [
    OpSpec(
        name="sampler_step",
        op=fastlatent.ops.sampler_step,
        reference=reference.sampler_step,
        sample_inputs=_generic_samples,
        error_inputs=_generic_errors,
        compare=_step_compare,
    ),
    OpSpec(
        name="ddpm_step",
        op=fastlatent.ops.ddpm_step,
        reference=reference.ddpm_step,
        sample_inputs=_ddpm_samples,
        error_inputs=_ddpm_errors,
        compare=_step_compare,
    ),
    OpSpec(
        name="ddim_step",
        op=fastlatent.ops.ddim_step,
        reference=reference.ddim_step,
        sample_inputs=_ddim_samples,
        error_inputs=_ddim_errors,
        compare=_step_compare,
    ),
    OpSpec(
        name="euler_step",
        op=fastlatent.ops.euler_step,
        reference=reference.euler_step,
        sample_inputs=_euler_samples,
        error_inputs=_euler_errors,
        compare=_step_compare,
    ),
    OpSpec(
        name="dpmpp_2m_step",
        op=fastlatent.ops.dpmpp_2m_step,
        reference=reference.dpmpp_2m_step,
        sample_inputs=_dpmpp_samples,
        error_inputs=_dpmpp_errors,
        compare=_step_compare,
    ),
    OpSpec(
        name="convert_prediction",
        op=fastlatent.ops.convert_prediction,
        reference=reference.convert_prediction,
        sample_inputs=_convert_samples,
        error_inputs=_convert_errors,
        compare=_step_compare,
    ),
]


# ---------------------------------------------------------------- group_norm


def _group_norm_samples(device, dtype):
    gen = torch.Generator().manual_seed(21)
    cases = [
        ((2, 32, 7, 9), 8, "silu", True, False),
        ((3, 12, 5), 3, "gelu", False, True),
        ((2, 16, 3, 4, 5), 4, "none", True, True),
        ((4, 6), 2, "silu", True, False),
        ((1, 8, 33, 17), 1, "silu", True, False),
        ((2, 8, 5, 5), 8, "gelu", True, False),
        ((0, 8, 4, 4), 2, "silu", True, False),
        ((2, 64, 16, 16), 32, "silu", True, True),
    ]
    for shape, groups, activation, affine, residual in cases:
        x = (torch.randn(shape, generator=gen) * 3 + 2).to(device, dtype)
        weight = torch.randn(shape[1], generator=gen).to(device) if affine else None
        bias = torch.randn(shape[1], generator=gen).to(device) if affine else None
        res = torch.randn(shape, generator=gen).to(device, dtype) if residual else None
        yield Sample((x, weight, bias, groups, 1e-5, activation, res), name=f"{shape}_g{groups}_{activation}")
        if x.dim() in (4, 5) and x.numel():  # the same values, channels-last
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            yield Sample(
                (
                    x.to(memory_format=fmt),
                    weight,
                    bias,
                    groups,
                    1e-5,
                    activation,
                    None if res is None else res.to(memory_format=fmt),
                ),
                name=f"{shape}_cl",
            )


def _group_norm_compare(sample, ours, ref):
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[ours.dtype]
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    torch.testing.assert_close(ours.float(), ref.float(), rtol=tol, atol=tol)


def _group_norm_errors(device):
    x = torch.randn(2, 6, 4, 4, device=device)
    w = torch.ones(6, device=device)
    yield ErrorSample(
        (x, w, w, 4), {}, ValueError, r"groups must be >= 1 and divide the 6 channels of x, got groups=4"
    )
    yield ErrorSample((x[0, 0, 0], None, None, 1), {}, ValueError, r"x must be \[N, C, \*spatial\]")
    yield ErrorSample(
        (x, torch.ones(5, device=device), None, 2), {}, ValueError, r"weight must be \[C\] = \[6\]"
    )
    yield ErrorSample((x.long(), None, None, 2), {}, TypeError, r"x must be float32, float16 or bfloat16")
    yield ErrorSample(
        (x, None, None, 2, 1e-5, "relu"),
        {},
        ValueError,
        r'activation must be "none", "silu" or "gelu", got "relu"',
    )
    yield ErrorSample(
        (x, None, None, 2, 1e-5, "silu", x[:1]), {}, ValueError, r"residual must have the shape of x"
    )
    yield ErrorSample((x, None, None, 2, -1.0), {}, ValueError, r"eps must be >= 0")


OP_SPECS += [
    OpSpec(
        name="group_norm",
        op=fastlatent.ops.group_norm,
        reference=reference.group_norm,
        sample_inputs=_group_norm_samples,
        error_inputs=_group_norm_errors,
        compare=_group_norm_compare,
    ),
]


# ---------------------------------------------------------------- group_norm_stats, group_norm_apply


def _group_norm_stats_samples(device, dtype):
    gen = torch.Generator().manual_seed(22)
    cases = [
        ((2, 32, 7, 9), 8),
        ((3, 12, 5), 3),
        ((2, 16, 3, 4, 5), 4),
        ((4, 6), 2),
        ((1, 8, 33, 17), 1),
        ((0, 8, 4, 4), 2),
        ((2, 8, 0, 3), 4),
        ((2, 64, 40, 40), 32),
    ]
    for shape, groups in cases:
        x = (torch.randn(shape, generator=gen) * 3 + 40).to(device, dtype)
        yield Sample((x, groups), name=f"{shape}_g{groups}")
        if x.dim() in (4, 5) and x.numel():
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            yield Sample((x.to(memory_format=fmt), groups), name=f"{shape}_cl")


def _group_norm_stats_compare(sample, ours, ref):
    x = sample.args[0]
    (mean, m2), (ref_mean, ref_m2) = ours, ref
    assert mean.dtype == m2.dtype == torch.float32 and mean.shape == ref_mean.shape == m2.shape
    # statistics of the (rounded) input itself, so fp32 tolerances for every dtype
    count = max(1, x[0:1].numel() // max(1, mean.shape[1]))
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m2 / count, ref_m2 / count, rtol=1e-4, atol=1e-5)


def _group_norm_stats_errors(device):
    x = torch.randn(2, 6, 4, 4, device=device)
    yield ErrorSample(
        (x, 4), {}, ValueError, r"groups must be >= 1 and divide the 6 channels of x, got groups=4"
    )
    yield ErrorSample((x[0, 0, 0], 1), {}, ValueError, r"x must be \[N, C, \*spatial\]")
    yield ErrorSample((x.long(), 2), {}, TypeError, r"x must be float32, float16 or bfloat16")


def _group_norm_apply_samples(device, dtype):
    gen = torch.Generator().manual_seed(23)
    cases = [
        ((2, 32, 7, 9), 8, "silu", True),
        ((3, 12, 5), 3, "gelu", False),
        ((2, 16, 3, 4, 5), 4, "none", True),
        ((4, 6), 2, "silu", True),
        ((1, 8, 33, 17), 1, "silu", True),
        ((0, 8, 4, 4), 2, "silu", True),
        ((2, 64, 16, 16), 32, "gelu", True),
    ]
    for shape, groups, activation, affine in cases:
        x = (torch.randn(shape, generator=gen) * 3 + 2).to(device, dtype)
        mean = (torch.randn(shape[0], groups, generator=gen) + 2).to(device)
        rstd = (torch.rand(shape[0], groups, generator=gen) + 0.2).to(device)
        weight = torch.randn(shape[1], generator=gen).to(device) if affine else None
        bias = torch.randn(shape[1], generator=gen).to(device) if affine else None
        yield Sample((x, mean, rstd, weight, bias, activation), name=f"{shape}_g{groups}_{activation}")
        if x.dim() in (4, 5) and x.numel():
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            yield Sample((x.to(memory_format=fmt), mean, rstd, weight, bias, activation), name=f"{shape}_cl")


def _group_norm_apply_errors(device):
    x = torch.randn(2, 6, 4, 4, device=device)
    stats = torch.ones(2, 3, device=device)
    yield ErrorSample(
        (x, torch.ones(2, 4, device=device), torch.ones(2, 4, device=device), None, None),
        {},
        ValueError,
        r"mean and rstd must be \[N, groups\] with groups dividing the 6 channels of x",
    )
    yield ErrorSample(
        (x, stats[:1], stats[:1], None, None), {}, ValueError, r"mean must be \[N, groups\] with N = 2"
    )
    yield ErrorSample(
        (x, stats, stats[:, :1], None, None), {}, ValueError, r"mean and rstd must have the same shape"
    )
    yield ErrorSample((x, stats.double(), stats, None, None), {}, TypeError, r"mean must be torch.float32")
    yield ErrorSample(
        (x, stats, stats, torch.ones(5, device=device), None), {}, ValueError, r"weight must be \[C\] = \[6\]"
    )
    yield ErrorSample(
        (x.long(), stats, stats, None, None), {}, TypeError, r"x must be float32, float16 or bfloat16"
    )
    yield ErrorSample(
        (x, stats, stats, None, None, "relu"),
        {},
        ValueError,
        r'activation must be "none", "silu" or "gelu", got "relu"',
    )
    other = "meta" if device.type != "meta" else "cpu"
    yield ErrorSample(
        (x, torch.ones(2, 3, device=other), stats, None, None),
        {},
        RuntimeError,
        r"x and mean must be on the same device",
    )


OP_SPECS += [
    OpSpec(
        name="group_norm_stats",
        op=fastlatent.ops.group_norm_stats,
        reference=reference.group_norm_stats,
        sample_inputs=_group_norm_stats_samples,
        error_inputs=_group_norm_stats_errors,
        compare=_group_norm_stats_compare,
    ),
    OpSpec(
        name="group_norm_apply",
        op=fastlatent.ops.group_norm_apply,
        reference=reference.group_norm_apply,
        sample_inputs=_group_norm_apply_samples,
        error_inputs=_group_norm_apply_errors,
        compare=_group_norm_compare,
    ),
]


# ---------------------------------------------------------------- group_norm_conv3x3


def _group_norm_conv_samples(device, dtype):
    gen = torch.Generator().manual_seed(24)
    # (N, C_in, H, W, C_out, groups, activation, conv bias, residual): block tails in every direction (8 x 16
    # pixel tiles, 32-channel K chunks, 128-channel N tiles), groups 1 and C, 1x1 images, several chunks
    cases = [
        (2, 32, 8, 16, 64, 8, "silu", True, True),
        (1, 40, 7, 9, 24, 8, "gelu", True, False),
        (3, 8, 5, 3, 3, 1, "none", False, True),
        (1, 16, 1, 1, 130, 16, "silu", True, True),
        (2, 64, 17, 33, 16, 32, "silu", True, False),
        (1, 96, 12, 20, 136, 32, "silu", False, False),
        (0, 8, 4, 4, 8, 2, "silu", True, True),
    ]
    for n, cin, h, w, cout, groups, activation, has_bias, has_residual in cases:
        x = (torch.randn(n, cin, h, w, generator=gen) * 2 + 0.5).to(device, dtype)
        gn_weight = (torch.rand(cin, generator=gen) + 0.5).to(device)
        gn_bias = torch.randn(cin, generator=gen).to(device)
        conv_weight = (torch.randn(cout, cin, 3, 3, generator=gen) / math.sqrt(9 * cin)).to(device, dtype)
        kwargs = {"conv_weight": conv_weight, "activation": activation, "eps": 1e-6}
        if has_bias:
            kwargs["conv_bias"] = torch.randn(cout, generator=gen).to(device, dtype)
        if has_residual:
            kwargs["residual"] = torch.randn(n, cout, h, w, generator=gen).to(device, dtype)
        name = f"N{n}_Cin{cin}_{h}x{w}_Cout{cout}_g{groups}_{activation}"
        yield Sample((x, gn_weight, gn_bias, groups), kwargs, name=name)
        if x.numel():
            yield Sample(
                (x.to(memory_format=torch.channels_last), None, None, groups), kwargs, name=name + "_cl"
            )


def _group_norm_conv_compare(sample, ours, ref):
    # a sum of 9 C_in rounded products: error relative to the output's scale
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}[ours.dtype]
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    if ref.numel():
        scale = ref.double().abs().max().item() + 1.0
        assert (ours.double() - ref.double()).abs().max().item() <= tol * scale, sample.name


def _group_norm_conv_errors(device):
    x = torch.randn(2, 6, 4, 4, device=device)
    w = torch.randn(4, 6, 3, 3, device=device)

    def call(error, match, x_=x, groups=2, gn_weight=None, **kwargs):
        # eps and activation have no schema default: the raw op (meta-device test) needs them
        kwargs = {"conv_weight": w, "eps": 1e-5, "activation": "silu", **kwargs}
        return ErrorSample((x_, gn_weight, None, groups), kwargs, error, match)

    other = "meta" if device.type != "meta" else "cpu"
    yield call(ValueError, r"x must be 4-D \[N, C_in, H, W\]", x_=x[0])
    yield call(ValueError, r"groups must be >= 1 and divide the 6 channels of x, got groups=4", groups=4)
    yield call(TypeError, r"x must be float32, float16 or bfloat16", x_=x.long())
    yield call(ValueError, r"eps must be >= 0", eps=-1.0)
    yield call(ValueError, r'activation must be "none", "silu" or "gelu", got "relu"', activation="relu")
    yield call(ValueError, r'algorithm must be "auto", "fused" or "unfused", got "fast"', algorithm="fast")
    yield call(ValueError, r"gn_weight must be \[C_in\] = \[6\]", gn_weight=torch.ones(5, device=device))
    yield call(
        ValueError, r"conv_weight must be \[C_out, C_in, 3, 3\] with C_in = 6", conv_weight=w[:, :, :1, :1]
    )
    yield call(TypeError, r"x and conv_weight must have the same dtype", conv_weight=w.double())
    yield call(ValueError, r"conv_bias must be \[C_out\] = \[4\]", conv_bias=torch.ones(3, device=device))
    yield call(ValueError, r"residual must be \[N, C_out, H, W\] = \[2, 4, 4, 4\]", residual=x)
    yield call(
        RuntimeError,
        r"x and conv_weight must be on the same device",
        conv_weight=torch.randn(4, 6, 3, 3, device=other),
    )
    if device.type == "cpu":
        yield call(ValueError, r'algorithm="fused" needs a CUDA tensor', algorithm="fused")


OP_SPECS += [
    OpSpec(
        name="group_norm_conv3x3",
        op=fastlatent.ops.group_norm_conv3x3,
        reference=reference.group_norm_conv3x3,
        sample_inputs=_group_norm_conv_samples,
        error_inputs=_group_norm_conv_errors,
        compare=_group_norm_conv_compare,
    ),
]


# ---------------------------------------------------------------- residual_fsq


def _residual_fsq_scales(levels, num_quantizers, device):
    """vqp's ResidualFSQ scales: levels ** -l, float32."""
    levels = torch.tensor(levels).float()
    return torch.stack([levels**-i for i in range(num_quantizers)]).to(device)


def _residual_fsq_samples(device, dtype):
    gen = torch.Generator().manual_seed(11)
    shapes = [(0,), (1,), (7,), (33,), (257,), (3, 5), (2, 0, 3)]
    for i, levels in enumerate(FSQ_LEVELS):
        for j, lead in enumerate(shapes):
            q = (1, 3, 4, 8)[(i + j) % 4]
            # beyond [-1, 1] too: the first layer's clamp then passes no gradient
            z = torch.randn(*lead, len(levels), generator=gen) * 0.8
            if lead == (257,):  # one NaN row: NaN values, index -1 (not in opcheck's first four samples)
                z.view(-1)[7] = float("nan")
            yield Sample(
                (z.to(device, dtype), _residual_fsq_scales(levels, q, device), levels),
                name=f"L{levels}_{lead}_q{q}",
            )


def _residual_fsq_errors(device):
    z = torch.randn(5, 4, device=device)
    scales = _residual_fsq_scales([8, 5, 5, 5], 3, device)
    yield ErrorSample(
        (z, scales, [8, 1, 5, 5]), {}, ValueError, r"levels must all be >= 2, got \[8, 1, 5, 5\]"
    )
    yield ErrorSample((z, scales[:, :0], []), {}, ValueError, r"levels must be a non-empty list of ints")
    yield ErrorSample(
        (z.long(), scales, [8, 5, 5, 5]), {}, TypeError, r"z must be float32, float16 or bfloat16"
    )
    yield ErrorSample(
        (z[:, :3], scales, [8, 5, 5, 5]),
        {},
        ValueError,
        r"z must be \[\.\.\., len\(levels\)\] with len\(levels\)=4 in its last dim, got shape \[5, 3\]",
    )
    yield ErrorSample(
        (z, scales.long(), [8, 5, 5, 5]), {}, TypeError, r"scales must be a floating tensor, got torch.int64"
    )
    for bad in (scales[:, :3], scales[0], scales[:0], scales[:1].expand(256, 4)):
        yield ErrorSample(
            (z, bad, [8, 5, 5, 5]),
            {},
            ValueError,
            r"scales must be \[num_quantizers, len\(levels\)\] with 1 <= num_quantizers <= 255 and "
            rf"len\(levels\) = 4, got shape \[{', '.join(map(str, bad.shape))}\]",
        )
    other = "meta" if device.type != "meta" else "cpu"
    yield ErrorSample(
        (z, torch.ones(3, 4, device=other), [8, 5, 5, 5]),
        {},
        RuntimeError,
        r"scales and z must be on the same device",
    )


OP_SPECS += [
    OpSpec(
        "residual_fsq",
        fastlatent.ops.residual_fsq,
        reference.residual_fsq,
        _residual_fsq_samples,
        _residual_fsq_errors,
        lambda s, o, r: _assert_equal(o, r),
    ),
]
