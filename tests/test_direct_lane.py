"""The direct lane of the sampler-step ops (fastlatent._C._direct_<op>, csrc/torch/direct_steps.h): the op's
own checks and kernel without the dispatcher's argument parsing. It must give the op's results bit for bit
and raise the op's exceptions, and must refuse (return None) wherever the dispatcher has work to do first, so
that the caller calls the op: dispatch and torch function modes, tensor subclasses, functorch transforms,
negative views, other devices, autograd. Heun's first stage has a lane of its own that also returns a copy
of the model output, written in the same pass (CPU)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastlatent._extension import _C
from fastlatent.sampling import diffusers_fast

pytestmark = pytest.mark.skipif(_C is None, reason="fastlatent extension not built")

OPS = torch.ops.fastlatent


def _lane(name):
    return getattr(_C, f"_direct_{name}")


def _inputs(shape=(2, 3, 5, 7), dtype=torch.float32, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=g).to(dtype) for _ in range(5)]
    if channels_last:
        tensors = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
    return tensors


# (op name, positional arguments after the two step tensors, keyword arguments); history tensors are filled in
CASES = [
    ("euler_step", (1.3, 0.9), {}),
    ("euler_step", (0.7, 0.4), dict(prediction="flow", return_x0=False)),
    ("euler_step", (2.0, 1.1), dict(prediction="v_prediction", clip_x0=1.0)),
    ("euler_step", (2.0, 1.1), dict(guidance_scale=None, threshold_quantile=0.9, threshold_max=1.5)),
    ("ddim_step", (0.4, 0.6), {}),
    ("ddim_step", (0.4, 0.6), dict(eta=1.0, seed=7, offset=12, prediction="v_prediction")),
    ("ddim_step", (0.4, 0.6), dict(eta=0.5, use_clipped_model_output=True, clip_x0=1.0, return_x0=False)),
    ("sampler_step", (1.0, -0.5, 0.9, 0.1, 0.0, "H0", []), {}),
    ("sampler_step", (0.0, 1.0, 1.0, 0.3, 0.0, "H2", [1.0, 0.15]), {}),
    ("sampler_step", (1.0, -0.2, 0.5, 0.0, 0.4, "H1", [0.2]), dict(clip_x0=1.0)),
    (
        "sampler_step",
        (1.0, -0.2, 0.8, 0.1, 0.0, "H3", [0.2, -0.1, 0.05]),
        dict(out_noise=0.3, seed=3, offset=4),
    ),
    ("sampler_step", (1.0, -0.2, 0.8, 0.1, 0.0, "H0", []), dict(out_noise=0.3, noise="Z")),
    ("sampler_step", (1.0, -0.2, 0.8, 0.1, 0.0, "H0", []), dict(return_x0=False)),
]


def _materialise(args, kwargs, tensors):
    history = tensors[2:5]
    args = list(args)
    for i, a in enumerate(args):
        if isinstance(a, str) and a.startswith("H"):
            args[i] = history[: int(a[1])]
    kwargs = dict(kwargs)
    if kwargs.get("noise") == "Z":
        kwargs["noise"] = tensors[4]
    return args, kwargs


def _same(a, b):
    assert type(a) is type(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype and x.stride() == y.stride()
        assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_lane_equals_the_op_bit_for_bit(case, channels_last, dtype):
    name, args, kwargs = CASES[case]
    tensors = _inputs(dtype=dtype, channels_last=channels_last, seed=case)
    args, kwargs = _materialise(args, kwargs, tensors)
    expected = getattr(OPS, name).default(tensors[0], tensors[1], *args, **kwargs)
    got = _lane(name)(tensors[0], tensors[1], *args, **kwargs)
    assert got is not None
    _same(tuple(got), tuple(expected))


def test_lane_runs_on_inference_tensors_and_without_grad():
    m, x = _inputs()[:2]
    with torch.inference_mode():
        mi, xi = m.clone(), x.clone()
    got = _lane("euler_step")(mi, xi, 1.0, 0.5)
    _same(tuple(got), tuple(OPS.euler_step.default(m, x, 1.0, 0.5)))
    with torch.no_grad():
        got = _lane("euler_step")(m.requires_grad_(), x, 1.0, 0.5)
    assert got is not None and not got[0].requires_grad


def test_lane_raises_the_ops_exceptions():
    m, x = _inputs()[:2]
    bad = m[:1]
    for lane, op, args in [
        (_lane("euler_step"), OPS.euler_step.default, (bad, x, 1.0, 0.5)),
        (_lane("euler_step"), OPS.euler_step.default, (m, x, -1.0, 0.5)),
        (_lane("ddim_step"), OPS.ddim_step.default, (m, x.double(), 0.4, 0.6)),
        (_lane("sampler_step"), OPS.sampler_step.default, (m, x, 1.0, 0.0, 1.0, 0.0, 0.0, [x], [])),
    ]:
        with pytest.raises(Exception) as from_op:
            op(*args)
        with pytest.raises(type(from_op.value)) as from_lane:
            lane(*args)
        assert str(from_lane.value) == str(from_op.value)
        assert isinstance(from_lane.value, (ValueError, TypeError))


class _Passthrough(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _FunctionPassthrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


def test_lane_refuses_where_the_dispatcher_has_work():
    m, x = _inputs()[:2]
    lane = _lane("euler_step")
    assert lane(m, x, 1.0, 0.5) is not None  # the control: a plain call runs
    with _Passthrough() as mode:
        assert lane(m, x, 1.0, 0.5) is None
        OPS.euler_step.default(m, x, 1.0, 0.5)
    assert any("fastlatent.euler_step" in f for f in mode.seen)  # the op the caller then calls is seen
    with _FunctionPassthrough():
        assert lane(m, x, 1.0, 0.5) is None
    assert lane(m.as_subclass(_Subclass), x, 1.0, 0.5) is None
    assert lane(m, x, 1.0, 0.5) is not None
    assert lane(torch._neg_view(m), x, 1.0, 0.5) is None
    assert lane(m.to("meta"), x.to("meta"), 1.0, 0.5) is None
    assert lane(m.requires_grad_(), x, 1.0, 0.5) is None  # grad mode on: the op attaches autograd's fallback
    m.requires_grad_(False)
    h = _inputs()[2]
    assert _lane("sampler_step")(m, x, 1.0, 0.0, 1.0, 0.0, 0.0, [h.as_subclass(_Subclass)], [0.5]) is None
    seen = []

    def inside(mb, xb):
        seen.append(lane(mb, xb, 1.0, 0.5))
        return OPS.euler_step.default(mb, xb, 1.0, 0.5)[0]

    try:
        torch.vmap(inside)(m, x)
    except RuntimeError:
        pass  # the op has no batching rule; what matters is that the lane did not run
    assert seen == [None]


def test_lane_appears_in_the_profiler_under_the_ops_name():
    m, x = _inputs()[:2]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert _lane("sampler_step")(m, x, 1.0, 0.0, 1.0, 0.0, 0.0, [], []) is not None
    assert "fastlatent::sampler_step" in {e.key for e in prof.key_averages()}


KEEPING = getattr(_C, "_direct_sampler_step_keeping_model_output", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 4, 100, 97)])  # one chunk with a tail; threaded chunks
@pytest.mark.parametrize("return_x0", [True, False])
def test_keeping_lane_is_the_op_and_a_copy_of_the_model_output(dtype, channels_last, shape, return_x0):
    """HeunDiscreteScheduler's first stage: the op's outputs bit for bit, and the model output's values in a
    tensor of its own (with its layout), written by the kernel in the same pass."""
    m, x = _inputs(shape, dtype, channels_last)[:2]
    args = (1.0, -0.7, 1.0, -0.35, 0.0)
    got = KEEPING(m, x, *args, return_x0=return_x0)
    expected = OPS.sampler_step.default(m, x, *args, [], [], return_x0=return_x0)
    assert got is not None and len(got) == 3
    _same(tuple(got[:2]), tuple(expected))
    copy = got[2]
    assert torch.equal(copy, m) and copy.dtype == m.dtype and copy.stride() == m.stride()
    assert copy.untyped_storage().data_ptr() != m.untyped_storage().data_ptr()
    m.add_(1.0)  # the caller reusing its buffer leaves the copy as it was
    assert not torch.equal(copy, m)


def test_keeping_lane_refuses_and_raises_as_the_op():
    m, x = _inputs()[:2]
    args = (1.0, -0.7, 1.0, -0.35, 0.0)
    assert KEEPING(m, x, *args) is not None
    with _Passthrough():
        assert KEEPING(m, x, *args) is None
    with _FunctionPassthrough():
        assert KEEPING(m, x, *args) is None
    assert KEEPING(m.as_subclass(_Subclass), x, *args) is None
    assert KEEPING(m.to("meta"), x.to("meta"), *args) is None
    assert KEEPING(m.clone().requires_grad_(), x, *args) is None
    with torch.no_grad():
        assert KEEPING(m.clone().requires_grad_(), x, *args) is not None
    for bad in [(m[:1], x, *args), (m, x.double(), *args), (m, x, float("nan"), *args[1:])]:
        with pytest.raises(Exception) as from_op:
            OPS.sampler_step.default(*bad, [], [])
        with pytest.raises(type(from_op.value)) as from_lane:
            KEEPING(*bad)
        assert str(from_lane.value) == str(from_op.value)


SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# one family per op the lanes serve (sampler_step, euler_step with keyword arguments, ddim_step)
@pytest.mark.parametrize(
    "name,config",
    [
        ("HeunDiscreteScheduler", SD),
        ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
        ("DDIMScheduler", dict(SD, clip_sample=False)),
        ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++")),
    ],
)
def test_patched_scheduler_gives_the_same_bits_with_and_without_the_lane(monkeypatch, name, config):
    diffusers = pytest.importorskip("diffusers")
    import fastlatent

    def run():
        scheduler = getattr(diffusers, name)(**config)
        fastlatent.patch(scheduler, report=False)
        scheduler.set_timesteps(6)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=g) * getattr(scheduler, "init_noise_sigma", 1.0)
        outputs = []
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        for t in scheduler.timesteps:
            kwargs = dict(generator=torch.Generator().manual_seed(int(t))) if takes_generator else {}
            out = scheduler.step(0.1 * torch.randn(x.shape, generator=g), t, x, **kwargs)
            x = out.prev_sample
            outputs += [v for v in out.values() if isinstance(v, torch.Tensor)]
        assert not diffusers_fast.scheduler_report(scheduler).fallbacks
        return outputs

    with_lane = run()
    calls = []
    lanes = {
        op: ((lambda *a, _f=f: calls.append(1) or _f(*a)), position, defaults)
        for op, (f, position, defaults) in diffusers_fast._DIRECT_LANES.items()
    }
    monkeypatch.setattr(diffusers_fast, "_DIRECT_LANES", lanes)
    keeping = diffusers_fast._KEEPING_LANE
    monkeypatch.setattr(diffusers_fast, "_KEEPING_LANE", lambda *a: calls.append(2) or keeping(*a))
    assert all(torch.equal(a, b) for a, b in zip(run(), with_lane))
    assert 1 in calls  # the lane is what the patched step calls in eager mode
    assert (2 in calls) == (name == "HeunDiscreteScheduler")  # and Heun's first stage, the keeping lane
    monkeypatch.setattr(diffusers_fast, "_DIRECT_LANES", {})
    monkeypatch.setattr(diffusers_fast, "_KEEPING_LANE", None)  # the op and a copy
    assert all(torch.equal(a, b) for a, b in zip(run(), with_lane))
