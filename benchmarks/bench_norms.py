"""Norms and blocks: fused GroupNorm + SiLU at SD-VAE shapes, and the VAE's resnet and attention blocks.

- ``group_norm(x, w, b, 32, eps, "silu")`` against the float64 reference (eager and compiled) and
  the plain-PyTorch ``F.silu(F.group_norm(...))`` eager and compiled, at the GroupNorm inputs of
  Stable Diffusion's VAE decoder and encoder at 256, 512 and 1024 px (from ``sd_vae_norm_shapes``),
  forward and forward + backward, NCHW and channels-last. CPU bar: 2x eager at 4x256x64x64 (fp32);
  fp16/bf16 on the CPU against eager PyTorch in the same dtype.
  CUDA (bf16): 3x eager, 1.2x compiled, a large fraction of HBM bandwidth.
- ``fastlatent.patch``-ed diffusers ``ResnetBlock2D`` and VAE mid-block ``Attention`` against
  diffusers' own (eager and compiled), inference, SD-VAE widths.

``bytes_moved`` is the least traffic any implementation needs (forward: read x, write y; backward:
read x and dy, write dx).
"""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import SD_VAE, peer, providers, relative_error, sd_vae_norm_shapes

import fastlatent
from fastlatent import reference

BENCH_AREA = "norms"
GROUPS, EPS = SD_VAE["norm_num_groups"], 1e-6
CPU = torch.device("cpu")
CUDA = torch.device("cuda") if torch.cuda.is_available() else None
NORM_PROVIDERS = providers(
    "fastlatent",
    "reference",
    "reference_compiled",
    "torch",
    "torch_compiled",
    full_only=("reference_compiled",),
)


def _sd_layers(part, resolution, scales=None):
    """(label, shape, sizes) of SD-VAE GroupNorm inputs, batch 1; ``scales`` picks layers by
    side/resolution."""
    out = []
    for c, h, w in sd_vae_norm_shapes(resolution, part):
        down = resolution // h
        if scales is None or (c, down) in scales:
            out.append(
                (
                    f"SD-VAE {part} {resolution}px {c}x{h}x{w}",
                    (1, c, h, w),
                    {"resolution": resolution, "channels": c, "downsample": down, "batch": 1, "part": part},
                )
            )
    return out


def _slug(label):
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def _norm_params(cases, full=False, layouts=("nchw",), directions=("fwd",)):
    marks = [pytest.mark.full] if full else []
    return [
        pytest.param(
            (label, shape, sizes, layout, direction), marks=marks, id=f"{_slug(label)}-{layout}-{direction}"
        )
        for label, shape, sizes in cases
        for layout in layouts
        for direction in directions
    ]


_HEADLINE = [("4x256x64x64 (issue bar)", (4, 256, 64, 64), {"batch": 4, "channels": 256, "side": 64})]
# quick: two decoder layers at 256 px (512 ch at 1/4 and 128 ch at full resolution)
_QUICK_LAYERS = _sd_layers("decoder", 256, {(512, 4), (128, 1)})
NORM_CPU = (
    _norm_params(_HEADLINE, directions=("fwd", "fwd_bwd"))
    + _norm_params(_QUICK_LAYERS)
    + _norm_params(_HEADLINE, full=True, layouts=("channels_last",), directions=("fwd", "fwd_bwd"))
    + _norm_params(_QUICK_LAYERS, full=True, directions=("fwd_bwd",))
    + _norm_params(
        [c for r in (256, 512, 1024) for c in _sd_layers("decoder", r) if c not in _QUICK_LAYERS], full=True
    )
    + _norm_params([c for r in (256, 512, 1024) for c in _sd_layers("encoder", r)], full=True)
    + _norm_params(
        [("64x512x8x8 (many small maps)", (64, 512, 8, 8), {"batch": 64, "channels": 512, "side": 8})],
        full=True,
        directions=("fwd", "fwd_bwd"),
    )
)
# fp16/bf16 on the CPU against eager PyTorch in the same dtype (the CPU's 16-bit conversions)
HALF_PROVIDERS = providers("fastlatent", "torch", "torch_compiled", full_only=("torch_compiled",))
NORM_CPU_HALF = _norm_params(
    _HEADLINE + _sd_layers("decoder", 256, {(512, 4)}), directions=("fwd", "fwd_bwd")
) + _norm_params(_HEADLINE, full=True, layouts=("channels_last",), directions=("fwd", "fwd_bwd"))
NORM_CUDA = _norm_params(
    [c for r in (512, 1024) for c in _sd_layers("decoder", r)], directions=("fwd", "fwd_bwd")
) + _norm_params(
    [("16x512x128x128 (target)", (16, 512, 128, 128), {"batch": 16, "channels": 512, "side": 128})],
    layouts=("nchw", "channels_last"),
    directions=("fwd", "fwd_bwd"),
)


