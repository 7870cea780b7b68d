"""Whole models: fastlatent against the implementations people run, end to end.

Every case is a :class:`ModelCase` in ``MODEL_CASES`` and runs three providers side by side:

- ``fastlatent``: the model as fastlatent runs it (``ModelCase.fastlatent``: by default the baseline
  model after :func:`fastlatent.patch`; a native fastlatent model can be built there instead),
- the baseline (``ModelCase.baseline``, e.g. ``diffusers``): the unmodified model,
- ``<baseline>_compiled``: ``torch.compile`` of the baseline's forward (``--full`` only on the CPU,
  where compiling a whole VAE takes minutes; skipped with the reason past ``--compile-budget``).

Adding a model (full two-stage models, VQGAN decoders, ...): append a ``ModelCase`` with a builder that
makes random weights (benchmarks never download), its inputs, the call to time and the tolerance of
fastlatent's output against the baseline's. Time and peak memory (one call) are recorded for each
provider; ``sizes`` feeds the scaling plots (e.g. ``resolution``).

Today: Stable Diffusion's VAE (diffusers ``AutoencoderKL`` with the SD configuration, random
weights) decoding 256/512/1024 px images and encoding them, patched vs unpatched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from conftest import SD_VAE, peer, relative_error

import fastlatent

BENCH_AREA = "models"
CPU = torch.device("cpu")
CUDA = torch.device("cuda") if torch.cuda.is_available() else None


@dataclass(frozen=True)
class ModelCase:
    """One model workload, run by every provider of ``test_model``.

    Attributes:
        op: the model and what it does, the report's op name (e.g. "SD-VAE decode").
        case: the workload (e.g. "256 px, batch 1").
        build: ``(device, dtype) -> nn.Module``: the baseline model with random weights, in eval mode.
        inputs: ``(device, dtype) -> tuple``: the arguments of ``call``.
        call: ``(model, *inputs) -> Tensor``: the work to time (run under ``torch.inference_mode``).
        device: "cpu" or "cuda".
        dtype: parameter and activation dtype.
        sizes: named sizes for scaling plots (resolution, batch, ...).
        tolerance: largest max|fastlatent - baseline| / max|baseline| accepted.
        baseline: the name the baseline provider is reported under.
        fastlatent: ``model -> model``: how fastlatent runs the baseline (default: ``fastlatent.patch``).
        full: run only with ``--full``.
        rounds: timed calls (None: chosen from the time of one call).
    """

    op: str
    case: str
    build: Callable
    inputs: Callable
    call: Callable
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    sizes: dict = field(default_factory=dict)
    tolerance: float = 1e-4
    baseline: str = "diffusers"
    fastlatent: Callable = lambda model: fastlatent.patch(model, report=False)
    full: bool = False
    rounds: int | None = None

    @property
    def id(self) -> str:
        return f"{self.op}-{self.case}-{self.device}-{str(self.dtype).removeprefix('torch.')}".replace(
            " ", "_"
        )


# ------------------------------------------------------------------------------------------ SD-VAE


def sd_vae(device, dtype):
    """diffusers' AutoencoderKL with Stable Diffusion's VAE configuration, random weights."""
    diffusers = peer("diffusers", "diffusers")
    torch.manual_seed(0)
    levels = len(SD_VAE["block_out_channels"])
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=SD_VAE["latent_channels"],
        layers_per_block=SD_VAE["layers_per_block"],
        norm_num_groups=SD_VAE["norm_num_groups"],
        block_out_channels=SD_VAE["block_out_channels"],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
    )
    return vae.to(device, dtype).eval()


# The CPU bar: "a patched small AutoencoderKL decode faster than unpatched". The SD-VAE structure at a
# quarter of its widths (as tests/test_patch.py builds it): its norms are a larger share than at full width,
# and a call is short enough to time many rounds, which this VM's 20-40% call-to-call spread needs.
SMALL_SD_VAE = dict(SD_VAE, block_out_channels=(32, 64, 128, 128), norm_num_groups=16)


def small_sd_vae(device, dtype):
    """diffusers' AutoencoderKL with the SD-VAE structure at a quarter of its widths, random weights."""
    diffusers = peer("diffusers", "diffusers")
    torch.manual_seed(0)
    cfg = SMALL_SD_VAE
    levels = len(cfg["block_out_channels"])
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=cfg["latent_channels"],
        layers_per_block=cfg["layers_per_block"],
        norm_num_groups=cfg["norm_num_groups"],
        block_out_channels=cfg["block_out_channels"],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
    )
    return vae.to(device, dtype).eval()


def _latent(resolution, batch=1):
    def make(device, dtype):
        gen = torch.Generator().manual_seed(0)
        return (
            torch.randn(batch, SD_VAE["latent_channels"], resolution // 8, resolution // 8, generator=gen).to(
                device, dtype
            ),
        )

    return make


