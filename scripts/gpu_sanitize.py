"""Runs every op's test samples once on a device, forward and (where differentiable) backward, for
compute-sanitizer to watch:

    compute-sanitizer --tool memcheck  --error-exitcode 1 python scripts/gpu_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python scripts/gpu_sanitize.py --max-samples 2

The samples are the OpSpecs of tests/opspecs.py (small, odd and empty shapes, every dtype each op supports),
so what the sanitizer checks is what the tests check. Exits 1 if an op raised; prints one line per op and
dtype.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


# Ops whose first argument is differentiable: their backward kernels run too.
DIFFERENTIABLE = {
    "code_stats",
    "fsq_quantize",
    "lfq_quantize",
    "lfq_entropy",
    "bsq_quantize",
    "bsq_entropy",
    "group_norm",
    "group_norm_apply",
}


def _run_sample(spec, sample) -> None:
    spec.op(*sample.args, **sample.kwargs)
    first = sample.args[0] if sample.args else None
    if (
        spec.name not in DIFFERENTIABLE
        or not isinstance(first, torch.Tensor)
        or not first.is_floating_point()
    ):
        return
    args = (first.detach().requires_grad_(True), *sample.args[1:])
    outputs = spec.op(*args, **sample.kwargs)
    loss = [t.float().sum() for t in _tensors(outputs) if t.is_floating_point() and t.grad_fn is not None]
    if loss:
        torch.stack(loss).sum().backward()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (to check this script)")
    parser.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    parser.add_argument(
        "--max-samples", type=int, default=0, help="at most this many samples per op and dtype"
    )
    args = parser.parse_args(argv)

    from opspecs import OP_SPECS  # tests/opspecs.py

    device = torch.device(args.device)
    wanted = {name for name in args.ops.split(",") if name}
    failures = 0
    for spec in OP_SPECS:
        if wanted and spec.name not in wanted:
            continue
        for dtype in spec.dtypes:
            if dtype == torch.float64 and device.type == "cuda":
                continue
            start, count = time.perf_counter(), 0
            try:
                for count, sample in enumerate(spec.sample_inputs(device, dtype), start=1):
                    _run_sample(spec, sample)
                    if args.max_samples and count >= args.max_samples:
                        break
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                status = "ok"
            except Exception as exc:  # report and go on: one broken op should not hide the others
                failures += 1
                status = f"FAIL after {count} samples: {type(exc).__name__}: {exc}"
            print(
                f"{spec.name:22s} {str(dtype)[6:]:9s} {count:3d} samples "
                f"{time.perf_counter() - start:6.2f} s {status}",
                flush=True,
            )
    print("sanitize driver: " + ("all ops ran" if not failures else f"{failures} op/dtype runs failed"))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
