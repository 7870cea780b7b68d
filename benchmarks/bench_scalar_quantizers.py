"""FSQ, LFQ and BSQ against vector-quantize-pytorch and the eager / compiled references.

CPU: FSQ forward + backward (levels [8,5,5,5] and [8,8,8,5,5,5], no projections) and LFQ with
its entropy loss at d = 14, forward + backward (training mode), with the peak memory of torch
allocations during one call (torch.profiler) next to the theoretical footprint of each method.
CUDA (marked `cuda`): fused FSQ forward and backward on 64M elements, GB/s against the
H100's 3.35 TB/s.
"""

import pytest
import torch

import fastlatent
from conftest import device_name, timed
from fastlatent import reference

H100_BYTES_PER_S = 3.35e12


def _peak_torch_bytes(fn) -> int:
    """Peak of live CPU bytes allocated by torch during fn() (running sum of self allocations)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage != 0)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


# ------------------------------------------------------------------------------ FSQ

FSQ_CASES = [
    pytest.param((16, 1024, (8, 5, 5, 5)), id="B16_N1024_L8555"),
    pytest.param((16, 4096, (8, 8, 8, 5, 5, 5)), id="B16_N4096_L888555"),
    pytest.param((64, 4096, (8, 5, 5, 5)), id="B64_N4096_L8555", marks=pytest.mark.full),
]
FSQ_PROVIDERS = ["fastlatent", "vector_quantize_pytorch", "reference", "reference_compiled"]


def _fsq_reference(z, levels):
    return reference.fsq_quantize(z, levels)


_fsq_reference_compiled = torch.compile(_fsq_reference)


def _fsq_fn(provider, levels, z, g):
    if provider == "fastlatent":
        module = fastlatent.nn.FSQ(list(levels))
        forward = module
    elif provider == "vector_quantize_pytorch":
        vqp = pytest.importorskip("vector_quantize_pytorch")
        forward = vqp.FSQ(list(levels))
    elif provider == "reference":
        forward = lambda z: _fsq_reference(z, list(levels))  # noqa: E731
    elif provider == "reference_compiled":
        forward = lambda z: _fsq_reference_compiled(z, list(levels))  # noqa: E731
    else:
        raise ValueError(provider)

    def step():
        z.grad = None
        out, idx = forward(z)
        out.backward(g)
        return out, idx

    return step


@pytest.mark.parametrize("provider", FSQ_PROVIDERS)
@pytest.mark.parametrize("case", FSQ_CASES)
def test_fsq_cpu(benchmark, provider, case):
    b, n, levels = case
    benchmark.group = f"FSQ fwd+bwd cpu fp32 B={b} N={n} levels={list(levels)}"
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(b, n, len(levels), generator=gen) * 2).requires_grad_()
    g = torch.randn(b, n, len(levels), generator=gen)
    step = _fsq_fn(provider, levels, z, g)
    out, idx = step()
    want, want_idx = reference.fsq_quantize(z.detach(), list(levels))
    agree = (idx.long() == want_idx).float().mean().item()
    assert agree > 0.9999, f"{provider}: indices agree with the reference on {agree:.4%}"
    grad = z.grad.clone()
    z.grad = None
    want_grad, = torch.autograd.grad(reference.fsq_quantize(z, list(levels))[0], z, g)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5)
    elements = z.numel()
    benchmark.extra_info.update(device=device_name(z.device), torch=torch.__version__, elements=elements,
                                levels=list(levels))
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    benchmark.extra_info["melem_per_s"] = elements / benchmark.stats.stats.min / 1e6


# ------------------------------------------------------------------------------ LFQ

LFQ_CASES = [
    pytest.param((4, 1024, 14), id="B4_N1024_d14"),
    pytest.param((16, 1024, 14), id="B16_N1024_d14", marks=pytest.mark.full),
]


def _lfq_fn(provider, d, x, g):
    if provider == "fastlatent":
        module = fastlatent.nn.LFQ(dim=d)
    elif provider == "vector_quantize_pytorch":
        vqp = pytest.importorskip("vector_quantize_pytorch")
        module = vqp.LFQ(dim=d)
    else:
        raise ValueError(provider)
    module.train()

    def step():
        x.grad = None
        (out, idx, aux), breakdown = module(x, inv_temperature=100.0, return_loss_breakdown=True)
        ((out * g).sum() + aux).backward()
        return out, idx, aux, breakdown

    return step


@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize("case", LFQ_CASES)
def test_lfq_entropy_cpu(benchmark, provider, case):
    b, n, d = case
    benchmark.group = f"LFQ + entropy loss fwd+bwd cpu fp32 B={b} N={n} d={d}"
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(b, n, d, generator=gen) * 0.02).requires_grad_()
    g = torch.randn(b, n, d, generator=gen)
    step = _lfq_fn(provider, d, x, g)
    out, idx, aux, breakdown = step()
    # Correctness: indices and the exact entropies of the materialised soft assignment on a slice.
    q_ref, idx_ref = reference.lfq_quantize(x.detach())
    assert torch.equal(idx.long(), idx_ref)
    ps_ref, avg_ref = reference.lfq_entropy(x.detach(), 1.0, 100.0)
    batch_ref = -torch.special.xlogy(avg_ref.double(), avg_ref.double()).sum()
    if provider == "fastlatent":
        torch.testing.assert_close(breakdown.per_sample_entropy, ps_ref.mean(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(breakdown.batch_entropy.double(), batch_ref, rtol=1e-4, atol=1e-5)
    else:  # vqp clamps probabilities at 1e-5 in its logs: close to the exact value, not equal
        torch.testing.assert_close(breakdown.batch_entropy.double(), batch_ref, rtol=5e-2, atol=0)
    samples = b * n
    peak = _peak_torch_bytes(step)
    theoretical = (samples * 2**d * 4 if provider == "vector_quantize_pytorch"
                   else samples * d * 8 + torch.get_num_threads() * 2**d * 8)
    benchmark.extra_info.update(device=device_name(x.device), torch=torch.__version__, samples=samples, d=d,
                                peak_torch_alloc_mib=peak / 2**20,
                                theoretical_extra_mib=theoretical / 2**20,
                                note="vqp: one N x 2^d fp32 tensor (it keeps several); fastlatent: "
                                     "O(N d) Bernoulli buffer + a 2^d fp64 accumulator per thread")
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


# ------------------------------------------------------------------------------ CUDA

@pytest.mark.cuda
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fsq_cuda_bandwidth(benchmark, direction, dtype):
    levels = [8, 5, 5, 5]
    elements = 64 * 2**20
    device = torch.device("cuda")
    z = (torch.randn(elements // 4, 4, device=device) * 2).to(dtype)
    g = torch.randn_like(z)
    esize = z.element_size()
    if direction == "forward":
        fn = lambda: fastlatent.fsq_quantize(z, levels)  # noqa: E731
        moved = elements * esize * 2 + (elements // 4) * 8  # read z, write z_hat and int64 indices
        got, idx = fn()
        ref = reference.fsq_quantize(z[:65536].cpu(), levels)
        assert torch.equal(got[:65536].cpu(), ref[0]) and torch.equal(idx[:65536].cpu(), ref[1])
    else:
        fn = lambda: torch.ops.fastlatent.fsq_quantize_backward.default(g, z, levels)  # noqa: E731
        moved = elements * esize * 3  # read grad and z, write grad_z
        want = torch.ops.fastlatent.fsq_quantize_backward.default(g[:65536].cpu(), z[:65536].cpu(), levels)
        torch.testing.assert_close(fn()[:65536].cpu().float(), want.float(), rtol=1e-2, atol=1e-5)
    benchmark.group = f"FSQ {direction} cuda {dtype} 64M elements"
    benchmark.extra_info.update(device=device_name(device), torch=torch.__version__, bytes=moved)
    benchmark.pedantic(timed(fn, device), rounds=20, warmup_rounds=3)
    gbps = moved / benchmark.stats.stats.min / 1e9
    benchmark.extra_info.update(gb_per_s=gbps, fraction_of_h100_hbm=gbps * 1e9 / H100_BYTES_PER_S)
