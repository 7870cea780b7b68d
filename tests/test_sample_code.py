"""sample_code semantics: the draws follow softmax(logits / T) (and vector-quantize-pytorch's sampler),
the noise is a function of (seed, offset) only, limits of the temperature, NaN rules.

Every test uses fixed seeds, so the frequency tests are deterministic; their thresholds are chi-square
quantiles with a false-alarm rate of 1e-4 for a correct sampler."""

import math

import pytest
import torch
from scipy import stats

import fastlatent
from fastlatent import reference


def _problem(b, n_distinct, k, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, n_distinct, d, generator=gen), torch.randn(b, k, d, generator=gen)


def _softmax_probs(x, codebook, temperature, metric):
    x64, c64 = x.double(), codebook.double()
    dot = x64 @ c64.transpose(-1, -2)
    if metric == "l2":
        sq = x64.pow(2).sum(-1, keepdim=True) + c64.pow(2).sum(-1)[..., None, :] - 2 * dot
        logits = -sq.clamp_min(1e-8).sqrt()
    else:
        logits = dot / (x64.norm(dim=-1, keepdim=True) * c64.norm(dim=-1)[..., None, :])
    return (logits / temperature).softmax(-1)


def _counts(indices, k):
    """indices [..., n_distinct, repeats] -> counts [..., n_distinct, k]."""
    flat = indices.reshape(-1, indices.shape[-1])
    return torch.stack([torch.bincount(row, minlength=k) for row in flat]).reshape(*indices.shape[:-1], k)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_draws_follow_the_softmax_of_the_logits(metric, temperature):
    b, rows, k, d, repeats = 2, 3, 6, 4, 6000
    x, codebook = _problem(b, rows, k, d)
    if metric == "l2":
        x = x * 0.5  # logits of comparable size, so that every code has a measurable probability
    probs = _softmax_probs(x, codebook, temperature, metric)
    many = x[:, :, None].expand(b, rows, repeats, d).reshape(b, rows * repeats, d)
    indices = fastlatent.ops.sample_code(many, codebook, temperature, seed=11, metric=metric)
    counts = _counts(indices.reshape(b, rows, repeats), k)
    for h in range(b):
        for r in range(rows):
            expected = probs[h, r] * repeats
            keep = expected > 5  # the chi-square approximation; the rest is pooled
            observed = torch.cat([counts[h, r][keep], counts[h, r][~keep].sum(0, keepdim=True)]).double()
            expected = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
            if expected[-1] == 0:
                observed, expected = observed[:-1], expected[:-1]
            statistic = ((observed - expected) ** 2 / expected).sum().item()
            assert statistic < stats.chi2.ppf(1 - 1e-4, len(expected) - 1), (h, r, statistic)


def test_draws_match_vector_quantize_pytorch_sampler():
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    rows, k, d, repeats, temperature = 4, 8, 6, 5000, 0.8
    x, codebook = _problem(1, rows, k, d, seed=3)
    x, codebook = x[0] * 0.4, codebook[0]
    many = x[:, None].expand(rows, repeats, d).reshape(-1, d)
    ours = fastlatent.ops.sample_code(many, codebook, temperature, seed=5)
    logits = -torch.cdist(many.double(), codebook.double()).float()
    torch.manual_seed(0)
    theirs, _ = vqp.gumbel_sample(logits, temperature=temperature, stochastic=True, training=True)
    for r in range(rows):
        table = torch.stack(
            [
                _counts(ours.reshape(rows, repeats)[r : r + 1], k)[0],
                _counts(theirs.reshape(rows, repeats)[r : r + 1], k)[0],
            ]
        )
        table = table[:, table.sum(0) > 0]
        _, p_value, _, _ = stats.chi2_contingency(table.numpy())
        assert p_value > 1e-4, (r, table)


