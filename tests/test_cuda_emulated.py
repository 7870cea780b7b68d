"""Every CUDA kernel, executed on the CPU by the emulator (docs/cuda-emulation.md), against the CPU kernels.

`emulated()` points torch.ops.fastlatent at torch.ops.fastlatent_emu: the Python wrappers (and the
backward formulas, which look their ops up at call time) then run the CUDA bindings and kernels of
fastlatent._emu on CPU tensors. An emulated call raises on any emulator finding (out-of-bounds,
misaligned, uninitialised shared read, shared-memory race, cp.async read before its wait, ...), so a
passing comparison is also a clean memory check. The CPU kernels are verified against the references
by test_ops_generic.py; here the emulated CUDA kernels are compared with the CPU kernels with the same
tolerance rules, on the same OpSpec samples.
"""

import contextlib
import math
import types

import pytest
import torch
from opspecs import FLOAT_DTYPES, OP_SPECS, assert_step_close

import fastlatent
from fastlatent import _emu

SPECS = {spec.name: spec for spec in OP_SPECS}
HALF_TYPES = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def emulated():
    """Within: torch.ops.fastlatent.* are the emulated CUDA kernels."""
    real = torch.ops.fastlatent
    torch.ops.fastlatent = torch.ops.fastlatent_emu
    try:
        yield
    finally:
        torch.ops.fastlatent = real


@contextlib.contextmanager
def launches():
    """Collects {kernel name: launches} of the block ("fastlatent::small_d_kernel<float, 8>": 1)."""
    before = _emu.launched_kernels()
    delta = {}
    yield delta
    after = _emu.launched_kernels()
    delta.update({k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)})


def _variants(name, dtype):
    """(cpu kwargs, emulated kwargs) per sample: the switches that select the CUDA paths."""
    if name == "nearest_code":
        return [({}, {}), ({"precision": "tf32"}, {"precision": "tf32"})]
    if name == "code_stats":
        return [({}, {"deterministic": True}), ({}, {"deterministic": False})]
    if name == "group_norm_conv3x3":
        fused = [({"algorithm": "unfused"}, {"algorithm": "fused"})] if dtype in HALF_TYPES else []
        return [({"algorithm": "unfused"}, {"algorithm": "unfused"})] + fused
    return [({}, {})]


def _assert_tf32_nearest(sample, ours, cpu):
    """tf32 keys (10-bit mantissas) may pick a code whose exact distance exceeds the best by rounding."""
    x, codebook = sample.args
    indices, distances = ours
    _, cpu_distances = cpu
    assert indices.shape == cpu_distances.shape and indices.dtype == torch.int64
    if sample.kwargs.get("metric", "l2") == "l2":  # per search: x [..., N, D], codebook [..., K, D]
        code_norms = codebook.double().pow(2).sum(-1)
        if code_norms.shape[-1]:
            largest = code_norms.amax(-1, keepdim=True)
        else:
            largest = torch.zeros_like(code_norms[..., :1])
        scale = x.double().pow(2).sum(-1) + largest
    else:
        scale = torch.full_like(cpu_distances, 2.0, dtype=torch.float64)
    excess = distances.double() - cpu_distances.double()
    assert (excess <= 4e-3 * scale + 1e-6).all(), f"{sample.name}: excess {excess.max().item():.3g}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_forward_matches_cpu_kernel(name, dtype):
    spec = SPECS[name]
    if dtype not in spec.dtypes:
        pytest.skip(f"{name} does not support {dtype}")
    for sample in spec.sample_inputs(torch.device("cpu"), dtype):
        for cpu_kwargs, emu_kwargs in _variants(name, dtype):
            cpu = spec.op(*sample.args, **{**sample.kwargs, **cpu_kwargs})
            with emulated():
                ours = spec.op(*sample.args, **{**sample.kwargs, **emu_kwargs})
            if emu_kwargs.get("precision") == "tf32" and dtype == torch.float32:
                _assert_tf32_nearest(sample, ours, cpu)
            else:
                spec.compare(sample, ours, cpu)


# The ops whose backward runs kernels, and the argument positions that get gradients.
BACKWARD = {
    "fsq_quantize": (0,),
    "lfq_entropy": (0,),
    "bsq_quantize": (0,),
    "bsq_entropy": (0,),
    "group_norm": (0, 1, 2, 6),
    "group_norm_apply": (0, 1, 2, 3, 4),
    "group_norm_stats": (0,),
    "lfq_quantize": (0,),
}


