"""Stage-2 priors: DiT, UNet, LatentDiffusion (eps / v / flow), TokenGPT."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlatent.models import (
    ConfigMixin,
    DiT,
    LatentDiffusion,
    TokenGPT,
    UNet,
    load_pretrained,
    register_model,
    top_k_filter,
    top_p_filter,
)
from fastlatent.models.gpt import guided_logits
from fastlatent.sampling import DiscreteSchedule, FlowSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Random weights everywhere (the zero-initialised output layers would hide conditioning)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny_dit(num_classes=3, **kw):
    args = dict(
        input_size=4,
        patch_size=2,
        in_channels=2,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=num_classes,
    )
    args.update(kw)
    return DiT(**args)


# ---------------------------------------------------------------------------------------------------- DiT


def test_dit_shapes_zero_init_and_conditioning():
    torch.manual_seed(0)
    model = tiny_dit(input_size=[4, 8])
    x = torch.randn(3, 2, 4, 8)
    labels = torch.tensor([0, 1, 3])
    out = model(x, torch.tensor([1.0, 500.0, 999.0]), labels)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the final layer starts at zero
    randomize(model)
    a = model(x, 10.0, labels)
    b = model(x, 10.0, torch.tensor([1, 1, 3]))
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1:], b[1:])
    assert not torch.allclose(model(x, 10.0, labels), model(x, 900.0, labels))
    sigma = tiny_dit(learn_sigma=True)
    assert sigma(torch.randn(2, 2, 4, 4), 3.0, torch.tensor([0, 1])).shape == (2, 4, 4, 4)


def test_dit_unpatchify_inverts_patch_layout():
    model = tiny_dit(input_size=[4, 6])
    x = torch.randn(2, 2, 4, 6)
    p = model.patch_size
    # token (i, j) holds the p x p patch's values in (row, column, channel) order
    tokens = x.reshape(2, 2, 2, p, 3, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 6, p * p * 2)
    assert torch.equal(model.unpatchify(tokens), x)


def test_dit_parameter_names_follow_official_dit():
    model = DiT(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=64,
        depth=2,
        num_heads=4,
        num_classes=10,
        learn_sigma=True,
    )
    state = model.state_dict()
    assert state["pos_embed"].shape == (1, 16, 64)
    assert state["y_embedder.embedding_table.weight"].shape == (11, 64)  # + the null class
    assert state["x_embedder.proj.weight"].shape == (64, 4, 2, 2)
    assert state["t_embedder.mlp.0.weight"].shape == (64, 256)
    for key in (
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.proj.bias",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.bias",
        "blocks.0.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
    ):
        assert key in state
    assert state["final_layer.linear.weight"].shape == (2 * 2 * 8, 64)
    # fixed 2-D sin-cos: the first half of the channels encodes the column, the second half the row
    pos = state["pos_embed"][0].view(4, 4, 64)
    assert torch.equal(pos[0, :, :32], pos[3, :, :32]) and torch.equal(pos[:, 0, 32:], pos[:, 2, 32:])


def test_dit_errors():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        DiT(input_size=5, patch_size=2)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiT(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        DiT(num_classes=-1)
    model = tiny_dit()
    with pytest.raises(ValueError, match=r"x must be \[B, 2, 4, 4\]"):
        model(torch.randn(1, 2, 8, 8), 1.0, torch.tensor([0]))
    with pytest.raises(ValueError, match="labels .* are required"):
        model(torch.randn(1, 2, 4, 4), 1.0)
    with pytest.raises(TypeError, match="labels must be an int64 tensor"):
        model(torch.randn(1, 2, 4, 4), 1.0, torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"t must be \[B\]"):
        model(torch.randn(2, 2, 4, 4), torch.ones(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        tiny_dit(num_classes=0)(torch.randn(1, 2, 4, 4), 1.0, torch.tensor([0]))


# ---------------------------------------------------------------------------------------------------- UNet


def tiny_unet(**kw):
    args = dict(
        in_channels=2,
        base_channels=16,
        channel_mult=[1, 2],
        layers_per_block=1,
        attention_levels=[1],
        norm_num_groups=8,
        num_classes=3,
    )
    args.update(kw)
    return UNet(**args)


def test_unet_shapes_conditioning_and_concatenated_image():
    torch.manual_seed(0)
    model = tiny_unet(extra_in_channels=3, attention_head_dim=8)
    x = torch.randn(2, 2, 8, 8)
    cond = torch.randn(2, 3, 4, 4)
    labels = torch.tensor([0, 3])
    out = model(x, torch.tensor([5.0, 50.0]), labels, cond=cond)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # zero-initialised conv_out
    assert any(type(m).__name__ == "AttnBlock" for m in model.down[1].modules())
    assert not any(type(m).__name__ == "AttnBlock" for m in model.down[0].modules())
    randomize(model)
    small = model(x, 5.0, labels, cond=cond)
    full = model(x, 5.0, labels, cond=F.interpolate(cond, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(small, full)  # a smaller cond is nearest-upsampled
    assert not torch.allclose(small, model(x, 5.0, labels, cond=cond + 1))
    assert not torch.allclose(small, model(x, 5.0, torch.tensor([1, 3]), cond=cond))
    unconditional = tiny_unet(num_classes=0, out_channels=5, attention_levels=[])
    assert unconditional(x, 1.0).shape == (2, 5, 8, 8)


def test_unet_errors():
    with pytest.raises(ValueError, match="norm_num_groups .* must divide"):
        tiny_unet(base_channels=12)
    with pytest.raises(ValueError, match="attention_levels"):
        tiny_unet(attention_levels=[2])
    model = tiny_unet(extra_in_channels=1)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 2, 7, 8), 1.0, torch.tensor([0]), cond=torch.randn(1, 1, 7, 8))
    with pytest.raises(ValueError, match=r"cond must be \[B, 1"):
        model(torch.randn(1, 2, 8, 8), 1.0, torch.tensor([0]))
    with pytest.raises(ValueError, match="integer factor"):
        model(torch.randn(1, 2, 8, 8), 1.0, torch.tensor([0]), cond=torch.randn(1, 1, 3, 3))
    with pytest.raises(ValueError, match="cond must be None"):
        tiny_unet()(torch.randn(1, 2, 8, 8), 1.0, torch.tensor([0]), cond=torch.randn(1, 1, 8, 8))


# -------------------------------------------------------------------------------------------- LatentDiffusion


@pytest.mark.parametrize("objective", ["eps", "v", "flow"])
def test_latent_diffusion_loss_matches_hand_computation(objective):
    torch.manual_seed(0)
    schedule = "flow" if objective == "flow" else "cosine"
    prior = LatentDiffusion(randomize(tiny_dit()), objective=objective, schedule=schedule, label_dropout=0.0)
    x0 = torch.randn(2, 2, 4, 4)
    noise = torch.randn(2, 2, 4, 4)
    labels = torch.tensor([0, 2])
    if objective == "flow":
        timesteps = torch.tensor([0.25, 0.8])
        s = timesteps.view(2, 1, 1, 1)
        x_t, model_t, target = (1 - s) * x0 + s * noise, timesteps * 1000, noise - x0
    else:
        timesteps = torch.tensor([10, 700])
        ab = DiscreteSchedule("cosine").alphas_cumprod[timesteps].view(2, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        model_t = timesteps.float()
        target = noise if objective == "eps" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    expected = ((prior.denoiser(x_t, model_t, labels) - target) ** 2).mean()
    got = prior.loss(x0, labels, noise=noise, timesteps=timesteps)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@register_model
class PointMassOracle(nn.Module, ConfigMixin):
    """The exact denoiser of a point mass at ``target``, written from the objectives' definitions."""

    def __init__(self, objective: str, target: list, schedule: str = "linear"):
        super().__init__()
        self.objective, self.in_channels, self.num_classes, self.input_size = (
            objective,
            len(target),
            0,
            [2, 2],
        )
        self.register_buffer("target", torch.tensor(target, dtype=torch.float64).view(1, -1, 1, 1))
        self.alphas_cumprod = DiscreteSchedule(schedule).alphas_cumprod.double()
        self.scale = nn.Parameter(torch.ones(()))  # gives the prior a device and dtype

    def forward(self, x, t, labels=None):
        x = x.double()
        if self.objective == "flow":
            s = (t.double() / 1000).view(-1, 1, 1, 1)
            out = (x - self.target) / s  # noise - x0 with noise = (x - (1 - s) x0) / s
        else:
            ab = self.alphas_cumprod[t.round().long()].view(-1, 1, 1, 1)
            eps = (x - ab.sqrt() * self.target) / (1 - ab).sqrt()
            out = eps if self.objective == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * self.target
        return (out * self.scale).float()


