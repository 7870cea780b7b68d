"""Sampler steps against diffusers' schedulers, whole trajectories, noise, graphs and errors.

Tolerance convention: "1e-5 relative" is max |ours - theirs| <= 1e-5 * max |theirs| over the tensor
(an elementwise rtol cannot hold for values near zero, which carry the operands' rounding).
"""

import inspect
import math
import warnings

import pytest
import torch
from opspecs import assert_step_close

import fastlatent
from fastlatent import reference
from fastlatent.ops import sampler_steps as ops
from fastlatent.reference import sampler_steps as reference_steps
from fastlatent.sampling import DiscreteSchedule, FlowSchedule, KarrasSchedule, Sampler

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


class _Model:
    """A contracting toy denoiser: x -> per-channel mix depending on t (deterministic, cheap)."""

    def __init__(self, channels=4, seed=0, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        self.w = (0.2 * torch.randn(channels, channels, generator=gen)).to(device)

    def __call__(self, x, t, cond=None):
        mixed = torch.einsum("bchw,cd->bdhw", x, self.w.to(x.dtype))
        out = 0.5 * x * torch.cos(t / 1000).to(x.dtype)[:, None, None, None] + mixed
        if cond is not None:
            out = out + cond
        return out


def _diffusers():
    return pytest.importorskip("diffusers")


def _run_pair(ours, theirs, x0, model, steps=50, input_scale=True, compare_each_step=True):
    """Runs both schedulers over the same timesteps; per step both get the same sample and output."""
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    x = x0 * getattr(theirs, "init_noise_sigma", 1.0)
    worst = 0.0
    for t in theirs.timesteps:
        model_in = theirs.scale_model_input(x, t) if input_scale else x
        if input_scale:
            ours.scale_model_input(x, t)
        out = model(model_in, t.float().expand(x.shape[0]))
        a = ours.step(out, t, x).prev_sample
        b = theirs.step(out, t, x).prev_sample
        worst = max(worst, _rel_err(a, b))
        x = b
    return worst


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(
    "x0_option", [{}, {"clip_sample": True}, {"thresholding": True, "sample_max_value": 1.5}]
)
def test_ddim_step_matches_diffusers(prediction, x0_option):
    diffusers = _diffusers()
    from fastlatent.sampling.schedulers import FastDDIMScheduler

    config = dict(SD, prediction_type=prediction, **{"clip_sample": False, **x0_option})
    worst = _run_pair(
        FastDDIMScheduler(**config),
        diffusers.DDIMScheduler(**config),
        torch.randn(2, 4, 16, 16),
        _Model(),
        input_scale=False,
    )
    assert worst <= 1e-5


def test_ddim_eta_with_variance_noise_matches_diffusers():
    diffusers = _diffusers()
    from fastlatent.sampling.schedulers import FastDDIMScheduler

    ours, theirs = FastDDIMScheduler(**SD), diffusers.DDIMScheduler(**SD)
    for s in (ours, theirs):
        s.set_timesteps(20)
    x, model = torch.randn(2, 4, 8, 8), _Model()
    for t in theirs.timesteps:
        out = model(x, t.float().expand(2))
        noise = torch.randn_like(x)
        a = ours.step(out, t, x, eta=0.7, variance_noise=noise, use_clipped_model_output=True)
        b = theirs.step(out, t, x, eta=0.7, variance_noise=noise, use_clipped_model_output=True)
        assert _rel_err(a.prev_sample, b.prev_sample) <= 1e-5
        assert _rel_err(a.pred_original_sample, b.pred_original_sample) <= 1e-5
        x = b.prev_sample


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddpm_step_matches_diffusers(prediction):
    diffusers = _diffusers()
    scheduler = diffusers.DDPMScheduler(**SD, prediction_type=prediction, clip_sample=True)
    scheduler.set_timesteps(25)
    x, model = torch.randn(2, 4, 8, 8), _Model()
    ratio = 1000 // 25
    for t in scheduler.timesteps:
        out = model(x, t.float().expand(2))
        gen = torch.Generator().manual_seed(int(t))
        expected = scheduler.step(out, t, x, generator=gen).prev_sample
        # diffusers drew randn(shape, generator) for t > 0: the same noise, handed to the fused op
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))
        ab = scheduler.alphas_cumprod
        ab_prev = float(ab[int(t) - ratio]) if int(t) - ratio >= 0 else 1.0
        ours, _ = fastlatent.ops.ddpm_step(
            out, x, float(ab[int(t)]), ab_prev, prediction=prediction, clip_x0=1.0, noise=noise
        )
        ref, _ = reference.ddpm_step(
            out, x, float(ab[int(t)]), ab_prev, prediction=prediction, clip_x0=1.0, noise=noise
        )
        assert _rel_err(ours, expected) <= 1e-5
        assert _rel_err(ref, expected) <= 1e-5
        x = expected


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("karras", [False, True])
def test_euler_step_matches_diffusers(prediction, karras):
    diffusers = _diffusers()
    from fastlatent.sampling.schedulers import FastEulerDiscreteScheduler

    config = dict(SD, prediction_type=prediction, use_karras_sigmas=karras)
    worst = _run_pair(
        FastEulerDiscreteScheduler(**config),
        diffusers.EulerDiscreteScheduler(**config),
        torch.randn(2, 4, 16, 16),
        _Model(),
    )
    assert worst <= 1e-5


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_euler_step_matches_diffusers(shift):
    diffusers = _diffusers()
    from fastlatent.sampling.schedulers import FastFlowMatchEulerDiscreteScheduler

    worst = _run_pair(
        FastFlowMatchEulerDiscreteScheduler(shift=shift),
        diffusers.FlowMatchEulerDiscreteScheduler(shift=shift),
        torch.randn(2, 4, 16, 16),
        _Model(),
        input_scale=False,
    )
    assert worst <= 1e-5


