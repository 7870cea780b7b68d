"""Fused diffusers scheduler steps against diffusers' own: single steps, 50-step trajectories, thresholding
edge cases, exact noise reuse, per-call fallbacks, no host syncs in a step, and pipelines that save and
reload."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastlatent
from fastlatent.sampling import diffusers_fast

diffusers = pytest.importorskip("diffusers")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

# (class name, config): every fused config family, and the thresholding / clipping variants
FUSED_CASES = [
    ("DDIMScheduler", dict(SD, clip_sample=False)),
    ("DDIMScheduler", dict(SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)),
    ("DDIMScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing")),
    (
        "DDIMScheduler",
        dict(
            SD,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            clip_sample=False,
        ),
    ),
    ("DDIMScheduler", dict(clip_sample=True, clip_sample_range=1.0)),
    (
        "DDIMScheduler",
        dict(
            thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5, prediction_type="sample"
        ),
    ),
    ("DDPMScheduler", dict()),
    ("DDPMScheduler", dict(SD, prediction_type="v_prediction", clip_sample=False)),
    ("DDPMScheduler", dict(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=2.0)),
    ("EulerDiscreteScheduler", dict(SD)),
    ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction")),
    ("EulerDiscreteScheduler", dict(SD, timestep_spacing="trailing", final_sigmas_type="sigma_min")),
    ("EulerDiscreteScheduler", dict(SD, use_exponential_sigmas=True, prediction_type="sample")),
    ("EulerDiscreteScheduler", dict(SD, use_beta_sigmas=True, final_sigmas_type="zero")),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=1.0, use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(SD)),
    ("DPMSolverMultistepScheduler", dict(SD, solver_order=1)),
    ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction")),
    ("DPMSolverMultistepScheduler", dict(SD, final_sigmas_type="zero", lower_order_final=False)),
    ("DPMSolverMultistepScheduler", dict(thresholding=True, sample_max_value=1.2)),
    ("DPMSolverMultistepScheduler", dict(SD, solver_order=3)),
    (
        "DPMSolverMultistepScheduler",
        dict(SD, solver_order=3, use_karras_sigmas=True, thresholding=True, sample_max_value=1.5),
    ),
    ("DPMSolverMultistepScheduler", dict(SD, solver_order=2, solver_type="heun")),
    (
        "DPMSolverMultistepScheduler",
        dict(SD, algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min"),
    ),
    (
        "DPMSolverMultistepScheduler",
        dict(SD, algorithm_type="dpmsolver", solver_type="heun", final_sigmas_type="sigma_min"),
    ),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++", solver_order=2)),
    (
        "DPMSolverMultistepScheduler",
        dict(SD, algorithm_type="sde-dpmsolver++", solver_order=3, use_exponential_sigmas=True),
    ),
    (
        "DPMSolverMultistepScheduler",
        dict(SD, algorithm_type="sde-dpmsolver", solver_type="heun", final_sigmas_type="sigma_min"),
    ),
    ("DPMSolverMultistepScheduler", dict(SD, use_lu_lambdas=True, prediction_type="sample")),
    (
        "DPMSolverMultistepScheduler",
        dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=3),
    ),
    ("EulerAncestralDiscreteScheduler", dict(SD)),
    (
        "EulerAncestralDiscreteScheduler",
        dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"),
    ),
    ("PNDMScheduler", dict(SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)),
    ("PNDMScheduler", dict(SD, skip_prk_steps=True, prediction_type="v_prediction")),
    ("LCMScheduler", dict(SD)),
    ("LCMScheduler", dict(SD, prediction_type="v_prediction", timestep_scaling=5.0)),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0, stochastic_sampling=True)),
    ("LMSDiscreteScheduler", dict(SD)),
    ("LMSDiscreteScheduler", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction")),
]


def _pair(name, config):
    ref = getattr(diffusers, name)(**config)
    ours = getattr(diffusers, name).from_config(ref.config)
    fastlatent.patch(ours, report=False)
    return ours, ref


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _noise_kwargs(scheduler, seed):
    """A fresh generator for the schedulers whose step takes one (PNDM and LMS do not)."""
    if "generator" in inspect.signature(type(scheduler).step).parameters:
        return dict(generator=torch.Generator().manual_seed(seed))
    return {}


def _run(ours, ref, steps, shape=(2, 4, 8, 8), seed=0, eps_scale=1.0):
    """Both schedulers from the same start, each fed the same random model outputs; worst relative error."""
    gen = torch.Generator().manual_seed(seed)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    x = torch.randn(shape, generator=gen) * getattr(ref, "init_noise_sigma", 1.0)
    xo, xr, worst = x.clone(), x.clone(), 0.0
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        m = torch.randn(shape, generator=gen) * eps_scale
        seed_step = int(torch.randint(0, 2**31, (1,), generator=gen))
        out_o = ours.step(m, t_ours, xo, **_noise_kwargs(ours, seed_step))
        out_r = ref.step(m, t_ref, xr, **_noise_kwargs(ref, seed_step))
        worst = max(worst, _rel(out_o.prev_sample, out_r.prev_sample))
        xo, xr = out_o.prev_sample, out_r.prev_sample
    return worst, _rel(xo, xr)


@pytest.mark.parametrize("name,config", FUSED_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FUSED_CASES)])
def test_fused_step_matches_diffusers(name, config):
    ours, ref = _pair(name, config)
    report = diffusers_fast.scheduler_report(ours)
    assert report.fused, report
    worst_step, _ = _run(ours, ref, 10)
    assert worst_step <= 1e-5
    _, final = _run(ours, ref, 50, seed=1)
    assert final <= 1e-4
    assert not report.fallbacks, report.fallbacks


def test_single_step_relative_error_on_random_samples():
    """A single step from random states (not a trajectory): 1e-5 relative for the one-step families (the
    multistep ones are covered step by step in test_fused_step_matches_diffusers)."""
    single = (
        "DDIMScheduler",
        "DDPMScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "FlowMatchEulerDiscreteScheduler",
        "LCMScheduler",
    )
    for name, config in FUSED_CASES:
        if name not in single:
            continue
        ours, ref = _pair(name, config)
        ours.set_timesteps(25)
        ref.set_timesteps(25)
        gen = torch.Generator().manual_seed(7)
        for i in (0, 7, 24):
            for s in (ours, ref):
                if hasattr(s, "_step_index"):
                    s._step_index = i
            x, m = torch.randn(3, 4, 6, 6, generator=gen) * 3, torch.randn(3, 4, 6, 6, generator=gen)
            a = ours.step(m, ours.timesteps[i], x, **_noise_kwargs(ours, i)).prev_sample
            b = ref.step(m, ref.timesteps[i], x, **_noise_kwargs(ref, i)).prev_sample
            assert _rel(a, b) <= 1e-5, (name, config, i)


def test_thresholding_edge_cases_match_or_fall_back():
    """NaN in -> NaN out; constant samples; ratios/max values the fused op cannot take run diffusers' step."""
    for config in (
        dict(thresholding=True, dynamic_thresholding_ratio=1.0, sample_max_value=1.0),
        dict(thresholding=True, dynamic_thresholding_ratio=0.5, sample_max_value=3.0),
        dict(thresholding=True, dynamic_thresholding_ratio=0.0, sample_max_value=3.0),
        dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=0.5),
    ):
        ours, ref = _pair("DDIMScheduler", dict(config, prediction_type="sample"))
        ours.set_timesteps(10)
        ref.set_timesteps(10)
        for m in (torch.randn(2, 3, 5, 5) * 4, torch.full((2, 3, 5, 5), 2.5), torch.zeros(2, 3, 5, 5)):
            x = torch.randn(2, 3, 5, 5)
            a = ours.step(m, ours.timesteps[3], x)
            b = ref.step(m, ref.timesteps[3], x)
            torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=1e-5, atol=1e-6)
        if diffusers_fast.scheduler_report(ours).fused:
            continue  # NaN handling of the fused thresholding: tests/test_sampling.py
        m = torch.randn(2, 3, 5, 5)
        m[0, 1, 2, 2] = float("nan")
        a = ours.step(m, ours.timesteps[3], x).prev_sample
        b = ref.step(m, ref.timesteps[3], x).prev_sample
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)
    report = diffusers_fast.scheduler_report(ours)
    assert not report.fused and "sample_max_value=0.5" in report.reason


