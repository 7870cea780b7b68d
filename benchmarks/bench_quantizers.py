"""Quantisers: nearest_code, VQ layers, codebook statistics, FSQ, LFQ, BSQ.

Shapes from real tokenizers: VQGAN f16 (K=16384, D=256; 16x16 tokens per 256 px image), ViT-VQGAN
(K=8192, D=32; 32x32 tokens), FSQ [8,5,5,5] and [8,8,8,5,5,5] (the FSQ paper's 2^10 and 2^16-ish
codebooks), LFQ at d=14 and MAGVIT-v2's d=18, and SoundStream-style residual VQ (8 quantizers of 1024
codes, D=128, 75 frames per second of audio). Providers per case: fastlatent, the float64 reference
(eager and compiled), the plain-PyTorch idioms people write (cdist/matmul + argmin, one-hot matmul,
index_add_), vector-quantize-pytorch and FAISS where installed.
"""

import pytest
import torch
from conftest import peer, providers

import fastlatent
from fastlatent import reference
from fastlatent.nn import FSQ, LFQ, ResidualVQ, VectorQuantize

BENCH_AREA = "quantizers"
CPU = torch.device("cpu")
CUDA = torch.device("cuda") if torch.cuda.is_available() else None


def _case_id(**sizes):
    return "_".join(f"{k}{v}" for k, v in sizes.items())


# --------------------------------------------------------------------------------------- nearest_code


def _nearest(label, n, d, k, full=False):
    return pytest.param(
        (label, n, d, k), id=f"{label}_N{n}_D{d}_K{k}", marks=[pytest.mark.full] if full else []
    )


NEAREST_CPU = [
    _nearest("vqgan_f16", 1024, 256, 16384),  # 4 images of 256 px, 16x16 tokens
    _nearest("vit_vqgan", 4096, 32, 8192),  # 4 images of 256 px, 32x32 tokens
    _nearest("vq", 16384, 64, 1024),  # the VQ issue's CPU bar
    _nearest("small_d", 65536, 8, 512),
    _nearest("vqgan_f16", 16384, 256, 16384, full=True),
    _nearest("vit_vqgan", 32768, 32, 8192, full=True),
    # sweeps over N, K and D around (N=16384, D=64, K=1024)
    *[_nearest("vq", n, 64, 1024, full=True) for n in (1024, 4096, 65536, 262144)],
    *[_nearest("sweep_k", 16384, 32, k, full=True) for k in (512, 1024, 2048, 4096, 8192, 16384)],
    *[_nearest("sweep_d", 16384, d, 1024, full=True) for d in (8, 16, 32, 128, 256)],
]
NEAREST_CUDA = [
    _nearest("vq", 65536, 64, 1024),
    _nearest("vit_vqgan", 262144, 32, 8192),
    _nearest("vqgan_f16", 262144, 256, 16384),
    _nearest("flash_kmeans", 1048576, 64, 4096),
]
NEAREST_PROVIDERS = providers(
    "fastlatent",
    "reference",
    "reference_compiled",
    "cdist_argmin",
    "matmul_argmin",
    "matmul_argmin_compiled",
    "faiss",
    full_only=("reference_compiled",),
)


def _matmul_argmin(x, codebook):
    # The expanded form most VQ code uses: |c|^2 - 2 x c^T, argmin over the N x K matrix.
    return ((codebook * codebook).sum(1) - 2 * x @ codebook.T).argmin(1)


def _reference_indices(x, codebook):
    return reference.nearest_code(x, codebook)[0]


def _nearest_fn(bench, provider, x, codebook):
    if provider == "fastlatent":
        return lambda: fastlatent.nearest_code(x, codebook)[0]
    if provider == "reference":
        return lambda: _reference_indices(x, codebook)
    if provider == "cdist_argmin":
        return lambda: torch.cdist(x, codebook).argmin(1)
    if provider == "matmul_argmin":
        return lambda: _matmul_argmin(x, codebook)
    if provider in ("reference_compiled", "matmul_argmin_compiled"):
        eager = _reference_indices if provider == "reference_compiled" else _matmul_argmin
        compiled = bench.compile(eager, warm=lambda f: f(x, codebook))
        return lambda: compiled(x, codebook)
    if provider == "faiss":
        faiss = peer("faiss", "faiss-cpu")
        if x.device.type != "cpu" or x.dtype != torch.float32:
            pytest.skip("faiss-cpu searches fp32 on the CPU only")
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(codebook.shape[1])
        index.add(codebook.numpy())
        xn = x.numpy()
        return lambda: torch.from_numpy(index.search(xn, 1)[1][:, 0])
    raise ValueError(provider)


