"""Fused two-stage diffusers schedulers (Heun, KDPM2, KDPM2 ancestral, flow-matching Heun) against diffusers'
own: single steps of both stages, 50-step trajectories, the scheduler state each stage leaves (so fused and
diffusers' calls mix), ancestral noise, per-call fallbacks and no host syncs in a step."""

from __future__ import annotations

import importlib

import pytest
import torch
from test_scheduler_parity import SD, _noise_kwargs, _NoSync, _pair, _rel, _run, _TimeModel

import fastlatent
from fastlatent.sampling import diffusers_fast

diffusers = pytest.importorskip("diffusers")

HEUN_CASES = [
    ("HeunDiscreteScheduler", dict(SD)),
    ("HeunDiscreteScheduler", dict(SD, prediction_type="v_prediction", use_karras_sigmas=True)),
    (
        "HeunDiscreteScheduler",
        dict(SD, prediction_type="sample", clip_sample=True, use_exponential_sigmas=True),
    ),
    ("HeunDiscreteScheduler", dict(SD, use_beta_sigmas=True, timestep_spacing="trailing")),
    ("HeunDiscreteScheduler", dict(clip_sample=True, clip_sample_range=0.5, timestep_spacing="leading")),
    ("KDPM2DiscreteScheduler", dict(SD)),
    ("KDPM2DiscreteScheduler", dict(SD, prediction_type="v_prediction", use_karras_sigmas=True)),
    ("KDPM2DiscreteScheduler", dict(SD, use_exponential_sigmas=True, timestep_spacing="trailing")),
    ("KDPM2AncestralDiscreteScheduler", dict(SD)),
    ("KDPM2AncestralDiscreteScheduler", dict(SD, prediction_type="v_prediction", use_karras_sigmas=True)),
    ("KDPM2AncestralDiscreteScheduler", dict(SD, use_beta_sigmas=True, timestep_spacing="leading")),
    ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0)),
    ("FlowMatchHeunDiscreteScheduler", dict(shift=1.0)),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(HEUN_CASES)]
STATE = ("sample", "prev_derivative", "dt", "_step_index")


def _same_state(ours, ref, tol=1e-5):
    """The attributes the next call reads are of the same kind and value in both schedulers.

    The stored derivative is compared through what it is used for, sample + dt * derivative: diffusers forms
    it as (x - x0) / sigma, which cancels digits when sigma is small (flow Heun's fused step has the exact
    model output there), so on its own it agrees only to about eps(x) / sigma."""
    for name in STATE:
        if not hasattr(ref, name):
            continue
        a, b = getattr(ours, name), getattr(ref, name)
        if b is None or isinstance(b, int):
            assert a == b, name
            continue
        assert isinstance(a, torch.Tensor), name
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device), name
        if a.dim() == 0:
            assert a.item() == b.item(), name
        elif name == "prev_derivative":
            assert _rel(ours.sample + ours.dt * a, ref.sample + ref.dt * b) <= tol
            assert _rel(a, b) <= max(tol, 1e-3)
        else:
            assert _rel(a, b) <= tol, name


@pytest.mark.parametrize("name,config", HEUN_CASES, ids=IDS)
def test_fused_two_stage_steps_match_diffusers(name, config):
    ours, ref = _pair(name, config)
    report = diffusers_fast.scheduler_report(ours)
    assert report.fused, report
    worst_step, _ = _run(ours, ref, 10)
    assert worst_step <= 1e-5
    _, final = _run(ours, ref, 50, seed=1)
    assert final <= 1e-4
    assert not report.fallbacks, report.fallbacks


