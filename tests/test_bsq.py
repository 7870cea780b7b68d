"""bsq_quantize / bsq_entropy semantics: projection gradient, factorised entropy, NaN/Inf, CUDA."""

import math

import pytest
import torch

import fastlatent
from fastlatent import reference


def test_values_indices_and_zero_row(device):
    z = torch.tensor([[3.0, -4.0, 0.0], [0.0, 0.0, 0.0]], device=device)
    q, idx = fastlatent.bsq_quantize(z)
    m = 1 / math.sqrt(3)
    torch.testing.assert_close(q, torch.tensor([[m, -m, -m], [-m, -m, -m]], device=device), rtol=0, atol=0)
    assert idx.tolist() == [0b100, 0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_quantize_gradient_is_the_projection_jacobian(dtype):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(50, 9, generator=gen).to(dtype)
    z[3] = 1e-14  # below eps: F.normalize divides by eps
    z.requires_grad_()
    g = torch.randn(50, 9, generator=gen).to(dtype)
    (ours,) = torch.autograd.grad(fastlatent.bsq_quantize(z)[0], z, g)
    (ref,) = torch.autograd.grad(reference.bsq_quantize(z)[0], z, g)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


def test_entropy_gradcheck_float64():
    z = torch.randn(21, 7, dtype=torch.float64, requires_grad=True)
    w_ps, w_avg = torch.randn(21, dtype=torch.float64), torch.randn(7, dtype=torch.float64)

    def loss(z):
        ps, avg = fastlatent.bsq_entropy(z, 2.0)
        return (ps * w_ps).sum() + (avg * w_avg).sum()

    assert torch.autograd.gradcheck(loss, (z,))


def test_factorised_per_sample_entropy_is_the_exact_softmax_entropy():
    # Per-sample: the softmax over the 2^d codes of -||u - c||^2 / tau factorises exactly.
    d, tau_inv = 8, 3.0
    z = torch.randn(100, d, dtype=torch.float64)
    u = torch.nn.functional.normalize(z, dim=-1)
    codes = reference.lfq.all_codes(d, 1 / math.sqrt(d), z.device)
    prob = (-(torch.cdist(u, codes) ** 2) * tau_inv).softmax(-1)
    exact = -torch.special.xlogy(prob, prob).sum(-1)
    ps, _ = fastlatent.bsq_entropy(z, tau_inv)
    torch.testing.assert_close(ps, exact, rtol=1e-10, atol=1e-12)


def test_nan_and_inf_rows(device):
    z = torch.tensor([[float("nan"), 1.0], [float("inf"), 1.0], [1.0, -2.0]], device=device)
    q, idx = fastlatent.bsq_quantize(z)
    assert torch.isnan(q[:2]).all() and idx[:2].tolist() == [-1, -1] and idx[2].item() == 0b10
    ps, avg = fastlatent.bsq_entropy(z)
    assert torch.isnan(ps[:2]).all() and torch.isfinite(ps[2]) and torch.isnan(avg).all()


def test_deterministic_and_thread_count_independent():
    z = torch.randn(20000, 16)
    first = fastlatent.bsq_entropy(z, 1.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fastlatent.bsq_entropy(z, 1.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], single[0]) and torch.equal(first[1], single[1])


def test_opcheck_with_gradients(device):
    z = torch.randn(17, 6, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlatent.bsq_quantize.default, (z,))
    torch.library.opcheck(torch.ops.fastlatent.bsq_entropy.default, (z, 2.0))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_matches_cpu(dtype):
    z = torch.randn(5000, 18).to(dtype)
    zc, zh = z.cuda().requires_grad_(), z.clone().requires_grad_()
    q, idx = fastlatent.bsq_quantize(zc)
    qh, idxh = fastlatent.bsq_quantize(zh)
    assert torch.equal(q.cpu(), qh) and torch.equal(idx.cpu(), idxh)
    ps, avg = fastlatent.bsq_entropy(zc, 2.0)
    ps_h, avg_h = fastlatent.bsq_entropy(zh, 2.0)
    torch.testing.assert_close(ps.cpu(), ps_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(avg.cpu(), avg_h, rtol=1e-5, atol=1e-7)
    w = torch.randn(18)
    (g,) = torch.autograd.grad((q.float() * 3).sum() + ps.sum() + (avg * w.cuda()).sum(), zc)
    (g_h,) = torch.autograd.grad((qh.float() * 3).sum() + ps_h.sum() + (avg_h * w).sum(), zh)
    torch.testing.assert_close(g.cpu().float(), g_h.float(), rtol=1e-3, atol=1e-4)