def _run_nearest(bench, provider, case, device, dtype):
    label, n, d, k = case
    bench.describe(
        op="nearest_code",
        case=f"{label} N={n} D={d} K={k}",
        provider=provider,
        device=device,
        dtype=dtype,
        sizes={"n": n, "d": d, "k": k},
    )
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(k, d, generator=gen)
    x = codebook[torch.randint(0, k, (n,), generator=gen)] + 0.5 * torch.randn(n, d, generator=gen)
    x, codebook = x.to(device, dtype), codebook.to(device, dtype)
    fn = _nearest_fn(bench, provider, x, codebook)
    # Correctness before speed, on a slice small enough for the float64 reference.
    check = slice(0, 512)
    agree = (fn()[check].to(device) == _reference_indices(x[check], codebook)).float().mean().item()
    assert agree > 0.99, f"{provider} agrees with the reference on only {agree:.1%} of rows"
    # N x K fp32 distances are what the unfused idioms write and read back; the fused kernel never does.
    bench.run(fn, flops=2 * n * d * k, bytes_moved=(n * d + k * d) * x.element_size() + n * 8)


@pytest.mark.parametrize("provider", NEAREST_PROVIDERS)
@pytest.mark.parametrize("case", NEAREST_CPU)
def test_nearest_code_cpu(bench, provider, case):
    _run_nearest(bench, provider, case, CPU, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "provider", ["fastlatent", "cdist_argmin", "matmul_argmin", "matmul_argmin_compiled"]
)
@pytest.mark.parametrize("case", NEAREST_CUDA)
def test_nearest_code_cuda(bench, provider, case, dtype):
    if provider == "cdist_argmin" and dtype != torch.float32:
        pytest.skip("cdist has no bf16 kernel")
    _run_nearest(bench, provider, case, CUDA, dtype)


# --------------------------------------------------------------------------------------- sample_code

SAMPLE_CPU = [
    _nearest("vq", 16384, 64, 1024),  # stochastic_sample_codes at the VQ issue's CPU bar
    _nearest("vit_vqgan", 4096, 32, 8192),
]
SAMPLE_CUDA = [_nearest("vq", 65536, 64, 1024), _nearest("vit_vqgan", 262144, 32, 8192)]
SAMPLE_TEMPERATURE = 0.5


def _gumbel_argmax(x, codebook):
    """What vector-quantize-pytorch does: -cdist logits, uniform noise, two logs, argmax (N x K passes)."""
    logits = -torch.cdist(x, codebook)
    noise = torch.zeros_like(logits).uniform_(0, 1)
    return (
        logits / SAMPLE_TEMPERATURE - torch.log(-torch.log(noise.clamp_min(1e-20)).clamp_min(1e-20))
    ).argmax(-1)


def _run_sample(bench, provider, case, device, dtype):
    label, n, d, k = case
    bench.describe(
        op="sample_code (Gumbel)",
        case=f"{label} N={n} D={d} K={k} T={SAMPLE_TEMPERATURE}",
        provider=provider,
        device=device,
        dtype=dtype,
        sizes={"n": n, "d": d, "k": k},
    )
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(k, d, generator=gen)
    x = codebook[torch.randint(0, k, (n,), generator=gen)] + 0.5 * torch.randn(n, d, generator=gen)
    x, codebook = x.to(device, dtype), codebook.to(device, dtype)
    if provider == "fastlatent":
        # Correctness first: near temperature 0 the draw is the nearest code.
        check = slice(0, 512)
        cold = fastlatent.ops.sample_code(x[check], codebook, 1e-6, seed=1)
        assert (cold == _reference_indices(x[check], codebook).to(device)).float().mean().item() > 0.99

        def fn():
            return fastlatent.ops.sample_code(x, codebook, SAMPLE_TEMPERATURE, seed=1)

    elif provider == "vector_quantize_pytorch":
        vqp = peer("vector_quantize_pytorch.vector_quantize_pytorch", "vector-quantize-pytorch")

        def fn():
            logits = -torch.cdist(x, codebook)
            return vqp.gumbel_sample(logits, temperature=SAMPLE_TEMPERATURE, stochastic=True, training=True)[
                0
            ]

    else:

        def fn():
            return _gumbel_argmax(x, codebook)

    out = fn()
    assert out.shape == (n,) and 0 <= int(out.min()) and int(out.max()) < k
    bench.run(fn, flops=2 * n * d * k, bytes_moved=(n * d + k * d) * x.element_size() + n * 8)