def test_stochastic_steps_reuse_diffusers_noise_exactly():
    """DDPM and DDIM(eta) draw the same noise as diffusers from the same generator, or take variance_noise."""
    ours, ref = _pair("DDIMScheduler", SD)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x, m, z = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = ours.timesteps[2]
    a = ours.step(m, t, x, eta=1.0, variance_noise=z).prev_sample
    b = ref.step(m, t, x, eta=1.0, variance_noise=z).prev_sample
    assert _rel(a, b) <= 1e-6
    torch.manual_seed(5)
    a = ours.step(m, t, x, eta=0.5).prev_sample
    torch.manual_seed(5)
    b = ref.step(m, t, x, eta=0.5).prev_sample
    assert _rel(a, b) <= 1e-6
    ours, ref = _pair("DDPMScheduler", {})
    worst, final = _run(ours, ref, 50)
    assert worst <= 1e-5 and final <= 1e-4


def test_calls_the_fused_step_does_not_cover_run_diffusers_step():
    ours, ref = _pair("DDIMScheduler", SD)
    for s in (ours, ref):
        s.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    m = torch.randn(1, 4, 8, 8, requires_grad=True)
    a = ours.step(m, ours.timesteps[1], x).prev_sample
    b = ref.step(m, ref.timesteps[1], x).prev_sample
    assert a.requires_grad and torch.equal(a, b)
    (grad_a,) = torch.autograd.grad(a.sum(), m)
    (grad_b,) = torch.autograd.grad(b.sum(), m)
    assert torch.equal(grad_a, grad_b)
    a = ours.step(m.detach().double(), ours.timesteps[1], x.double()).prev_sample
    assert a.dtype == torch.float64
    report = diffusers_fast.scheduler_report(ours)
    assert report.fallbacks["inputs require grad (the fused step is inference-only)"] == 1
    assert report.fallbacks["dtype torch.float64"] == 1
    # a scheduler class without a fused step is left alone by patch, and the report says so
    edm = diffusers.EDMEulerScheduler()
    swap = diffusers_fast.accelerate_scheduler(edm)
    assert not swap.fused and "step" not in edm.__dict__