@pytest.mark.parametrize(
    "config",
    [
        dict(prediction_type="epsilon"),
        dict(prediction_type="v_prediction"),
        dict(prediction_type="sample"),
        dict(use_karras_sigmas=True),
        dict(thresholding=True, sample_max_value=2.0),
        dict(solver_order=1),
    ],
    ids=["eps", "v", "x0", "karras", "threshold", "order1"],
)
@pytest.mark.parametrize("steps", [10, 50])
def test_dpmpp_2m_step_matches_diffusers(config, steps):
    diffusers = _diffusers()
    from fastlatent.sampling.schedulers import FastDPMSolverMultistepScheduler

    worst = _run_pair(
        FastDPMSolverMultistepScheduler(**SD, **config),
        diffusers.DPMSolverMultistepScheduler(**SD, **config),
        torch.randn(2, 4, 16, 16),
        _Model(),
        steps=steps,
        input_scale=False,
    )
    assert worst <= 1e-5


def test_reference_matches_diffusers_ddim_and_euler():
    diffusers = _diffusers()
    ddim = diffusers.DDIMScheduler(**SD, clip_sample=False)
    ddim.set_timesteps(50)
    x, model = torch.randn(2, 4, 8, 8), _Model()
    for t in ddim.timesteps[:10]:
        out = model(x, t.float().expand(2))
        prev = int(t) - 20
        ab_prev = float(ddim.alphas_cumprod[prev]) if prev >= 0 else 1.0
        ref, _ = reference.ddim_step(out, x, float(ddim.alphas_cumprod[int(t)]), ab_prev)
        expected = ddim.step(out, t, x).prev_sample
        assert _rel_err(ref, expected) <= 1e-5
        x = expected


TRAJECTORIES = [
    ("ddim", "scaled_linear", {}, "DDIMScheduler", dict(SD, clip_sample=False)),
    ("euler", "scaled_linear", {}, "EulerDiscreteScheduler", dict(SD)),
    ("euler", "scaled_linear", {"karras": True}, "EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True)),
    (
        "euler",
        "linear",
        {"prediction": "v_prediction"},
        "EulerDiscreteScheduler",
        dict(prediction_type="v_prediction"),
    ),
    ("dpmpp_2m", "scaled_linear", {}, "DPMSolverMultistepScheduler", dict(SD)),
    (
        "dpmpp_2m",
        "linear",
        {"prediction": "v_prediction"},
        "DPMSolverMultistepScheduler",
        dict(prediction_type="v_prediction"),
    ),
    ("euler", FlowSchedule(shift=3.0), {}, "FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
]


@pytest.mark.parametrize(
    "method,schedule,kwargs,name,config",
    TRAJECTORIES,
    ids=[f"{t[0]}-{t[3]}-{i}" for i, t in enumerate(TRAJECTORIES)],
)
def test_50_step_trajectory_matches_diffusers_loop(method, schedule, kwargs, name, config):
    """Whole 50-step trajectories: stated tolerance 1e-4 relative (per-step 1e-5 rounding, compounded)."""
    diffusers = _diffusers()
    theirs = getattr(diffusers, name)(**config)
    theirs.set_timesteps(50)
    x0, model = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5)), _Model()
    x = x0 * getattr(theirs, "init_noise_sigma", 1.0)
    for t in theirs.timesteps:
        model_in = theirs.scale_model_input(x, t) if hasattr(theirs, "scale_model_input") else x
        x = theirs.step(model(model_in, t.float().expand(2)), t, x).prev_sample
    ours = Sampler(method, schedule, 50, **kwargs).sample(model, x0, progress=False)
    assert _rel_err(ours, x) <= 1e-4