def _torch_group_norm_silu(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b, EPS))


def _reference_group_norm_silu(x, w, b):
    return reference.group_norm(x, w, b, GROUPS, EPS, "silu")


def _run_norm(bench, provider, case, device, dtype):
    label, shape, sizes, layout, direction = case
    backward = direction == "fwd_bwd"
    bench.describe(
        op="group_norm+silu " + ("fwd+bwd" if backward else "fwd"),
        case=f"{label} {layout}",
        provider=provider,
        device=device,
        dtype=dtype,
        sizes={**sizes, "layout": layout},
    )
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(shape[1], generator=gen) + 0.5).to(device, dtype)
    b = torch.randn(shape[1], generator=gen).to(device, dtype)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    if backward:
        for t in (x, w, b):
            t.requires_grad_()

    def make_step(fn):
        if backward:
            return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), dy)
        return lambda: fn(x, w, b)

    eager = {
        "fastlatent": lambda x, w, b: fastlatent.group_norm(x, w, b, GROUPS, EPS, "silu"),
        "reference": _reference_group_norm_silu,
        "reference_compiled": _reference_group_norm_silu,
        "torch": _torch_group_norm_silu,
        "torch_compiled": _torch_group_norm_silu,
    }[provider]
    if provider.endswith("_compiled"):
        eager = bench.compile(eager, warm=lambda f: make_step(f)())
    step = make_step(eager)
    with torch.set_grad_enabled(backward):
        got = step()
    # against the float64 reference: fp32 within 1e-4, half types within their rounding
    want = _expected(case, device, dtype, x, w, b, dy)
    got = got[0] if backward else got
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = relative_error(got.float(), want)
    assert err <= tol, f"{provider}: relative error {err:.2e} > {tol:g}"
    numel = x.numel()

    def timed_step():
        with torch.set_grad_enabled(backward):
            return step()

    bench.run(timed_step, bytes_moved=(5 if backward else 2) * numel * x.element_size())


_EXPECTED = {}


def _expected(case, device, dtype, x, w, b, dy):
    """The float64 output (or dx) of a case, computed once for all its providers (only the last case kept)."""
    label, shape, _, layout, direction = case
    key = (label, shape, layout, direction, device.type, dtype)
    if key not in _EXPECTED:
        _EXPECTED.clear()
        backward = direction == "fwd_bwd"
        x64 = x.detach().double().requires_grad_(backward)
        want = _reference_group_norm_silu(x64, w.detach().double(), b.detach().double())
        _EXPECTED[key] = torch.autograd.grad(want, x64, dy.double())[0] if backward else want.detach()
    return _EXPECTED[key]


@pytest.mark.parametrize("provider", NORM_PROVIDERS)
@pytest.mark.parametrize("case", NORM_CPU)
def test_group_norm_silu_cpu(bench, provider, case):
    _run_norm(bench, provider, case, CPU, torch.float32)


