#!/usr/bin/env python3
"""fastlatent's static performance model: what the compiled CUDA kernels will cost on an H100.

Compiles every ``csrc/kernels/*.cu`` for sm_90 with the build's nvcc flags (``-O3 -std=c++17``; the kernel
sources are torch-free, so no torch is needed) and reads, per kernel instantiation:

* from ``ptxas -v``: registers, spill stores/loads, stack frame, static shared memory;
* from the launchers (the ``LAUNCH`` table below): threads per block and dynamic shared memory, giving the
  theoretical occupancy on an H100 (65,536 registers, 228 KB shared memory, 2,048 threads, 32 blocks per SM);
* from the SASS (``cuobjdump -sass``): the kernel's main loop and its instructions per 16-byte vector.

Main loop and instructions per 16-byte vector (the bandwidth kernels' budget metric):

* A loop is a backward branch ``BRA target`` with ``target <= address``; its body is [target, branch]. Only
  innermost loops are candidates; the main loop is the candidate that moves the most global-memory bytes
  (``LDG``/``STG``/``RED``/``ATOM`` widths summed over the body), the longer body on a tie.
* ``path`` instructions per iteration (the budget metric): the shortest path from the loop head to its back
  edge (forward edges only), each ``CALL`` counted with its subroutine (nvcc calls one for 64-bit division and
  modulo when an operand exceeds 32 bits). It is what an iteration executes when every data-dependent branch
  takes its cheap side (64-bit division's 32-bit fast path, the cheaper layout), and feeds the predictions.
* ``static`` instructions per iteration: every instruction of the body once (both sides of each branch) plus
  the called subroutines: an upper bound, reported alongside. NOPs never count.
* A 16-byte vector is 16 bytes of the kernel's streamed output (the bytes its global stores write per
  iteration), or of its input where the loop stores nothing (reductions). For a kernel that moves one
  ``uint4`` per iteration that is one vector per iteration, so the metric is simply instructions per
  iteration; a scalar loop over bf16 elements moves 2 bytes per iteration and pays 8 iterations per vector.

Why per 16-byte vector: an H100 SXM issues at most 4 warp-instructions per SM per clock, 132 SMs at about
1.755 GHz sustained: 9.3e11 warp-instructions/s. Moving HBM data at 3.0 TB/s is 5.9e9 warp-wide 16-byte
vectors per second (512 bytes each), so a streaming kernel has about 158 instruction issues per 16-byte
vector before issue, not memory, limits it, and fewer in practice (dependent latency, several loads per
vector, other warps' work). The budget (<= 40 for the GroupNorm apply pass, issue 21) keeps a 4x margin.

Outputs: ``benchmarks/perf_model_static.json`` (machine-readable, per kernel and per workload), the
generated sections of ``docs/performance-model.md`` (between ``<!-- perf_model:... -->`` markers), and
``--check``: fails when a hot kernel spills or a bandwidth kernel exceeds its instruction budget, except for
the named known violations in ``KNOWN_VIOLATIONS`` (reported, not failed; delete an entry when it is fixed).

Usage::

    python scripts/perf_model.py                 # compile (cached), print the table
    python scripts/perf_model.py --check         # the CI budget check (exit 1 on a new violation)
    python scripts/perf_model.py --write         # regenerate the JSON and the doc's generated sections
    python scripts/perf_model.py --compare results.json   # measured (fastlatent bench) vs predicted

Every number this script writes is a prediction from static data, not a measurement.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "csrc" / "kernels"
JSON_PATH = ROOT / "benchmarks" / "perf_model_static.json"
DOC_PATH = ROOT / "docs" / "performance-model.md"
DEFAULT_CACHE = ROOT / "build" / "perf-model"
ARCH = "sm_90"
# The build's device flags (setup.py: -O3 -std=c++17 -lineinfo) for one architecture; -lineinfo does not
# change code generation, so it is left out.
NVCC_FLAGS = ["-O3", "-std=c++17", f"-arch={ARCH}", "-cubin", "-Xptxas", "-v"]


# ----------------------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Gpu:
    name: str = "H100 SXM"
    hbm_bytes_per_s: float = 3.35e12
    bf16_flops: float = 989e12  # dense tensor-core peak
    tf32_flops: float = 495e12
    fp32_flops: float = 67e12
    hbm_efficiency: float = 0.90  # achievable fraction (TARGETS.md: best bandwidth kernels ~3.0 TB/s)
    tensor_efficiency: float = 0.80  # achievable fraction (cuBLAS ~790-800 TFLOP/s at 4096^3-8192^3)
    sms: int = 132
    clock_hz: float = 1.755e9  # sustained under load (boost is 1.98 GHz)
    issue_per_sm_clock: int = 4  # warp-instructions (4 schedulers)
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    smem_reserved_per_block: int = 1024
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    launch_s: float = 2.5e-6  # back-to-back kernel launch on one stream (eager PyTorch ~4-6 us/op)

    @property
    def warp_issue_per_s(self) -> float:
        return self.sms * self.issue_per_sm_clock * self.clock_hz


H100 = Gpu()


def occupancy(regs: int, smem_bytes: int, threads: int, gpu: Gpu = H100) -> dict:
    """Resident blocks and warps per SM and the limiting resource (the occupancy calculator's sm_90 rules)."""
    warps = max(1, math.ceil(threads / 32))
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256  # allocated per warp, 256-register units
    limits = {
        "threads": gpu.threads_per_sm // (warps * 32),
        "blocks": gpu.blocks_per_sm,
        "registers": gpu.regs_per_sm // (regs_per_warp * warps),
        "shared memory": gpu.smem_per_sm // (smem_bytes + gpu.smem_reserved_per_block),
    }
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "threads"))
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "occupancy": blocks * warps / (gpu.threads_per_sm // 32),
        "limiter": limiter,
    }


# ------------------------------------------------------------------------------------------- launch table


@dataclass(frozen=True)
class Launch:
    threads: int
    dynamic_smem: int = 0
    note: str = ""


# Threads per block and dynamic shared memory, as the launchers in csrc/kernels/*_cuda.cu pass them
# (fnmatch patterns over "<unit>/<kernel>"; the first match wins; default 256 threads, no dynamic smem).
LAUNCH = [
    # any cin: two halo copies 28,928 B + two weight stages (17,408 B wide, 5,120 B narrow) + one chunk's
    # mean/scale/shift 384 B
    ("group_norm_conv/group_norm_conv3x3_kernel<*, 32>", Launch(256, 28928 + 5120 + 384, "any cin")),
    ("group_norm_conv/group_norm_conv3x3_kernel*", Launch(256, 28928 + 17408 + 384, "any cin")),
    ("fsq/fsq_quantize_kernel*", Launch(128)),
    ("fsq/fsq_codes_kernel*", Launch(128)),
    ("ema_update/cluster_size_kernel", Launch(1024)),
    ("sampler_step/select_kernel*", Launch(1024)),
    ("sampler_step/rescale_kernel", Launch(128)),
    ("bsq/bsq_avg_reduce_kernel", Launch(64)),
    ("code_stats/segment_sums_kernel*", Launch(256, 0, "d >= 256; 32-128 threads below")),
    # 8 samples x (4 d + nu + nl) floats; d = 18: nu = nl = 512 -> 8 * 1096 * 4
    ("lfq/lfq_entropy_backward_kernel*", Launch(256, 8 * (4 * 18 + 2 * 512) * 4, "d = 18")),
]


def launch_of(name: str) -> Launch:
    for pattern, launch in LAUNCH:
        if fnmatch.fnmatchcase(name, pattern):
            return launch
    return Launch(256)


# ------------------------------------------------------------------------------------- budgets and checks

# Kernels on a hot path: any spill fails the check (fnmatch over "<unit>/<kernel>").
HOT_KERNELS = [
    "group_norm/reduce_c*_kernel*",
    "group_norm/elementwise_kernel*",
    "group_norm/apply_kernel*",
    "group_norm/backward_apply_kernel*",
    "group_norm/group_stats_kernel",
    "group_norm_conv/group_norm_conv3x3_kernel*",
    "nearest_code/tensor_core_kernel*",
    "nearest_code/simt_kernel*",
    "nearest_code/small_d_kernel*",
    "sample_code/sample_code_kernel*",
    "fsq/fsq_quantize_kernel*",
    "fsq/fsq_backward_kernel*",
    "residual_fsq/residual_fsq_kernel*",
    "lfq/lfq_quantize_kernel*",
    "lfq/lfq_probs_partial_kernel*",
    "lfq/lfq_entropy_backward_kernel*",
    "bsq/bsq_quantize_kernel*",
    "bsq/bsq_entropy_kernel*",
    "code_stats/segment_sums_kernel*",
    "ema_update/embed_kernel*",
    "sampler_step/step_kernel*",
]

# Bandwidth kernels: fast-path SASS instructions per 16-byte vector of the main loop ("path" above) may not
# exceed the budget. One table; a kernel matching no row has no instruction budget. About 158 issues per
# vector is where an H100 stops being memory-bound (module doc); budgets keep a margin below that.
INSTRUCTION_BUDGETS = [
    # (pattern, budget, why this number)
    ("group_norm/apply_kernel<*, false>", 40, "issue 21: GroupNorm apply <= 40 per vector"),
    (
        "group_norm/apply_kernel<*, true>",
        60,
        "apply + residual: a second 16-byte load and an add per element",
    ),
    (
        "group_norm/backward_apply_kernel<*, [48]>",
        60,
        "backward apply (16-byte vectors): two loads, a few more operations per element",
    ),
    (
        "group_norm/reduce_c?_kernel<*, false, *>",
        40,
        "statistics pass: 16-byte loads, a shifted sum and square per element (no division)",
    ),
    ("fsq/fsq_backward_kernel<*, true>", 40, "elementwise: a sech^2 per element"),
    ("sampler_step/step_kernel<*, 8>", 120, "fused update, Philox noise; out and x0 stores (fp16/bf16)"),
    ("sampler_step/step_kernel<*, 4>", 120, "fused update, Philox noise; out and x0 stores (fp32)"),
    ("sampler_step/stats_kernel*", 80, "guidance-rescale sums"),
    ("ema_update/embed_kernel*", 80, "scalar elementwise over k x d"),
    ("code_stats/segment_sums_kernel*", 40, "segment sums, one load and add per element"),
]

