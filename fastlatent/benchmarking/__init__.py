"""``fastlatent bench``: run the benchmark suites side by side and write a report.

The suites are pytest-benchmark files (``bench_<area>.py``: quantizers, norms, sampling, models, ...).
They live in the repository's ``benchmarks/`` folder; ``fastlatent bench`` finds them

1. at ``--suites DIR`` or ``$FASTLATENT_BENCHMARKS``,
2. shipped inside the installed package (``fastlatent/_benchmarks``, where a wheel carries them),
3. next to the package in a source checkout (``pip install -e .``: ``<checkout>/benchmarks``),

and runs them with ``python -m pytest`` in a child process (one process for every case, so all the
providers of a case are timed side by side), loading :mod:`fastlatent.benchmarking.plugin` to select
cases and record what was measured. It then writes into ``--out``:

- ``results.json``: device, versions, build, and every case with each provider's time, peak memory,
  throughput and speed-up (schema in :mod:`fastlatent.benchmarking.report`),
- ``results.md``: the same as markdown tables,
- ``plots/adoption.png``: fastlatent (and its drop-in forms) beside each alternative people use, ms and ratio;
  ``plots/*.png``: time bars per op and scaling curves over N, K, D and resolution,
- ``pytest-benchmark.json`` (pytest-benchmark's own format) and ``pytest.log``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

import fastlatent
from fastlatent.benchmarking.measure import device_name, device_peak
from fastlatent.benchmarking.plugin import PROGRESS_PREFIX, split_patterns
from fastlatent.benchmarking.report import (
    SCHEMA,
    build_results,
    render_markdown,
    write_adoption_plot,
    write_plots,
)

SUITES_ENV = "FASTLATENT_BENCHMARKS"
# distribution name, module name: the peers and tools whose versions a report names
_VERSIONED = [
    ("torch", "torch"),
    ("numpy", "numpy"),
    ("diffusers", "diffusers"),
    ("vector-quantize-pytorch", "vector_quantize_pytorch"),
    ("faiss-cpu", "faiss"),
    ("pytest", "pytest"),
    ("pytest-benchmark", "pytest_benchmark"),
    ("matplotlib", "matplotlib"),
]


class BenchError(Exception):
    """A problem with the command's inputs or environment, reported as one message (exit status 2)."""


def _is_suite_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("bench_*.py"))


def locate_suites(explicit: str | os.PathLike | None = None) -> Path:
    """The folder holding the ``bench_*.py`` suites (see the module docstring for the search order).

    Raises:
        BenchError: ``explicit`` is not a suites folder, or none was found.
    """
    if explicit is not None or os.environ.get(SUITES_ENV):
        source = "--suites" if explicit is not None else f"${SUITES_ENV}"
        path = Path(explicit if explicit is not None else os.environ[SUITES_ENV]).expanduser()
        if not _is_suite_dir(path):
            raise BenchError(
                f"fastlatent bench: {source} must be a folder with bench_*.py suites "
                f"(the repository's benchmarks/), got {str(path)!r}"
            )
        return path.resolve()
    package = Path(fastlatent.__file__).resolve().parent
    for candidate in (package / "_benchmarks", package.parent / "benchmarks"):
        if _is_suite_dir(candidate):
            return candidate
    raise BenchError(
        "fastlatent bench: the benchmark suites were not found. They are the bench_*.py files of the "
        "repository's benchmarks/ folder, which this installation does not include "
        f"(looked in {package / '_benchmarks'} and {package.parent / 'benchmarks'}). Run from a source "
        "checkout (pip install --no-build-isolation -e .), or pass --suites /path/to/fastlatent/benchmarks "
        f"(or set {SUITES_ENV}) with a checkout of fastlatent {fastlatent.__version__}."
    )


