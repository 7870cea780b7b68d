"""The static performance model (scripts/perf_model.py) and the CI budget check it runs.

The parsers and the occupancy rules are tested on fixed inputs everywhere; the budget check compiles the CUDA
kernels for sm_90 wherever nvcc is installed (no GPU needed) and is skipped with the reason elsewhere.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_perf_model():
    spec = importlib.util.spec_from_file_location("perf_model", ROOT / "scripts" / "perf_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["perf_model"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


pm = _load_perf_model()

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    24 bytes stack frame, 16 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 24 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z5otherv' for 'sm_90'
ptxas info    : Function properties for _Z5otherv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers
"""

# A grid-stride loop at 0x20-0x90: a 16-byte load and store, a branch around a CALL to a 3-instruction
# subroutine (0xb0-0xd0), and the back edge at 0x90.
SASS = """\
\t\tFunction : _Z6kernelPf
        /*0000*/                   MOV R1, c[0x0][0x28] ;             /* 0x0 */
        /*0010*/                   NOP ;                              /* 0x0 */
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;   /* 0x0 */
        /*0030*/              @!P0 BRA 0x60 ;                         /* 0x0 */
        /*0040*/                   CALL.REL.NOINC 0xb0 ;              /* 0x0 */
        /*0050*/                   BRA 0x70 ;                         /* 0x0 */
        /*0060*/                   IMAD R8, R4, R5, RZ ;              /* 0x0 */
        /*0070*/                   STG.E.128 desc[UR4][R2.64], R4 ;   /* 0x0 */
        /*0080*/                   ISETP.GE.AND P1, PT, R0, R9, PT ;  /* 0x0 */
        /*0090*/              @!P1 BRA 0x20 ;                         /* 0x0 */
        /*00a0*/                   EXIT ;                             /* 0x0 */
        /*00b0*/                   IADD3 R0, R0, 0x1, RZ ;            /* 0x0 */
        /*00c0*/                   IADD3 R0, R0, 0x1, RZ ;            /* 0x0 */
        /*00d0*/                   RET.REL.NODEC R20 0x0 ;            /* 0x0 */
"""


def test_parse_ptxas_reads_registers_spills_and_shared_memory():
    res = pm.parse_ptxas(PTXAS_LOG)
    assert res["_Z6kernelPf"] == {
        "registers": 40,
        "stack_bytes": 24,
        "spill_store_bytes": 16,
        "spill_load_bytes": 20,
        "static_smem_bytes": 2048,
    }
    assert res["_Z5otherv"]["registers"] == 12 and res["_Z5otherv"]["static_smem_bytes"] == 0


def test_loop_metrics_counts_the_body_the_fast_path_and_the_callee():
    instrs = pm.parse_sass(SASS)["_Z6kernelPf"]
    loop = pm.loop_metrics(instrs)
    # body 0x20-0x90: 8 instructions, the CALL adds its 3-instruction subroutine
    assert loop["body_instructions"] == 11
    # fast path: LDG, BRA -> IMAD, STG, ISETP, BRA (skips the call)
    assert loop["path_instructions"] == 6
    assert (loop["load_bytes"], loop["store_bytes"]) == (16, 16)
    assert loop["path_per_vector"] == 6 and loop["static_per_vector"] == 11
    assert loop["calls"] == 1


def test_occupancy_follows_the_sm90_limits():
    # 128 registers x 256 threads: two blocks fill the 65,536-register file
    assert pm.occupancy(128, 0, 256) == {
        "blocks_per_sm": 2,
        "warps_per_sm": 16,
        "occupancy": 0.25,
        "limiter": "registers",
    }
    # 32 registers: the 2,048-thread limit
    assert pm.occupancy(32, 0, 256)["blocks_per_sm"] == 8
    # 100 KB of shared memory (+1 KB reserved per block): two blocks in 228 KB
    occ = pm.occupancy(16, 100 * 1024, 128)
    assert (occ["blocks_per_sm"], occ["limiter"]) == (2, "shared memory")
    # 64-thread blocks with few registers: the 32-blocks limit
    assert pm.occupancy(16, 0, 32)["blocks_per_sm"] == 32


def test_short_names_drop_namespaces_and_parameters():
    demangled = (
        "void fastlatent::(anonymous namespace)::elementwise_kernel<__nv_bfloat16, "
        "(fastlatent::Activation)1, false, true>(__nv_bfloat16 const*, long, fastlatent::Layout)"
    )
    assert pm.short_name(demangled) == "elementwise_kernel<bf16, silu, false, true>"


def _kernel(name, spill=0, per_vector=None, budget=None, hot=True):
    loop = {"path_per_vector": per_vector} if per_vector is not None else None
    return pm.KernelStatic(
        name=name,
        mangled=name,
        registers=32,
        stack_bytes=0,
        spill_store_bytes=spill,
        spill_load_bytes=spill,
        static_smem_bytes=0,
        threads=256,
        dynamic_smem_bytes=0,
        blocks_per_sm=8,
        occupancy=1.0,
        occupancy_limiter="threads",
        loop=loop,
        hot=hot,
        budget=budget,
    )


