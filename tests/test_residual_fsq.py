"""residual_fsq semantics: vqp's layer stack bit for bit, the straight-through gradient (derived and
gradchecked), double backward, NaN rows, CUDA parity."""

import pytest
import torch
from opspecs import FSQ_LEVELS, _residual_fsq_scales

from fastlatent import reference
from fastlatent.ops import residual_fsq


def _vqp_layers(z, scales, levels):
    """vector-quantize-pytorch's ResidualFSQ layer loop with bound_hard_clamp=True, written out."""
    levels_minus_1 = torch.tensor(levels, dtype=torch.int32) - 1
    out, residual, indices = 0.0, z, []
    basis = torch.cumprod(torch.tensor([1] + levels[:-1]), 0)
    for scale in scales:
        b = residual / scale
        bracket = (levels_minus_1 * (b.clamp(-1.0, 1.0) + 1) / 2.0) + 0.5
        code = (2.0 / levels_minus_1) * bracket.floor() - 1.0
        quantized = code * scale
        indices.append((bracket.floor().long() * basis).sum(-1))
        residual = residual - quantized
        out = out + quantized
    return out, torch.stack(indices, -1)


@pytest.mark.parametrize("levels", FSQ_LEVELS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_equals_vqp_layer_loop_bitwise(levels, dtype):
    gen = torch.Generator().manual_seed(5)
    z = (torch.randn(4099, len(levels), generator=gen) * 0.7).to(dtype)
    scales = _residual_fsq_scales(levels, 6, "cpu")
    ours = residual_fsq(z, scales, levels)
    theirs = _vqp_layers(z, scales, levels)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def _surrogate(z, scales, levels):
    """The function whose derivative the op's backward is: every layer's rounding replaced by the
    identity and its residual input held at the forward's value (vqp detaches it), i.e.
    sum_l s_l * clamp((z - c_l) / s_l, -1, 1) with c_l = z - r_l fixed."""
    with torch.no_grad():
        offsets, residual = [], z.detach().clone()
        for scale in scales:
            offsets.append(z.detach() - residual)
            # this layer's quantized value (a one-layer stack of the reference) on the residual so far
            q = reference.residual_fsq(residual, scale[None], levels)[0]
            residual = residual - q
    return sum(s * ((z - c) / s).clamp(-1.0, 1.0) for s, c in zip(scales.double(), offsets))


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [7, 5, 5, 5, 5]], ids=str)
def test_gradient_is_the_straight_through_derivative(levels):
    gen = torch.Generator().manual_seed(6)
    z = (torch.randn(64, len(levels), generator=gen, dtype=torch.float64) * 0.9).requires_grad_()
    scales = _residual_fsq_scales(levels, 4, "cpu")
    # the surrogate is smooth away from the clamps' kinks: gradcheck its derivative ...
    assert torch.autograd.gradcheck(lambda z_: _surrogate(z_, scales, levels), (z,))
    # ... which is the op's backward, exactly (a count of the layers whose clamp passed the gradient)
    v = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    (ours,) = torch.autograd.grad(residual_fsq(z, scales, levels)[0], z, v)
    (expected,) = torch.autograd.grad(_surrogate(z, scales, levels), z, v)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    counts = ours / v
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-9)  # whole numbers of layers


def test_double_backward():
    gen = torch.Generator().manual_seed(7)
    levels = [8, 5, 5, 5]
    z = (torch.randn(40, 4, generator=gen, dtype=torch.float64) * 0.9).requires_grad_()
    scales = _residual_fsq_scales(levels, 3, "cpu")
    assert torch.autograd.gradgradcheck(lambda z_: residual_fsq(z_, scales, levels)[0], (z,))


def test_gradient_counts_the_layers_whose_clamp_passes():
    levels = [5]
    scales = _residual_fsq_scales(levels, 2, "cpu")  # 1, 1/5
    z = torch.tensor([[0.0], [1.0], [1.5], [-3.0]], requires_grad=True)
    out, indices = residual_fsq(z, scales, levels)
    (grad,) = torch.autograd.grad(out.sum(), z)
    # 0.0: both layers pass; 1.0: the first passes (inclusive), its residual 0 then passes the second;
    # 1.5: the first clamps, residual 0.5 -> 2.5 after scaling, clamped too; -3: both clamped
    assert grad.flatten().tolist() == [2.0, 2.0, 0.0, 0.0]
    assert indices[:, 0].tolist() == [2, 4, 4, 0]


def test_nan_row_and_custom_scales():
    levels = [8, 5]
    scales = torch.tensor([[1.0, 1.0], [0.3, 0.25]])
    z = torch.tensor([[0.2, float("nan")], [0.4, -0.9]])
    out, indices = residual_fsq(z, scales, levels)
    assert out[0].isnan().all() and indices[0].tolist() == [-1, -1]
    ref = reference.residual_fsq(z, scales, levels)
    assert torch.equal(out[1], ref[0][1]) and torch.equal(indices, ref[1])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_equals_cpu(dtype):
    gen = torch.Generator().manual_seed(8)
    for levels in FSQ_LEVELS:
        z = (torch.randn(10007, len(levels), generator=gen) * 0.8).to(dtype)
        scales = _residual_fsq_scales(levels, 5, "cpu")
        cpu = residual_fsq(z, scales, levels)
        gpu = residual_fsq(z.cuda(), scales.cuda(), levels)
        assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