@pytest.mark.parametrize("name,config", HEUN_CASES, ids=IDS)
def test_each_stage_matches_and_leaves_diffusers_state(name, config):
    """Random states and model outputs (not a trajectory), both stages, both outputs, and after each call
    the stored sample/derivative/dt/step index equal diffusers'."""
    ours, ref = _pair(name, config)
    ours.set_timesteps(12)
    ref.set_timesteps(12)
    gen = torch.Generator().manual_seed(4)
    tuple_form = "FlowMatch" in name
    for i, t in enumerate(ref.timesteps):
        x = torch.randn(3, 4, 6, 6, generator=gen) * 2
        m = torch.randn(3, 4, 6, 6, generator=gen)
        a = ours.step(m, ours.timesteps[i], x, return_dict=False, **_noise_kwargs(ours, i))
        b = ref.step(m, t, x, return_dict=False, **_noise_kwargs(ref, i))
        assert len(a) == len(b) == (1 if tuple_form else 2)
        for got, want in zip(a, b):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert _rel(got, want) <= 1e-5, (name, i)
        _same_state(ours, ref)
        assert ours.state_in_first_order == ref.state_in_first_order
    assert not diffusers_fast.scheduler_report(ours).fallbacks


@pytest.mark.parametrize("name,config", HEUN_CASES[::3], ids=IDS[::3])
def test_fused_and_diffusers_calls_mix(name, config):
    """Every other call runs diffusers' own step on the patched scheduler: each reads the state the other
    left, so a loop in which some calls fall back follows diffusers' trajectory."""
    ours, ref = _pair(name, config)
    ours.set_timesteps(15)
    ref.set_timesteps(15)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=gen) * getattr(ref, "init_noise_sigma", 1.0)
    xo = xr = x
    for i, t in enumerate(ref.timesteps):
        m = torch.randn(2, 4, 8, 8, generator=gen)
        step = ours.step if i % 3 else (lambda *args, **kw: type(ours).step(ours, *args, **kw))
        xo = step(m, ours.timesteps[i], xo, **_noise_kwargs(ours, i)).prev_sample
        xr = ref.step(m, t, xr, **_noise_kwargs(ref, i)).prev_sample
        assert _rel(xo, xr) <= 1e-5, i
    assert not diffusers_fast.scheduler_report(ours).fallbacks


def test_img2img_start_and_custom_timesteps():
    """set_begin_index (a loop that starts mid-schedule) and Heun's custom timesteps."""
    for name in ("HeunDiscreteScheduler", "KDPM2AncestralDiscreteScheduler"):
        ours, ref = _pair(name, SD)
        for s in (ours, ref):
            s.set_timesteps(10)
            s.set_begin_index(4)  # a first stage, as pipelines set it (t_start * order)
        gen = torch.Generator().manual_seed(0)
        xo = xr = torch.randn(1, 4, 8, 8, generator=gen)
        for i in range(4, len(ref.timesteps)):
            m = torch.randn(1, 4, 8, 8, generator=gen)
            xo = ours.step(m, ours.timesteps[i], xo, **_noise_kwargs(ours, i)).prev_sample
            xr = ref.step(m, ref.timesteps[i], xr, **_noise_kwargs(ref, i)).prev_sample
        assert _rel(xo, xr) <= 1e-5
        assert not diffusers_fast.scheduler_report(ours).fallbacks
    ours, ref = _pair("HeunDiscreteScheduler", SD)
    for s in (ours, ref):
        s.set_timesteps(timesteps=[999, 800, 500, 300, 120, 10])
    gen = torch.Generator().manual_seed(1)
    xo = xr = torch.randn(1, 4, 8, 8, generator=gen) * ref.init_noise_sigma
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        m = torch.randn(1, 4, 8, 8, generator=gen)
        xo, xr = ours.step(m, t_ours, xo).prev_sample, ref.step(m, t_ref, xr).prev_sample
    assert _rel(xo, xr) <= 1e-5
    assert not diffusers_fast.scheduler_report(ours).fallbacks


def _same_attributes(ours, ref):
    """Every attribute diffusers' scheduler holds, equal (tensors: same dtype, device and values, NaN where
    diffusers has NaN: KDPM2's first interpolated sigma)."""
    for name, b in ref.__dict__.items():
        a = ours.__dict__[name]
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and (a.dtype, a.device) == (b.dtype, b.device), name
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)  # KDPM2 has a NaN
        else:
            assert a == b, name