@pytest.mark.parametrize("provider", HALF_PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", NORM_CPU_HALF)
def test_group_norm_silu_cpu_half(bench, provider, case, dtype):
    _run_norm(bench, provider, case, CPU, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastlatent", "torch", "torch_compiled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", NORM_CUDA)
def test_group_norm_silu_cuda(bench, provider, case, dtype):
    _run_norm(bench, provider, case, CUDA, dtype)


# ------------------------------------------------------------------------------------------ blocks

BLOCK_PROVIDERS = ["fastlatent", "diffusers", "diffusers_compiled"]


def _mid_block(channels, device, dtype):
    diffusers = peer("diffusers", "diffusers")  # noqa: F841 (the import below needs it)
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

    torch.manual_seed(0)
    block = UNetMidBlock2D(
        in_channels=channels,
        temb_channels=None,
        resnet_eps=1e-6,
        resnet_groups=GROUPS,
        attention_head_dim=channels,
        add_attention=True,
    )
    return block.to(device, dtype).eval()


def _run_block(bench, provider, kind, channels, side, device, dtype, resolution):
    bench.describe(
        op=f"SD-VAE {kind} block",
        case=f"{channels}x{side}x{side} ({resolution}px)",
        provider=provider,
        device=device,
        dtype=dtype,
        sizes={"resolution": resolution, "channels": channels, "side": side},
    )
    mid = _mid_block(channels, device, dtype)
    block = mid.resnets[0] if kind == "resnet" else mid.attentions[0]
    call = (lambda m, x: m(x, None)) if kind == "resnet" else (lambda m, x: m(x))
    x = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with torch.inference_mode():
        want = call(block, x)
    if provider == "fastlatent":
        module = fastlatent.patch(copy.deepcopy(block), report=False)
        assert type(module).__module__.startswith("fastlatent"), f"patch left a {type(module).__name__}"
        fn = lambda: call(module, x)  # noqa: E731
    elif provider == "diffusers":
        fn = lambda: call(block, x)  # noqa: E731
    else:

        def warm(f):
            with torch.inference_mode():
                return f(x)

        compiled = bench.compile(lambda x: call(block, x), warm=warm)
        fn = lambda: compiled(x)  # noqa: E731

    def step():
        with torch.inference_mode():
            return fn()

    err = relative_error(step(), want)
    assert err <= (1e-4 if dtype == torch.float32 else 5e-2), f"{provider}: relative error {err:.2e}"
    bench.note(relative_error_vs_diffusers=err)
    bench.run(step)


BLOCK_CPU = [
    pytest.param(("resnet", 512, 32, 256), id="resnet_512x32x32"),  # decoder mid block, 256 px
    pytest.param(("attention", 512, 32, 256), id="attention_512x32x32"),
    pytest.param(("resnet", 512, 64, 512), id="resnet_512x64x64", marks=pytest.mark.full),
    pytest.param(("attention", 512, 64, 512), id="attention_512x64x64", marks=pytest.mark.full),
    pytest.param(("resnet", 256, 128, 256), id="resnet_256x128x128", marks=pytest.mark.full),  # up block 2
    pytest.param(("resnet", 128, 256, 256), id="resnet_128x256x256", marks=pytest.mark.full),  # up block 3
]


@pytest.mark.parametrize("provider", BLOCK_PROVIDERS)
@pytest.mark.parametrize("case", BLOCK_CPU)
def test_vae_block_cpu(bench, provider, case):
    kind, channels, side, resolution = case
    _run_block(bench, provider, kind, channels, side, CPU, torch.float32, resolution)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", BLOCK_PROVIDERS)
@pytest.mark.parametrize(
    "case",
    [("resnet", 512, 128, 1024), ("attention", 512, 128, 1024), ("resnet", 128, 1024, 1024)],
    ids=lambda c: f"{c[0]}_{c[1]}x{c[2]}x{c[2]}",
)
def test_vae_block_cuda(bench, provider, case):
    kind, channels, side, resolution = case
    _run_block(bench, provider, kind, channels, side, CUDA, torch.bfloat16, resolution)
