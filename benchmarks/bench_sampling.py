"""Sampler loops and fused steps against diffusers' schedulers and the unfused reference.

- CPU (the issue's bar): a 50-step loop with the model excluded (a fixed model output), 8x4x64x64
  fp32, for ddim, euler, dpmpp_2m and flow-matching euler: fastlatent's Sampler loop, fastlatent's
  drop-in diffusers schedulers, diffusers' schedulers, and the plain eager reference (float64, unfused).
- CUDA: one guided step's bandwidth at 16x4x128x128 and 16x16x64x64 (bytes it must move over the
  H100's 3.35 TB/s), the 50-step loop vs diffusers, and a graph-captured vs eager 50-step sampling
  of a small latent model at batch 1.
"""

import pytest
import torch

import fastlatent
from conftest import device_name, timed
from fastlatent import reference
from fastlatent.sampling import FlowSchedule, Sampler

H100_PEAK_BYTES = 3.35e12
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

# method, schedule, diffusers class, its config
LOOPS = {
    "ddim": ("ddim", "scaled_linear", "DDIMScheduler", dict(SD, clip_sample=False)),
    "euler": ("euler", "scaled_linear", "EulerDiscreteScheduler", dict(SD)),
    "dpmpp_2m": ("dpmpp_2m", "scaled_linear", "DPMSolverMultistepScheduler", dict(SD)),
    "flow_euler": ("euler", FlowSchedule(shift=3.0), "FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
}
ADAPTERS = {"DDIMScheduler": "FastDDIMScheduler", "EulerDiscreteScheduler": "FastEulerDiscreteScheduler",
            "DPMSolverMultistepScheduler": "FastDPMSolverMultistepScheduler",
            "FlowMatchEulerDiscreteScheduler": "FastFlowMatchEulerDiscreteScheduler"}


def _diffusers_loop(cls, config, x_t, model_output, steps):
    scheduler = cls(**config)
    scheduler.set_timesteps(steps, device=x_t.device)

    def run():
        scheduler.set_timesteps(steps, device=x_t.device)
        x = x_t * getattr(scheduler, "init_noise_sigma", 1.0)
        for t in scheduler.timesteps:
            if hasattr(scheduler, "scale_model_input") and not isinstance(config.get("shift"), float):
                scheduler.scale_model_input(x, t)
            x = scheduler.step(model_output, t, x).prev_sample
        return x

    return run


def _reference_loop(sampler, x_t, model_output):
    """The plan's steps through the unfused float64 reference (what eager PyTorch would do)."""

    def run():
        x = x_t * sampler.init_noise_sigma
        prev = None
        for step in sampler.plan:
            if step.kind == "ddim":
                x, _ = reference.ddim_step(model_output, x, *step.args, prediction=sampler.prediction)
            elif step.kind == "euler":
                x, _ = reference.euler_step(model_output, x, *step.args, prediction=sampler.prediction)
            else:
                p = (prev[1].alpha, prev[1].sigma) if step.second_order else (1.0, 1.0)
                x, x0 = reference.dpmpp_2m_step(model_output, x, prev[0] if step.second_order else None, *step.args,
                                                *p, prediction=sampler.prediction)
                prev = (x0, step)
        return x

    return run


def _loop_fn(provider, loop, x_t, model_output, steps):
    method, schedule, name, config = LOOPS[loop]
    sampler = Sampler(method, schedule, steps)
    if provider == "fastlatent":
        return lambda: sampler.sample(lambda x, t, c: model_output, x_t, progress=False)
    if provider == "reference_eager":
        return _reference_loop(sampler, x_t, model_output)
    diffusers = pytest.importorskip("diffusers")
    if provider == "diffusers":
        return _diffusers_loop(getattr(diffusers, name), config, x_t, model_output, steps)
    from fastlatent.sampling import schedulers
    return _diffusers_loop(getattr(schedulers, ADAPTERS[name]), config, x_t, model_output, steps)


def _run_loop(benchmark, provider, loop, shape, device, steps=50):
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(shape, generator=gen).to(device)
    model_output = (0.05 * torch.randn(shape, generator=gen)).to(device)
    fn = _loop_fn(provider, loop, x_t, model_output, steps)
    if provider != "diffusers":
        expected = _loop_fn("diffusers", loop, x_t, model_output, steps)()
        out = fn().to(expected.dtype)
        err = ((out.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
        assert err <= 1e-4, f"{provider} {loop}: relative error {err:.3g} vs diffusers"
    benchmark.extra_info.update(device=device_name(device), torch=torch.__version__, shape=list(shape), steps=steps,
                                loop=loop)
    # The CPU is shared and noisy: enough rounds that the minimum and median settle.
    benchmark.pedantic(timed(fn, device), rounds=15 if provider != "reference_eager" else 5, warmup_rounds=2)


CPU_PROVIDERS = ["fastlatent", "fastlatent_diffusers_adapter", "diffusers", "reference_eager"]


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("loop", list(LOOPS))
def test_loop_50_steps_cpu(benchmark, provider, loop):
    benchmark.group = f"50-step {loop} loop, model excluded, cpu 8x4x64x64"
    _run_loop(benchmark, provider, loop, (8, 4, 64, 64), torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("provider", CPU_PROVIDERS[:3])
@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("shape", [(16, 4, 64, 64), (1, 4, 64, 64)])
def test_loop_50_steps_cuda(benchmark, provider, loop, shape):
    benchmark.group = f"50-step {loop} loop, model excluded, cuda {shape}"
    _run_loop(benchmark, provider, loop, shape, torch.device("cuda"))


def _step_bytes(shape, dtype, guided):
    elements = 1
    for v in shape:
        elements *= v
    size = torch.finfo(dtype).bits // 8
    return elements * size * ((2 if guided else 1) + 1 + 1)  # model output, sample in; next sample out


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastlatent", "eager_fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(16, 4, 128, 128), (16, 16, 64, 64)])
def test_guided_ddim_step_bandwidth_cuda(benchmark, provider, dtype, shape):
    """One classifier-free-guided DDIM step: GB/s over the bytes the step must move."""
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    m = torch.randn((2 * shape[0],) + shape[1:], generator=gen).to(device, dtype)
    if provider == "fastlatent":
        def fn():
            return fastlatent.ops.ddim_step(m, x, 0.3, 0.5, guidance_scale=7.5, return_x0=False)[0]
    else:
        def fn():  # what a diffusers pipeline does eagerly: guidance, then DDIMScheduler.step's math
            uncond, cond = m.float().chunk(2)
            eps = uncond + 7.5 * (cond - uncond)
            x0 = (x.float() - (1 - 0.3) ** 0.5 * eps) / 0.3 ** 0.5
            return (0.5 ** 0.5 * x0 + (1 - 0.5) ** 0.5 * eps).to(dtype)
    torch.testing.assert_close(fn().float(), reference.ddim_step(m, x, 0.3, 0.5, guidance_scale=7.5)[0].float(),
                               rtol=2e-2, atol=2e-2)
    moved = _step_bytes(shape, dtype, True)
    benchmark.extra_info.update(device=device_name(device), torch=torch.__version__, shape=list(shape),
                                dtype=str(dtype), bytes_moved=moved)
    benchmark.pedantic(timed(fn, device), rounds=50, warmup_rounds=5)
    benchmark.extra_info["gb_per_s"] = moved / benchmark.stats.stats.mean / 1e9
    benchmark.extra_info["fraction_of_h100_peak"] = moved / benchmark.stats.stats.mean / H100_PEAK_BYTES


class _SmallLatentModel(torch.nn.Module):
    """A few conv layers on 4x64x64 latents: small enough that eager sampling is launch-bound."""

    def __init__(self, width=64):
        super().__init__()
        self.inp = torch.nn.Conv2d(4, width, 3, padding=1)
        self.mid = torch.nn.Conv2d(width, width, 3, padding=1)
        self.out = torch.nn.Conv2d(width, 4, 3, padding=1)
        self.t_embed = torch.nn.Linear(1, width)

    def forward(self, x, t, cond=None):
        h = torch.nn.functional.silu(self.inp(x) + self.t_embed(t[:, None] / 1000)[:, :, None, None])
        h = torch.nn.functional.silu(self.mid(h))
        return self.out(h)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastlatent_graph", "fastlatent_eager"])
def test_graph_captured_sampling_cuda(benchmark, provider):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = _SmallLatentModel().to(device).eval()
    sampler = Sampler("dpmpp_2m", "scaled_linear", 50)
    x_t = torch.randn(1, 4, 64, 64, device=device)

    @torch.no_grad()
    def fn():
        return sampler.sample(model, x_t, capture_graph=provider == "fastlatent_graph", progress=False)

    with torch.no_grad():
        eager = sampler.sample(model, x_t, progress=False)
    torch.testing.assert_close(fn(), eager, rtol=1e-4, atol=1e-4)
    benchmark.extra_info.update(device=device_name(device), torch=torch.__version__, shape=[1, 4, 64, 64], steps=50)
    benchmark.pedantic(timed(fn, device), rounds=10, warmup_rounds=2)
