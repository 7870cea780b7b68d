"""DiffusionDecoderAutoencoder (DGAE): the stage-1 protocol, the flow objective against a hand computation,
sampled decoding (determinism, steps, methods), save/load, input errors, DGAETask (weights by hand,
validation, the trainer) and learnability on the digits."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fastlatent.data import DigitsDataset
from fastlatent.models import (
    AutoencoderKL,
    DGAETask,
    DiffusionDecoderAutoencoder,
    LatentDiffusion,
    TwoStagePipeline,
    UNet,
    load_pretrained,
)
from fastlatent.models.dgae import sample_flow_times
from fastlatent.sampling import FlowSchedule
from fastlatent.training import Trainer, TrainerConfig

# f2 SD-VAE encoder (2 levels) and a 2-level UNet decoder, grey images
TINY = dict(
    in_channels=1,
    block_out_channels=[16, 32],
    layers_per_block=1,
    latent_channels=2,
    norm_num_groups=8,
    mid_block_add_attention=False,
    decoder_channels=16,
    decoder_channel_mult=[1, 2],
    decoder_layers_per_block=1,
    decoder_attention_levels=[],
    decoder_mid_attention=False,
    decoder_attention_head_dim=None,
    decoder_norm_num_groups=8,
    decode_steps=3,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def images(n=2, channels=1, size=16, seed=0):
    return torch.rand(n, channels, size, size, generator=gen(seed)) * 2 - 1


def tiny_dgae(seed=0, **overrides):
    """A DGAE whose decoder output layer is not zero (as the UNet initialises it), so velocities depend on the
    weights and a wrong input shows."""
    torch.manual_seed(seed)
    ae = DiffusionDecoderAutoencoder(**{**TINY, **overrides})
    with torch.no_grad():
        ae.decoder.conv_out.weight.normal_(0.0, 0.05, generator=gen(seed + 100))
        ae.decoder.conv_out.bias.normal_(0.0, 0.05, generator=gen(seed + 101))
    return ae


# ---------------------------------------------------------------------------------------------- protocol


def test_protocol_attributes_and_shapes():
    ae = tiny_dgae()
    x = images()
    assert ae.is_discrete is False and ae.latent_channels == 2 and ae.downsample_factor == 2
    assert ae.in_channels == ae.out_channels == 1
    assert ae.scaling_factor == 1.0 and ae.shift_factor == 0.0
    assert ae.last_layer_weight is ae.decoder.conv_out.weight
    z = ae.encode(x)
    assert z.shape == (2, 2, 8, 8)
    torch.testing.assert_close(z, ae.posterior(x).mean)
    drawn = ae.encode(x, sample=True, generator=gen(1))
    torch.testing.assert_close(drawn, ae.posterior(x).sample(gen(1)))
    assert not torch.allclose(drawn, z)
    decoded = ae.decode(z, generator=gen(2))
    assert decoded.shape == x.shape and torch.isfinite(decoded).all() and not decoded.requires_grad


def test_forward_training_and_eval_outputs():
    ae = tiny_dgae()
    x = images()
    ae.train()
    out = ae(x, generator=gen(3))
    assert set(out.losses) == {"flow", "kl", "x0_mse"}
    assert all(v.dim() == 0 and torch.isfinite(v) and v.dtype == torch.float32 for v in out.losses.values())
    assert out.reconstruction is out.stats["x0_estimate"] and out.reconstruction.shape == x.shape
    assert out.reconstruction.requires_grad  # LPIPS on it trains the decoder and the encoder
    s = out.stats["timesteps"]
    assert s.shape == (2,) and bool(((s >= 0) & (s <= 1)).all())
    posterior = out.stats["posterior"]
    torch.testing.assert_close(out.losses["kl"], posterior.kl().mean())
    torch.testing.assert_close(out.latents, posterior.sample(gen(3)))  # training decodes a posterior draw
    # eval: the posterior mean, and the sampler's decode (its noise is the generator's first draw)
    ae.eval()
    out = ae(x, generator=gen(4))
    torch.testing.assert_close(out.latents, ae.encode(x))
    torch.testing.assert_close(out.reconstruction, ae.decode(ae.encode(x), generator=gen(4)))
    assert set(out.losses) == {"flow", "kl", "x0_mse"}


def test_flow_objective_matches_hand_computation():
    ae = tiny_dgae(flow_shift=2.0, num_train_timesteps=500)
    x = images(seed=5)
    noise = torch.randn(x.shape, generator=gen(6))
    s = torch.tensor([0.25, 0.9])
    out = ae(x, sample_posterior=False, noise=noise, timesteps=s, decode=False)
    z = ae.encode(x)
    s_ = s.view(2, 1, 1, 1)
    x_t = (1 - s_) * x + s_ * noise
    # the decoder sees noise concatenated with the nearest-upsampled latent, and the time s * T
    v = ae.decoder(x_t, s * 500, cond=F.interpolate(z, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(out.losses["flow"], ((v - (noise - x)) ** 2).mean())
    x0 = x_t - s_ * v
    torch.testing.assert_close(out.reconstruction, x0)
    torch.testing.assert_close(out.losses["x0_mse"], ((x0 - x) ** 2).mean())
    # x0 - x = s * (target - v): the x0 error is the flow error weighted by s^2
    per_image = ((v - (noise - x)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(out.losses["x0_mse"], (s**2 * per_image).mean())
    # the flow loss trains the encoder through the conditioning
    out.losses["flow"].backward()
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_training_times_are_drawn_and_shifted_as_latent_diffusion(time_sampling):
    schedule = FlowSchedule(shift=3.0)
    s = sample_flow_times(4096, schedule, time_sampling, gen(7), torch.device("cpu"))
    u = (
        torch.rand(4096, generator=gen(7))
        if time_sampling == "uniform"
        else torch.sigmoid(torch.randn(4096, generator=gen(7)))
    )
    torch.testing.assert_close(s, 3 * u / (1 + 2 * u))
    assert 0.0 <= float(s.min()) and float(s.max()) <= 1.0
    # the forward pass draws the same times from the same generator (after the noise)
    ae = tiny_dgae(flow_shift=3.0, time_sampling=time_sampling)
    x = images()
    g = gen(8)
    torch.randn(x.shape, generator=g)
    expected = sample_flow_times(2, schedule, time_sampling, g, torch.device("cpu"))
    out = ae(x, sample_posterior=False, decode=False, generator=gen(8))
    torch.testing.assert_close(out.stats["timesteps"], expected)


# ---------------------------------------------------------------------------------------------- decoding


def test_decode_is_deterministic_per_generator_and_steps_matter():
    ae = tiny_dgae()
    z = ae.encode(images())
    a = ae.decode(z, generator=gen(10))
    torch.testing.assert_close(ae.decode(z, generator=gen(10)), a, rtol=0, atol=0)
    assert not torch.allclose(ae.decode(z, generator=gen(11)), a)
    assert not torch.allclose(ae.decode(z, steps=8, generator=gen(10)), a)
    dpm = ae.decode(z, method="dpmpp_2m", steps=4, generator=gen(10))
    assert torch.isfinite(dpm).all() and not torch.allclose(dpm, ae.decode(z, steps=4, generator=gen(10)))
    # a given noise tensor is the generator's draw
    noise = torch.randn(2, 1, 16, 16, generator=gen(10))
    torch.testing.assert_close(ae.decode(z, noise=noise), a)
    # decoding leaves the training flags alone
    ae.train()
    ae.decode(z, generator=gen(10))
    assert all(m.training for m in ae.modules())


def test_one_euler_step_decode_by_hand():
    """One euler step over the flow schedule goes from s = 1 to 0: x0 = noise - v(noise, T, z)."""
    ae = tiny_dgae()
    z = ae.encode(images())
    noise = torch.randn(2, 1, 16, 16, generator=gen(12))
    with torch.no_grad():
        expected = noise - ae.decoder(noise, torch.full((2,), 1000.0), cond=z)
    torch.testing.assert_close(ae.decode(z, steps=1, method="euler", noise=noise), expected)
    clipped = ae.decode(z, steps=1, noise=noise, clip_x0=0.1)
    torch.testing.assert_close(clipped, expected.clamp(-0.1, 0.1))


def test_save_load_round_trip_reproduces_decode(tmp_path):
    ae = tiny_dgae(flow_shift=1.5, decode_method="dpmpp_2m")
    x = images(4)
    shift, scale = ae.fit_latent_scale(x)
    assert ae.shift_factor == shift and ae.scaling_factor == scale
    ae.save_pretrained(tmp_path / "dgae")
    loaded = load_pretrained(tmp_path / "dgae", expected=DiffusionDecoderAutoencoder)
    assert type(loaded) is DiffusionDecoderAutoencoder and loaded.config == ae.config
    assert loaded.scaling_factor == scale and loaded.shift_factor == shift
    assert loaded.decode_method == "dpmpp_2m" and loaded.flow_schedule == ae.flow_schedule
    z = ae.encode(x)
    torch.testing.assert_close(loaded.encode(x), z, rtol=0, atol=0)
    torch.testing.assert_close(
        loaded.decode(z, generator=gen(13)), ae.decode(z, generator=gen(13)), rtol=0, atol=0
    )


def test_copies_drop_cached_samplers_and_decode_the_same():
    ae = tiny_dgae()
    z = ae.encode(images())
    expected = ae.decode(z, generator=gen(14))
    assert ae._samplers
    clone = copy.deepcopy(ae)  # the trainer's EMA copies the model
    assert clone._samplers == {}
    torch.testing.assert_close(clone.decode(z, generator=gen(14)), expected, rtol=0, atol=0)


def test_two_stage_pipeline_with_dgae(tmp_path):
    ae = tiny_dgae()
    ae.fit_latent_scale(images(4))
    torch.manual_seed(0)
    prior = LatentDiffusion(
        UNet(
            in_channels=2,
            base_channels=8,
            channel_mult=[1],
            layers_per_block=1,
            attention_levels=[],
            mid_attention=False,
            num_classes=3,
            norm_num_groups=4,
        ),
        objective="flow",
        latent_size=8,
    )
    pipe = TwoStagePipeline(ae, prior)
    assert pipe.image_size == [16, 16]
    kwargs = dict(labels=[0, 2], steps=2, decode_kwargs={"steps": 2, "generator": gen(16)})
    out = pipe.sample(2, generator=gen(15), **kwargs)
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    pipe.save(tmp_path / "pipe")
    loaded = TwoStagePipeline.load(tmp_path / "pipe")
    kwargs["decode_kwargs"]["generator"] = gen(16)
    torch.testing.assert_close(loaded.sample(2, generator=gen(15), **kwargs), out)


# ---------------------------------------------------------------------------------------------- errors


def test_constructor_errors():
    with pytest.raises(ValueError, match="time_sampling must be one of"):
        DiffusionDecoderAutoencoder(**{**TINY, "time_sampling": "beta"})
    with pytest.raises(ValueError, match="decode_method must be one of"):
        DiffusionDecoderAutoencoder(**{**TINY, "decode_method": "ddim"})
    with pytest.raises(ValueError, match="flow_shift must be a finite number > 0"):
        DiffusionDecoderAutoencoder(**{**TINY, "flow_shift": 0.0})
    with pytest.raises(ValueError, match="decode_steps must be an int >= 1"):
        DiffusionDecoderAutoencoder(**{**TINY, "decode_steps": 0})
    with pytest.raises(TypeError, match="use_quant_conv must be a bool"):
        DiffusionDecoderAutoencoder(**{**TINY, "use_quant_conv": 1})
    with pytest.raises(
        ValueError, match=r"DiffusionDecoderAutoencoder: the decoder's arguments .* channel_mult"
    ):
        DiffusionDecoderAutoencoder(**{**TINY, "decoder_channel_mult": []})
    with pytest.raises(ValueError, match=r"decoder's arguments .* norm_num_groups \(8\) must divide"):
        DiffusionDecoderAutoencoder(**{**TINY, "decoder_channels": 12})
    with pytest.raises(ValueError, match="block_out_channels"):
        DiffusionDecoderAutoencoder(**{**TINY, "block_out_channels": [12, 32]})


def test_input_errors():
    ae = tiny_dgae()
    x = images()
    with pytest.raises(ValueError, match=r"DiffusionDecoderAutoencoder: x must have shape \[B, 1, H, W\]"):
        ae(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="multiples of the downsampling factor 2"):
        ae.encode(torch.zeros(2, 1, 16, 15))
    with pytest.raises(TypeError, match="floating-point"):
        ae(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"noise must have the shape of x \[2, 1, 16, 16\]"):
        ae(x, noise=torch.zeros(2, 1, 8, 8), decode=False)
    with pytest.raises(ValueError, match=r"timesteps must be a float tensor \[B\] = \[2\]"):
        ae(x, timesteps=torch.tensor([0.5]), decode=False)
    with pytest.raises(ValueError, match=r"timesteps must be flow times in \[0, 1\]"):
        ae(x, timesteps=torch.tensor([0.5, 1.5]), decode=False)
    z = ae.encode(x)
    with pytest.raises(ValueError, match=r"decode: z must have shape \[B, 2, H, W\]"):
        ae.decode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        ae.decode(z, steps=0)
    with pytest.raises(ValueError, match="method must be one of"):
        ae.decode(z, method="ddpm")
    with pytest.raises(ValueError, match=r"noise must be a float tensor \[2, 1, 16, 16\]"):
        ae.decode(z, noise=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="clip_x0 must be a number > 0"):
        ae.decode(z, clip_x0=-1.0)
    # a 3-level UNet needs image sides that are multiples of 4: the latent 3x3 decodes to 6x6
    deep = tiny_dgae(decoder_channel_mult=[1, 1, 2])
    assert deep.image_multiple == 4
    with pytest.raises(ValueError, match="needs sides that are multiples of 4"):
        deep.decode(torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="multiples of the downsampling factor 4"):
        deep(torch.zeros(1, 1, 6, 6))


def test_task_errors():
    with pytest.raises(TypeError, match="must be a DiffusionDecoderAutoencoder"):
        DGAETask(AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=[8], norm_num_groups=4))
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
        DGAETask(tiny_dgae(), kl_weight=-1.0, perceptual_weight=0.0)
    with pytest.raises(ValueError, match="LPIPS compares grey or RGB images"):
        DGAETask(tiny_dgae(in_channels=2), pretrained_lpips=False)
    task = DGAETask(tiny_dgae(), perceptual_weight=0.0)
    with pytest.raises(TypeError, match=r"expected image tensors \[B, C, H, W\]"):
        task.training_step({"images": images()}, 0)


# ---------------------------------------------------------------------------------------------- task


def test_task_loss_weights_by_hand():
    ae = tiny_dgae()
    # alexnet's trunk is the cheapest to build at random (LPIPS-alex needs 31+ pixels)
    task = DGAETask(
        ae,
        flow_weight=1.5,
        kl_weight=1e-3,
        perceptual_weight=0.5,
        reconstruction_weight=2.0,
        lpips_net="alex",
        pretrained_lpips=False,
    )
    x = images(size=32)
    torch.manual_seed(20)
    out = task.training_step((x, torch.zeros(2, dtype=torch.long)), step=0)
    torch.manual_seed(20)
    reference = ae(x, decode=False)
    perceptual = task.perceptual(x, reference.reconstruction).mean()
    expected = (
        1.5 * reference.losses["flow"]
        + 1e-3 * reference.losses["kl"]
        + 2.0 * reference.losses["x0_mse"]
        + 0.5 * perceptual
    )
    torch.testing.assert_close(out["loss"], expected)
    assert set(out) == {"loss", "flow", "kl", "x0_mse", "perceptual_loss"}
    torch.testing.assert_close(out["perceptual_loss"], perceptual.detach())
    assert not any(k.startswith("perceptual") for k in task.state_dict())
    out["loss"].backward()
    assert ae.encoder.conv_in.weight.grad is not None and ae.decoder.conv_out.weight.grad is not None


def test_validation_step_is_seeded_and_restores_mode():
    task = DGAETask(tiny_dgae(), perceptual_weight=0.0)
    x = images()
    first = task.validation_step((x, None), steps=2)
    again = task.validation_step(x, steps=2)
    assert set(first) == {"flow", "x0_mse", "mse", "psnr"}
    for key in first:
        torch.testing.assert_close(first[key], again[key], rtol=0, atol=0)
    assert task.training and all(m.training for m in task.modules())


def test_trainer_runs_dgae_task_with_bf16_and_ema(tmp_path):
    torch.manual_seed(0)
    task = DGAETask(tiny_dgae(), perceptual_weight=0.0)
    data = [(x, 0) for x in images(8)]
    config = TrainerConfig(
        out_dir=str(tmp_path),
        steps=3,
        batch_size=4,
        lr=1e-3,
        precision="bf16",
        ema_decay=0.9,
        plots=False,
        progress=False,
        log_every=1,
    )
    summary = Trainer(task, config).fit(data)
    assert math.isfinite(summary["loss"]) and math.isfinite(summary["flow"])


def test_learns_on_digits():
    """A hundred updates on 8x8 training digits: on held-out digits, the flow loss and the one-step x0 error
    at fixed noise and times drop, and the sampled reconstructions get sharper (PSNR)."""
    torch.manual_seed(0)
    train = DigitsDataset("train", size=8).images
    held_out = DigitsDataset("test", size=8).images[:128]
    ae = DiffusionDecoderAutoencoder(**TINY)
    task = DGAETask(ae, perceptual_weight=0.0)
    noise = torch.randn(held_out.shape, generator=gen(1))
    times = torch.rand(held_out.shape[0], generator=gen(2))

    def evaluate():
        with torch.no_grad():
            out = ae.eval()(held_out, noise=noise, timesteps=times, decode=False)
        ae.train()
        psnr = task.validation_step(held_out[:64], steps=4)["psnr"]
        return float(out.losses["flow"]), float(out.losses["x0_mse"]), float(psnr)

    flow_before, x0_before, psnr_before = evaluate()
    optimizer = torch.optim.Adam(task.parameters(), lr=3e-3)
    order = gen(3)
    for step in range(100):
        batch = train[torch.randint(0, train.shape[0], (16,), generator=order)]
        loss = task.training_step(batch, step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flow_after, x0_after, psnr_after = evaluate()
    assert flow_after < 0.5 * flow_before
    assert x0_after < 0.4 * x0_before
    assert psnr_after > psnr_before + 6.0


@pytest.mark.cuda
def test_cuda_decode_matches_cpu_and_graph_replay():
    ae = tiny_dgae()
    z = ae.encode(images())
    expected = ae.decode(z, generator=gen(30))
    gpu = copy.deepcopy(ae).cuda()
    # a CPU generator draws the same noise for either device
    got = gpu.decode(z.cuda(), generator=gen(30))
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-2, atol=1e-2)  # cuDNN may use TF32
    captured = gpu.decode(z.cuda(), generator=gen(30), capture_graph=True)
    replayed = gpu.decode(z.cuda(), generator=gen(30), capture_graph=True)
    torch.testing.assert_close(captured, got, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(replayed, captured, rtol=0, atol=0)