def _grad_inputs(args, positions):
    out = list(args)
    for i in positions:
        if i < len(out) and isinstance(out[i], torch.Tensor) and out[i].is_floating_point():
            out[i] = out[i].detach().clone().requires_grad_()
    return out


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(BACKWARD))
def test_backward_matches_cpu_kernel(name, dtype):
    """The forward runs on the CPU kernels; the backward kernels run emulated and on the CPU."""
    spec = SPECS[name]
    if dtype not in spec.dtypes:
        pytest.skip(f"{name} does not support {dtype}")
    gen = torch.Generator().manual_seed(5)
    for sample in spec.sample_inputs(torch.device("cpu"), dtype):
        args = _grad_inputs(sample.args, BACKWARD[name])
        inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        outs = spec.op(*args, **sample.kwargs)
        outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o.requires_grad]
        if not inputs or not outs:
            continue
        grads = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
        cpu = torch.autograd.grad(outs, inputs, grads, retain_graph=True, allow_unused=True)
        with emulated():
            ours = torch.autograd.grad(outs, inputs, grads, allow_unused=True)
        for a, b in zip(ours, cpu):
            if b is None:
                assert a is None
                continue
            # fp16 gradients can overflow (the CPU kernel's too): the same non-finite values, the rest close
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), finite), f"{sample.name}: non-finite gradients differ"
            assert torch.equal(a[~finite].nan_to_num(), b[~finite].nan_to_num()), sample.name
            assert_step_close(a[finite], b[finite], b.dtype if b.dtype in FLOAT_DTYPES else torch.float32)


# ---------------------------------------------------------------- every path was taken


def _nearest(n, d, k, dtype, precision="ieee"):
    gen = torch.Generator().manual_seed(n * 7 + d)
    x = torch.randn(n, d, generator=gen).to(dtype)
    codebook = torch.randn(k, d, generator=gen).to(dtype)
    with emulated():
        return fastlatent.ops.nearest_code(x, codebook, precision=precision)


@pytest.mark.parametrize(
    "dtype,d,precision,kernel",
    [
        (torch.float32, 16, "ieee", "small_d_kernel<float, 16>"),
        (torch.float16, 5, "ieee", "small_d_kernel<__half, 8>"),
        (torch.bfloat16, 32, "ieee", "small_d_kernel<__nv_bfloat16, 32>"),
        (torch.float32, 40, "ieee", "simt_kernel<float>"),
        (torch.float16, 36, "ieee", "simt_kernel<__half>"),
        (torch.float32, 40, "tf32", "tensor_core_kernel<float>"),
        (torch.float16, 48, "ieee", "tensor_core_kernel<__half>"),
        (torch.bfloat16, 64, "ieee", "tensor_core_kernel<__nv_bfloat16>"),
    ],
)
def test_nearest_code_paths(dtype, d, precision, kernel):
    with launches() as ran:
        _nearest(70, d, 150, dtype, precision)
    assert any(kernel in name for name in ran), sorted(ran)
    for helper in ("finish_rows_kernel", "code_keys_kernel"):
        assert any(helper in name for name in ran), sorted(ran)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("d", [20, 32])
def test_small_d_tiles_and_batched_searches(dtype, d):
    """The d <= 32 kernel over several code tiles (the last partial), a partial row block and two batched
    searches (each reading its own codebook tile by tile), against the CPU kernel."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(2, 260, d, generator=gen).to(dtype)
    codebook = torch.randn(2, 520, d, generator=gen).to(dtype)
    cpu = fastlatent.ops.nearest_code(x, codebook)
    with launches() as ran, emulated():
        ours = fastlatent.ops.nearest_code(x, codebook)
    assert any("small_d_kernel<" in name and name.endswith(", 32>") for name in ran), sorted(ran)
    sample = types.SimpleNamespace(name=f"d {d}", args=(x, codebook), kwargs={})
    SPECS["nearest_code"].compare(sample, ours, cpu)


@pytest.mark.parametrize(
    "dtype,precision,d",
    [(torch.float16, "ieee", 72), (torch.bfloat16, "ieee", 64), (torch.float32, "tf32", 40)],
    ids=["fp16", "bf16", "tf32"],
)
def test_tensor_core_epilogue_ties_nan_tiles_and_batches(dtype, precision, d):
    """Three code tiles (the last partial), dims over several pipelined stages, codes repeated three times
    (the lowest index must win), a NaN code in the second search (it wins every row), batched searches:
    indices equal the CPU kernel's exactly."""
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(100, d, generator=gen)
    codebook = torch.stack([base.repeat(3, 1), base.flip(0).repeat(3, 1)])  # [2, 300, d]
    codebook[1, 250, 3] = float("nan")
    picks = torch.randint(0, 100, (2, 150), generator=gen)
    x = base[picks] + 0.01 * torch.randn(2, 150, d, generator=gen)
    x, codebook = x.to(dtype), codebook.to(dtype)
    cpu_indices, cpu_distances = fastlatent.ops.nearest_code(x, codebook, precision=precision)
    with launches() as ran, emulated():
        indices, distances = fastlatent.ops.nearest_code(x, codebook, precision=precision)
    assert any("tensor_core_kernel" in name for name in ran), sorted(ran)
    assert torch.equal(indices, cpu_indices)
    assert indices[0].max() < 100 and torch.all(indices[1] == 250)
    torch.testing.assert_close(distances, cpu_distances, equal_nan=True)