def test_sampler_guidance_matches_unfused_formula():
    model = _Model()
    cond = torch.randn(1, 4, 1, 1)
    guided_cond = torch.cat([torch.zeros_like(cond), cond])
    sampler = Sampler("ddim", "scaled_linear", 20, guidance_rescale=0.5)
    x0 = torch.randn(1, 4, 8, 8)
    ours = sampler.sample(model, x0, cond=guided_cond, guidance=6.0, progress=False)
    # unfused: diffusers-pipeline style guidance + rescale, then the reference DDIM step
    x = x0.clone()
    for step in sampler.plan:
        out = model(torch.cat([x, x]), torch.full((2,), step.timestep), guided_cond)
        x, _ = reference.ddim_step(out, x, *step.args, guidance_scale=6.0, guidance_rescale=0.5)
    assert _rel_err(ours, x) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_latents_use_fp32_math(dtype):
    """fp16/bf16 storage, fp32 math: one step is within one rounding of the float64 result."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen).to(dtype)
    m = torch.randn(4, 4, 16, 16, generator=gen).to(dtype)
    ours, _ = fastlatent.ops.ddim_step(m, x, 0.05, 0.08, guidance_scale=7.5)
    exact, _ = reference.ddim_step(m, x, 0.05, 0.08, guidance_scale=7.5)
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    assert ((ours.double() - exact.double()).abs() <= ulp * exact.double().abs() + 1e-6).all()


# ------------------------------------------------------------------ noise


def test_philox_noise_matches_reference_stream_and_is_standard_normal():
    # x0 = 0 and x_t = 0: the DDPM step is std * z exactly
    z, _ = fastlatent.ops.ddpm_step(
        torch.zeros(4, 4097), torch.zeros(4, 4097), 0.5, 0.9, prediction="sample", seed=2**40 + 17, offset=3
    )
    std = math.sqrt((1 - 0.9) / (1 - 0.5) * (1 - 0.5 / 0.9))
    expected = reference.philox_normal(2**40 + 17, 3, z.numel()).reshape(z.shape)
    assert (z.double() / std - expected).abs().max() < 1e-5
    big = reference.philox_normal(1, 0, 1 << 20)
    assert abs(big.mean().item()) < 5e-3 and abs(big.std().item() - 1) < 5e-3
    assert abs(((big**4).mean() - 3).item()) < 0.05  # kurtosis of a normal


def test_philox_known_answer():
    # Random123 known-answer vector: philox4x32_10, counter 0, key 0
    words = reference_steps.philox_words(0, 0, 1)[0]
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_ddpm_noise_reproducible_from_generator():
    m, x = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a, _ = fastlatent.ops.ddpm_step(m, x, 0.3, 0.5, generator=torch.Generator().manual_seed(42))
    b, _ = fastlatent.ops.ddpm_step(m, x, 0.3, 0.5, generator=torch.Generator().manual_seed(42))
    c, _ = fastlatent.ops.ddpm_step(m, x, 0.3, 0.5, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = torch.Generator().manual_seed(42)
    first, _ = fastlatent.ops.ddpm_step(m, x, 0.3, 0.5, generator=gen)
    second, _ = fastlatent.ops.ddpm_step(m, x, 0.3, 0.5, generator=gen)  # the generator advanced
    assert torch.equal(first, a) and not torch.equal(second, first)
    sampler = Sampler("ddpm", "linear", 10)
    s1 = sampler.sample(_Model(), (1, 4, 8, 8), generator=torch.Generator().manual_seed(7), progress=False)
    s2 = sampler.sample(_Model(), (1, 4, 8, 8), generator=torch.Generator().manual_seed(7), progress=False)
    assert torch.equal(s1, s2)


def test_noise_independent_of_thread_count():
    m, x = torch.randn(3, 4, 64, 64), torch.randn(3, 4, 64, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = fastlatent.ops.ddpm_step(
            m, x, 0.3, 0.5, seed=9, guidance_scale=None, threshold_quantile=0.99
        )
    finally:
        torch.set_num_threads(threads)
    many, _ = fastlatent.ops.ddpm_step(m, x, 0.3, 0.5, seed=9, threshold_quantile=0.99)
    assert torch.equal(one, many)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_invalid_step_counts_raise(steps):
    with pytest.raises(ValueError, match=r"steps must be an int >= 1"):
        Sampler("ddim", "scaled_linear", steps)


def test_sampler_argument_errors():
    with pytest.raises(
        ValueError, match=r"steps must be at most the schedule's num_train_timesteps \(1000\)"
    ):
        Sampler("ddpm", "linear", 1001)
    with pytest.raises(ValueError, match=r'method must be "ddpm", "ddim", "euler" or "dpmpp_2m", got "heun"'):
        Sampler("heun", "linear", 10)
    with pytest.raises(ValueError, match=r"ddim needs a discrete schedule"):
        Sampler("ddim", "flow", 10)
    with pytest.raises(ValueError, match=r'prediction "flow" goes with a FlowSchedule'):
        Sampler("euler", "scaled_linear", 10, prediction="flow")
    with pytest.raises(ValueError, match=r"eta must be >= 0 and is for ddim only"):
        Sampler("euler", "scaled_linear", 10, eta=0.5)
    with pytest.raises(ValueError, match=r"schedule must be"):
        Sampler("euler", "quadratic", 10)
    sampler = Sampler("ddim", "scaled_linear", 5)
    with pytest.raises(ValueError, match=r"guidance needs model_output = \[uncond; cond\]"):
        sampler.sample(lambda x, t, c: x[:1].repeat(3, 1, 1, 1), (1, 4, 8, 8), guidance=5.0, progress=False)
    with pytest.raises(ValueError, match=r"model_output must have the shape of sample"):
        sampler.sample(lambda x, t, c: x[:, :3], (1, 4, 8, 8), progress=False)
    with pytest.raises(TypeError, match=r"model_fn returned torch.float16 for a torch.float32 sample"):
        sampler.sample(lambda x, t, c: x.half(), (1, 4, 8, 8), progress=False)
    with pytest.raises(ValueError, match=r"capture_graph=True needs CUDA tensors"):
        sampler.sample(_Model(), (1, 4, 8, 8), capture_graph=True, progress=False)


def test_seed_offset_tensor_is_cuda_only():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"seed_offset is for CUDA graphs"):
        fastlatent.ops.ddpm_step(x, x, 0.3, 0.5, seed_offset=torch.zeros(2, dtype=torch.int64))


def test_unsupported_diffusers_configs_run_diffusers_step():
    """What the fused step does not cover runs diffusers' own step (same numbers, no error), reported."""
    diffusers = _diffusers()
    from fastlatent.sampling.diffusers_fast import scheduler_report
    from fastlatent.sampling.schedulers import FastDPMSolverMultistepScheduler, FastEulerDiscreteScheduler

    FINAL = dict(final_sigmas_type="sigma_min")  # noqa: N806 (diffusers refuses "zero" for sde-dpmsolver)
    dpm = FastDPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver", solver_order=3, **FINAL)
    ref = diffusers.DPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver", solver_order=3, **FINAL)
    assert not scheduler_report(dpm).fused and "sde-dpmsolver" in scheduler_report(dpm).reason
    dpm.set_timesteps(10)
    ref.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    a = dpm.step(x, dpm.timesteps[0], x, generator=torch.Generator().manual_seed(3)).prev_sample
    b = ref.step(x, ref.timesteps[0], x, generator=torch.Generator().manual_seed(3)).prev_sample
    assert torch.equal(a, b)
    euler = FastEulerDiscreteScheduler(**SD)
    ref = diffusers.EulerDiscreteScheduler(**SD)
    euler.set_timesteps(10)
    ref.set_timesteps(10)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    a = euler.step(x, euler.timesteps[0], x, s_churn=1.0, generator=g1).prev_sample
    b = ref.step(x, ref.timesteps[0], x, s_churn=1.0, generator=g2).prev_sample
    assert torch.equal(a, b)
    assert scheduler_report(euler).fallbacks["s_churn > 0"] == 1


