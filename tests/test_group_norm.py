"""group_norm semantics: exact statistics, gradients, layouts, determinism, edge cases."""

import pytest
import torch
import torch.nn.functional as F

from fastlatent import ops, reference


def _channels_last(x):
    return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


@pytest.mark.parametrize("layout", ["first", "last"])
def test_statistics_stay_exact_for_a_large_mean(device, layout):
    # |mean| / std = 300: a sum-of-squares variance in fp32 loses most digits here.
    x = torch.randn(2, 32, 9, 11, device=device) * 0.5 + 150.0
    if layout == "last":
        x = _channels_last(x)
    w, b = torch.randn(32, device=device), torch.randn(32, device=device)
    ours = ops.group_norm(x, w, b, 8, 1e-6, "silu")
    exact = reference.group_norm(x.double(), w.double(), b.double(), 8, 1e-6, "silu")
    # The floor is the fp32 input itself: ulp(150) / std * max|w| is about 1e-4. (torch's fp32
    # channels-last GroupNorm is off by 0.12 on this input.)
    assert (ours.double() - exact).abs().max().item() < 3e-4


@pytest.mark.parametrize("activation", ["none", "silu", "gelu"])
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(activation, layout, affine):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64) * 2 + 1
    if layout == "last":
        x = _channels_last(x)
    x.requires_grad_()
    w = torch.randn(6, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(6, dtype=torch.float64, requires_grad=True) if affine else None
    r = torch.randn(2, 6, 3, 5, dtype=torch.float64, requires_grad=True)
    inputs = (x, w, b, r) if affine else (x, r)

    def fn(*args):
        if affine:
            x_, w_, b_, r_ = args
        else:
            (x_, r_), w_, b_ = args, None, None
        return ops.group_norm(x_, w_, b_, 3, 1e-5, activation, r_)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["first", "last"])
def test_gradients_match_the_reference(device, dtype, layout):
    torch.manual_seed(1)
    x = (torch.randn(3, 16, 6, 7, device=device) * 2 + 1).to(dtype)
    if layout == "last":
        x = _channels_last(x)
    w = torch.randn(16, device=device)
    b = torch.randn(16, device=device)
    grad = torch.randn(3, 16, 6, 7, device=device).to(dtype)
    got = [t.clone().requires_grad_() for t in (x, w, b)]
    ops.group_norm(got[0], got[1], got[2], 4, 1e-5, "silu").backward(grad)
    want = [t.detach().double().requires_grad_() for t in (x, w, b)]
    F.silu(F.group_norm(want[0], 4, want[1], want[2], 1e-5)).backward(grad.double())
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for g, r in zip(got, want):
        torch.testing.assert_close(g.grad.double(), r.grad, rtol=tol, atol=tol)
    assert got[0].grad.is_contiguous(memory_format=torch.channels_last) == (layout == "last")


def test_fp16_inputs_near_overflow(device):
    # Squares of these overflow fp16 (max 65504); statistics must not.
    x = (torch.randn(2, 8, 16, 16, device=device) * 2000 + 30000).half()
    out = ops.group_norm(x, None, None, 2, 1e-5, "silu")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out.float(), reference.group_norm(x, None, None, 2, 1e-5, "silu").float(), rtol=4e-3, atol=4e-3
    )


def test_channels_last_in_channels_last_out(device):
    x = _channels_last(torch.randn(2, 8, 5, 6, device=device))
    out = ops.group_norm(x, None, None, 2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ops.group_norm(x.contiguous(), None, None, 2))


def test_empty_batch_and_gradients(device):
    x = torch.randn(0, 8, 4, 4, device=device, requires_grad=True)
    w = torch.ones(8, device=device, requires_grad=True)
    out = ops.group_norm(x, w, None, 4, 1e-5, "silu")
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(8, device=device))


def test_result_does_not_depend_on_thread_count():
    x = torch.randn(2, 64, 32, 32) * 3 + 1
    w, b = torch.randn(64), torch.randn(64)
    first = ops.group_norm(x, w, b, 32, 1e-5, "gelu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.group_norm(x, w, b, 32, 1e-5, "gelu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)


def test_compiles_with_backward(device):
    torch._dynamo.reset()
    x = torch.randn(2, 8, 6, 6, device=device, requires_grad=True)
    w = torch.randn(8, device=device, requires_grad=True)

    def block(x, w):
        return ops.group_norm(x, w, None, 4, 1e-5, "silu").square().mean()

    loss = torch.compile(block, fullgraph=True)(x, w)
    loss.backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    block(x2, w2).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape, groups",
    [
        ((1, 512, 64, 64), 32),
        ((64, 512, 8, 8), 32),
        ((2, 128, 100, 98), 32),
        ((3, 12, 1000), 3),
        ((1, 64, 4, 30, 30), 16),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["first", "last"])
def test_cuda_matches_cpu(shape, groups, dtype, layout):
    torch.manual_seed(2)
    x = (torch.randn(shape) * 3 + 5).to(dtype)
    if layout == "last":
        x = _channels_last(x)
    w, b, r = torch.randn(shape[1]), torch.randn(shape[1]), torch.randn(shape).to(dtype)
    grad = torch.randn(shape).to(dtype)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    outs = []
    for device in ("cpu", "cuda"):
        xs = x.to(device).requires_grad_()
        ws = w.to(device).requires_grad_()
        out = ops.group_norm(xs, ws, b.to(device), groups, 1e-5, "silu", r.to(device))
        out.backward(grad.to(device))
        outs.append([out.cpu().float(), xs.grad.cpu().float(), ws.grad.cpu()])
    for cpu, gpu in zip(*outs):
        torch.testing.assert_close(gpu, cpu, rtol=tol, atol=tol)


