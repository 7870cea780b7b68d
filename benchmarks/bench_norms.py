"""Fused GroupNorm + SiLU against eager and compiled PyTorch, and patched against unpatched VAE decodes.

- ``group_norm(x, w, b, G, eps, "silu")`` vs ``F.silu(F.group_norm(...))`` eager and under ``torch.compile``,
  at SD-VAE decoder shapes (G=32), forward and forward+backward, NCHW and channels-last.
  CPU: the issue's bar is 2x eager at 4x256x64x64 (fp32). CUDA (bf16): 3x eager, 1.2x compiled and 80% of
  the 3.35 TB/s of an H100 from 1x512x128x128 to 1x128x1024x1024.
- ``AutoencoderKL.decode`` with and without :func:`fastlatent.patch`: a small SD-structured VAE on the CPU
  (patched must be faster), the SD configuration at 1024x1024 in bf16 on CUDA (1.3x at no higher peak memory).

Times are minima over several rounds: on the CPU each call allocates activation-sized tensors whose first
touch (page faults) makes single timings noisy. ``bytes_moved`` is the least traffic any implementation
needs (forward: read x, write y; backward: read x and dy, write dx); ``gb_per_s`` divides it by the time.
"""

import pytest
import torch
import torch.nn.functional as F

import fastlatent
from conftest import device_name, timed

GROUPS, EPS = 32, 1e-6
H100_BANDWIDTH = 3.35e12

CPU_SHAPES = [
    pytest.param((4, 256, 64, 64), id="4x256x64x64"),
    pytest.param((1, 512, 64, 64), id="1x512x64x64"),
    pytest.param((1, 128, 256, 256), id="1x128x256x256"),
    pytest.param((64, 512, 8, 8), id="64x512x8x8"),
]
CUDA_SHAPES = [(1, 512, 128, 128), (1, 256, 256, 256), (1, 128, 512, 512), (1, 128, 1024, 1024)]
PROVIDERS = ["fastlatent", "eager", "compiled"]


def _eager(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b, EPS))


_compiled = {}


def _fn(provider, shape, dtype, channels_last, backward):
    if provider == "fastlatent":
        return lambda x, w, b: fastlatent.group_norm(x, w, b, GROUPS, EPS, "silu")
    if provider == "eager":
        return _eager
    # one compiled function per case, so that no case pays for another's recompilation
    key = (shape, dtype, channels_last, backward)
    if key not in _compiled:
        _compiled[key] = torch.compile(_eager, dynamic=False)
    return _compiled[key]


def _run_norm(benchmark, provider, shape, dtype, channels_last, backward, device):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(shape[1], generator=gen) + 0.5).to(device, dtype)
    b = torch.randn(shape[1], generator=gen).to(device, dtype)
    fn = _fn(provider, shape, dtype, channels_last, backward)
    atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (3e-2, 2e-2)
    if backward:
        x.requires_grad_()
        w.requires_grad_()
        b.requires_grad_()
        dy = torch.randn(shape, generator=gen).to(device, dtype)

        def step():
            return torch.autograd.grad(fn(x, w, b), (x, w, b), dy)
    else:
        def step():
            with torch.no_grad():
                return fn(x, w, b)

    got = step()
    with torch.no_grad():
        x32 = x.detach().float()
        expected = _eager(x32, w.detach().float(), b.detach().float())
    if backward:
        x32.requires_grad_()
        expected = torch.autograd.grad(_eager(x32, w.detach().float(), b.detach().float()), x32, dy.float())[0]
        got = got[0]
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=rtol)

    numel = x.numel()
    elem = x.element_size()
    moved = (5 if backward else 2) * numel * elem
    benchmark.extra_info.update(device=device_name(device), torch=torch.__version__, shape=list(shape),
                                dtype=str(dtype), channels_last=channels_last, backward=backward,
                                bytes_moved=moved)
    benchmark.pedantic(timed(step, device), rounds=30 if device.type == "cpu" else 50, warmup_rounds=3)
    gbps = moved / benchmark.stats.stats.min / 1e9
    benchmark.extra_info["gb_per_s"] = gbps
    if device.type == "cuda":
        benchmark.extra_info["fraction_of_3.35TB/s"] = gbps * 1e9 / H100_BANDWIDTH


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_group_norm_silu_cpu(benchmark, provider, shape, channels_last, backward):
    benchmark.group = (f"group_norm+silu cpu fp32 {'x'.join(map(str, shape))} "
                       f"{'channels_last' if channels_last else 'nchw'} {'fwd+bwd' if backward else 'fwd'}")
    _run_norm(benchmark, provider, shape, torch.float32, channels_last, backward, torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu_cuda(benchmark, provider, shape, dtype, channels_last, backward):
    benchmark.group = (f"group_norm+silu cuda {dtype} {'x'.join(map(str, shape))} "
                       f"{'channels_last' if channels_last else 'nchw'} {'fwd+bwd' if backward else 'fwd'}")
    _run_norm(benchmark, provider, shape, dtype, channels_last, backward, torch.device("cuda"))


# ------------------------------------------------------------------------------------------ VAE decode

def _vae(block_out_channels, groups, device, dtype):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    torch.manual_seed(0)
    n = len(block_out_channels)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                                  norm_num_groups=groups, down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=block_out_channels)
    return vae.to(device, dtype).eval()


def _run_decode(benchmark, provider, vae, latent, rounds):
    device = latent.device
    with torch.inference_mode():
        expected = vae.decode(latent).sample
        if provider == "fastlatent.patch":
            fastlatent.patch(vae, report=False)
        got = vae.decode(latent).sample
    # random weights: compared relative to the output's size (bf16 through ~30 convolutions)
    tol = 1e-4 if latent.dtype == torch.float32 else 5e-2
    err = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    assert err <= tol, err

    def step():
        with torch.inference_mode():
            return vae.decode(latent).sample

    benchmark.extra_info.update(device=device_name(device), torch=torch.__version__, latent=list(latent.shape),
                                dtype=str(latent.dtype), relative_error_vs_unpatched=err)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    benchmark.pedantic(timed(step, device), rounds=rounds, warmup_rounds=1)
    if device.type == "cuda":
        benchmark.extra_info["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20


@pytest.mark.parametrize("provider", ["diffusers", "fastlatent.patch"])
def test_vae_decode_cpu(benchmark, provider):
    """SD-VAE structure at a quarter of the widths (32, 64, 128, 128), 16 groups, 32x32 latent -> 256x256."""
    benchmark.group = "AutoencoderKL.decode cpu fp32 small SD-structured, 256x256"
    vae = _vae((32, 64, 128, 128), 16, "cpu", torch.float32)
    latent = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    _run_decode(benchmark, provider, vae, latent, rounds=5)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["diffusers", "fastlatent.patch"])
def test_vae_decode_sd_1024_cuda(benchmark, provider):
    """The SD-VAE configuration (128, 256, 512, 512), 32 groups, bf16, 128x128 latent -> 1024x1024."""
    benchmark.group = "AutoencoderKL.decode cuda bf16 SD config, 1024x1024"
    vae = _vae((128, 256, 512, 512), 32, "cuda", torch.bfloat16)
    latent = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0)).to("cuda", torch.bfloat16)
    _run_decode(benchmark, provider, vae, latent, rounds=10)
