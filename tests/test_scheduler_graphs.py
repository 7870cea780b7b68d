"""A whole denoising loop, model included, with a patched diffusers scheduler inside one graph:
torch.compile(fullgraph=True) on the CPU, and CUDA-graph capture and replay (``cuda``: pending a GPU run).

A compiled loop sets the step index before its first step (``scheduler.set_begin_index(0)``): a traced
timestep has no value to be located by, where diffusers' own lookup reads it back (a graph break for both).
The families whose steps need only the step index and the host sigmas compile whole, fused op in the graph."""

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


def _loop(scheduler, model, x):
    scale = getattr(scheduler, "scale_model_input", None)  # the flow-matching schedulers have none
    for t in scheduler.timesteps:
        model_input = scale(x, t) if scale is not None else x
        x = scheduler.step(model(model_input, t), t, x).prev_sample
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
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
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
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert any(t.startswith("fastlatent.") for t in targets), targets
    assert not diffusers_fast.scheduler_report(scheduler).fallbacks
    assert torch.isfinite(got).all() and 0.5 < got.std() / eager.std() < 2


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
