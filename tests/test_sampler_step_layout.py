"""Output layout of the sampler-step ops: channels_last in, channels_last out (the kernel runs on that memory
as it is, no copies), with the same values as contiguous inputs; mixed layouts and other strides give
contiguous outputs; the fake kernels predict the real strides."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastlatent  # noqa: F401  (registers the ops)

ops = torch.ops.fastlatent
CL = torch.channels_last


def _tensors(shape, count, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(count)]


STEPS = {
    "euler": lambda mo, x, h, z: ops.euler_step.default(
        mo, x, 0.7, 0.4, "epsilon", None, 0.0, None, None, 1.0, True
    ),
    # torch.cat keeps channels_last when both halves have it
    "euler_guided": lambda mo, x, h, z: ops.euler_step.default(
        torch.cat([mo, h]), x, 0.7, 0.4, "v_prediction", 4.0, 0.5, None, None, 1.0, False
    ),
    "ddim_noise": lambda mo, x, h, z: ops.ddim_step.default(
        mo, x, 0.3, 0.5, 0.5, "epsilon", False, None, 0.0, 1.0, None, 1.0, z, 0, 0, None, True
    ),
    "ddpm_drawn": lambda mo, x, h, z: ops.ddpm_step.default(
        mo, x, 0.3, 0.5, "epsilon", None, 0.0, None, None, 1.0, None, 5, 9, None, True
    ),
    "dpmpp": lambda mo, x, h, z: ops.dpmpp_2m_step.default(
        mo, x, h, 0.8, 0.6, 0.9, 0.43, 0.7, 0.71, "epsilon", None, 0.0, None, None, 1.0
    ),
    "generic": lambda mo, x, h, z: ops.sampler_step.default(
        mo,
        x,
        1.0,
        -0.5,
        0.9,
        0.1,
        0.2,
        [h, z],
        [0.3, -0.1],
        0.0,
        None,
        0.0,
        None,
        None,
        1.0,
        None,
        0,
        0,
        None,
        False,
    ),
    "convert": lambda mo, x, h, z: (
        ops.convert_prediction.default(mo, x, 0.6, 0.8, "epsilon", "flow", None, 0.0),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("step", sorted(STEPS))
def test_channels_last_in_channels_last_out_same_bits(step, dtype):
    mo, x, h, z = _tensors((3, 5, 9, 7), 4, dtype)
    want = STEPS[step](mo, x, h, z)
    got = STEPS[step](*(t.contiguous(memory_format=CL) for t in (mo, x, h, z)))
    for w, g in zip(want, got):
        if w.numel():
            assert g.is_contiguous(memory_format=CL) and not g.is_contiguous()
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(g.contiguous().view(bits), w.view(bits))


def test_mixed_layouts_give_contiguous_outputs():
    mo, x, h, z = _tensors((2, 4, 6, 5), 4)
    want, want_x0 = ops.euler_step.default(mo, x, 0.7, 0.4, "epsilon", None, 0.0, None, None, 1.0, True)
    out, x0 = ops.euler_step.default(
        mo, x.contiguous(memory_format=CL), 0.7, 0.4, "epsilon", None, 0.0, None, None, 1.0, True
    )
    assert out.is_contiguous() and x0.is_contiguous()
    assert torch.equal(out, want) and torch.equal(x0, want_x0)
    # a transposed (dense, but not channels_last) sample: contiguous outputs, same values
    out, _ = ops.euler_step.default(
        mo.transpose(2, 3), x.transpose(2, 3), 0.7, 0.4, "epsilon", None, 0.0, None, None, 1.0, False
    )
    assert out.is_contiguous()
    assert torch.equal(out, want.transpose(2, 3))


@pytest.mark.parametrize("layouts", [(CL, CL, CL, CL), (CL, torch.contiguous_format, CL, CL), (None,) * 4])
@pytest.mark.parametrize("step", sorted(STEPS))
def test_fake_kernels_predict_output_strides(step, layouts):
    tensors = [
        t if f is None else t.contiguous(memory_format=f) for t, f in zip(_tensors((2, 3, 4, 5), 4), layouts)
    ]
    real = STEPS[step](*tensors)
    with FakeTensorMode() as mode:
        fake = STEPS[step](*(mode.from_tensor(t) for t in tensors))
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.stride() == f.stride(), (r.stride(), f.stride())
