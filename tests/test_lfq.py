"""lfq_quantize / lfq_entropy semantics: the factorised entropy against the materialised
softmax up to d = 16, gradients, NaN/Inf, determinism, CUDA parity."""

import math

import pytest
import torch

import fastlatent
from fastlatent import reference


@pytest.mark.parametrize("d", [1, 2, 7, 12, 16])
def test_entropy_matches_materialised_softmax(device, d):
    gen = torch.Generator().manual_seed(d)
    n = 64 if d == 16 else 500
    x = (torch.randn(n, d, generator=gen) * 0.05).to(device)
    ps, avg = fastlatent.lfq_entropy(x, 1.0, 10.0)
    ref_ps, ref_avg = reference.lfq_entropy(x, 1.0, 10.0)
    torch.testing.assert_close(ps, ref_ps, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(avg, ref_avg, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(avg.double().sum(), torch.tensor(1.0, dtype=torch.float64, device=device))


@pytest.mark.parametrize("d", [1, 3, 6, 9])
def test_gradcheck_float64(d):
    gen = torch.Generator().manual_seed(d)
    x = (torch.randn(23, d, generator=gen, dtype=torch.float64) * 0.4).requires_grad_()
    w_ps = torch.randn(23, generator=gen, dtype=torch.float64)
    w_avg = torch.randn(2**d, generator=gen, dtype=torch.float64)

    def loss(x):
        ps, avg = fastlatent.lfq_entropy(x, 0.8, 1.5)
        return (ps * w_ps).sum() + (avg * w_avg).sum()

    assert torch.autograd.gradcheck(loss, (x,))


@pytest.mark.parametrize("d", [2, 8, 14])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gradients_equal_reference(d, dtype):
    # The codebook-entropy gradient through avg_probs, as the LFQ module uses it.
    gen = torch.Generator().manual_seed(d)
    x = (torch.randn(40, d, generator=gen) * 0.1).to(dtype).requires_grad_()

    def aux(ps, avg):
        return ps.mean() - 1.3 * -(avg * avg.log()).sum()

    (ours,) = torch.autograd.grad(aux(*fastlatent.lfq_entropy(x, 1.0, 5.0)), x)
    (ref,) = torch.autograd.grad(aux(*reference.lfq_entropy(x, 1.0, 5.0)), x)
    # fp32: the leave-one-out sums run over 2^(d/2) terms with cancellation; scale atol to the gradient.
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_quantize_bits_and_straight_through(device):
    x = torch.tensor([[0.5, -1.0, 0.0, 2.0], [-0.1, 0.2, 3.0, -4.0]], device=device, requires_grad=True)
    q, idx = fastlatent.lfq_quantize(x, 0.5)
    assert q.tolist() == [[0.5, -0.5, -0.5, 0.5], [-0.5, 0.5, 0.5, -0.5]]
    assert idx.tolist() == [0b1001, 0b0110]  # channel 0 is the most significant bit
    g = torch.randn_like(x)
    (grad,) = torch.autograd.grad(q, x, g)
    assert torch.equal(grad, g)


def test_nan_and_inf(device):
    x = torch.tensor(
        [[float("nan"), 1.0, -1.0], [float("inf"), -float("inf"), 0.5], [0.1, 0.2, -0.3]],
        device=device,
        requires_grad=True,
    )
    q, idx = fastlatent.lfq_quantize(x)
    assert torch.isnan(q[0, 0]) and idx[0].item() == -1
    assert q[1].tolist() == [1.0, -1.0, 1.0] and idx[1].item() == 0b101
    ps, avg = fastlatent.lfq_entropy(x[1:], 1.0, 1.0)
    # +-Inf are the limit of large values (the materialised reference itself would give NaN)
    ref_ps, ref_avg = reference.lfq_entropy(x[1:].detach().clamp(-1e4, 1e4), 1.0, 1.0)
    torch.testing.assert_close(ps, ref_ps.to(ps.device), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(avg, ref_avg, rtol=1e-5, atol=1e-9)
    (ps.sum() + (avg * torch.arange(8.0, device=device)).sum()).backward()
    assert x.grad[1, :2].tolist() == [0.0, 0.0] and torch.isfinite(x.grad).all()
    ps, avg = fastlatent.lfq_entropy(x.detach(), 1.0, 1.0)
    assert torch.isnan(ps[0]) and torch.isfinite(ps[1:]).all() and torch.isnan(avg).all()


def test_empty_batch(device):
    ps, avg = fastlatent.lfq_entropy(torch.zeros(0, 5, device=device))
    assert ps.shape == (0,) and avg.shape == (32,) and torch.isnan(avg).all()


def test_deterministic_and_thread_count_independent():
    x = torch.randn(3000, 14) * 0.02
    first = fastlatent.lfq_entropy(x, 1.0, 10.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fastlatent.lfq_entropy(x, 1.0, 10.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], single[0]) and torch.equal(first[1], single[1])


def test_opcheck_with_gradients(device):
    x = (torch.randn(17, 6, device=device) * 0.3).requires_grad_()
    torch.library.opcheck(torch.ops.fastlatent.lfq_entropy.default, (x, 1.0, 2.0))
    torch.library.opcheck(torch.ops.fastlatent.lfq_quantize.default, (x, 1.0))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [1, 5, 10, 14, 16, 18])
def test_cuda_matches_cpu(dtype, d):
    n = 64 if d >= 16 else 3000
    x = (torch.randn(n, d) * 0.05).to(dtype)
    xc = x.cuda().requires_grad_()
    xh = x.clone().requires_grad_()
    q, idx = fastlatent.lfq_quantize(xc)
    assert torch.equal(q.cpu(), fastlatent.lfq_quantize(x)[0]) and torch.equal(
        idx.cpu(), fastlatent.lfq_quantize(x)[1]
    )
    ps, avg = fastlatent.lfq_entropy(xc, 1.0, 10.0)
    ps_h, avg_h = fastlatent.lfq_entropy(xh, 1.0, 10.0)
    torch.testing.assert_close(ps.cpu(), ps_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(avg.cpu(), avg_h, rtol=1e-4, atol=1e-9)
    w = torch.randn(2**d)
    (g,) = torch.autograd.grad(ps.sum() + (avg * w.cuda()).sum(), xc)
    (g_h,) = torch.autograd.grad(ps_h.sum() + (avg_h * w).sum(), xh)
    torch.testing.assert_close(g.cpu().float(), g_h.float(), rtol=1e-3, atol=1e-5)
    again = fastlatent.lfq_entropy(xc, 1.0, 10.0)
    assert torch.equal(again[1], avg)  # deterministic


# ---------------------------------------------------------------- LFQ above the kernel's 18 bits


@pytest.mark.parametrize("d", [1, 7, 12])
def test_split_entropy_equals_the_kernel(d):
    from fastlatent.nn.scalar_quantizers import _entropy, split_lfq_entropy

    x = torch.randn(300, d, generator=torch.Generator().manual_seed(d)) * 0.3
    results = []
    for fn in (fastlatent.ops.lfq_entropy, split_lfq_entropy):
        xi = x.clone().requires_grad_()
        ps, avg = fn(xi, 1.0, 2.0)
        (ps.mean() - 0.7 * _entropy(avg)).backward()
        results.append((ps.detach(), avg.detach(), xi.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_split_entropy_above_18_bits_matches_the_float64_reference():
    from fastlatent.nn.scalar_quantizers import _entropy, split_lfq_entropy
    from fastlatent.reference.lfq import all_codes

    d, scale, inv_t = 19, 0.5, 3.0
    x = torch.randn(12, d, generator=torch.Generator().manual_seed(0)) * 0.4

    def brute_force(t, s, i):  # the N x 2^d soft assignment vector-quantize-pytorch materialises, in float64
        prob = (2 * i * t @ all_codes(d, s, t.device).T).softmax(-1)
        return -torch.special.xlogy(prob, prob).sum(-1), prob.mean(0)

    grads, values = [], []
    for fn, xi in ((split_lfq_entropy, x.clone()), (brute_force, x.double())):
        xi.requires_grad_()
        ps, avg = fn(xi, scale, inv_t)
        loss = ps.mean() - _entropy(avg)
        loss.backward()
        values.append(torch.stack([ps.mean().double(), _entropy(avg).double()]).detach())
        grads.append(xi.grad.double())
    torch.testing.assert_close(values[0], values[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)


def test_lfq_trains_above_18_bits_and_refuses_beyond_26():
    from fastlatent.nn import LFQ

    x = torch.randn(2, 8, 20, generator=torch.Generator().manual_seed(1), requires_grad=True)
    quantizer = LFQ(dim=20, entropy_loss_weight=0.1, diversity_gamma=1.0).train()
    (out, indices, loss), breakdown = quantizer(x, inv_temperature=2.0, return_loss_breakdown=True)
    assert out.shape == x.shape and indices.shape == (2, 8) and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the entropy of a mixture of 16 distributions lies between their mean entropy and that plus log 16
    ps, batch = breakdown.per_sample_entropy.item(), breakdown.batch_entropy.item()
    assert ps - 1e-4 <= batch <= ps + math.log(16) + 1e-4
    with pytest.raises(ValueError, match=r"needs codebook_dim <= 26 .* got 27"):
        LFQ(dim=27).train()(torch.randn(1, 2, 27))
