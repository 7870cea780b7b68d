"""fastlatent.nn.FSQ / LFQ / BSQ: shapes, layouts, training, usage statistics, and a cross-check
against vector-quantize-pytorch itself (skipped when it is not installed)."""

import math

import pytest
import torch

import fastlatent
from fastlatent.nn import BSQ, FSQ, LFQ, codebook_usage


def test_fsq_module_shapes_projection_and_round_trip():
    q = FSQ([8, 5, 5, 5], dim=32, num_codebooks=2)
    x = torch.randn(3, 10, 32, requires_grad=True)
    out, idx = q(x)
    assert out.shape == x.shape and idx.shape == (3, 10, 2) and idx.dtype == torch.int64
    torch.testing.assert_close(q.indices_to_codes(idx), out)
    out.sum().backward()
    assert x.grad is not None and q.project_in.weight.grad is not None
    assert q.codebook_size == 1000 and q.implicit_codebook.shape == (1000, 4)


def test_layout_follows_vector_quantize_pytorch():
    # 4+ dims: channel-first; 3 dims: channel-last unless channel_first=True; LFQ(channel_first=False)
    # opts out
    q = FSQ([8, 5, 5, 5], dim=6)
    x = torch.randn(2, 6, 5, 7)
    out, idx = q(x)
    assert out.shape == x.shape and idx.shape == (2, 5, 7)
    torch.testing.assert_close(q.indices_to_codes(idx), out)
    out_last, idx_last = q(x.movedim(1, -1).reshape(2, 35, 6))
    assert torch.equal(idx_last.reshape(2, 5, 7), idx)
    q.channel_first = True
    out_cf, idx_cf = q(x.reshape(2, 6, 35))
    assert torch.equal(idx_cf.reshape(2, 5, 7), idx) and out_cf.shape == (2, 6, 35)
    torch.testing.assert_close(q.indices_to_codes(idx_cf), out_cf)
    with pytest.raises(ValueError, match="expected 6 features in dim 1"):
        q(torch.randn(2, 5, 7, 6))
    lfq = LFQ(dim=6, channel_first=False)
    assert lfq(torch.randn(2, 5, 7, 6)).quantized.shape == (2, 5, 7, 6)
    assert LFQ(dim=6)(torch.randn(2, 6, 5, 7)).indices.shape == (2, 5, 7)


def test_module_argument_errors():
    with pytest.raises(ValueError, match="levels must all be >= 2"):
        FSQ([8, 1])
    with pytest.raises(ValueError, match="must be <= 2\\^31"):
        FSQ([2**16, 2**16])
    with pytest.raises(ValueError, match="power of 2"):
        LFQ(codebook_size=1000)
    with pytest.raises(ValueError, match="keep_num_codebooks_dim"):
        LFQ(dim=8, num_codebooks=2, keep_num_codebooks_dim=False)


def test_lfq_training_loss_and_eval():
    q = LFQ(dim=24, codebook_size=2**10, commitment_loss_weight=0.25)
    x = torch.randn(4, 16, 24, requires_grad=True)
    (out, idx, aux), breakdown = q(x, return_loss_breakdown=True)
    assert out.shape == x.shape and idx.shape == (4, 16) and aux.dim() == 0
    assert breakdown.per_sample_entropy >= 0 and 0 < breakdown.batch_entropy <= 10 * math.log(2) + 1e-5
    (out.sum() + aux).backward()
    assert torch.isfinite(x.grad).all() and q.project_in.weight.grad.abs().sum() > 0
    q.eval()
    _, _, aux_eval = q(x)
    assert aux_eval.item() == 0
    codes = q.indices_to_codes(idx)
    torch.testing.assert_close(codes, out)