KDPM2_CASES = [(name, config) for name, config in HEUN_CASES if name.startswith("KDPM2")]


@pytest.mark.parametrize("name,config", KDPM2_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(KDPM2_CASES)])
def test_repeated_set_timesteps_leaves_what_diffusers_leaves(name, config, monkeypatch):
    """KDPM2's set_timesteps repeated with the same arguments restores copies of its last result: every
    attribute equals diffusers' after the call (mid-loop state reset too), other arguments recompute, and a
    caller's in-place change to a returned tensor does not reach the next call."""
    ours, ref = _pair(name, config)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    for steps, device in ((10, None), (10, None), (7, "cpu"), (7, None), (10, None)):
        ours.set_timesteps(steps, device=device)
        ref.set_timesteps(steps, device=device)
        _same_attributes(ours, ref)
        for i in range(3):  # leaves a stored sample and a step index for the next set_timesteps to reset
            m = torch.randn(1, 4, 8, 8, generator=gen)
            xo = ours.step(m, ours.timesteps[i], x, **_noise_kwargs(ours, i)).prev_sample
            xr = ref.step(m, ref.timesteps[i], x, **_noise_kwargs(ref, i)).prev_sample
            assert _rel(xo, xr) <= 1e-5
    ours.timesteps.add_(1.0)
    ours.sigmas.mul_(2.0)
    ref.set_timesteps(10, device=None)
    # the repeat is restored, not recomputed: diffusers' sigma-to-timestep interpolation is not called
    monkeypatch.setattr(type(ours), "_sigma_to_t", lambda *args: pytest.fail("recomputed"))
    ours.set_timesteps(10, device=None)
    _same_attributes(ours, ref)
    assert not diffusers_fast.scheduler_report(ours).fallbacks


def _second_stage(scheduler, x, m, **kwargs):
    scheduler.set_timesteps(8)
    scheduler.step(m, scheduler.timesteps[2], x, **kwargs)
    return scheduler.step(m, scheduler.timesteps[3], x, **kwargs).prev_sample


def test_ancestral_noise_is_diffusers_noise():
    """Given diffusers' generator the fused KDPM2 ancestral step reproduces diffusers exactly; without one
    it draws in the kernel, seeded from the global generator (same seed, same sample), and the noise it adds
    is standard normal scaled by sigma_up."""
    ours, ref = _pair("KDPM2AncestralDiscreteScheduler", SD)
    gen = torch.Generator().manual_seed(0)
    x, m = torch.randn(4, 4, 32, 32, generator=gen) * 5, torch.randn(4, 4, 32, 32, generator=gen)
    a = _second_stage(ours, x, m, generator=torch.Generator().manual_seed(11))
    b = _second_stage(ref, x, m, generator=torch.Generator().manual_seed(11))
    assert _rel(a, b) <= 1e-6
    torch.manual_seed(3)
    a = _second_stage(ours, x, m)
    torch.manual_seed(3)
    assert torch.equal(a, _second_stage(ours, x, m))
    torch.manual_seed(4)
    c = _second_stage(ours, x, m)
    sigma_up = float(ours.sigmas_up[3 - 1])
    z = (c - a) / (sigma_up * 2**0.5)  # the difference of two independent draws, scaled to N(0, 1)
    assert sigma_up > 0 and abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1.0) < 0.02
    assert not diffusers_fast.scheduler_report(ours).fallbacks


