"""Bit-for-bit pinning of the CPU sampler-step kernels.

The parity tests compare the fused steps with diffusers at 1e-5; these pin the exact float bits, so that a
rewrite of the kernel for speed (specialised loops, other vector widths, in-place strided operands) cannot
change a single rounding. The digests in data/sampler_step_digests.json were recorded from the kernel
before its loops were specialised, over every op, operand set, x0 mode, dtype and layout, on inputs with
odd sizes, NaN and signed zeros (not inf: see the note at _inputs).

They hold for a build that contracts a * b + c into FMA (the default -march=native on any x86-64 CPU with
FMA, as the CPU kernels compile with -ffp-contract=fast); a build without FMA rounds differently, which
_fma_build() detects and the test then skips, naming why. Regenerate (only when a change of rounding is
intended, and say so in the commit): python tests/test_sampler_step_bitwise.py --record
"""

import hashlib
import json
import pathlib
import sys

import pytest
import torch

import fastlatent  # noqa: F401  (registers the ops)

DIGESTS = pathlib.Path(__file__).parent / "data" / "sampler_step_digests.json"
ops = torch.ops.fastlatent
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# odd sizes: N off the vector width and the 2048-element chunk; a 4-D shape for channels_last
SHAPES = {"odd4d": (3, 4, 33, 35), "wide": (2, 5003), "tiny": (1, 3)}