def _image(resolution, batch=1):
    def make(device, dtype):
        gen = torch.Generator().manual_seed(0)
        return (torch.rand(batch, 3, resolution, resolution, generator=gen).mul(2).sub(1).to(device, dtype),)

    return make


def _decode(vae, latent):
    return vae.decode(latent).sample


def _encode(vae, image):
    return vae.encode(image).latent_dist.mean


def _sd_vae_cases(part, resolution, device, dtype, full, rounds=None):
    half = dtype != torch.float32
    return ModelCase(
        op=f"SD-VAE {part}",
        case=f"{resolution} px, batch 1",
        build=sd_vae,
        device=device,
        dtype=dtype,
        inputs=_latent(resolution) if part == "decode" else _image(resolution),
        call=_decode if part == "decode" else _encode,
        sizes={"resolution": resolution, "batch": 1},
        # random weights: relative to the output's size; half types through ~30 convolutions
        tolerance=5e-2 if half else 1e-4,
        full=full,
        rounds=rounds,
    )


MODEL_CASES: list[ModelCase] = [
    # 4 rounds, not 2: one 256 px decode varies 20-40% from call to call on a shared 2-core VM (first-touch
    # page faults of the allocator's fresh mmaps are about 30% of its time), and the best of 2 swung the
    # patched/unpatched ratio between 0.94x and 1.1x from run to run
    _sd_vae_cases("decode", 256, "cpu", torch.float32, full=False, rounds=4),
    ModelCase(
        op="SD-VAE decode",
        case="small (widths 32-128, 16 groups), 256 px, batch 1",
        build=small_sd_vae,
        inputs=_latent(256),
        call=_decode,
        sizes={"resolution": 256, "batch": 1, "width": 32},
        rounds=12,
    ),
    _sd_vae_cases("encode", 256, "cpu", torch.float32, full=True, rounds=2),
    _sd_vae_cases("decode", 512, "cpu", torch.float32, full=True, rounds=2),
    _sd_vae_cases("encode", 512, "cpu", torch.float32, full=True, rounds=2),
    _sd_vae_cases("decode", 1024, "cpu", torch.float32, full=True, rounds=1),
    *[
        _sd_vae_cases(part, r, "cuda", torch.bfloat16, full=False)
        for part in ("decode", "encode")
        for r in (512, 1024)
    ],
]


def _model_params():
    params = []
    for case in MODEL_CASES:
        for provider in ("fastlatent", "baseline", "baseline_compiled"):
            marks = [pytest.mark.cuda] if case.device == "cuda" else []
            if case.full or (provider == "baseline_compiled" and case.device == "cpu"):
                marks.append(pytest.mark.full)
            params.append(pytest.param(case, provider, marks=marks, id=f"{case.id}-{provider}"))
    return params


_EXPECTED: dict = {}


def _expected(case, model, inputs):
    """The baseline's output, computed once for all providers of a case (only the last case kept)."""
    if case.id not in _EXPECTED:
        _EXPECTED.clear()
        with torch.inference_mode():
            _EXPECTED[case.id] = case.call(model, *inputs).float()
    return _EXPECTED[case.id]


@pytest.mark.parametrize(("case", "provider"), _model_params())
def test_model(bench, case, provider):
    device = torch.device(case.device)
    name = {
        "fastlatent": "fastlatent",
        "baseline": case.baseline,
        "baseline_compiled": f"{case.baseline}_compiled",
    }[provider]
    bench.describe(
        op=case.op, case=case.case, provider=name, device=device, dtype=case.dtype, sizes=case.sizes
    )
    model = case.build(device, case.dtype)
    inputs = case.inputs(device, case.dtype)
    expected = _expected(case, model, inputs)
    if provider == "fastlatent":
        model = case.fastlatent(copy.deepcopy(model))
        fn = lambda: case.call(model, *inputs)  # noqa: E731
    elif provider == "baseline":
        fn = lambda: case.call(model, *inputs)  # noqa: E731
    else:

        def warm(compiled):
            with torch.inference_mode():
                return compiled(*inputs)

        compiled = bench.compile(lambda *args: case.call(model, *args), warm=warm)
        fn = lambda: compiled(*inputs)  # noqa: E731

    def step():
        with torch.inference_mode():
            return fn()

    err = relative_error(step().float(), expected)
    assert err <= case.tolerance, (
        f"{name}: relative error {err:.2e} against the baseline > {case.tolerance:g}"
    )
    bench.note(relative_error_vs_baseline=err)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # the correctness call above warmed it up; whole models are slow enough that one more is waste
    bench.run(step, rounds=case.rounds, warmup=0 if case.rounds else 1)