@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch", "gumbel_argmax"])
@pytest.mark.parametrize("case", SAMPLE_CPU)
def test_sample_code_cpu(bench, provider, case):
    _run_sample(bench, provider, case, CPU, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize("case", SAMPLE_CUDA)
def test_sample_code_cuda(bench, provider, case):
    _run_sample(bench, provider, case, CUDA, torch.float32)


# --------------------------------------------------------------------------------------- VQ layers

LAYER_CASES = [
    pytest.param(("vq", 16, 1024, 64, 1024), id="vq_B16_N1024_D64_K1024"),  # the VQ issue's CPU bar
    pytest.param(
        ("vqgan_f16", 16, 256, 256, 16384), id="vqgan_f16_B16_N256_D256_K16384", marks=pytest.mark.full
    ),
    pytest.param(
        ("vit_vqgan", 16, 1024, 32, 8192), id="vit_vqgan_B16_N1024_D32_K8192", marks=pytest.mark.full
    ),
]


def _vq_layer(provider, d, k, device):
    if provider == "fastlatent":
        return VectorQuantize(d, k, decay=0.8, commitment_weight=1.0, rotation_trick=True).to(device).train()
    vqp = peer("vector_quantize_pytorch", "vector-quantize-pytorch")
    return (
        vqp.VectorQuantize(dim=d, codebook_size=k, decay=0.8, commitment_weight=1.0, rotation_trick=True)
        .to(device)
        .train()
    )


def _run_vq_layer(bench, provider, case, device):
    label, b, n, d, k = case
    bench.describe(
        op="VectorQuantize fwd+bwd (EMA)",
        case=f"{label} B={b} N={n} D={d} K={k}",
        provider=provider,
        device=device,
        dtype=torch.float32,
        sizes={"n": b * n, "d": d, "k": k},
    )
    torch.manual_seed(0)
    layer = _vq_layer(provider, d, k, device)
    x = torch.randn(b, n, d, device=device, requires_grad=True)
    weight = torch.randn(b, n, d, device=device)

    def step():
        quantized, indices, loss = layer(x)
        ((quantized * weight).sum() + loss.sum()).backward()
        return indices

    indices = step()
    assert indices.shape == (b, n) and 0 <= int(indices.min()) and int(indices.max()) < k
    bench.run(step)


@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize("case", LAYER_CASES)
def test_vq_layer_fwd_bwd_cpu(bench, provider, case):
    _run_vq_layer(bench, provider, case, CPU)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize(
    "case",
    [("vqgan_f16", 64, 256, 256, 16384), ("vit_vqgan", 64, 1024, 32, 8192), ("vq", 16, 1024, 64, 1024)],
    ids=lambda c: _case_id(B=c[1], N=c[2], D=c[3], K=c[4]),
)
def test_vq_layer_fwd_bwd_cuda(bench, provider, case):
    _run_vq_layer(bench, provider, case, CUDA)


# SoundStream-style residual VQ: 8 quantizers x 1024 codes on D=128 frames at 75 Hz (EnCodec 24 kHz: 6 kbps).
RVQ_CASES = [
    pytest.param((4, 750, 128, 8, 1024), id="soundstream_B4_T750_D128_Q8_K1024"),  # 4 clips of 10 s
    pytest.param((16, 750, 128, 8, 1024), id="soundstream_B16_T750_D128_Q8_K1024", marks=pytest.mark.full),
    pytest.param((8, 750, 128, 32, 1024), id="encodec_max_B8_T750_D128_Q32_K1024", marks=pytest.mark.full),
]


def _run_rvq(bench, provider, case, device):
    b, t, d, q, k = case
    bench.describe(
        op="ResidualVQ fwd+bwd (EMA)",
        case=f"B={b} T={t} D={d} Q={q} K={k}",
        provider=provider,
        device=device,
        dtype=torch.float32,
        sizes={"n": b * t, "d": d, "k": k, "quantizers": q},
    )
    torch.manual_seed(0)
    if provider == "fastlatent":
        layer = ResidualVQ(dim=d, num_quantizers=q, codebook_size=k, decay=0.99, commitment_weight=1.0)
    else:
        vqp = peer("vector_quantize_pytorch", "vector-quantize-pytorch")
        layer = vqp.ResidualVQ(dim=d, num_quantizers=q, codebook_size=k, decay=0.99, commitment_weight=1.0)
    layer = layer.to(device).train()
    x = torch.randn(b, t, d, device=device, requires_grad=True)
    weight = torch.randn(b, t, d, device=device)

    def step():
        quantized, indices, losses = layer(x)
        ((quantized * weight).sum() + losses.sum()).backward()
        return indices

    indices = step()
    assert indices.shape == (b, t, q), indices.shape
    bench.run(step)


@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize("case", RVQ_CASES)
def test_residual_vq_fwd_bwd_cpu(bench, provider, case):
    _run_rvq(bench, provider, case, CPU)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize("case", [(64, 750, 128, 8, 1024)], ids=["soundstream_B64"])
def test_residual_vq_fwd_bwd_cuda(bench, provider, case):
    _run_rvq(bench, provider, case, CUDA)


# --------------------------------------------------------------------------------------- code_stats

STATS_CASES = [
    pytest.param((16384, 64, 1024), id="N16384_D64_K1024"),
    pytest.param((65536, 256, 16384), id="vqgan_f16_N65536_D256_K16384", marks=pytest.mark.full),
]
STATS_PROVIDERS = ["fastlatent", "reference", "reference_compiled", "onehot_matmul", "index_add"]


def _onehot_sums(x, indices, k):  # what vector-quantize-pytorch and taming-transformers do
    return torch.nn.functional.one_hot(indices, k).type(x.dtype).T @ x


def _run_stats(bench, provider, case, device):
    n, d, k = case
    bench.describe(
        op="code_stats",
        case=f"N={n} D={d} K={k}",
        provider=provider,
        device=device,
        dtype=torch.float32,
        sizes={"n": n, "d": d, "k": k},
    )
    if provider == "onehot_matmul" and n * k * 4 > 8 * 2**30:
        pytest.skip(f"the N x K one-hot matrix alone would take {n * k * 4 / 2**30:.0f} GiB")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device)
    indices = torch.randint(0, k, (n,), generator=gen).to(device)
    if provider == "fastlatent":
        fn = lambda: fastlatent.code_stats(x, indices, k)[1]  # noqa: E731
    elif provider == "reference":
        fn = lambda: reference.code_stats(x, indices, k)[1]  # noqa: E731
    elif provider == "reference_compiled":
        compiled = bench.compile(lambda x, i: reference.code_stats(x, i, k)[1], warm=lambda f: f(x, indices))
        fn = lambda: compiled(x, indices)  # noqa: E731
    elif provider == "onehot_matmul":
        fn = lambda: _onehot_sums(x, indices, k)  # noqa: E731
    elif provider == "index_add":
        fn = lambda: torch.zeros(k, d, device=device).index_add_(0, indices, x)  # noqa: E731
    else:
        raise ValueError(provider)
    torch.testing.assert_close(
        fn().float(), reference.code_stats(x, indices, k)[1].float(), rtol=1e-4, atol=1e-3
    )
    bench.run(fn, bytes_moved=4 * (n * d + k * d) + 8 * n)