def test_check_fails_new_violations_and_reports_known_and_stale_ones(monkeypatch):
    monkeypatch.setattr(
        pm,
        "KNOWN_VIOLATIONS",
        [
            ("u/slow_kernel<*>", "instructions", "known over budget (issue 21 item 1): test"),
            ("u/fixed_kernel", "spill", "known spill (issue 21 item 6): test"),
        ],
    )
    kernels = [
        _kernel("u/slow_kernel<bf16>", per_vector=900, budget=40),  # known: reported
        _kernel("u/new_kernel", per_vector=41, budget=40),  # new: fails
        _kernel("u/spilling_kernel", spill=8),  # new spill, hot kernel: fails
        _kernel("u/cold_kernel", spill=8, hot=False),  # not hot: ignored
        _kernel("u/fixed_kernel"),
    ]  # its known entry is stale
    result = pm.check(kernels)
    assert len(result.failures) == 2
    assert any("u/new_kernel" in f and "budget 40" in f for f in result.failures)
    assert any("u/spilling_kernel" in f for f in result.failures)
    assert len(result.known) == 1 and "issue 21 item 1" in result.known[0]
    assert len(result.stale) == 1 and "u/fixed_kernel" in result.stale[0]


def test_known_violations_name_their_issue_item():
    for pattern, kind, reason in pm.KNOWN_VIOLATIONS:
        assert kind in ("instructions", "spill"), pattern
        assert reason.startswith(
            "known over budget (issue 21" if kind == "instructions" else "known spill (issue 21"
        ), reason


def test_committed_model_json_is_marked_as_predictions():
    doc = json.loads((ROOT / "benchmarks" / "perf_model_static.json").read_text())
    assert doc["schema"] == "fastlatent-perf-model/1" and "not measurements" in doc["note"]
    names = {k["name"] for k in doc["kernels"]}
    assert any(name.startswith("group_norm_conv/group_norm_conv3x3_kernel<bf16, silu") for name in names)
    for row in doc["predictions"]:
        assert row["predicted_s"] > 0 and row["ideal_s"] > 0 and row["peers"], row["id"]
        assert row["achievable_s"] >= row["ideal_s"], row["id"]


def test_compare_matches_bench_results_to_predictions(tmp_path):
    model = json.loads((ROOT / "benchmarks" / "perf_model_static.json").read_text())
    row = next(r for r in model["predictions"] if r.get("bench"))
    results = {
        "schema": "fastlatent-bench/1",
        "meta": {"device": {"name": "NVIDIA H100 80GB HBM3"}},
        "cases": [
            {**row["bench"], "providers": {"fastlatent": {"status": "ok", "min_s": 2 * row["predicted_s"]}}}
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    lines = []
    assert pm.compare(path, ROOT / "benchmarks" / "perf_model_static.json", out=lines.append) == 0
    hit = next(line for line in lines if line.startswith(row["id"][:48]) and "fastlatent " in line)
    assert hit.split()[-1] == "2.00"
    assert lines[-1].startswith("1 measured")


def test_outdated_outputs_names_changed_kernels(tmp_path):
    model = {
        "kernels": [
            {
                "name": "u/a",
                "registers": 32,
                "spill_store_bytes": 0,
                "spill_load_bytes": 0,
                "static_smem_bytes": 0,
                "loop": {"path_per_vector": 30.0},
            },
            {
                "name": "u/gone",
                "registers": 8,
                "spill_store_bytes": 0,
                "spill_load_bytes": 0,
                "static_smem_bytes": 0,
                "loop": None,
            },
        ]
    }
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model))
    same, changed = _kernel("u/a", per_vector=30.0), _kernel("u/a", per_vector=31.0)
    assert pm.outdated_outputs([same], path) == ["u/gone: no longer compiled"]
    assert pm.outdated_outputs([changed, _kernel("u/new")], path) == [
        "u/a: static columns changed",
        "u/new: new kernel",
        "u/gone: no longer compiled",
    ]


def test_missing_toolkit_is_named_in_the_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(pm.Path, "exists", lambda self: False)
    with pytest.raises(pm.ToolMissing, match="nvcc not found"):
        pm.find_tools()


def test_kernels_stay_within_spill_and_instruction_budgets():
    """The CI budget check: compiles csrc/kernels/*.cu for sm_90 (cached) and fails on a new violation."""
    try:
        pm.find_tools()
    except pm.ToolMissing as err:
        pytest.skip(f"static performance model needs the CUDA toolkit: {err}")
    compiled, _ = pm.compile_units()
    kernels = pm.static_model(compiled)
    assert len(kernels) > 100, "expected every kernel instantiation in the ptxas output"
    result = pm.check(kernels)
    assert not result.failures, "new spill or instruction-budget violations:\n" + "\n".join(result.failures)
    missing = pm.unmatched_patterns(kernels)
    assert not missing, "budget-table patterns that match no kernel (renamed?):\n" + "\n".join(missing)


def test_silu_rounding_figures_in_the_docs():
    """docs/performance-model.md gives these figures for keeping the GroupNorm apply pass's SiLU formula:
    it rounds fp16 correctly for all but one input and bf16 for all; an exactly rounded reciprocal and a
    multiply instead of the division already changes one fp16 output, and a 2-ulp exp may change up to 44
    fp16 and 4 bf16 outputs."""
    report = pm.silu_rounding_report(out=lambda *_: None)
    assert report["fp16"]["current_not_correctly_rounded"] == 1
    assert report["bf16"]["current_not_correctly_rounded"] == 0
    assert (report["fp16"]["reciprocal_changes"], report["bf16"]["reciprocal_changes"]) == (1, 0)
    assert (report["fp16"]["two_ulp_exp_may_change"], report["bf16"]["two_ulp_exp_may_change"]) == (44, 4)
    assert max(report[k]["current_max_rel_error"] for k in report) < 3e-7  # activations.h's stated bound
