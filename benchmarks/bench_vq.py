"""VQ layers and codebook statistics against vector-quantize-pytorch and plain PyTorch.

- VectorQuantize forward+backward, EMA, training mode (the issue's bar: K=1024, D=64,
  16 x 1024 tokens on the CPU), against vector-quantize-pytorch's VectorQuantize with the
  same settings (EMA decay 0.8, commitment 1.0, rotation trick).
- code_stats (counts and sums for the EMA update) against the one-hot matmul that
  vector-quantize-pytorch and taming-transformers use, and against index_add_.
"""

import pytest
import torch

import fastlatent
from conftest import device_name, timed
from fastlatent.nn import VectorQuantize

LAYER_CASES = [
    pytest.param((16, 1024, 64, 1024), id="B16_N1024_D64_K1024"),
    pytest.param((8, 1024, 256, 8192), id="B8_N1024_D256_K8192", marks=pytest.mark.full),
    pytest.param((16, 1024, 32, 8192), id="B16_N1024_D32_K8192", marks=pytest.mark.full),
]


def _layer(provider, d, k, device):
    if provider == "fastlatent":
        return VectorQuantize(d, k, decay=0.8, commitment_weight=1.0, rotation_trick=True).to(device).train()
    vqp = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch not installed")
    return vqp.VectorQuantize(dim=d, codebook_size=k, decay=0.8, commitment_weight=1.0,
                              rotation_trick=True).to(device).train()


def _run_layer(benchmark, provider, case, device):
    b, n, d, k = case
    torch.manual_seed(0)
    layer = _layer(provider, d, k, device)
    x = torch.randn(b, n, d, device=device, requires_grad=True)
    weight = torch.randn(b, n, d, device=device)

    def step():
        quantized, indices, loss = layer(x)
        ((quantized * weight).sum() + loss.sum()).backward()
        return indices

    indices = step()
    assert indices.shape == (b, n)
    benchmark.extra_info.update(device=device_name(device), torch=torch.__version__, b=b, n=n, d=d, k=k)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    benchmark.pedantic(timed(step, device), rounds=5, warmup_rounds=1)
    if device.type == "cuda":
        benchmark.extra_info["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20


@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize("case", LAYER_CASES)
def test_vq_layer_fwd_bwd_cpu(benchmark, provider, case):
    benchmark.group = f"VectorQuantize fwd+bwd cpu {case}"
    _run_layer(benchmark, provider, case, torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastlatent", "vector_quantize_pytorch"])
@pytest.mark.parametrize("case", [(32, 1024, 256, 16384), (64, 1024, 32, 8192), (16, 1024, 64, 1024)])
def test_vq_layer_fwd_bwd_cuda(benchmark, provider, case):
    benchmark.group = f"VectorQuantize fwd+bwd cuda {case}"
    _run_layer(benchmark, provider, case, torch.device("cuda"))


STATS_CASES = [
    pytest.param((16384, 64, 1024), id="N16384_D64_K1024"),
    pytest.param((65536, 256, 16384), id="N65536_D256_K16384", marks=pytest.mark.full),
]


def _stats_fn(provider, x, indices, k):
    if provider == "fastlatent":
        return lambda: fastlatent.code_stats(x, indices, k)[1]
    if provider == "onehot_matmul":
        return lambda: torch.nn.functional.one_hot(indices, k).type(x.dtype).T @ x
    if provider == "index_add":
        return lambda: torch.zeros(k, x.shape[1], device=x.device).index_add_(0, indices, x)
    raise ValueError(provider)


def _run_stats(benchmark, provider, case, device):
    n, d, k = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device)
    indices = torch.randint(0, k, (n,), generator=gen).to(device)
    fn = _stats_fn(provider, x, indices, k)
    torch.testing.assert_close(fn(), fastlatent.reference.code_stats(x, indices, k)[1], rtol=1e-4, atol=1e-3)
    benchmark.extra_info.update(device=device_name(device), torch=torch.__version__, n=n, d=d, k=k,
                                bytes_moved=4 * (n * d + n * 2 + k * d))
    benchmark.pedantic(timed(fn, device), rounds=5, warmup_rounds=1)
    benchmark.extra_info["gb_per_s"] = benchmark.extra_info["bytes_moved"] / benchmark.stats.stats.min / 1e9


@pytest.mark.parametrize("provider", ["fastlatent", "onehot_matmul", "index_add"])
@pytest.mark.parametrize("case", STATS_CASES)
def test_code_stats_cpu(benchmark, provider, case):
    benchmark.group = f"code_stats cpu {case}"
    _run_stats(benchmark, provider, case, torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastlatent", "onehot_matmul", "index_add"])
@pytest.mark.parametrize("case", [(1048576, 256, 16384), (262144, 64, 1024)])
def test_code_stats_cuda(benchmark, provider, case):
    if provider == "onehot_matmul" and case[0] * case[2] > 2**31:
        pytest.skip("the one-hot matrix alone would not fit")
    benchmark.group = f"code_stats cuda {case}"
    _run_stats(benchmark, provider, case, torch.device("cuda"))
