"""DPM-Solver++(2M) over a flow-matching schedule: the plan and trajectory of diffusers'
``DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")``, sampling a known
distribution, and the latent diffusion prior using it.

Tolerances follow tests/test_sampling.py: relative to the largest value of the expected tensor.
"""

import math

import pytest
import torch

from fastlatent.models import LatentDiffusion, UNet
from fastlatent.sampling import FlowSchedule, Sampler

T = 1000


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


class _TimeDependentModel:
    """A toy velocity model whose output depends on x, t and cond (so a timestep mismatch shows)."""

    def __init__(self, channels=4, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.w = 0.2 * torch.randn(channels, channels, generator=gen)

    def __call__(self, x, t, cond=None):
        mixed = torch.einsum("bchw,cd->bdhw", x, self.w.to(x.dtype))
        out = x * torch.cos(3 * t / T).to(x.dtype)[:, None, None, None] + mixed
        return out if cond is None else out + cond


def _diffusers_dpm(shift, steps):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift, num_train_timesteps=T
    )
    scheduler.set_timesteps(steps)
    return scheduler


def test_dpmpp_2m_over_flow_schedule_constructs_and_samples():
    """The reported bug: the first step had sigma = 1 (alpha = 0) and the op rejected it."""
    sampler = Sampler("dpmpp_2m", FlowSchedule())
    first = sampler.plan[0]
    alpha_t, sigma_t = first.args[:2]
    assert 0.0 < alpha_t and 0.0 < sigma_t < 1.0
    out = sampler.sample(_TimeDependentModel(), torch.randn(1, 4, 4, 4), progress=False)
    assert out.shape == (1, 4, 4, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_flow_plan_equals_diffusers_sigmas_and_timesteps(shift, steps):
    theirs = _diffusers_dpm(shift, steps)
    plan = Sampler("dpmpp_2m", FlowSchedule(shift=shift), steps).plan
    assert [step.timestep for step in plan] == [float(t) for t in theirs.timesteps]
    sigmas = [step.args[1] for step in plan] + [plan[-1].args[3]]
    assert sigmas == theirs.sigmas.tolist()
    for step in plan:
        alpha_t, sigma_t, alpha_next, sigma_next = step.args
        assert alpha_t == 1.0 - sigma_t and alpha_next == 1.0 - sigma_next
    # second order everywhere but the first step and the last one (to sigma = 0), as diffusers' solver_order=2
    assert [step.second_order for step in plan] == [0 < i < steps - 1 for i in range(steps)]


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [5, 50])
def test_flow_trajectory_matches_diffusers_loop(shift, steps):
    """Whole trajectories with a t-dependent model: 1e-4 relative, as tests/test_sampling.py's loops."""
    theirs = _diffusers_dpm(shift, steps)
    x_start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    model = _TimeDependentModel()
    x = x_start * theirs.init_noise_sigma
    for t in theirs.timesteps:
        x = theirs.step(model(x, t.float().expand(2)), t, x).prev_sample
    ours = Sampler("dpmpp_2m", FlowSchedule(shift=shift), steps).sample(model, x_start, progress=False)
    assert _rel_err(ours, x) <= 1e-4