# ---------------------------------------------------------------- group_norm_stats / group_norm_apply


@pytest.mark.parametrize("layout", ["first", "last"])
def test_stats_then_apply_equals_the_fused_forward(device, layout):
    x = torch.randn(2, 32, 9, 11, device=device) * 2 + 3
    if layout == "last":
        x = _channels_last(x)
    w, b = torch.randn(32, device=device), torch.randn(32, device=device)
    mean, m2 = ops.group_norm_stats(x, 8)
    rstd = torch.rsqrt(m2.double() / (4 * 9 * 11) + 1e-6).float()
    out = ops.group_norm_apply(x, mean, rstd, w, b, "silu")
    torch.testing.assert_close(out, ops.group_norm(x, w, b, 8, 1e-6, "silu"), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "last")


def test_tile_statistics_merge_without_cancellation(device):
    # mean / std = 1e4: summed squares in fp32 (or even fp64 over a large image) cancel; merged (mean, M2)
    # don't
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 8, 96, 80, generator=gen, dtype=torch.float64) * 0.01 + 100.0).float().to(device)
    parts, counts = [], []
    for rows in x.split(25, dim=2):
        for tile in rows.split(33, dim=3):
            parts.append(ops.group_norm_stats(tile, 2))
            counts.append(4 * tile.shape[2] * tile.shape[3])
    mean, m2, count = ops.merge_group_stats(parts, counts)
    exact = x.double().reshape(1, 2, -1)
    assert count == exact.shape[-1]
    # each part's mean is rounded to fp32 (half an ulp of 100 is 4e-6), as the fused op's is
    torch.testing.assert_close(mean.cpu(), exact.mean(-1).cpu(), rtol=0, atol=4e-6)
    torch.testing.assert_close((m2 / count).cpu(), exact.var(-1, unbiased=False).cpu(), rtol=1e-5, atol=0)


def test_merge_group_stats_skips_empty_parts_and_rejects_none():
    x = torch.randn(2, 4, 5, 6)
    whole = ops.group_norm_stats(x, 2)
    empty = ops.group_norm_stats(x[..., :0], 2)
    mean, m2, count = ops.merge_group_stats([empty, whole], [0, 2 * 30])
    torch.testing.assert_close(mean.float(), whole[0])
    with pytest.raises(ValueError, match="no part with a nonzero count"):
        ops.merge_group_stats([empty], [0])


@pytest.mark.parametrize("activation", ["none", "silu", "gelu"])
def test_gradcheck_stats_and_apply_float64(activation):
    torch.manual_seed(0)
    x = (torch.randn(2, 6, 3, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
    # the statistics are fp32 outputs (too coarse for finite differences): their gradient against float64
    # autograd
    a, b_ = torch.randn(2, 3), torch.randn(2, 3)
    mean, m2 = ops.group_norm_stats(x, 3)
    (grad,) = torch.autograd.grad((mean * a).sum() + (m2 * b_).sum(), x)
    xg = x.reshape(2, 3, -1)
    ref_mean = xg.mean(-1)
    ref_m2 = ((xg - ref_mean[..., None]) ** 2).sum(-1)
    (ref_grad,) = torch.autograd.grad((ref_mean * a).sum() + (ref_m2 * b_).sum(), x)
    torch.testing.assert_close(grad, ref_grad)
    mean = torch.randn(2, 3, dtype=torch.float32)
    rstd = torch.rand(2, 3, dtype=torch.float32) + 0.5
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, w_, b_: ops.group_norm_apply(t, mean, rstd, w_, b_, activation), (x, w, b)
    )


@pytest.mark.parametrize("activation", ["none", "silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape, groups, layout",
    [((2, 24, 37, 29), 6, "first"), ((1, 1040, 3, 5), 8, "last")],
    ids=["first", "last"],
)
def test_half_types_are_the_fp32_result_rounded_to_nearest_even(shape, groups, layout, dtype, activation):
    # The CPU kernels convert 16-bit values in blocks (hardware F16C where built with it, branch-free code
    # elsewhere): given the same statistics, the fp16/bf16 output is the fp32 kernel's output rounded once,
    # bit for bit, across block tails (37 * 29 = 2 * 512 + 49 positions, 1040 = 2 * 512 + 16 channels),
    # subnormal results and fp16 overflow to Inf (the large weights).
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    if layout == "last":
        x = _channels_last(x)
    c = shape[1]
    w = torch.randn(c, generator=gen) * torch.where(torch.arange(c) % 5 == 0, 3e4, 1.0)
    b = torch.randn(c, generator=gen) * 1e-3
    mean, m2 = ops.group_norm_stats(x, groups)
    rstd = torch.rsqrt(m2.double() / (x.numel() // (shape[0] * groups)) + 1e-6).float()
    ours = ops.group_norm_apply(x, mean, rstd, w, b, activation)
    want = ops.group_norm_apply(x.float(), mean, rstd, w, b, activation).to(dtype)
    if dtype == torch.float16:
        # the cases are there: overflow to Inf and subnormal results
        assert want.isinf().any() and (want.abs() < 6.1e-5).logical_and(want != 0).any()
    assert ours.is_contiguous(memory_format=torch.channels_last) == (layout == "last")
    assert torch.equal(ours.view(torch.int16), want.view(torch.int16))
