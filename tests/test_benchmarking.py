"""`fastlatent bench`: case selection, report generation (JSON -> markdown and plots), measurement helpers,
and one tiny real case through the whole command."""

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from fastlatent import cli
from fastlatent.benchmarking import BenchError, locate_suites, pytest_command, resolve_device
from fastlatent.benchmarking.measure import (
    CompileSkipped,
    CompileTimeout,
    _deadline,
    choose_rounds,
    compile_once,
    peak_memory,
)
from fastlatent.benchmarking.plugin import selected, split_patterns
from fastlatent.benchmarking.report import SCHEMA, build_results, render_markdown, scaling_series, write_plots

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


# ------------------------------------------------------------------------------------------ selection


def test_filter_patterns_select_by_substring_glob_and_exclusion():
    ids = [
        "quantizers/test_nearest_code_cpu[vq_N16384_D64_K1024-faiss]",
        "quantizers/test_fsq_cpu[B16_N1024_L8555-fastlatent]",
        "norms/test_group_norm_silu_cpu[4x256x64x64_issue_bar-nchw-fwd-torch_compiled]",
        "sampling/test_loop_50_steps_cpu[sd_8x4x64x64-ddim-diffusers]",
    ]

    def run(include, exclude=()):
        return [i for i in ids if selected(i, split_patterns(include), split_patterns(exclude))]

    assert run([]) == ids
    assert run(["NEAREST_code"]) == ids[:1]  # case-insensitive substring
    assert run(["fsq,sampling"]) == [ids[1], ids[3]]  # comma-separated patterns are OR-ed
    assert run(["fsq", "sampling"]) == [ids[1], ids[3]]  # so are repeated ones
    assert run(["quantizers/*cpu[*-fastlatent]"]) == [ids[1]]  # glob over the whole id
    assert run(["norms/*fwd-*"]) == [ids[2]]
    assert run([], ["compiled", "faiss"]) == [ids[1], ids[3]]
    assert run(["quantizers"], ["faiss"]) == [ids[1]]
    assert run(["nothing-like-this"]) == []
    assert split_patterns([" a, ,b ", ""]) == ["a", "b"]


def test_pytest_command_carries_the_selection(tmp_path):
    cmd = pytest_command(
        BENCHMARKS,
        device="cpu",
        full=True,
        include=["fsq"],
        exclude=["faiss"],
        record=tmp_path / "r.json",
        benchmark_json=tmp_path / "b.json",
        compile_budget_s=60,
    )
    assert cmd[1:4] == ["-m", "pytest", str(BENCHMARKS)]
    assert {
        "--full",
        "--fl-filter=fsq",
        "--fl-exclude=faiss",
        "--benchmark-only",
        "--compile-budget=60",
        f"--fl-record={tmp_path / 'r.json'}",
    } <= set(cmd)
    assert cmd[cmd.index("--fl-device") + 1] == "cpu"
    quick = pytest_command(
        BENCHMARKS,
        device="cpu",
        full=False,
        include=[],
        exclude=[],
        record=tmp_path / "r.json",
        benchmark_json=tmp_path / "b.json",
        compile_budget_s=60,
        collect_only=True,
    )
    assert "--full" not in quick and "--collect-only" in quick and "--benchmark-only" not in quick
    assert "--fl-list" in quick


# ------------------------------------------------------------------------------------------ report


def _record(provider, case, seconds=None, outcome="passed", reason=None, n=1024, describe=True, mem=None):
    sizes = {"n": n, "d": 64, "k": 1024}
    desc = {
        "area": "quantizers",
        "op": "nearest_code",
        "case": case,
        "provider": provider,
        "device": "cpu",
        "dtype": "float32",
        "sizes": sizes,
    }
    record = {
        "nodeid": f"bench_quantizers.py::test_nearest_code_cpu[{case}-{provider}]",
        "outcome": outcome,
        "provider": provider,
        "case_key": f"bench_quantizers::test_nearest_code_cpu[case={case!r}]",
        "case": desc if describe else None,
        "result": None
        if seconds is None
        else {
            "min_s": seconds,
            "median_s": seconds * 1.1,
            "rounds": 5,
            "peak_mem_bytes": mem,
            "gflop_per_s": 100.0,
        },
    }
    if reason:
        record["reason"] = reason
    return record


