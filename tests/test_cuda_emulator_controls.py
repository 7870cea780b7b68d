"""The CUDA emulator catches planted bugs (tests/emu/controls.py), and a real misaligned-view case.

Each control is a copy of a real kernel source with one edit (a removed __syncthreads, an off-by-one
tail, a missing cp.async wait, a dropped alignment check), compiled into fastlatent._emu by setup.py.
Each test runs the op on the real emulated kernels first (clean, and equal to the CPU kernel), then on
the control, which must raise the emulator's finding.
"""

import contextlib
import math

import pytest
import torch
from test_cuda_emulated import emulated

import fastlatent
from fastlatent import _emu

CONTROLS = ("missing_syncthreads", "off_by_one_tail", "missing_cp_async_wait", "misaligned_vector_load")


@contextlib.contextmanager
def control(name):
    _emu.set_control(name)
    try:
        yield
    finally:
        _emu.set_control("")


def test_every_control_is_built():
    assert sorted(_emu.control_names()) == sorted(CONTROLS)
    with pytest.raises(ValueError, match='no control named "nope"'):
        _emu.set_control("nope")


def _ema_args():
    gen = torch.Generator().manual_seed(3)
    k, d = 700, 5  # k > 512: every step of the 1024-thread tree reduction has work
    return (
        torch.rand(k, generator=gen),
        torch.randn(k, d, generator=gen),
        torch.empty(k, d),
        torch.randint(0, 9, (k,), generator=gen).float(),
        torch.randn(k, d, generator=gen),
        0.9,
        1e-5,
    )


def _run_ema(args):
    mutated = [a.clone() for a in args[:3]]
    fastlatent.ops.ema_update_(*mutated, *args[3:])
    return mutated


def test_removed_syncthreads_is_reported_as_a_race():
    args = _ema_args()
    expected = _run_ema(args)
    with emulated():
        clean = _run_ema(args)
    torch.testing.assert_close(clean, expected)
    with control("missing_syncthreads"), emulated(), pytest.raises(RuntimeError, match="shared-memory race"):
        _run_ema(args)


def test_off_by_one_tail_is_reported_out_of_bounds():
    x, indices = torch.randn(300, 6), torch.randint(0, 20, (300,))
    expected = fastlatent.ops.code_stats(x, indices, 20)
    with emulated():
        torch.testing.assert_close(fastlatent.ops.code_stats(x, indices, 20, deterministic=True), expected)
    with control("off_by_one_tail"), emulated():
        with pytest.raises(RuntimeError, match=r"out-of-bounds global access.*make_keys_kernel"):
            fastlatent.ops.code_stats(x, indices, 20, deterministic=True)


def test_missing_cp_async_wait_is_reported():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 32, 8, 16, generator=gen).half()
    w, b = torch.rand(32, generator=gen) + 0.5, torch.randn(32, generator=gen)
    conv_w = (torch.randn(16, 32, 3, 3, generator=gen) / math.sqrt(288)).half()
    args = (x, w, b, 8)
    kwargs = {"eps": 1e-5, "activation": "silu", "conv_weight": conv_w}
    expected = fastlatent.ops.group_norm_conv3x3(*args, **kwargs, algorithm="unfused")
    with emulated():
        ours = fastlatent.ops.group_norm_conv3x3(*args, **kwargs, algorithm="fused")
    torch.testing.assert_close(ours, expected, rtol=1e-2, atol=1e-2)
    with control("missing_cp_async_wait"), emulated():
        with pytest.raises(RuntimeError, match="cp.async destination read before its wait"):
            fastlatent.ops.group_norm_conv3x3(*args, **kwargs, algorithm="fused")


def test_misaligned_16_byte_load_is_reported():
    gen = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    buf = torch.randn(sample.numel() + 1, generator=gen)
    model_output = buf[1:].view(sample.shape)  # 4 bytes past a 16-byte boundary
    expected = fastlatent.ops.euler_step(model_output, sample, 0.9, 0.5)
    with emulated():  # the real launcher checks alignment and takes the scalar path
        torch.testing.assert_close(fastlatent.ops.euler_step(model_output, sample, 0.9, 0.5), expected)
    with control("misaligned_vector_load"), emulated():
        with pytest.raises(RuntimeError, match=r"misaligned access.*16-byte read needs 16-byte alignment"):
            fastlatent.ops.euler_step(model_output, sample, 0.9, 0.5)


def test_nearest_code_misaligned_view_is_never_silent():
    """A contiguous fp16 view 3 elements into its storage (6 bytes off a 16-byte boundary): the
    tensor-core tile loader's 16-byte loads must not run on it unchecked. Either the binding refuses or
    reroutes it (then the result equals the CPU kernel's), or the emulator reports the misaligned load."""
    gen = torch.Generator().manual_seed(6)
    n, d, k = 100, 64, 300
    buf = torch.randn(3 + n * d, generator=gen).half()
    x = buf[3 : 3 + n * d].view(n, d)
    codebook = torch.randn(k, d, generator=gen).half()
    expected = fastlatent.ops.nearest_code(x, codebook)
    try:
        with emulated():
            indices, distances = fastlatent.ops.nearest_code(x, codebook)
    except (RuntimeError, ValueError) as error:
        assert "align" in str(error), error
    else:
        assert torch.equal(indices, expected[0])
        torch.testing.assert_close(distances, expected[1])
