"""Behaviour parity with vector-quantize-pytorch: same seed, weights and inputs, then outputs,
indices, losses, 20-step loss curves and codebook usage compared option by option. Where the
peer draws random numbers (dead-code re-seeding, k-means starts) the comparison is of outcomes.
Skipped only when vector-quantize-pytorch is not installed."""

import pytest
import torch

from fastlatent import nn as fl

vqp = pytest.importorskip("vector_quantize_pytorch")

STEPS = 20


def _pair(cls_name, **kwargs):
    torch.manual_seed(0)
    theirs = getattr(vqp, cls_name)(**kwargs)
    ours = getattr(fl, cls_name)(**kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # their checkpoints load as they are
    return theirs, ours


def _run(theirs, ours, shape, steps=STEPS, train=True, forward_kwargs=None, make_x=None, seed_each_step=True):
    """Both modules on the same inputs (and the same random stream per step); returns per-step results."""
    theirs.train(train)
    ours.train(train)
    gen = torch.Generator().manual_seed(1)
    results = []
    for step in range(steps):
        x = make_x(gen) if make_x else torch.randn(*shape, generator=gen)
        kwargs = forward_kwargs(gen) if callable(forward_kwargs) else (forward_kwargs or {})
        torch.manual_seed(100 + step)
        a = theirs(x.clone().requires_grad_(train), **kwargs)
        torch.manual_seed(100 + step)
        b = ours(x.clone().requires_grad_(train), **kwargs)
        results.append((a, b))
        if train:
            weight = torch.randn(a[0].shape, generator=gen)
            for out in (a, b):
                ((out[0] * weight).sum() + out[2].sum()).backward()
    return results


def _assert_same(results, loss_rtol=1e-4, index_agreement=1.0):
    for step, (a, b) in enumerate(results):
        agree = (a[1] == b[1]).float().mean().item()
        assert agree >= index_agreement, f"step {step}: indices agree on {agree:.4f}"
        if agree == 1.0:
            torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5, msg=f"step {step}: quantized")
        torch.testing.assert_close(b[2], a[2], rtol=loss_rtol, atol=1e-5, msg=f"step {step}: loss")


def _usage(indices, k):
    return torch.bincount(indices[indices >= 0].reshape(-1), minlength=k).gt(0).float().mean().item()


VQ_OPTIONS = {
    "default": {},
    "decay_0.99_commitment_0.25": {"decay": 0.99, "commitment_weight": 0.25},
    "straight_through_estimator": {"rotation_trick": False},
    "codebook_dim": {"codebook_dim": 8},
    "layernorm_after_project_in": {"codebook_dim": 8, "layernorm_after_project_in": True},
    "heads_shared_codebook": {"heads": 4, "codebook_dim": 8},
    "heads_separate_codebooks": {"heads": 4, "codebook_dim": 8, "separate_codebook_per_head": True},
    "cosine": {"use_cosine_sim": True},
    "cosine_heads_separate": {"use_cosine_sim": True, "heads": 2, "separate_codebook_per_head": True},
    "learnable_codebook": {"learnable_codebook": True, "ema_update": False},
    "learnable_codebook_sync_update_v": {
        "learnable_codebook": True,
        "ema_update": False,
        "sync_update_v": 0.5,
    },
    "orthogonal_reg": {"orthogonal_reg_weight": 10.0},
    "orthogonal_reg_active_codes": {"orthogonal_reg_weight": 10.0, "orthogonal_reg_active_codes_only": True},
    "diversity_loss": {"codebook_diversity_loss_weight": 1.0},
    "cross_entropy_commitment": {"commitment_use_cross_entropy_loss": True},
    "affine_param": {"affine_param": True},
    "manual_ema_update": {"manual_ema_update": True},
    "ema_update_off": {"ema_update": False},
}