def test_bsq_training_and_codes():
    q = BSQ(dim=12, commitment_loss_weight=0.1)
    x = torch.randn(2, 9, 12, requires_grad=True)
    (out, idx, aux), br = q(x, return_loss_breakdown=True)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 9))
    torch.testing.assert_close(q.indices_to_codes(idx), out)
    assert br.batch_entropy <= 12 * math.log(2) + 1e-5
    (out.sum() + aux).backward()
    assert torch.isfinite(x.grad).all()


def test_lfq_options_and_errors():
    with pytest.raises(ValueError, match="codebook_dim <= 26"):
        LFQ(dim=28)(torch.randn(2, 4, 28))  # above 18 bits the split entropy; above 26 refused
    eval_lfq = LFQ(dim=20).eval()  # no entropy in eval: any size up to 62 bits
    assert eval_lfq(torch.randn(2, 4, 20)).indices.shape == (2, 4)
    with pytest.raises(ValueError, match="frac_per_sample_entropy"):
        LFQ(dim=4, frac_per_sample_entropy=0.0)
    with pytest.raises(ValueError, match="mask must cover"):
        LFQ(dim=4)(torch.randn(2, 5, 4), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        LFQ(dim=4)(torch.randn(2, 5, 4), mask=torch.ones(2))
    with pytest.raises(ValueError, match="noise_dropout > 0 needs preserve_symmetry"):
        FSQ([8, 5], noise_dropout=0.1)
    with pytest.raises(ValueError, match="spherical"):
        BSQ(dim=4, spherical=False)
    # a [B, H*W] mask for a channel-first image equals the [B, H, W] one
    q = LFQ(dim=4)
    x = torch.randn(2, 4, 3, 5)
    mask = torch.rand(2, 3, 5) > 0.5
    torch.testing.assert_close(
        q(x, mask=mask).entropy_aux_loss, q(x, mask=mask.reshape(2, 15)).entropy_aux_loss
    )


def test_bsq_factorised_entropy_for_wide_codes():
    q = BSQ(dim=24)
    assert q.factorized_entropy
    x = torch.randn(2, 8, 24, requires_grad=True)
    (out, idx, aux), br = q(x, return_loss_breakdown=True)
    assert br.batch_entropy <= 24 * math.log(2) + 1e-4 and torch.isfinite(aux)
    aux.backward()
    assert torch.isfinite(x.grad).all()
    narrow = BSQ(dim=8, factorized_entropy=True)
    exact = LFQ(dim=8, spherical=True)
    xs = torch.randn(64, 8) * 0.1
    _, br_f = narrow(xs[:, None], return_loss_breakdown=True)
    _, br_e = exact(xs[:, None], return_loss_breakdown=True)
    torch.testing.assert_close(br_f.per_sample_entropy, br_e.per_sample_entropy, rtol=1e-4, atol=1e-5)
    assert br_f.batch_entropy >= br_e.batch_entropy - 1e-5  # the factorised estimate bounds it from above


def test_bsq_exact_entropy_above_18_bits_matches_the_float64_definition():
    """BSQ(factorized_entropy=False) at 20 bits: both entropies and their gradient equal the N x 2^d
    soft assignment of LFQ(spherical=True), computed in float64; the factorised estimate does not."""
    from fastlatent.reference.lfq import all_codes

    d, scale, inv_t, gamma = 20, 1.0, 3.0, 0.7
    x = torch.randn(1, 6, d, generator=torch.Generator().manual_seed(3))
    quantizer = BSQ(
        dim=d, factorized_entropy=False, inv_temperature=inv_t, diversity_gamma=gamma, entropy_loss_weight=1.0
    ).train()
    xi = x.clone().requires_grad_()
    (_, _, aux), breakdown = quantizer(xi, return_loss_breakdown=True)
    aux.backward()

    xr = x.double().requires_grad_()
    unit = torch.nn.functional.normalize(xr[0], dim=-1) * scale
    prob = (2 * inv_t * unit @ all_codes(d, scale / math.sqrt(d), x.device).T).softmax(-1)
    per_sample = -torch.special.xlogy(prob, prob).sum(-1).mean()
    avg = prob.mean(0)
    batch = -torch.special.xlogy(avg, avg).sum()
    (per_sample - gamma * batch).backward()

    got = torch.stack([breakdown.per_sample_entropy, breakdown.batch_entropy]).double()
    torch.testing.assert_close(got, torch.stack([per_sample, batch]).detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xi.grad.double(), xr.grad, rtol=1e-3, atol=1e-5)
    assert not quantizer.factorized_entropy and BSQ(dim=d).factorized_entropy  # the default is unchanged
    _, factorised = BSQ(dim=d, factorized_entropy=True, inv_temperature=inv_t).train()(
        x, return_loss_breakdown=True
    )
    assert factorised.batch_entropy > breakdown.batch_entropy + 0.02  # an upper bound, not the entropy
    with pytest.raises(ValueError, match=r"factorized_entropy=False needs codebook_dim <= 26 .* got 27"):
        BSQ(dim=27, factorized_entropy=False)


def test_residual_and_latent_quantizer_errors():
    with pytest.raises(ValueError, match="num_quantizers must be >= 1"):
        fastlatent.nn.ResidualFSQ(levels=[8, 5], num_quantizers=0)
    with pytest.raises(ValueError, match="soft_clamp_input_value is set by bound_hard_clamp"):
        fastlatent.nn.ResidualFSQ(levels=[8, 5], num_quantizers=2, soft_clamp_input_value=1.5)
    with pytest.raises(ValueError, match="expected 6 features"):
        fastlatent.nn.ResidualFSQ(levels=[8, 5], num_quantizers=2, dim=6)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="sets codebook_scale"):
        fastlatent.nn.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2, codebook_scale=0.5)
    with pytest.raises(ValueError, match="divisible by groups"):
        fastlatent.nn.GroupedResidualFSQ(dim=7, groups=2, levels=[8, 5], num_quantizers=2)
    with pytest.raises(ValueError) as info:  # vqp raises a RuntimeError there: both are caught
        fastlatent.nn.LatentQuantize(levels=5, dim=4)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(ValueError, match="expected channel-first input"):
        fastlatent.nn.LatentQuantize([5, 5], dim=4)(torch.randn(2, 3, 4))