@pytest.mark.parametrize("d,kernel", [(18, "lfq_probs_partial_kernel<float, 2>"), (9, "<float, 1>")])
def test_lfq_entropy_register_tiles(d, kernel):
    """d = 18 takes the two-columns-per-thread tile (no OpSpec sample reaches it); d = 9 one column;
    forward and backward against the CPU kernels."""
    x = torch.randn(37, d, generator=torch.Generator().manual_seed(d)).requires_grad_()
    cpu = fastlatent.ops.lfq_entropy(x, 1.0, 1.0)  # a soft assignment: every code carries weight
    with launches() as ran, emulated():
        ours = fastlatent.ops.lfq_entropy(x, 1.0, 1.0)
    assert any(kernel in name for name in ran), sorted(ran)
    for a, b in zip(ours, cpu):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the backward: blocks of 8 samples (37 = 4 x 8 + 5), G read once per block
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1)) for o in cpu]
    (expected,) = torch.autograd.grad(cpu, x, weights, retain_graph=True)
    with launches() as ran, emulated():
        (got,) = torch.autograd.grad(cpu, x, weights)
    assert any("lfq_entropy_backward_kernel" in name for name in ran), sorted(ran)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_code_stats_paths():
    x, indices = torch.randn(300, 9), torch.randint(-1, 40, (300,))
    with launches() as ran, emulated():
        fastlatent.ops.code_stats(x, indices, 40, deterministic=True)
        fastlatent.ops.code_stats(x, indices, 40, deterministic=False)
    for kernel in ("make_keys_kernel", "segment_starts_kernel", "segment_sums_kernel", "atomic_stats_kernel"):
        assert any(kernel in name for name in ran), (kernel, sorted(ran))


