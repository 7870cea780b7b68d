"""A whole denoising loop, model included, with a patched diffusers scheduler inside one graph:
torch.compile(fullgraph=True) on the CPU, and CUDA-graph capture and replay (``cuda``: pending a GPU run).

A compiled loop sets the step index before its first step (``scheduler.set_begin_index(0)``): a traced
timestep has no value to be located by, where diffusers' own lookup reads it back (a graph break for both).
The families whose steps need only the step index and the host sigmas compile whole, fused op in the graph;
those that look coefficients up by the timestep's value (DDIM, DDPM, PNDM, LCM) look them up on the device
and compile whole too, their step as the fused op's formula in torch operations."""

from __future__ import annotations

import pytest
import torch

import fastlatent
from fastlatent.sampling import diffusers_fast

diffusers = pytest.importorskip("diffusers")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# (class name, config): the families whose fused steps trace whole under torch.compile
COMPILED_CASES = [
    ("EulerDiscreteScheduler", dict(SD)),
    ("EulerDiscreteScheduler", dict(SD, prediction_type="v_prediction", use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(SD)),
    ("DPMSolverMultistepScheduler", dict(SD, solver_order=3, use_karras_sigmas=True)),
    ("KDPM2DiscreteScheduler", dict(SD)),
    ("HeunDiscreteScheduler", dict(SD)),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
    ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0)),
    # host coefficients (float32 tensor, numpy and scipy arithmetic) computed at trace time, not traced
    ("UniPCMultistepScheduler", dict(SD)),
    ("UniPCMultistepScheduler", dict(SD, solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min")),
    ("DEISMultistepScheduler", dict(SD, solver_order=3)),
    ("DPMSolverSinglestepScheduler", dict(SD)),
    ("DPMSolverSinglestepScheduler", dict(SD, solver_order=3)),
    ("LMSDiscreteScheduler", dict(SD)),
]


class _Denoiser(torch.nn.Module):
    """A small model of (x, t): one convolution, scaled by the timestep, so the graph holds model and step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, t):
        return 0.1 * torch.tanh(self.conv(x)) * (1.0 + t.float() / 1000.0)


def _scheduler(name, config, steps, device="cpu"):
    scheduler = getattr(diffusers, name)(**config)
    fastlatent.patch(scheduler, report=False)
    scheduler.set_timesteps(steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler


def _loop(scheduler, model, x, **keywords):
    scale = getattr(scheduler, "scale_model_input", None)  # the flow-matching schedulers have none
    for t in scheduler.timesteps:
        model_input = scale(x, t) if scale is not None else x
        x = scheduler.step(model(model_input, t), t, x, **keywords).prev_sample
    return x


@pytest.mark.parametrize("name,config", COMPILED_CASES, ids=[n for n, _ in COMPILED_CASES])
def test_compiled_loop_is_one_graph_with_the_fused_step(name, config):
    model = _Denoiser().eval()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    steps = 6
    with torch.no_grad():
        eager_scheduler = _scheduler(name, config, steps)
        eager = _loop(eager_scheduler, model, x * getattr(eager_scheduler, "init_noise_sigma", 1.0))
        plain = getattr(diffusers, name)(**config)
        plain.set_timesteps(steps)
        expected = _loop(plain, model, x * getattr(plain, "init_noise_sigma", 1.0))

        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        scheduler = _scheduler(name, config, steps)
        torch.compiler.reset()  # each case compiles the same code object: start from no cached graphs
        compiled = torch.compile(
            lambda x0: _loop(scheduler, model, x0), backend=backend, fullgraph=True, dynamic=False
        )
        got = compiled(x * getattr(scheduler, "init_noise_sigma", 1.0))
    assert len(graphs) == 1
    targets = _graph_targets(graphs[0])
    assert any(t.startswith("fastlatent.") for t in targets), targets  # the fused step, not diffusers' math
    assert not diffusers_fast.scheduler_report(scheduler).fallbacks
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_compiled_stochastic_loop_is_one_graph(name):
    """Without a generator, a traced stochastic step draws diffusers' way (randn_tensor, in the graph): the
    fused op and the draw in one graph, and a sample as far from the eager one as two noise draws are."""
    model = _Denoiser().eval()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        eager_scheduler = _scheduler(name, dict(SD), 6)
        eager = _loop(eager_scheduler, model, x * eager_scheduler.init_noise_sigma)
        scheduler = _scheduler(name, dict(SD), 6)
        torch.compiler.reset()
        compiled = torch.compile(lambda x0: _loop(scheduler, model, x0), backend=backend, fullgraph=True)
        got = compiled(x * scheduler.init_noise_sigma)
    assert len(graphs) == 1
    targets = _graph_targets(graphs[0])
    assert any(t.startswith("fastlatent.") for t in targets), targets
    assert not diffusers_fast.scheduler_report(scheduler).fallbacks
    assert torch.isfinite(got).all() and 0.5 < got.std() / eager.std() < 2


# (class name, config, step keywords): steps whose coefficients are looked up by the timestep's value
TRACED_TIMESTEP_CASES = [
    ("DDIMScheduler", dict(SD), {}),
    ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), {}),
    ("DDIMScheduler", dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"), {}),
    (
        "DDIMScheduler",
        dict(SD, prediction_type="sample", clip_sample_range=0.5),
        {"use_clipped_model_output": True},
    ),
    ("DDIMScheduler", dict(SD, thresholding=True, clip_sample=False, sample_max_value=1.2), {}),
    ("PNDMScheduler", dict(SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)),
    ("PNDMScheduler", dict(SD, skip_prk_steps=True, prediction_type="v_prediction")),
]
TRACED_TIMESTEP_CASES = [case if len(case) == 3 else (*case, {}) for case in TRACED_TIMESTEP_CASES]
# stochastic: the compiled loop draws diffusers' way (torch.randn, no generator), so under the same seed it
# draws diffusers' numbers
TRACED_STOCHASTIC_CASES = [
    ("DDPMScheduler", dict(SD), {}),
    ("DDPMScheduler", dict(SD, prediction_type="v_prediction", clip_sample=False), {}),
    ("DDPMScheduler", dict(SD, prediction_type="sample", thresholding=True), {}),
    ("DDIMScheduler", dict(SD), {"eta": 1.0}),
    ("LCMScheduler", dict(SD), {}),
    ("LCMScheduler", dict(SD, prediction_type="v_prediction", timestep_scaling=5.0), {}),
]


def _graph_targets(graph_module) -> set:
    return {str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"}


def _compile_once(scheduler, model, keywords):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward  # run eagerly: aten.randn in the graph draws from torch's generator as diffusers

    torch.compiler.reset()
    compiled = torch.compile(
        lambda x0: _loop(scheduler, model, x0, **keywords), backend=backend, fullgraph=True, dynamic=False
    )
    return compiled, graphs


@pytest.mark.parametrize(
    "name,config,keywords",
    TRACED_TIMESTEP_CASES,
    ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(TRACED_TIMESTEP_CASES)],
)
def test_compiled_loop_looks_timestep_coefficients_up_on_the_device(name, config, keywords):
    model = _Denoiser().eval()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager_scheduler = _scheduler(name, config, 6)
        eager = _loop(eager_scheduler, model, x * eager_scheduler.init_noise_sigma, **keywords)
        plain = getattr(diffusers, name)(**config)
        plain.set_timesteps(6)
        expected = _loop(plain, model, x * plain.init_noise_sigma, **keywords)
        scheduler = _scheduler(name, config, 6)
        compiled, graphs = _compile_once(scheduler, model, keywords)
        got = compiled(x * scheduler.init_noise_sigma)
    assert len(graphs) == 1
    assert not diffusers_fast.scheduler_report(scheduler).fallbacks
    assert not diffusers_fast.scheduler_report(eager_scheduler).fallbacks
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name,config,keywords",
    TRACED_STOCHASTIC_CASES,
    ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(TRACED_STOCHASTIC_CASES)],
)
def test_compiled_stochastic_loop_draws_diffusers_noise(name, config, keywords):
    model = _Denoiser().eval()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = getattr(diffusers, name)(**config)
        plain.set_timesteps(6)
        torch.manual_seed(5)
        expected = _loop(plain, model, x * plain.init_noise_sigma, **keywords)
        scheduler = _scheduler(name, config, 6)
        compiled, graphs = _compile_once(scheduler, model, keywords)
        torch.manual_seed(5)
        got = compiled(x * scheduler.init_noise_sigma)
        scheduler.set_timesteps(6)  # a second image: the same loop, not compiled again
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        torch.manual_seed(6)
        other = compiled(x * scheduler.init_noise_sigma)
    assert len(graphs) == 1
    assert not diffusers_fast.scheduler_report(scheduler).fallbacks
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(got, other)  # the draw is in the graph, not frozen into it


@pytest.mark.parametrize("schedule", ["custom", "training"])
def test_compiled_ddpm_step_finds_the_previous_timestep_on_the_device(schedule):
    """diffusers' previous_timestep at a traced timestep: the next entry of custom timesteps, or t - 1 on the
    training schedule (no set_timesteps); no noise at t = 0. One compiled step, every timestep."""
    plain = diffusers.DDPMScheduler(**SD)
    scheduler = diffusers.DDPMScheduler(**SD)
    fastlatent.patch(scheduler, report=False)
    if schedule == "custom":
        for s in (plain, scheduler):
            s.set_timesteps(timesteps=[950, 700, 420, 90, 3, 0])
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    output = 0.3 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(
        lambda m, t, x: scheduler.step(m, t, x).prev_sample, backend="eager", fullgraph=True, dynamic=False
    )
    timesteps = plain.timesteps if schedule == "custom" else torch.tensor([999, 500, 1, 0])
    with torch.no_grad():
        for t in timesteps:
            torch.manual_seed(7)
            expected = plain.step(output, t, sample).prev_sample
            torch.manual_seed(7)
            got = compiled(output, t, sample)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not diffusers_fast.scheduler_report(scheduler).fallbacks


def test_compiled_ddpm_step_at_a_timestep_outside_the_schedule_is_nan():
    """diffusers' DDPM finds the previous timestep by the timestep's position in scheduler.timesteps and fails
    for one that is not there; a traced timestep cannot raise, so its sample is NaN, never another step's."""
    scheduler = _scheduler("DDPMScheduler", dict(SD), 6)
    sample = torch.randn(1, 4, 8, 8)
    compiled = torch.compile(
        lambda m, t, x: scheduler.step(m, t, x).prev_sample, backend="eager", fullgraph=True, dynamic=False
    )
    with torch.no_grad():
        inside = compiled(sample, scheduler.timesteps[2], sample)
        outside = compiled(sample, scheduler.timesteps[2] + 1, sample)
    assert torch.isfinite(inside).all()
    assert torch.isnan(outside).all()


# ---------------------------------------------------------------------------------------- CUDA graphs

CAPTURED_CASES = [
    ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    ("PNDMScheduler", dict(SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)),
    ("EulerDiscreteScheduler", dict(SD)),
    ("DPMSolverMultistepScheduler", dict(SD)),
    ("UniPCMultistepScheduler", dict(SD)),
    ("HeunDiscreteScheduler", dict(SD)),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
]


@pytest.mark.cuda
@pytest.mark.parametrize("name,config", CAPTURED_CASES, ids=[n for n, _ in CAPTURED_CASES])
def test_cuda_graph_capture_of_a_patched_loop_replays_the_eager_loop(name, config):
    """The loop's kernels (model and fused steps, with their host-computed coefficients) are captured once
    and replayed: no step reads the device, so capture does not fail, and a replay equals the eager loop."""
    model = _Denoiser().cuda().eval()
    steps = 8
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        eager_scheduler = _scheduler(name, config, steps, "cuda")
        eager = _loop(eager_scheduler, model, x * getattr(eager_scheduler, "init_noise_sigma", 1.0))

        warmup = torch.cuda.Stream()
        warmup.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warmup):  # first-use work (cuDNN handles, host copies) before capture
            _loop(_scheduler(name, config, steps, "cuda"), model, x)
        torch.cuda.current_stream().wait_stream(warmup)

        scheduler = _scheduler(name, config, steps, "cuda")
        static_x = x * getattr(scheduler, "init_noise_sigma", 1.0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = _loop(scheduler, model, static_x)
        graph.replay()
        torch.cuda.synchronize()
    assert not diffusers_fast.scheduler_report(scheduler).fallbacks
    torch.testing.assert_close(static_out, eager, rtol=1e-5, atol=1e-6)
    first = static_out.clone()
    graph.replay()
    assert torch.equal(static_out, first)


@pytest.mark.cuda
def test_cuda_graph_capture_of_a_stochastic_patched_loop():
    """Without a generator, a captured stochastic step draws diffusers' way (randn_tensor on the device, whose
    generator state the graph advances on every replay): fresh noise per replay, finite samples."""
    model = _Denoiser().cuda().eval()
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        warmup = torch.cuda.Stream()
        warmup.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warmup):
            _loop(_scheduler("EulerAncestralDiscreteScheduler", dict(SD), 8, "cuda"), model, x)
        torch.cuda.current_stream().wait_stream(warmup)
        scheduler = _scheduler("EulerAncestralDiscreteScheduler", dict(SD), 8, "cuda")
        static_x = x * scheduler.init_noise_sigma
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = _loop(scheduler, model, static_x)
        graph.replay()
        first = static_out.clone()
        graph.replay()
        torch.cuda.synchronize()
    assert not diffusers_fast.scheduler_report(scheduler).fallbacks
    assert torch.isfinite(first).all() and torch.isfinite(static_out).all()
    assert not torch.equal(first, static_out)
