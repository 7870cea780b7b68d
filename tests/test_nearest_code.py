"""nearest_code semantics: ties, NaN/Inf, determinism, metrics, gradients, large inputs."""

import pytest
import torch
from opspecs import assert_near_ties

import fastlatent
from fastlatent import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# D=8 takes the CPU's small-D (row-vectorised) path, D=40 the panel path.
PATH_DIMS = pytest.mark.parametrize("d", [8, 40])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_codes_are_found(device, dtype):
    # Rows that are copies of codes must map to those codes with distance 0.
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(300, 24, generator=gen).to(device, dtype)
    picks = torch.randint(0, 300, (500,), generator=gen).to(device)
    indices, distances = fastlatent.nearest_code(codebook[picks], codebook)
    assert torch.equal(indices, picks)
    assert torch.all(distances == 0)


@PATH_DIMS
def test_ties_go_to_lowest_index(device, d):
    base = torch.randn(5, d, device=device)
    codebook = torch.cat([base, base, base])  # each code appears at i, i + 5, i + 10
    x = base[torch.tensor([4, 0, 3, 3, 1], device=device)] + 0.0
    indices, _ = fastlatent.nearest_code(x, codebook)
    assert indices.tolist() == [4, 0, 3, 3, 1]
    # Equidistant codes: x halfway between code 7 and code 2 picks 2 (K=40: 7 and 2 sit in
    # different SIMD lanes of the same panel, 39 in the partial panel).
    c = torch.full((40, d), 5.0, device=device)
    c[2], c[7], c[39] = 0.0, 0.0, 0.0
    c[2, 0], c[7, 0], c[39, 0] = -1.0, 1.0, 1.0
    indices, distances = fastlatent.nearest_code(torch.zeros(1, d, device=device), c)
    assert indices.item() == 2 and distances.item() == 1.0


def test_cosine_ignores_scale(device):
    gen = torch.Generator().manual_seed(3)
    codebook = torch.randn(64, 8, generator=gen).to(device)
    scales = torch.rand(64, 1, generator=gen).to(device) * 10 + 0.1
    picks = torch.randperm(64, generator=gen).to(device)
    indices, distances = fastlatent.nearest_code(codebook[picks] * scales, codebook, metric="cosine")
    assert torch.equal(indices, picks)
    torch.testing.assert_close(distances, torch.zeros_like(distances), atol=1e-6, rtol=0)


def test_zero_vectors_in_cosine(device):
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], device=device)
    x = torch.tensor([[0.0, 0.0], [0.0, 2.0]], device=device)
    indices, distances = fastlatent.nearest_code(x, codebook, metric="cosine")
    ref_indices, ref_distances = reference.nearest_code(x, codebook, metric="cosine")
    assert indices.tolist() == ref_indices.tolist() == [0, 2]
    torch.testing.assert_close(distances, ref_distances)


@PATH_DIMS
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_map_to_code_zero(device, bad, d):
    codebook = torch.randn(50, d, device=device)
    x = codebook[[10, 20, 30]].clone()
    x[1, 3] = bad
    indices, distances = fastlatent.nearest_code(x, codebook)
    assert indices.tolist() == [10, 0, 30]
    assert not torch.isfinite(distances[1]) and torch.all(distances[[0, 2]] == 0)
    assert reference.nearest_code(x, codebook)[0].tolist() == [10, 0, 30]


@PATH_DIMS
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_code_wins(device, bad, d):
    # Documented rule (as torch.argmin treats NaN): the first non-finite code takes every row.
    codebook = torch.randn(50, d, device=device)
    codebook[17, 2] = bad
    codebook[33, 0] = bad
    x = torch.randn(9, d, device=device)
    indices, distances = fastlatent.nearest_code(x, codebook)
    assert indices.tolist() == [17] * 9
    assert not torch.isfinite(distances).any()
    assert reference.nearest_code(x, codebook)[0].tolist() == [17] * 9