@pytest.mark.parametrize("name", list(VQ_OPTIONS))
def test_vector_quantize_option_matches_over_20_steps(name):
    theirs, ours = _pair("VectorQuantize", dim=16, codebook_size=32, **VQ_OPTIONS[name])
    _assert_same(_run(theirs, ours, (2, 40, 16)))
    torch.testing.assert_close(ours._codebook.embed, theirs._codebook.embed, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        ours._codebook.cluster_size, theirs._codebook.cluster_size, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("layout", ["image", "video", "channel_first", "one_token"])
def test_vector_quantize_layouts_match(layout, train):
    flags, shape = {
        "image": ({"accept_image_fmap": True}, (2, 16, 5, 6)),
        "video": ({"accept_3d_fmap": True}, (2, 16, 2, 3, 4)),
        "channel_first": ({"channel_last": False}, (2, 16, 9)),
        "one_token": ({}, (7, 16)),
    }[layout]
    theirs, ours = _pair("VectorQuantize", dim=16, codebook_size=32, **flags)
    results = _run(theirs, ours, shape, steps=3, train=train)
    _assert_same(results)
    assert results[0][1][1].shape == results[0][0][1].shape
    torch.testing.assert_close(
        ours.get_output_from_indices(results[-1][1][1]), theirs.get_output_from_indices(results[-1][0][1])
    )


@pytest.mark.parametrize("how", ["mask", "lens", "mask_keep_input"])
def test_vector_quantize_masks_match(how):
    extra = {"return_zeros_for_masked_padding": False} if how == "mask_keep_input" else {}
    theirs, ours = _pair("VectorQuantize", dim=16, codebook_size=32, **extra)

    def kwargs(gen):
        lens = torch.randint(1, 41, (2,), generator=gen)
        return {"lens": lens} if how == "lens" else {"mask": torch.arange(40) < lens[:, None]}

    _assert_same(_run(theirs, ours, (2, 40, 16), forward_kwargs=kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [{"freeze_codebook": True}, {"ema_update": False}, {"sample_codebook_temp": 0.0}],
    ids=["freeze_codebook", "ema_update_kw", "sample_codebook_temp"],
)
def test_vector_quantize_forward_keywords_match(kwargs):
    # stochastic sampling on only where sample_codebook_temp=0 turns it off (else the draws differ: see below)
    stochastic = "sample_codebook_temp" in kwargs
    theirs, ours = _pair("VectorQuantize", dim=16, codebook_size=32, stochastic_sample_codes=stochastic)
    _assert_same(_run(theirs, ours, (2, 40, 16), steps=5, forward_kwargs=kwargs))
    torch.testing.assert_close(ours._codebook.embed, theirs._codebook.embed, rtol=1e-4, atol=1e-5)


def test_ema_update_weight_and_accumulation_match():
    theirs, ours = _pair("VectorQuantize", dim=16, codebook_size=32)
    weight = torch.rand(32)
    _assert_same(_run(theirs, ours, (2, 40, 16), steps=3, forward_kwargs={"ema_update_weight": weight}))
    _assert_same(_run(theirs, ours, (2, 40, 16), steps=3, forward_kwargs={"accum_ema_update": True}))
    _assert_same(_run(theirs, ours, (2, 40, 16), steps=1))  # folds the accumulated statistics in
    torch.testing.assert_close(ours._codebook.embed_avg, theirs._codebook.embed_avg, rtol=1e-4, atol=1e-5)


def test_learnable_codebook_loss_is_theirs():
    # The loss the issue measured: theirs is mse(q, x) weighted, gradients both ways; no extra codebook term.
    theirs, ours = _pair(
        "VectorQuantize",
        dim=16,
        codebook_size=32,
        learnable_codebook=True,
        ema_update=False,
        commitment_weight=0.2,
    )
    x = torch.randn(2, 40, 16)
    (_, _, loss_theirs), (_, _, loss_ours) = theirs.train()(x), ours.train()(x)
    torch.testing.assert_close(loss_ours, loss_theirs)
    loss_theirs.backward()
    loss_ours.backward()
    torch.testing.assert_close(ours._codebook.embed.grad, theirs._codebook.embed.grad)


def _stochastic_draws(module, distinct, repeats):
    """One training forward over every row of ``distinct`` repeated ``repeats`` times -> counts [rows, K]."""
    rows, d = distinct.shape
    x = distinct[:, None].expand(rows, repeats, d).reshape(1, rows * repeats, d)
    indices = module.train()(x.clone())[1].reshape(rows, repeats)
    k = module.codebook_size
    return torch.stack([torch.bincount(r, minlength=k) for r in indices])


def test_stochastic_sampling_matches_in_distribution():
    # vector-quantize-pytorch draws its Gumbel noise from torch's RNG, fastlatent from Philox inside the
    # search: the codes differ draw by draw, their distribution must not. Fixed seeds: deterministic.
    stats = pytest.importorskip("scipy.stats")
    temperature = 0.05
    theirs, ours = _pair(
        "VectorQuantize",
        dim=8,
        codebook_size=16,
        stochastic_sample_codes=True,
        sample_codebook_temp=temperature,
    )
    distinct = torch.randn(4, 8, generator=torch.Generator().manual_seed(2)) * 0.1
    logits = -torch.cdist(distinct.double(), ours._codebook.embed[0].double())
    probs = (logits / temperature).softmax(-1)
    torch.manual_seed(7)
    counts_theirs = _stochastic_draws(theirs, distinct, 4000)
    torch.manual_seed(7)
    counts_ours = _stochastic_draws(ours, distinct, 4000)
    assert (probs > 0.05).sum(-1).min() >= 3  # a spread-out distribution, not a nearest-code search
    for r in range(distinct.shape[0]):
        table = torch.stack([counts_ours[r], counts_theirs[r]])
        table = table[:, table.sum(0) > 0]
        assert stats.chi2_contingency(table.numpy())[1] > 1e-4, (r, table)
        expected = probs[r] * 4000
        keep = expected > 5
        observed = torch.cat([counts_ours[r][keep], counts_ours[r][~keep].sum(0, keepdim=True)]).double()
        expected = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
        statistic = ((observed - expected) ** 2 / expected.clamp_min(1e-12)).sum().item()
        assert statistic < stats.chi2.ppf(1 - 1e-4, int(keep.sum())), (r, statistic)
    # and a seeded run repeats itself
    theirs, ours = _pair("VectorQuantize", dim=8, codebook_size=16, stochastic_sample_codes=True)
    torch.manual_seed(3)
    first = _stochastic_draws(ours, distinct, 50)
    _, ours = _pair("VectorQuantize", dim=8, codebook_size=16, stochastic_sample_codes=True)
    torch.manual_seed(3)
    assert torch.equal(first, _stochastic_draws(ours, distinct, 50))


def test_gumbel_straight_through_gradient_matches():
    # The straight-through gradient flows through softmax(logits / T) only, not through the draw:
    # it must equal theirs exactly although the sampled codes differ.
    theirs, ours = _pair(
        "VectorQuantize",
        dim=16,
        codebook_size=32,
        straight_through=True,
        rotation_trick=False,
        stochastic_sample_codes=True,
        sample_codebook_temp=0.7,
    )
    gen = torch.Generator().manual_seed(4)
    x, weight = torch.randn(2, 40, 16, generator=gen), torch.randn(2, 40, 16, generator=gen)
    grads, losses = [], []
    for module in (theirs, ours):
        xi = x.clone().requires_grad_()
        quantized, indices, loss = module.train()(xi)
        (quantized * weight).sum().backward()
        grads.append(xi.grad)
        losses.append(loss)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    assert losses[1].shape == losses[0].shape


def test_topk_matches_in_eval():
    theirs, ours = _pair("VectorQuantize", dim=16, codebook_size=32)
    results = _run(theirs, ours, (2, 40, 16), steps=2, train=False, forward_kwargs={"topk": 3})
    for a, b in results:
        assert torch.equal(a[1], b[1]) and b[1].shape == (2, 40, 3)
        torch.testing.assert_close(b[0], a[0])
        torch.testing.assert_close(b[2], a[2])


def test_cross_entropy_against_given_indices_matches():
    theirs, ours = _pair("VectorQuantize", dim=16, codebook_size=32)
    x = torch.randn(2, 40, 16)
    target = torch.randint(0, 32, (2, 40))
    _, ce_theirs = theirs.eval()(x, indices=target)
    _, ce_ours = ours.eval()(x, indices=target)
    torch.testing.assert_close(ce_ours, ce_theirs)


def test_dead_code_replacement_outcomes_match():
    # Both re-seed dead codes from random batch rows (different draws): compare codebook usage.
    used = {}
    for name in ("theirs", "ours"):
        torch.manual_seed(0)
        cls = vqp.VectorQuantize if name == "theirs" else fl.VectorQuantize
        vq = cls(dim=16, codebook_size=64, threshold_ema_dead_code=2, decay=0.8).train()
        gen = torch.Generator().manual_seed(3)
        for _ in range(STEPS):
            x = torch.randn(4, 64, 16, generator=gen) * 0.2 + 3.0  # far from the initial codes: most die
            _, indices, _ = vq(x)
        used[name] = _usage(indices, 64)
        assert torch.isfinite(vq._codebook.embed).all()
    assert used["ours"] > 0.5 and abs(used["ours"] - used["theirs"]) < 0.2, used


def test_kmeans_init_outcomes_match():
    errors = {}
    gen = torch.Generator().manual_seed(4)
    centres = torch.randn(16, 8, generator=gen) * 5
    x = centres[torch.randint(0, 16, (1, 800), generator=gen)] + 0.1 * torch.randn(1, 800, 8, generator=gen)
    for name, cls in (("theirs", vqp.VectorQuantize), ("ours", fl.VectorQuantize)):
        torch.manual_seed(0)
        vq = cls(dim=8, codebook_size=16, kmeans_init=True, kmeans_iters=10).train()
        quantized, _, _ = vq(x)
        errors[name] = (quantized - x).pow(2).mean().item()
        assert bool(vq._codebook.initted)
    assert errors["ours"] < 2 * errors["theirs"] + 0.05, errors


def test_ema_checkpoint_round_trips_both_ways():
    theirs, ours = _pair("VectorQuantize", dim=16, codebook_size=32, heads=2, separate_codebook_per_head=True)
    _run(theirs, ours, (2, 40, 16), steps=2)
    again = vqp.VectorQuantize(dim=16, codebook_size=32, heads=2, separate_codebook_per_head=True)
    again.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 40, 16)
    assert torch.equal(again.eval()(x)[1], ours.eval()(x)[1])


# ---------------------------------------------------------------- residual and friends

RVQ_OPTIONS = {
    "default": {"num_quantizers": 4},
    "codebook_dim": {"num_quantizers": 3, "codebook_dim": 8},
    "shared_codebook": {"num_quantizers": 3, "shared_codebook": True},
    "per_depth_sizes": {"codebook_size": (32, 16, 8)},
    "quant_grad_frac": {"num_quantizers": 3, "quant_grad_frac": 0.1},
    "cosine": {"num_quantizers": 3, "use_cosine_sim": True},
}


@pytest.mark.parametrize("name", list(RVQ_OPTIONS))
def test_residual_vq_option_matches_over_20_steps(name):
    kwargs = {"dim": 16, "codebook_size": 32}
    kwargs.update(RVQ_OPTIONS[name])
    theirs, ours = _pair("ResidualVQ", **kwargs)
    results = _run(theirs, ours, (2, 40, 16))
    for step, (a, b) in enumerate(results):
        assert torch.equal(a[1], b[1]), f"step {step}"
        torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[2], a[2], rtol=1e-4, atol=1e-6)
    x = torch.randn(2, 40, 16)
    _, indices, _ = ours.eval()(x)
    torch.testing.assert_close(
        ours.get_output_from_indices(indices), theirs.eval().get_output_from_indices(indices)
    )


