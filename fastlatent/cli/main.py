"""The `fastlatent` command (also `python -m fastlatent`): the parser, ``info``, ``selftest`` and error
reporting.

The model commands are in :mod:`fastlatent.cli.commands`, ``bench`` in :mod:`fastlatent.benchmarking`. A
command's mistakes in its inputs (``ValueError``, ``TypeError``, a missing file or package) end the command
with
one line on stderr and exit status 2; ``fastlatent --debug COMMAND ...`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import fastlatent
from fastlatent.benchmarking import add_bench_parser
from fastlatent.cli.commands import add_model_commands
from fastlatent.cli.options import CommandParser, apply_config_defaults, load_config_file
from fastlatent.selftest import run_selftest, selftest_devices

# What a command raises for a mistake in its inputs: reported as one line and exit status 2, not a traceback.
USER_ERRORS = (ValueError, TypeError, ImportError, OSError)


def _cmd_info(args: argparse.Namespace) -> int:
    info = fastlatent.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"fastlatent {info['version']}")
    print(
        f"  torch            {info['torch']}"
        + (f" (extension built against {info['torch_built']})" if info.get("torch_built") else "")
    )
    if not info["extension"]:
        print("  extension        NOT LOADED")
        print("    " + info["extension_error"].replace("\n", "\n    "))
        return 1
    if info["cuda"]:
        print(
            f"  CUDA kernels     yes, sm {info['cuda_archs']} "
            f"(TORCH_CUDA_ARCH_LIST={info['cuda_arch_flags']}, "
            f"CUDA {info['cuda_compiled_version'] // 1000}.{info['cuda_compiled_version'] % 1000 // 10})"
        )
    else:
        print("  CUDA kernels     no (CPU-only build)")
    print(f"  CPU SIMD         {info['cpu_simd'].strip() or 'baseline'}")
    print(
        f"  OpenMP           {info['openmp_version']}, {info['openmp_max_threads']} threads "
        f"(torch uses {info['torch_threads']})"
    )
    if info["gpus"]:
        for gpu in info["gpus"]:
            print(
                f"  GPU {gpu['index']}            {gpu['name']} "
                f"(sm {gpu['capability']}, {gpu['memory_gib']} GiB)"
            )
    else:
        print("  GPUs             none visible")
    return 0


def _cmd_selftest(args: argparse.Namespace) -> int:
    info = fastlatent.build_info()
    if not info["extension"]:
        print(info["extension_error"], file=sys.stderr)
        return 1
    devices = selftest_devices()
    if len(devices) == 1 and torch.cuda.is_available():
        print("note: a GPU is visible but this build has no CUDA kernels; testing the CPU only")
    ok = run_selftest(devices, report=lambda line: print(line, flush=True))
    print("selftest passed" if ok else "selftest FAILED")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlatent", description="Fast kernels for latent generative models."
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error instead of its one-line message",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    info = sub.add_parser(
        "info", help="how fastlatent was built: version, torch, CUDA archs, SIMD, OpenMP, GPUs"
    )
    info.add_argument("--json", action="store_true", help="print the build information as JSON")
    info.set_defaults(func=_cmd_info)
    selftest = sub.add_parser(
        "selftest",
        help="run every op on real tensors on each available device and check it against the reference",
    )
    selftest.set_defaults(func=_cmd_selftest)
    add_model_commands(sub)
    add_bench_parser(sub)
    parser.set_defaults(commands=sub.choices)
    return parser


def _config_argv(argv: list[str]) -> tuple[str | None, str | None]:
    """(command, --config value) from the raw arguments, before parsing."""
    command = next((a for a in argv if not a.startswith("-")), None)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return command, argv[i + 1]
        if arg.startswith("--config="):
            return command, arg.split("=", 1)[1]
    return command, None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = parser.get_default("commands")
    command, config_path = _config_argv(argv)
    if config_path is not None:
        if command not in commands:
            parser.error(f"--config goes after a command, e.g. fastlatent train-ae --config {config_path}")
        try:
            apply_config_defaults(commands[command], load_config_file(config_path), config_path)
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"fastlatent {args.command}: error: {exc}", file=sys.stderr)
        print("(run `fastlatent --debug ...` for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