def test_latent_quantize_round_trip_with_odd_levels():
    q = fastlatent.nn.LatentQuantize(levels=[7, 7, 4], dim=3)
    out, idx, loss = q(torch.randn(2, 3, 50))
    assert torch.equal(q.indices_to_codes(idx), out)


def test_codebook_usage():
    idx = torch.tensor([0, 0, 1, 1, 2, 2, -1])
    usage = codebook_usage(idx, 10)
    assert usage.fraction_used.item() == pytest.approx(0.3)
    assert usage.perplexity.item() == pytest.approx(3.0)
    uneven = codebook_usage(torch.tensor([5, 5, 5, 7]), 2**31)
    p = torch.tensor([0.75, 0.25])
    assert uneven.perplexity.item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)
    assert uneven.fraction_used.item() == pytest.approx(2 / 2**31)


def test_compiled_training_step():
    torch._dynamo.reset()
    q = LFQ(dim=16, codebook_size=2**8)
    x = torch.randn(2, 32, 16)

    def step(x):
        out, idx, aux = q(x)
        return out.square().mean() + aux, idx

    loss_c, idx_c = torch.compile(step, fullgraph=True)(x)
    loss_e, idx_e = step(x)
    assert torch.equal(idx_c, idx_e)
    torch.testing.assert_close(loss_c, loss_e)


