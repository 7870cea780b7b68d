"""nearest_code against what people use: cdist+argmin, matmul+argmin (eager and compiled), FAISS.

Shapes: VQGAN-style (D=256, K=8192/16384), ViT-VQGAN lookups (D=32, K=8192), small-D
tokenizers (D=8), and the CPU bars of the VQ issue.
"""

import pytest
import torch

import fastlatent
from conftest import device_name, timed
from fastlatent import reference

CPU_SHAPES = [
    pytest.param((4096, 64, 1024), id="N4096_D64_K1024"),
    pytest.param((16384, 64, 1024), id="N16384_D64_K1024"),
    pytest.param((65536, 8, 512), id="N65536_D8_K512"),
    pytest.param((16384, 32, 8192), id="N16384_D32_K8192", marks=pytest.mark.full),
    pytest.param((16384, 256, 8192), id="N16384_D256_K8192", marks=pytest.mark.full),
]
CUDA_SHAPES = [
    pytest.param((65536, 64, 1024), id="N65536_D64_K1024"),
    pytest.param((262144, 32, 8192), id="N262144_D32_K8192"),
    pytest.param((262144, 256, 16384), id="N262144_D256_K16384"),
    pytest.param((1048576, 64, 4096), id="N1M_D64_K4096"),
]

PROVIDERS = ["fastlatent", "cdist_argmin", "matmul_argmin", "matmul_argmin_compiled", "faiss"]


def _matmul_argmin(x, codebook):
    # The expanded form most VQ code uses: |c|^2 - 2 x c^T, argmin over the N x K matrix.
    return ((codebook * codebook).sum(1) - 2 * x @ codebook.T).argmin(1)


_compiled_matmul_argmin = torch.compile(_matmul_argmin)


def _provider_fn(provider, x, codebook):
    if provider == "fastlatent":
        return lambda: fastlatent.nearest_code(x, codebook)[0]
    if provider == "cdist_argmin":
        return lambda: torch.cdist(x, codebook).argmin(1)
    if provider == "matmul_argmin":
        return lambda: _matmul_argmin(x, codebook)
    if provider == "matmul_argmin_compiled":
        return lambda: _compiled_matmul_argmin(x, codebook)
    if provider == "faiss":
        faiss = pytest.importorskip("faiss", reason="faiss-cpu not installed (pip install faiss-cpu)")
        if x.device.type != "cpu" or x.dtype != torch.float32:
            pytest.skip("faiss-cpu runs fp32 on the CPU only")
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(codebook.shape[1])
        index.add(codebook.numpy())
        xn = x.numpy()
        return lambda: torch.from_numpy(index.search(xn, 1)[1][:, 0])
    raise ValueError(provider)


def _run(benchmark, provider, shape, device, dtype):
    n, d, k = shape
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(k, d, generator=gen)
    x = codebook[torch.randint(0, k, (n,), generator=gen)] + 0.5 * torch.randn(n, d, generator=gen)
    x, codebook = x.to(device, dtype), codebook.to(device, dtype)

    fn = _provider_fn(provider, x, codebook)
    # Correctness before speed, on a slice small enough for the float64 reference.
    check = slice(0, 512)
    got = fn()[check].to(device)
    want = reference.nearest_code(x[check], codebook)[0]
    agree = (got == want).float().mean().item()
    assert agree > 0.99, f"{provider} agrees with the reference on only {agree:.1%} of rows"

    benchmark.extra_info.update(
        device=device_name(device), torch=torch.__version__, dtype=str(dtype), n=n, d=d, k=k,
        gflop=2 * n * d * k / 1e9,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    benchmark.pedantic(timed(fn, device), rounds=5 if n * d * k < 2**33 else 2, warmup_rounds=1)
    if device.type == "cuda":
        benchmark.extra_info["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    benchmark.extra_info["gflops_per_s"] = 2 * n * d * k / benchmark.stats.stats.min / 1e9


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_nearest_code_cpu(benchmark, provider, shape):
    benchmark.group = f"nearest_code cpu fp32 {shape}"
    _run(benchmark, provider, shape, torch.device("cpu"), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("provider", ["fastlatent", "cdist_argmin", "matmul_argmin", "matmul_argmin_compiled"])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_nearest_code_cuda(benchmark, provider, shape, dtype):
    if provider == "cdist_argmin" and dtype != torch.float32:
        pytest.skip("cdist has no bf16 kernel")
    benchmark.group = f"nearest_code cuda {dtype} {shape}"
    _run(benchmark, provider, shape, torch.device("cuda"), dtype)
