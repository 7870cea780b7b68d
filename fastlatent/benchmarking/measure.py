"""Timing, peak memory and hardware peaks, shared by the benchmark suites.

The suites (``benchmarks/bench_*.py``) describe a case and hand its callable to :class:`Bench`,
which times it through pytest-benchmark, probes its peak memory once, and derives throughput and
the fraction of the device's peak. What it measures travels in the test report's
``user_properties`` (for ``fastlatent bench``) and in pytest-benchmark's ``extra_info`` (for its
own JSON), so a suite works the same under both.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import platform
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch._C._profiler import _EventType

CASE_KEY = "fastlatent_case"  # user_properties key: what the case is (set before any skip)
RESULT_KEY = "fastlatent_result"  # user_properties key: what was measured


# ------------------------------------------------------------------------------------ devices


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


@dataclass
class DevicePeak:
    """The hardware limits a measurement is compared with.

    Attributes:
        bandwidth: memory bandwidth in bytes/s (None where unknown, e.g. on the CPU).
        flops: dense matmul peak in FLOP/s per dtype name ("bf16", "fp16", "tf32", "fp32").
        source: where the figures come from (spec sheet entry or derived from device properties).
    """

    bandwidth: float | None = None
    flops: dict[str, float] = field(default_factory=dict)
    source: str = "unknown"


# Spec-sheet figures (dense, no sparsity) by a substring of torch.cuda.get_device_name; first match wins.
_GPU_SPECS = [
    ("H200", 4.8e12, {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("H100 PCIe", 2.0e12, {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", 3.9e12, {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100", 3.35e12, {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("A100-SXM4-80GB", 2.039e12, {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("A100 80GB PCIe", 1.935e12, {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("A100", 1.555e12, {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", 0.864e12, {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L4", 0.3e12, {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30e12}),
    ("RTX 4090", 1.008e12, {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
]


def device_peak(device: torch.device | str) -> DevicePeak:
    """Peak memory bandwidth and matmul throughput of ``device`` (CPU: unknown, left None)."""
    device = torch.device(device)
    if device.type != "cuda":
        return DevicePeak(source="no reliable peak for CPUs; absolute GB/s and GFLOP/s are reported")
    name = torch.cuda.get_device_name(device)
    for key, bandwidth, flops in _GPU_SPECS:
        if key in name:
            return DevicePeak(bandwidth, dict(flops), f"spec sheet ({key})")
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:  # double data rate: two transfers per clock
        return DevicePeak(
            2 * clock_khz * 1e3 * bus_bits / 8, {}, "memory clock x bus width (device properties)"
        )
    return DevicePeak(source=f"unknown GPU {name!r}")


def dtype_key(dtype: torch.dtype | None) -> str | None:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype)


# ------------------------------------------------------------------------------------ memory


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_vm_hwm() -> bool:
    """Reset the resident-set high-water mark (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _no_gc():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_libc = None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS so the next call's pages count as new."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def torch_alloc_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the bytes torch allocated on the CPU during ``fn()`` and had not yet freed.

    Uses the profiler's allocation records, each of which carries the allocator's running total at
    that instant, so temporaries freed inside an op are counted (the per-op memory columns of
    ``torch.profiler`` report net amounts and miss them).
    """
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    return peak


def net_alloc_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak, during ``fn()``, of the bytes allocated through torch's CPU allocator minus those freed since the
    call began (the running sum of the profiler's ``[memory]`` events in time order): what the call needs on
    top of what existed before it."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Memory one call of ``fn`` needs on top of what existed before it.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the call. CPU: the rise of
    the process's resident high-water mark (every allocation, torch's or not: kernel scratch
    buffers, FAISS, NumPy), page-granular, after returning freed heap memory to the OS; where
    /proc/self/clear_refs cannot be written, torch's own allocations from the profiler.

    Returns:
        ``{"peak_mem_bytes": ..., "mem_probe": "<how it was measured>"}``.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return {
            "peak_mem_bytes": torch.cuda.max_memory_allocated(device) - before,
            "mem_probe": "cuda max_memory_allocated above the allocation before the call",
        }
    with _no_gc():
        _malloc_trim()
        if _reset_vm_hwm() and (before := _vm_hwm_bytes()) is not None:
            fn()
            return {
                "peak_mem_bytes": max(0, _vm_hwm_bytes() - before),
                "mem_probe": "rise of the resident-set high-water mark (all allocations)",
            }
    try:
        return {
            "peak_mem_bytes": torch_alloc_peak_bytes(fn),
            "mem_probe": "torch allocations (profiler allocation records)",
        }
    except Exception as exc:  # the profiler's internals differ across torch versions
        return {"mem_probe": f"unavailable ({type(exc).__name__}: {exc})"}


# ------------------------------------------------------------------------------------ compile


class CompileTimeout(BaseException):
    """Raised inside torch.compile when it runs past its budget.

    A BaseException so that dynamo's ``except Exception`` handlers let it through.
    """


@contextlib.contextmanager
def _deadline(seconds: float | None):
    if (
        not seconds
        or threading.current_thread() is not threading.main_thread()
        or not hasattr(signal, "setitimer")
    ):
        yield
        return

    def on_alarm(signum, frame):
        raise CompileTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class CompileSkipped(Exception):
    """torch.compile failed or ran past its budget; ``str(self)`` is the reason to report."""


def compile_once(
    fn: Callable, warm: Callable[[Callable], Any], budget_s: float | None
) -> tuple[Callable, dict]:
    """``torch.compile(fn)`` compiled for one case, outside any timing.

    Dynamo's caches are reset first: they live on the function's code object and are shared by every
    ``torch.compile`` of the same function, so without a reset earlier cases' graphs (and the
    recompile limit, past which dynamo silently runs eagerly) would leak into this one.

    Args:
        fn: the function to compile (the eager reference of the case).
        warm: called once with the compiled function to trigger compilation on the case's inputs.
        budget_s: seconds compilation may take before it is abandoned (None: no limit).

    Returns:
        The compiled function and ``{"compile_s": ..., "graph_breaks": ...}``.

    Raises:
        CompileSkipped: compilation failed or took longer than ``budget_s``.
    """
    # torch._dynamo (the compiler stack) is slow to import: only benchmarks that compile load it
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, dynamic=False)
    start = time.perf_counter()
    try:
        with _deadline(budget_s):
            warm(compiled)
    except CompileTimeout:
        torch._dynamo.reset()
        raise CompileSkipped(
            f"torch.compile took longer than {budget_s:g} s on this machine (raise it with --compile-budget)"
        ) from None
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CompileSkipped(f"torch.compile failed: {type(exc).__name__}: {first_line}") from exc
    info = {
        "compile_s": time.perf_counter() - start,
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }
    return compiled, info


# ------------------------------------------------------------------------------------ timing


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` wrapped so that each call includes waiting for the GPU."""
    if device.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def cuda_event_seconds(
    fn: Callable[[], Any], device: torch.device, min_batch_s: float = 2e-3, batches: int = 5
) -> float:
    """Device time per call of back-to-back launches (no host sync in between): min over batches."""
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    single = max(start.elapsed_time(end) / 1e3, 1e-6)
    reps = max(1, min(1000, math.ceil(min_batch_s / single)))
    best = float("inf")
    for _ in range(batches):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / reps)
    return best