def test_code_stats_splits_a_collapsed_code_across_blocks():
    """Skewed indices: one code holds 2,400 of 2,600 rows (19 pieces of 128, two combine levels).

    The split sums (pieces on many blocks, a pairwise tree across them) equal the CPU kernel's bit for
    bit, which uses the same order, and every run gives the same bits.
    """
    gen = torch.Generator().manual_seed(3)
    n = 2600
    x = torch.randn(n, 9, generator=gen) * 100
    indices = torch.full((n,), 2, dtype=torch.int64)
    others = torch.randperm(n, generator=gen)[:200]
    indices[others] = torch.randint(-1, 5, (200,), generator=gen)
    cpu = fastlatent.ops.code_stats(x, indices, 5)
    with launches() as ran, emulated():
        first = fastlatent.ops.code_stats(x, indices, 5)
        second = fastlatent.ops.code_stats(x, indices, 5)
    combines = sum(count for name, count in ran.items() if "segment_combine_kernel" in name)
    assert combines == 4, sorted(ran)  # two tree launches per call
    for ours in (first, second):
        assert torch.equal(ours[0], cpu[0]) and torch.equal(ours[1], cpu[1])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,layout,misaligned",
    [
        ((2, 8, 48, 96), torch.contiguous_format, False),  # s = 4608: 16-byte vectors, 2 splits (one partial)
        ((2, 8, 48, 96), torch.contiguous_format, True),  # x 16-byte misaligned: element reads
        ((2, 12, 5, 7), torch.contiguous_format, False),  # s = 35: element reads
        ((2, 64, 24, 30), torch.channels_last, False),  # c = 64: 16-byte vectors, 720 positions: 2 splits
        ((1, 40, 9, 7), torch.channels_last, False),  # c = 40: a partial channel tile, 16-byte vectors
        ((2, 64, 24, 30), torch.channels_last, True),  # misaligned: element reads
        ((2, 12, 5, 7), torch.channels_last, False),  # c = 12: element reads (fp32: 16-byte vectors)
    ],
    ids=["cf_vec", "cf_misaligned", "cf_odd", "cl_vec", "cl_partial_tile", "cl_misaligned", "cl_odd"],
)
@pytest.mark.parametrize("offset", [0.0, 1000.0], ids=["centred", "mean_1000"])
def test_group_norm_stats_reads_and_large_mean(shape, layout, misaligned, offset, dtype):
    """The forward statistics pass (16-byte vector reads where the layout and alignment allow, element reads
    otherwise) against float64 statistics of the same values, including x = 1000 + N(0, 1), where summed
    squares in fp32 would lose M2 to cancellation (6400 * 1000^2 * 2^-24 is about 400, against M2 ~ 6400)."""
    gen = torch.Generator().manual_seed(shape[1] + int(misaligned))
    values = (torch.randn(shape, generator=gen) + offset).to(dtype)
    x = (
        torch.empty(values.numel() + 1, dtype=dtype)[1:]
        if misaligned
        else torch.empty(values.numel(), dtype=dtype)
    )
    if layout == torch.channels_last:
        x = x.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
    else:
        x = x.view(shape)
    x.copy_(values)
    assert x.is_contiguous(memory_format=layout)
    with launches() as ran, emulated():
        mean, m2 = fastlatent.ops.group_norm_stats(x, 4)
    kernel = "reduce_cf_kernel" if layout == torch.contiguous_format else "reduce_cl_kernel"
    assert any(kernel in name for name in ran), sorted(ran)
    grouped = values.double().reshape(shape[0], 4, -1)
    ref_mean = grouped.mean(-1)
    ref_m2 = ((grouped - ref_mean[..., None]) ** 2).sum(-1)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=0, atol=1e-5 + 1e-6 * offset)
    torch.testing.assert_close(m2.double(), ref_m2, rtol=2e-5, atol=1e-3)


