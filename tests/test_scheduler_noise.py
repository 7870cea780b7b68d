"""In-kernel Philox noise of the fused steps: the vectorised CPU draw, and the patched diffusers
schedulers' noise when the caller passes no generator (drawn in the kernel, same distribution)."""

import pytest
import torch

from fastlatent.ops import sampler_step
from fastlatent.reference.sampler_steps import philox_normal


def _draw(shape, seed, offset):
    x = torch.zeros(shape)
    out, _ = sampler_step(
        torch.zeros(shape),
        x,
        1.0,
        0.0,
        0.0,
        0.0,
        0.0,
        out_noise=1.0,
        seed=seed,
        offset=offset,
        return_x0=False,
    )
    return out


# batch 3 x 1001: chunk starts off the 4-element group boundary, whole 256-normal batches, short tails
@pytest.mark.parametrize("shape", [(1, 1), (1, 255), (1, 257), (3, 1001), (2, 40_000)])
@pytest.mark.parametrize("seed,offset", [(0, 0), (123_456_789_123, 7), (2**62 + 5, 2**40 + 3)])
def test_cpu_noise_matches_reference_stream(shape, seed, offset):
    got = _draw(shape, seed, offset)
    want = philox_normal(seed, offset, got.numel()).reshape(shape).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_cpu_noise_independent_of_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _draw((4, 65_537), 99, 3)
        torch.set_num_threads(max(2, threads))
        many = _draw((4, 65_537), 99, 3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.view(torch.int32), many.view(torch.int32))


# ------------------------------------------------ patched diffusers schedulers without a generator

diffusers = pytest.importorskip("diffusers")

from fastlatent.sampling import diffusers_fast  # noqa: E402

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# (class, config, steps): with constant inputs, the last of `steps` steps is the first one that adds noise
STOCHASTIC = [
    ("DDPMScheduler", SD, 1),
    ("LCMScheduler", SD, 1),
    ("EulerAncestralDiscreteScheduler", SD, 1),
    ("KDPM2AncestralDiscreteScheduler", SD, 2),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++"), 1),
]
IDS = [name for name, _, _ in STOCHASTIC]
SHAPE = (8, 4, 64, 64)


def _scheduler(name, config, patched):
    s = getattr(diffusers, name)(**config)
    if patched:
        import fastlatent

        fastlatent.patch(s, report=False)
    s.set_timesteps(10)
    return s


def _run(s, steps, generator=None):
    """Constant sample and model output, so every element of the last step's output is mean + s z."""
    x = torch.full(SHAPE, 0.3)
    m = torch.full(SHAPE, -0.2)
    for t in s.timesteps[:steps]:
        kwargs = {} if generator is None else {"generator": generator}
        x = s.step(m, t, x, **kwargs).prev_sample
    return x.flatten().double()


def _ks_two_sample(a, b):
    a, b = torch.sort(a).values, torch.sort(b).values
    both = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, both, right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, both, right=True).double() / b.numel()
    return (cdf_a - cdf_b).abs().max().item()


@pytest.mark.parametrize("name,config,steps", STOCHASTIC, ids=IDS)
def test_no_generator_draws_in_kernel_with_diffusers_distribution(name, config, steps, monkeypatch):
    ours, ref = _scheduler(name, config, True), _scheduler(name, config, False)

    def no_randn(*args, **kwargs):
        raise AssertionError("randn_tensor used without a generator")

    monkeypatch.setattr(diffusers_fast, "_randn", no_randn)
    torch.manual_seed(1)
    got = _run(ours, steps)
    assert not diffusers_fast.scheduler_report(ours).fallbacks
    monkeypatch.undo()
    torch.manual_seed(2)
    want = _run(ref, steps)
    assert want.std() > 1e-3  # the step does add noise
    # 131072 samples each: mean within ~6 standard errors, spread within 2 %, KS below its 0.1 % level
    n = got.numel()
    assert abs(got.mean() - want.mean()) < 6 * want.std() * (2 / n) ** 0.5
    assert abs(got.std() / want.std() - 1) < 0.02
    assert _ks_two_sample(got, want) < 1.95 * (2 / n) ** 0.5


@pytest.mark.parametrize("name,config,steps", STOCHASTIC, ids=IDS)
def test_no_generator_repeats_under_manual_seed(name, config, steps):
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(_run(_scheduler(name, config, True), steps))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("name,config,steps", STOCHASTIC, ids=IDS)
def test_with_generator_reproduces_diffusers_noise(name, config, steps):
    got = _run(_scheduler(name, config, True), steps, torch.Generator().manual_seed(3))
    want = _run(_scheduler(name, config, False), steps, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,config,steps", STOCHASTIC, ids=IDS)
def test_no_generator_while_compiling_draws_as_diffusers(name, config, steps, monkeypatch):
    """Under torch.compile (and CUDA-graph capture) the kernel's host-read seed would break the graph or be
    frozen into every replay: the patched step draws with diffusers' randn_tensor, so it equals diffusers."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(4)
    got = _run(_scheduler(name, config, True), steps)
    torch.manual_seed(4)
    want = _run(_scheduler(name, config, False), steps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