def _inputs(shape, dtype, layout, seed, count):
    """`count` tensors of `shape`, with a few NaN and signed zeros. Infinities are left out on purpose: where
    a coefficient is zero the old kernel turned inf into NaN through the unused 0 * x0 term, the current one
    keeps IEEE's value of the step's own terms (as diffusers does)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(count):
        t = torch.randn(shape, generator=g) * (1.0 + k)
        flat = t.view(-1)
        if flat.numel() > 40:
            flat[7] = float("nan") if k == 0 else 0.0
            flat[11] = -0.0
            flat[13] = 0.0
            flat[17] = 1e30 if dtype == torch.float32 else 6e4
        t = t.to(dtype)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return out


def _cases():
    """(name, fn(shape, dtype, layout) -> tensors) over every op and operand set."""
    guid = dict(guidance=True)
    cases = []

    def add(name, fn, **flags):
        cases.append((name, fn, flags))

    for pred in ("epsilon", "v_prediction", "sample", "flow"):
        for rx0 in (False, True):
            add(
                f"euler-{pred}-x0{int(rx0)}",
                lambda mo, x, h, p=pred, r=rx0: ops.euler_step.default(
                    mo, x, 0.7, 0.45, p, None, 0.0, None, None, 1.0, r
                ),
            )
    add(
        "euler-clip",
        lambda mo, x, h: ops.euler_step.default(mo, x, 0.7, 0.45, "epsilon", None, 0.0, 1.5, None, 1.0, True),
    )
    add(
        "euler-clip-nox0",
        lambda mo, x, h: ops.euler_step.default(
            mo, x, 0.7, 0.45, "epsilon", None, 0.0, 1.5, None, 1.0, False
        ),
    )
    add(
        "euler-threshold",
        lambda mo, x, h: ops.euler_step.default(mo, x, 0.7, 0.45, "sample", None, 0.0, None, 0.9, 2.5, True),
    )
    add(
        "euler-guided",
        lambda mo, x, h: ops.euler_step.default(
            mo, x, 0.7, 0.45, "epsilon", 7.5, 0.0, None, None, 1.0, False
        ),
        **guid,
    )
    add(
        "euler-guided-rescale",
        lambda mo, x, h: ops.euler_step.default(
            mo, x, 0.7, 0.45, "v_prediction", 5.0, 0.7, None, None, 1.0, True
        ),
        **guid,
    )
    for eta in (0.0, 0.6):
        add(
            f"ddim-eta{eta}-seed",
            lambda mo, x, h, e=eta: ops.ddim_step.default(
                mo, x, 0.3, 0.5, e, "epsilon", False, None, 0.0, None, None, 1.0, None, 1234, 5, None, True
            ),
        )
        add(
            f"ddim-eta{eta}-noise",
            lambda mo, x, h, e=eta: ops.ddim_step.default(
                mo, x, 0.3, 0.5, e, "v_prediction", True, None, 0.0, 1.0, None, 1.0, h[0], 0, 0, None, True
            ),
        )
    add(
        "ddim-nox0",
        lambda mo, x, h: ops.ddim_step.default(
            mo, x, 0.3, 0.5, 0.0, "epsilon", False, None, 0.0, None, None, 1.0, None, 0, 0, None, False
        ),
    )
    add(
        "ddpm-seed",
        lambda mo, x, h: ops.ddpm_step.default(
            mo, x, 0.3, 0.5, "epsilon", None, 0.0, None, None, 1.0, None, 99, 3, None, True
        ),
    )
    add(
        "ddpm-seed-nox0",
        lambda mo, x, h: ops.ddpm_step.default(
            mo, x, 0.3, 0.5, "sample", None, 0.0, None, None, 1.0, None, 99, 3, None, False
        ),
    )
    add(
        "ddpm-noise-threshold",
        lambda mo, x, h: ops.ddpm_step.default(
            mo, x, 0.3, 0.5, "sample", None, 0.0, None, 0.95, 3.0, h[0], 0, 0, None, True
        ),
    )
    add(
        "dpmpp-first",
        lambda mo, x, h: ops.dpmpp_2m_step.default(
            mo, x, None, 0.8, 0.6, 0.9, 0.43, 1.0, 1.0, "epsilon", None, 0.0, None, None, 1.0
        ),
    )
    add(
        "dpmpp-second",
        lambda mo, x, h: ops.dpmpp_2m_step.default(
            mo, x, h[0], 0.8, 0.6, 0.9, 0.43, 0.7, 0.71, "epsilon", None, 0.0, None, None, 1.0
        ),
    )
    coefs = [0.31, -0.27, 0.123]
    for k in range(4):
        for ox0 in (0.0, 0.2):
            for rx0 in (False, True):
                for mode in ("none", "clip"):
                    clip = 1.2 if mode == "clip" else None
                    add(
                        f"generic-h{k}-ox0{ox0}-x0{int(rx0)}-{mode}",
                        lambda mo, x, h, k=k, o=ox0, r=rx0, c=clip: ops.sampler_step.default(
                            mo,
                            x,
                            1.1,
                            -0.4,
                            0.93,
                            0.07,
                            o,
                            list(h[:k]),
                            coefs[:k],
                            0.0,
                            None,
                            0.0,
                            c,
                            None,
                            1.0,
                            None,
                            0,
                            0,
                            None,
                            r,
                        ),
                    )
        add(
            f"generic-h{k}-seed",
            lambda mo, x, h, k=k: ops.sampler_step.default(
                mo,
                x,
                1.1,
                -0.4,
                0.93,
                0.07,
                0.0,
                list(h[:k]),
                coefs[:k],
                0.35,
                None,
                0.0,
                None,
                None,
                1.0,
                None,
                77,
                11,
                None,
                False,
            ),
        )
        add(
            f"generic-h{k}-noise-x0",
            lambda mo, x, h, k=k: ops.sampler_step.default(
                mo,
                x,
                1.1,
                -0.4,
                0.93,
                0.07,
                0.5,
                list(h[:k]),
                coefs[:k],
                -0.35,
                None,
                0.0,
                None,
                None,
                1.0,
                h[3],
                0,
                0,
                None,
                True,
            ),
        )
    add(
        "generic-guided",
        lambda mo, x, h: ops.sampler_step.default(
            mo,
            x,
            1.1,
            -0.4,
            0.93,
            0.07,
            0.0,
            [h[0]],
            [0.2],
            0.0,
            3.0,
            0.0,
            None,
            None,
            1.0,
            None,
            0,
            0,
            None,
            True,
        ),
        **guid,
    )
    add(
        "generic-negzero-noise",
        lambda mo, x, h: ops.sampler_step.default(
            mo, x, 0.0, 0.0, 1.0, -0.5, 0.0, [], [], -0.0, None, 0.0, None, None, 1.0, None, 0, 0, None, False
        ),
    )
    for src in ("epsilon", "v_prediction", "sample", "flow"):
        for dst in ("epsilon", "v_prediction", "sample", "flow"):
            if src != dst:
                add(
                    f"convert-{src}-{dst}",
                    lambda mo, x, h, s=src, d=dst: ops.convert_prediction.default(
                        mo, x, 0.6, 0.8, s, d, None, 0.0
                    ),
                )
    return cases


def _digest(result):
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    h = hashlib.sha256()
    for t in tensors:
        t = t.contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def _run_all():
    digests = {}
    for shape_name, shape in SHAPES.items():
        for dtype_name, dtype in DTYPES.items():
            layouts = ("contiguous", "channels_last") if len(shape) == 4 else ("contiguous",)
            for layout in layouts:
                x, m, m2, *h = _inputs(shape, dtype, layout, 2024, 7)
                guided_m = torch.cat([m, m2]).contiguous(
                    memory_format=torch.channels_last
                    if layout == "channels_last"
                    else torch.contiguous_format
                )
                for name, fn, flags in _cases():
                    mo = guided_m if flags.get("guidance") else m
                    key = f"{name}/{shape_name}/{dtype_name}/{layout}"
                    digests[key] = _digest(fn(mo, x, h))
    return digests


def _fma_build():
    """Whether the kernel contracts out_x x + out_m m into fma(out_x, x, out_m m), as the recording build did:
    inputs where the fused and the separately rounded results differ in fp32."""
    x = torch.tensor([1.0 + 2.0**-23] * 8)
    m = torch.tensor([1.0] * 8)
    out, _ = ops.sampler_step.default(
        m,
        x,
        0.0,
        0.0,
        1.0 + 2.0**-23,
        -(1.0 + 2.0**-22),
        0.0,
        [],
        [],
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
    )
    return bool((out != 0).all())


def test_bitwise_equal_to_recorded_kernel():
    if not _fma_build():
        pytest.skip(
            "the digests were recorded from a build that contracts a * b + c into FMA; this build does not"
        )
    want = json.loads(DIGESTS.read_text())
    got = _run_all()
    assert got.keys() == want.keys()
    changed = sorted(k for k in want if got[k] != want[k])
    assert not changed, f"{len(changed)} of {len(want)} outputs changed bits, e.g. {changed[:8]}"


def test_infinite_inputs_follow_the_steps_arithmetic():
    """An infinite sample or model output gives what the step's own terms give (diffusers' flow Euler:
    x + (sigma_next - sigma) m), not NaN from a zero-coefficient term the step does not use."""
    x = torch.tensor([[float("inf"), 1.0, -float("inf"), 3.0]])
    m = torch.tensor([[1.0, float("inf"), 0.5, float("nan")]])
    out, _ = ops.euler_step.default(m, x, 0.5, 0.4, "flow", None, 0.0, None, None, 1.0, False)
    want = x + (0.4 - 0.5) * m
    torch.testing.assert_close(out, want, equal_nan=True)
    assert out[0, :3].isinf().all()


if __name__ == "__main__" and "--record" in sys.argv:
    assert _fma_build(), "record from a build with FMA contraction"
    DIGESTS.parent.mkdir(exist_ok=True)
    DIGESTS.write_text(json.dumps(_run_all(), indent=0, sort_keys=True) + "\n")
    print(f"wrote {DIGESTS}")
