"""From the recorded cases to ``results.json``, ``results.md`` and PNG plots.

``results.json`` (schema ``fastlatent-bench/1``)::

    {"schema": "fastlatent-bench/1",
     "meta": {"created", "command", "mode", "device": {"type", "name", "peak"}, "versions", "build", "git",
     ...},
     "cases": [{"area", "op", "case", "device", "dtype", "sizes": {...},
                "providers": {"fastlatent": {"status": "ok", "min_s", "median_s", "peak_mem_bytes",
                                             "speedup": 1.0, "gb_per_s", "fraction_of_peak_bandwidth", ...},
                              "faiss": {"status": "skipped", "reason": "..."}, ...}}],
     "unattributed": [{"id", "outcome", "reason"}]}

``speedup`` is the provider's time over fastlatent's in the same run (above 1: fastlatent is faster).

Providers fall in three kinds (:func:`provider_kind`): ours (``fastlatent`` and its drop-in forms,
``fastlatent_*``, e.g. the diffusers scheduler adapter), fastlatent's plain-PyTorch reference twins
(``reference*``: ground truth for correctness, often float64, nobody's alternative) and peers (everything
else:
PyTorch eager or compiled, diffusers, vector-quantize-pytorch, FAISS: what people use today). The headline of
the report and its adoption plot compare ours against peers only, in milliseconds beside the ratio.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict, defaultdict
from pathlib import Path

SCHEMA = "fastlatent-bench/1"
FIRST_PROVIDERS = ("fastlatent", "reference", "reference_compiled")
SCALING_AXES = ("n", "k", "d", "resolution", "batch", "levels", "steps")
_TIME_FIELDS = ("min_s", "median_s", "mean_s", "stddev_s", "rounds")


def provider_kind(name: str) -> str:
    """``"ours"`` (fastlatent, its drop-in forms), ``"reference"`` (our plain-PyTorch twins) or ``"peer"``."""
    if name == "fastlatent" or name.startswith("fastlatent_"):
        return "ours"
    if name == "reference" or name.startswith("reference_"):
        return "reference"
    return "peer"


def _provider_order(names) -> list[str]:
    names = list(OrderedDict.fromkeys(names))
    return [p for p in FIRST_PROVIDERS if p in names] + [p for p in names if p not in FIRST_PROVIDERS]


def build_results(records: list[dict], meta: dict) -> dict:
    """Group the per-test records into cases with every provider side by side.

    Args:
        records: what the pytest plugin recorded, one dict per test (outcome, description, result).
        meta: run metadata (device, versions, build, command, mode, ...).

    Returns:
        The ``results.json`` document (see the module docstring).
    """
    # A provider skipped before it described itself borrows the description of its siblings.
    by_key: dict[str, dict] = {}
    for record in records:
        if record.get("case") and record.get("case_key"):
            by_key.setdefault(record["case_key"], record["case"])
    cases: OrderedDict[tuple, dict] = OrderedDict()
    unattributed = []
    for record in records:
        desc = record.get("case")
        provider = (desc or {}).get("provider") or record.get("provider")
        if desc is None and record.get("case_key") in by_key:
            desc = dict(by_key[record["case_key"]], provider=provider)
        if desc is None or provider is None:
            unattributed.append(
                {
                    "id": record.get("id", record.get("nodeid")),
                    "outcome": record.get("outcome"),
                    "reason": record.get("reason", ""),
                }
            )
            continue
        key = (desc.get("area"), desc.get("op"), desc.get("device"), desc.get("dtype"), desc.get("case"))
        entry = cases.setdefault(
            key,
            {
                "area": desc.get("area"),
                "op": desc.get("op"),
                "case": desc.get("case"),
                "device": desc.get("device"),
                "dtype": desc.get("dtype"),
                "sizes": desc.get("sizes") or {},
                "providers": {},
            },
        )
        outcome = record.get("outcome")
        result = record.get("result")
        if outcome == "passed" and result:
            entry["providers"][provider] = {"status": "ok", **result}
        elif outcome == "passed":
            entry["providers"][provider] = {
                "status": "unmeasured",
                "reason": "the case ran but recorded no timing",
            }
        else:
            entry["providers"][provider] = {
                "status": "skipped" if outcome == "skipped" else "failed",
                "reason": record.get("reason", ""),
            }
    for entry in cases.values():
        entry["providers"] = {p: entry["providers"][p] for p in _provider_order(entry["providers"])}
        add_speedups(entry)
    return {"schema": SCHEMA, "meta": meta, "cases": list(cases.values()), "unattributed": unattributed}


def add_speedups(entry: dict) -> None:
    """Each measured provider's time over fastlatent's, in place (None without both times)."""
    base = entry["providers"].get("fastlatent", {})
    base_s = base.get("min_s") if base.get("status") == "ok" else None
    for result in entry["providers"].values():
        if result.get("status") == "ok":
            result["speedup"] = result["min_s"] / base_s if base_s else None


# ------------------------------------------------------------------------------------ markdown


def fmt_time(seconds: float) -> str:
    """3 significant digits in ms or us; whole ms from a second up."""
    ms = seconds * 1e3
    if ms >= 1000:
        return f"{ms:,.0f} ms"
    if ms >= 0.1:
        return f"{ms:.3g} ms"
    return f"{ms * 1e3:.3g} us"


def _fmt_ratio(ratio: float) -> str:
    return f"{ratio:.2g}x" if ratio < 10 else f"{ratio:.0f}x"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if n < 2**20:
        return f"{n / 2**10:.3g} KiB"
    if n < 2**30:
        return f"{n / 2**20:.3g} MiB"
    return f"{n / 2**30:.3g} GiB"


def _cell(result: dict | None, fastest: bool) -> str:
    if not result:
        return ""
    if result.get("status") != "ok":
        return {"skipped": "skipped", "failed": "**FAILED**", "unmeasured": "-"}.get(
            result.get("status"), "-"
        )
    text = fmt_time(result["min_s"])
    text = f"**{text}**" if fastest else text
    ratio = result.get("speedup")
    return (
        f"{text} ({_fmt_ratio(ratio)})" if ratio is not None and result is not None and ratio != 1.0 else text
    )


def _throughput(result: dict) -> str:
    parts = []
    if "gb_per_s" in result:
        parts.append(f"{result['gb_per_s']:.3g} GB/s")
        if "fraction_of_peak_bandwidth" in result:
            parts[-1] += f" ({result['fraction_of_peak_bandwidth']:.0%} of peak)"
    if "gflop_per_s" in result:
        parts.append(f"{result['gflop_per_s']:.3g} GFLOP/s")
        if "fraction_of_peak_flops" in result:
            parts[-1] += f" ({result['fraction_of_peak_flops']:.0%} of peak)"
    return ", ".join(parts) or "-"


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _ops(cases: list[dict]) -> OrderedDict:
    ops: OrderedDict[tuple, list[dict]] = OrderedDict()
    for case in cases:
        ops.setdefault((case["area"], case["op"], case["device"]), []).append(case)
    return ops


def summary_rows(results: dict) -> list[dict]:
    """Per op and peer: geometric-mean speed-up of fastlatent over the cases both ran, with the range."""
    rows = []
    for (area, op, device), cases in _ops(results["cases"]).items():
        providers = _provider_order(p for c in cases for p in c["providers"])
        for provider in providers:
            if provider == "fastlatent":
                continue
            ratios = [
                c["providers"][provider]["speedup"]
                for c in cases
                if c["providers"].get(provider, {}).get("speedup")
            ]
            if ratios:
                rows.append(
                    {
                        "area": area,
                        "op": op,
                        "device": device,
                        "provider": provider,
                        "cases": len(ratios),
                        "geomean": _geomean(ratios),
                        "min": min(ratios),
                        "max": max(ratios),
                    }
                )
    return rows


def adoption_rows(results: dict) -> list[dict]:
    """What a person deciding whether to adopt fastlatent asks: per op, each of our providers (fastlatent, its
    drop-in forms) against each peer, over the cases both measured: geometric-mean milliseconds of each,
    the geometric-mean ratio (peer time / ours: above 1, ours is faster) and its range. Reference twins are
    left out."""
    rows = []
    for (area, op, device), cases in _ops(results["cases"]).items():
        names = _provider_order(p for c in cases for p in c["providers"])
        ours = [p for p in names if provider_kind(p) == "ours"]
        peers = [p for p in names if provider_kind(p) == "peer"]
        for mine in ours:
            for peer in peers:
                pairs = [
                    (c["providers"][mine]["min_s"], c["providers"][peer]["min_s"])
                    for c in cases
                    if c["providers"].get(mine, {}).get("status") == "ok"
                    and c["providers"].get(peer, {}).get("status") == "ok"
                ]
                if not pairs:
                    continue
                ratios = [theirs / own for own, theirs in pairs]
                rows.append(
                    {
                        "area": area,
                        "op": op,
                        "device": device,
                        "ours": mine,
                        "peer": peer,
                        "cases": len(pairs),
                        "ours_ms": _geomean([o for o, _ in pairs]) * 1e3,
                        "peer_ms": _geomean([t for _, t in pairs]) * 1e3,
                        "ratio": _geomean(ratios),
                        "min": min(ratios),
                        "max": max(ratios),
                    }
                )
    return rows


def render_markdown(results: dict, adoption_plot: str | None = None) -> str:
    """The results as a markdown report: header (device, versions, build), a summary, a table per op."""
    meta = results.get("meta", {})
    device = meta.get("device", {})
    build = meta.get("build", {}) or {}
    versions = meta.get("versions", {}) or {}
    lines = [f"# fastlatent benchmarks: {device.get('name', '?')}", ""]
    lines.append(
        f"- **device**: {device.get('type', '?')}, {device.get('name', '?')}"
        + (f"; peak {device['peak']}" if device.get("peak") else "")
    )
    lines.append(
        f"- **run**: `{meta.get('command', '?')}` ({meta.get('mode', '?')}), {meta.get('created', '?')}"
        + (f", {meta['wall_s']:.0f} s" if meta.get("wall_s") else "")
        + (f" ({meta['cpu_s']:.0f} s of CPU time)" if meta.get("cpu_s") else "")
    )
    installed = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    missing = ", ".join(k for k, v in versions.items() if not v)
    lines.append(f"- **versions**: {installed}" + (f" (not installed: {missing})" if missing else ""))
    if build:
        simd = (build.get("cpu_simd") or "").strip() or "baseline"
        cuda = f"CUDA kernels sm {build.get('cuda_archs')}" if build.get("cuda") else "CPU kernels only"
        lines.append(
            f"- **build**: fastlatent {build.get('version')} against torch {build.get('torch_built')}, "
            f"{cuda}, SIMD {simd}, OpenMP {build.get('openmp_max_threads')} threads"
        )
    if meta.get("incomplete"):
        lines.append(f"- **INCOMPLETE**: {meta['incomplete']}")
    if meta.get("git"):
        git = meta["git"]
        lines.append(
            f"- **source**: commit {git.get('commit', '?')[:12]}"
            + (" (uncommitted changes)" if git.get("dirty") else "")
        )
    lines += [
        "",
        "Times are the fastest of several calls; `(3.1x)` is the provider's time over fastlatent's in "
        "the same run (above 1: fastlatent is faster). Peak memory is what one call needs on top of its "
        "inputs" + (f" ({meta['memory_probe']})" if meta.get("memory_probe") else "") + ".",
        "",
    ]

    adoption = adoption_rows(results)
    if adoption:
        lines += [
            "## fastlatent against what you use today",
            "",
            "Per op, fastlatent (or its drop-in form) against each installed alternative, on this device: "
            "milliseconds per call (geometric mean over the cases both ran) and the ratio, their time over "
            "ours (above 1: fastlatent is faster). fastlatent's own reference twins are not alternatives and "
            "are left out here.",
            "",
            "| op | device | fastlatent | ms | instead of | ms | speed-up | range | cases |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in adoption:
            spread = f"{_fmt_ratio(row['min'])} - {_fmt_ratio(row['max'])}" if row["cases"] > 1 else "-"
            lines.append(
                f"| {row['op']} | {row['device']} | {row['ours']} | {row['ours_ms']:.3g} | {row['peer']} | "
                f"{row['peer_ms']:.3g} | {_fmt_ratio(row['ratio'])} | {spread} | {row['cases']} |"
            )
        lines.append("")
        if adoption_plot:
            lines += [f"![fastlatent against what you use today]({adoption_plot})", ""]

    rows = summary_rows(results)
    if rows:
        lines += [
            "## Summary against every provider",
            "",
            "Including fastlatent's plain-PyTorch reference twins (ground truth, not alternatives).",
            "",
            "| op | device | vs | cases | speed-up (geometric mean) | range |",
            "|---|---|---|---|---|---|",
        ]
        for row in rows:
            lines.append(
                f"| {row['op']} | {row['device']} | {row['provider']} | {row['cases']} | "
                f"{_fmt_ratio(row['geomean'])} | {_fmt_ratio(row['min'])} - {_fmt_ratio(row['max'])} |"
            )
        lines.append("")

    area_seen = None
    for (area, op, device), cases in _ops(results["cases"]).items():
        if area != area_seen:
            lines += [f"## {area}", ""]
            area_seen = area
        providers = _provider_order(p for c in cases for p in c["providers"])
        dtypes = sorted({c["dtype"] or "-" for c in cases})
        lines += [f"### {op} ({device}, {', '.join(dtypes)})", ""]
        lines.append("| case | " + " | ".join(providers) + " | fastlatent throughput |")
        lines.append("|---" * (len(providers) + 2) + "|")
        for case in cases:
            times = {p: r["min_s"] for p, r in case["providers"].items() if r.get("status") == "ok"}
            fastest = min(times, key=times.get) if len(times) > 1 else None
            cells = [_cell(case["providers"].get(p), p == fastest) for p in providers]
            label = case["case"] + (f" ({case['dtype']})" if len(dtypes) > 1 else "")
            fl = case["providers"].get("fastlatent", {})
            throughput = _throughput(fl) if fl.get("status") == "ok" else "-"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {throughput} |")
        memory = [c for c in cases if any("peak_mem_bytes" in r for r in c["providers"].values())]
        if memory:
            lines += [
                "",
                "Peak memory of one call:",
                "",
                "| case | " + " | ".join(providers) + " |",
                "|---" * (len(providers) + 1) + "|",
            ]
            for case in memory:
                cells = [_fmt_bytes(case["providers"].get(p, {}).get("peak_mem_bytes")) for p in providers]
                lines.append(f"| {case['case']} | " + " | ".join(cells) + " |")
        compiled = [(c["case"], p, r) for c in cases for p, r in c["providers"].items() if "compile_s" in r]
        if compiled:
            notes = "; ".join(
                f"{p} {case}: {r['compile_s']:.1f} s"
                + (f", {r['graph_breaks']} graph breaks" if r.get("graph_breaks") else "")
                for case, p, r in compiled
            )
            lines += ["", f"Compilation (once per case, not timed): {notes}."]
        lines.append("")

    skipped = defaultdict(list)
    failed = []
    for case in results["cases"]:
        for provider, result in case["providers"].items():
            if result.get("status") == "skipped":
                skipped[(case["op"], provider, result.get("reason", ""))].append(case["case"])
            elif result.get("status") == "failed":
                failed.append((case["op"], case["case"], provider, result.get("reason", "")))
    for item in results.get("unattributed", []):
        if item.get("outcome") == "failed":
            failed.append(("?", item.get("id"), "?", item.get("reason", "")))
        else:
            skipped[("?", item.get("id"), item.get("reason", ""))].append(item.get("id"))
    if skipped:
        lines += ["## Skipped", "", "| op | provider | cases | reason |", "|---|---|---|---|"]
        for (op, provider, reason), names in skipped.items():
            lines.append(f"| {op} | {provider} | {len(names)} | {_one_line(reason)} |")
        lines.append("")
    if failed:
        lines += ["## Failed", ""]
        for op, case, provider, reason in failed:
            lines += [f"- **{op} {case} [{provider}]**", "", "```", reason.strip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


# ------------------------------------------------------------------------------------ plots


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "op"


def scaling_series(cases: list[dict], axis: str) -> list[tuple[dict, list[dict]]]:
    """Groups of cases of one op that differ only in ``sizes[axis]`` (at least 3 points, or 2 if none has 3).

    Returns:
        (the sizes held fixed, the cases sorted by the axis) per group, largest groups first.
    """
    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for case in cases:
        sizes = case.get("sizes") or {}
        if axis not in sizes or not isinstance(sizes[axis], (int, float)):
            continue
        fixed = tuple(sorted((k, repr(v)) for k, v in sizes.items() if k != axis)) + (
            ("dtype", case["dtype"]),
        )
        groups.setdefault(fixed, []).append(case)
    series = [
        (dict(fixed), sorted(group, key=lambda c: c["sizes"][axis]))
        for fixed, group in groups.items()
        if len({c["sizes"][axis] for c in group}) >= 2
    ]
    if any(len(g) >= 3 for _, g in series):
        series = [s for s in series if len(s[1]) >= 3]
    return sorted(series, key=lambda s: -len(s[1]))


_COLOURS = {"ours": "#1f77b4", "peer": "#ff7f0e"}


def _verdict(ratio: float) -> str:
    """A peer's time over fastlatent's, in words."""
    if 1 / 1.05 <= ratio <= 1.05:
        return "about fastlatent's time"
    if ratio > 1:
        return f"{ratio:.2g}x fastlatent's time" if ratio < 10 else f"{ratio:.0f}x fastlatent's time"
    return f"fastlatent takes {1 / ratio:.2g}x as long"


def _bar_label(provider: str, result: dict, own_s: float | None) -> str:
    text = f" {fmt_time(result['min_s'])}"
    if own_s and provider != "fastlatent":
        text += f"  ({_verdict(result['min_s'] / own_s)})"
    return text


def _time_bars(plt, cases: list[dict], title: str, path: Path) -> bool:
    """One horizontal bar per (case, provider) for fastlatent, its drop-in forms and the peers, in
    milliseconds,
    each labelled with its time and its ratio to fastlatent; providers name their bars (no legend to hide a
    bar).
    Written only when a peer was measured (a lone fastlatent bar answers nothing)."""
    rows = []
    for case in cases:
        measured = [
            (p, r)
            for p, r in case["providers"].items()
            if r.get("status") == "ok" and provider_kind(p) != "reference"
        ]
        if any(provider_kind(p) == "peer" for p, _ in measured):
            rows.append((case, measured))
    if not rows:
        return False
    bars = sum(len(m) for _, m in rows)
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.28 * bars + 0.35 * len(rows)))
    y, ticks, labels = 0.0, [], []
    for case, measured in rows:
        ax.text(
            0.0,
            y,
            f" {case['case']} ({case['dtype']})",
            transform=ax.get_yaxis_transform(),
            fontsize=7,
            fontweight="bold",
            va="center",
        )
        y += 0.8
        own = case["providers"].get("fastlatent", {})
        own_s = own.get("min_s") if own.get("status") == "ok" else None
        for provider, result in measured:
            ax.barh(y, result["min_s"] * 1e3, height=0.8, color=_COLOURS[provider_kind(provider)])
            ax.text(result["min_s"] * 1e3, y, _bar_label(provider, result, own_s), va="center", fontsize=7)
            ticks.append(y)
            labels.append(provider)
            y += 1
        y += 0.3
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_ylim(y - 0.7, -0.6)  # top to bottom
    ax.set_xscale("log")
    longest = max(r["min_s"] for _, m in rows for _, r in m) * 1e3
    ax.set_xlim(right=longest * 30)  # room for the labels right of the longest bar
    ax.set_xlabel("time per call (ms, log scale; shorter is faster)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_adoption_plot(results: dict, folder: Path) -> Path | None:
    """``adoption.png``: per op, fastlatent (or its drop-in form) beside each alternative people use, in
    milliseconds with the ratio (the rows of :func:`adoption_rows`). None without matplotlib or rows."""
    rows = adoption_rows(results)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    device_name = results.get("meta", {}).get("device", {}).get("name", "")
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.55 * len(rows)))
    ticks, labels = [], []
    for i, row in enumerate(rows):
        y = i * 2.6
        ax.barh(y, row["ours_ms"], height=0.9, color=_COLOURS["ours"])
        ax.barh(y + 1, row["peer_ms"], height=0.9, color=_COLOURS["peer"])
        ax.text(row["ours_ms"], y, f" {row['ours_ms']:.3g} ms", va="center", fontsize=7)
        ax.text(
            row["peer_ms"],
            y + 1,
            f" {row['peer_ms']:.3g} ms ({_verdict(row['ratio'])})",
            va="center",
            fontsize=7,
        )
        ticks += [y, y + 1]
        labels += [f"{row['op']} ({row['device']}): {row['ours']}", f"{row['peer']}"]
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=max(max(r["ours_ms"], r["peer_ms"]) for r in rows) * 40)
    ax.set_xlabel("time per call, ms (log scale; geometric mean over the cases both ran; shorter is faster)")
    ax.set_title(f"fastlatent against what you use today: {device_name}", fontsize=9)
    fig.tight_layout()
    path = folder / "adoption.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: dict, folder: Path) -> list[Path]:
    """Time bars per op (fastlatent, its drop-in forms and the peers, in ms with ratios) and scaling curves
    over N, K, D, resolution (PNG, matplotlib Agg).

    Returns:
        The files written (none when matplotlib is not installed: the report says so).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    device_name = results.get("meta", {}).get("device", {}).get("name", "")
    written = []
    for (area, op, device), cases in _ops(results["cases"]).items():
        path = folder / f"speedup_{_slug(area)}_{_slug(op)}_{device}.png"
        if _time_bars(plt, cases, f"{op}, {device}: {device_name}", path):
            written.append(path)
        for axis in SCALING_AXES:
            series = scaling_series(cases, axis)[:4]
            if not series:
                continue
            fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4), squeeze=False)
            for ax, (fixed, group) in zip(axes[0], series):
                for provider in _provider_order(p for c in group for p in c["providers"]):
                    points = [
                        (c["sizes"][axis], c["providers"][provider]["min_s"] * 1e3)
                        for c in group
                        if c["providers"].get(provider, {}).get("status") == "ok"
                    ]
                    if points:
                        ax.plot(
                            *zip(*points),
                            marker="o",
                            label=provider,
                            linewidth=2.2 if provider == "fastlatent" else 1.2,
                        )
                ax.set_xscale("log", base=2)
                values = sorted({c["sizes"][axis] for c in group})
                ax.set_xticks(values, [f"{v:g}" for v in values])
                ax.minorticks_off()
                ax.set_yscale("log")
                ax.set_xlabel(axis)
                ax.set_ylabel("time per call (ms)")
                ax.set_title(", ".join(f"{k}={v}" for k, v in fixed.items()), fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
            fig.suptitle(f"{op}, {device}: time over {axis} ({device_name})", fontsize=9)
            fig.tight_layout()
            path = folder / f"scaling_{_slug(area)}_{_slug(op)}_{device}_{axis}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