@pytest.mark.parametrize("d", [6, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_and_thread_count_independent(device, dtype, d):
    gen = torch.Generator().manual_seed(5)
    # Many exact ties: on a small integer lattice distances are often exactly equal.
    codebook = torch.randint(-2, 3, (517, d), generator=gen).to(device, dtype)
    x = torch.randint(-2, 3, (4000, d), generator=gen).to(device, dtype)
    first = fastlatent.nearest_code(x, codebook)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fastlatent.nearest_code(x, codebook)
    finally:
        torch.set_num_threads(threads)
    for _ in range(3):
        again = fastlatent.nearest_code(x, codebook)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert torch.equal(single[0], first[0])
    # On an integer lattice all arithmetic is exact, so ties resolve exactly as the reference.
    assert torch.equal(first[0], reference.nearest_code(x, codebook)[0])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_larger_problem_matches_reference(device, metric):
    gen = torch.Generator().manual_seed(11)
    n, d, k = 2048, 256, 4096
    codebook = torch.randn(k, d, generator=gen).to(device)
    x = torch.randn(n, d, generator=gen).to(device)
    indices, _ = fastlatent.nearest_code(x, codebook, metric=metric)
    assert_near_ties(x, codebook, indices, reference.nearest_code(x, codebook, metric=metric)[0], metric)


def test_distances_carry_no_gradient(device):
    x = torch.randn(10, 4, device=device, requires_grad=True)
    codebook = torch.randn(6, 4, device=device, requires_grad=True)
    indices, distances = fastlatent.nearest_code(x, codebook)
    assert not distances.requires_grad and not indices.requires_grad
    # The documented way to train: gather the codes by index, take the loss on them.
    loss = ((x - codebook[indices]) ** 2).sum()
    loss.backward()
    assert x.grad is not None and codebook.grad is not None


@pytest.mark.cuda
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    codebook = torch.randn(3000, 40, generator=gen)
    x = torch.randn(5000, 40, generator=gen)
    for metric in ("l2", "cosine"):
        cpu = fastlatent.nearest_code(x, codebook, metric=metric)
        gpu = fastlatent.nearest_code(x.cuda(), codebook.cuda(), metric=metric)
        assert_near_ties(x, codebook, gpu[0].cpu(), cpu[0], metric)
        torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_non_default_device_and_stream():
    if torch.cuda.device_count() < 2:
        device = torch.device("cuda:0")
    else:
        device = torch.device("cuda:1")
    codebook = torch.randn(100, 16, device=device)
    x = codebook[torch.arange(99, -1, -1, device=device)]
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        indices, _ = fastlatent.nearest_code(x, codebook)
    stream.synchronize()
    assert indices.device == device
    assert indices.tolist() == list(range(99, -1, -1))


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_over_two_to_the_31_elements():
    # x has 2^31 + 64 * 2^16 elements: offsets must be 64-bit.
    free, _ = torch.cuda.mem_get_info()
    d = 64
    n = (2**31) // d + 2**16
    if free < n * d * 2 + 2**30:
        pytest.skip("not enough GPU memory for a >2^31-element input")
    codebook = torch.randn(16, d, device="cuda", dtype=torch.float16)
    x = codebook[torch.arange(n, device="cuda") % 16]
    indices, _ = fastlatent.nearest_code(x, codebook)
    tail = torch.arange(n - 1000, n, device="cuda") % 16
    assert torch.equal(indices[-1000:], tail)
    del x


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiles_inside_a_larger_graph(device, dynamic):
    # A VQ-style forward: project, quantise, gather. fullgraph=True fails on any graph break.
    torch._dynamo.reset()
    codebook = torch.randn(64, 8, device=device)
    proj = torch.randn(8, 8, device=device)

    def quantise(z):
        indices, distances = fastlatent.nearest_code(z @ proj, codebook)
        return codebook[indices], indices, distances.mean()

    compiled = torch.compile(quantise, fullgraph=True, dynamic=dynamic)
    for n in (37, 64):
        z = torch.randn(n, 8, device=device)
        got, want = compiled(z), quantise(z)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[2], want[2])


# (d, dtype, precision) -> the CUDA path it takes: small-D for d <= 32; tensor cores for
# fp16/bf16 with d % 8 == 0 and for fp32 with precision="tf32" and d % 4 == 0; SIMT otherwise.
CUDA_PATHS = [
    pytest.param(8, torch.float32, "ieee", id="small_d8_fp32"),
    pytest.param(17, torch.bfloat16, "ieee", id="small_d17_bf16"),
    pytest.param(32, torch.float16, "ieee", id="small_d32_fp16"),
    pytest.param(64, torch.bfloat16, "ieee", id="tensor_core_d64_bf16"),
    pytest.param(256, torch.float16, "ieee", id="tensor_core_d256_fp16"),
    pytest.param(40, torch.bfloat16, "ieee", id="tensor_core_d40_bf16"),
    pytest.param(64, torch.float32, "tf32", id="tensor_core_d64_tf32"),
    pytest.param(60, torch.bfloat16, "ieee", id="simt_d60_bf16"),
    pytest.param(64, torch.float32, "ieee", id="simt_d64_fp32"),
    pytest.param(66, torch.float32, "tf32", id="simt_d66_tf32_fallback"),
]


def _assert_within_tf32_error(x, codebook, indices, ref_indices, metric):
    """TF32 rounds the inputs of each product: the chosen code's distance is within a relative 2e-3 of
    the distance scale of the exact choice's."""
    x64, c64 = x.double(), codebook.double()
    if metric == "l2":

        def dist(i):
            return ((x64 - c64[i]) ** 2).sum(1)

        scale = (x64**2).sum(1) + (c64**2).sum(1).max()
    else:

        def dist(i):
            return 1 - torch.nn.functional.cosine_similarity(x64, c64[i], dim=1)

        scale = torch.ones(len(x), dtype=torch.float64, device=x.device)
    assert (dist(indices) - dist(ref_indices) <= 2e-3 * scale).all()


@pytest.mark.cuda
@pytest.mark.parametrize("d, dtype, precision", CUDA_PATHS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cuda_paths_match_reference(d, dtype, precision, metric):
    gen = torch.Generator().manual_seed(d)
    n, k = 3001, 1003  # not multiples of any tile
    codebook = torch.randn(k, d, generator=gen).to("cuda", dtype)
    x = torch.randn(n, d, generator=gen).to("cuda", dtype)
    indices, distances = fastlatent.nearest_code(x, codebook, metric=metric, precision=precision)
    ref_indices, _ = reference.nearest_code(x, codebook, metric=metric)
    if precision == "tf32":
        _assert_within_tf32_error(x, codebook, indices, ref_indices, metric)
    else:
        assert_near_ties(x, codebook, indices, ref_indices, metric)
    exact = (
        reference.nearest_code(x, codebook, metric=metric)[1] if torch.equal(indices, ref_indices) else None
    )
    if exact is not None:
        torch.testing.assert_close(distances, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("d, dtype", [(8, torch.float32), (64, torch.bfloat16), (64, torch.float32)])
def test_cuda_paths_follow_the_nan_and_tie_rules(d, dtype):
    codebook = torch.randn(300, d, device="cuda").to(dtype)
    codebook[[7, 150]] = codebook[3]  # exact duplicates of code 3
    x = codebook[[3, 3, 10]].clone()
    x[2, 0] = float("nan")
    indices, _ = fastlatent.nearest_code(x, codebook)
    assert indices.tolist() == [3, 3, 0]
    codebook[200, 1] = float("inf")
    assert fastlatent.nearest_code(x[:2], codebook)[0].tolist() == [200, 200]


@pytest.mark.cuda
@pytest.mark.parametrize(
    "dtype, precision", [(torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "tf32")], ids=str
)
@pytest.mark.parametrize("offset", [0, 3, 8])
def test_cuda_views_off_the_16_byte_boundary(dtype, precision, offset):
    # buf[3:3 + N * D].view(N, D): contiguous, but its data pointer is 6 (or 12) bytes past a 16-byte
    # boundary. The tensor-core tile loader reads 16 bytes at a time, so such inputs take the SIMT path
    # instead of faulting (a misaligned access kills the CUDA context); offset 8 (16 bytes) stays aligned.
    gen = torch.Generator().manual_seed(offset)
    n, k, d = 300, 130, 64
    x_buf = torch.randn(offset + n * d, generator=gen).to("cuda", dtype)
    c_buf = torch.randn(offset + k * d, generator=gen).to("cuda", dtype)
    x = x_buf[offset : offset + n * d].view(n, d)
    codebook = c_buf[offset : offset + k * d].view(k, d)
    assert x.is_contiguous() and (x.data_ptr() % 16 == 0) == (offset * x.element_size() % 16 == 0)
    for metric in ("l2", "cosine"):
        indices, distances = fastlatent.nearest_code(x, codebook, metric=metric, precision=precision)
        torch.cuda.synchronize()
        aligned = fastlatent.nearest_code(x.clone(), codebook.clone(), metric=metric, precision=precision)
        ref_indices, ref_distances = reference.nearest_code(x, codebook, metric=metric)
        if precision == "tf32":  # an aligned view may take TF32 tensor cores, a misaligned one exact fp32
            _assert_within_tf32_error(x, codebook, indices, ref_indices, metric)
            _assert_within_tf32_error(x, codebook, aligned[0], ref_indices, metric)
        else:
            assert_near_ties(x, codebook, indices, ref_indices, metric)
            assert_near_ties(x, codebook, aligned[0], ref_indices, metric)
        same = indices == ref_indices
        torch.testing.assert_close(distances[same], ref_distances[same], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_search_equals_one_search_per_head(metric, dtype):
    # The multi-head VQ layout: rows [M, H, D] viewed head-major (non-contiguous), a codebook per head.
    gen = torch.Generator().manual_seed(11)
    heads, m, d, k = 5, 301, 24, 97
    x = torch.randn(m, heads, d, generator=gen).to(dtype).transpose(0, 1)
    codebooks = torch.randn(heads, k, d, generator=gen).to(dtype)
    indices, distances = fastlatent.nearest_code(x, codebooks, metric=metric)
    assert indices.shape == distances.shape == (heads, m)
    for h in range(heads):
        one_indices, one_distances = fastlatent.nearest_code(x[h], codebooks[h], metric=metric)
        assert torch.equal(indices[h], one_indices)
        torch.testing.assert_close(distances[h], one_distances, rtol=0, atol=0)