def test_schedules_match_diffusers_betas():
    diffusers = _diffusers()
    for kind, name in (
        ("linear", "linear"),
        ("scaled_linear", "scaled_linear"),
        ("cosine", "squaredcos_cap_v2"),
    ):
        ours = DiscreteSchedule(kind).alphas_cumprod
        theirs = diffusers.DDPMScheduler(
            beta_schedule=name,
            **({} if kind != "scaled_linear" else dict(beta_start=0.00085, beta_end=0.012)),
        )
        assert torch.equal(ours, theirs.alphas_cumprod)
    sigmas = KarrasSchedule(0.002, 80.0).sigmas(10)
    assert abs(sigmas[0] - 80.0) < 1e-9 and abs(sigmas[-1] - 0.002) < 1e-12


def test_karras_schedule_edm_sampler_denoises_towards_data():
    """EDM sigmas with an oracle x0-predictor: every method must land on the data."""
    target = torch.randn(1, 4, 8, 8)
    for method in ("euler", "dpmpp_2m"):
        out = Sampler(method, KarrasSchedule(0.002, 80.0), 20, prediction="sample").sample(
            lambda x, t, c: target.expand_as(x).clone(), (1, 4, 8, 8), progress=False
        )
        assert _rel_err(out, target) < 1e-5