# ------------------------------------------------------------ vector-quantize-pytorch


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [8, 8, 8, 5, 5, 5], [7, 5, 5, 5, 5], [2] * 16], ids=str)
def test_fsq_matches_vector_quantize_pytorch(levels):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    symmetric = 2 in levels  # vqp refuses levels of 2 without preserve_symmetry
    theirs = vqp.FSQ(levels, preserve_symmetry=symmetric)
    ours = FSQ(levels, preserve_symmetry=symmetric)
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(4, 500, len(levels), generator=gen) * 2).requires_grad_()
    z2 = z.detach().clone().requires_grad_()
    out, idx = ours(z)
    out_v, idx_v = theirs(z2)
    # vqp bounds in float32; where its tanh and our float64 decision could disagree (within 1e-5
    # of a rounding boundary) we do not compare.
    ref = fastlatent.reference.fsq_quantize(z.detach(), levels, symmetric)
    assert torch.equal(ref[0], out) and torch.equal(ref[1], idx)
    same_idx = idx == idx_v.long()
    assert same_idx.float().mean() > 0.999
    if symmetric:  # vqp forms scale * k - 1 (rounded twice); we form (2k - (L - 1)) / (L - 1)
        torch.testing.assert_close(out[same_idx], out_v[same_idx], rtol=0, atol=2e-7)
    else:
        assert torch.equal(out[same_idx], out_v[same_idx])
    torch.testing.assert_close(
        theirs.indices_to_codes(idx_v), ours.indices_to_codes(idx).float(), rtol=0, atol=2e-7
    )
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, z, g)
    (grad_v,) = torch.autograd.grad(out_v, z2, g)
    torch.testing.assert_close(grad, grad_v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d,inv_temperature,scale", [(4, 1.0, 1.0), (10, 1.0, 0.5), (14, 100.0, 1.0)])
def test_lfq_matches_vector_quantize_pytorch(d, inv_temperature, scale):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    theirs = vqp.LFQ(dim=d, codebook_scale=scale, commitment_loss_weight=0.25, entropy_loss_weight=0.1)
    ours = LFQ(dim=d, codebook_scale=scale, commitment_loss_weight=0.25, entropy_loss_weight=0.1)
    gen = torch.Generator().manual_seed(d)
    x = (torch.randn(2, 64, d, generator=gen) * 0.02).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (out, idx, aux), br = ours(x, inv_temperature=inv_temperature, return_loss_breakdown=True)
    (out_v, idx_v, aux_v), br_v = theirs(x2, inv_temperature=inv_temperature, return_loss_breakdown=True)
    assert torch.equal(out, out_v) and torch.equal(idx, idx_v.long())
    torch.testing.assert_close(br.commitment, br_v.commitment)
    # Our entropies are exact; vqp's clamp probabilities at 1e-5 inside the log. Recompute vqp's
    # formula, clamp included, from the materialised reference: vqp must match that, and we
    # must match it where no probability is below the clamp.
    codes = fastlatent.reference.lfq.all_codes(d, scale, x.device)
    prob = (2 * x.detach().double().reshape(-1, d) @ codes.T * inv_temperature).softmax(-1)

    def clamped_entropy(p):
        return (-p * p.clamp(min=1e-5).log()).sum(-1)

    torch.testing.assert_close(
        br_v.per_sample_entropy.double(), clamped_entropy(prob).mean(), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        br_v.batch_entropy.double(), clamped_entropy(prob.mean(0)), rtol=1e-5, atol=1e-6
    )
    exact_ps = -torch.special.xlogy(prob, prob).sum(-1).mean()
    exact_batch = -torch.special.xlogy(prob.mean(0), prob.mean(0)).sum()
    torch.testing.assert_close(br.per_sample_entropy.double(), exact_ps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(br.batch_entropy.double(), exact_batch, rtol=1e-5, atol=1e-6)
    if prob.min() >= 1e-5:  # the clamp is inactive: the losses and their gradients coincide
        torch.testing.assert_close(aux, aux_v, rtol=1e-5, atol=1e-7)
        g = torch.randn_like(out)
        (grad,) = torch.autograd.grad((out * g).sum() + aux, x)
        (grad_v,) = torch.autograd.grad((out_v * g).sum() + aux_v, x2)
        torch.testing.assert_close(grad, grad_v, rtol=1e-4, atol=1e-6)