def choose_rounds(
    seconds_per_call: float, target_s: float, min_rounds: int = 3, max_rounds: int = 200
) -> int:
    """Rounds so that timing takes about ``target_s``, within [min_rounds, max_rounds]."""
    if seconds_per_call <= 0:
        return max_rounds
    return int(max(min_rounds, min(max_rounds, math.ceil(target_s / seconds_per_call))))


class Bench:
    """One benchmark case of one provider: describe it, optionally compile, then run it.

    Created by the ``bench`` fixture of ``benchmarks/conftest.py`` around pytest-benchmark's
    ``benchmark`` fixture::

        def test_op(bench, provider):
            bench.describe(op="fsq", case="B16 N1024 [8,5,5,5]", provider=provider, device=dev,
                           dtype=torch.float32, sizes={"n": 16384})
            fn = ...                         # may call pytest.skip (a missing peer)
            bench.run(fn, bytes_moved=...)

    Args:
        benchmark: pytest-benchmark's fixture.
        node: the pytest item (its ``user_properties`` carry the description and the result).
        full: whether this is a ``--full`` run (longer timing targets).
        compile_budget_s: seconds ``compile`` may spend before the provider is skipped.
    """

    def __init__(self, benchmark, node, full: bool = False, compile_budget_s: float | None = 300.0):
        self.benchmark = benchmark
        self.node = node
        self.full = full
        self.compile_budget_s = compile_budget_s
        self.case: dict[str, Any] = {}
        self.device = torch.device("cpu")
        self.dtype: torch.dtype | None = None
        self._extra: dict[str, Any] = {}

    def describe(
        self,
        *,
        op: str,
        case: str,
        provider: str,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        sizes: dict[str, int] | None = None,
        **extra,
    ) -> None:
        """Name the case (before anything that may skip, so skips are reported against it).

        Args:
            op: the operation or model, e.g. "nearest_code", "group_norm+silu", "SD-VAE decode".
            case: the workload within the op, e.g. "N=16384 D=64 K=1024".
            provider: who runs it: "fastlatent", "reference", "reference_compiled", or a peer.
            device: where it runs.
            dtype: the main input dtype.
            sizes: named sizes that scaling plots may sweep over (n, k, d, resolution, batch, ...).
            **extra: anything else worth keeping with the result (JSON values).
        """
        self.device, self.dtype = torch.device(device), dtype
        module = getattr(self.node, "module", None)
        area = getattr(module, "BENCH_AREA", None) or (
            module.__name__.removeprefix("bench_") if module else ""
        )
        self.case = {
            "area": area,
            "op": op,
            "case": case,
            "provider": provider,
            "device": self.device.type,
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
            "sizes": dict(sizes or {}),
            **extra,
        }
        self.node.user_properties.append((CASE_KEY, self.case))
        self.benchmark.group = f"{op} {self.device.type} {self.case['dtype'] or ''} {case}".replace("  ", " ")
        self.benchmark.extra_info.update(
            {**self.case, "device_name": device_name(self.device), "torch": torch.__version__}
        )

    def note(self, **extra) -> None:
        """Attach facts (JSON values) to the result, e.g. an accuracy check or a footprint."""
        self._extra.update(extra)

    def compile(self, fn: Callable, warm: Callable[[Callable], Any]) -> Callable:
        """``torch.compile(fn)`` for this case, compiled by ``warm(compiled)`` before timing.

        Skips the provider (with the reason) when compilation fails or exceeds the budget.
        """
        import pytest  # optional: only benchmark cases run under pytest call this

        try:
            compiled, info = compile_once(fn, warm, self.compile_budget_s)
        except CompileSkipped as exc:
            pytest.skip(str(exc))
        self._extra.update(info)
        return compiled

    def run(
        self,
        fn: Callable[[], Any],
        *,
        bytes_moved: int | None = None,
        flops: int | None = None,
        rounds: int | None = None,
        warmup: int = 1,
        target_s: float | None = None,
        memory: bool = True,
    ) -> dict[str, Any]:
        """Time ``fn`` (already checked for correctness by the caller), probe its memory, record.

        Args:
            fn: the call to time; must synchronise nothing itself (this adds the GPU sync).
            bytes_moved: the least memory traffic any implementation needs (for GB/s and % of peak).
            flops: the floating-point operations of one call (for GFLOP/s and % of matmul peak).
            rounds: timed calls; by default chosen so timing takes ``target_s``.
            warmup: untimed calls first (first touches, caches, lazy initialisation).
            target_s: seconds of timed calls when ``rounds`` is not given (default 0.3, --full: 2);
                the last warm-up call's time sets the number of rounds.
            memory: probe the peak memory of one extra call.

        Returns:
            The result dict (also stored in the report and pytest-benchmark's extra_info).
        """
        if not self.case:
            raise RuntimeError("Bench.run: call describe(...) first")
        device = self.device
        call = synced(fn, device)
        one = None
        for _ in range(max(warmup, 0)):
            start = time.perf_counter()
            call()
            one = time.perf_counter() - start
        if rounds is None:
            if one is None:
                start = time.perf_counter()
                call()
                one = time.perf_counter() - start
            target = target_s if target_s is not None else (2.0 if self.full else 0.3)
            rounds = choose_rounds(one, target)
        self.benchmark.pedantic(call, rounds=rounds, warmup_rounds=0, iterations=1)
        stats = self.benchmark.stats.stats
        result: dict[str, Any] = {
            "min_s": stats.min,
            "median_s": stats.median,
            "mean_s": stats.mean,
            "stddev_s": stats.stddev,
            "rounds": stats.rounds,
            "timer": "wall clock",
        }
        seconds = stats.min
        if device.type == "cuda":
            result["wall_min_s"] = stats.min
            seconds = result["min_s"] = cuda_event_seconds(fn, device)
            result["timer"] = "CUDA events, back-to-back calls"
        peak = device_peak(device)
        if bytes_moved:
            result["bytes_moved"] = int(bytes_moved)
            result["gb_per_s"] = bytes_moved / seconds / 1e9
            if peak.bandwidth:
                result["fraction_of_peak_bandwidth"] = bytes_moved / seconds / peak.bandwidth
        if flops:
            result["flops"] = int(flops)
            result["gflop_per_s"] = flops / seconds / 1e9
            key = dtype_key(self.dtype)
            if key == "fp32" and torch.backends.cuda.matmul.allow_tf32:
                key = "tf32"
            if key in peak.flops:
                result["fraction_of_peak_flops"] = flops / seconds / peak.flops[key]
        if memory:
            result.update(peak_memory(fn, device))
        result.update(self._extra)
        self.node.user_properties.append((RESULT_KEY, result))
        self.benchmark.extra_info.update(result)
        return result
