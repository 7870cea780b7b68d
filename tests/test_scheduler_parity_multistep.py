"""Fused UniPC, DEIS and DPM-Solver singlestep steps against diffusers' own: single steps from random states,
50-step trajectories for every order and variant, mixing fused and diffusers' steps, degenerate steps that
fall back, no host syncs, fp16."""

from __future__ import annotations

import pytest
import torch
from test_scheduler_parity import SD, _noise_kwargs, _NoSync, _pair, _rel, _run

from fastlatent.sampling import diffusers_fast

diffusers = pytest.importorskip("diffusers")

UNIPC = "UniPCMultistepScheduler"
DEIS = "DEISMultistepScheduler"
SINGLE = "DPMSolverSinglestepScheduler"

CASES = [
    (UNIPC, dict(SD)),
    (UNIPC, dict(SD, solver_order=1)),
    (UNIPC, dict(SD, solver_order=3)),
    (UNIPC, dict(SD, solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min")),
    (UNIPC, dict(SD, solver_type="bh1", final_sigmas_type="sigma_min", prediction_type="v_prediction")),
    (UNIPC, dict(SD, predict_x0=False, final_sigmas_type="sigma_min")),
    (UNIPC, dict(SD, predict_x0=False, solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min")),
    (UNIPC, dict(SD, predict_x0=False, prediction_type="sample", final_sigmas_type="sigma_min")),
    (
        UNIPC,
        dict(
            SD,
            solver_order=3,
            disable_corrector=[0, 1, 5],
            lower_order_final=False,
            final_sigmas_type="sigma_min",
        ),
    ),
    (UNIPC, dict(SD, use_karras_sigmas=True, timestep_spacing="trailing")),
    (UNIPC, dict(SD, use_exponential_sigmas=True, prediction_type="sample")),
    (UNIPC, dict(SD, use_beta_sigmas=True, solver_order=3)),
    (UNIPC, dict(thresholding=True, sample_max_value=1.5, solver_order=3)),
    (
        UNIPC,
        dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    ),
    (UNIPC, dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=3)),
    (UNIPC, dict(SD, steps_offset=1, timestep_spacing="leading")),
    (DEIS, dict(SD)),
    (DEIS, dict(SD, solver_order=1)),
    (DEIS, dict(SD, solver_order=3)),
    (DEIS, dict(SD, solver_order=3, use_karras_sigmas=True, prediction_type="v_prediction")),
    (DEIS, dict(SD, prediction_type="sample", use_exponential_sigmas=True)),
    (DEIS, dict(thresholding=True, sample_max_value=1.5, solver_order=3)),
    (DEIS, dict(SD, lower_order_final=False, timestep_spacing="trailing")),
    (SINGLE, dict(SD)),
    (SINGLE, dict(SD, solver_order=1)),
    (SINGLE, dict(SD, solver_order=3)),
    (SINGLE, dict(SD, solver_order=3, solver_type="heun", lower_order_final=True)),
    (SINGLE, dict(SD, solver_order=2, solver_type="heun", use_karras_sigmas=True)),
    (SINGLE, dict(SD, algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min")),
    (
        SINGLE,
        dict(
            SD, algorithm_type="dpmsolver", solver_type="heun", solver_order=3, final_sigmas_type="sigma_min"
        ),
    ),
    (
        SINGLE,
        dict(SD, algorithm_type="dpmsolver", prediction_type="v_prediction", final_sigmas_type="sigma_min"),
    ),
    (SINGLE, dict(SD, algorithm_type="sde-dpmsolver++", solver_order=3)),
    (SINGLE, dict(SD, algorithm_type="sde-dpmsolver++", solver_type="heun", solver_order=3)),
    (SINGLE, dict(thresholding=True, sample_max_value=1.5, solver_order=3, prediction_type="sample")),
    (SINGLE, dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=3)),
]
IDS = [f"{name[:5]}-{i}" for i, (name, _) in enumerate(CASES)]


def _fallbacks(scheduler):
    return dict(diffusers_fast.scheduler_report(scheduler).fallbacks)


@pytest.mark.parametrize("name,config", CASES, ids=IDS)
def test_fused_trajectory_matches_diffusers(name, config):
    """Every step of 10-, 7- and 50-step loops (the order schedule, warm-up, lower_order_final and the
    corrector all change with the count), all fused."""
    ours, ref = _pair(name, config)
    report = diffusers_fast.scheduler_report(ours)
    assert report.fused, report
    for steps in (10, 7, 50):
        ref.set_timesteps(steps)
        if len(set(ref.timesteps.tolist())) < steps:
            continue  # a repeated timestep starts diffusers' own loop one step in and it fails at the end
        worst, last = _run(ours, ref, steps, seed=steps)
        # 50 steps fed random model outputs can diverge (samples of a few hundred with the SDE solvers),
        # which amplifies float32 rounding: per step 1e-5 over 7 and 10 steps, 1e-4 over 50
        assert worst <= (1e-5 if steps < 50 else 1e-4) and last <= 1e-4, (steps, worst, last)
    assert not report.fallbacks, report.fallbacks


def _state(scheduler):
    keys = ("lower_order_nums", "_step_index", "this_order")
    values = {k: getattr(scheduler, k, None) for k in keys}
    values["timestep_list"] = [
        None if t is None else float(t) for t in getattr(scheduler, "timestep_list", [])
    ]
    return values


@pytest.mark.parametrize("name,config", CASES[::3], ids=IDS[::3])
def test_single_steps_from_random_states(name, config):
    """Random histories, random samples and random model outputs each step (not a trajectory): every step
    within 1e-5 relative, and the scheduler state afterwards equal to diffusers' (so later steps and
    fallbacks agree)."""
    ours, ref = _pair(name, config)
    ours.set_timesteps(12)
    ref.set_timesteps(12)
    gen = torch.Generator().manual_seed(11)
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        x = torch.randn(3, 4, 6, 6, generator=gen) * 2
        m = torch.randn(3, 4, 6, 6, generator=gen)
        seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        a = ours.step(m, t_ours, x, **_noise_kwargs(ours, seed)).prev_sample
        b = ref.step(m, t_ref, x, **_noise_kwargs(ref, seed)).prev_sample
        assert _rel(a, b) <= 1e-5
        assert _state(ours) == _state(ref)
        for mine, theirs in zip(ours.model_outputs, ref.model_outputs):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert _rel(mine, theirs) <= 1e-5
        for key in ("last_sample", "sample"):
            if getattr(ref, key, None) is not None:
                assert _rel(getattr(ours, key), getattr(ref, key)) <= 1e-5
    assert not _fallbacks(ours)


@pytest.mark.parametrize("name", [UNIPC, DEIS, SINGLE])
def test_fused_and_diffusers_steps_alternate(name):
    """Every third step runs diffusers' own step on the patched instance: the fused steps keep the state
    diffusers' step reads (and the other way round), so the loop still matches."""
    ours, ref = _pair(name, dict(SD, solver_order=3))
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    xo, xr = x.clone(), x.clone()
    for i, (t_ours, t_ref) in enumerate(zip(ours.timesteps, ref.timesteps)):
        m = torch.randn(2, 4, 8, 8, generator=gen)
        step = type(ours).step.__get__(ours) if i % 3 == 1 else ours.step
        xo = step(m, t_ours, xo).prev_sample
        xr = ref.step(m, t_ref, xr).prev_sample
        assert _rel(xo, xr) <= 1e-5
    assert not _fallbacks(ours)


@pytest.mark.parametrize("name", [UNIPC, DEIS, SINGLE])
def test_a_step_with_autograd_runs_diffusers_and_later_steps_still_match(name):
    """A model output that requires grad: diffusers' differentiable step runs, and so do the following steps
    while its output is in the solver history; the loop matches throughout."""
    ours, ref = _pair(name, dict(SD, solver_order=3))
    ours.set_timesteps(12)
    ref.set_timesteps(12)
    gen = torch.Generator().manual_seed(3)
    xo = xr = torch.randn(2, 4, 8, 8, generator=gen)
    for i, (t_ours, t_ref) in enumerate(zip(ours.timesteps, ref.timesteps)):
        m = torch.randn(2, 4, 8, 8, generator=gen)
        xo = ours.step(m.clone().requires_grad_(i == 2), t_ours, xo).prev_sample
        xr = ref.step(m, t_ref, xr).prev_sample
        assert xo.requires_grad or i != 2
        xo = xo.detach()
        assert _rel(xo, xr) <= 1e-5
    fallbacks = _fallbacks(ours)
    assert fallbacks.pop("inputs require grad (the fused step is inference-only)") >= 1
    assert sum(fallbacks.values()) <= 4, fallbacks


def test_degenerate_steps_fall_back_to_diffusers_result():
    """UniPC onto a zero final sigma: bh1 (and predict_x0=False) give NaN in diffusers, bh2 gives the x0
    prediction. The fused step takes the finite case and hands the NaN ones to diffusers' step."""
    for config, fused_last in (
        (dict(SD, solver_type="bh2"), True),
        (dict(SD, solver_type="bh1"), False),
        (dict(SD, predict_x0=False), False),
    ):
        ours, ref = _pair(UNIPC, config)
        worst, last = _run(ours, ref, 10)
        out_o, out_r = _last_outputs(ours, ref)
        assert torch.equal(out_o.isnan(), out_r.isnan())
        assert worst <= 1e-5 or not fused_last
        fallbacks = _fallbacks(ours)
        assert (not fallbacks) == fused_last, fallbacks
        if not fused_last:
            # one per loop (the last step of each): the 10-step one and the 6-step one
            assert sum(fallbacks.values()) == 2 and "degenerate" in next(iter(fallbacks))


def _last_outputs(ours, ref):
    ours.set_timesteps(6)
    ref.set_timesteps(6)
    x = torch.randn(1, 4, 4, 4)
    xo, xr = x.clone(), x.clone()
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        m = torch.randn(1, 4, 4, 4)
        xo = ours.step(m, t_ours, xo).prev_sample
        xr = ref.step(m, t_ref, xr).prev_sample
    return xo, xr


@pytest.mark.parametrize("name,config", CASES, ids=IDS)
def test_fused_steps_do_not_read_the_device(name, config):
    ours, ref = _pair(name, config)
    ours.set_timesteps(9)
    ref.set_timesteps(9)
    x = torch.randn(1, 4, 8, 8)
    with _NoSync():
        for t in ours.timesteps:
            x = ours.step(torch.randn_like(x), t, x, **_noise_kwargs(ours, 0)).prev_sample
    assert not _fallbacks(ours)
    with pytest.raises(AssertionError, match="host sync"), _NoSync():
        for t in ref.timesteps:
            x = ref.step(torch.randn_like(x), t, x, **_noise_kwargs(ref, 0)).prev_sample


@pytest.mark.parametrize("name", [UNIPC, DEIS, SINGLE])
def test_fp16_loop_runs_fused_and_tracks_fp32(name):
    ours, ref = _pair(name, dict(SD, solver_order=3))
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 16, 16, generator=gen)
    xh = x.half()
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        m = torch.randn(1, 4, 16, 16, generator=gen) * 0.5
        xh = ours.step(m.half(), t_ours, xh).prev_sample
        x = ref.step(m, t_ref, x).prev_sample
        assert xh.dtype == torch.float16
    assert not _fallbacks(ours)
    assert _rel(xh.float(), x) <= 2e-2


def test_configs_without_a_fused_step_are_reported():
    unipc = diffusers.UniPCMultistepScheduler(solver_p=diffusers.DDIMScheduler())
    assert "solver_p" in diffusers_fast.accelerate_scheduler(unipc).reason
    single = diffusers.DPMSolverSinglestepScheduler(
        algorithm_type="dpmsolver", thresholding=True, final_sigmas_type="sigma_min"
    )
    assert "thresholding" in diffusers_fast.accelerate_scheduler(single).reason
    learned = diffusers.DPMSolverSinglestepScheduler(variance_type="learned_range")
    assert "learned_range" in diffusers_fast.accelerate_scheduler(learned).reason
    for name in (UNIPC, DEIS, SINGLE):
        assert name in diffusers_fast.covered_schedulers()
        assert name in diffusers_fast.FALLBACK_CONFIGS


@pytest.mark.parametrize("name", [UNIPC, DEIS, SINGLE])
def test_timestep_outside_the_schedule_starts_at_the_last_step(name):
    """These solvers' index_for_timestep starts a timestep that is not in the schedule at the last step
    (diffusers' own scheduler tests step with such timesteps); the fused step does the same."""
    ours, ref = _pair(name, dict(SD))
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x, m = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert 7 not in ref.timesteps.tolist()
    a = ours.step(m, 7, x).prev_sample
    b = ref.step(m, 7, x).prev_sample
    assert ours.step_index == ref.step_index == 10
    assert _rel(a, b) <= 1e-5
    assert not _fallbacks(ours)


@pytest.mark.parametrize("name", [UNIPC, DEIS, SINGLE])
def test_add_noise_and_saved_config_after_fused_steps(name, tmp_path):
    """Mid-loop add_noise (inpainting) reads the step index the fused steps advanced, and the saved config is
    diffusers' own, byte for byte."""
    ours, ref = _pair(name, dict(SD, solver_order=3))
    for s in (ours, ref):
        s.set_timesteps(10)
        s.set_begin_index(0)
    x, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    xo = xr = x
    for t_ours, t_ref in list(zip(ours.timesteps, ref.timesteps))[:4]:
        m = torch.randn(2, 4, 8, 8)
        xo = ours.step(m, t_ours, xo).prev_sample
        xr = ref.step(m, t_ref, xr).prev_sample
    assert ours.step_index == ref.step_index == 4
    t = ref.timesteps[4:5]
    assert torch.equal(ours.add_noise(x, noise, t), ref.add_noise(x, noise, t))
    ours.save_config(tmp_path / "ours")
    ref.save_config(tmp_path / "ref")
    saved = "scheduler_config.json"
    assert (tmp_path / "ours" / saved).read_bytes() == (tmp_path / "ref" / saved).read_bytes()
    assert not _fallbacks(ours)


def test_deis_flow_sigmas_match_diffusers_to_its_own_rounding():
    """Flow sigmas start at sigma = 0.9997, alpha = 3e-4: DEIS' first step scales the sample by
    alpha_t / alpha_s ~ 120 against an equally large model-output term, so diffusers' own float32 step is
    8e-6 away from the same step evaluated in float64, and the fused step cannot be closer to it than that.
    Per step 3e-5 here, 1e-4 over 50 steps; everything fused."""
    ours, ref = _pair(DEIS, dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0))
    worst, _ = _run(ours, ref, 10, seed=10)
    assert worst <= 3e-5
    worst, last = _run(ours, ref, 50, seed=50)
    assert worst <= 1e-4 and last <= 1e-4
    assert not _fallbacks(ours)