def test_flow_trajectory_with_guidance_matches_diffusers_loop():
    theirs = _diffusers_dpm(2.0, 12)
    x_start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    cond = torch.cat(
        [torch.zeros(1, 4, 1, 1), torch.randn(1, 4, 1, 1, generator=torch.Generator().manual_seed(5))]
    )
    model, scale = _TimeDependentModel(), 3.0
    x = x_start.clone()
    for t in theirs.timesteps:
        uncond, conditional = model(torch.cat([x, x]), t.float().expand(2), cond).chunk(2)
        x = theirs.step(uncond + scale * (conditional - uncond), t, x).prev_sample
    ours = Sampler("dpmpp_2m", FlowSchedule(shift=2.0), 12).sample(
        model, x_start, cond, guidance=scale, progress=False
    )
    assert _rel_err(ours, x) <= 1e-4


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_fast_dpm_scheduler_with_flow_sigmas_matches_diffusers(shift):
    """The drop-in scheduler steps the same flow plan as diffusers' (per step, 1e-5 relative)."""
    pytest.importorskip("diffusers")
    from fastlatent.sampling.schedulers import FastDPMSolverMultistepScheduler

    config = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    ours, theirs = FastDPMSolverMultistepScheduler(**config), _diffusers_dpm(shift, 20)
    ours.set_timesteps(20)
    model = _TimeDependentModel()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    for t in theirs.timesteps:
        out = model(x, t.float().expand(2))
        a, b = ours.step(out, t, x).prev_sample, theirs.step(out, t, x).prev_sample
        assert _rel_err(a, b) <= 1e-5
        x = b


def test_dpmpp_2m_flow_samples_a_gaussian_with_the_exact_velocity():
    """Data N(mu, s^2) per element has the closed-form velocity E[noise - x0 | x_sigma]; dpmpp_2m with it
    must land on N(mu, s^2) (mean and std within sampling error plus discretisation), and agree with a
    fine euler."""
    mu, s = 0.7, 0.3

    def velocity(x, t, cond=None):
        # the model sees an integer t for dpmpp_2m: recover sigma to within 1/T, as a trained model would
        sigma = (t / T).clamp(1e-4, 1.0).to(x.dtype)[:, None, None, None]
        alpha = 1 - sigma
        var = alpha**2 * s**2 + sigma**2
        centered = x - alpha * mu
        x0 = mu + alpha * s**2 / var * centered
        eps = sigma / var * centered
        return eps - x0

    x_start = torch.randn(4096, 1, 1, 1, generator=torch.Generator().manual_seed(7))
    schedule = FlowSchedule(shift=3.0)
    out = Sampler("dpmpp_2m", schedule, 50).sample(velocity, x_start, progress=False)
    fine = Sampler("euler", schedule, 400).sample(velocity, x_start, progress=False)
    standard_error = s / math.sqrt(x_start.numel())
    assert abs(out.mean().item() - mu) < 5 * standard_error
    assert abs(out.std().item() - s) < 0.01
    assert (out - fine).abs().max().item() < 0.02
    # second order: at 15 steps, closer to the right spread than euler's first-order steps
    few = Sampler("dpmpp_2m", schedule, 15).sample(velocity, x_start, progress=False)
    few_euler = Sampler("euler", schedule, 15).sample(velocity, x_start, progress=False)
    assert abs(few.std().item() - s) < abs(few_euler.std().item() - s)


def test_latent_diffusion_flow_samples_with_dpmpp_2m():
    torch.manual_seed(0)
    denoiser = UNet(
        in_channels=2,
        base_channels=8,
        channel_mult=[1, 2],
        layers_per_block=1,
        attention_levels=[],
        mid_attention=False,
        num_classes=3,
        norm_num_groups=4,
    )
    prior = LatentDiffusion(
        denoiser, objective="flow", schedule={"kind": "flow", "shift": 2.0}, latent_size=4
    )
    # a non-zero output layer, so the sampled latents depend on the model, not only on the noise
    torch.nn.init.normal_(prior.denoiser.conv_out.weight, std=0.05)
    gen = torch.Generator().manual_seed(1)
    a = prior.sample(3, labels=[0, 1, 2], steps=6, guidance=2.0, method="dpmpp_2m", generator=gen)
    b = prior.sample(
        3,
        labels=[0, 1, 2],
        steps=6,
        guidance=2.0,
        method="dpmpp_2m",
        generator=torch.Generator().manual_seed(1),
    )
    euler = prior.sample(
        3, labels=[0, 1, 2], steps=6, guidance=2.0, method="euler", generator=torch.Generator().manual_seed(1)
    )
    assert a.shape == (3, 2, 4, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, euler)