def test_configs_and_calls_without_a_fused_step_run_diffusers_step():
    ours, ref = _pair("KDPM2DiscreteScheduler", dict(SD, prediction_type="sample"))
    report = diffusers_fast.scheduler_report(ours)
    assert not report.fused and "prediction_type='sample'" in report.reason
    for s in (ours, ref):
        s.set_timesteps(5)
    with pytest.raises(NotImplementedError):  # diffusers' own answer, unchanged
        ours.step(torch.randn(1, 4, 4, 4), ours.timesteps[0], torch.randn(1, 4, 4, 4))
    ours, _ = _pair("HeunDiscreteScheduler", dict(clip_sample=True, clip_sample_range=0.0))
    report = diffusers_fast.scheduler_report(ours)
    assert not report.fused and "clip_sample_range=0.0" in report.reason
    # flow Heun: s_churn > 0 and half-precision samples run diffusers' step for that call
    ours, ref = _pair("FlowMatchHeunDiscreteScheduler", dict(shift=3.0))
    for s in (ours, ref):
        s.set_timesteps(6)
    x, m = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    churn = dict(s_churn=2.0, s_tmax=10.0)
    a = ours.step(m, ours.timesteps[0], x, generator=torch.Generator().manual_seed(1), **churn)
    b = ref.step(m, ref.timesteps[0], x, generator=torch.Generator().manual_seed(1), **churn)
    assert torch.equal(a.prev_sample, b.prev_sample)
    a = ours.step(m.half(), ours.timesteps[1], x.half())
    b = ref.step(m.half(), ref.timesteps[1], x.half())
    assert a.prev_sample.dtype == torch.float16 and torch.equal(a.prev_sample, b.prev_sample)
    fallbacks = diffusers_fast.scheduler_report(ours).fallbacks
    assert fallbacks["s_churn > 0"] == 1 and sum(fallbacks.values()) == 2
    _same_state(ours, ref, tol=0.0)