def test_group_norm_paths_both_layouts_and_fused_conv():
    x = torch.randn(2, 16, 9, 7).half()
    w, b = torch.randn(16), torch.randn(16)
    conv_w = torch.randn(8, 16, 3, 3).half() / 12
    with launches() as ran, emulated():
        for layout in (torch.contiguous_format, torch.channels_last):
            xl = x.to(memory_format=layout).requires_grad_()
            fastlatent.ops.group_norm(xl, w, b, 4, 1e-5, "silu")
        fastlatent.ops.group_norm_conv3x3(
            x, w, b, 4, eps=1e-5, activation="silu", conv_weight=conv_w, algorithm="fused"
        )
    names = " ".join(ran)
    for kernel in ("reduce_cf_kernel", "reduce_cl_kernel", "pack_weight_kernel", "group_norm_conv3x3_kernel"):
        assert kernel in names, (kernel, sorted(ran))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_group_norm_conv_narrow_and_wide_blocks(layout):
    """cout <= 32 runs the 32-wide block, more the 128-wide one; both match the unfused CPU path (nhwc: the
    16-byte channel loads of the halo)."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 16, 9, 20, generator=gen) * 2 + 1).half().to(memory_format=layout)
    w, b = torch.rand(16, generator=gen) + 0.5, torch.randn(16, generator=gen)
    for cout, width in ((3, ", 32>"), (32, ", 32>"), (33, ", 128>")):
        conv_w = (torch.randn(cout, 16, 3, 3, generator=gen) / 12).half()
        conv_b = torch.randn(cout, generator=gen).half()
        cpu = fastlatent.ops.group_norm_conv3x3(
            x, w, b, 4, conv_w, conv_b, eps=1e-5, activation="silu", algorithm="unfused"
        )
        with launches() as ran, emulated():
            ours = fastlatent.ops.group_norm_conv3x3(
                x, w, b, 4, conv_w, conv_b, eps=1e-5, activation="silu", algorithm="fused"
            )
        assert any("group_norm_conv3x3_kernel" in name and name.endswith(width) for name in ran), sorted(ran)
        assert sum(count for name, count in ran.items() if "pack_weight_kernel" in name) == 1, sorted(ran)
        SPECS["group_norm_conv3x3"].compare(types.SimpleNamespace(name=f"cout {cout}"), ours, cpu)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((1, 8, 64, 64), torch.contiguous_format),  # rows of 512-1024 vectors: several per row segment
        ((3, 16, 5, 8), torch.contiguous_format),  # short rows: a reload per vector
        ((2, 32, 16, 12), torch.channels_last),  # c / vec divides the block: channels fixed per thread
        ((2, 24, 7, 9), torch.channels_last),  # c = 24: channels change between a thread's vectors
    ],
    ids=["cf_long_rows", "cf_short_rows", "cl_fixed_channels", "cl_moving_channels"],
)
@pytest.mark.parametrize("vectors_per_thread", ["1", "4"])
def test_group_norm_vectorised_apply(shape, layout, dtype, vectors_per_thread, monkeypatch):
    """apply_kernel (16-byte vectors, coefficients held across a thread's vectors) against the CPU kernel,
    with and without a residual; FASTLATENT_GROUP_NORM_VECTORS_PER_THREAD forces the multi-vector path that
    the launcher otherwise takes only for tensors of more than 2^18 vectors."""
    monkeypatch.setenv("FASTLATENT_GROUP_NORM_VECTORS_PER_THREAD", vectors_per_thread)
    gen = torch.Generator().manual_seed(len(shape) + shape[1])
    x = (torch.randn(shape, generator=gen) * 3 + 2).to(dtype).to(memory_format=layout)
    residual = torch.randn(shape, generator=gen).to(dtype).to(memory_format=layout)
    w, b = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
    for activation, res in (("none", None), ("silu", residual), ("gelu", None)):
        cpu = fastlatent.ops.group_norm(x, w, b, 4, 1e-5, activation, res)
        with launches() as ran, emulated():
            ours = fastlatent.ops.group_norm(x, w, b, 4, 1e-5, activation, res)
        assert any("apply_kernel" in name for name in ran), sorted(ran)
        assert_step_close(ours, cpu, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,layout,vectorised",
    [
        ((1, 8, 64, 64), torch.contiguous_format, True),  # long rows: coefficients held along a row
        ((3, 16, 5, 8), torch.contiguous_format, True),  # short rows: a reload per vector
        ((2, 32, 16, 12), torch.channels_last, True),  # c / vec divides the block: channels fixed
        ((2, 24, 7, 9), torch.channels_last, True),  # c = 24: channels change between a thread's vectors
        ((2, 12, 5, 7), torch.contiguous_format, False),  # s = 35: one element per step
        ((2, 12, 5, 7), torch.channels_last, False),  # c = 12 (not a multiple of 8, fp32: 4 is)
    ],
    ids=["cf_long_rows", "cf_short_rows", "cl_fixed_channels", "cl_moving_channels", "cf_odd", "cl_odd"],
)
@pytest.mark.parametrize("vectors_per_thread", ["1", "4"])
def test_group_norm_backward_apply(shape, layout, vectorised, dtype, vectors_per_thread, monkeypatch):
    """backward_apply_kernel (grad_x from per-(n, c) coefficients, 16-byte vectors or single elements)
    against the CPU kernel for each activation, with the multi-vector walk forced as in the forward test."""
    monkeypatch.setenv("FASTLATENT_GROUP_NORM_VECTORS_PER_THREAD", vectors_per_thread)
    gen = torch.Generator().manual_seed(len(shape) + shape[1])
    x = (torch.randn(shape, generator=gen) * 3 + 2).to(dtype).to(memory_format=layout).requires_grad_()
    w = torch.randn(shape[1], generator=gen).requires_grad_()
    b = torch.randn(shape[1], generator=gen).requires_grad_()
    grad = torch.randn(shape, generator=gen).to(dtype).to(memory_format=layout)
    width = (
        16 // dtype.itemsize
        if vectorised or (layout == torch.channels_last and dtype == torch.float32)
        else 1
    )
    for activation in ("none", "silu", "gelu"):
        y = fastlatent.ops.group_norm(x, w, b, 4, 1e-5, activation)
        cpu = torch.autograd.grad(y, (x, w, b), grad, retain_graph=True)
        with launches() as ran, emulated():
            ours = torch.autograd.grad(y, (x, w, b), grad)
        assert any("backward_apply_kernel" in name and name.endswith(f", {width}>") for name in ran), sorted(
            ran
        )
        for a, ref in zip(ours, cpu):
            assert_step_close(a, ref, ref.dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "k,d", [(5000, 1), (700, 5), (9, 1000)], ids=["d1_full_block", "rows_cross_blocks", "wide"]
)
def test_ema_update_embed_blocks(k, d, dtype):
    """embed_kernel's per-block table of 1 / smoothed size (up to 2,048 codes per block at d = 1, codes split
    across blocks, a code spanning blocks) against the CPU kernel."""
    gen = torch.Generator().manual_seed(k + d)
    cluster_size = torch.rand(k, generator=gen) * 5
    embed_sum, sums = torch.randn(k, d, generator=gen), torch.randn(k, d, generator=gen)
    counts = torch.randint(0, 10, (k,), generator=gen).float()
    results = []
    for run_emulated in (False, True):
        args = (
            cluster_size.clone(),
            embed_sum.clone(),
            torch.empty(k, d, dtype=dtype),
            counts,
            sums,
            0.9,
            1e-5,
        )
        with launches() as ran, emulated() if run_emulated else contextlib.nullcontext():
            fastlatent.ops.ema_update_(*args)
        results.append(args[:3])
    assert any("embed_kernel" in name for name in ran), sorted(ran)
    SPECS["ema_update_"].compare(types.SimpleNamespace(name=f"K{k}_D{d}"), results[1], results[0])


def test_sampler_rescale_and_threshold_kernels():
    model_output, sample = torch.randn(4, 3, 8, 8), torch.randn(2, 3, 8, 8)
    with launches() as ran, emulated():
        fastlatent.ops.euler_step(model_output, sample, 0.9, 0.5, guidance_scale=3.0, guidance_rescale=0.7)
        fastlatent.ops.ddpm_step(sample, sample, 0.3, 0.5, threshold_quantile=0.9, threshold_max=1.5, seed=1)
    names = " ".join(ran)
    for kernel in ("stats_kernel", "rescale_kernel", "abs_x0_kernel", "select_kernel", "step_kernel"):
        assert kernel in names, (kernel, sorted(ran))


def test_sampler_step_infinite_inputs_match_the_cpu_kernel():
    """Steps without an x0' term skip it on both devices: an infinite sample or model output gives the
    step's own arithmetic (diffusers' values), not NaN from 0 * inf, and CUDA equals the CPU kernel."""
    x = torch.tensor([[float("inf"), 1.0, -float("inf"), 3.0, 0.5, -2.0, 1.5, 7.0]])
    m = torch.tensor([[1.0, float("inf"), 0.5, float("nan"), -float("inf"), 2.0, 0.0, -1.0]])
    calls = [
        lambda: fastlatent.ops.euler_step(m, x, 0.5, 0.4, prediction="flow", return_x0=False),
        lambda: fastlatent.ops.euler_step(m, x, 0.5, 0.4, prediction="flow"),
        lambda: fastlatent.ops.ddim_step(m, x, 0.3, 0.5),
    ]
    for call in calls:
        cpu = call()
        with launches() as ran, emulated():
            ours = call()
        assert any("step_kernel" in name for name in ran), sorted(ran)
        for a, b in zip(ours, cpu):  # the same non-finite elements; finite ones within fp32 rounding
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), (a, b)
            assert torch.equal(a[a.isinf()], b[b.isinf()]), (a, b)
            finite = a.isfinite()
            torch.testing.assert_close(a[finite], b[finite], rtol=1e-6, atol=1e-6)
    flow = calls[0]()[0]
    assert flow[0, :3].isinf().all() and flow[0, 4].isinf(), flow


@pytest.mark.parametrize("d", [1, 4, 31], ids=lambda d: f"d{d}")
def test_residual_fsq_tiles_and_nan_rows(d):
    """Row tiles of 256 // d rows (d = 31 leaves 8 threads idle), a partial last tile, layers alternating the
    shared level buffers, a NaN row: every value and index equal to the CPU kernel's."""
    gen = torch.Generator().manual_seed(9)
    levels = [2 + i % 7 for i in range(d)] if d < 31 else [2] * 31
    z = torch.randn(1000, d, generator=gen) * 0.8
    z[517, d // 2] = float("nan")
    scales = torch.stack([torch.tensor(levels).float() ** -i for i in range(5)])
    cpu = fastlatent.ops.residual_fsq(z, scales, levels)
    with launches() as ran, emulated():
        ours = fastlatent.ops.residual_fsq(z, scales, levels)
    assert any("residual_fsq_kernel" in name for name in ran), sorted(ran)
    assert torch.equal(ours[1], cpu[1]) and ours[1][517].eq(-1).all()
    torch.testing.assert_close(ours[0], cpu[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("quantile", [31.5 / 55, 0.3, 0.995, 1.0])
def test_threshold_select_ranks_that_part_early_and_late(quantile):
    """|x0| with a gap between ranks 31 and 32 (q = 31.5 / 55 interpolates across it: the ranks differ from
    the first radix pass), ties, and ranks at the top: the shared-pass select equals the CPU kernel."""
    gen = torch.Generator().manual_seed(3)
    small = torch.rand(2, 24, generator=gen) * 2.0
    large = 50.0 + torch.rand(2, 24, generator=gen) * 10.0
    values = torch.cat([small, large, small[:, :8]], dim=1)  # 56 per sample, 8 duplicated
    signs = torch.where(torch.rand(values.shape, generator=gen) < 0.5, -1.0, 1.0)
    sample = (values * signs).reshape(2, 7, 2, 4)
    model_output = torch.randn(sample.shape, generator=gen) * 0.1
    kwargs = dict(prediction="epsilon", threshold_quantile=quantile, threshold_max=1000.0)
    expected = fastlatent.ops.ddpm_step(
        model_output, sample, 0.3, 0.5, noise=torch.zeros_like(sample), **kwargs
    )
    with launches() as ran, emulated():
        got = fastlatent.ops.ddpm_step(
            model_output, sample, 0.3, 0.5, noise=torch.zeros_like(sample), **kwargs
        )
    assert any("select_kernel" in name for name in ran), sorted(ran)
    torch.testing.assert_close(got, expected)


def test_emulator_sees_the_shared_variables():
    """The shared-memory checks need the module's symbol table (a stripped build would turn them off)."""
    assert _emu.shared_variable_count() > 20


def test_thread_order_does_not_change_results():
    """Deterministic kernels give the same bits whatever the order of blocks and threads."""
    x, codebook = torch.randn(300, 48).half(), torch.randn(200, 48).half()
    seed = _emu.seed()
    results = []
    try:
        for s in (1, 2, 3):
            _emu.set_seed(s)
            with emulated():
                results.append(fastlatent.ops.nearest_code(x, codebook))
    finally:
        _emu.set_seed(seed)
    for indices, distances in results[1:]:
        assert torch.equal(indices, results[0][0]) and torch.equal(distances, results[0][1])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_sample_code_kernel_draws_the_cpu_kernels_noise(dtype):
    """sample_code's SIMT kernel: the same Philox noise as the CPU kernel (equal logits: argmax of the
    noise alone, so the draws are identical), every block order giving the same codes, batched heads."""
    x, codebook = torch.zeros(2, 37, 5, dtype=dtype), torch.zeros(2, 70, 5, dtype=dtype)
    cpu = fastlatent.ops.sample_code(x, codebook, 1.0, seed=31, offset=4)
    seed = _emu.seed()
    try:
        for s in (1, 2):
            _emu.set_seed(s)
            with launches() as ran, emulated():
                ours = fastlatent.ops.sample_code(x, codebook, 1.0, seed=31, offset=4)
            assert any("sample_code_kernel" in name for name in ran), sorted(ran)
            assert torch.equal(ours, cpu)
    finally:
        _emu.set_seed(seed)


def test_matrix_load_cost_model():
    """The bank model behind _emu.matrix_load_counters: an ldmatrix phase reads 8 lines of 16 bytes; lines
    in one 16-byte bank group (bits 4-6) at different addresses are serialised."""
    cost = _emu.matrix_load_cost
    # a 16 x 16 fragment of 16-bit elements: 4 phases. 96-byte lines (6 x 16 B): lines r and r + 4 share a
    # group (2-way); 80-byte (5 x 16 B, odd) lines: 8 groups; 128-byte lines: one group (8-way)
    assert cost(0, 48, 16, 16) == {"phases": 4, "wavefronts": 8}
    assert cost(0, 40, 16, 16) == {"phases": 4, "wavefronts": 4}
    assert cost(16, 40, 16, 16) == {"phases": 4, "wavefronts": 4}
    assert cost(0, 64, 16, 16) == {"phases": 4, "wavefronts": 32}
    assert cost(0, 136, 16, 16) == {"phases": 4, "wavefronts": 4}  # the wide weight tile's pitch
    assert cost(0, 0, 16, 16) == {"phases": 4, "wavefronts": 4}  # one address: a broadcast
    with pytest.raises(ValueError, match="multiples of 8"):
        cost(0, 40, 12, 16)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_group_norm_conv_fragment_loads_are_conflict_free(dtype, layout):
    """Every A (halo) and B (weight) fragment load the fused conv's warps issue is an ldmatrix without a
    bank conflict: one wavefront per phase. With the former 96-byte halo pitch each A phase took two. Also
    several 32-channel chunks with groups straddling them (per-chunk coefficients) against the CPU path."""
    gen = torch.Generator().manual_seed(7)
    cin, h, w_ = 72, 9, 20  # 3 chunks (72 -> 96), 12 channels per group; 2 x 2 pixel tiles
    x = (torch.randn(1, cin, h, w_, generator=gen) * 2 + 1).to(dtype).to(memory_format=layout)
    gw, gb = torch.rand(cin, generator=gen) + 0.5, torch.randn(cin, generator=gen)
    for cout, warp_rows, width in ((3, 1, ", 32>"), (40, 4, ", 128>")):
        conv_w = (torch.randn(cout, cin, 3, 3, generator=gen) / math.sqrt(9 * cin)).to(dtype)
        cpu = fastlatent.ops.group_norm_conv3x3(x, gw, gb, 6, conv_w, eps=1e-5, activation="silu")
        before = _emu.matrix_load_counters()
        with launches() as ran, emulated():
            ours = fastlatent.ops.group_norm_conv3x3(
                x, gw, gb, 6, conv_w, eps=1e-5, activation="silu", algorithm="fused"
            )
        after = _emu.matrix_load_counters()
        assert any("group_norm_conv3x3_kernel" in name and name.endswith(width) for name in ran), sorted(ran)
        SPECS["group_norm_conv3x3"].compare(types.SimpleNamespace(name=f"cout {cout}"), ours, cpu)
        loads, phases, wavefronts = (after[k] - before[k] for k in ("loads", "phases", "wavefronts"))
        # 4 blocks x 8 warps x 3 chunks x 9 taps x 2 k-steps, each 2 B fragments + warp_rows A fragments
        assert loads == 4 * 8 * 3 * 9 * 2 * (2 + warp_rows)
        assert phases == 4 * loads and wavefronts == phases


def test_group_norm_conv_packs_strided_weights_on_every_call():
    """The weights are packed by a kernel on each call from any strides (channels-last weights of a model
    moved to channels_last, a sliced weight): an in-place change of the weights is seen by the next call."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 40, 6, 5, generator=gen).half()
    w, b = torch.rand(40, generator=gen) + 0.5, torch.randn(40, generator=gen)
    base = (torch.randn(70, 40, 3, 3, generator=gen) / 12).half()
    weights = {
        "contiguous": base.clone(),
        "channels_last": base.to(memory_format=torch.channels_last),
        "sliced": torch.cat([base, base], 1)[:, ::2],
    }
    for kind, conv_w in weights.items():
        for _ in range(2):
            cpu = fastlatent.ops.group_norm_conv3x3(x, w, b, 8, conv_w, eps=1e-5, algorithm="unfused")
            with launches() as ran, emulated():
                ours = fastlatent.ops.group_norm_conv3x3(x, w, b, 8, conv_w, eps=1e-5, algorithm="fused")
            assert any("pack_weight_kernel" in name for name in ran), sorted(ran)
            SPECS["group_norm_conv3x3"].compare(types.SimpleNamespace(name=kind), ours, cpu)
            conv_w.mul_(-0.5)  # in place: the next call must see it


@pytest.mark.parametrize("d", [1, 3, 7, 16, 31, 32, 33, 50, 62])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_sign_quantize_warp_rows_bitwise(d, dtype):
    """LFQ/BSQ quantize run a warp per group of rows (32 // d rows of one element per lane for d <= 32,
    one row of two elements per lane above), the row's bits from ballots: equal to the CPU kernel bit
    for bit at every width, with a row count that leaves a partial last group, zeros, NaN and +-inf."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(77, d, generator=gen).to(dtype)
    x[5, d // 2] = 0.0
    x[11, d - 1] = float("nan")
    x[23, 0] = float("inf")
    x[40, d // 3] = -float("inf")
    x[76, :] = 0.0
    for op, args in ((fastlatent.ops.lfq_quantize, (x, 0.5)), (fastlatent.ops.bsq_quantize, (x,))):
        cpu = op(*args)
        with launches() as ran, emulated():
            ours = op(*args)
        assert any("quantize_kernel" in name for name in ran), sorted(ran)
        assert torch.equal(ours[1], cpu[1]), (op.__name__, d)
        assert torch.equal(
            ours[0].view(torch.int16 if dtype != torch.float32 else torch.int32),
            cpu[0].view(torch.int16 if dtype != torch.float32 else torch.int32),
        ), (op.__name__, d)