# Today's violations, reported but not failed. Fixing one means deleting its entry (stale ones are reported).
KNOWN_VIOLATIONS = [
    # (pattern, kind "instructions" or "spill", reason)
    (
        "group_norm/backward_apply_kernel<*, silu, *, [48]>",
        "instructions",
        "known over budget (issue 21 item 1, activation math): the index math is within budget; SiLU's "
        "gradient costs about 35 instructions per element (polynomial exp, IEEE division)",
    ),
    (
        "group_norm/backward_apply_kernel<*, gelu, *, [48]>",
        "instructions",
        "known over budget (issue 21 item 1, activation math): the index math is within budget; GELU's "
        "gradient (erf and exp) costs about 65 instructions per element",
    ),
    (
        "group_norm/backward_apply_kernel<fp32, silu, cl, 4>",
        "spill",
        "known spill (issue 21 item 1, found by the static model): 4 bytes saved around the division "
        "calls of the SiLU gradient while 24 coefficients are held",
    ),
    (
        "group_norm/apply_kernel<*, silu, *>",
        "instructions",
        "known over budget (issue 21 item 1, activation math): the index math is within budget; SiLU costs "
        "about 30 instructions per element (polynomial exp, IEEE division)",
    ),
    (
        "group_norm/apply_kernel<*, gelu, *>",
        "instructions",
        "known over budget (issue 21 item 1, activation math): the index math is within budget; GELU's erf "
        "costs about 45 instructions per element (polynomial exp, IEEE division)",
    ),
    (
        "group_norm/reduce_cf_kernel<fp32, true, silu>",
        "spill",
        "known spill (issue 21 items 1-2, found by the static model): registers saved around the division "
        "calls of the backward reduction's SiLU gradient",
    ),
    (
        "fsq/fsq_backward_kernel<*, true>",
        "instructions",
        "known over budget (issue 21 item 7, found by the static model): sech^2 with an IEEE division per "
        "element and a 64-bit modulo per vector",
    ),
]


def budget_of(name: str) -> tuple[int, str] | None:
    for pattern, budget, why in INSTRUCTION_BUDGETS:
        if fnmatch.fnmatchcase(name, pattern):
            return budget, why
    return None


def is_hot(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in HOT_KERNELS)


# ------------------------------------------------------------------------------------------------ tools


class ToolMissing(RuntimeError):
    """nvcc or cuobjdump is not installed: the static model can't be built on this machine."""


def find_tools() -> dict:
    """nvcc and cuobjdump paths. cuobjdump comes with the toolkit, or with Triton's bundled CUDA tools."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for home in filter(None, homes):
            if (Path(home) / "bin" / "nvcc").exists():
                nvcc = str(Path(home) / "bin" / "nvcc")
                break
    if nvcc is None:
        raise ToolMissing("nvcc not found (neither on PATH nor in $CUDA_HOME/bin or /usr/local/cuda/bin)")
    candidates = [Path(nvcc).parent / "cuobjdump", shutil.which("cuobjdump")]
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        for loc in triton.submodule_search_locations:
            candidates.append(Path(loc) / "backends" / "nvidia" / "bin" / "cuobjdump")
    cuobjdump = next((str(c) for c in candidates if c and Path(c).exists()), None)
    if cuobjdump is None:
        raise ToolMissing("cuobjdump not found (next to nvcc, on PATH, or in Triton's bundled CUDA tools)")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    release = re.search(r"release ([\d.]+)", version)
    return {
        "nvcc": nvcc,
        "cuobjdump": cuobjdump,
        "nvcc_version": release.group(1) if release else "?",
        "nvcc_version_text": version,
    }


def kernel_units() -> list[Path]:
    return sorted(p for p in KERNEL_DIR.glob("*.cu"))


def _source_hash(tools: dict) -> str:
    digest = hashlib.sha256()
    digest.update(tools["nvcc_version_text"].encode())
    digest.update(" ".join(NVCC_FLAGS).encode())
    for path in sorted(KERNEL_DIR.iterdir()):
        if path.suffix in (".cu", ".cuh", ".h"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _compile_one(unit: Path, out_dir: Path, tools: dict) -> tuple[str, str]:
    cubin = out_dir / (unit.stem + ".cubin")
    cmd = [tools["nvcc"], *NVCC_FLAGS, f"-I{KERNEL_DIR}", str(unit), "-o", str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {unit.name}:\n{proc.stderr[-4000:]}")
    sass = subprocess.run(
        [tools["cuobjdump"], "-sass", str(cubin)], capture_output=True, text=True, check=True
    )
    (out_dir / (unit.stem + ".ptxas")).write_text(proc.stderr)
    (out_dir / (unit.stem + ".sass")).write_text(sass.stdout)
    cubin.unlink()
    return proc.stderr, sass.stdout


def compile_units(cache: Path = DEFAULT_CACHE, jobs: int | None = None, log=print) -> dict:
    """{unit stem: (ptxas log, SASS text)}, compiled once per (sources, nvcc, flags) and cached."""
    tools = find_tools()
    out_dir = cache / _source_hash(tools)
    out_dir.mkdir(parents=True, exist_ok=True)
    units = kernel_units()
    todo = [u for u in units if not (out_dir / (u.stem + ".sass")).exists()]
    if todo:
        jobs = jobs or int(os.environ.get("MAX_JOBS", "2"))
        log(
            f"perf_model: compiling {len(todo)} of {len(units)} kernel files for {ARCH} "
            f"(nvcc {tools['nvcc_version']}, {jobs} jobs) into {out_dir}"
        )
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(lambda u: _compile_one(u, out_dir, tools), todo))
    return {
        u.stem: ((out_dir / (u.stem + ".ptxas")).read_text(), (out_dir / (u.stem + ".sass")).read_text())
        for u in units
    }, tools


# ------------------------------------------------------------------------------------------------ parsing

_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict]:
    """{mangled name: {registers, stack_bytes, spill_store_bytes, spill_load_bytes, static_smem_bytes}}."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current = out.setdefault(
                m.group(1),
                {
                    "registers": 0,
                    "stack_bytes": 0,
                    "spill_store_bytes": 0,
                    "spill_load_bytes": 0,
                    "static_smem_bytes": 0,
                },
            )
            continue
        if current is None:
            continue
        m = _PTXAS_FRAME.search(line)
        if m:
            stack, stores, loads = map(int, m.groups())
            current.update(stack_bytes=stack, spill_store_bytes=stores, spill_load_bytes=loads)
        m = _PTXAS_USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            s = _PTXAS_SMEM.search(line)
            current["static_smem_bytes"] = int(s.group(1)) if s else 0
    return out


@dataclass
class Instr:
    addr: int
    pred: str
    op: str  # full opcode with modifiers, e.g. LDG.E.128.CONSTANT
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


_SASS_FUNC = re.compile(r"^\s*Function : (\S+)")
_SASS_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """{mangled name: instructions} from ``cuobjdump -sass`` output."""
    funcs: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    for line in text.splitlines():
        m = _SASS_FUNC.match(line)
        if m:
            current = funcs.setdefault(m.group(1), [])
            continue
        if current is None:
            continue
        m = _SASS_INSTR.match(line)
        if m:
            pred = (m.group(2) or "").strip()
            current.append(Instr(int(m.group(1), 16), pred, m.group(3), m.group(4).strip()))
    return funcs


_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def memory_bytes(ins: Instr) -> tuple[int, int]:
    """(global bytes loaded, global bytes stored or reduced) by one instruction."""
    if ins.base not in ("LDG", "STG", "RED", "ATOM", "ATOMG", "REDG"):
        return 0, 0
    width = 4
    for part in ins.op.split(".")[1:]:
        if part in _WIDTH:
            width = _WIDTH[part]
        elif part in ("F64", "64") or part == "E64":
            width = 8
    return (width, 0) if ins.base == "LDG" else (0, width)


def _target(ins: Instr) -> int | None:
    m = re.match(r"`?\(?(0x[0-9a-f]+)", ins.args)
    return int(m.group(1), 16) if m else None


def _subroutine_size(instrs: list[Instr], index: dict[int, int], start: int) -> int:
    """Instructions from a CALL target to its first RET (NOPs excluded)."""
    i = index.get(start)
    n = 0
    while i is not None and i < len(instrs):
        if instrs[i].base != "NOP":
            n += 1
        if instrs[i].base == "RET":
            break
        i += 1
    return n


def loop_metrics(instrs: list[Instr]) -> dict | None:
    """The main loop's static and shortest-path instruction counts and bytes per iteration (module doc)."""
    if not instrs:
        return None
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    loops = []
    for i, ins in enumerate(instrs):
        if ins.base == "BRA":
            t = _target(ins)
            if t is not None and t <= ins.addr and t in index:
                loops.append((index[t], i))
    inner = [
        (h, b) for h, b in loops if not any((h2, b2) != (h, b) and h <= h2 and b2 <= b for h2, b2 in loops)
    ]
    if not inner:
        return None

    def cost(i: int) -> int:
        ins = instrs[i]
        if ins.base == "NOP":
            return 0
        if ins.base == "CALL":
            t = _target(ins)
            return 1 + (_subroutine_size(instrs, index, t) if t is not None else 0)
        return 1

    def describe(h: int, b: int) -> dict:
        loaded = stored = 0
        for ins in instrs[h : b + 1]:
            ld, st = memory_bytes(ins)
            loaded, stored = loaded + ld, stored + st
        static = sum(cost(i) for i in range(h, b + 1))
        # shortest path head -> back edge over forward edges inside the body
        best = [math.inf] * (b - h + 1)
        best[0] = cost(h)
        for i in range(h, b + 1):
            here = best[i - h]
            if here == math.inf or i == b:
                continue
            ins = instrs[i]
            unconditional = ins.pred == "" and ins.base in ("BRA", "EXIT", "RET", "BRX", "JMP")
            succ = []
            if not unconditional:
                succ.append(i + 1)
            if ins.base == "BRA":
                t = _target(ins)
                if t is not None and t in index and h < index[t] <= b and index[t] > i:
                    succ.append(index[t])
            for j in succ:
                if j <= b:
                    best[j - h] = min(best[j - h], here + cost(j))
        path = best[-1] if best[-1] != math.inf else static
        streamed = stored if stored else loaded
        vectors = streamed / 16 if streamed else None
        calls = sum(1 for ins in instrs[h : b + 1] if ins.base == "CALL")
        return {
            "body_instructions": static,
            "path_instructions": int(path),
            "load_bytes": loaded,
            "store_bytes": stored,
            "calls": calls,
            "static_per_vector": round(static / vectors, 1) if vectors else None,
            "path_per_vector": round(path / vectors, 1) if vectors else None,
            "addresses": f"{instrs[h].addr:#x}-{instrs[b].addr:#x}",
        }

    described = [describe(h, b) for h, b in inner]
    return max(described, key=lambda d: (d["load_bytes"] + d["store_bytes"], d["body_instructions"]))


# ------------------------------------------------------------------------------------------------- names

