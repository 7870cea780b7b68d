"""group_norm_conv3x3: the unfused path's wiring, gradients, and (on a GPU) the fused tensor-core kernel
against the float64 reference and the unfused path over decoder-like and awkward shapes."""

import pytest
import torch
import torch.nn.functional as F

from fastlatent import ops, reference

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(n, cin, h, w, cout, device="cpu", dtype=torch.float32, seed=0, scale=2.0, offset=0.5):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, cin, h, w, generator=gen) * scale + offset).to(device, dtype)
    gn_weight = (torch.rand(cin, generator=gen) + 0.5).to(device)
    gn_bias = torch.randn(cin, generator=gen).to(device)
    conv_weight = (torch.randn(cout, cin, 3, 3, generator=gen) / (9 * cin) ** 0.5).to(device, dtype)
    conv_bias = torch.randn(cout, generator=gen).to(device, dtype)
    residual = torch.randn(n, cout, h, w, generator=gen).to(device, dtype)
    return x, gn_weight, gn_bias, conv_weight, conv_bias, residual


def _relative_error(ours, ref):
    ref = ref.double()
    return ((ours.double() - ref).abs().max() / (ref.abs().max() + 1.0)).item()


@pytest.mark.parametrize("activation", ["none", "silu", "gelu"])
def test_cpu_equals_group_norm_then_conv2d(activation):
    x, gw, gb, w, b, r = _inputs(2, 32, 9, 11, 24)
    ours = ops.group_norm_conv3x3(x, gw, gb, 8, w, b, eps=1e-6, activation=activation, residual=r)
    composed = F.conv2d(ops.group_norm(x, gw, gb, 8, 1e-6, activation), w, b, padding=1) + r
    torch.testing.assert_close(ours, composed, rtol=0, atol=1e-6)