@pytest.mark.parametrize("provider", STATS_PROVIDERS)
@pytest.mark.parametrize("case", STATS_CASES)
def test_code_stats_cpu(bench, provider, case):
    _run_stats(bench, provider, case, CPU)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastlatent", "onehot_matmul", "index_add"])
@pytest.mark.parametrize(
    "case", [(1048576, 256, 16384), (262144, 64, 1024)], ids=lambda c: _case_id(N=c[0], D=c[1], K=c[2])
)
def test_code_stats_cuda(bench, provider, case):
    _run_stats(bench, provider, case, CUDA)


# --------------------------------------------------------------------------------------- FSQ

FSQ_CASES = [
    pytest.param((16, 1024, (8, 5, 5, 5)), id="B16_N1024_L8555"),
    pytest.param((16, 4096, (8, 8, 8, 5, 5, 5)), id="B16_N4096_L888555"),
    pytest.param((64, 4096, (8, 5, 5, 5)), id="B64_N4096_L8555", marks=pytest.mark.full),
    *[
        pytest.param((b, 4096, (8, 8, 8, 5, 5, 5)), id=f"B{b}_N4096_L888555", marks=pytest.mark.full)
        for b in (4, 64, 256)
    ],
]
FSQ_PROVIDERS = ["fastlatent", "reference", "reference_compiled", "vector_quantize_pytorch"]


def _run_fsq(bench, provider, case, device, dtype=torch.float32):
    b, n, levels = case
    levels = list(levels)
    bench.describe(
        op="FSQ fwd+bwd",
        case=f"B={b} N={n} levels={levels}",
        provider=provider,
        device=device,
        dtype=dtype,
        sizes={"n": b * n, "d": len(levels)},
    )
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(b, n, len(levels), generator=gen) * 2).to(device, dtype).requires_grad_()
    g = torch.randn(b, n, len(levels), generator=gen).to(device, dtype)
    if provider == "fastlatent":
        forward = FSQ(levels).to(device)
    elif provider == "vector_quantize_pytorch":
        forward = peer("vector_quantize_pytorch", "vector-quantize-pytorch").FSQ(levels).to(device)
    elif provider in ("reference", "reference_compiled"):
        forward = lambda z: reference.fsq_quantize(z, levels)  # noqa: E731
    else:
        raise ValueError(provider)

    def make_step(forward):
        def step():
            z.grad = None
            out, idx = forward(z)
            out.backward(g)
            return out, idx

        return step

    if provider == "reference_compiled":
        forward = bench.compile(forward, warm=lambda f: make_step(f)())
    step = make_step(forward)
    out, idx = step()
    want, want_idx = reference.fsq_quantize(z.detach(), levels)
    agree = (idx.long() == want_idx).float().mean().item()
    assert agree > 0.9999, f"{provider}: indices agree with the reference on {agree:.4%}"
    grad = z.grad.clone()
    z.grad = None
    (want_grad,) = torch.autograd.grad(reference.fsq_quantize(z, levels)[0], z, g)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5)
    # forward reads z, writes z_hat and int64 indices; backward reads grad and z, writes dz
    elements = z.numel()
    bench.run(step, bytes_moved=elements * z.element_size() * 5 + b * n * 8)


