"""code_stats and ema_update_ semantics: skipping, determinism, gradients, peer parity."""

import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

import fastlatent
from fastlatent import ops, reference


def test_code_stats_skips_out_of_range_indices(device):
    x = torch.arange(12.0, device=device).reshape(6, 2)
    indices = torch.tensor([0, -1, 2, 5, 2, 99], device=device)
    counts, sums = ops.code_stats(x, indices, 6)
    assert counts.tolist() == [1, 0, 2, 0, 0, 1]
    assert sums.tolist() == [[0, 1], [0, 0], [12, 14], [0, 0], [0, 0], [6, 7]]


@pytest.mark.parametrize("deterministic", [True, False])
def test_code_stats_counts_are_exact(device, deterministic):
    indices = torch.randint(0, 7, (100_000,), device=device)
    counts, _ = ops.code_stats(torch.ones(100_000, 1, device=device), indices, 7, deterministic=deterministic)
    assert torch.equal(counts, torch.bincount(indices, minlength=7).float())


def test_code_stats_is_bitwise_deterministic(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, 24, generator=gen).to(device) * 1e3  # large values: order matters
    indices = torch.randint(0, 5, (50_000,), generator=gen).to(device)
    first = ops.code_stats(x, indices, 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.code_stats(x, indices, 5)
    finally:
        torch.set_num_threads(threads)
    for _ in range(3):
        again = ops.code_stats(x, indices, 5)
        assert torch.equal(again[1], first[1])
    assert torch.equal(single[1], first[1])
    # Exactly the documented order (code_stats.h), in fp32.
    torch.testing.assert_close(first[1], _sums_in_documented_order(x, indices, 5), rtol=0, atol=0)


def _sums_in_documented_order(x, indices, k, piece_rows=128):
    """code_stats' fp32 sums in its order: rows sorted stably by code, the sorted positions cut at every
    multiple of ``piece_rows``, each piece summed in row order, a code's pieces combined pairwise (stride 1,
    2, 4, ...)."""
    device, x, indices = x.device, x.cpu(), indices.cpu()
    sums = torch.zeros(k, x.shape[1])
    begin = 0
    for c in range(k):
        rows = x[indices == c]
        end = begin + len(rows)
        cuts = [begin] + list(range((begin // piece_rows + 1) * piece_rows, end, piece_rows)) + [end]
        pieces = []
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            acc = torch.zeros(x.shape[1])
            for row in rows[lo - begin : hi - begin]:
                acc += row
            pieces.append(acc)
        stride = 1
        while stride < len(pieces):
            for j in range(0, len(pieces) - stride, 2 * stride):
                pieces[j] = pieces[j] + pieces[j + stride]
            stride *= 2
        sums[c] = pieces[0] if pieces else 0.0
        begin = end
    return sums.to(device)


def test_code_stats_collapsed_code_error_is_bounded():
    """A collapsed code (about 1M rows): pieces of 128 rows summed in order, combined in a pairwise tree.

    The rounding error stays below (127 + ceil(log2(pieces))) u sum |x| (u = 2^-24, code_stats.h); the
    same rows summed in one sequential fp32 pass miss that bound, so the check has teeth.
    """
    n, d = 1 << 20, 3
    gen = torch.Generator().manual_seed(0)
    x = 1.0 + 0.25 * torch.randn(n, d, generator=gen)
    x[:, 1] *= -3.0
    indices = torch.zeros(n, dtype=torch.int64)
    indices[::997] = 1  # a second code, so pieces start off the 128-row boundaries
    indices[5::1009] = -1  # and skipped rows
    counts, sums = ops.code_stats(x, indices, 3)
    valid = indices >= 0
    ref = torch.zeros(3, d, dtype=torch.float64).index_add_(0, indices[valid], x[valid].double())
    magnitude = torch.zeros(3, d, dtype=torch.float64).index_add_(0, indices[valid], x[valid].double().abs())
    assert torch.equal(counts, torch.bincount(indices[valid], minlength=3).float())
    pieces = n // 128 + 2
    bound = (127 + math.ceil(math.log2(pieces))) * 2.0**-24 * magnitude
    error = (sums.double() - ref).abs()
    assert (error <= bound).all(), (error / magnitude).max().item()
    collapsed = x[indices == 0].numpy()
    sequential = np.cumsum(collapsed, axis=0, dtype=np.float32)[-1]  # one fp32 add after another
    assert (torch.from_numpy(sequential).double() - ref[0]).abs().max() > bound[0].max()


def test_code_stats_gradient(device):
    x = torch.randn(40, 5, device=device, requires_grad=True)
    indices = torch.randint(-1, 6, (40,), device=device)
    weight = torch.randn(6, 5, device=device)
    (ops.code_stats(x, indices, 6)[1] * weight).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (reference.code_stats(x_ref, indices, 6)[1] * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not ops.code_stats(x, indices, 6)[0].requires_grad


def test_ema_update_matches_vector_quantize_pytorch(device):
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    torch.manual_seed(0)
    k, d, decay, eps = 32, 6, 0.8, 1e-5
    codebook = vqp.Codebook(d, k, decay=decay, eps=eps, threshold_ema_dead_code=0).to(device)
    codebook.train()
    cluster_size = codebook.cluster_size[0].clone()
    embed_sum = codebook.embed_avg[0].clone()
    ours = codebook.embed[0].clone()
    for _ in range(3):
        x = torch.randn(1, 500, d, device=device)
        quantize, indices, _ = codebook(x)  # updates its EMA state in place
        counts, sums = ops.code_stats(x[0], indices[0], k)
        ops.ema_update_(cluster_size, embed_sum, ours, counts, sums, decay, eps)
        torch.testing.assert_close(cluster_size, codebook.cluster_size[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(embed_sum, codebook.embed_avg[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours, codebook.embed[0], rtol=1e-5, atol=1e-5)


def test_ema_update_fp16_codebook(device):
    k, d = 8, 4
    cluster_size, embed_sum = torch.ones(k, device=device), torch.randn(k, d, device=device)
    codebook = torch.empty(k, d, device=device, dtype=torch.float16)
    ops.ema_update_(
        cluster_size, embed_sum, codebook, torch.ones(k, device=device), torch.randn(k, d, device=device), 0.5
    )
    n = cluster_size.sum()
    expected = embed_sum / ((cluster_size + 1e-5) / (n + k * 1e-5) * n)[:, None]
    assert codebook.dtype == torch.float16
    torch.testing.assert_close(codebook, expected.half())


@pytest.mark.cuda
def test_code_stats_atomic_counts_pass_two_to_the_24():
    # A float counter incremented by atomicAdd(1.0f) stops at 2^24; the counts are integers until the end.
    n = 2**24 + 6  # representable in fp32 (even), so the count is exact
    indices = torch.zeros(n, dtype=torch.long, device="cuda")
    indices[:4] = 1
    counts, sums = ops.code_stats(torch.ones(n, 1, device="cuda"), indices, 3, deterministic=False)
    assert counts.tolist() == [n - 4, 4, 0]
    assert sums[1].item() == 4.0


def _cuobjdump():
    """The CUDA toolkit's cuobjdump, or the copy Triton ships; None without either."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [shutil.which("cuobjdump"), os.path.join(cuda_home, "bin", "cuobjdump")]
    try:
        import triton

        triton_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        candidates.append(os.path.join(triton_bin, "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_code_stats_atomic_kernel_counts_with_integer_atomics():
    # Static check of the compiled kernels, so it runs without a GPU (the cuda test above executes them):
    # in every atomic_stats_kernel, per arch and dtype, the sums take the one float atomic add and the
    # counts an integer one (a float counter stops at 2^24).
    if not fastlatent.build_info()["cuda"]:
        pytest.skip("built without CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton) to read the kernels")
    from fastlatent import _C

    def run(*args):
        return subprocess.run([tool, *args, _C.__file__], capture_output=True, text=True, check=True).stdout

    symbols = run("-symbols")
    names = sorted(set(re.findall(r"_Z\w*atomic_stats_kernel\w*", symbols)))
    assert len(names) == 3, names  # fp32, fp16, bf16
    sass = run("-sass", "-fun", ",".join(names))
    bodies = re.split(r"Function : ", sass)[1:]
    assert len(bodies) >= 2 * len(names), "expected SASS for every arch"
    for body in bodies:
        adds = re.findall(r"\b(?:RED|REDG|ATOM|ATOMG)\.E\.ADD[\w.]*", body)
        assert sum(".F32" in a for a in adds) == 1, (body.split()[0], adds)
        assert sum(".F" not in a for a in adds) == 1, (body.split()[0], adds)


@pytest.mark.cuda
def test_code_stats_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(30_000, 48, generator=gen)
    indices = torch.randint(-1, 1000, (30_000,), generator=gen)
    cpu = ops.code_stats(x, indices, 1000)
    for deterministic in (True, False):
        gpu = ops.code_stats(x.cuda(), indices.cuda(), 1000, deterministic=deterministic)
        assert torch.equal(gpu[0].cpu(), cpu[0])
        torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-5, atol=1e-4)
    # Deterministic CUDA sums in the documented order: bitwise equal to the CPU's.
    assert torch.equal(ops.code_stats(x.cuda(), indices.cuda(), 1000)[1].cpu(), cpu[1])