_TYPE_NAMES = [
    ("__nv_bfloat16", "bf16"),
    ("__half", "fp16"),
    ("float", "fp32"),
    ("(Activation)0", "none"),
    ("(Activation)1", "silu"),
    ("(Activation)2", "gelu"),
    ("(Layout)0", "cf"),
    ("(Layout)1", "cl"),
]


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def short_name(demangled: str) -> str:
    """A readable kernel name: ``k<fp16, silu>`` for ``void fastlatent::(anonymous namespace)::k<__half,
    (fastlatent::Activation)1>(...)``.

    The ``fastlatent`` namespaces and the parameter list go; dtypes and activations get their short names.
    """
    s = demangled.removeprefix("void ").replace("fastlatent::(anonymous namespace)::", "")
    s = s.replace("fastlatent::", "")
    depth = 0
    for i, ch in enumerate(s):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0 and i > 0:
            s = s[:i]
            break
    for long, short in _TYPE_NAMES:
        s = s.replace(long, short)
    return s


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class KernelStatic:
    name: str  # "<unit>/<kernel<args>>"
    mangled: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    static_smem_bytes: int
    threads: int
    dynamic_smem_bytes: int
    blocks_per_sm: int
    occupancy: float
    occupancy_limiter: str
    loop: dict | None = None
    hot: bool = False
    budget: int | None = None
    notes: list[str] = field(default_factory=list)


def unit_name(stem: str) -> str:
    return stem.removesuffix("_cuda")


def static_model(compiled: dict) -> list[KernelStatic]:
    kernels = []
    for stem, (log, sass) in compiled.items():
        resources = parse_ptxas(log)
        funcs = parse_sass(sass)
        names = demangle(list(resources))
        for mangled, res in resources.items():
            demangled = names[mangled]
            if "cub::" in demangled:  # CUB's radix sort (code_stats): library code, tuned upstream
                continue
            name = f"{unit_name(stem)}/{short_name(demangled)}"
            launch = launch_of(name)
            occ = occupancy(res["registers"], res["static_smem_bytes"] + launch.dynamic_smem, launch.threads)
            budget = budget_of(name)
            kernels.append(
                KernelStatic(
                    name=name,
                    mangled=mangled,
                    **res,
                    threads=launch.threads,
                    dynamic_smem_bytes=launch.dynamic_smem,
                    blocks_per_sm=occ["blocks_per_sm"],
                    occupancy=round(occ["occupancy"], 3),
                    occupancy_limiter=occ["limiter"],
                    loop=loop_metrics(funcs.get(mangled, [])),
                    hot=is_hot(name),
                    budget=budget[0] if budget else None,
                    notes=[launch.note] if launch.note else [],
                )
            )
    return sorted(kernels, key=lambda k: k.name)


@dataclass
class CheckResult:
    failures: list[str]
    known: list[str]
    stale: list[str]


def check(kernels: list[KernelStatic]) -> CheckResult:
    """New violations fail; known ones are reported; a known entry matching no violation is stale."""
    failures, known, used = [], [], set()
    for k in kernels:
        problems = []
        if k.hot and (k.spill_store_bytes or k.spill_load_bytes):
            problems.append(
                ("spill", f"spills {k.spill_store_bytes} B stores / {k.spill_load_bytes} B loads")
            )
        if k.budget is not None:
            per_vector = (k.loop or {}).get("path_per_vector")
            if per_vector is None:
                problems.append(("instructions", "has an instruction budget but no streaming main loop"))
            elif per_vector > k.budget:
                problems.append(
                    (
                        "instructions",
                        f"{per_vector:g} SASS instructions per 16-byte vector (budget {k.budget})",
                    )
                )
        for kind, text in problems:
            entry = next(
                (
                    i
                    for i, (pattern, known_kind, _) in enumerate(KNOWN_VIOLATIONS)
                    if known_kind == kind and fnmatch.fnmatchcase(k.name, pattern)
                ),
                None,
            )
            if entry is None:
                failures.append(f"{k.name}: {text}")
            else:
                used.add(entry)
                known.append(f"{k.name}: {text} - {KNOWN_VIOLATIONS[entry][2]}")
    stale = [
        f"{pattern} ({kind}): no longer violated; delete this KNOWN_VIOLATIONS entry"
        for i, (pattern, kind, _) in enumerate(KNOWN_VIOLATIONS)
        if i not in used
    ]
    return CheckResult(failures, known, stale)


def unmatched_patterns(kernels: list[KernelStatic]) -> list[str]:
    """Table patterns matching no compiled kernel: a renamed kernel would otherwise drop out of the check."""
    names = [k.name for k in kernels]
    tables = [("HOT_KERNELS", p) for p in HOT_KERNELS] + [
        ("INSTRUCTION_BUDGETS", p) for p, _, _ in INSTRUCTION_BUDGETS
    ]
    tables += [("KNOWN_VIOLATIONS", p) for p, _, _ in KNOWN_VIOLATIONS] + [("LAUNCH", p) for p, _ in LAUNCH]
    return [f"{table}: {p}" for table, p in tables if not any(fnmatch.fnmatchcase(n, p) for n in names)]


# --------------------------------------------------------------------------------------------- predictions
#
# Every time below is a prediction for an H100 SXM from the static data above and the assumptions named here,
# never a measurement. Assumptions (one place, so the first GPU run can correct them):
ISSUE_EFFICIENCY = 0.6  # sustained fraction of the 4 warp-instructions/clock/SM in integer-heavy loops
WMMA_EFFICIENCY = 0.35  # legacy WMMA (mma.sync 16x16x16), no A-operand pipelining, 1-2 blocks/SM
WMMA_FIXED_EFFICIENCY = 0.60  # the same kernels pipelined, spill-free, register epilogue (no wgmma)
WMMA_PIPELINED_EFFICIENCY = 0.45  # nearest_code today: cp.async double-buffered, 2 blocks/SM, smem epilogue
TC_EPILOGUE_ISSUES_PER_KEY = 8  # nearest_code tensor-core epilogue, from its SASS (was ~21)
LFQ_FORWARD_OVERHEAD = 1.7  # LFQ avg_probs: issued instructions per useful FMA (was ~10)
CUDNN_EFFICIENCY = 0.60  # cuDNN/cuBLAS implicit-GEMM 3x3 convolution, bf16, batch 1 (NCHW adds transposes)
EAGER_OP_S = 5e-6  # host time per eager PyTorch op: a floor on small eager workloads
MERGE_S = 150e-9  # one serial fp64 Welford merge (two dependent divisions; issue 21 item 2)
HOST_STEP_S = 15e-6  # host time of one fastlatent sampler step (Python + one op dispatch)
L2_BYTES_PER_S = 10e12  # H100 L2 read bandwidth, for kernels that re-read a cached matrix


def hbm_s(nbytes: float, gpu: Gpu = H100) -> float:
    """Time to move ``nbytes`` at the achievable HBM bandwidth."""
    return nbytes / (gpu.hbm_bytes_per_s * gpu.hbm_efficiency)


def issue_s(vectors: float, per_vector: float, gpu: Gpu = H100) -> float:
    """Time to issue ``per_vector`` instructions for each of ``vectors`` 16-byte vectors (32 per warp)."""
    return vectors * per_vector / 32 / (gpu.warp_issue_per_s * ISSUE_EFFICIENCY)


def mma_s(flops: float, efficiency: float, peak: float = H100.bf16_flops) -> float:
    return flops / (peak * efficiency)


@dataclass
class Prediction:
    id: str
    kernels: str
    workload: str
    dtype: str
    bytes_formula: str
    bytes: float
    flops_formula: str
    flops: float
    limiter: str
    predicted_s: float
    why: str
    after_fix_s: float
    after_fix: str
    peers: dict  # provider -> {"s": seconds, "model": text}
    bench: dict | None = None  # {"op", "case", "dtype"} of the `fastlatent bench` case that measures it
    table: str = "main"  # the doc table it is listed in: "main" or a sweep's name
    ideal_s: float = 0.0
    achievable_s: float = 0.0

    def finish(self, gpu: Gpu = H100, peak: float | None = None) -> "Prediction":
        peak = peak or gpu.bf16_flops
        self.ideal_s = max(self.bytes / gpu.hbm_bytes_per_s, self.flops / peak)
        self.achievable_s = max(hbm_s(self.bytes, gpu), self.flops / (peak * gpu.tensor_efficiency))
        return self


def _per_vector(kernels: dict[str, KernelStatic], name: str, default: float) -> float:
    k = kernels.get(name)
    value = (k.loop or {}).get("path_per_vector") if k else None
    return value if value else default


def _sd_decoder_layers(resolution: int, channels=(128, 256, 512, 512), layers=2):
    """SD-VAE / FLUX.1-VAE decoder at ``resolution``: (convs [(cin, cout, k, side)], norms [(c, side)],
    attention (tokens, c)). Upsample convs run at the upsampled side."""
    side = resolution // 2 ** (len(channels) - 1)
    prev = channels[-1]
    convs, norms = [(16, prev, 3, side)], []

    def resnet(cin, cout, s):
        norms.extend([(cin, s), (cout, s)])
        convs.extend([(cin, cout, 3, s), (cout, cout, 3, s)] + ([(cin, cout, 1, s)] if cin != cout else []))

    resnet(prev, prev, side)
    norms.append((prev, side))  # attention's GroupNorm
    convs.extend([(prev, prev, 1, side)] * 4)  # q, k, v, out projections
    attention = (side * side, prev)
    resnet(prev, prev, side)
    for level, width in enumerate(reversed(channels)):
        for _ in range(layers + 1):
            resnet(prev, width, side)
            prev = width
        if level < len(channels) - 1:
            side *= 2
            convs.append((prev, prev, 3, side))  # nearest-x2 upsample, then a 3x3 conv
    norms.append((prev, side))
    convs.append((prev, 3, 3, side))
    return convs, norms, attention


DTYPE_NAMES = {2: ("bf16", "bfloat16"), 4: ("fp32", "float32")}
GN_BACKWARD_MERGE_S = 10e-9  # one dependent fp64 multiply-add of the backward's per-group merge


