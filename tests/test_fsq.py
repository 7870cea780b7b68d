"""fsq_quantize / fsq_indices_to_codes semantics: exactness at rounding boundaries, gradients,
round trips, NaN/Inf, determinism, CUDA parity."""

import math

import pytest
import torch
from opspecs import FSQ_LEVELS

import fastlatent
from fastlatent import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _boundary_inputs(levels, preserve_symmetry, n_per_level=64):
    """z whose float64 bound lies within 1e-7 of a rounding boundary, on both sides."""
    rows = []
    for i, L in enumerate(levels):
        if preserve_symmetry:
            # y = (L - 1)(tanh z + 1)/2 + 0.5 hits an integer boundary b at tanh z = 2(b - 0.5)/(L - 1) - 1
            ts = [2 * (b - 0.5) / (L - 1) - 1 for b in range(1, L)]
            zs = [math.atanh(t) for t in ts]
        else:
            half_l = (L - 1) * (1 + 1e-3) / 2
            offset = 0.5 if L % 2 == 0 else 0.0
            shift = math.atanh(offset / half_l)
            ts = [(q + 0.5 + offset) / half_l for q in range(-(L // 2), (L - 1) // 2)]
            zs = [math.atanh(t) - shift for t in ts if abs(t) < 1]
        col = []
        for z in zs:
            for k in range(-n_per_level // 2, n_per_level // 2):
                col.append(z + k * 3e-8 * max(1.0, abs(z)))
        rows.append(torch.tensor(col))
    n = min(len(c) for c in rows)
    return torch.stack([c[:n] for c in rows], dim=-1).float()


@pytest.mark.parametrize("levels", FSQ_LEVELS, ids=str)
@pytest.mark.parametrize("preserve_symmetry", [False, True])
def test_exact_at_rounding_boundaries(device, levels, preserve_symmetry):
    # fp32 tanh is not trusted within 2^-16 of a boundary: the fp64 fallback must agree exactly.
    z = _boundary_inputs(levels, preserve_symmetry).to(device)
    ours = fastlatent.fsq_quantize(z, levels, preserve_symmetry)
    ref = reference.fsq_quantize(z, levels, preserve_symmetry)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


@pytest.mark.parametrize("levels", FSQ_LEVELS, ids=str)
@pytest.mark.parametrize("preserve_symmetry", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gradients_equal_reference(levels, preserve_symmetry, dtype):
    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(301, len(levels), generator=gen) * 3).to(dtype).requires_grad_()
    g = torch.randn(301, len(levels), generator=gen).to(dtype)
    (ours,) = torch.autograd.grad(fastlatent.fsq_quantize(z, levels, preserve_symmetry)[0], z, g)
    (ref,) = torch.autograd.grad(reference.fsq_quantize(z, levels, preserve_symmetry)[0], z, g)
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


def test_gradcheck_of_the_straight_through_surrogate():
    # The backward is the derivative of the smooth bound (round -> identity): gradcheck the op's
    # backward against finite differences of that bound in float64.
    levels = [8, 5, 7]
    L = torch.tensor(levels, dtype=torch.float64)
    half_l = (L - 1) * (1 + 1e-3) / 2
    offset = torch.where(L % 2 == 0, 0.5, 0.0).double()
    shift = torch.atanh(offset / half_l)
    hw = torch.tensor([lv // 2 for lv in levels], dtype=torch.float64)

    def surrogate(z):
        return (torch.tanh(z + shift) * half_l - offset) / hw

    z = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(9, 3, dtype=torch.float64)
    (ours,) = torch.autograd.grad(fastlatent.fsq_quantize(z, levels)[0], z, g)
    assert torch.autograd.gradcheck(surrogate, (z,))
    (want,) = torch.autograd.grad(surrogate(z), z, g)
    torch.testing.assert_close(ours, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("levels", FSQ_LEVELS, ids=str)
@pytest.mark.parametrize("preserve_symmetry", [False, True])
def test_round_trip_and_code_range(device, levels, preserve_symmetry):
    z = torch.randn(1000, len(levels), device=device) * 4
    z_hat, idx = fastlatent.fsq_quantize(z, levels, preserve_symmetry)
    assert idx.dtype == torch.int64 and int(idx.min()) >= 0 and int(idx.max()) < math.prod(levels)
    assert float(z_hat.abs().max()) <= 1.0
    assert torch.equal(fastlatent.fsq_indices_to_codes(idx, levels, preserve_symmetry), z_hat)
    assert torch.equal(fastlatent.fsq_indices_to_codes(idx.int(), levels, preserve_symmetry), z_hat)
    # every code of a small grid is reachable and maps back to its own index
    small = levels[:3]
    all_idx = torch.arange(math.prod(small), device=device)
    codes = fastlatent.fsq_indices_to_codes(all_idx, small, preserve_symmetry)
    # the z that bounds to the centre of each code's bin quantises back to that code's index
    z_centre = _inverse_bound(codes, small, preserve_symmetry)
    assert torch.equal(fastlatent.fsq_quantize(z_centre, small, preserve_symmetry)[1], all_idx)


def _inverse_bound(codes, levels, preserve_symmetry):
    """A z whose bound lands exactly on the centre of the code's bin."""
    L = torch.tensor(levels, dtype=torch.float64, device=codes.device)
    c = codes.double()
    if preserve_symmetry:
        k = (c + 1) * (L - 1) / 2
        t = ((k + 0.5) - 0.5) * 2 / (L - 1) - 1  # centre of [k, k+1) in bracket space minus the 0.5 shift
        t = t.clamp(-1 + 1e-6, 1 - 1e-6)
        return torch.atanh(t).float()
    half_l = (L - 1) * (1 + 1e-3) / 2
    offset = torch.where(L % 2 == 0, 0.5, 0.0).double()
    shift = torch.atanh(offset / half_l)
    q = c * torch.tensor([lv // 2 for lv in levels], dtype=torch.float64, device=codes.device)
    return (torch.atanh(((q + offset) / half_l).clamp(-1 + 1e-9, 1 - 1e-9)) - shift).float()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf(device, dtype):
    levels = [8, 5, 5, 5]
    z = torch.tensor(
        [[float("nan"), 0.0, 1.0, 2.0], [float("inf"), -float("inf"), 0.0, 0.0], [0.3, -0.2, 0.1, 5.0]],
        device=device,
        dtype=dtype,
        requires_grad=True,
    )
    z_hat, idx = fastlatent.fsq_quantize(z, levels)
    assert torch.isnan(z_hat[0, 0]) and not torch.isnan(z_hat[0, 1:]).any()
    assert idx[0].item() == -1 and idx[1].item() >= 0 and idx[2].item() >= 0
    assert z_hat[1, 0].item() == 0.75 and z_hat[1, 1].item() == -1.0  # saturated: top and bottom levels
    z_hat.sum().backward()
    assert torch.isnan(z.grad[0, 0]) and z.grad[1, 0].item() == 0 and z.grad[1, 1].item() == 0
    ref = reference.fsq_quantize(z.detach(), levels)
    torch.testing.assert_close(z_hat.detach(), ref[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, ref[1])
    codes = fastlatent.fsq_indices_to_codes(torch.tensor([-1, 0, 1000, 999], device=device), levels)
    assert torch.isnan(codes[[0, 2]]).all() and not torch.isnan(codes[[1, 3]]).any()


def test_large_levels_take_the_fp64_path():
    # A single channel with 2^31 levels: fp32 cannot tell neighbouring levels apart.
    levels = [2**31]
    z = torch.linspace(-3, 3, 10001).reshape(-1, 1)
    ours = fastlatent.fsq_quantize(z, levels)
    ref = reference.fsq_quantize(z, levels)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


@pytest.mark.parametrize("levels", [[2**31], [2**25 + 1], [2**24 + 1, 127], [2, 2**30]], ids=str)
@pytest.mark.parametrize("preserve_symmetry", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_extreme_levels_are_exact(device, levels, preserve_symmetry, dtype):
    # Past 2^24 levels a float cannot hold the level: the fp64 path must keep it an integer, and
    # L = 2^31 must not overflow a 32-bit level anywhere (bound, clamp, value, index, codes).
    if device.type == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only")
    z = torch.cat([torch.linspace(-4, 4, 4001, dtype=torch.float64), torch.tensor([-1e30, 1e30, 0.0])])
    z = torch.cat([z, torch.tensor([-math.inf, math.inf], dtype=torch.float64)]).to(dtype)
    z = z[:, None].expand(-1, len(levels)).contiguous()
    z[:, -1] = z[:, -1].flip(0)
    ours = fastlatent.fsq_quantize(z.to(device), levels, preserve_symmetry)
    ref = reference.fsq_quantize(z, levels, preserve_symmetry)
    assert torch.equal(ours[1].cpu(), ref[1])
    assert torch.equal(ours[0].cpu(), ref[0])
    top = math.prod(levels) - 1
    assert int(ref[1].min()) >= 0 and int(ref[1].max()) <= top
    # Every channel reaches its bottom and top level (the +-inf rows).
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))])
    k = (ours[1].cpu()[:, None] // basis) % torch.tensor(levels)
    assert k.amin(0).tolist() == [0] * len(levels) and k.amax(0).tolist() == [L - 1 for L in levels]
    codes = fastlatent.fsq_indices_to_codes(ours[1], levels, preserve_symmetry, dtype=dtype)
    assert torch.equal(codes.cpu(), ref[0])


def test_levels_product_overflow_is_an_error():
    # The product 2 * 2^62 overflows int64: the op itself (not only the Python wrapper) must refuse it.
    z = torch.zeros(2, 2)
    for op in (torch.ops.fastlatent.fsq_quantize.default, fastlatent.fsq_quantize):
        with pytest.raises(ValueError, match="product of levels"):
            op(z, [2, 2**62])
    with pytest.raises(ValueError, match="product of levels"):
        torch.ops.fastlatent.fsq_indices_to_codes.default(torch.zeros(2, dtype=torch.long), [2**62, 4])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_and_thread_count_independent(dtype):
    z = (torch.randn(50000, 6) * 2).to(dtype)
    first = fastlatent.fsq_quantize(z, [8, 8, 8, 5, 5, 5])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fastlatent.fsq_quantize(z, [8, 8, 8, 5, 5, 5])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], single[0]) and torch.equal(first[1], single[1])


def test_opcheck_with_gradients(device):
    z = torch.randn(33, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlatent.fsq_quantize.default, (z, [7, 5, 5, 5, 5]))
    g = torch.randn(33, 5, device=device)
    torch.library.opcheck(
        torch.ops.fastlatent.fsq_quantize_backward.default, (g, z.detach(), [7, 5, 5, 5, 5])
    )


def test_compiled_forward_backward(device):
    torch._dynamo.reset()

    def step(z, w):
        z_hat, idx = fastlatent.fsq_quantize(z @ w, [8, 5, 5, 5])
        return (z_hat**2).sum(), idx

    w = torch.randn(16, 4, device=device, requires_grad=True)
    z = torch.randn(64, 16, device=device)
    compiled = torch.compile(step, fullgraph=True)
    loss, idx = compiled(z, w)
    (grad_c,) = torch.autograd.grad(loss, w)
    loss_e, idx_e = step(z, w)
    (grad_e,) = torch.autograd.grad(loss_e, w)
    assert torch.equal(idx, idx_e)
    torch.testing.assert_close(grad_c, grad_e)


def test_levels_argument_errors():
    z = torch.randn(3, 2)
    with pytest.raises(TypeError, match="levels must be a list of ints"):
        fastlatent.fsq_quantize(z, torch.tensor([8, 5]))
    with pytest.raises(TypeError, match="levels must be a list of ints"):
        fastlatent.fsq_quantize(z, [8.0, 5])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("preserve_symmetry", [False, True])
def test_cuda_matches_cpu(dtype, preserve_symmetry):
    for levels in FSQ_LEVELS:
        for rows in (1, 127, 128, 129, 4099):
            z = (torch.randn(rows, len(levels)) * 3).to(dtype)
            for offset in (0, 1):  # offset 1: a view off the 16-byte alignment (scalar path)
                zc = torch.cat([torch.zeros(offset, dtype=dtype), z.flatten()]).cuda()[offset:].view_as(z)
                zc.requires_grad_()
                z_hat, idx = fastlatent.fsq_quantize(zc, levels, preserve_symmetry)
                ref = reference.fsq_quantize(z, levels, preserve_symmetry)
                assert torch.equal(z_hat.cpu(), ref[0]) and torch.equal(idx.cpu(), ref[1])
                g = torch.randn_like(z)
                (grad,) = torch.autograd.grad(z_hat, zc, g.cuda())
                want = torch.ops.fastlatent.fsq_quantize_backward.default(g, z, levels, preserve_symmetry)
                torch.testing.assert_close(grad.cpu(), want, rtol=2e-6, atol=1e-7)
                codes = fastlatent.fsq_indices_to_codes(idx, levels, preserve_symmetry, dtype=dtype)
                assert torch.equal(codes.cpu(), ref[0])