def test_ancestral_fallback_after_a_first_stage_unlike_the_second_draws_diffusers_noise_once():
    """A second stage that falls back (the stored first-stage sample is float64) leaves the generator to
    diffusers' step: the noise is drawn once, so the sample equals diffusers'."""
    ours, ref = _pair("KDPM2AncestralDiscreteScheduler", SD)
    x, m = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    results = []
    for s in (ours, ref):
        s.set_timesteps(8)
        s.step(m.double(), s.timesteps[2], x.double())
        gen = torch.Generator().manual_seed(5)
        out = s.step(m, s.timesteps[3], x, generator=gen).prev_sample
        results.append((out, torch.randn(3, generator=gen)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert diffusers_fast.scheduler_report(ours).fallbacks["stored first-stage sample unlike sample"] == 1


def test_tables_replaced_after_set_timesteps_are_read_again():
    """A schedule table the scheduler holds anew (here sigmas_interpol, rescaled in place of the old) is
    copied again, never read stale."""
    ours, ref = _pair("KDPM2DiscreteScheduler", SD)
    for s in (ours, ref):
        s.set_timesteps(6)
        s.sigmas_interpol = s.sigmas_interpol * 0.9
    x, m = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for i in range(4):
        a = ours.step(m, ours.timesteps[i], x).prev_sample
        b = ref.step(m, ref.timesteps[i], x).prev_sample
        assert _rel(a, b) <= 1e-5
    assert not diffusers_fast.scheduler_report(ours).fallbacks


@pytest.mark.parametrize("name,config", HEUN_CASES[::2], ids=IDS[::2])
def test_fused_two_stage_steps_do_not_read_the_device(name, config):
    """A whole loop under a probe that fails on _local_scalar_dense/item/nonzero; diffusers' own step trips
    the same probe."""
    ours, ref = _pair(name, config)
    ours.set_timesteps(6)
    ref.set_timesteps(6)
    x = torch.randn(1, 4, 8, 8)
    with _NoSync():
        for t in ours.timesteps:
            x = ours.step(torch.randn_like(x), t, x).prev_sample
    assert not diffusers_fast.scheduler_report(ours).fallbacks
    with pytest.raises(AssertionError, match="host sync"), _NoSync():
        for t in ref.timesteps:
            x = ref.step(torch.randn_like(x), t, x).prev_sample


# ------------------------------------------------------------------ Sampler plans of the general fused step

SAMPLER_GENERAL_CASES = [
    ("DPMSolverMultistepScheduler", dict(SD, solver_order=3)),
    (
        "DPMSolverMultistepScheduler",
        dict(SD, solver_order=3, use_karras_sigmas=True, thresholding=True, sample_max_value=1.5),
    ),
    (
        "DPMSolverMultistepScheduler",
        dict(SD, solver_order=3, prediction_type="v_prediction", lower_order_final=False),
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
    ("EulerAncestralDiscreteScheduler", dict(SD)),
    (
        "EulerAncestralDiscreteScheduler",
        dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"),
    ),
]


def _philox_noise(seed, steps, shape):
    """The normals the Sampler's step i draws (Philox at (seed, i)), read back through the generic op."""
    zeros = torch.zeros(shape)
    return [
        fastlatent.ops.sampler_step(
            zeros, zeros, 0.0, 0.0, 0.0, 0.0, 0.0, (), (), 1.0, seed=seed, offset=i, return_x0=False
        )[0]
        for i in range(steps)
    ]


@pytest.mark.parametrize("name,config", SAMPLER_GENERAL_CASES, ids=[n for n, _ in SAMPLER_GENERAL_CASES])
def test_sampler_from_scheduler_general_plans(name, config, monkeypatch):
    """DPM-Solver orders 1-3 (dpmsolver++/dpmsolver/sde-dpmsolver++) and Euler ancestral as Sampler plans:
    the diffusers loop fed the Sampler's own noise gives the same trajectory; the same generator gives the
    same sample again."""
    scheduler = getattr(diffusers, name)(**config)
    sampler = fastlatent.sampling.Sampler.from_scheduler(scheduler, steps=20)
    model = _TimeModel()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    stochastic = name.startswith("EulerAncestral") or config.get("algorithm_type", "").startswith("sde")
    seed = fastlatent.ops.seed_from_generator(torch.Generator().manual_seed(9)) if stochastic else 0
    draws = _philox_noise(seed, 20, noise.shape) if stochastic else []
    if name.startswith("EulerAncestral"):
        module = importlib.import_module(type(scheduler).__module__)
        monkeypatch.setattr(module, "randn_tensor", lambda *args, **kw: draws.pop(0))
    scheduler.set_timesteps(20)
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        out = model(scheduler.scale_model_input(x, t), t)
        extra = dict(variance_noise=draws[i]) if stochastic and name.startswith("DPM") else {}
        x = scheduler.step(out, t, x, **extra).prev_sample
    ours = sampler.sample(
        lambda y, t, c: model(y, t), noise, generator=torch.Generator().manual_seed(9), progress=False
    )
    assert _rel(ours, x) <= 1e-4
    again = sampler.sample(
        lambda y, t, c: model(y, t), noise, generator=torch.Generator().manual_seed(9), progress=False
    )
    assert torch.equal(ours, again)
    if stochastic:
        other = sampler.sample(
            lambda y, t, c: model(y, t), noise, generator=torch.Generator().manual_seed(10), progress=False
        )
        assert _rel(other, x) > 1e-2


def test_sampler_from_config_takes_the_general_plans():
    config = diffusers.DPMSolverMultistepScheduler(
        **SD, algorithm_type="sde-dpmsolver++", solver_order=3
    ).config
    sampler = fastlatent.sampling.Sampler.from_config(
        config, steps=10, class_name="DPMSolverMultistepScheduler"
    )
    assert sampler.method == "dpm_solver" and len(sampler.plan) == 10
    assert [len(step.args[5]) for step in sampler.plan] == [0, 1, 2, 2, 2, 2, 2, 2, 1, 0]
    with pytest.raises(ValueError, match="prediction_type='sample'.*not expressible"):
        fastlatent.sampling.Sampler.from_scheduler(
            diffusers.EulerAncestralDiscreteScheduler(prediction_type="sample")
        )
