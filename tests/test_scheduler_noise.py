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