# ------------------------------------------------------------------ CUDA


@pytest.mark.cuda
def test_cuda_noise_identical_to_cpu():
    x = torch.randn(3, 4, 33, 33)
    m = torch.randn(3, 4, 33, 33)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cpu, _ = fastlatent.ops.ddpm_step(
            torch.zeros_like(m, dtype=dtype),
            torch.zeros_like(x, dtype=dtype),
            0.5,
            0.9,
            prediction="sample",
            seed=123456789,
            offset=5,
        )
        gpu, _ = fastlatent.ops.ddpm_step(
            torch.zeros_like(m, dtype=dtype).cuda(),
            torch.zeros_like(x, dtype=dtype).cuda(),
            0.5,
            0.9,
            prediction="sample",
            seed=123456789,
            offset=5,
        )
        assert torch.equal(cpu, gpu.cpu()), dtype
    a, _ = fastlatent.ops.ddpm_step(m, x, 0.3, 0.5, seed=5)
    b, _ = fastlatent.ops.ddpm_step(m.cuda(), x.cuda(), 0.3, 0.5, seed=5)
    assert_step_close(b.cpu(), a, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"guidance_scale": 7.5, "guidance_rescale": 0.7},
        {"guidance_scale": 4.0, "threshold_quantile": 0.995, "threshold_max": 1.5},
    ],
)
def test_cuda_steps_match_cpu(options):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, 64, 64, generator=gen)
    m = torch.randn(32 if options else 16, 4, 64, 64, generator=gen) * 2
    for dtype in (torch.float32, torch.bfloat16):
        cpu = fastlatent.ops.ddim_step(m.to(dtype), x.to(dtype), 0.1, 0.2, 0.5, seed=3, **options)
        gpu = fastlatent.ops.ddim_step(
            m.to(dtype).cuda(), x.to(dtype).cuda(), 0.1, 0.2, 0.5, seed=3, **options
        )
        assert_step_close(tuple(t.cpu() for t in gpu), cpu, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "method,schedule", [("ddpm", "linear"), ("dpmpp_2m", "scaled_linear"), ("euler", FlowSchedule(shift=3.0))]
)
def test_cuda_graph_capture_matches_eager_and_replays(method, schedule):
    model = _Model(device="cuda")
    sampler = Sampler(method, schedule, 25)
    cond = torch.cat([torch.zeros(1, 4, 1, 1), torch.randn(1, 4, 1, 1)]).cuda()
    for seed in (1, 2):
        x_t = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(seed)).cuda()
        eager = sampler.sample(
            model, x_t, cond=cond, guidance=5.0, generator=torch.Generator().manual_seed(seed), progress=False
        )
        graphed = sampler.sample(
            model,
            x_t,
            cond=cond,
            guidance=5.0,
            generator=torch.Generator().manual_seed(seed),
            capture_graph=True,
            progress=False,
        )
        assert_step_close(graphed.cpu(), eager.cpu(), torch.float32)
    assert len(sampler._graphs) == 1  # the second call replayed the first capture