@pytest.mark.parametrize("provider", FSQ_PROVIDERS)
@pytest.mark.parametrize("case", FSQ_CASES)
def test_fsq_cpu(bench, provider, case):
    _run_fsq(bench, provider, case, CPU)


@pytest.mark.cuda
@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", ["fastlatent", "reference_compiled"])
def test_fsq_bandwidth_cuda(bench, provider, direction, dtype):
    """FSQ on 64M elements: the fraction of HBM bandwidth reached, fused kernels vs the compiled reference."""
    levels = [8, 5, 5, 5]
    elements = 64 * 2**20
    bench.describe(
        op=f"FSQ {direction}",
        case="64M elements, levels [8,5,5,5]",
        provider=provider,
        device=CUDA,
        dtype=dtype,
        sizes={"n": elements // 4, "d": 4},
    )
    z = (torch.randn(elements // 4, 4, device=CUDA) * 2).to(dtype).requires_grad_()
    g = torch.randn_like(z)
    if provider == "fastlatent":
        quantize = lambda z: fastlatent.fsq_quantize(z, levels)  # noqa: E731
    else:
        quantize = bench.compile(
            lambda z: reference.fsq_quantize(z, levels), warm=lambda f: f(z)[0].backward(g)
        )
    if direction == "forward":

        def fn():
            with torch.no_grad():
                return quantize(z)

        moved = elements * z.element_size() * 2 + (elements // 4) * 8  # read z; write z_hat, int64 indices
    else:

        def fn():
            return torch.autograd.grad(quantize(z)[0], z, g)[0]

        moved = elements * z.element_size() * 5 + (elements // 4) * 8  # and read grad, z; write grad_z
    got = fn()
    if direction == "forward":
        ref = reference.fsq_quantize(z[:65536].detach().cpu(), levels)
        assert torch.equal(got[0][:65536].cpu(), ref[0]) and torch.equal(got[1][:65536].cpu(), ref[1])
    bench.run(fn, bytes_moved=moved)


# --------------------------------------------------------------------------------------- LFQ

LFQ_CASES = [
    pytest.param((1, 1024, 14), id="B1_N1024_d14"),  # vqp: about a second per call on 2 cores
    pytest.param((4, 1024, 14), id="B4_N1024_d14", marks=pytest.mark.full),
    pytest.param((16, 1024, 14), id="B16_N1024_d14", marks=pytest.mark.full),
]


def _run_lfq_layer(bench, provider, case, device):
    b, n, d = case
    bench.describe(
        op="LFQ + entropy loss fwd+bwd",
        case=f"B={b} N={n} d={d}",
        provider=provider,
        device=device,
        dtype=torch.float32,
        sizes={"n": b * n, "d": d},
    )
    if provider == "fastlatent":
        module = LFQ(dim=d)
    else:
        module = peer("vector_quantize_pytorch", "vector-quantize-pytorch").LFQ(dim=d)
    module = module.to(device).train()
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(b, n, d, generator=gen) * 0.02).to(device).requires_grad_()
    g = torch.randn(b, n, d, generator=gen).to(device)

    def step():
        x.grad = None
        (out, idx, aux), breakdown = module(x, inv_temperature=100.0, return_loss_breakdown=True)
        ((out * g).sum() + aux).backward()
        return out, idx, aux, breakdown

    out, idx, aux, breakdown = step()
    # Correctness: indices and the exact entropies of the materialised soft assignment.
    assert torch.equal(idx.long(), reference.lfq_quantize(x.detach())[1])
    ps_ref, avg_ref = reference.lfq_entropy(x.detach(), 1.0, 100.0)
    batch_ref = -torch.special.xlogy(avg_ref.double(), avg_ref.double()).sum()
    if provider == "fastlatent":
        torch.testing.assert_close(breakdown.per_sample_entropy, ps_ref.mean(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(breakdown.batch_entropy.double(), batch_ref, rtol=1e-4, atol=1e-5)
    else:  # vqp clamps probabilities at 1e-5 in its logs: close to the exact value, not equal
        torch.testing.assert_close(breakdown.batch_entropy.double(), batch_ref, rtol=5e-2, atol=0)
    bench.note(
        theoretical_extra_bytes=(
            b * n * 2**d * 4
            if provider != "fastlatent"
            else b * n * d * 8 + torch.get_num_threads() * 2**d * 8
        ),
        footprint_note="vqp: N x 2^d fp32 soft assignments (several); fastlatent: O(N d) + 2^d per thread",
    )
    bench.run(step)


@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize("case", LFQ_CASES)
def test_lfq_entropy_layer_cpu(bench, provider, case):
    _run_lfq_layer(bench, provider, case, CPU)


ENTROPY_CASES = [
    pytest.param((1024, 12), id="N1024_d12"),  # the float64 reference materialises N x 2^d
    pytest.param((4096, 14), id="N4096_d14", marks=pytest.mark.full),
    pytest.param((1024, 18), id="magvit2_N1024_d18", marks=pytest.mark.full),
]


@pytest.mark.parametrize("provider", ["fastlatent", "reference", "reference_compiled"])
@pytest.mark.parametrize("case", ENTROPY_CASES)
def test_lfq_entropy_op_cpu(bench, provider, case):
    """The entropy terms alone, forward: factorised kernel against the materialised N x 2^d softmax."""
    n, d = case
    bench.describe(
        op="lfq_entropy",
        case=f"N={n} d={d}",
        provider=provider,
        device=CPU,
        dtype=torch.float32,
        sizes={"n": n, "d": d},
    )
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * 0.05
    if provider == "fastlatent":
        fn = lambda: fastlatent.lfq_entropy(x, 1.0, 10.0)  # noqa: E731
    elif provider == "reference":
        fn = lambda: reference.lfq_entropy(x, 1.0, 10.0)  # noqa: E731
    else:
        compiled = bench.compile(lambda x: reference.lfq_entropy(x, 1.0, 10.0), warm=lambda f: f(x))
        fn = lambda: compiled(x)  # noqa: E731
    ps, avg = fn()
    ref_ps, ref_avg = reference.lfq_entropy(x, 1.0, 10.0)
    torch.testing.assert_close(ps.double(), ref_ps.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(avg.double(), ref_avg.double(), rtol=1e-4, atol=1e-9)
    bench.run(fn)


# --------------------------------------------------------------------------------------- BSQ

BSQ_CASES = [
    pytest.param((16384, 18), id="N16384_d18", marks=pytest.mark.full),
    pytest.param((65536, 36), id="N65536_d36", marks=pytest.mark.full),
]


@pytest.mark.parametrize("provider", ["fastlatent", "reference", "reference_compiled"])
@pytest.mark.parametrize("case", BSQ_CASES)
def test_bsq_fwd_bwd_cpu(bench, provider, case):
    """BSQ quantize + entropy terms, forward and backward (BSQ-ViT's d=18 and d=36)."""
    n, d = case
    bench.describe(
        op="BSQ quantize+entropy fwd+bwd",
        case=f"N={n} d={d}",
        provider=provider,
        device=CPU,
        dtype=torch.float32,
        sizes={"n": n, "d": d},
    )
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, d, generator=gen).requires_grad_()
    g = torch.randn(n, d, generator=gen)
    ops = fastlatent if provider == "fastlatent" else reference

    def loss(z):
        q, idx = ops.bsq_quantize(z)
        per_sample, avg = ops.bsq_entropy(z, 1.0)
        return (q * g).sum() + per_sample.mean() - avg.sum(), idx

    fn_ = bench.compile(loss, warm=lambda f: f(z)) if provider == "reference_compiled" else loss

    def step():
        z.grad = None
        value, idx = fn_(z)
        value.backward()
        return idx

    idx = step()
    assert torch.equal(idx.long(), reference.bsq_quantize(z.detach())[1])
    grad = z.grad.clone()
    z64 = z.detach().double().requires_grad_()
    q, _ = reference.bsq_quantize(z64)
    per_sample, avg = reference.bsq_entropy(z64, 1.0)
    ((q * g.double()).sum() + per_sample.mean() - avg.sum()).backward()
    torch.testing.assert_close(grad.double(), z64.grad, rtol=1e-3, atol=1e-5)
    bench.run(step)


# ------------------------------------------------------------- residual FSQ / LFQ, spherical LFQ


def _vqp_module(name, **kwargs):
    return getattr(peer("vector_quantize_pytorch", "vector-quantize-pytorch"), name)(**kwargs)


def _scalar_module(provider, name, seed=0, **kwargs):
    """The same module from fastlatent.nn or vqp, built from one seed (so both get the same weights)."""
    torch.manual_seed(seed)
    if provider == "fastlatent":
        return getattr(fastlatent.nn, name)(**kwargs)
    return _vqp_module(name, **kwargs)


def _reference_indices_of(name, x, **kwargs):
    """The other provider's indices on the same input, for the correctness check."""
    torch.manual_seed(0)
    module = getattr(fastlatent.nn, name)(**kwargs).train()
    with torch.no_grad():
        return module(x)[1]


RFSQ_CASES = [
    # an encoder emitting len(levels) channels: 16 latents of 64x64, 8 quantizers of [8,5,5,5]
    pytest.param((16, 4096, 4, 8), id="B16_N4096_D4_q8"),
    # with 256 -> 4 projections, whose matmuls (the same in both providers) dominate on the CPU
    pytest.param((4, 1024, 256, 8), id="B4_N1024_D256_q8", marks=pytest.mark.full),
]


@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize("case", RFSQ_CASES)
def test_residual_fsq_fwd_bwd_cpu(bench, provider, case):
    """ResidualFSQ (default hard-clamped symmetric layers) forward + backward through the projections."""
    b, n, dim, q = case
    kwargs = dict(levels=[8, 5, 5, 5], num_quantizers=q, dim=dim)
    bench.describe(
        op="ResidualFSQ fwd+bwd",
        case=f"B={b} N={n} D={dim} q={q} levels [8,5,5,5]",
        provider=provider,
        device=CPU,
        dtype=torch.float32,
        sizes={"n": b * n, "d": dim},
    )
    module = _scalar_module(provider, "ResidualFSQ", **kwargs).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, dim, generator=gen).requires_grad_()
    g = torch.randn(b, n, dim, generator=gen)

    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        out, idx = module(x)
        (out * g).sum().backward()
        return idx

    idx = step()
    assert torch.equal(idx.long(), _reference_indices_of("ResidualFSQ", x.detach(), **kwargs))
    bench.run(step)


@pytest.mark.parametrize("provider", ["fastlatent", "reference", "reference_compiled"])
@pytest.mark.parametrize("case", [pytest.param((16, 4096, 8), id="B16_N4096_q8")])
def test_residual_fsq_op_cpu(bench, provider, case):
    """The fused residual_fsq op (all layers in one pass) forward + backward against its reference."""
    b, n, q = case
    levels = [8, 5, 5, 5]
    bench.describe(
        op="residual_fsq fwd+bwd",
        case=f"B={b} N={n} q={q} levels [8,5,5,5]",
        provider=provider,
        device=CPU,
        dtype=torch.float32,
        sizes={"n": b * n, "d": len(levels)},
    )
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(b, n, len(levels), generator=gen) * 0.7).requires_grad_()
    g = torch.randn(b, n, len(levels), generator=gen)
    scales = torch.stack([torch.tensor(levels).float() ** -i for i in range(q)])
    if provider == "fastlatent":
        forward = lambda z: fastlatent.ops.residual_fsq(z, scales, levels)  # noqa: E731
    else:
        forward = lambda z: reference.residual_fsq(z, scales, levels)  # noqa: E731

    def make_step(forward):
        def step():
            z.grad = None
            out, idx = forward(z)
            out.backward(g)
            return out, idx

        return step

    if provider == "reference_compiled":
        forward = bench.compile(forward, warm=lambda f: make_step(f)())
    step = make_step(forward)
    out, idx = step()
    want, want_idx = reference.residual_fsq(z.detach(), scales, levels)
    assert torch.equal(out.detach(), want) and torch.equal(idx, want_idx)
    # forward reads z, writes z_hat, the pass counts and q int64 indices per row; backward 2 reads, 1 write
    bench.run(step, bytes_moved=z.numel() * (4 * 2 + 1 + 4 * 2 + 1) + b * n * q * 8)


RLFQ_CASES = [
    pytest.param((4, 256, 256, 10, 4), id="B4_N256_D256_d10_q4"),
    pytest.param((4, 1024, 256, 12, 4), id="B4_N1024_D256_d12_q4", marks=pytest.mark.full),
]


@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize("case", RLFQ_CASES)
def test_residual_lfq_fwd_bwd_cpu(bench, provider, case):
    """ResidualLFQ in training (each layer's entropy loss) forward + backward."""
    b, n, dim, d, q = case
    kwargs = dict(dim=dim, codebook_size=2**d, num_quantizers=q)
    bench.describe(
        op="ResidualLFQ + entropy losses fwd+bwd",
        case=f"B={b} N={n} D={dim} d={d} q={q}",
        provider=provider,
        device=CPU,
        dtype=torch.float32,
        sizes={"n": b * n, "d": dim},
    )
    module = _scalar_module(provider, "ResidualLFQ", **kwargs).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, dim, generator=gen).requires_grad_()
    g = torch.randn(b, n, dim, generator=gen)

    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        out, idx, losses = module(x)
        ((out * g).sum() + losses.sum()).backward()
        return idx

    idx = step()
    assert torch.equal(idx.long(), _reference_indices_of("ResidualLFQ", x.detach(), **kwargs))
    bench.note(
        theoretical_extra_bytes=(q * b * n * 2**d * 4 if provider != "fastlatent" else q * 2**d * 8),
        footprint_note="vqp: an N x 2^d soft assignment per layer; fastlatent: 2^d per thread",
    )
    bench.run(step)


SPHERICAL_CASES = [
    pytest.param((1, 1024, 14), id="B1_N1024_d14"),
    pytest.param((4, 1024, 14), id="B4_N1024_d14", marks=pytest.mark.full),
]


@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize("case", SPHERICAL_CASES)
def test_lfq_spherical_fwd_bwd_cpu(bench, provider, case):
    """LFQ(spherical=True), i.e. BSQ, with its entropy and commitment losses, forward + backward."""
    b, n, d = case
    kwargs = dict(dim=d, spherical=True, commitment_loss_weight=0.25)
    bench.describe(
        op="LFQ(spherical) + losses fwd+bwd",
        case=f"B={b} N={n} d={d}",
        provider=provider,
        device=CPU,
        dtype=torch.float32,
        sizes={"n": b * n, "d": d},
    )
    module = _scalar_module(provider, "LFQ", **kwargs).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, d, generator=gen).requires_grad_()
    g = torch.randn(b, n, d, generator=gen)

    def step():
        x.grad = None
        out, idx, aux = module(x)
        ((out * g).sum() + aux).backward()
        return idx, aux

    idx, aux = step()
    assert torch.equal(idx.long(), reference.lfq_quantize(x.detach())[1])
    torch.manual_seed(0)
    ours = fastlatent.nn.LFQ(**kwargs).train()
    torch.testing.assert_close(aux.detach(), ours(x.detach())[2], rtol=2e-2, atol=1e-4)  # vqp: 1e-5 log clamp
    bench.run(step)


# --------------------------------------------------------------------------------------- multi-head VQ, SimVQ

# Multi-head VQ with a codebook per head (heads=8, D=256 split into 8 x 32, K=8192): fastlatent runs
# all heads in one batched nearest_code call; vector-quantize-pytorch materialises [H, N, K] distances.
MULTIHEAD_CASES = [
    pytest.param((4, 256, 256, 8, 8192), id="heads8_B4_N256_D256_K8192"),
    pytest.param((16, 256, 256, 8, 8192), id="heads8_B16_N256_D256_K8192", marks=pytest.mark.full),
]


def _run_multihead_vq(bench, provider, case, device):
    b, n, d, heads, k = case
    bench.describe(
        op="VectorQuantize multi-head fwd+bwd (EMA)",
        case=f"heads={heads} B={b} N={n} D={d} K={k}",
        provider=provider,
        device=device,
        dtype=torch.float32,
        sizes={"n": b * n * heads, "d": d // heads, "k": k, "heads": heads},
    )
    torch.manual_seed(0)
    kwargs = {
        "dim": d,
        "codebook_size": k,
        "heads": heads,
        "codebook_dim": d // heads,
        "separate_codebook_per_head": True,
        "decay": 0.8,
    }
    if provider == "fastlatent":
        layer = VectorQuantize(**kwargs)
    else:
        layer = peer("vector_quantize_pytorch", "vector-quantize-pytorch").VectorQuantize(**kwargs)
    layer = layer.to(device).train()
    x = torch.randn(b, n, d, device=device, requires_grad=True)
    weight = torch.randn(b, n, d, device=device)

    def step():
        quantized, indices, loss = layer(x)
        ((quantized * weight).sum() + loss.sum()).backward()
        return indices

    indices = step()
    assert indices.shape == (b, n, heads) and 0 <= int(indices.min()) and int(indices.max()) < k
    bench.run(step)


@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize("case", MULTIHEAD_CASES)
def test_multihead_vq_fwd_bwd_cpu(bench, provider, case):
    _run_multihead_vq(bench, provider, case, CPU)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize(
    "case", [(64, 256, 256, 8, 8192)], ids=lambda c: _case_id(B=c[0], N=c[1], D=c[2], K=c[4])
)
def test_multihead_vq_fwd_bwd_cuda(bench, provider, case):
    _run_multihead_vq(bench, provider, case, CUDA)


# SimVQ (a learned linear map of a frozen codebook), image tokens: 16x16 per image, D=256, K=8192.
SIMVQ_CASES = [
    pytest.param((8, 256, 256, 8192), id="simvq_B8_N256_D256_K8192"),
    pytest.param((32, 256, 256, 16384), id="simvq_B32_N256_D256_K16384", marks=pytest.mark.full),
]


def _run_simvq(bench, provider, case, device):
    from fastlatent.nn import SimVQ

    b, n, d, k = case
    bench.describe(
        op="SimVQ fwd+bwd",
        case=f"B={b} N={n} D={d} K={k}",
        provider=provider,
        device=device,
        dtype=torch.float32,
        sizes={"n": b * n, "d": d, "k": k},
    )
    torch.manual_seed(0)
    vqp = None if provider == "fastlatent" else peer("vector_quantize_pytorch", "vector-quantize-pytorch")
    cls = SimVQ if vqp is None else vqp.SimVQ
    layer = cls(dim=d, codebook_size=k).to(device).train()
    x = torch.randn(b, n, d, device=device, requires_grad=True)
    weight = torch.randn(b, n, d, device=device)

    def step():
        quantized, indices, loss = layer(x)
        ((quantized * weight).sum() + loss).backward()
        return indices

    indices = step()
    assert indices.shape == (b, n) and 0 <= int(indices.min()) and int(indices.max()) < k
    bench.run(step)


@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize("case", SIMVQ_CASES)
def test_simvq_fwd_bwd_cpu(bench, provider, case):
    _run_simvq(bench, provider, case, CPU)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize(
    "case", [(64, 256, 256, 8192)], ids=lambda c: _case_id(B=c[0], N=c[1], D=c[2], K=c[3])
)
def test_simvq_fwd_bwd_cuda(bench, provider, case):
    _run_simvq(bench, provider, case, CUDA)