def _synthetic_results():
    records = []
    for n, scale in ((1024, 1), (4096, 4), (16384, 16)):
        case = f"N={n}"
        records += [
            _record("fastlatent", case, 0.001 * scale, n=n, mem=2**20),
            _record("cdist_argmin", case, 0.004 * scale, n=n, mem=64 * 2**20),
            _record(
                "faiss",
                case,
                outcome="skipped",
                reason="faiss-cpu not installed (pip install faiss-cpu)",
                n=n,
                describe=False,
            ),
        ]
    records.append(
        _record("reference", "N=16384", outcome="failed", reason="E   AssertionError: agrees on 12%")
    )
    records.append(
        {
            "nodeid": "bench_x.py::test_mystery",
            "id": "x/test_mystery",
            "outcome": "skipped",
            "reason": "needs a GPU",
            "case": None,
            "provider": None,
        }
    )
    meta = {
        "command": "fastlatent bench --quick --device cpu --out x",
        "mode": "quick",
        "created": "today",
        "device": {"type": "cpu", "name": "Test CPU (2 threads)"},
        "versions": {"torch": "2.x", "faiss-cpu": None},
        "build": {
            "version": "0.1.0",
            "torch_built": "2.x",
            "cuda": False,
            "cpu_simd": "avx2",
            "openmp_max_threads": 2,
        },
        "wall_s": 12.0,
    }
    return build_results(records, meta)


def test_results_group_providers_side_by_side_with_speedups():
    results = _synthetic_results()
    assert results["schema"] == SCHEMA
    assert [c["case"] for c in results["cases"]] == ["N=1024", "N=4096", "N=16384"]
    last = results["cases"][-1]["providers"]
    assert list(last) == ["fastlatent", "reference", "cdist_argmin", "faiss"]  # fastlatent, reference first
    assert last["fastlatent"]["speedup"] == 1.0
    assert last["cdist_argmin"]["speedup"] == pytest.approx(4.0)
    # skipped before describing itself: attributed to its case through the sibling's description
    assert last["faiss"] == {"status": "skipped", "reason": "faiss-cpu not installed (pip install faiss-cpu)"}
    assert last["reference"]["status"] == "failed" and "12%" in last["reference"]["reason"]
    assert results["unattributed"] == [
        {"id": "x/test_mystery", "outcome": "skipped", "reason": "needs a GPU"}
    ]


def test_markdown_names_device_build_and_tabulates_every_provider():
    md = render_markdown(_synthetic_results())
    assert md.startswith("# fastlatent benchmarks: Test CPU (2 threads)")
    assert "fastlatent bench --quick --device cpu" in md and "not installed: faiss-cpu" in md
    assert "CPU kernels only" in md
    assert "| case | fastlatent | reference | cdist_argmin | faiss | fastlatent throughput |" in md
    assert "| N=1024 | **1 ms** |  | 4 ms (4x) | skipped | 100 GFLOP/s |" in md
    assert "| N=16384 | **16 ms** | **FAILED** | 64 ms (4x) | skipped | 100 GFLOP/s |" in md
    assert "| nearest_code | cpu | cdist_argmin | 3 | 4x | 4x - 4x |" in md  # summary: geometric mean
    assert "| N=1024 | 1 MiB | - | 64 MiB | - |" in md  # peak memory table
    assert "| nearest_code | faiss | 3 | faiss-cpu not installed (pip install faiss-cpu) |" in md
    assert "## Failed" in md and "AssertionError: agrees on 12%" in md
    assert "needs a GPU" in md


def test_scaling_series_finds_sweeps():
    cases = _synthetic_results()["cases"]
    series = scaling_series(cases, "n")
    assert len(series) == 1 and [c["sizes"]["n"] for c in series[0][1]] == [1024, 4096, 16384]
    assert scaling_series(cases, "k") == []  # K never varies


