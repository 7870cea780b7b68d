"""The `fastlatent` command (also `python -m fastlatent`)."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _cmd_info(args: argparse.Namespace) -> int:
    import fastlatent

    info = fastlatent.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"fastlatent {info['version']}")
    print(f"  torch            {info['torch']}" + (f" (extension built against {info['torch_built']})"
                                                  if info.get("torch_built") else ""))
    if not info["extension"]:
        print("  extension        NOT LOADED")
        print("    " + info["extension_error"].replace("\n", "\n    "))
        return 1
    if info["cuda"]:
        print(f"  CUDA kernels     yes, sm {info['cuda_archs']} (TORCH_CUDA_ARCH_LIST={info['cuda_arch_flags']}, "
              f"CUDA {info['cuda_compiled_version'] // 1000}.{info['cuda_compiled_version'] % 1000 // 10})")
    else:
        print("  CUDA kernels     no (CPU-only build)")
    print(f"  CPU SIMD         {info['cpu_simd'].strip() or 'baseline'}")
    print(f"  OpenMP           {info['openmp_version']}, {info['openmp_max_threads']} threads "
          f"(torch uses {info['torch_threads']})")
    if info["gpus"]:
        for gpu in info["gpus"]:
            print(f"  GPU {gpu['index']}            {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB)")
    else:
        print("  GPUs             none visible")
    return 0


def _time(fn, device, repeats: int = 3) -> float:
    import torch

    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def _selftest_nearest_code(device, dtype) -> tuple[bool, str]:
    """Quantise realistic tensors on `device`; check against the float64 reference."""
    import torch

    import fastlatent
    from fastlatent import reference

    gen = torch.Generator().manual_seed(0)
    n, d, k = 8192, 64, 1024
    codebook = torch.randn(k, d, generator=gen)
    x = codebook[torch.randint(0, k, (n,), generator=gen)] + 0.3 * torch.randn(n, d, generator=gen)
    x, codebook = x.to(device, dtype), codebook.to(device, dtype)

    indices, distances = fastlatent.nearest_code(x, codebook)
    ref_indices, _ = reference.nearest_code(x, codebook)
    # Where the indices differ, the two codes must be equally near up to fp32 rounding.
    exact = reference.nearest_code(x, codebook)[1]
    xf, cf = x.double(), codebook.double()
    ours = ((xf - cf[indices]) ** 2).sum(1)
    best = ((xf - cf[ref_indices]) ** 2).sum(1)
    worst_excess = (ours - best).max().item()
    ok = worst_excess <= 1e-4 * best.max().item() and torch.allclose(distances, exact, rtol=1e-4, atol=1e-3)

    ours_s = _time(lambda: fastlatent.nearest_code(x, codebook), device)
    base_s = _time(lambda: torch.cdist(x.float(), codebook.float()).argmin(1), device)
    agree = (indices == ref_indices).float().mean().item()
    msg = (f"nearest_code {device.type:4s} {str(dtype):14s} N={n} D={d} K={k}: "
           f"{'ok  ' if ok else 'FAIL'} indices agree {agree:.2%}, "
           f"{ours_s * 1e3:7.2f} ms vs cdist+argmin {base_s * 1e3:7.2f} ms ({base_s / ours_s:4.1f}x)")
    return ok, msg


def _selftest_scalar_quantizers(device, dtype) -> tuple[bool, str]:
    """FSQ must equal its reference exactly; the LFQ entropy must match the materialised softmax."""
    import torch

    import fastlatent
    from fastlatent import reference

    gen = torch.Generator().manual_seed(1)
    levels = [8, 5, 5, 5]
    z = (torch.randn(65536, 4, generator=gen) * 2).to(device, dtype)
    got, ref = fastlatent.fsq_quantize(z, levels), reference.fsq_quantize(z, levels)
    fsq_ok = torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    x = (torch.randn(2048, 12, generator=gen) * 0.05).to(device, dtype)
    ps, avg = fastlatent.lfq_entropy(x, 1.0, 10.0)
    ref_ps, ref_avg = reference.lfq_entropy(x, 1.0, 10.0)
    lfq_ok = bool(torch.allclose(ps, ref_ps, rtol=1e-4, atol=1e-5) and torch.allclose(avg, ref_avg, rtol=1e-4, atol=1e-9))
    fsq_s = _time(lambda: fastlatent.fsq_quantize(z, levels), device)
    msg = (f"fsq/lfq        {device.type:4s} {str(dtype):14s} FSQ 65536x4: {'ok  ' if fsq_ok else 'FAIL'} "
           f"({fsq_s * 1e3:6.2f} ms), LFQ entropy d=12: {'ok' if lfq_ok else 'FAIL'}")
    return fsq_ok and lfq_ok, msg


def _cmd_selftest(args: argparse.Namespace) -> int:
    import torch

    import fastlatent

    info = fastlatent.build_info()
    if not info["extension"]:
        print(info["extension_error"], file=sys.stderr)
        return 1
    devices = [torch.device("cpu")]
    if info["cuda"] and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif torch.cuda.is_available():
        print("note: a GPU is visible but this build has no CUDA kernels; testing the CPU only")
    all_ok = True
    for device in devices:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for check in (_selftest_nearest_code, _selftest_scalar_quantizers):
                ok, msg = check(device, dtype)
                all_ok &= ok
                print(msg, flush=True)
    print("selftest passed" if all_ok else "selftest FAILED")
    return 0 if all_ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlatent", description="Fast kernels for latent generative models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="how fastlatent was built: version, torch, CUDA archs, SIMD, OpenMP, GPUs")
    info.add_argument("--json", action="store_true", help="print the build information as JSON")
    info.set_defaults(func=_cmd_info)
    selftest = sub.add_parser(
        "selftest", help="run every op on real tensors on each available device and check it against the reference")
    selftest.set_defaults(func=_cmd_selftest)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
