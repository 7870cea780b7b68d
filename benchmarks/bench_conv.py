"""GroupNorm + SiLU + 3x3 convolution (+ residual), the SD-VAE decoder's resnet half-block.

Providers, side by side:

- ``fastlatent``: ``group_norm_conv3x3`` with ``algorithm="auto"``: on CUDA fp16/bf16 the fused
  implicit-GEMM kernel (the normalised activation never reaches memory), elsewhere the unfused path;
- ``fastlatent_unfused``: the fused GroupNorm kernel, then the library convolution (cuDNN / oneDNN);
- ``torch``: ``F.conv2d(F.silu(F.group_norm(x)))`` eager, and ``torch_compiled``: the same compiled.

The ratio fastlatent / fastlatent_unfused is what decides ``fastlatent.nn.set_fused_conv``: where the
fused kernel does not beat GroupNorm followed by cuDNN, the unfused path is the one to keep.
``flops`` counts the convolution's multiply-adds (2 per MAC); ``bytes_moved`` reads x, the weights and
the residual and writes the output once.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import SD_VAE, providers, relative_error

from fastlatent import ops, reference

BENCH_AREA = "norms"
GROUPS, EPS = SD_VAE["norm_num_groups"], 1e-6
CPU = torch.device("cpu")
CUDA = torch.device("cuda") if torch.cuda.is_available() else None
PROVIDERS = ["fastlatent", "fastlatent_unfused", "torch", "torch_compiled"]


def _case(label, channels, side, resolution, residual=False, full=False):
    marks = [pytest.mark.full] if full else []
    return pytest.param(
        (
            label,
            (1, channels, side, side),
            channels,
            residual,
            {"resolution": resolution, "channels": channels, "side": side},
        ),
        marks=marks,
        id=f"{channels}x{side}x{side}{'_res' if residual else ''}",
    )


CONV_CPU = [
    _case("SD-VAE decoder 256px up block 3", 128, 64, 256),
    _case("SD-VAE decoder 256px mid block, conv2 + residual", 512, 32, 256, residual=True, full=True),
]
# the decoder's convolutions at 1024 px, widest first, and a 512 px one
CONV_CUDA = [
    _case("SD-VAE decoder 1024px mid block", 512, 128, 1024),
    _case("SD-VAE decoder 1024px mid block, conv2 + residual", 512, 128, 1024, residual=True),
    _case("SD-VAE decoder 1024px up block 1", 512, 256, 1024),
    _case("SD-VAE decoder 1024px up block 2", 256, 512, 1024),
    _case("SD-VAE decoder 1024px up block 3", 128, 1024, 1024),
    _case("SD-VAE decoder 512px up block 2", 256, 256, 512),
]


def _torch_block(x, gw, gb, w, b, r):
    out = F.conv2d(F.silu(F.group_norm(x, GROUPS, gw, gb, EPS)), w, b, padding=1)
    return out if r is None else out + r


def _run(bench, provider, case, device, dtype):
    label, shape, cout, with_residual, sizes = case
    bench.describe(
        op="group_norm+silu+conv3x3", case=label, provider=provider, device=device, dtype=dtype, sizes=sizes
    )
    gen = torch.Generator().manual_seed(0)
    n, cin, h, w = shape
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype)
    gw = (torch.rand(cin, generator=gen) + 0.5).to(device, dtype)
    gb = torch.randn(cin, generator=gen).to(device, dtype)
    cw = (torch.randn(cout, cin, 3, 3, generator=gen) / (9 * cin) ** 0.5).to(device, dtype)
    cb = torch.randn(cout, generator=gen).to(device, dtype)
    r = torch.randn(n, cout, h, w, generator=gen).to(device, dtype) if with_residual else None
    if provider in ("fastlatent", "fastlatent_unfused"):
        algorithm = "auto" if provider == "fastlatent" else "unfused"

        def fn():
            return ops.group_norm_conv3x3(
                x, gw, gb, GROUPS, cw, cb, eps=EPS, activation="silu", residual=r, algorithm=algorithm
            )
    elif provider == "torch":

        def fn():
            return _torch_block(x, gw, gb, cw, cb, r)
    else:
        compiled = bench.compile(_torch_block, warm=lambda f: f(x, gw, gb, cw, cb, r))

        def fn():
            return compiled(x, gw, gb, cw, cb, r)

    def step():
        with torch.inference_mode():
            return fn()

    want = reference.group_norm_conv3x3(x, gw, gb, GROUPS, cw, cb, eps=EPS, activation="silu", residual=r)
    err = relative_error(step(), want)
    assert err <= (1e-4 if dtype == torch.float32 else 4e-2), f"{provider}: relative error {err:.2e}"
    bench.note(
        relative_error=err,
        fused=provider == "fastlatent" and device.type == "cuda" and dtype != torch.float32,
    )
    traffic = (x.numel() + cw.numel() + n * cout * h * w * (2 if with_residual else 1)) * x.element_size()
    bench.run(step, bytes_moved=traffic, flops=2 * n * h * w * cout * cin * 9)


@pytest.mark.parametrize("provider", providers(*PROVIDERS, full_only=("torch_compiled",)))
@pytest.mark.parametrize("case", CONV_CPU)
def test_group_norm_conv_cpu(bench, provider, case):
    _run(bench, provider, case, CPU, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CONV_CUDA)
def test_group_norm_conv_cuda(bench, provider, case, dtype):
    _run(bench, provider, case, CUDA, dtype)