def test_same_seed_same_codes_and_offset_names_a_new_draw():
    x, codebook = _problem(3, 200, 50, 8)
    a = fastlatent.ops.sample_code(x, codebook, 1.0, seed=123, offset=7)
    assert torch.equal(a, fastlatent.ops.sample_code(x, codebook, 1.0, seed=123, offset=7))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one OpenMP thread instead of several: the same draw
    try:
        assert torch.equal(a, fastlatent.ops.sample_code(x, codebook, 1.0, seed=123, offset=7))
    finally:
        torch.set_num_threads(threads)
    assert (a != fastlatent.ops.sample_code(x, codebook, 1.0, seed=123, offset=8)).float().mean() > 0.5
    assert (a != fastlatent.ops.sample_code(x, codebook, 1.0, seed=124, offset=7)).float().mean() > 0.5
    # head b's logits are elements [b N K, (b + 1) N K) of the stream: head 0 alone draws as in the batch
    assert torch.equal(a[0], fastlatent.ops.sample_code(x[0], codebook[0], 1.0, seed=123, offset=7))


def test_seed_from_torch_generator():
    x, codebook = _problem(1, 100, 40, 8)
    a = fastlatent.ops.sample_code(x[0], codebook[0], 1.0, generator=torch.Generator().manual_seed(4))
    b = fastlatent.ops.sample_code(x[0], codebook[0], 1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    torch.manual_seed(9)
    c = fastlatent.ops.sample_code(x[0], codebook[0], 1.0)
    torch.manual_seed(9)
    assert torch.equal(c, fastlatent.ops.sample_code(x[0], codebook[0], 1.0))


def test_temperature_limits():
    x, codebook = _problem(1, 300, 64, 16, seed=2)
    x, codebook = x[0], codebook[0]
    nearest = fastlatent.ops.nearest_code(x, codebook)[0]
    assert torch.equal(fastlatent.ops.sample_code(x, codebook, 1e-4, seed=1), nearest)
    hot = fastlatent.ops.sample_code(x[:1].expand(20000, 16), codebook, 1e6, seed=1)
    counts = torch.bincount(hot, minlength=64).double()
    assert ((counts - 312.5) ** 2 / 312.5).sum() < stats.chi2.ppf(1 - 1e-4, 63)


def test_noise_bound_used_to_skip_codes():
    # The kernels skip a code when logit / T + 16.7 cannot beat the running maximum: the largest noise
    # any Philox word yields is below that.
    largest_u = (2**23 - 1 + 0.5) / 2**23
    assert -math.log(-math.log(largest_u)) < 16.7
    # and the noise the kernels draw is the reference's: with equal logits the draw is argmax of the noise
    x, codebook = torch.zeros(50, 4), torch.zeros(300, 4)
    noise = reference.sample_code_noise(8, 2, 0, 50 * 300).reshape(50, 300)
    assert torch.equal(fastlatent.ops.sample_code(x, codebook, 1.0, seed=8, offset=2), noise.argmax(1))


def test_non_finite_rows_and_codes():
    x, codebook = _problem(1, 6, 10, 4)
    x, codebook = x[0].clone(), codebook[0].clone()
    x[2, 1] = float("nan")
    x[4, 0] = float("inf")
    out = fastlatent.ops.sample_code(x, codebook, 1.0, seed=0)
    assert out[2] == 0 and out[4] == 0
    codebook[7, 3] = float("nan")
    out = fastlatent.ops.sample_code(x, codebook, 1.0, seed=0)
    assert out[0] == 7 and out[1] == 7 and out[2] == 0


def test_empty_and_fake():
    assert fastlatent.ops.sample_code(torch.randn(0, 4), torch.randn(3, 4), 1.0, seed=0).shape == (0,)
    assert fastlatent.ops.sample_code(torch.randn(2, 0, 4), torch.randn(2, 3, 4), 1.0, seed=0).shape == (2, 0)
    meta = torch.ops.fastlatent.sample_code(
        torch.empty(5, 7, 4, device="meta"), torch.empty(5, 9, 4, device="meta"), 1.0, 0
    )
    assert meta.shape == (5, 7) and meta.dtype == torch.int64