class _NoSync(TorchDispatchMode):
    """Fails on any op that reads a tensor's value back to the host."""

    BANNED = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero", "allclose"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.BANNED:
            raise AssertionError(f"host sync in a fused step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,config", FUSED_CASES[::2], ids=[n for n, _ in FUSED_CASES[::2]])
def test_fused_steps_do_not_read_the_device(name, config):
    """A whole loop of patched steps under a probe that fails on _local_scalar_dense/item/nonzero; diffusers'
    own step trips the same probe (so the probe can fail)."""
    ours, ref = _pair(name, config)
    ours.set_timesteps(8)
    ref.set_timesteps(8)
    x = torch.randn(1, 4, 8, 8)
    with _NoSync():
        for t in ours.timesteps:
            x = ours.step(torch.randn_like(x), t, x).prev_sample
    assert not diffusers_fast.scheduler_report(ours).fallbacks
    with pytest.raises(AssertionError, match="host sync"), _NoSync():
        for t in ref.timesteps:
            x = ref.step(torch.randn_like(x), t, x).prev_sample


def test_schedulers_module_lists_and_explains_its_classes():
    from fastlatent.sampling import schedulers

    assert set(schedulers.__all__) <= set(dir(schedulers))
    assert "FastDDIMScheduler" in schedulers.__all__
    with pytest.raises(AttributeError, match="the fused diffusers schedulers are"):
        schedulers.FastNoSuchScheduler  # noqa: B018
    s = schedulers.FastDDIMScheduler.from_config(diffusers.DDIMScheduler(**SD).config)
    assert type(s) is diffusers.DDIMScheduler and isinstance(s, schedulers.FastDDIMScheduler)
    assert not isinstance(diffusers.DDIMScheduler(), schedulers.FastDDIMScheduler)


def test_every_fused_scheduler_has_its_drop_in_class():
    from fastlatent.sampling import schedulers

    covered = diffusers_fast.covered_schedulers()
    assert len(covered) >= 16
    assert sorted(schedulers.__all__) == sorted("Fast" + name for name in covered)
    for name in covered:
        fast = getattr(schedulers, "Fast" + name)()
        assert type(fast) is getattr(diffusers, name), name
        assert diffusers_fast.is_accelerated(fast) and isinstance(fast, getattr(schedulers, "Fast" + name))


def _tiny_ldm_pipeline():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    vqvae = diffusers.VQModel(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=8,
        num_vq_embeddings=32,
        layers_per_block=1,
    )
    scheduler = diffusers.DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    return diffusers.LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler)