def test_residual_vq_quantize_dropout_with_fixed_seed_matches():
    theirs, ours = _pair(
        "ResidualVQ",
        dim=16,
        codebook_size=32,
        num_quantizers=6,
        quantize_dropout=True,
        quantize_dropout_cutoff_index=1,
        quantize_dropout_multiple_of=2,
    )
    results = _run(
        theirs,
        ours,
        (2, 40, 16),
        steps=6,
        forward_kwargs=lambda gen: {
            "rand_quantize_dropout_fixed_seed": int(torch.randint(0, 999, (), generator=gen))
        },
    )
    for a, b in results:
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(b[2], a[2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beam_size", [2, 3])
def test_residual_vq_beam_search_matches(beam_size):
    theirs, ours = _pair("ResidualVQ", dim=16, codebook_size=32, num_quantizers=3, beam_size=beam_size)
    for train in (False, True):
        for a, b in _run(theirs, ours, (2, 30, 16), steps=3 if not train else 1, train=train):
            assert torch.equal(a[1], b[1])
            torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(b[2], a[2], rtol=1e-4, atol=1e-6)
    # Documented difference: after a training beam search every depth's EMA moves along the winning
    # path (vector-quantize-pytorch 1.32 moves only the first depth's).
    torch.testing.assert_close(ours.layers[0]._codebook.embed, theirs.layers[0]._codebook.embed)
    assert all((layer._codebook.cluster_size != 1).any() for layer in ours.layers)


def test_residual_vq_implicit_neural_codebook_matches():
    theirs, ours = _pair(
        "ResidualVQ", dim=16, codebook_size=16, num_quantizers=3, implicit_neural_codebook=True
    )
    results = _run(theirs, ours, (2, 10, 16), steps=3)
    for a, b in results:
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[2], a[2], rtol=1e-4, atol=1e-6)


def test_grouped_residual_vq_matches():
    theirs, ours = _pair("GroupedResidualVQ", dim=16, groups=2, num_quantizers=3, codebook_size=32)
    results = _run(theirs, ours, (2, 40, 16), steps=5)
    for a, b in results:
        assert torch.equal(a[1], b[1]) and b[1].shape == (2, 2, 40, 3)
        torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[2], a[2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("channel_first", [False, True])
def test_sim_vq_matches_over_20_steps(channel_first):
    theirs, ours = _pair("SimVQ", dim=16, codebook_size=64, channel_first=channel_first)
    shape = (2, 16, 6, 5) if channel_first else (2, 40, 16)
    for step, (a, b) in enumerate(_run(theirs, ours, shape)):
        assert torch.equal(a[1], b[1]), f"step {step}"
        torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[2], a[2], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        ours.code_transform.weight.grad, theirs.code_transform.weight.grad, rtol=1e-4, atol=1e-5
    )


def test_residual_sim_vq_matches():
    theirs, ours = _pair("ResidualSimVQ", dim=16, num_quantizers=3, codebook_size=32, quantize_dropout=True)
    results = _run(
        theirs,
        ours,
        (2, 40, 16),
        steps=5,
        forward_kwargs=lambda gen: {
            "rand_quantize_dropout_fixed_seed": int(torch.randint(0, 999, (), generator=gen))
        },
    )
    for a, b in results:
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[2], a[2], rtol=1e-4, atol=1e-6)


