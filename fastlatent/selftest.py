"""`fastlatent selftest`: every op on realistic tensors, checked against its reference and timed.

One table, ``SELFTESTS`` (name, check), serves the ``fastlatent selftest`` command and the tests: a check
takes a
device and a dtype and returns ``(ok, detail)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

import fastlatent
from fastlatent import reference
from fastlatent.ops import group_norm_apply, group_norm_stats, merge_group_stats


def _time(fn, device, repeats: int = 7) -> float:
    """Fastest of `repeats` calls after a warm-up: single calls on a shared CPU are noisy (first
    touches of fresh outputs, other processes), and the minimum is what the code can do."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _realistic_batch(device, dtype, n=8192, d=64, k=1024):
    """Encoder-like vectors scattered around a codebook."""
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(k, d, generator=gen)
    x = codebook[torch.randint(0, k, (n,), generator=gen)] + 0.3 * torch.randn(n, d, generator=gen)
    return x.to(device, dtype), codebook.to(device, dtype)


def _selftest_nearest_code(device, dtype) -> tuple[bool, str]:
    x, codebook = _realistic_batch(device, dtype)
    indices, distances = fastlatent.nearest_code(x, codebook)
    ref_indices, ref_distances = reference.nearest_code(x, codebook)
    # Where the indices differ, the two codes must be equally near up to fp32 rounding.
    xf, cf = x.double(), codebook.double()
    excess = (((xf - cf[indices]) ** 2).sum(1) - ((xf - cf[ref_indices]) ** 2).sum(1)).max().item()
    ok = excess <= 1e-4 * ref_distances.max().item() and (
        not torch.equal(indices, ref_indices)
        or torch.allclose(distances, ref_distances, rtol=1e-4, atol=1e-3)
    )
    ours = _time(lambda: fastlatent.nearest_code(x, codebook), device)
    base = _time(lambda: torch.cdist(x.float(), codebook.float()).argmin(1), device)
    agree = (indices == ref_indices).float().mean().item()
    return ok, (
        f"indices agree {agree:.2%}; {ours * 1e3:.2f} ms vs cdist+argmin {base * 1e3:.2f} ms "
        f"({base / ours:.1f}x)"
    )


def _selftest_sample_code(device, dtype) -> tuple[bool, str]:
    x, codebook = _realistic_batch(device, dtype, n=2048)
    temperature = 0.5
    indices = fastlatent.ops.sample_code(x, codebook, temperature, seed=7)
    ref_indices = reference.sample_code(x, codebook, temperature, seed=7)
    agree = (indices == ref_indices).float().mean().item()
    same = torch.equal(indices, fastlatent.ops.sample_code(x, codebook, temperature, seed=7))
    # The draw is random, but a function of (seed, offset): it equals the reference except at fp32 near-ties.
    ok = same and agree > 0.99
    ours = _time(lambda: fastlatent.ops.sample_code(x, codebook, temperature, seed=7), device)

    def gumbel_argmax():
        logits = -torch.cdist(x.float(), codebook.float()) / temperature
        return (logits - torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)))).argmax(1)

    base = _time(gumbel_argmax, device)
    return ok, (
        f"draws agree with the reference {agree:.2%}, repeatable; {ours * 1e3:.2f} ms vs "
        f"cdist+Gumbel+argmax {base * 1e3:.2f} ms ({base / ours:.1f}x)"
    )


def _selftest_code_stats(device, dtype) -> tuple[bool, str]:
    x, codebook = _realistic_batch(device, dtype)
    indices = fastlatent.nearest_code(x, codebook)[0]
    counts, sums = fastlatent.code_stats(x, indices, codebook.shape[0])
    ref_counts, ref_sums = reference.code_stats(x, indices, codebook.shape[0])
    ok = torch.equal(counts, ref_counts) and torch.allclose(sums, ref_sums, rtol=1e-5, atol=1e-4)
    ours = _time(lambda: fastlatent.code_stats(x, indices, codebook.shape[0]), device)
    onehot = _time(lambda: torch.nn.functional.one_hot(indices, codebook.shape[0]).to(x.dtype).T @ x, device)
    return ok, f"exact counts, sums within 1e-5; {ours * 1e3:.2f} ms vs one-hot matmul {onehot * 1e3:.2f} ms"


