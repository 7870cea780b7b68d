"""Shared set-up for the benchmark suites (pytest-benchmark), one file per area.

Run all of them, side by side, with a report (results.json, results.md, plots):

    fastlatent bench [--quick|--full] [--filter PATTERN] [--device cpu|cuda] [--out DIR]

or with pytest directly: ``python -m pytest benchmarks/ --benchmark-only [--full] [-k ...]``.

A case describes itself and runs through the ``bench`` fixture
(:class:`fastlatent.benchmarking.measure.Bench`): fastest-of-N timing (CUDA events on the GPU), one
peak-memory probe, GB/s or GFLOP/s and the fraction of the device's peak. Provider names are the
same in every suite:

- ``fastlatent``: our op or module;
- ``reference`` / ``reference_compiled``: :mod:`fastlatent.reference`, the plain-PyTorch ground truth
  (float64 where exactness needs it, so slow by design), eager and under ``torch.compile``;
- ``torch`` / ``torch_compiled`` (or a name for the idiom, e.g. ``cdist_argmin``): what model code
  writes in plain PyTorch, in the input's dtype;
- peers, when installed: ``vector_quantize_pytorch``, ``diffusers``, ``faiss``. A missing peer skips
  that provider with the reason; it never fails the run.

Cases marked ``full`` run only with ``--full``; cases marked ``cuda`` need a GPU and CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch

import fastlatent
from fastlatent.benchmarking.measure import Bench, cpu_model, device_name, synced  # noqa: F401 (suites import)


def pytest_addoption(parser):
    parser.addoption(
        "--full",
        action="store_true",
        default=False,
        help="run the large shapes and scaling sweeps too (tens of minutes on a 2-core CPU)",
    )
    parser.addoption(
        "--compile-budget",
        type=float,
        default=300.0,
        help="seconds torch.compile may take for one case before that provider is skipped",
    )


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py when given this folder (pytest's default python_files is test_*.py)."""
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    cuda_ok = torch.cuda.is_available() and fastlatent.build_info()["cuda"]
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU and a build with CUDA kernels")
    skip_full = pytest.mark.skip(reason="large shape: pass --full")
    for item in items:
        if "cuda" in item.keywords and not cuda_ok:
            item.add_marker(skip_cuda)
        if "full" in item.keywords and not config.getoption("--full"):
            item.add_marker(skip_full)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    config.addinivalue_line("markers", "full: large shape, only with --full")


@pytest.fixture
def bench(benchmark, request) -> Bench:
    """Describe, compile and run one provider of one case (see Bench)."""
    return Bench(
        benchmark,
        request.node,
        full=request.config.getoption("--full"),
        compile_budget_s=request.config.getoption("--compile-budget"),
    )


def timed(fn, device: torch.device):
    """fn wrapped so that each timed call includes waiting for the GPU."""
    return synced(fn, device)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| in float64 (the tolerance measure of the sampling and model cases)."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def providers(*names: str, full_only: tuple[str, ...] = ()) -> list:
    """Provider parameters; those in ``full_only`` run only with --full (to keep a quick run quick)."""
    return [pytest.param(name, marks=pytest.mark.full) if name in full_only else name for name in names]


def peer(module: str, pip_name: str):
    """Import an optional peer library or skip this provider, saying how to install it."""
    return pytest.importorskip(module, reason=f"{pip_name} not installed (pip install {pip_name})")


# ------------------------------------------------------------------------------- shapes of real models

# Stable Diffusion's VAE (AutoencoderKL, SD 1.x/2.x/XL): downsampling factor 8, 4 latent channels.
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4
)


def sd_vae_norm_shapes(resolution: int, part: str, config: dict = SD_VAE) -> list[tuple[int, int, int]]:
    """The distinct GroupNorm inputs (C, H, W) of an SD-VAE encoder or decoder at ``resolution`` pixels.

    Walks the block structure of diffusers' Encoder/Decoder (resnets' norm1/norm2, the mid-block
    attention norm, conv_norm_out), largest first.

    Args:
        resolution: image side in pixels (256, 512, 1024).
        part: "encoder" or "decoder".
        config: block_out_channels and layers_per_block of the VAE.
    """
    channels = list(config["block_out_channels"])
    levels = len(channels)
    shapes: list[tuple[int, int]] = []  # (C, side)
    if part == "encoder":
        side, prev = resolution, channels[0]
        for level, width in enumerate(channels):
            for _ in range(config["layers_per_block"]):
                shapes += [(prev, side), (width, side)]
                prev = width
            if level < levels - 1:
                side //= 2
        shapes.append((channels[-1], side))  # mid block and conv_norm_out
    elif part == "decoder":
        side, prev = resolution // 2 ** (levels - 1), channels[-1]
        shapes.append((prev, side))  # mid block
        for level, width in enumerate(reversed(channels)):
            for _ in range(config["layers_per_block"] + 1):
                shapes += [(prev, side), (width, side)]
                prev = width
            if level < levels - 1:
                side *= 2
    else:
        raise ValueError(f"sd_vae_norm_shapes: part must be 'encoder' or 'decoder', got {part!r}")
    distinct = sorted(set(shapes), key=lambda s: -(s[0] * s[1] * s[1]))
    return [(c, s, s) for c, s in distinct]
