"""Sampling: fused sampler steps and whole loops against diffusers' schedulers and the unfused reference.

- 50-step loops with the model excluded (a fixed model output): SD latents 8x4x64x64 (the sampling
  issue's CPU bar, 3x diffusers) and DiT latents 8x4x32x32 and 8x16x32x32 (DiT-XL/2 at 256 px;
  16-channel VAEs of SD3/FLUX at 256 px), for ddim, euler, dpmpp_2m and flow-matching euler:
  fastlatent's Sampler, its drop-in diffusers schedulers, diffusers' schedulers and the float64
  reference loop.
- One classifier-free-guided DDIM step at DiT shapes (batch doubled for guidance): the fused kernel
  against the float64 reference (eager and compiled), the plain-PyTorch step in the input dtype
  (eager and compiled) and diffusers (guidance, then ``DDIMScheduler.step``).
- 50-step loops of every diffusers scheduler config that ``fastlatent.patch`` fuses (model excluded),
  the patched scheduler against the same diffusers scheduler unpatched, at 8x4x64x64 and 1x16x128x128,
  and an end-to-end loop with a tiny diffusers UNet2DModel (model included).
- CUDA: the guided step's fraction of HBM bandwidth, loops, and graph-captured vs eager sampling of
  a small latent model at batch 1; every patched diffusers scheduler's 50-step loop (model excluded) against
  diffusers', and patched loops of a small model captured in one CUDA graph against eager patched and
  unpatched loops.
"""

import inspect

import pytest
import torch
from conftest import peer, providers, relative_error

import fastlatent
from fastlatent import reference
from fastlatent.sampling import FlowSchedule, Sampler

BENCH_AREA = "sampling"
CPU = torch.device("cpu")
CUDA = torch.device("cuda") if torch.cuda.is_available() else None
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