def _require_runner() -> None:
    missing = [
        pip
        for module, pip in (("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark"))
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise BenchError(
            f"fastlatent bench: the suites run under {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install {' '.join(missing)} "
            "(peers are optional: diffusers, vector-quantize-pytorch, faiss-cpu; plots need matplotlib)"
        )


def resolve_device(requested: str | None) -> str:
    """``cpu`` or ``cuda``; the default is cuda when a GPU and fastlatent's CUDA kernels are there."""
    cuda_ok = torch.cuda.is_available() and bool(fastlatent.build_info().get("cuda"))
    if requested is None:
        return "cuda" if cuda_ok else "cpu"
    if requested == "cuda" and not cuda_ok:
        why = (
            "no CUDA GPU is visible"
            if not torch.cuda.is_available()
            else "this fastlatent build has no CUDA kernels (see `fastlatent info`)"
        )
        raise BenchError(f"fastlatent bench: --device cuda needs a CUDA GPU and CUDA kernels, but {why}")
    return requested


def _version(dist: str, module: str) -> str | None:
    for name in (dist, "faiss-gpu", "faiss") if module == "faiss" else (dist,):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:  # installed without metadata (conda, source builds)
        return getattr(__import__(module), "__version__", None)
    except Exception:
        return None


def _git(folder: Path) -> dict | None:
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata(device: str, mode: str, command: str, suites: Path) -> dict:
    """Device, versions, build and source of a run, as results.json names them."""
    dev = torch.device(device)
    peak = device_peak(dev)
    peak_text = None
    if peak.bandwidth:
        peak_text = (
            f"{peak.bandwidth / 1e12:.2f} TB/s"
            + (f", bf16 {peak.flops['bf16'] / 1e12:.0f} TFLOP/s" if "bf16" in peak.flops else "")
            + f" ({peak.source})"
        )
    versions = {"python": platform.python_version(), "fastlatent": fastlatent.__version__}
    versions.update({dist: _version(dist, module) for dist, module in _VERSIONED})
    return {
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "mode": mode,
        "device": {
            "type": device,
            "name": device_name(dev),
            "peak": peak_text,
            "peak_bandwidth_bytes_per_s": peak.bandwidth,
            "peak_flops": peak.flops,
            "peak_source": peak.source,
        },
        "host": {
            "platform": platform.platform(),
            "cpu": device_name(torch.device("cpu")),
            "logical_cpus": os.cpu_count(),
        },
        "versions": versions,
        "build": fastlatent.build_info(),
        "suites": str(suites),
        "git": _git(suites),
        "memory_probe": (
            "CUDA: max_memory_allocated above the allocation before the call"
            if device == "cuda"
            else "CPU: rise of the resident-set high-water mark, all allocations"
        ),
    }


def pytest_command(
    suites: Path,
    *,
    device: str,
    full: bool,
    include: list[str],
    exclude: list[str],
    record: Path,
    benchmark_json: Path,
    compile_budget_s: float,
    collect_only: bool = False,
) -> list[str]:
    """The ``python -m pytest`` command line that runs the selected cases."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(suites),
        "-p",
        "fastlatent.benchmarking.plugin",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(suites),
        "-q",
        "--fl-device",
        device,
    ]
    cmd += [f"--fl-filter={p}" for p in include] + [f"--fl-exclude={p}" for p in exclude]
    if full:
        cmd.append("--full")
    if collect_only:
        return cmd + ["--collect-only", "--fl-list"]
    return cmd + [
        "--benchmark-only",
        "--benchmark-quiet",
        f"--benchmark-json={benchmark_json}",
        f"--fl-record={record}",
        f"--compile-budget={compile_budget_s:g}",
    ]


def _child_env() -> dict:
    """The child must import this very fastlatent (a checkout's, not another installed copy)."""
    env = dict(os.environ)
    root = str(Path(fastlatent.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _stream(cmd: list[str], log_path: Path | None, echo_all: bool) -> int:
    log = open(log_path, "w") if log_path else None
    proc = None
    try:
        if log:
            log.write("$ " + shlex.join(cmd) + "\n")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_child_env(), bufsize=1
        )
        for line in proc.stdout:
            if log:
                log.write(line)
                log.flush()
            if echo_all:
                sys.stdout.write(line)
            elif PROGRESS_PREFIX in line:  # after pytest's own progress characters, if any
                sys.stdout.write(line.split(PROGRESS_PREFIX, 1)[1])
            sys.stdout.flush()
        return proc.wait()
    except KeyboardInterrupt:
        if proc is not None:
            proc.terminate()
            proc.wait()
        raise
    finally:
        if log:
            log.close()


def _children_cpu_s() -> float:
    try:
        import resource
    except ImportError:  # not on Windows
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def write_report(results: dict, out: Path) -> list[Path]:
    """results.json, results.md and plots/ under ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    adoption = write_adoption_plot(results, out / "plots")
    plots = write_plots(results, out / "plots")
    markdown = render_markdown(results, adoption_plot=f"plots/{adoption.name}" if adoption else None)
    if plots:
        markdown += "\n## Plots\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots) + "\n"
    elif _version("matplotlib", "matplotlib") is None:
        markdown += "\nNo plots: matplotlib is not installed (pip install matplotlib).\n"
    (out / "results.md").write_text(markdown)
    return [out / "results.json", out / "results.md", *([adoption] if adoption else []), *plots]


def _command_line(args: argparse.Namespace, device: str, mode: str) -> str:
    """The run as a command that repeats it (for the report)."""
    parts = ["fastlatent", "bench", f"--{mode}", "--device", device]
    parts += [f"--filter={p}" for p in args.filter or []] + [f"--exclude={p}" for p in args.exclude or []]
    if args.compile_budget != 300.0:
        parts += ["--compile-budget", f"{args.compile_budget:g}"]
    return shlex.join(parts + ["--out", str(args.out)])


def run_bench(args: argparse.Namespace) -> int:
    """The ``fastlatent bench`` command (arguments from :func:`add_bench_parser`)."""
    try:
        out = Path(args.out)
        if args.from_json:
            results = json.loads(Path(args.from_json).read_text())
            if results.get("schema") != SCHEMA:
                raise BenchError(
                    f"fastlatent bench: --from-json expects a {SCHEMA} results.json, "
                    f"got schema {results.get('schema')!r}"
                )
            files = write_report(results, out)
            print(f"wrote {', '.join(str(f) for f in files[:2])} and {len(files) - 2} plots")
            return 0
        if args.compile_budget <= 0:
            raise BenchError(
                f"fastlatent bench: --compile-budget must be positive seconds, got {args.compile_budget}"
            )
        _require_runner()
        suites = locate_suites(args.suites)
        device = resolve_device(args.device)
    except BenchError as exc:
        print(exc, file=sys.stderr)
        return 2
    mode = "full" if args.full else "quick"
    include, exclude = split_patterns(args.filter), split_patterns(args.exclude)
    out.mkdir(parents=True, exist_ok=True)
    record, benchmark_json = out / "records.json", out / "pytest-benchmark.json"
    for stale in (record, benchmark_json):
        stale.unlink(missing_ok=True)
    cmd = pytest_command(
        suites,
        device=device,
        full=args.full,
        include=include,
        exclude=exclude,
        record=record,
        benchmark_json=benchmark_json,
        compile_budget_s=args.compile_budget,
        collect_only=args.list,
    )
    if args.list:
        status = _stream(cmd, None, echo_all=args.verbose)
        return 0 if status in (0, 5) else status
    meta = run_metadata(device, mode, _command_line(args, device, mode), suites)
    print(
        f"fastlatent bench: {mode} run on {meta['device']['name']}, suites in {suites}; "
        f"log in {out / 'pytest.log'}",
        flush=True,
    )
    start, cpu_start = time.perf_counter(), _children_cpu_s()
    status = _stream(cmd, out / "pytest.log", echo_all=args.verbose)
    meta["wall_s"] = time.perf_counter() - start
    meta["cpu_s"] = (
        _children_cpu_s() - cpu_start
    )  # CPU time of the run: wall time on a loaded machine misleads
    if status == 5:
        print(
            "fastlatent bench: no case matched the selection "
            f"(device {device}, {mode}, filter {include or '-'}, exclude {exclude or '-'}); "
            "`fastlatent bench --list` shows the cases",
            file=sys.stderr,
        )
        return 2
    if not record.exists() or not json.loads(record.read_text())["records"]:
        print(
            f"fastlatent bench: the suites did not run (pytest exit status {status}); "
            f"see {out / 'pytest.log'}:",
            file=sys.stderr,
        )
        print("".join((out / "pytest.log").read_text().splitlines(keepends=True)[-30:]), file=sys.stderr)
        return 1
    recorded = json.loads(record.read_text())
    if not recorded["finished"]:
        meta["incomplete"] = (
            f"the run stopped after {len(recorded['records'])} of {recorded['planned']} cases "
            f"(pytest exit status {status})"
        )
        print(f"fastlatent bench: {meta['incomplete']}; reporting what was measured", file=sys.stderr)
    results = build_results(recorded["records"], meta)
    files = write_report(results, out)
    statuses = [r["status"] for c in results["cases"] for r in c["providers"].values()]
    failed = statuses.count("failed") + sum(u["outcome"] == "failed" for u in results["unattributed"])
    print(
        f"fastlatent bench: {len(results['cases'])} cases, {statuses.count('ok')} measured, "
        f"{statuses.count('skipped')} skipped, {failed} failed in {meta['wall_s']:.0f} s; "
        f"wrote {files[0]}, {files[1]} and {len(files) - 2} plots"
    )
    return 1 if failed or status != 0 else 0


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` command to the ``fastlatent`` command's subparsers."""
    parser = subparsers.add_parser(
        "bench",
        help="time every op and model side by side with PyTorch and the libraries people use",
        description="Runs the benchmark suites (the repository's benchmarks/bench_*.py) in one child "
        "process, "
        "every provider of a case side by side, and writes results.json, results.md and plots.",
        epilog="Examples: fastlatent bench --quick --out bench-cpu;  fastlatent bench --filter nearest_code "
        "--exclude compiled;  fastlatent bench --from-json bench-cpu/results.json --out bench-cpu",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="the representative shapes (the default; a few minutes on a 2-core CPU)",
    )
    size.add_argument("--full", action="store_true", help="also the large shapes and the scaling sweeps")
    parser.add_argument(
        "--filter",
        action="append",
        metavar="PATTERN",
        help="run only cases whose id (area/test[params], see --list) contains PATTERN "
        "(case-insensitive; * and ? glob); repeat or comma-separate to run several",
    )
    parser.add_argument(
        "--exclude", action="append", metavar="PATTERN", help="leave out cases matching PATTERN"
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="the device whose cases run (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--out",
        default="fastlatent-bench",
        metavar="DIR",
        help="folder for results.json, results.md and plots/ (default: ./fastlatent-bench)",
    )
    parser.add_argument(
        "--suites",
        default=None,
        metavar="DIR",
        help=f"the benchmarks folder (default: found next to the package; or ${SUITES_ENV})",
    )
    parser.add_argument(
        "--compile-budget",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="longest torch.compile of one case before that provider is skipped (default 300)",
    )
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    parser.add_argument(
        "--from-json",
        metavar="FILE",
        help="only render results.md and plots from an existing results.json into --out",
    )
    parser.add_argument("--verbose", action="store_true", help="show pytest's whole output")
    parser.set_defaults(func=run_bench)
    return parser
