"""Tiled VAE decode/encode: equal to the untiled model, seam-free, memory bounded by the tile."""

import copy

import pytest
import torch

import fastlatent
from fastlatent import TiledRunInfo, tiled_decode, tiled_encode
from fastlatent.benchmarking.measure import net_alloc_peak_bytes

diffusers = pytest.importorskip("diffusers")


def _vae(levels=4, widths=(8, 16, 32, 32), seed=0):
    """diffusers' AutoencoderKL in the SD-VAE layout (mid-block attention, 2x up/downsampling per level) with
    reduced widths, random weights and non-trivial GroupNorm affines."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=widths[:levels],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    ).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return vae


@pytest.fixture(scope="module")
def vae():
    return _vae()


def _untiled_decode(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample


def _assert_equal_to_untiled(out, ref, rel=2e-5):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out - ref).abs().max().item()
    assert err <= rel * max(1.0, ref.abs().max().item()), f"max error {err}"


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("store", ["host", "device"])
def test_exact_decode_equals_untiled(vae, store):
    # batch 2, an odd aspect ratio and sizes the tile does not divide (9 = 6 + 3, 14 = 2*6 + 2)
    z = torch.randn(2, 4, 9, 14)
    info = TiledRunInfo()
    out = tiled_decode(vae, z, 6, store=store, info=info)
    _assert_equal_to_untiled(out, _untiled_decode(vae, z))
    assert info.tiles == 2 * 3 and info.stored_bytes > 0 and info.stats_from == "image"


def test_exact_decode_with_recompute_keeps_nothing():
    vae = _vae(levels=3, widths=(8, 16, 16))
    z = torch.randn(1, 4, 16, 27)
    info = TiledRunInfo()
    out = tiled_decode(vae, z, 14, store="recompute", info=info)
    _assert_equal_to_untiled(out, _untiled_decode(vae, z))
    assert info.stored_bytes == 0 and info.tiles == 2 * 2
    # every pass recomputes its prefix: more stage evaluations than a stored run's one per stage and tile
    assert info.stage_evaluations > info.stages * info.tiles


def test_exact_decode_of_the_patched_model(vae):
    patched = fastlatent.patch(copy.deepcopy(vae), report=False)
    z = torch.randn(1, 4, 11, 9)
    _assert_equal_to_untiled(tiled_decode(patched, z, 5), _untiled_decode(patched, z))


@pytest.mark.parametrize("store", ["host", "recompute"])
def test_exact_encode_equals_untiled(vae, store):
    x = torch.randn(2, 3, 104, 72)
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.parameters
    out = tiled_encode(vae, x, 32 if store == "host" else 80, store=store)
    _assert_equal_to_untiled(out, ref)


def test_bfloat16_decode_matches_untiled_bfloat16(vae):
    vae16 = copy.deepcopy(vae).to(torch.bfloat16)
    z = torch.randn(1, 4, 12, 10).bfloat16()
    out, ref = tiled_decode(vae16, z, 5).float(), _untiled_decode(vae16, z).float()
    # bf16 rounding differs between tile-sized and image-sized convolutions: compare against fp32's scale
    exact = _untiled_decode(vae, z.float())
    assert (out - exact).abs().mean() <= 1.5 * (ref - exact).abs().mean() + 1e-3


def test_removed_fast_mode_says_so(vae):
    z = torch.randn(1, 4, 16, 16)
    for kwargs in (dict(mode="fast"), dict(mode="fast", fast_downscale=2), dict(fast_downscale=4)):
        with pytest.raises(ValueError, match="mode='fast' was removed"):
            tiled_decode(vae, z, 16, **kwargs)
    with pytest.raises(ValueError, match="mode='fast' was removed"):
        tiled_encode(vae, torch.randn(1, 3, 64, 64), 64, mode="fast")


# ---------------------------------------------------------------- seams


def _seam_score(img, transitions, band):
    """Mean jump between neighbouring pixels within ``band`` of the tile transitions (rows and columns),
    against the mean jump elsewhere."""
    total = []
    for dim in (2, 3):
        jumps = (img.narrow(dim, 1, img.shape[dim] - 1) - img.narrow(dim, 0, img.shape[dim] - 1)).abs()
        profile_ = jumps.mean(dim=tuple(d for d in range(4) if d != dim))
        near = torch.zeros_like(profile_, dtype=torch.bool)
        for t in transitions:
            near[max(0, t - 1 - band) : t + band] = True
        total.append(profile_[near].mean() / profile_[~near].mean())
    return torch.stack(total).mean().item()


def test_seams_diffusers_tiling_shows_them_ours_does_not(vae):
    # smooth latents (colour ramps): the untiled decode is smooth, so tile-dependent statistics stand out
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    gen = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(4, 1, 1, generator=gen) for _ in range(3))
    z = (a + 2 * b * xx + 2 * c * yy)[None]
    ref = _untiled_decode(vae, z)
    ours = tiled_decode(vae, z, 8)
    theirs_vae = copy.deepcopy(vae)
    theirs_vae.enable_tiling()
    theirs = _untiled_decode(theirs_vae, z)
    # diffusers: 64-pixel tiles every 48 pixels, blended over 16 rows/columns; ours: every 64 pixels
    assert theirs_vae.tile_sample_min_size == 64 and theirs_vae.tile_latent_min_size == 8
    size = ref.shape[-1]
    their_transitions = [t + 8 for t in range(48, size - 16, 48)]
    our_transitions = list(range(64, size, 64))
    ref_theirs, ref_ours = _seam_score(ref, their_transitions, 8), _seam_score(ref, our_transitions, 2)
    assert abs(_seam_score(ours, our_transitions, 2) / ref_ours - 1) < 0.01
    assert abs(_seam_score(ours, their_transitions, 8) / ref_theirs - 1) < 0.01
    assert _seam_score(theirs, their_transitions, 8) / ref_theirs > 1.3
    assert (theirs - ref).abs().max() > 100 * (ours - ref).abs().max()


# ---------------------------------------------------------------- memory


_peak_cpu_bytes = net_alloc_peak_bytes


def _image_sized_bytes(z, factor=4, mid_channels=16):
    """Output and attention keys/values: what must grow with the image, in float32 bytes."""
    h, w = z.shape[2], z.shape[3]
    return (3 * factor * factor * h * w + 2 * mid_channels * h * w) * 4


def test_working_set_grows_with_the_tile_not_the_image():
    # store="host": the kept activations live in host memory (the CPU here); what must stay bounded is
    # everything else, the working set of a tile
    vae = _vae(levels=3, widths=(8, 16, 16))

    def working_set(z, tile):
        info = TiledRunInfo()
        peak = _peak_cpu_bytes(lambda: tiled_decode(vae, z, tile, info=info))
        return peak - info.stored_bytes - _image_sized_bytes(z)

    small, large = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 32, 32)
    working_set(small, 8)  # warm-up
    assert working_set(large, 8) < 1.2 * working_set(small, 8)
    # Growth with the tile (the smallest tiles' peak is partly fixed costs, whose size depends on the thread
    # count)
    assert working_set(large, 16) > 1.2 * working_set(large, 8)
    assert working_set(large, 32) > 2 * working_set(large, 16)


@pytest.mark.slow
def test_peak_memory_with_recompute_grows_with_the_tile_not_the_image():
    # store="recompute" keeps nothing image-sized: the whole peak is bounded by the tile
    vae = _vae(levels=3, widths=(8, 16, 16))

    def tiled(z, tile):
        return _peak_cpu_bytes(lambda: tiled_decode(vae, z, tile, store="recompute")) - _image_sized_bytes(z)

    small, large = torch.randn(1, 4, 48, 48), torch.randn(1, 4, 80, 80)
    tiled(small, 16)  # warm-up (allocator and thread pools)
    small_tile_small_image = tiled(small, 16)
    small_tile_large_image = tiled(large, 16)
    large_tile_large_image = tiled(large, 48)
    with torch.no_grad():
        untiled_small = _peak_cpu_bytes(lambda: vae.decode(small))
        untiled_large = _peak_cpu_bytes(lambda: vae.decode(large))
    assert untiled_large > 2.2 * untiled_small  # the untiled decode grows with the image (80^2 / 48^2 = 2.8)
    assert small_tile_large_image < 1.2 * small_tile_small_image
    assert large_tile_large_image > 2 * small_tile_large_image


@pytest.mark.cuda
def test_cuda_exact_and_peak_memory_bounded_by_the_tile():
    vae = _vae().cuda()
    z = torch.randn(1, 4, 48, 40, device="cuda")
    _assert_equal_to_untiled(tiled_decode(vae, z, 8), _untiled_decode(vae, z), rel=1e-4)

    def peak(z, tile):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = tiled_decode(vae, z, tile)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()

    small, large = torch.randn(1, 4, 32, 32, device="cuda"), torch.randn(1, 4, 96, 96, device="cuda")
    peak(small, 8)
    assert peak(large, 8) < 1.3 * peak(small, 8) + 2 * 32 * 96 * 96 * 4
    assert peak(large, 32) > 2 * peak(large, 8)


# ---------------------------------------------------------------- errors


def test_errors_name_the_argument(vae):
    z = torch.randn(1, 4, 8, 8)
    with pytest.raises(
        ValueError, match=r"latents must have 4 channels \(the vae's\), got shape \[1, 3, 8, 8\]"
    ):
        tiled_decode(vae, z[:, :3], 8)
    with pytest.raises(ValueError, match=r"latents must be 4-D \[B, C, H, W\]"):
        tiled_decode(vae, z[0], 8)
    with pytest.raises(
        TypeError, match=r"latents must have the vae's dtype torch.float32, got torch.float16"
    ):
        tiled_decode(vae, z.half(), 8)
    with pytest.raises(RuntimeError, match=r"latents must be on the vae's device cpu, got meta"):
        tiled_decode(vae, z.to("meta"), 8)
    with pytest.raises(ValueError, match=r"tile_size must be a positive int, got 0"):
        tiled_decode(vae, z, 0)
    with pytest.raises(
        ValueError, match=r"tile_size=4 is smaller than the receptive-field halo of \d+ pixels"
    ):
        tiled_decode(vae, z, 4, store="recompute")
    with pytest.raises(ValueError, match=r"store must be one of"):
        tiled_decode(vae, z, 8, store="disk")
    with pytest.raises(ValueError, match=r"mode must be one of"):
        tiled_decode(vae, z, 8, mode="approximate")
    x = torch.randn(1, 3, 60, 64)
    with pytest.raises(
        ValueError,
        match=r"images must have H and W divisible by the encoder's downsampling "
        r"factor 8, got shape \[1, 3, 60, 64\]",
    ):
        tiled_encode(vae, x, 32)
    with pytest.raises(
        ValueError,
        match=r"tile_size must be a multiple of the encoder's downsampling factor 8, "
        r"got 20",
    ):
        tiled_encode(vae, x[:, :, :56], 20)
    with pytest.raises(ValueError, match=r"vae must have a `decoder` module"):
        tiled_decode(torch.nn.Linear(2, 2), z, 8)


def test_unsupported_structure_is_refused_by_name():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        up_block_types=("AttnUpDecoderBlock2D",),
        block_out_channels=(8,),
        norm_num_groups=4,
        latent_channels=4,
    ).eval()
    with pytest.raises(ValueError, match=r"decoder.up_blocks.0 has attention layers at image resolution"):
        tiled_decode(vae, torch.randn(1, 4, 8, 8), 8)


def test_exact_decode_and_encode_of_fastlatent_autoencoder_kl(vae):
    """fastlatent.models.AutoencoderKL (fused blocks, same layout) tiles exactly like diffusers' model."""
    from fastlatent.models import AutoencoderKL

    ours = AutoencoderKL.from_diffusers(vae).eval()
    z = torch.randn(1, 4, 9, 13)
    with torch.no_grad():
        want = ours.decode(z)
    _assert_equal_to_untiled(tiled_decode(ours, z, 6), want)
    image = torch.randn(1, 3, 72, 104)
    with torch.no_grad():
        posterior = ours.posterior(image)
    moments = tiled_encode(ours, image, 48)
    mean, logvar = moments.chunk(2, dim=1)
    _assert_equal_to_untiled(mean, posterior.mean)
