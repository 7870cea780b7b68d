"""Tiled SD-VAE decode: time, peak memory and error against the untiled decode, side by side.

Providers: fastlatent.tiled_decode (store="host" and "recompute"), diffusers untiled (skipped above
``--max-untiled``, where it runs out of memory), diffusers ``enable_tiling()``. The model is diffusers'
``AutoencoderKL`` in the SD-VAE configuration (block_out_channels 128/256/512/512, 2 layers per block) with
random weights (no downloads), or a reduced-width variant for a quick CPU run.

    python benchmarks/bench_tiled_vae.py                      # quick: reduced widths, 256^2 and 512^2, CPU
    python benchmarks/bench_tiled_vae.py --sd --sizes 1024 2048 4096 --device cuda --dtype bfloat16
    python benchmarks/bench_tiled_vae.py --json benchmarks/results/<name>.json

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU, the peak of torch's CPU allocations from
the profiler's memory events (everything, including the activations store="host" keeps). Error: max and mean
absolute difference from the untiled decode, where it ran.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import fastlatent
from fastlatent import TiledRunInfo, tiled_decode
from fastlatent.benchmarking.measure import net_alloc_peak_bytes


def make_vae(sd: bool, dtype, device):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    widths = (128, 256, 512, 512) if sd else (32, 64, 128, 128)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=widths,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    )
    return vae.eval().to(device, dtype)


def measure(fn, device):
    """(seconds, peak bytes, output)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - base, out
    outputs = []
    peak = net_alloc_peak_bytes(lambda: outputs.append(fn()))
    out = outputs[0]
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, peak, out


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes (pixels)")
    parser.add_argument("--sd", action="store_true", help="full SD-VAE widths (default: reduced widths)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--tile", type=int, default=64, help="tile size in latent pixels")
    parser.add_argument("--max-untiled", type=int, default=2048, help="largest size to run untiled")
    parser.add_argument(
        "--providers", nargs="+", default=["untiled", "diffusers_tiled", "exact_host", "exact_recompute"]
    )
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    vae = make_vae(args.sd, dtype, device)
    rows = []
    for size in args.sizes:
        gen = torch.Generator().manual_seed(size)
        z = torch.randn(1, 4, size // 8, size // 8, generator=gen).to(device, dtype)
        ref = None
        for provider in args.providers:
            info = TiledRunInfo()
            if provider == "untiled":
                if size > args.max_untiled:
                    continue
                vae.disable_tiling()

                def fn():
                    with torch.no_grad():
                        return vae.decode(z).sample
            elif provider == "diffusers_tiled":
                # the same tile as ours (diffusers' default is config.sample_size, 25% overlap)
                vae.enable_tiling()
                vae.tile_latent_min_size, vae.tile_sample_min_size = args.tile, args.tile * 8

                def fn():
                    with torch.no_grad():
                        return vae.decode(z).sample
            else:
                store = "recompute" if provider == "exact_recompute" else "host"

                def fn():
                    return tiled_decode(vae, z, args.tile, store=store, info=info, progress=False)

            try:
                seconds, peak, out = measure(fn, device)
            except torch.OutOfMemoryError:
                rows.append(dict(size=size, provider=provider, error="out of memory"))
                print(f"{size:5d}  {provider:16s}  out of memory")
                continue
            finally:
                vae.disable_tiling()
            row = dict(
                size=size, provider=provider, seconds=round(seconds, 3), peak_mib=round(peak / 2**20, 1)
            )
            if provider == "untiled":
                ref = out.float()
            if ref is not None:
                diff = (out.float() - ref).abs()
                row.update(max_abs_err=float(diff.max()), mean_abs_err=float(diff.mean()))
            if provider not in ("untiled", "diffusers_tiled"):
                row.update(
                    passes=info.passes,
                    stage_evaluations=info.stage_evaluations,
                    stored_mib=round(info.stored_bytes / 2**20, 1),
                )
            rows.append(row)
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            del out
    result = dict(
        device=str(device),
        dtype=args.dtype,
        sd_widths=args.sd,
        tile=args.tile,
        torch=torch.__version__,
        fastlatent=fastlatent.__version__,
        machine=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        rows=rows,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