@pytest.mark.parametrize(
    "objective,method", [("eps", "ddim"), ("v", "ddim"), ("v", "dpmpp_2m"), ("flow", "euler")]
)
def test_sampling_inverts_the_training_objective(objective, method):
    # With the exact denoiser of a point mass, a deterministic sampler must land on the point: this pins down
    # the timestep the model sees and the meaning of its output at sampling time, against the training
    # definitions.
    target = [0.7, -1.3]
    schedule = "flow" if objective == "flow" else "linear"
    prior = LatentDiffusion(PointMassOracle(objective, target), objective=objective, schedule=schedule)
    out = prior.sample(3, steps=8, method=method, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        out, torch.tensor(target).view(1, 2, 1, 1).expand(3, 2, 2, 2), atol=2e-3, rtol=0
    )


def test_sample_shapes_determinism_guidance_and_label_order():
    torch.manual_seed(0)
    den = randomize(tiny_dit())
    prior = LatentDiffusion(den, objective="v", schedule="cosine")
    seen = []
    hook = den.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    a = prior.sample(2, labels=[1, 2], steps=4, guidance=3.0, generator=torch.Generator().manual_seed(7))
    hook.remove()
    assert a.shape == (2, 2, 4, 4) and len(seen) == 4
    assert seen[0].tolist() == [3, 3, 1, 2]  # the unconditional half (null class 3) first
    b = prior.sample(
        2, labels=torch.tensor([1, 2]), steps=4, guidance=3.0, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(a, b)
    c = prior.sample(2, labels=[1, 2], steps=4, guidance=3.0, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(a, c)
    plain = prior.sample(2, labels=[1, 2], steps=4, generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(a, plain, atol=1e-3)
    unit = prior.sample(2, labels=[1, 2], steps=4, guidance=1.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(unit, plain, atol=1e-5, rtol=1e-5)  # g = 1 is the conditional model
    assert prior.sample(1, steps=2).shape == (1, 2, 4, 4)  # labels=None: the null class
    assert prior.training  # sampling restores the training mode


def test_label_dropout_and_unconditional_prior():
    torch.manual_seed(0)
    den = tiny_dit()
    prior = LatentDiffusion(den, objective="flow", label_dropout=0.5)
    seen = []
    den.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    prior.training_step((torch.randn(2000, 2, 4, 4), torch.zeros(2000, dtype=torch.int64)), 0)
    dropped = (seen[0] == 3).float().mean().item()
    assert 0.45 < dropped < 0.55 and set(seen[0].tolist()) == {0, 3}
    unconditional = LatentDiffusion(tiny_dit(num_classes=0), objective="eps")
    out = unconditional.training_step(
        (torch.randn(4, 2, 4, 4), torch.tensor([5, 6, 7, 8])), 0
    )  # labels ignored
    assert out["loss"].isfinite()
    with pytest.raises(ValueError, match="unconditional"):
        unconditional.sample(2, labels=[0, 1], steps=2)


def test_latent_diffusion_save_load_copy_and_unet():
    torch.manual_seed(0)
    prior = LatentDiffusion(
        randomize(tiny_unet()), objective="flow", schedule=FlowSchedule(shift=2.0), latent_size=[4, 8]
    )
    assert prior.config["denoiser"]["class"] == "UNet" and prior.config["schedule"]["shift"] == 2.0
    assert all(key.startswith("denoiser.") for key in prior.state_dict())
    expected = prior.sample(2, labels=[0, 1], steps=3, generator=torch.Generator().manual_seed(1))
    assert expected.shape == (2, 2, 4, 8)
    for clone in (copy.deepcopy(prior), LatentDiffusion.from_config(prior.config)):
        clone.load_state_dict(prior.state_dict())
        torch.testing.assert_close(
            clone.sample(2, labels=[0, 1], steps=3, generator=torch.Generator().manual_seed(1)), expected
        )


def test_latent_diffusion_roundtrip_through_save_pretrained(tmp_path):
    prior = LatentDiffusion(
        randomize(tiny_dit()), objective="eps", schedule={"kind": "linear", "beta_end": 0.03}
    )
    prior.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert isinstance(loaded, LatentDiffusion) and loaded.schedule.beta_end == 0.03
    g = torch.Generator
    torch.testing.assert_close(
        loaded.sample(2, labels=1, steps=3, generator=g().manual_seed(0)),
        prior.sample(2, labels=1, steps=3, generator=g().manual_seed(0)),
    )


def test_latent_diffusion_errors():
    dit = tiny_dit()
    with pytest.raises(ValueError, match='objective must be "eps", "v" or "flow"'):
        LatentDiffusion(dit, objective="x0")
    with pytest.raises(ValueError, match='objective "flow" trains on a flow schedule'):
        LatentDiffusion(dit, objective="flow", schedule="linear")
    with pytest.raises(ValueError, match="needs a discrete schedule"):
        LatentDiffusion(dit, objective="eps", schedule="flow")
    with pytest.raises(ValueError, match="unknown schedule options"):
        LatentDiffusion(dit, objective="eps", schedule={"kind": "linear", "shift": 3})
    with pytest.raises(ValueError, match="num_classes=5 but the denoiser"):
        LatentDiffusion(dit, num_classes=5)
    with pytest.raises(ValueError, match="label_dropout must be in"):
        LatentDiffusion(dit, label_dropout=1.0)
    with pytest.raises(TypeError, match="@register_model"):
        LatentDiffusion(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="extra_in_channels=0"):
        LatentDiffusion(tiny_unet(extra_in_channels=1))
    prior = LatentDiffusion(dit, objective="flow")
    with pytest.raises(ValueError, match=r"latents must be a float tensor \[B >= 1, 2, h, w\]"):
        prior.training_step((torch.randn(2, 3, 4, 4), torch.tensor([0, 1])), 0)
    with pytest.raises(ValueError, match="latents must be 4x4"):
        prior.training_step((torch.randn(2, 2, 8, 8), torch.tensor([0, 1])), 0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\]"):
        prior.training_step((torch.randn(2, 2, 4, 4), torch.tensor([0, 4])), 0)
    with pytest.raises(ValueError, match="class-conditional"):
        prior.training_step((torch.randn(2, 2, 4, 4),), 0)
    with pytest.raises(ValueError, match="guidance needs labels"):
        prior.sample(2, guidance=2.0)
    with pytest.raises(ValueError, match=r"labels must have shape \[n\] = \[2\]"):
        prior.sample(2, labels=[0, 1, 2])
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        prior.sample(0)
    with pytest.raises(ValueError, match="latent size is unknown"):
        LatentDiffusion(tiny_unet()).sample(1, labels=0)
    learned_variance = LatentDiffusion(tiny_dit(learn_sigma=True))
    assert learned_variance.sample(2, labels=0, steps=2).shape == (2, 2, 4, 4)  # the eps channels only
    with pytest.raises(ValueError, match="learn_sigma=True"):
        learned_variance.training_step((torch.randn(2, 2, 4, 4), torch.tensor([0, 1])), 0)


@pytest.mark.cuda
def test_priors_on_cuda_with_graph_capture():
    torch.manual_seed(0)
    prior = LatentDiffusion(randomize(tiny_dit()), objective="flow").cuda()
    kwargs = dict(labels=[0, 2], steps=4, guidance=2.0)
    eager = prior.sample(2, generator=torch.Generator().manual_seed(0), **kwargs)
    assert eager.is_cuda
    for _ in range(2):  # capture, then replay with fresh noise from the same seed
        graphed = prior.sample(2, generator=torch.Generator().manual_seed(0), capture_graph=True, **kwargs)
        torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)
    loss = prior.training_step(
        (torch.randn(4, 2, 4, 4, device="cuda"), torch.tensor([0, 1, 2, 3], device="cuda")), 0
    )
    assert loss["loss"].is_cuda and loss["loss"].isfinite()
    gpt = tiny_gpt().cuda().eval()
    tokens = torch.randint(0, 11, (2, 8), device="cuda")
    labels = torch.tensor([0, 1], device="cuda")
    cache = gpt.new_cache(2)
    steps = [gpt(tokens[:, :0], labels, cache)] + [gpt(tokens[:, i : i + 1], cache=cache) for i in range(7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), gpt(tokens[:, :-1], labels), atol=1e-4, rtol=1e-4)
    generator = torch.Generator("cuda").manual_seed(0)
    assert gpt.sample(3, labels=1, top_p=0.9, guidance=1.5, generator=generator).shape == (3, 8)
    with pytest.raises(ValueError, match="generator is on cpu but the model is on cuda"):
        gpt.sample(1, labels=1, generator=torch.Generator())


@pytest.mark.parametrize("objective,schedule,method", [("flow", "flow", "euler"), ("v", "cosine", "ddim")])
def test_latent_diffusion_learns_two_class_clusters(objective, schedule, method):
    # class 0 lives around +1, class 1 around -1: a conditional prior must put each class's samples in its
    # cluster
    torch.manual_seed(0)
    prior = LatentDiffusion(
        tiny_dit(num_classes=2), objective=objective, schedule=schedule, label_dropout=0.2
    )
    optimizer = torch.optim.AdamW(prior.parameters(), lr=2e-3)
    for step in range(300):
        labels = torch.randint(0, 2, (64,))
        latents = (1 - 2 * labels.float()).view(-1, 1, 1, 1) + 0.1 * torch.randn(64, 2, 4, 4)
        loss = prior.training_step((latents, labels), step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    samples = prior.sample(
        32, labels=[0] * 16 + [1] * 16, steps=20, method=method, generator=torch.Generator().manual_seed(1)
    )
    means = samples.mean(dim=(1, 2, 3))
    assert (means[:16] > 0.3).all() and (means[16:] < -0.3).all(), means
    assert abs(means[:16].mean() - 1) < 0.2 and abs(means[16:].mean() + 1) < 0.2, means


# --------------------------------------------------------------------------------------------------- TokenGPT


def tiny_gpt(num_classes=3, **kw):
    args = dict(vocab_size=11, seq_len=8, num_classes=num_classes, dim=32, depth=2, num_heads=2)
    args.update(kw)
    return TokenGPT(**args)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_gpt_cached_logits_equal_full_forward(num_classes):
    torch.manual_seed(0)
    model = tiny_gpt(num_classes).eval()
    tokens = torch.randint(0, 11, (2, 8))
    labels = torch.tensor([0, 3]) if num_classes else None
    full = model(tokens[:, :-1], labels)
    assert full.shape == (2, 8, 11)
    cache = model.new_cache(2)
    steps = [model(tokens[:, :0], labels, cache)]
    steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # a prefix, then several positions at once (an offset causal mask)
    cache = model.new_cache(2)
    head = model(tokens[:, :2], labels, cache)
    tail = model(tokens[:, 2:7], cache=cache)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at most seq_len = 8 positions"):
        model(tokens[:, :1], cache=cache)


def test_top_k_top_p_and_guidance_on_hand_made_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, -1.0]])
    inf = float("-inf")
    assert torch.equal(
        top_k_filter(logits, 2), torch.tensor([[inf, 3.0, 2.0, inf], [0.0, 0.0, 5.0, inf]])
    )  # ties kept
    assert torch.equal(top_k_filter(logits, 10), logits)
    probs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(top_p_filter(probs, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(probs, 0.6)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(probs, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(probs, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(probs[:, [3, 1, 0, 2]], 0.6)).tolist() == [[False, True, True, False]]
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    stacked = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # [uncond; cond]
    torch.testing.assert_close(guided_logits(stacked, 2.5), torch.tensor([[1 + 2.5 * 2, 2 + 2.5 * -2]]))
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        top_k_filter(logits, 0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        top_p_filter(logits, 0.0)


def test_gpt_greedy_guided_sampling_follows_the_formula():
    torch.manual_seed(0)
    model = tiny_gpt()
    with torch.no_grad():  # larger embeddings and head than at init: labels then change the greedy choices
        for weight in (model.head.weight, model.class_emb.weight, model.tok_emb.weight):
            weight.normal_(0, 1.0)
    g, labels = 2.0, torch.tensor([0, 2])
    null = torch.full_like(labels, 3)

    def greedy(combine):
        tokens = torch.empty(2, 0, dtype=torch.int64)
        with torch.no_grad():
            for _ in range(8):
                u, c = model(tokens, null)[:, -1], model(tokens, labels)[:, -1]
                tokens = torch.cat([tokens, combine(u, c).argmax(-1, keepdim=True)], dim=1)
        return tokens

    expected = greedy(lambda u, c: u + g * (c - u))
    # the check can tell the formula from plain conditional decoding and from swapped halves
    assert not torch.equal(expected, greedy(lambda u, c: c))
    assert not torch.equal(expected, greedy(lambda u, c: c + g * (u - c)))
    sampled = model.sample(2, labels=labels, top_k=1, guidance=g, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, expected)
    first = model.sample(4, labels=1, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(3))
    again = model.sample(4, labels=1, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and first.shape == (4, 8) and first.dtype == torch.int64
    assert model.training


def test_gpt_errors_and_save_load(tmp_path):
    model = tiny_gpt()
    tokens = torch.randint(0, 11, (2, 8))
    for kwargs, match in (
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(top_p=1.5), r"top_p must be None or in \(0, 1\]"),
        (dict(top_k=0), "top_k must be None or an int >= 1"),
        (dict(labels=[0, 4]), r"labels must be in \[0, 3\]"),
        (dict(guidance=2.0), "guidance needs labels"),
    ):
        with pytest.raises(ValueError, match=match):
            model.sample(2, **kwargs)
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 10\]"):
        model.training_step((tokens + 5, torch.tensor([0, 1])), 0)
    with pytest.raises(ValueError, match=r"tokens must be an integer tensor \[B, 8\]"):
        model.training_step((tokens[:, :6], torch.tensor([0, 1])), 0)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_gpt(0).sample(2, labels=0)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TokenGPT(11, 8, dim=30, num_heads=4)
    out = model.training_step((tokens, torch.tensor([0, 1])), 0)
    assert out["loss"].isfinite() and 0 <= out["accuracy"] <= 1
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert isinstance(loaded, TokenGPT) and loaded.config == model.config
    torch.testing.assert_close(
        loaded.sample(2, labels=[0, 1], generator=torch.Generator().manual_seed(0)),
        model.sample(2, labels=[0, 1], generator=torch.Generator().manual_seed(0)),
    )


def test_gpt_learns_class_dependent_sequences():
    torch.manual_seed(0)
    sequences = torch.tensor([[(3 * c + 5 * i * (c + 1)) % 11 for i in range(8)] for c in range(3)])
    model = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(250):
        labels = torch.randint(0, 3, (32,))
        out = model.training_step((sequences[labels], labels), step)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    labels = torch.tensor([0, 1, 2] * 4)
    greedy = model.sample(
        12, labels=labels, top_k=1, guidance=2.0, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(greedy, sequences[labels])
    sampled = model.sample(12, labels=labels, generator=torch.Generator().manual_seed(0))
    assert (sampled == sequences[labels]).float().mean() > 0.9