def test_channels_last_in_channels_last_out():
    x, gw, gb, w, b, _ = _inputs(1, 16, 6, 7, 8)
    out = ops.group_norm_conv3x3(x.to(memory_format=torch.channels_last), gw, gb, 4, w, b)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference.group_norm_conv3x3(x, gw, gb, 4, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gradcheck_float64(activation):
    torch.manual_seed(0)
    x = (torch.randn(2, 6, 4, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
    gw = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    gb = torch.randn(6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 5, 4, 5, dtype=torch.float64, requires_grad=True)

    def fn(x_, gw_, gb_, w_, b_, r_):
        return ops.group_norm_conv3x3(x_, gw_, gb_, 3, w_, b_, activation=activation, residual=r_)

    assert torch.autograd.gradcheck(fn, (x, gw, gb, w, b, r))


def test_empty_batch_and_image():
    for shape in ((0, 8, 4, 4), (2, 8, 0, 5)):
        x = torch.randn(shape)
        out = ops.group_norm_conv3x3(x, None, None, 2, torch.randn(3, 8, 3, 3))
        assert out.shape == (shape[0], 3, shape[2], shape[3])


# ------------------------------------------------------------------------------------------ CUDA

CUDA_SHAPES = [
    # (N, C_in, H, W, C_out, groups): SD-VAE decoder blocks at reduced size, tails of every tile,
    # 1-pixel images, more than 48 KB of shared memory (C_in 2048), C_out over one 128-channel tile
    (1, 512, 32, 32, 512, 32),
    (2, 128, 64, 64, 128, 32),
    (1, 256, 48, 40, 128, 32),
    (1, 128, 64, 64, 3, 32),
    (3, 40, 7, 9, 24, 8),
    (1, 8, 1, 1, 130, 8),
    (2, 64, 17, 33, 16, 1),
    (1, 2048, 8, 8, 64, 32),
    (1, 96, 100, 3, 256, 96),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_matches_reference_and_unfused(shape, dtype):
    n, cin, h, w, cout, groups = shape
    x, gw, gb, cw, cb, r = _inputs(n, cin, h, w, cout, "cuda", dtype, seed=cin + h)
    for activation in ("silu", "gelu", "none"):
        fused = ops.group_norm_conv3x3(
            x, gw, gb, groups, cw, cb, eps=1e-6, activation=activation, residual=r, algorithm="fused"
        )
        unfused = ops.group_norm_conv3x3(
            x, gw, gb, groups, cw, cb, eps=1e-6, activation=activation, residual=r, algorithm="unfused"
        )
        ref = reference.group_norm_conv3x3(
            x, gw, gb, groups, cw, cb, eps=1e-6, activation=activation, residual=r
        )
        tol = 1e-2 if dtype == torch.float16 else 4e-2
        assert _relative_error(fused, ref) <= tol, activation
        # both round the activation to the storage dtype once; the fused kernel rounds the output once
        assert _relative_error(fused, unfused) <= tol, activation


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["channels_last", "strided", "channels_last_residual"])
def test_fused_reads_and_writes_any_strides(layout):
    x, gw, gb, cw, cb, r = _inputs(2, 64, 20, 24, 96, "cuda", torch.bfloat16, seed=3)
    ref = reference.group_norm_conv3x3(x, gw, gb, 16, cw, cb, residual=r)
    if layout == "channels_last":
        x_in, r_in = x.to(memory_format=torch.channels_last), r
    elif layout == "strided":
        x_in, r_in = torch.stack([x, x], dim=-1)[..., 0], torch.stack([r, r], dim=-1)[..., 0]
    else:
        x_in, r_in = x, r.to(memory_format=torch.channels_last)
    out = ops.group_norm_conv3x3(x_in, gw, gb, 16, cw, cb, residual=r_in, algorithm="fused")
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert _relative_error(out, ref) <= 4e-2


@pytest.mark.cuda
def test_fused_is_deterministic_and_handles_large_means():
    # fp16 inputs near the top of their range: the statistics and the normalisation stay in fp32
    x, gw, gb, cw, cb, _ = _inputs(
        1, 128, 33, 47, 128, "cuda", torch.float16, seed=5, scale=300.0, offset=20000.0
    )
    first = ops.group_norm_conv3x3(x, gw, gb, 32, cw, cb, algorithm="fused")
    second = ops.group_norm_conv3x3(x, gw, gb, 32, cw, cb, algorithm="fused")
    assert torch.equal(first, second)
    assert torch.isfinite(first).all()
    assert _relative_error(first, reference.group_norm_conv3x3(x, gw, gb, 32, cw, cb)) <= 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_normalises_off_centre_inputs_without_cancellation(dtype):
    # x = offset + ulp * j, j in -2..2 equally often in every group: |mean| / std is ~700 (fp16) or ~90
    # (bf16), as far off centre as the dtype can hold a spread, and the elements with j = 0 sit on the
    # mean. With an identity 3x3 conv (centre tap) the output is the activation rounded once to the
    # dtype. x * scale + (shift - mean * scale) is off there by the rounding of mean * scale (~1e-5,
    # thousands of ulps of a near-zero activation); (x - mean) * scale + shift is exact.
    offset, ulp = (2.0**14, 16.0) if dtype == torch.float16 else (2.0**15, 256.0)
    n, c, h, w, groups = 2, 64, 10, 20, 8
    per_group = (c // groups) * h * w
    gen = torch.Generator().manual_seed(11)
    j = torch.arange(per_group) % 5 - 2
    j = torch.stack([j[torch.randperm(per_group, generator=gen)] for _ in range(n * groups)])
    x = (offset + ulp * j.double()).reshape(n, c, h, w).to("cuda", dtype)
    gn_weight = (torch.rand(c, generator=gen) + 0.5).cuda()
    conv_weight = torch.zeros(c, c, 3, 3, dtype=dtype, device="cuda")
    conv_weight[torch.arange(c), torch.arange(c), 1, 1] = 1
    fused = ops.group_norm_conv3x3(x, gn_weight, None, groups, conv_weight, algorithm="fused")
    unfused = ops.group_norm_conv3x3(x, gn_weight, None, groups, conv_weight, algorithm="unfused")
    # The activation in float64 from the statistics the fused kernel reads, rounded once.
    mean, m2 = ops.group_norm_stats(x, groups)
    rstd = (m2.double() / per_group + 1e-5).rsqrt()

    def per_channel(t):
        return t.repeat_interleave(c // groups, dim=1)[..., None, None]

    exact = (x.double() - per_channel(mean.double())) * per_channel(rstd) * gn_weight.double()[:, None, None]
    exact = exact.to(dtype)
    one_ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    torch.testing.assert_close(fused, exact, rtol=one_ulp, atol=1e-7)
    # Both read the same statistics kernels' mean: the same value, rounded once.
    torch.testing.assert_close(fused, unfused, rtol=one_ulp, atol=1e-7)


@pytest.mark.cuda
def test_fused_refuses_what_it_cannot_run():
    x, gw, gb, cw, cb, _ = _inputs(1, 16, 8, 8, 8, "cuda", torch.float32)
    with pytest.raises(ValueError, match=r'algorithm="fused": x must be float16 or bfloat16'):
        ops.group_norm_conv3x3(x, gw, gb, 4, cw, cb, algorithm="fused")
    # "auto" runs it unfused
    out = ops.group_norm_conv3x3(x, gw, gb, 4, cw, cb)
    assert _relative_error(out, reference.group_norm_conv3x3(x, gw, gb, 4, cw, cb)) <= 1e-4


@pytest.mark.cuda
def test_fused_under_cuda_graph_capture_and_compile():
    x, gw, gb, cw, cb, r = _inputs(1, 64, 16, 16, 64, "cuda", torch.bfloat16, seed=7)
    eager = ops.group_norm_conv3x3(x, gw, gb, 16, cw, cb, residual=r, algorithm="fused")
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    ops.group_norm_conv3x3(
        static_x, gw, gb, 16, cw, cb, residual=r, algorithm="fused"
    )  # warm-up outside capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = ops.group_norm_conv3x3(static_x, gw, gb, 16, cw, cb, residual=r, algorithm="fused")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda t: ops.group_norm_conv3x3(t, gw, gb, 16, cw, cb, residual=r, algorithm="fused"), fullgraph=True
    )
    assert torch.equal(compiled(x), eager)