def _selftest_ema_update(device, dtype) -> tuple[bool, str]:
    x, codebook = _realistic_batch(device, dtype)
    k, d = codebook.shape
    counts, sums = fastlatent.code_stats(x, fastlatent.nearest_code(x, codebook)[0], k)
    state = [torch.ones(k, device=device), codebook.float().clone(), codebook.clone()]
    ref_state = [t.clone() for t in state]
    fastlatent.ema_update_(*state, counts, sums, 0.8, 1e-5)
    reference.ema_update_(*ref_state, counts, sums, 0.8, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    ok = all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol) for a, b in zip(state, ref_state))
    return ok, "cluster sizes, sums and codebook match the reference"


def _selftest_scalar_quantizers(device, dtype) -> tuple[bool, str]:
    """FSQ must equal its reference exactly; the LFQ entropy must match the materialised softmax."""
    gen = torch.Generator().manual_seed(1)
    levels = [8, 5, 5, 5]
    z = (torch.randn(65536, 4, generator=gen) * 2).to(device, dtype)
    got, ref = fastlatent.fsq_quantize(z, levels), reference.fsq_quantize(z, levels)
    fsq_ok = torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    x = (torch.randn(2048, 12, generator=gen) * 0.05).to(device, dtype)
    ps, avg = fastlatent.lfq_entropy(x, 1.0, 10.0)
    ref_ps, ref_avg = reference.lfq_entropy(x, 1.0, 10.0)
    lfq_ok = bool(
        torch.allclose(ps, ref_ps, rtol=1e-4, atol=1e-5)
        and torch.allclose(avg, ref_avg, rtol=1e-4, atol=1e-9)
    )
    fsq_s = _time(lambda: fastlatent.fsq_quantize(z, levels), device)
    msg = (
        f"FSQ 65536x4 exact: {'yes' if fsq_ok else 'NO'} ({fsq_s * 1e3:.2f} ms), "
        f"LFQ entropy d=12 matches: {'yes' if lfq_ok else 'NO'}"
    )
    return fsq_ok and lfq_ok, msg


def _selftest_sampler_steps(device, dtype) -> tuple[bool, str]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 64, 64, generator=gen).to(device, dtype)
    m = torch.randn(16, 4, 64, 64, generator=gen).to(device, dtype)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    options = dict(guidance_scale=7.5, guidance_rescale=0.7, threshold_quantile=0.995, threshold_max=1.5)
    cases = [
        (fastlatent.ops.ddim_step, reference.ddim_step, (m, x, 0.2, 0.4, 0.5), dict(seed=1, **options)),
        (
            fastlatent.ops.ddpm_step,
            reference.ddpm_step,
            (m, x, 0.2, 0.4),
            dict(seed=2, prediction="v_prediction", **options),
        ),
        (
            fastlatent.ops.euler_step,
            reference.euler_step,
            (m, x, 0.8, 0.7),
            dict(prediction="flow", **options),
        ),
        (
            fastlatent.ops.dpmpp_2m_step,
            reference.dpmpp_2m_step,
            (m, x, x, 0.6, 0.8, 0.8, 0.6, 0.4, 0.9),
            options,
        ),
    ]
    worst = 0.0
    for op, ref, args, kwargs in cases:
        ours, expected = op(*args, **kwargs)[0], ref(*args, **kwargs)[0]
        worst = max(
            worst, ((ours.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
        )
    step = lambda: fastlatent.ops.ddim_step(m, x, 0.2, 0.4, guidance_scale=7.5, return_x0=False)  # noqa: E731
    ours_time = _time(step, device, repeats=10)
    return (
        worst <= tol,
        f"4 steps (guided, rescaled, thresholded) within {worst:.1e} relative; "
        f"ddim step {ours_time * 1e3:.3f} ms",
    )


def _selftest_group_norm(device, dtype) -> tuple[bool, str]:
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 128, 64, 64, generator=gen) * 2 + 1).to(device, dtype)
    w, b = torch.randn(128, generator=gen).to(device), torch.randn(128, generator=gen).to(device)
    out = fastlatent.group_norm(x, w, b, 32, 1e-6, "silu")
    ref = reference.group_norm(x, w, b, 32, 1e-6, "silu")
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    ok = torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol)
    ours = _time(lambda: fastlatent.group_norm(x, w, b, 32, 1e-6, "silu"), device)
    eager = _time(lambda: F.silu(F.group_norm(x, 32, w.to(dtype), b.to(dtype), 1e-6)), device)
    return ok, f"GroupNorm+SiLU 2x128x64x64 within {tol:g}; {ours * 1e3:.2f} ms vs eager {eager * 1e3:.2f} ms"