# method, schedule, diffusers class, its config
LOOPS = {
    "ddim": ("ddim", "scaled_linear", "DDIMScheduler", dict(SD, clip_sample=False)),
    "euler": ("euler", "scaled_linear", "EulerDiscreteScheduler", dict(SD)),
    "dpmpp_2m": ("dpmpp_2m", "scaled_linear", "DPMSolverMultistepScheduler", dict(SD)),
    "flow_euler": ("euler", FlowSchedule(shift=3.0), "FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
}
ADAPTERS = {
    "DDIMScheduler": "FastDDIMScheduler",
    "EulerDiscreteScheduler": "FastEulerDiscreteScheduler",
    "DPMSolverMultistepScheduler": "FastDPMSolverMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler": "FastFlowMatchEulerDiscreteScheduler",
}
LOOP_PROVIDERS = ["fastlatent", "fastlatent_diffusers_adapter", "diffusers", "reference"]


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
                x, x0 = reference.dpmpp_2m_step(
                    model_output,
                    x,
                    prev[0] if step.second_order else None,
                    *step.args,
                    *p,
                    prediction=sampler.prediction,
                )
                prev = (x0, step)
        return x

    return run


def _loop_fn(provider, loop, x_t, model_output, steps):
    method, schedule, name, config = LOOPS[loop]
    sampler = Sampler(method, schedule, steps)
    if provider == "fastlatent":
        return lambda: sampler.sample(lambda x, t, c: model_output, x_t, progress=False)
    if provider == "reference":
        return _reference_loop(sampler, x_t, model_output)
    diffusers = peer("diffusers", "diffusers")
    if provider == "diffusers":
        return _diffusers_loop(getattr(diffusers, name), config, x_t, model_output, steps)
    from fastlatent.sampling import schedulers

    return _diffusers_loop(getattr(schedulers, ADAPTERS[name]), config, x_t, model_output, steps)


def _run_loop(bench, provider, loop, shape, device, steps=50):
    b, c, h, w = shape
    bench.describe(
        op=f"{steps}-step {loop} loop (model excluded)",
        case=f"{b}x{c}x{h}x{w}",
        provider=provider,
        device=device,
        dtype=torch.float32,
        sizes={"batch": b, "channels": c, "side": h, "steps": steps},
    )
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(shape, generator=gen).to(device)
    model_output = (0.05 * torch.randn(shape, generator=gen)).to(device)
    fn = _loop_fn(provider, loop, x_t, model_output, steps)
    if provider != "diffusers":
        expected = _loop_fn("diffusers", loop, x_t, model_output, steps)()
        err = relative_error(fn().to(expected.dtype), expected)
        assert err <= 1e-4, f"{provider} {loop}: relative error {err:.3g} vs diffusers"
    bench.run(fn)


LOOP_SHAPES_CPU = [
    pytest.param((8, 4, 64, 64), id="sd_8x4x64x64"),
    pytest.param((8, 4, 32, 32), id="dit_8x4x32x32", marks=pytest.mark.full),
    pytest.param((8, 16, 32, 32), id="dit16_8x16x32x32", marks=pytest.mark.full),
]


@pytest.mark.parametrize("provider", LOOP_PROVIDERS)
@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("shape", LOOP_SHAPES_CPU)
def test_loop_50_steps_cpu(bench, provider, loop, shape):
    _run_loop(bench, provider, loop, shape, CPU)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", LOOP_PROVIDERS[:3])
@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize(
    "shape",
    [(16, 4, 64, 64), (1, 4, 64, 64), (32, 4, 32, 32), (32, 16, 32, 32)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_loop_50_steps_cuda(bench, provider, loop, shape):
    _run_loop(bench, provider, loop, shape, CUDA)


# ------------------------------------------------------------------------------------ one guided step

GUIDANCE = 7.5
STEP_PROVIDERS = providers(
    "fastlatent", "reference", "reference_compiled", "torch", "torch_compiled", "diffusers"
)


def _torch_guided_ddim(m, x, alpha_bar_t, alpha_bar_prev):
    """What a diffusers pipeline does eagerly: guidance, then DDIMScheduler.step's math, in the input
    dtype."""
    uncond, cond = m.chunk(2)
    eps = uncond + GUIDANCE * (cond - uncond)
    x0 = (x - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5
    return alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps


def _reference_guided_ddim(m, x, alpha_bar_t, alpha_bar_prev):
    return reference.ddim_step(m, x, alpha_bar_t, alpha_bar_prev, guidance_scale=GUIDANCE, return_x0=False)[0]


def _step_bytes(shape, dtype):
    elements = 1
    for v in shape:
        elements *= v
    return elements * (torch.finfo(dtype).bits // 8) * (2 + 1 + 1)  # [uncond; cond] and sample in, sample out


def _run_step(bench, provider, shape, device, dtype):
    b, c, h, w = shape
    bench.describe(
        op="guided DDIM step",
        case=f"{b}x{c}x{h}x{w} (model output {2 * b}x{c}x{h}x{w})",
        provider=provider,
        device=device,
        dtype=dtype,
        sizes={"batch": b, "channels": c, "side": h},
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    m = torch.randn((2 * b, c, h, w), generator=gen).to(device, dtype)
    # step 20 of a 50-step SD schedule (diffusers' "leading" spacing): t = 580 -> 560
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    a_t, a_prev = float(alphas[580]), float(alphas[560])
    if provider == "fastlatent":
        fn = lambda: fastlatent.ops.ddim_step(m, x, a_t, a_prev, guidance_scale=GUIDANCE, return_x0=False)[0]  # noqa
    elif provider in ("reference", "torch"):
        eager = _reference_guided_ddim if provider == "reference" else _torch_guided_ddim
        fn = lambda: eager(m, x, a_t, a_prev)  # noqa: E731
    elif provider in ("reference_compiled", "torch_compiled"):
        eager = _reference_guided_ddim if provider == "reference_compiled" else _torch_guided_ddim
        compiled = bench.compile(lambda m, x: eager(m, x, a_t, a_prev), warm=lambda f: f(m, x))
        fn = lambda: compiled(m, x)  # noqa: E731
    else:
        diffusers = peer("diffusers", "diffusers")
        scheduler = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False)
        scheduler.set_timesteps(50, device=device)
        t = int(scheduler.timesteps[20])
        a_t, a_prev = float(scheduler.alphas_cumprod[t]), float(scheduler.alphas_cumprod[t - 20])

        def fn():
            uncond, cond = m.chunk(2)
            return scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample

    want = _reference_guided_ddim(m, x, a_t, a_prev)
    err = relative_error(fn(), want)
    assert err <= (1e-5 if dtype == torch.float32 else 2e-2), f"{provider}: relative error {err:.2e}"
    bench.run(fn, bytes_moved=_step_bytes(shape, dtype))


STEP_SHAPES_CPU = [
    pytest.param((8, 4, 32, 32), id="dit_8x4x32x32"),
    pytest.param((8, 16, 32, 32), id="dit16_8x16x32x32"),
    *[
        pytest.param((b, c, 32, 32), id=f"B{b}x{c}x32x32", marks=pytest.mark.full)
        for b in (1, 32, 128)
        for c in (4, 16)
    ],
    pytest.param((8, 4, 64, 64), id="sd_8x4x64x64", marks=pytest.mark.full),
]


@pytest.mark.parametrize("provider", STEP_PROVIDERS)
@pytest.mark.parametrize("shape", STEP_SHAPES_CPU)
def test_guided_ddim_step_cpu(bench, provider, shape):
    _run_step(bench, provider, shape, CPU, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastlatent", "torch", "torch_compiled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    "shape",
    [(16, 4, 128, 128), (16, 16, 64, 64), (256, 4, 32, 32), (256, 16, 32, 32)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_guided_ddim_step_cuda(bench, provider, shape, dtype):
    """One guided DDIM step: the fraction of HBM bandwidth over the bytes it must move."""
    _run_step(bench, provider, shape, CUDA, dtype)


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
@pytest.mark.parametrize("provider", ["fastlatent_graph", "fastlatent"])
def test_graph_captured_sampling_cuda(bench, provider):
    bench.describe(
        op="50-step dpmpp_2m sampling of a small conv model",
        case="1x4x64x64",
        provider=provider,
        device=CUDA,
        dtype=torch.float32,
        sizes={"batch": 1, "steps": 50},
    )
    torch.manual_seed(0)
    model = _SmallLatentModel().to(CUDA).eval()
    sampler = Sampler("dpmpp_2m", "scaled_linear", 50)
    x_t = torch.randn(1, 4, 64, 64, device=CUDA)

    @torch.no_grad()
    def fn():
        return sampler.sample(model, x_t, capture_graph=provider == "fastlatent_graph", progress=False)

    with torch.no_grad():
        eager = sampler.sample(model, x_t, progress=False)
    torch.testing.assert_close(fn(), eager, rtol=1e-4, atol=1e-4)
    bench.run(fn)


# ------------------------------------------------------------------ patched diffusers schedulers

# every fused family of fastlatent.patch, as pipelines configure them
SCHEDULER_LOOPS = {
    "ddim": ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    "ddpm": ("DDPMScheduler", dict(SD)),
    "pndm": ("PNDMScheduler", dict(SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)),
    "lcm": ("LCMScheduler", dict(SD)),
    "lms": ("LMSDiscreteScheduler", dict(SD)),
    "euler": ("EulerDiscreteScheduler", dict(SD)),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", dict(SD)),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(SD)),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True)),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", dict(SD, solver_order=3)),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++")),
    "dpmsolver_2m": (
        "DPMSolverMultistepScheduler",
        dict(SD, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    ),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
    "heun": ("HeunDiscreteScheduler", dict(SD)),
    "kdpm2": ("KDPM2DiscreteScheduler", dict(SD)),
    "kdpm2_ancestral": ("KDPM2AncestralDiscreteScheduler", dict(SD)),
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0)),
    # UniPC's corrector, DEIS and DPM-Solver singlestep (SD's UniPC is bh2, order 2)
    "unipc_2m": ("UniPCMultistepScheduler", dict(SD)),
    "unipc_3m_bh1": (
        "UniPCMultistepScheduler",
        dict(SD, solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
    ),
    "deis_3m": ("DEISMultistepScheduler", dict(SD, solver_order=3)),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", dict(SD)),
    "dpmpp_3s": ("DPMSolverSinglestepScheduler", dict(SD, solver_order=3)),
}
# stochastic loops also timed without a generator (noise drawn inside the fused op)
NO_GENERATOR_LOOPS = ("ddpm", "lcm", "euler_ancestral", "kdpm2_ancestral", "dpmpp_2m_sde")
SCHEDULER_SHAPES = [
    pytest.param((8, 4, 64, 64), id="8x4x64x64"),
    pytest.param((1, 16, 128, 128), id="1x16x128x128"),
]


def _scheduler_loop(provider, name, config, x_t, model_output, steps, generator=True):
    diffusers = peer("diffusers", "diffusers")
    scheduler = getattr(diffusers, name)(**config)
    if provider == "fastlatent_patched":
        fastlatent.patch(scheduler, report=False)

    takes_generator = generator and "generator" in inspect.signature(type(scheduler).step).parameters

    def run():
        scheduler.set_timesteps(steps, device=x_t.device)
        x = x_t * getattr(scheduler, "init_noise_sigma", 1.0)
        generator = torch.Generator(x_t.device).manual_seed(0) if takes_generator else None
        kwargs = dict(generator=generator) if takes_generator else {}
        for t in scheduler.timesteps:
            x = scheduler.step(model_output, t, x, **kwargs).prev_sample
        return x

    return run, scheduler


def _run_patched_loop(bench, provider, loop, shape, device):
    name, config = SCHEDULER_LOOPS[loop]
    b, c, h, w = shape
    bench.describe(
        op=f"50-step patched {loop} loop (model excluded)",
        case=f"{b}x{c}x{h}x{w}",
        provider=provider,
        device=device,
        dtype=torch.float32,
        sizes={"batch": b, "channels": c, "side": h, "steps": 50},
    )
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(shape, generator=gen).to(device)
    model_output = (0.05 * torch.randn(shape, generator=gen)).to(device)
    fn, scheduler = _scheduler_loop(provider, name, config, x_t, model_output, 50)
    if provider != "diffusers":
        expected = _scheduler_loop("diffusers", name, config, x_t, model_output, 50)[0]()
        err = relative_error(fn(), expected)
        assert err <= 1e-4, f"{loop}: relative error {err:.3g} vs diffusers"
        from fastlatent.sampling.diffusers_fast import scheduler_report

        assert not scheduler_report(scheduler).fallbacks, scheduler_report(scheduler)
    bench.run(fn)


@pytest.mark.parametrize("provider", ["fastlatent_patched", "diffusers"])
@pytest.mark.parametrize("loop", list(SCHEDULER_LOOPS))
@pytest.mark.parametrize("shape", SCHEDULER_SHAPES)
def test_patched_scheduler_loop_cpu(bench, provider, loop, shape):
    """``fastlatent.patch(scheduler)`` against the same diffusers scheduler: 50 steps, model excluded."""
    _run_patched_loop(bench, provider, loop, shape, CPU)


# CUDA rows (pending a GPU run): at batch 1 a step's kernels take microseconds, so a 50-step loop's time over
# 50 is the host time per step; and whole loops with a small model, eager or captured in one CUDA graph
SCHEDULER_SHAPES_CUDA = [
    pytest.param((1, 4, 64, 64), id="1x4x64x64"),
    pytest.param((8, 4, 128, 128), id="8x4x128x128"),
]
GRAPH_LOOPS = ["ddim", "pndm", "euler", "dpmpp_2m", "unipc_2m", "heun", "flow_euler"]


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastlatent_patched", "diffusers"])
@pytest.mark.parametrize("loop", list(SCHEDULER_LOOPS))
@pytest.mark.parametrize("shape", SCHEDULER_SHAPES_CUDA)
def test_patched_scheduler_loop_cuda(bench, provider, loop, shape):
    """``fastlatent.patch(scheduler)`` against the same diffusers scheduler on the GPU: 50 steps, model
    excluded (at 1x4x64x64: the host time per step, times 50)."""
    _run_patched_loop(bench, provider, loop, shape, CUDA)


def _model_loop(scheduler, model, x):
    """A denoising loop of ``model`` (a _SmallLatentModel) with a diffusers scheduler, as pipelines run it."""
    scale = getattr(scheduler, "scale_model_input", None)
    for t in scheduler.timesteps:
        model_input = scale(x, t) if scale is not None else x
        x = scheduler.step(model(model_input, t.float().reshape(1).expand(x.shape[0])), t, x).prev_sample
    return x


def _graph_captured_loop(name, config, model, x_t, steps):
    """The patched loop captured once in a CUDA graph (a step reads nothing from the device, so capture
    holds), then replayed: (replay, its static output)."""
    diffusers = peer("diffusers", "diffusers")

    def fresh():
        scheduler = getattr(diffusers, name)(**config)
        fastlatent.patch(scheduler, report=False)
        scheduler.set_timesteps(steps, device=x_t.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return scheduler

    static_x = x_t * getattr(fresh(), "init_noise_sigma", 1.0)
    warmup = torch.cuda.Stream()
    warmup.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warmup):  # first-use work (cuDNN handles, host copies) outside the capture
        _model_loop(fresh(), model, static_x)
    torch.cuda.current_stream().wait_stream(warmup)
    scheduler = fresh()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _model_loop(scheduler, model, static_x)
    from fastlatent.sampling.diffusers_fast import scheduler_report

    assert not scheduler_report(scheduler).fallbacks, scheduler_report(scheduler)
    return graph.replay, static_out


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastlatent_patched_graph", "fastlatent_patched", "diffusers"])
@pytest.mark.parametrize("loop", GRAPH_LOOPS)
def test_patched_scheduler_graph_captured_loop_cuda(bench, provider, loop):
    """50 steps of a small conv model at batch 1 (launch-bound): the patched loop captured in one CUDA graph
    and replayed, against the same loop eager, patched and unpatched."""
    name, config = SCHEDULER_LOOPS[loop]
    bench.describe(
        op=f"50-step {loop} loop of a small conv model",
        case="1x4x64x64",
        provider=provider,
        device=CUDA,
        dtype=torch.float32,
        sizes={"batch": 1, "steps": 50},
    )
    diffusers = peer("diffusers", "diffusers")
    torch.manual_seed(0)
    model = _SmallLatentModel().to(CUDA).eval()
    x_t = torch.randn(1, 4, 64, 64, device=CUDA)
    with torch.no_grad():
        plain = getattr(diffusers, name)(**config)
        plain.set_timesteps(50, device=CUDA)
        expected = _model_loop(plain, model, x_t * getattr(plain, "init_noise_sigma", 1.0))
        if provider == "fastlatent_patched_graph":
            replay, static_out = _graph_captured_loop(name, config, model, x_t, 50)
            replay()
            torch.testing.assert_close(static_out, expected, rtol=1e-4, atol=1e-4)
            bench.run(replay)
            return
        scheduler = getattr(diffusers, name)(**config)
        if provider == "fastlatent_patched":
            fastlatent.patch(scheduler, report=False)

        def fn():
            scheduler.set_timesteps(50, device=CUDA)
            return _model_loop(scheduler, model, x_t * getattr(scheduler, "init_noise_sigma", 1.0))

        torch.testing.assert_close(fn(), expected, rtol=1e-4, atol=1e-4)
        bench.run(fn)


def _tiny_unet():
    diffusers = peer("diffusers", "diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def _unet_loop(which, name, config, unet, x_t, steps=20):
    """A tiny-UNet denoising loop (model included) with the patched or the plain diffusers scheduler."""
    diffusers = peer("diffusers", "diffusers")
    scheduler = getattr(diffusers, name)(**config)
    if which == "fastlatent_patched":
        fastlatent.patch(scheduler, report=False)

    @torch.no_grad()
    def run():
        scheduler.set_timesteps(steps)
        x = x_t * getattr(scheduler, "init_noise_sigma", 1.0)
        generator = torch.Generator().manual_seed(0)
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(out, t, x, generator=generator).prev_sample
        return x

    return run


@pytest.mark.parametrize("provider", ["fastlatent_patched", "diffusers"])
@pytest.mark.parametrize("loop", ["ddim", "euler_ancestral", "dpmpp_2m"])
def test_patched_scheduler_unet_loop_cpu(bench, provider, loop):
    """End to end: 20 steps of a tiny UNet2DModel (model included), patched scheduler or diffusers'."""
    name, config = SCHEDULER_LOOPS[loop]
    bench.describe(
        op=f"20-step {loop} loop with a tiny UNet2DModel (model included)",
        case="2x4x32x32",
        provider=provider,
        device=CPU,
        dtype=torch.float32,
        sizes={"batch": 2, "steps": 20},
    )
    unet = _tiny_unet()
    x_t = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))

    fn = _unet_loop(provider, name, config, unet, x_t)
    if provider != "diffusers":
        err = relative_error(fn(), _unet_loop("diffusers", name, config, unet, x_t)())
        assert err <= 1e-4, f"{loop}: relative error {err:.3g} vs diffusers"
    bench.run(fn)


# ------------------------------------------------------------------ interleaved run (committed figures)


def _interleave(fns: dict, rounds: int) -> dict:
    """Each contender once per round, in turn (CPU timings drift 20-40% on a shared machine: interleaving
    keeps the ratio honest); seconds per call, min and median."""
    import statistics
    import time

    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up: first touches, lazy imports, host copies
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {
        name: {"min_s": min(v), "median_s": statistics.median(v), "rounds": len(v)}
        for name, v in times.items()
    }


def interleaved_run(rounds=5, unet_rounds=3, unet_steps=10, loops=None, shapes=None) -> dict:
    """The patched-scheduler rows of this file, contenders interleaved: every 50-step loop (model excluded)
    at 8x4x64x64 and 1x16x128x128, and tiny-UNet loops (model included)."""
    import os
    import platform
    import warnings

    from fastlatent.benchmarking.measure import cpu_model
    from fastlatent.sampling.diffusers_fast import scheduler_report

    diffusers = peer("diffusers", "diffusers")
    warnings.filterwarnings("ignore")  # LMS warns when scale_model_input was not called, as diffusers does
    rows = []
    for shape in shapes or [(8, 4, 64, 64), (1, 16, 128, 128)]:
        gen = torch.Generator().manual_seed(0)
        x_t = torch.randn(shape, generator=gen)
        model_output = 0.05 * torch.randn(shape, generator=gen)
        for loop in loops or list(SCHEDULER_LOOPS):
            name, config = SCHEDULER_LOOPS[loop]
            patched, scheduler = _scheduler_loop("fastlatent_patched", name, config, x_t, model_output, 50)
            plain = _scheduler_loop("diffusers", name, config, x_t, model_output, 50)[0]
            err = relative_error(patched(), plain())
            assert err <= 1e-4 and not scheduler_report(scheduler).fallbacks, (loop, err)
            times = _interleave({"fastlatent_patched": patched, "diffusers": plain}, rounds)
            rows.append(
                {"loop": loop, "scheduler": name, "case": "x".join(map(str, shape)), "steps": 50,
                 "model": "excluded", "relative_error": err, **{k: v for k, v in times.items()}}
            )  # fmt: skip
            print(_row_text(rows[-1]), flush=True)
            if loop not in NO_GENERATOR_LOOPS:
                continue
            # no generator: the fused op draws the noise itself (diffusers' distribution, other numbers)
            patched, scheduler = _scheduler_loop(
                "fastlatent_patched", name, config, x_t, model_output, 50, False
            )
            plain = _scheduler_loop("diffusers", name, config, x_t, model_output, 50, False)[0]
            assert torch.isfinite(patched()).all() and not scheduler_report(scheduler).fallbacks, loop
            times = _interleave({"fastlatent_patched": patched, "diffusers": plain}, rounds)
            rows.append(
                {"loop": loop + " (no generator)", "scheduler": name, "case": "x".join(map(str, shape)),
                 "steps": 50, "model": "excluded", "relative_error": None, **times}
            )  # fmt: skip
            print(_row_text(rows[-1]), flush=True)
    unet = _tiny_unet()
    x_t = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    for loop in ("ddim", "euler_ancestral", "dpmpp_2m"):
        name, config = SCHEDULER_LOOPS[loop]
        fns = {
            which: _unet_loop(which, name, config, unet, x_t, unet_steps)
            for which in ("fastlatent_patched", "diffusers")
        }
        err = relative_error(fns["fastlatent_patched"](), fns["diffusers"]())
        assert err <= 1e-4, (loop, err)
        times = _interleave(fns, unet_rounds)
        rows.append(
            {"loop": loop, "scheduler": name, "case": "1x4x32x32, tiny UNet2DModel", "steps": unet_steps,
             "model": "included", "relative_error": err, **times}
        )  # fmt: skip
        print(_row_text(rows[-1]), flush=True)
    return {
        "schema": "fastlatent-bench-interleaved/1",
        "what": "patched diffusers schedulers against the same schedulers unpatched, contenders interleaved",
        "device": {"type": "cpu", "name": cpu_model(), "threads": torch.get_num_threads()},
        "load_average_after": os.getloadavg(),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
        "dtype": "float32",
        "rows": rows,
    }  # fmt: skip


def _row_text(row) -> str:
    ours, theirs = row["fastlatent_patched"], row["diffusers"]
    return (
        f"{row['loop']:30s} {row['case']:28s}"
        f" patched {ours['min_s'] * 1e3:8.1f} / {ours['median_s'] * 1e3:8.1f} ms"
        f"  diffusers {theirs['min_s'] * 1e3:8.1f} / {theirs['median_s'] * 1e3:8.1f} ms"
        f"  {theirs['min_s'] / ours['min_s']:5.2f}x ({theirs['median_s'] / ours['median_s']:.2f}x)"
    )


if __name__ == "__main__":
    # python benchmarks/bench_sampling.py [OUT.json] [ROUNDS]: the README's patched-scheduler figures
    import json
    import sys

    result = interleaved_run(rounds=int(sys.argv[2]) if len(sys.argv) > 2 else 5)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)