def test_patched_pipeline_saves_what_plain_diffusers_loads(tmp_path, capsys):
    pipe = _tiny_ldm_pipeline()
    pipe.save_pretrained(tmp_path / "plain")
    expected = pipe(
        batch_size=1, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert fastlatent.patch(pipe) is pipe
    printed = capsys.readouterr().out
    assert "scheduler: DDIMScheduler: step fused" in printed and "vqvae:" in printed
    got = pipe(
        batch_size=1, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert abs(got - expected).max() <= 1e-4
    pipe.save_pretrained(tmp_path / "patched")
    for name in ("scheduler/scheduler_config.json", "model_index.json"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "patched" / name).read_bytes()
    index = json.loads((tmp_path / "patched" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    reloaded = diffusers.LDMPipeline.from_pretrained(tmp_path / "patched")
    assert type(reloaded.scheduler) is diffusers.DDIMScheduler and "step" not in reloaded.scheduler.__dict__
    fastlatent.patch(reloaded, report=False)
    assert diffusers_fast.is_accelerated(reloaded.scheduler)
    again = reloaded(
        batch_size=1, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert abs(again - expected).max() <= 1e-4
    assert not diffusers_fast.scheduler_report(reloaded.scheduler).fallbacks
    fastlatent.unpatch(reloaded)
    assert not diffusers_fast.is_accelerated(reloaded.scheduler)


def test_fast_scheduler_classes_save_diffusers_names(tmp_path):
    from fastlatent.sampling.schedulers import FastDPMSolverMultistepScheduler

    pipe = _tiny_ldm_pipeline()
    pipe.scheduler = FastDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DPMSolverMultistepScheduler"
    loaded = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path / "scheduler")
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(pipe.scheduler.config)


class _TimeModel(torch.nn.Module):
    """A deterministic, time-dependent stand-in for a denoiser (the same function in both loops)."""

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)[:1]
        return 0.3 * torch.tanh(x) + 0.01 * torch.cos(t / 100.0) * x.flip(-1)


SAMPLER_CASES = [
    ("DDIMScheduler", dict(SD, steps_offset=1, set_alpha_to_one=False)),  # clip_sample default True
    (
        "DDIMScheduler",
        dict(SD, clip_sample=False, prediction_type="v_prediction", timestep_spacing="trailing"),
    ),
    ("EulerDiscreteScheduler", dict(SD)),
    ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True, timestep_spacing="trailing")),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
    ("DPMSolverMultistepScheduler", dict(SD)),
    (
        "DPMSolverMultistepScheduler",
        dict(SD, use_karras_sigmas=True, final_sigmas_type="zero", thresholding=True, sample_max_value=2.0),
    ),
]


@pytest.mark.parametrize("name,config", SAMPLER_CASES, ids=[n for n, _ in SAMPLER_CASES])
def test_sampler_from_config_reproduces_the_diffusers_loop(name, config):
    scheduler = getattr(diffusers, name)(**config)
    if name.startswith("DDIM"):
        sampler = fastlatent.sampling.Sampler.from_config(scheduler.config, steps=20, class_name=name)
    else:
        sampler = fastlatent.sampling.Sampler.from_scheduler(scheduler, steps=20)
    model = _TimeModel()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler.set_timesteps(20)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model(model_in, t), t, x).prev_sample
    ours = sampler.sample(lambda y, t, c: model(y, t), noise, progress=False)
    assert _rel(ours, x) <= 1e-4


def test_sampler_from_scheduler_errors():
    with pytest.raises(ValueError, match="scheduler must be a diffusers"):
        fastlatent.sampling.Sampler.from_scheduler(diffusers.HeunDiscreteScheduler())
    with pytest.raises(ValueError, match="sde-dpmsolver' with solver_order=3 is not expressible"):
        fastlatent.sampling.Sampler.from_scheduler(
            diffusers.DPMSolverMultistepScheduler(
                algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min"
            )
        )
    with pytest.raises(ValueError, match="config must be one of"):
        fastlatent.sampling.Sampler.from_config({"_class_name": "UniPCMultistepScheduler"})


@pytest.mark.parametrize(
    "name, config",
    [
        ("DPMSolverMultistepScheduler", dict(solver_order=3)),
        ("LMSDiscreteScheduler", {}),
        ("PNDMScheduler", dict(skip_prk_steps=True)),
        ("UniPCMultistepScheduler", {}),  # the corrected sample carries the graph on: every step falls back
        ("DEISMultistepScheduler", {}),
        ("DPMSolverSinglestepScheduler", {}),
        ("HeunDiscreteScheduler", {}),
        ("KDPM2DiscreteScheduler", {}),
    ],
)
def test_a_step_that_fell_back_for_grad_leaves_history_the_next_fused_step_handles(name, config):
    """A step whose model output requires grad runs diffusers' step and stores that output in the solver
    history; the next steps must not hand it to the inference-only op (they fall back or use it detached)
    and the trajectory stays diffusers'."""
    ours, theirs = (getattr(diffusers, name)(**SD, **config) for _ in range(2))
    diffusers_fast.accelerate_scheduler(ours)
    for s in (ours, theirs):
        s.set_timesteps(10)
    gen = torch.Generator().manual_seed(5)
    x = y = torch.randn(1, 4, 8, 8, generator=gen)
    for i, t in enumerate(ours.timesteps[:6]):
        m = torch.randn(1, 4, 8, 8, generator=gen) * 0.5
        x = ours.step(m.clone().requires_grad_(i == 0), t, x).prev_sample.detach()
        y = theirs.step(m.clone().requires_grad_(i == 0), t, y).prev_sample.detach()
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    fallbacks = sum(diffusers_fast.scheduler_report(ours).fallbacks.values())
    if name == "UniPCMultistepScheduler":  # last_sample (the corrector's output) requires grad from step 0
        assert fallbacks == 6 and ours.last_sample.requires_grad
    else:
        assert fallbacks < 6  # once the history is free of the graph, the steps run fused again