def test_nan_in_nan_out_like_the_reference():
    """A NaN in one sample's x0 makes that sample's dynamic threshold NaN (torch.quantile) and a NaN in the
    model output makes the guidance-rescale factor NaN (torch.std): the whole sample is NaN, others not."""
    gen = torch.Generator().manual_seed(9)
    x, m = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    m[1, 2, 3, 3] = float("nan")
    options = dict(prediction="sample", threshold_quantile=0.9, threshold_max=2.0)
    ours = ops.ddim_step(m, x, 0.3, 0.5, **options)
    want = reference.ddim_step(m, x, 0.3, 0.5, **options)
    for a, b in zip(ours, want):
        assert torch.equal(a.isnan(), b.isnan()) and a[1].isnan().all()
        assert_step_close(a[[0, 2]], b[[0, 2]], torch.float32)
    guided = torch.randn(6, 4, 5, 5, generator=gen)
    guided[4, 0, 0, 0] = float("nan")
    options = dict(guidance_scale=5.0, guidance_rescale=0.7)
    ours = ops.ddim_step(guided, x, 0.3, 0.5, **options)[0]
    want = reference.ddim_step(guided, x, 0.3, 0.5, **options)[0]
    assert torch.equal(ours.isnan(), want.isnan()) and ours[1].isnan().all() and not ours[0].isnan().any()


def test_fused_steps_refuse_inputs_that_require_grad():
    x = torch.randn(2, 4, 8, 8)
    m = torch.randn(2, 4, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"fastlatent.ddim_step: the fused sampler steps are inference"):
        ops.ddim_step(m, x, 0.3, 0.5)
    with pytest.raises(RuntimeError, match=r"fastlatent.sampler_step: the fused sampler steps are inference"):
        ops.sampler_step(x, x, 1.0, 0.0, 0.5, 0.0, 0.5, [m.detach().requires_grad_()], [1.0])
    with torch.no_grad():
        ops.ddim_step(m, x, 0.3, 0.5)
    out = ops.ddim_step(m.detach(), x, 0.3, 0.5)[0]
    # the reference twin is differentiable
    (grad,) = torch.autograd.grad(reference.ddim_step(m, x, 0.3, 0.5)[0].sum(), m)
    assert grad.shape == m.shape and torch.isfinite(grad).all() and out.shape == x.shape


@pytest.mark.parametrize(
    "name,config",
    [
        ("DDIMScheduler", dict(SD)),
        ("DDPMScheduler", dict(SD)),
        ("EulerDiscreteScheduler", dict(SD)),
        ("EulerAncestralDiscreteScheduler", dict(SD)),
        ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
        ("DPMSolverMultistepScheduler", dict(SD)),
        ("PNDMScheduler", dict(SD, skip_prk_steps=True)),
        ("LCMScheduler", dict(SD)),
        ("LMSDiscreteScheduler", dict(SD)),
    ],
)
def test_patched_step_returns_what_diffusers_returns(name, config):
    """The patched step builds diffusers' output dataclass itself: same type, attributes, items, tuple."""
    diffusers = _diffusers()
    from fastlatent.sampling.diffusers_fast import scheduler_report

    gen = torch.Generator().manual_seed(3)
    x, m = torch.randn(2, 4, 6, 6, generator=gen), torch.randn(2, 4, 6, 6, generator=gen)
    outputs = {}
    for patched in (True, False):
        for return_dict in (True, False):
            scheduler = getattr(diffusers, name)(**config)
            if patched:
                fastlatent.patch(scheduler, report=False)
            scheduler.set_timesteps(10)
            kwargs = {}
            if "generator" in inspect.signature(type(scheduler).step).parameters:
                kwargs["generator"] = torch.Generator().manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = scheduler.timesteps[0]
                outputs[patched, return_dict] = scheduler.step(m, t, x, return_dict=return_dict, **kwargs)
            if patched:
                assert not scheduler_report(scheduler).fallbacks, scheduler_report(scheduler)
    ours, theirs = outputs[True, True], outputs[False, True]
    assert type(ours) is type(theirs)
    assert list(ours.keys()) == list(theirs.keys())
    assert sorted(vars(ours)) == sorted(vars(theirs))
    for key in vars(theirs):
        a, b = getattr(ours, key), getattr(theirs, key)
        assert (a is None) == (b is None), key
        if b is not None:
            assert a is ours[key]
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(ours.to_tuple()) == len(theirs.to_tuple())
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    plain_ours, plain_theirs = outputs[True, False], outputs[False, False]
    assert type(plain_ours) is tuple and len(plain_ours) == len(plain_theirs)
    for a, b in zip(plain_ours, plain_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