def _selftest_group_norm_tiled(device, dtype) -> tuple[bool, str]:
    """group_norm_stats over two halves, merged, then group_norm_apply: equals the one-pass group_norm."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 64, 48, 40, generator=gen) * 3 + 50).to(device, dtype)
    w, b = torch.randn(64, generator=gen).to(device), torch.randn(64, generator=gen).to(device)
    halves = (x[..., :24, :], x[..., 24:, :])
    parts = [group_norm_stats(h.contiguous(), 16) for h in halves]
    per_group = 64 // 16
    mean, m2, count = merge_group_stats(parts, [per_group * h.shape[-2] * h.shape[-1] for h in halves])
    rstd = torch.rsqrt(m2 / count + 1e-6).float()
    out = torch.cat(
        [group_norm_apply(h.contiguous(), mean.float(), rstd, w, b, "silu") for h in halves], dim=-2
    )
    want = fastlatent.group_norm(x, w, b, 16, 1e-6, "silu")
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    ok = torch.allclose(out.float(), want.float(), rtol=tol, atol=tol)
    return ok, f"stats of 2 tiles merged + apply equals one-pass GroupNorm+SiLU (mean 50) within {tol:g}"


def _selftest_group_norm_conv(device, dtype) -> tuple[bool, str]:
    """GroupNorm + SiLU + 3x3 conv + residual; on CUDA in fp16/bf16 the fused tensor-core kernel."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(1, 96, 20, 36, generator=gen) * 2 + 1).to(device, dtype)
    gw, gb = (torch.rand(96, generator=gen) + 0.5).to(device), torch.randn(96, generator=gen).to(device)
    w = (torch.randn(136, 96, 3, 3, generator=gen) / 30).to(device, dtype)
    b, r = (
        torch.randn(136, generator=gen).to(device, dtype),
        torch.randn(1, 136, 20, 36, generator=gen).to(device, dtype),
    )
    out = fastlatent.ops.group_norm_conv3x3(x, gw, gb, 32, w, b, eps=1e-6, residual=r)
    ref = reference.group_norm_conv3x3(x, gw, gb, 32, w, b, eps=1e-6, residual=r).double()
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]
    err = ((out.double() - ref).abs().max() / (ref.abs().max() + 1)).item()
    fused = device.type == "cuda" and dtype != torch.float32
    return err <= tol, f"{'fused' if fused else 'unfused'} GN+SiLU+conv3x3 96->136 within {err:.1e} relative"


SELFTESTS = [
    ("nearest_code", _selftest_nearest_code),
    ("sample_code", _selftest_sample_code),
    ("code_stats", _selftest_code_stats),
    ("ema_update_", _selftest_ema_update),
    ("fsq/lfq", _selftest_scalar_quantizers),
    ("sampler steps", _selftest_sampler_steps),
    ("group_norm", _selftest_group_norm),
    ("gn stats/apply", _selftest_group_norm_tiled),
    ("gn+conv3x3", _selftest_group_norm_conv),
]


def selftest_devices() -> list[torch.device]:
    """The CPU, and the GPU when this build has CUDA kernels and one is visible."""
    devices = [torch.device("cpu")]
    if fastlatent.build_info()["cuda"] and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


Check = Callable[[torch.device, torch.dtype], tuple[bool, str]]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def run_selftest(
    devices: Iterable[torch.device],
    dtypes: Iterable[torch.dtype] = DTYPES,
    report: Callable[[str], None] = print,
    checks: Iterable[tuple[str, Check]] | None = None,
) -> bool:
    """Runs every check (default ``SELFTESTS``) per device and dtype, reports one line each; True when all
    pass."""
    checks = SELFTESTS if checks is None else list(checks)
    all_ok = True
    for device in devices:
        for dtype in dtypes:
            for name, check in checks:
                ok, detail = check(device, dtype)
                all_ok &= ok
                report(f"{name:13s} {device.type:4s} {str(dtype)[6:]:8s} {'ok  ' if ok else 'FAIL'} {detail}")
    return all_ok