def _gn_silu_time(kernels, n, c, hw, elem, *, fixed=False, layout="cf", backward=False):
    """fastlatent group_norm(+silu): statistics pass, serial merge, apply pass (and the backward's three).

    Returns (seconds, parts): parts names the per-pass times and the instructions per 16-byte vector used.
    """
    e = n * c * hw
    dt = DTYPE_NAMES[elem][0]
    budget = {"red": 40, "app": 40, "red_b": 60, "app_b": 60}
    pv = {
        "red": _per_vector(kernels, f"group_norm/reduce_{layout}_kernel<{dt}, false, silu>", 40),
        "app": _per_vector(kernels, f"group_norm/apply_kernel<{dt}, silu, {layout}, false>", 40),
        "red_b": _per_vector(kernels, f"group_norm/reduce_{layout}_kernel<{dt}, true, silu>", 60),
        "app_b": _per_vector(
            kernels, f"group_norm/backward_apply_kernel<{dt}, silu, {layout}, {16 // elem}>", 60
        ),
    }
    if fixed:
        pv = {key: min(value, budget[key]) for key, value in pv.items()}
    vectors = e * elem / 16
    splits = math.ceil(hw / (4096 if layout == "cf" else 512))
    parts = {
        "reduce": max(hbm_s(e * elem), issue_s(vectors, pv["red"])),
        "merge": 5e-6 if fixed else (c // 32) * splits * MERGE_S,
        "apply": max(hbm_s(2 * e * elem), issue_s(vectors, pv["app"])),
    }
    launches = 4
    if backward:
        parts["reduce_bwd"] = max(hbm_s(2 * e * elem), issue_s(2 * vectors, pv["red_b"]))
        parts["merge_bwd"] = 5e-6 if fixed else (c // 32) * splits * GN_BACKWARD_MERGE_S
        parts["apply_bwd"] = max(hbm_s(3 * e * elem), issue_s(vectors, pv["app_b"]))
        launches += 4
    return sum(parts.values()) + launches * H100.launch_s, {**parts, "per_vector": pv}


def _eager_gn_silu_time(n, c, hw, elem, groups=32, *, layout="cf", backward=False):
    """PyTorch eager F.silu(F.group_norm(x)): moments with n * groups blocks, the affine pass, then SiLU.

    Channels-last input is copied to a contiguous tensor first; the backward runs SiLU's backward (3E) and
    GroupNorm's (per-channel sums 2E, then dx 3E).
    """
    e = n * c * hw
    fill = min(1.0, 2 * n * groups / H100.sms)  # one block per (n, g); a lone block pulls ~2 SMs' share
    gpu = hbm_s(e * elem) / fill + hbm_s(2 * e * elem) + hbm_s(2 * e * elem)
    ops = 2
    if layout == "cl":
        gpu, ops = gpu + hbm_s(2 * e * elem), ops + 1
    if backward:
        gpu, ops = gpu + hbm_s(8 * e * elem), ops + 4
    return max(gpu, ops * EAGER_OP_S)


def _compiled_gn_silu_time(n, c, hw, elem, *, backward=False):
    """torch.compile: a (split) reduction, then one fused normalise+SiLU pass; backward: sums, then dx."""
    e = n * c * hw
    t = hbm_s(3 * e * elem) / 0.95 + 3 * H100.launch_s
    if backward:
        t += hbm_s(5 * e * elem) / 0.95 + 3 * H100.launch_s
    return t


def _sd_decoder_norm_shapes(resolution: int) -> list[tuple[int, int]]:
    """The distinct (C, side) GroupNorm inputs of the SD-VAE decoder, largest first (the bench's cases)."""
    _, norms, _ = _sd_decoder_layers(resolution)
    return sorted(set(norms), key=lambda cs: -(cs[0] * cs[1] ** 2))


def _group_norm_rows(kernels) -> list["Prediction"]:
    cases = [
        (16, 512, 128, "16x512x128x128 (target)", layout, direction)
        for layout in ("cf", "cl")
        for direction in ("fwd", "fwd_bwd")
    ]
    cases += [
        (1, c, side, f"SD-VAE decoder {r}px {c}x{side}x{side}", "cf", direction)
        for r in (512, 1024)
        for c, side in _sd_decoder_norm_shapes(r)
        for direction in ("fwd", "fwd_bwd")
    ]
    headline = {
        ("16x512x128x128 (target)", "cf", "fwd"),
        ("SD-VAE decoder 1024px 512x128x128", "cf", "fwd"),
        ("SD-VAE decoder 1024px 128x1024x1024", "cf", "fwd"),
    }
    rows = []
    for n, c, side, label, layout, direction in cases:
        for elem in (2, 4):
            dt, torch_dt = DTYPE_NAMES[elem]
            hw, e, backward = side * side, n * c * side * side, direction == "fwd_bwd"
            now, parts = _gn_silu_time(kernels, n, c, hw, elem, layout=layout, backward=backward)
            after, _ = _gn_silu_time(kernels, n, c, hw, elem, layout=layout, backward=backward, fixed=True)
            moved = (5 if backward else 2) * e * elem
            pv = parts["per_vector"]
            why = (
                f"apply {pv['app']:g} instr/16 B ({parts['apply'] * 1e3:.3f} ms, issue 21 item 1); "
                "statistics "
                f"{pv['red']:g} instr/16 B ({parts['reduce'] * 1e3:.3f} ms); serial merge "
                f"{parts['merge'] * 1e6:.0f} us (item 2)"
            )
            if backward:
                why += (
                    f"; backward reduction {pv['red_b']:g} and apply {pv['app_b']:g} instr/16 B "
                    f"({(parts['reduce_bwd'] + parts['apply_bwd']) * 1e3:.3f} ms)"
                )
            layout_name = "nchw" if layout == "cf" else "channels_last"
            op = "group_norm+silu " + ("fwd+bwd" if backward else "fwd")
            rows.append(
                Prediction(
                    id=re.sub(
                        r"[^a-z0-9]+", "_", f"group_norm_silu {direction} {label} {layout_name} {dt}".lower()
                    ),
                    workload=f"{n}x{c}x{side}x{side} {layout_name} {direction}",
                    dtype=dt,
                    kernels=f"group_norm: reduce_{layout}, group_stats, affine, apply (vectorised)"
                    + ("; backward: affine, reduce, grad_merge, elementwise" if backward else ""),
                    bytes_formula=(
                        "read x, write y; read x, dy, write dx: 5 E x "
                        if backward
                        else "read x, write y: 2 E x "
                    )
                    + f"{elem} B (ours adds statistics reads)",
                    bytes=moved,
                    flops_formula="~10E" + (" + ~15E" if backward else ""),
                    flops=(25 if backward else 10) * e,
                    limiter="issue" if parts["apply"] > hbm_s(2 * e * elem) * 1.05 else "HBM",
                    predicted_s=now,
                    why=why,
                    after_fix_s=after,
                    after_fix="every pass at <= its budget (HBM-bound), warp-tree merges",
                    peers={
                        "torch": {
                            "s": _eager_gn_silu_time(n, c, hw, elem, layout=layout, backward=backward),
                            "model": "moments (n*groups blocks), affine pass, SiLU pass: 10E"
                            + (" + backward 8E" if backward else "")
                            + (" + a contiguous copy" if layout == "cl" else ""),
                        },
                        "torch_compiled": {
                            "s": _compiled_gn_silu_time(n, c, hw, elem, backward=backward),
                            "model": "reduction + fused normalise/SiLU: 6E"
                            + (" + backward 5E" if backward else ""),
                        },
                    },
                    bench={"op": op, "case": f"{label} {layout_name}", "dtype": torch_dt},
                    table="main" if (label, layout, direction) in headline and elem == 2 else "group_norm",
                ).finish(peak=H100.bf16_flops if elem == 2 else H100.fp32_flops)
            )
    return rows


def _conv_rows(kernels) -> list["Prediction"]:
    rows = []
    for c, side, case, residual in [
        (512, 128, "SD-VAE decoder 1024px mid block", False),
        (512, 128, "SD-VAE decoder 1024px mid block, conv2 + residual", True),
        (512, 256, "SD-VAE decoder 1024px up block 1", False),
        (256, 512, "SD-VAE decoder 1024px up block 2", False),
        (128, 1024, "SD-VAE decoder 1024px up block 3", False),
        (256, 256, "SD-VAE decoder 512px up block 2", False),
    ]:
        for dt, torch_dt in (("bf16", "bfloat16"), ("fp16", "float16")):
            hw = side * side
            flops = 2 * 9 * c * c * hw
            act_bytes = (3 if residual else 2) * c * hw * 2 + 9 * c * c * 2
            k = kernels.get(f"group_norm_conv/group_norm_conv3x3_kernel<{dt}, silu, 128>")
            spills = bool(k and (k.spill_store_bytes or k.spill_load_bytes))
            eff = WMMA_EFFICIENCY * (0.85 if spills else 1.0)
            stats = _gn_silu_time(kernels, 1, c, hw, 2)[1]["reduce"] + 2 * H100.launch_s
            now = stats + mma_s(flops, eff) + 2 * H100.launch_s
            after = hbm_s(c * hw * 2) + mma_s(flops, WMMA_FIXED_EFFICIENCY) + 4 * H100.launch_s
            cudnn = mma_s(flops, CUDNN_EFFICIENCY) + (hbm_s(3 * c * hw * 2) if residual else 0)
            rows.append(
                Prediction(
                    id=f"group_norm_conv3x3_1x{c}x{side}x{side}{'_residual' if residual else ''}_{dt}",
                    workload=f"1x{c}x{side}x{side}, {c}->{c}" + (" + residual" if residual else ""),
                    dtype=dt,
                    kernels="group_norm statistics + group_norm_conv3x3_kernel",
                    bytes_formula="x, y"
                    + (", residual" if residual else "")
                    + " (2 B each) + weights 9 Cin Cout x 2 B",
                    bytes=act_bytes,
                    flops_formula="2 x 9 Cin Cout H W",
                    flops=flops,
                    limiter="tensor cores",
                    predicted_s=now,
                    why=(
                        f"WMMA at ~{eff:.0%} of bf16 peak ({k.registers if k else '?'} registers, "
                        f"{k.spill_load_bytes if k else '?'} B spill loads: issue 21 item 6; "
                        f"{k.occupancy if k else 0:.0%} occupancy) after a statistics pass "
                        f"({stats * 1e3:.3f} ms)"
                    ),
                    after_fix_s=after,
                    after_fix="pipelined halo, register epilogue",
                    peers={
                        "fastlatent_unfused": {
                            "s": _gn_silu_time(kernels, 1, c, hw, 2)[0] + cudnn,
                            "model": f"our GroupNorm+SiLU, then cuDNN at {CUDNN_EFFICIENCY:.0%}",
                        },
                        "torch": {
                            "s": _eager_gn_silu_time(1, c, hw, 2) + cudnn,
                            "model": "eager GroupNorm, SiLU, cuDNN conv",
                        },
                        "torch_compiled": {
                            "s": _compiled_gn_silu_time(1, c, hw, 2) + cudnn,
                            "model": "fused GroupNorm+SiLU, cuDNN conv",
                        },
                    },
                    bench={"op": "group_norm+silu+conv3x3", "case": case, "dtype": torch_dt},
                    table="main" if dt == "bf16" and case.endswith(("mid block", "up block 3")) else "conv",
                ).finish()
            )
    return rows


SIMT_EFFICIENCY = 0.5  # fp32 FMAs of the SIMT nearest_code paths (shared-memory operands, a compare/key)


def _nearest_code_rows(kernels) -> list["Prediction"]:
    rows = []
    for name, n, d, k in [
        ("vq", 65536, 64, 1024),
        ("vit_vqgan", 262144, 32, 8192),
        ("vqgan_f16", 262144, 256, 16384),
        ("flash_kmeans", 1048576, 64, 4096),
    ]:
        for dt, torch_dt, elem in (("bf16", "bfloat16", 2), ("fp32", "float32", 4)):
            flops = 2 * n * k * d
            nbytes = elem * (n * d + k * d) + 8 * n
            if d <= 32:
                path = f"small_d_kernel<{dt}, {d}>"
                core = flops / (H100.fp32_flops * SIMT_EFFICIENCY)
                now = core + 3 * H100.launch_s
                after = now
                why = (
                    f"small-D SIMT path (d <= 32, every dtype): fp32 FMAs at ~{SIMT_EFFICIENCY:.0%} of "
                    f"{H100.fp32_flops / 1e12:.0f} TFLOP/s; tensor cores would do this in "
                    f"{mma_s(flops, WMMA_FIXED_EFFICIENCY) * 1e3:.2f} ms"
                )
                after_text = "unchanged by issue 21 (a tensor-core path for d <= 32 would be the next step)"
            elif dt == "fp32":
                path = "simt_kernel<fp32>"
                core = flops / (H100.fp32_flops * SIMT_EFFICIENCY)
                now = after = core + 3 * H100.launch_s
                why = f"exact fp32 SIMT path (the fp32 default; tf32 is opt-in) at ~{SIMT_EFFICIENCY:.0%}"
                after_text = "unchanged (exact fp32 by default)"
            else:
                path = "tensor_core_kernel<bf16>"
                mma = mma_s(flops, WMMA_PIPELINED_EFFICIENCY)
                # epilogue: per (row, code) key a shared-memory park, a 16-byte reload per 4 keys, an FMA
                # and a fold (issue 21 item 5: ~21 instructions per key before the rework, ~8 after, from
                # the SASS)
                epilogue = issue_s(n * k, TC_EPILOGUE_ISSUES_PER_KEY)
                now = mma + epilogue + 3 * H100.launch_s
                after = max(mma_s(flops, WMMA_FIXED_EFFICIENCY), issue_s(n * k, 2)) + 3 * H100.launch_s
                tc = kernels.get(f"nearest_code/{path}")
                why = (
                    f"WMMA at ~{WMMA_PIPELINED_EFFICIENCY:.0%} ({mma * 1e3:.2f} ms; "
                    "cp.async double-buffered; "
                    f"{tc.registers if tc else '?'} registers, {tc.occupancy if tc else 0:.0%} occupancy) + "
                    f"epilogue ~{TC_EPILOGUE_ISSUES_PER_KEY} issues per key ({epilogue * 1e3:.2f} ms)"
                )
                after_text = f"register epilogue overlapped with MMAs at ~{WMMA_FIXED_EFFICIENCY:.0%}"
            if dt == "bf16":
                gemm = mma_s(flops, H100.tensor_efficiency)
            else:  # torch's fp32 matmul: exact fp32 unless TF32 is enabled
                gemm = flops / (H100.fp32_flops * 0.8)
            eager = gemm + hbm_s(6 * elem * n * k) + 3 * EAGER_OP_S
            compiled = gemm + hbm_s(2 * elem * n * k)
            peers = {
                "matmul_argmin": {"s": eager, "model": "GEMM + 3 eager N x K passes (6 N K elements)"},
                "matmul_argmin_compiled": {
                    "s": compiled,
                    "model": "GEMM writes N x K, one fused argmin read",
                },
            }
            if dt == "fp32":
                peers["cdist_argmin"] = {
                    "s": gemm + hbm_s(3 * elem * n * k) + 4 * EAGER_OP_S,
                    "model": "cdist (GEMM form, sqrt pass) + argmin",
                }
            # FAISS-GPU brute force (not in the CUDA bench: no faiss-gpu wheel): a GEMM per query tile, fp32
            # distance tiles too large for L2 written and re-read by its k-select
            peers["faiss_gpu"] = {
                "s": gemm + hbm_s(8 * n * k),
                "model": "GEMM + fp32 N x K distance tiles written and read (not benchmarked)",
            }
            rows.append(
                Prediction(
                    id=f"nearest_code_{name}_{dt}",
                    workload=f"N={n} D={d} K={k}",
                    dtype=dt,
                    kernels=f"nearest_code: code_keys, {path}, finish_rows",
                    bytes_formula=f"{elem} (N D + K D) + 8 N",
                    bytes=nbytes,
                    flops_formula="2 N K D",
                    flops=flops,
                    limiter="tensor cores + epilogue" if path.startswith("tensor") else "fp32 FMA",
                    predicted_s=now,
                    why=why,
                    after_fix_s=after,
                    after_fix=after_text,
                    peers=peers,
                    bench={"op": "nearest_code", "case": f"{name} N={n} D={d} K={k}", "dtype": torch_dt},
                    table="main"
                    if dt == "bf16" and name in ("vqgan_f16", "flash_kmeans")
                    else "nearest_code",
                ).finish(peak=H100.bf16_flops if dt == "bf16" else H100.fp32_flops)
            )
    return rows


# sample_code's SIMT kernel, per (row, code, dim) and lane: two loads (the row from L1, the code from L2),
# two FMAs (dot product and code norm) and a conversion; per surviving (row, code) key the Philox block and
# two IEEE-only logarithms (philox.h).
SAMPLE_CODE_ISSUES_PER_MAC = 5
SAMPLE_CODE_ISSUES_PER_NOISE = 110


def _sample_code_rows(kernels) -> list["Prediction"]:
    rows = []
    for name, n, d, k in [("vq", 65536, 64, 1024), ("vit_vqgan", 262144, 32, 8192)]:
        flops = 2 * n * k * d
        nbytes = 4 * (n * d + k * d) + 8 * n
        dots = issue_s(n * k * d, SAMPLE_CODE_ISSUES_PER_MAC)
        noise = issue_s(n * k, SAMPLE_CODE_ISSUES_PER_NOISE)  # every code survives the bound (hot T)
        gemm = flops / (H100.fp32_flops * 0.8)
        sk = kernels.get("sample_code/sample_code_kernel<fp32>")
        rows.append(
            Prediction(
                id=f"sample_code_{name}_fp32",
                workload=f"N={n} D={d} K={k}",
                dtype="fp32",
                kernels="sample_code: sample_code_kernel (SIMT, a warp per row)",
                bytes_formula="4 (N D + K D) + 8 N",
                bytes=nbytes,
                flops_formula="2 N K D",
                flops=flops,
                limiter="issue (loads + FMAs per MAC, Philox per key)",
                predicted_s=dots + noise + H100.launch_s,
                why=(
                    f"~{SAMPLE_CODE_ISSUES_PER_MAC} issues per multiply-add ({dots * 1e3:.2f} ms) + "
                    f"~{SAMPLE_CODE_ISSUES_PER_NOISE} per Gumbel key, all keys drawn ({noise * 1e3:.2f} ms); "
                    f"{sk.registers if sk else '?'} registers, {sk.occupancy if sk else 0:.0%} occupancy"
                ),
                after_fix_s=max(mma_s(flops, WMMA_FIXED_EFFICIENCY, H100.fp32_flops * 4), noise)
                + H100.launch_s,
                after_fix="nearest_code's tiled search with this epilogue: Philox-bound",
                peers={
                    "vector_quantize_pytorch": {
                        "s": gemm + hbm_s(4 * 12 * n * k) + 8 * EAGER_OP_S,
                        "model": "cdist GEMM + ~12 fp32 N x K passes (sqrt, uniform_, 2 logs, div, add, "
                        "argmax)",
                    },
                },
                bench={
                    "op": "sample_code (Gumbel)",
                    "case": f"{name} N={n} D={d} K={k} T=0.5",
                    "dtype": "float32",
                },
                table="nearest_code",
            ).finish(peak=H100.fp32_flops)
        )
    return rows


def predictions(kernels_list: list[KernelStatic]) -> list[Prediction]:
    kernels = {k.name: k for k in kernels_list}
    rows: list[Prediction] = []

    rows += _group_norm_rows(kernels) + _conv_rows(kernels) + _nearest_code_rows(kernels)
    rows += _sample_code_rows(kernels)

    # code_stats ------------------------------------------------------------------------------------------
    for n, d, k, peer in [(1048576, 256, 16384, "index_add"), (262144, 64, 1024, "onehot_matmul")]:
        nbytes = 4 * (n * d + k * d) + 8 * n
        seg = _per_vector(kernels, "code_stats/segment_sums_kernel<fp32>", 30)
        sort = hbm_s(2 * 8 * n * 2) + 4 * H100.launch_s  # 2 onesweep passes of (key, row) pairs
        sums = max(hbm_s(nbytes), issue_s(n * d * 4 / 16, seg))
        now = sort + sums + 3 * H100.launch_s
        if peer == "index_add":
            peer_s, model = hbm_s(nbytes) + n * d * 4 / 0.5e12, "fp32 atomics resolved in L2 (~0.5 TB/s)"
        else:
            peer_s = hbm_s(8 * n * k + 12 * n * k) + 2 * n * k * d / (H100.fp32_flops * 0.8)
            model = "int64 one-hot N x K, cast to fp32, fp32 GEMM"
        rows.append(
            Prediction(
                id=f"code_stats_N{n}_D{d}_K{k}_fp32",
                workload=f"N={n} D={d} K={k}",
                dtype="fp32",
                kernels="code_stats: make_keys, CUB radix sort, segment_starts, segment_sums",
                bytes_formula="4 (N D + K D) + 8 N",
                bytes=nbytes,
                flops_formula="N D",
                flops=n * d,
                limiter="HBM",
                predicted_s=now,
                why=f"sort {sort * 1e6:.0f} us + segment sums {seg:g} instr/16 B; uniform codes "
                "(skew: issue 21 item 3)",
                after_fix_s=now,
                after_fix="unchanged for uniform codes; item 3 bounds the skewed case",
                peers={peer: {"s": peer_s, "model": model}},
                bench={"op": "code_stats", "case": f"N={n} D={d} K={k}", "dtype": "float32"},
            ).finish(peak=H100.fp32_flops)
        )

    # EMA codebook update ---------------------------------------------------------------------------------
    k, d = 16384, 256
    emb = _per_vector(kernels, "ema_update/embed_kernel<fp32>", 80)
    nbytes = k * d * 4 * 4
    now = max(hbm_s(nbytes), issue_s(k * d * 8 / 16, emb)) + 2 * H100.launch_s
    rows.append(
        Prediction(
            id="ema_update_K16384_D256_fp32",
            workload=f"K={k} D={d}",
            dtype="fp32",
            kernels="ema_update: cluster_size_kernel, embed_kernel",
            bytes_formula="K D x 4 B x (read sums, embed_sum; write embed_sum, codebook)",
            bytes=nbytes,
            flops_formula="4 K D",
            flops=4 * k * d,
            limiter="issue" if issue_s(k * d / 2, emb) > hbm_s(nbytes) else "HBM",
            predicted_s=now,
            why=f"{emb:g} instr/16 B stored: code index by a multiply-high division, 1 / size once per code "
            "and block (issue 21 item 7)",
            after_fix_s=hbm_s(nbytes) + 2 * H100.launch_s,
            after_fix="code index once per row, HBM-bound",
            peers={"torch": {"s": hbm_s(nbytes * 2) + 6 * EAGER_OP_S, "model": "6 eager ops, 2x the bytes"}},
        ).finish(peak=H100.fp32_flops)
    )

    # FSQ 64M elements ------------------------------------------------------------------------------------
    e = 64 * 2**20
    bwd_pv = _per_vector(kernels, "fsq/fsq_backward_kernel<bf16, true>", 40)
    fwd = hbm_s(2 * e * 2 + e // 4 * 8) + H100.launch_s
    bwd = max(hbm_s(3 * e * 2), issue_s(e * 2 / 16, bwd_pv)) + H100.launch_s
    rows.append(
        Prediction(
            id="fsq_fwd_bwd_64M_bf16",
            workload="64M elements, levels [8,5,5,5]",
            dtype="bf16",
            kernels="fsq: fsq_quantize_kernel, fsq_backward_kernel",
            bytes_formula=(
                "fwd: read z, write z_hat (2 B) + int64 index per 4 elements; bwd: read g, z, write dz"
            ),
            bytes=2 * e * 2 + e // 4 * 8 + 3 * e * 2,
            flops_formula="~20E",
            flops=20 * e,
            limiter="HBM (fwd), issue (bwd)" if issue_s(e * 2 / 16, bwd_pv) > hbm_s(3 * e * 2) else "HBM",
            predicted_s=fwd + bwd,
            why=f"backward {bwd_pv:g} instr/16 B: sech^2 with an IEEE division per element (issue 21 item 7)",
            after_fix_s=fwd + hbm_s(3 * e * 2) + H100.launch_s,
            after_fix="fast-math sech^2, HBM-bound backward",
            peers={
                "reference_compiled": {
                    "s": (fwd + hbm_s(3 * e * 2)) / 0.9 + 4 * H100.launch_s,
                    "model": "inductor kernels at ~85% HBM, same bytes",
                }
            },
            bench={
                "op": "FSQ forward+backward",
                "case": "64M elements, levels [8,5,5,5]",
                "dtype": "bfloat16",
            },
        ).finish()
    )

    # Residual FSQ, 16M rows x d=4, 8 layers (vqp's ResidualFSQ on 16 latents of 1024x1024) ---------------
    rows_, d_, q_ = 16 * 2**20, 4, 8
    e = rows_ * d_
    # one thread per element: per layer ~30 instructions (5 rounded ops, clamp, convert, residual and
    # sum updates, a shared store and the barrier) plus the row's index: d multiply-adds of ~3
    # instructions on one thread of the row's d, so ~3 per element; an estimate from the source
    per_element_layer = 30 + 3
    fwd_bytes = e * (4 + 4 + 1) + rows_ * q_ * 8  # z, z_hat, pass_count, int64 indices per layer
    fwd = max(hbm_s(fwd_bytes), issue_s(e * q_ / 4, 4 * per_element_layer)) + H100.launch_s
    bwd_bytes = e * (4 + 1 + 4)  # grad * pass_count, one eager multiply (and a uint8 -> fp32 cast)
    bwd = hbm_s(bwd_bytes + e * 4 * 2) + 2 * H100.launch_s
    rows.append(
        Prediction(
            id="residual_fsq_fwd_bwd_16M_rows_q8_fp32",
            workload="16M rows, levels [8,5,5,5], 8 layers",
            dtype="fp32",
            kernels="residual_fsq: residual_fsq_kernel (+ the backward's eager multiply)",
            bytes_formula="fwd: z, z_hat 4 B + pass_count 1 B per element, 8 B index per row and layer; "
            "bwd: grad, pass_count, grad_z",
            bytes=fwd_bytes + bwd_bytes,
            flops_formula="~12 E Q",
            flops=12 * e * q_,
            limiter="issue" if issue_s(e * q_ / 4, 4 * per_element_layer) > hbm_s(fwd_bytes) else "HBM",
            predicted_s=fwd + bwd,
            why=f"~{per_element_layer:g} instructions per element and layer in the forward (all layers in "
            "registers, one barrier per layer); not yet measured on a GPU",
            after_fix_s=fwd + bwd,
            after_fix="no known fix pending",
            peers={
                "vector_quantize_pytorch": {
                    "s": q_ * 17 * hbm_s(e * 8) + q_ * 17 * EAGER_OP_S,
                    "model": "~17 eager elementwise passes per layer, each reading and writing E floats",
                }
            },
        ).finish(peak=H100.fp32_flops)
    )

    # LFQ entropy, d = 18 ---------------------------------------------------------------------------------
    n, dd = 65536, 18
    useful = 2 * n * 2**dd
    # forward: per batch of 16 samples a thread issues its 256 FMAs plus ~170 instructions of expansion,
    # Bernoullis, loads and fp64 adds (issue 21 item 4: the expansion was recomputed per 2-row u-tile, ~10x)
    fwd = useful / (H100.fp32_flops * 0.6) * LFQ_FORWARD_OVERHEAD
    # backward: G and G^T (1 MB each) read from L2 once per block of 8 samples (was twice per sample), against
    # 2 N 2^d FMAs (hU and hL) with two 16-byte shared loads per 8 FMAs
    bwd = max((n / 8) * 2 * 2**dd * 4 / L2_BYTES_PER_S, 2 * useful / (H100.fp32_flops * 0.6))
    rows.append(
        Prediction(
            id="lfq_entropy_fwd_bwd_N65536_d18_fp32",
            workload=f"N={n} d={dd}",
            dtype="fp32",
            kernels="lfq: sample_entropy, probs_partial, probs_reduce, transpose, entropy_backward",
            bytes_formula="x (N d x 4 B) + avg_probs 2^d x 4 B",
            bytes=n * dd * 4 + 2**dd * 4,
            flops_formula="2 N 2^d (outer products of the two 2^(d/2) halves)",
            flops=useful,
            limiter="fp32 FMA / L2",
            predicted_s=fwd + bwd,
            why=f"forward: 8-16 x 1-2 register tiles, expansion shared by 4,096 FMAs per sample "
            f"(~{LFQ_FORWARD_OVERHEAD}x the useful work, {fwd * 1e3:.2f} ms); "
            "backward: G read from L2 once per "
            f"8 samples, FMA-bound ({bwd * 1e3:.2f} ms) (issue 21 item 4)",
            after_fix_s=useful / (H100.fp32_flops * 0.6) + useful * 2 / (H100.bf16_flops * 0.5),
            after_fix="the avg_probs sums and hU/hL as GEMMs on tensor cores (3xTF32 for fp32 accuracy)",
            peers={
                "vector_quantize_pytorch": {
                    "s": hbm_s(2 * n * 2**dd * 4 * 2),
                    "model": "materialises the N x 2^d probabilities (write + read)",
                }
            },
        ).finish(peak=H100.fp32_flops)
    )

    # Guided DDIM step ------------------------------------------------------------------------------------
    for shape in [(16, 4, 128, 128), (256, 16, 32, 32)]:
        e = math.prod(shape)
        step_pv = _per_vector(kernels, "sampler_step/step_kernel<bf16, 8>", 60)
        nbytes = 2 * e * 2 + 2 * e * 2  # model output (2 halves), sample in; out
        now = max(hbm_s(nbytes), issue_s(e * 2 / 16, step_pv * 2)) + H100.launch_s
        rows.append(
            Prediction(
                id=f"guided_ddim_step_{'x'.join(map(str, shape))}_bf16",
                workload="x".join(map(str, shape)),
                dtype="bf16",
                kernels="sampler_step: step_kernel (vectorised)",
                bytes_formula="model output (cond + uncond) + sample in, out: 4E x 2 B",
                bytes=nbytes,
                flops_formula="~10E",
                flops=10 * e,
                limiter="launch" if hbm_s(nbytes) < H100.launch_s else "HBM",
                predicted_s=now,
                why=f"{step_pv:g} instr/16 B stored, one launch",
                after_fix_s=now,
                after_fix="no change needed",
                peers={
                    "torch": {
                        "s": max(8 * EAGER_OP_S, hbm_s(nbytes * 4)),
                        "model": "~8 eager ops, ~4x the bytes",
                    },
                    "torch_compiled": {
                        "s": hbm_s(nbytes) / 0.95 + 2 * H100.launch_s,
                        "model": "one fused inductor kernel",
                    },
                },
                bench={
                    "op": "guided DDIM step",
                    "dtype": "bfloat16",
                    "case": f"{'x'.join(map(str, shape))} (model output {2 * shape[0]}x"
                    f"{'x'.join(map(str, shape[1:]))})",
                },
            ).finish()
        )

    # 50-step sampler loops (model excluded): host-bound ---------------------------------------------------
    for shape in [(16, 4, 64, 64), (1, 4, 64, 64), (32, 4, 32, 32), (32, 16, 32, 32)]:
        for loop, ops in (("ddim", 12), ("euler", 10), ("dpmpp_2m", 16), ("flow_euler", 6)):
            e = math.prod(shape)
            step_gpu = hbm_s(3 * e * 4) + H100.launch_s
            ours = 50 * max(step_gpu, HOST_STEP_S)
            rows.append(
                Prediction(
                    id=f"loop_50_{loop}_{'x'.join(map(str, shape))}_fp32",
                    workload=f"{loop} {'x'.join(map(str, shape))}",
                    dtype="fp32",
                    kernels="sampler_step: step_kernel per step",
                    bytes_formula="50 x 3E x 4 B",
                    bytes=50 * 3 * e * 4,
                    flops_formula="50 x ~10E",
                    flops=500 * e,
                    limiter="host (launch)",
                    predicted_s=ours,
                    why=f"one fused step per iteration: {HOST_STEP_S * 1e6:.0f} us of host time per step "
                    f"(GPU work {step_gpu * 1e6:.1f} us)",
                    after_fix_s=ours,
                    after_fix="CUDA-graph capture removes the host time (the graph bench case)",
                    peers={
                        "diffusers": {
                            "s": 50 * max(ops * EAGER_OP_S, hbm_s(ops * 2 * e * 4)),
                            "model": f"~{ops} eager ops per scheduler step",
                        }
                    },
                    bench={
                        "op": f"50-step {loop} loop (model excluded)",
                        "case": "x".join(map(str, shape)),
                        "dtype": "float32",
                    },
                    table="sampling",
                ).finish(peak=H100.fp32_flops)
            )

    # Whole SD-VAE (FLUX.1-shaped) decode -----------------------------------------------------------------
    rows += [vae_decode_prediction(kernels, 1024), vae_decode_prediction(kernels, 512)]
    return rows


def vae_decode_prediction(kernels: dict[str, KernelStatic], resolution: int) -> Prediction:
    """SD-VAE decode, bf16, batch 1, anchored on the published FLUX.1 VAE decode (same decoder widths).

    TARGETS.md: FLUX.1 VAE 1024^2 bf16 eager on an H200: 89.9 ms; GroupNorm+SiLU about 46% of decode time
    before fusion; the best published fast path (FLUX.2 VAE) 97.6 -> 29.2 ms on an H200. The conv part of the
    eager decode is compute-bound (same tensor peak on H100 and H200); the GroupNorm part is memory-bound and
    scales with HBM bandwidth (4.8 -> 3.35 TB/s).
    """
    convs, norms, (tokens, width) = _sd_decoder_layers(resolution)
    conv_flops = sum(2 * k * k * cin * cout * s * s for cin, cout, k, s in convs)
    attn_flops = 4 * tokens * tokens * width
    norm_elems = sum(c * s * s for c, s in norms)
    anchor_h200 = 89.9e-3 * (resolution / 1024) ** 2  # below 1024 px: scaled by the pixel count
    gn_h200 = 0.46 * anchor_h200
    eager = (anchor_h200 - gn_h200) + gn_h200 * 4.8 / 3.35  # H100: the GroupNorm part scales with HBM
    # fastlatent patched: our GroupNorm+SiLU per norm (static model), convs as eager's (cuDNN), upsample convs
    # folded (2.25x fewer FLOPs on the three upsample convs), attention projections folded.
    ours_gn = sum(_gn_silu_time(kernels, 1, c, s * s, 2)[0] for c, s in norms)
    ours_gn_fixed = sum(_gn_silu_time(kernels, 1, c, s * s, 2, fixed=True)[0] for c, s in norms)
    # the three upsample convs (512 at 1/4, 512 at 1/2, 256 at full resolution): 2.25x fewer FLOPs folded
    rest = anchor_h200 - gn_h200  # convs, attention, adds: same on H100
    up_conv_flops = sum(2 * 9 * c * c * (resolution // f) ** 2 for c, f in [(512, 4), (512, 2), (256, 1)])
    rest_ours = rest * (1 - (up_conv_flops - up_conv_flops / 2.25) / conv_flops)
    eager_gn_bottom_up = sum(_eager_gn_silu_time(1, c, s * s, 2) for c, s in norms)
    now = rest_ours + ours_gn
    after = rest_ours + ours_gn_fixed
    return Prediction(
        id=f"sd_vae_decode_{resolution}_bf16",
        workload=f"SD-VAE (FLUX.1 widths) decode {resolution}x{resolution}",
        dtype="bf16",
        kernels="patched decoder: group_norm(+silu) per norm, cuDNN convs, folded upsample",
        bytes_formula="GroupNorm tensors: sum over the decoder's norms of C H W x 2 B x 6 (ours)",
        bytes=6 * norm_elems * 2,
        flops_formula="sum of conv 2 k^2 Cin Cout H W + attention 4 T^2 C",
        flops=conv_flops + attn_flops,
        limiter="convolutions (cuDNN) + GroupNorm apply (issue)",
        predicted_s=now,
        why=(
            f"anchor: FLUX.1 VAE eager 89.9 ms on an H200 (GroupNorm+SiLU 46%) -> {eager * 1e3:.0f} ms "
            "eager on "
            f"an H100; ours: the same convs less the upsample fold, GroupNorm+SiLU {ours_gn * 1e3:.1f} ms "
            f"(issue-bound apply, issue 21 item 1) instead of {gn_h200 * 4.8 / 3.35 * 1e3:.1f} ms; "
            f"the anchor puts the rest of the decode at "
            f"{(conv_flops + attn_flops) / rest / H100.bf16_flops:.0%} of bf16 "
            f"peak, well below the {CUDNN_EFFICIENCY:.0%} assumed for single convolutions"
        ),
        after_fix_s=after,
        after_fix=(
            f"GroupNorm+SiLU at HBM speed ({ours_gn_fixed * 1e3:.1f} ms); the published fast path "
            "reached 29.2 ms on an H200 with fused GroupNorm-conv and channels-last as well; a "
            "bandwidth model of eager GroupNorm+SiLU alone gives "
            f"{eager_gn_bottom_up * 1e3:.1f} ms, far below the "
            "published "
            "46% share, so the anchor, not that model, sets the eager row"
        ),
        peers={
            "diffusers": {
                "s": eager,
                "model": "anchored: 89.9 ms H200 eager at 1024 px (scaled by pixels below), "
                "GroupNorm part scaled to 3.35 TB/s",
            }
        },
        bench={"op": "SD-VAE decode", "case": f"{resolution} px, batch 1", "dtype": "bfloat16"},
        table="main" if resolution == 1024 else "vae",
    ).finish()


# ------------------------------------------------------------------------------------------------ outputs


def speedup(peer_s: float, ours_s: float) -> float:
    """Peer time over ours, as ``fastlatent bench`` reports it (above 1: fastlatent faster)."""
    return peer_s / ours_s if ours_s else math.nan


def _ms(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def static_table(kernels: list[KernelStatic]) -> str:
    lines = [
        "| kernel | regs | spill st/ld B | stack B | smem B (static+dyn) | threads | blocks/SM "
        "| occupancy (limiter) | main loop instr: path/static (subroutine calls) | B ld/st per iter "
        "| instr per 16 B (budget) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in kernels:
        loop = k.loop or {}
        spills = k.spill_store_bytes or k.spill_load_bytes
        spill = f"{k.spill_store_bytes}/{k.spill_load_bytes}" if spills else "0"
        per_vec = loop.get("path_per_vector")
        budget = f" ({k.budget})" if k.budget is not None else ""
        flag = " **over**" if k.budget is not None and per_vec is not None and per_vec > k.budget else ""
        hot = " (hot)" if k.hot else ""
        lines.append(
            f"| `{k.name}`{hot} | {k.registers} | {spill} | {k.stack_bytes} | {k.static_smem_bytes}+"
            f"{k.dynamic_smem_bytes} | {k.threads} | {k.blocks_per_sm} | "
            f"{k.occupancy:.0%} ({k.occupancy_limiter}) | "
            + (
                f"{loop['path_instructions']}/{loop['body_instructions']} ({loop['calls']} calls) | "
                f"{loop['load_bytes']}/{loop['store_bytes']} | "
                f"{per_vec if per_vec is not None else '-'}{budget}{flag} |"
                if loop
                else "- | - | - |"
            )
        )
    return "\n".join(lines)


def _peers_text(r: Prediction) -> str:
    return "; ".join(
        f"{name} {_ms(p['s'])} ({speedup(p['s'], r.predicted_s):.2f}x / "
        f"{speedup(p['s'], r.after_fix_s):.2f}x)"
        for name, p in r.peers.items()
    )


def prediction_table(rows: list[Prediction]) -> str:
    """The headline rows, with formulas, limiter and reasons."""
    lines = [
        "| workload | kernels | bytes (formula) | FLOPs (formula) | ideal / achievable | limiter "
        "| predicted | why | after fix | peers: predicted time (speedup now / after fix): model |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.table != "main":
            continue
        peers = "; ".join(
            f"{name} {_ms(p['s'])} ({speedup(p['s'], r.predicted_s):.2f}x / "
            f"{speedup(p['s'], r.after_fix_s):.2f}x): {p['model']}"
            for name, p in r.peers.items()
        )
        lines.append(
            f"| {r.workload} {r.dtype} | {r.kernels} | {r.bytes / 1e6:,.1f} MB ({r.bytes_formula}) | "
            f"{r.flops / 1e9:,.2f} GFLOP ({r.flops_formula}) | {_ms(r.ideal_s)} / {_ms(r.achievable_s)} | "
            f"{r.limiter} | **{_ms(r.predicted_s)}** | {r.why} | {_ms(r.after_fix_s)}: {r.after_fix} "
            f"| {peers} |"
        )
    return "\n".join(lines)


SWEEP_TITLES = {
    "group_norm": "GroupNorm+SiLU, every bench case",
    "conv": "Fused GroupNorm-conv, every bench case",
    "nearest_code": "nearest_code, every bench case",
    "sampling": "50-step sampler loops (fp32)",
    "vae": "VAE decode at other resolutions",
}


def sweep_tables(rows: list[Prediction]) -> str:
    """The remaining bench cases, compactly (their reasons are in the JSON's ``why``)."""
    out = []
    for table, title in SWEEP_TITLES.items():
        chosen = [r for r in rows if r.table == table]
        if not chosen:
            continue
        out += [
            f"### {title}",
            "",
            "| workload | dtype | bytes | ideal / achievable | limiter | predicted "
            "| after fix | peers: predicted time (speedup now / after fix) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r.workload} | {r.dtype} | {r.bytes / 1e6:,.1f} MB | "
            f"{_ms(r.ideal_s)} / {_ms(r.achievable_s)} "
            f"| {r.limiter} | **{_ms(r.predicted_s)}** | {_ms(r.after_fix_s)} | {_peers_text(r)} |"
            for r in chosen
        ]
        out.append("")
    return "\n".join(out).rstrip()


def check_report(result: CheckResult) -> str:
    lines = [f"- new violation (fails the check): {f}" for f in result.failures]
    lines += [f"- {k}" for k in result.known]
    lines += [f"- stale entry: {s}" for s in result.stale]
    return "\n".join(lines) if lines else "- none"


def _replace_section(text: str, marker: str, body: str) -> str:
    begin, end = f"<!-- perf_model:{marker}:begin -->", f"<!-- perf_model:{marker}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"{DOC_PATH} lacks the {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def model_document(kernels: list[KernelStatic], rows: list[Prediction], tools: dict) -> dict:
    return {
        "schema": "fastlatent-perf-model/1",
        "note": "predictions from static data (ptxas, SASS) and the assumptions listed; not measurements",
        "gpu": asdict(H100),
        "arch": ARCH,
        "nvcc": tools["nvcc_version"],
        "nvcc_flags": NVCC_FLAGS,
        "assumptions": {
            "issue_efficiency": ISSUE_EFFICIENCY,
            "wmma_efficiency": WMMA_EFFICIENCY,
            "wmma_fixed_efficiency": WMMA_FIXED_EFFICIENCY,
            "cudnn_efficiency": CUDNN_EFFICIENCY,
            "eager_op_s": EAGER_OP_S,
            "merge_s": MERGE_S,
            "l2_bytes_per_s": L2_BYTES_PER_S,
        },
        "kernels": [{k: v for k, v in asdict(k).items() if k != "mangled"} for k in kernels],
        "predictions": [asdict(r) for r in rows],
    }


def write_outputs(kernels, rows, tools, result: CheckResult) -> None:
    doc = model_document(kernels, rows, tools)
    JSON_PATH.write_text(json.dumps(doc, indent=1) + "\n")
    text = DOC_PATH.read_text()
    text = _replace_section(
        text,
        "static",
        f"Generated by `python scripts/perf_model.py --write` (nvcc "
        f"{tools['nvcc_version']}, {ARCH}).\n\n" + static_table(kernels),
    )
    text = _replace_section(text, "predictions", prediction_table(rows))
    text = _replace_section(text, "sweeps", sweep_tables(rows))
    text = _replace_section(text, "check", check_report(result))
    DOC_PATH.write_text(text)


def outdated_outputs(kernels: list[KernelStatic], model_path: Path = JSON_PATH) -> list[str]:
    """Kernels whose static columns differ from the committed JSON: the doc and JSON need ``--write``."""
    if not model_path.exists():
        return [f"{model_path.name} is missing"]
    keys = ("registers", "spill_store_bytes", "spill_load_bytes", "static_smem_bytes")
    committed = {k["name"]: k for k in json.loads(model_path.read_text())["kernels"]}
    out = []
    for k in kernels:
        old = committed.pop(k.name, None)
        new_vec = (k.loop or {}).get("path_per_vector")
        if old is None:
            out.append(f"{k.name}: new kernel")
        elif (
            any(old[key] != getattr(k, key) for key in keys)
            or (old.get("loop") or {}).get("path_per_vector") != new_vec
        ):
            out.append(f"{k.name}: static columns changed")
    out += [f"{name}: no longer compiled" for name in committed]
    return out


def compare(results_path: Path, model_path: Path = JSON_PATH, out=print) -> int:
    """Measured (``fastlatent bench`` results.json) against predicted, per modelled workload."""
    results = json.loads(Path(results_path).read_text())
    model = json.loads(Path(model_path).read_text())
    device = results.get("meta", {}).get("device", {}).get("name", "?")
    out(f"measured on {device} vs predicted for an {model['gpu']['name']} (predictions: {model_path.name})")
    out(f"{'workload':48s} {'provider':24s} {'predicted':>11s} {'measured':>11s} {'meas/pred':>9s}")
    matched = 0
    for row in model["predictions"]:
        bench = row.get("bench")
        case = next(
            (
                c
                for c in results.get("cases", [])
                if bench
                and c.get("op") == bench["op"]
                and c.get("case") == bench["case"]
                and c.get("dtype") == bench["dtype"]
            ),
            None,
        )
        predicted = {"fastlatent": row["predicted_s"], **{p: v["s"] for p, v in row["peers"].items()}}
        for provider, pred in predicted.items():
            got = (case or {}).get("providers", {}).get(provider, {})
            measured = got.get("min_s") if got.get("status") == "ok" else None
            text = f"{measured * 1e3:9.3f} ms" if measured else f"{got.get('status', 'not run'):>11s}"
            ratio = f"{measured / pred:9.2f}" if measured else f"{'-':>9s}"
            out(f"{row['id'][:48]:48s} {provider:24s} {pred * 1e3:8.3f} ms {text} {ratio}")
            matched += measured is not None
    out(f"{matched} measured provider times matched a prediction")
    return 0


# ------------------------------------------------------------------------ SiLU rounding (issue 21 item 1)


def silu_rounding_report(out=print) -> dict:
    """How a cheaper fp32 SiLU would change fp16/bf16 outputs of the GroupNorm apply pass.

    Over every finite fp16 and bf16 value z as the activation's input: the exact silu(z) (float64), the
    kernels' formula z / (1 + fast_exp(-z)) in fp32 (activations.h; each operation rounded, no FMA
    contraction), and the exact value's relative distance to the nearest rounding boundary of the output
    type. Another fp32 formulation within a relative error e of the exact value can round differently from
    the current one only where that distance is <= e + the current error: an upper bound on the outputs
    that change (a hardware exp's own bits can only be measured on a GPU). The reciprocal-then-multiply
    variant z * (1 / (1 + e)) is exactly reproducible here and counted exactly."""
    import numpy as np

    f32 = np.float32

    def fast_exp(x):  # activations.h, operation by operation
        x = np.clip(x, f32(-87.0), f32(88.0)).astype(f32)
        n = ((x * f32(1.44269504088896341) + f32(12582912.0)) - f32(12582912.0)).astype(f32)
        r = (x - n * f32(0.693145751953125) - n * f32(1.428606765330187045e-06)).astype(f32)
        p = f32(1.0 / 720.0)
        for c in (1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
            p = (p * r + f32(c)).astype(f32)
        return (p * ((n.astype(np.int32) + 127) << 23).view(f32)).astype(f32)

    def inputs(kind):
        bits = np.arange(65536, dtype=np.uint32)
        z = bits.astype(np.uint16).view(np.float16).astype(f32) if kind == "fp16" else (bits << 16).view(f32)
        return z[np.isfinite(z)]

    def round_to(kind, v):
        if kind == "fp16":
            return v.astype(np.float16).astype(np.float64)
        b = v.astype(f32).view(np.uint32)
        return ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).view(f32).astype(np.float64)  # nearest even

    report = {}
    for kind, mantissa, min_exp in (("fp16", 11, -14), ("bf16", 8, -126)):
        z = inputs(kind)
        e = fast_exp(-z)
        current = (z / (f32(1.0) + e)).astype(f32)
        reciprocal = (z * (f32(1.0) / (f32(1.0) + e)).astype(f32)).astype(f32)
        with np.errstate(over="ignore"):
            exact = z.astype(np.float64) / (1.0 + np.exp(-z.astype(np.float64)))
        # fast_exp clamps its argument to [-87, 88]: below z = -87 the kernels' SiLU is z / (1 + e^87), not
        # z e^z (|silu| < 1e-35: fp16 rounds both to 0). Counted apart, with the inputs whose exact SiLU is
        # below fp32's normal range (where flush-to-zero choices, not the formula, decide)
        ok = np.isfinite(exact) & (np.abs(exact) >= np.finfo(np.float32).tiny) & (z >= -87.0)
        exact, cur = exact[ok], current[ok].astype(np.float64)
        err = np.abs(cur - exact) / np.abs(exact)
        ulp = 2.0 ** (np.maximum(np.floor(np.log2(np.abs(exact))), min_exp) - (mantissa - 1))
        frac = np.abs(exact) / ulp
        margin = np.abs(frac - np.floor(frac) - 0.5) * ulp / np.abs(exact)
        fin = np.isfinite(current)
        row = {
            "inputs": int(ok.sum()),
            "tail": int(z.size - ok.sum()),
            "current_max_rel_error": float(err.max()),
            "current_not_correctly_rounded": int(np.sum(round_to(kind, cur) != round_to(kind, exact))),
            # expf-class (ex2.approx with an accurate argument split: 2 ulp) + an exactly rounded
            # reciprocal and a multiply (1/2 ulp each)
            "two_ulp_exp_may_change": int(np.sum(margin <= 3 * 2.0**-23 + err)),
            "reciprocal_changes_fp32": int(np.sum(current[fin] != reciprocal[fin])),
            "reciprocal_changes": int(
                np.sum(round_to(kind, current[fin]) != round_to(kind, reciprocal[fin]))
            ),
        }
        report[kind] = row
        out(f"{kind}: {row}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="fail on a new spill or instruction-budget violation"
    )
    parser.add_argument(
        "--write", action="store_true", help="write the JSON and the doc's generated sections"
    )
    parser.add_argument("--compare", metavar="RESULTS_JSON", help="print measured vs predicted and exit")
    parser.add_argument("--model", default=str(JSON_PATH), help="the model JSON for --compare")
    parser.add_argument("--jobs", type=int, default=None, help="parallel nvcc jobs (default $MAX_JOBS or 2)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="compile cache folder")
    parser.add_argument(
        "--silu-rounding",
        action="store_true",
        help="print how a cheaper SiLU would change fp16/bf16 outputs (all 65,536 inputs each) and exit",
    )
    args = parser.parse_args(argv)
    if args.silu_rounding:
        silu_rounding_report()
        return 0
    if args.compare:
        return compare(Path(args.compare), Path(args.model))
    try:
        compiled, tools = compile_units(Path(args.cache), args.jobs)
    except ToolMissing as err:
        print(f"perf_model: {err}", file=sys.stderr)
        return 2
    kernels = static_model(compiled)
    result = check(kernels)
    if args.write:
        write_outputs(kernels, predictions(kernels), tools, result)
        print(f"perf_model: wrote {JSON_PATH.relative_to(ROOT)} and {DOC_PATH.relative_to(ROOT)}")
    if not args.write or args.check:
        for k in kernels:
            loop = k.loop or {}
            print(
                f"{k.name:60s} regs {k.registers:3d} spill {k.spill_store_bytes}/{k.spill_load_bytes} "
                f"occ {k.occupancy:.0%} instr/16B {loop.get('path_per_vector', '-')}"
            )
    missing = unmatched_patterns(kernels)
    print(check_report(result))
    if not args.write:
        outdated = outdated_outputs(kernels)
        if outdated:
            print(
                f"- {JSON_PATH.name} and {DOC_PATH.name} are out of date for {len(outdated)} kernel(s) "
                f"(e.g. {outdated[0]}): run `python scripts/perf_model.py --write`"
            )
    for m in missing:
        print(f"- table pattern matches no kernel: {m}")
    if args.check and (result.failures or missing):
        print(
            f"perf_model --check: {len(result.failures)} new violation(s), "
            f"{len(missing)} unmatched pattern(s)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