def test_plots_are_written_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    files = write_plots(_synthetic_results(), tmp_path)
    names = sorted(f.name for f in files)
    assert names == ["scaling_quantizers_nearest_code_cpu_n.png", "speedup_quantizers_nearest_code_cpu.png"]
    for f in files:
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_from_json_renders_an_existing_results_file(tmp_path, capsys):
    src = tmp_path / "in" / "results.json"
    src.parent.mkdir()
    src.write_text(json.dumps(_synthetic_results()))
    assert cli.main(["bench", "--from-json", str(src), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "results.md").read_text().count("| N=") >= 6
    assert json.loads((tmp_path / "out" / "results.json").read_text())["schema"] == SCHEMA
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmarks": []}))  # pytest-benchmark's format, not ours
    assert cli.main(["bench", "--from-json", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert "expects a fastlatent-bench/1 results.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ command errors


def test_suites_are_found_in_a_checkout_or_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTLATENT_BENCHMARKS", raising=False)
    assert locate_suites() == BENCHMARKS
    with pytest.raises(BenchError, match=r"--suites must be a folder with bench_\*\.py suites"):
        locate_suites(tmp_path)
    monkeypatch.setenv("FASTLATENT_BENCHMARKS", str(tmp_path / "missing"))
    with pytest.raises(BenchError, match=r"\$FASTLATENT_BENCHMARKS must be a folder"):
        locate_suites()


def test_bad_command_lines_exit_2_with_a_message(tmp_path, monkeypatch, capsys):
    assert cli.main(["bench", "--suites", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--suites must be a folder" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BenchError, match="--device cuda needs a CUDA GPU.*no CUDA GPU is visible"):
        resolve_device("cuda")
    assert resolve_device(None) == "cpu"
    assert cli.main(["bench", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert cli.main(["bench", "--compile-budget", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--compile-budget must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --quick and --full exclude each other
        cli.main(["bench", "--quick", "--full"])


# ------------------------------------------------------------------------------------------ measurement


def test_peak_memory_sees_temporaries_freed_inside_the_call():
    def allocates_64_mib():
        t = torch.ones(16 * 2**20)  # 64 MiB, touched, freed before returning
        return float(t[-1])

    big = peak_memory(allocates_64_mib, torch.device("cpu"))["peak_mem_bytes"]
    small = peak_memory(lambda: torch.ones(16).sum(), torch.device("cpu"))["peak_mem_bytes"]
    assert 60 * 2**20 <= big <= 96 * 2**20, big
    assert small < 4 * 2**20, small


def test_rounds_follow_the_time_of_one_call():
    assert choose_rounds(0.1, 0.3) == 3
    assert choose_rounds(1e-6, 0.3) == 200
    assert choose_rounds(2.0, 0.3) == 3
    assert choose_rounds(0.01, 0.3) == 30


def test_compile_failures_and_overruns_become_skip_reasons(monkeypatch):
    with pytest.raises(CompileTimeout):
        with _deadline(0.05):
            time.sleep(2)
    import torch._dynamo

    def fake_compile(fn, **kwargs):
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    with pytest.raises(CompileSkipped, match="longer than 0.05 s"):
        compile_once(lambda: None, lambda f: time.sleep(2), budget_s=0.05)
    with pytest.raises(CompileSkipped, match="torch.compile failed: ValueError: unsupported thing"):
        compile_once(lambda: None, lambda f: (_ for _ in ()).throw(ValueError("unsupported thing\nmore")), 10)
    compiled, info = compile_once(lambda x: x + 1, lambda f: f(1), budget_s=10)
    assert compiled(1) == 2 and info["compile_s"] >= 0 and info["graph_breaks"] == 0


def _load_bench_conftest():
    spec = importlib.util.spec_from_file_location("fastlatent_bench_conftest", BENCHMARKS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _chw(shape):
    if len(shape) == 3:
        side = int(round(shape[2] ** 0.5))
        return (shape[1], side, side)
    return tuple(shape[1:])


def test_sd_vae_shapes_are_those_of_diffusers_autoencoderkl():
    """The norm shapes the suites use are what a diffusers AutoencoderKL's GroupNorms actually see."""
    diffusers = pytest.importorskip("diffusers")
    conftest = _load_bench_conftest()
    config = dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, latent_channels=4)
    vae = diffusers.AutoencoderKL(
        block_out_channels=config["block_out_channels"],
        layers_per_block=2,
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    ).eval()
    for part, module, x in (
        ("encoder", vae.encoder, torch.zeros(1, 3, 32, 32)),
        ("decoder", vae.decoder, torch.zeros(1, 4, 8, 8)),
    ):
        seen = set()
        # the attention's GroupNorm sees [B, C, H*W]: counted as the C x H x W it normalises
        hooks = [
            m.register_forward_hook(lambda m, i, o: seen.add(_chw(i[0].shape)))
            for m in module.modules()
            if isinstance(m, torch.nn.GroupNorm)
        ]
        with torch.no_grad():
            module(x)
        for h in hooks:
            h.remove()
        assert set(conftest.sd_vae_norm_shapes(32, part, config)) == seen, part
    with pytest.raises(ValueError, match="part must be 'encoder' or 'decoder'"):
        conftest.sd_vae_norm_shapes(32, "unet", config)


# ------------------------------------------------------------------------------------------ whole command


def test_bench_command_runs_a_real_case_end_to_end(tmp_path, capsys):
    pytest.importorskip("pytest_benchmark", reason="the suites run under pytest-benchmark")
    out = tmp_path / "bench"
    status = cli.main(
        [
            "bench",
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--filter",
            "sampling/test_guided_ddim_step_cpu[dit_8x4x32x32-fastlatent]",
            "--filter",
            "sampling/test_guided_ddim_step_cpu[dit_8x4x32x32-torch]",
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0, (out / "pytest.log").read_text()[-3000:]
    assert (
        "[1/2] guided DDIM step cpu 8x4x32x32" in printed
        and "1 cases, 2 measured, 0 skipped, 0 failed" in printed
    )
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["device"]["type"] == "cpu" and results["meta"]["build"]["extension"]
    (case,) = results["cases"]
    assert case["area"] == "sampling" and case["sizes"] == {"batch": 8, "channels": 4, "side": 32}
    assert list(case["providers"]) == ["fastlatent", "torch"]
    fl, eager = case["providers"]["fastlatent"], case["providers"]["torch"]
    assert fl["status"] == eager["status"] == "ok" and fl["speedup"] == 1.0
    assert eager["speedup"] == pytest.approx(eager["min_s"] / fl["min_s"])
    assert fl["min_s"] > 0 and fl["rounds"] >= 3 and fl["peak_mem_bytes"] >= 0 and fl["gb_per_s"] > 0
    md = (out / "results.md").read_text()
    assert "### guided DDIM step (cpu, float32)" in md and "![speedup_sampling_guided_ddim_step_cpu]" in md
    assert (out / "plots" / "speedup_sampling_guided_ddim_step_cpu.png").exists()
    assert json.loads((out / "pytest-benchmark.json").read_text())["benchmarks"]


def _adoption_results():
    records = []
    for case, scale in (("small", 1), ("large", 4)):
        records += [
            _record("fastlatent", case, 0.001 * scale),
            _record("fastlatent_adapter", case, 0.002 * scale),
            _record("reference_compiled", case, 0.050 * scale),
            _record("peer_lib", case, 0.004 * scale),
        ]
    return build_results(records, {"device": {"type": "cpu", "name": "Test CPU"}})


def test_adoption_compares_ours_and_drop_ins_with_peers_in_ms_without_reference_twins():
    from fastlatent.benchmarking.report import adoption_rows, provider_kind

    assert [
        provider_kind(p)
        for p in (
            "fastlatent",
            "fastlatent_adapter",
            "reference",
            "reference_compiled",
            "diffusers",
            "torch_compiled",
        )
    ] == ["ours", "ours", "reference", "reference", "peer", "peer"]
    rows = adoption_rows(_adoption_results())
    assert [(r["ours"], r["peer"]) for r in rows] == [
        ("fastlatent", "peer_lib"),
        ("fastlatent_adapter", "peer_lib"),
    ]
    assert rows[0]["ratio"] == pytest.approx(4.0) and rows[1]["ratio"] == pytest.approx(2.0)
    assert rows[0]["ours_ms"] == pytest.approx(2.0) and rows[0]["peer_ms"] == pytest.approx(
        8.0
    )  # geomean of 1, 4
    md = render_markdown(_adoption_results(), adoption_plot="plots/adoption.png")
    headline = md.split("## fastlatent against what you use today", 1)[1].split("\n## ", 1)[0]
    assert "| nearest_code | cpu | fastlatent | 2 | peer_lib | 8 | 4x | 4x - 4x | 2 |" in headline
    assert "fastlatent_adapter" in headline and "reference" not in headline.split("|---")[1]
    assert "![fastlatent against what you use today](plots/adoption.png)" in headline


def test_report_writes_the_adoption_plot_and_per_op_time_bars(tmp_path):
    pytest.importorskip("matplotlib")
    from fastlatent.benchmarking import write_report

    files = write_report(_adoption_results(), tmp_path)
    names = [f.name for f in files]
    assert names[:3] == ["results.json", "results.md", "adoption.png"]
    assert "speedup_quantizers_nearest_code_cpu.png" in names
    assert (
        "![fastlatent against what you use today](plots/adoption.png)"
        in (tmp_path / "results.md").read_text()
    )
    only_reference = build_results([_record("fastlatent", "x", 0.001), _record("reference", "x", 0.01)], {})
    assert write_plots(only_reference, tmp_path / "none") == []  # a lone fastlatent bar answers nothing