def test_random_projection_quantizer_matches():
    theirs, ours = _pair(
        "RandomProjectionQuantizer", dim=16, num_codebooks=2, codebook_dim=8, codebook_size=32
    )
    x = torch.randn(2, 40, 16)
    indices = theirs(x)
    assert torch.equal(ours(x), indices)
    torch.testing.assert_close(ours(x, indices=indices), theirs(x, indices=indices))


def test_residual_vq_image_feature_maps_match_their_token_layout():
    # vector-quantize-pytorch 1.32's ResidualVQ(accept_image_fmap=True) fails on image maps (it stacks
    # channel-first residuals as channel-last), so ours on [B, C, H, W] is compared with theirs on the
    # same features as [B, H*W, C] tokens.
    torch.manual_seed(0)
    theirs = vqp.ResidualVQ(dim=16, codebook_size=32, num_quantizers=3)
    ours = fl.ResidualVQ(dim=16, codebook_size=32, num_quantizers=3, accept_image_fmap=True)
    ours.load_state_dict(theirs.state_dict())
    gen = torch.Generator().manual_seed(2)
    for train in (True, False):
        theirs.train(train)
        ours.train(train)
        for _ in range(3):
            x = torch.randn(2, 16, 5, 6, generator=gen)
            q_ours, i_ours, l_ours = ours(x)
            q_theirs, i_theirs, l_theirs = theirs(x.flatten(2).transpose(1, 2))
            assert i_ours.shape == (2, 5, 6, 3) and torch.equal(i_ours.flatten(1, 2), i_theirs)
            torch.testing.assert_close(q_ours.flatten(2).transpose(1, 2), q_theirs, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(l_ours, l_theirs, rtol=1e-4, atol=1e-6)
