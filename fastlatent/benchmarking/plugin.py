"""pytest plugin that ``fastlatent bench`` loads into the suites' run (``-p fastlatent.benchmarking.plugin``).

It selects cases (device, quick/full, ``--filter``/``--exclude``), prints one progress line per
case, and records every case's outcome, description and measurement (from the report's
``user_properties``, see :class:`fastlatent.benchmarking.measure.Bench`) to ``--fl-record``.
"""

from __future__ import annotations

import json
import os
import re

from fastlatent.benchmarking.measure import CASE_KEY, RESULT_KEY
from fastlatent.benchmarking.report import fmt_time

PROGRESS_PREFIX = "fastlatent-bench: "


def case_id(item) -> str:
    """``area/test_name[params]``, what ``--filter`` and ``--exclude`` match against."""
    module = getattr(item, "module", None)
    area = getattr(module, "BENCH_AREA", None) or (module.__name__.removeprefix("bench_") if module else "")
    return f"{area}/{item.name}"


def _matches(pattern: str, text: str) -> bool:
    pattern, text = pattern.lower(), text.lower()
    if any(ch in pattern for ch in "*?"):
        # only * and ? are wildcards: case ids hold brackets, which fnmatch would read as character sets
        regex = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
        return re.search(regex, text) is not None
    return pattern in text


def split_patterns(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated patterns as one list, blanks dropped."""
    return [p.strip() for value in values or [] for p in value.split(",") if p.strip()]


def selected(identifier: str, include: list[str], exclude: list[str]) -> bool:
    """Whether a case runs: it matches some ``include`` pattern (or there are none) and no ``exclude``.

    Patterns are case-insensitive substrings of the case id (``area/test_name[params]``); in a pattern
    with ``*`` or ``?`` those two are wildcards (everything else literal, brackets included), matched
    anywhere in the id.
    """
    if include and not any(_matches(p, identifier) for p in include):
        return False
    return not any(_matches(p, identifier) for p in exclude)


def pytest_addoption(parser):
    group = parser.getgroup("fastlatent-bench")
    group.addoption(
        "--fl-record", default=None, help="write every case's outcome and measurements to this JSON"
    )
    group.addoption(
        "--fl-device",
        default=None,
        choices=["cpu", "cuda"],
        help="run only the cases of this device (the `cuda` marker marks GPU cases)",
    )
    group.addoption(
        "--fl-filter", action="append", default=[], help="run only cases whose id matches (repeatable)"
    )
    group.addoption(
        "--fl-exclude", action="append", default=[], help="skip cases whose id matches (repeatable)"
    )
    group.addoption("--fl-list", action="store_true", default=False, help="print the selected case ids")


def _full_run(config) -> bool:
    try:
        return bool(config.getoption("--full"))
    except ValueError:  # suites without a --full option
        return False


def pytest_collection_modifyitems(session, config, items):
    include = split_patterns(config.getoption("--fl-filter"))
    exclude = split_patterns(config.getoption("--fl-exclude"))
    device = config.getoption("--fl-device")
    full = _full_run(config)
    keep, drop = [], []
    for item in items:
        on_cuda = item.get_closest_marker("cuda") is not None
        wanted = (
            selected(case_id(item), include, exclude)
            and (device is None or on_cuda == (device == "cuda"))
            and (full or item.get_closest_marker("full") is None)
        )
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    config._fl_plan = {item.nodeid: _item_info(item) for item in keep}


def pytest_collection_finish(session):
    if not session.config.getoption("--fl-list"):
        return
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    for item in session.items:
        terminal.write_line(PROGRESS_PREFIX + case_id(item))
    terminal.write_line(f"{PROGRESS_PREFIX}{len(session.items)} selected (one per case and provider)")


def _item_info(item) -> dict:
    callspec = getattr(item, "callspec", None)
    params = dict(callspec.params) if callspec else {}
    provider = params.pop("provider", None)
    module = getattr(item, "module", None)
    return {
        "id": case_id(item),
        "test": item.originalname if hasattr(item, "originalname") else item.name,
        "module": module.__name__ if module else "",
        "provider": provider if isinstance(provider, str) else None,
        # same key for every provider of one case: how skips without a description find their case
        "case_key": f"{item.module.__name__ if module else ''}::{getattr(item, 'originalname', item.name)}"
        f"[{', '.join(f'{k}={v!r}' for k, v in sorted(params.items()))}]",
    }


def _reason(report) -> str:
    longrepr = report.longrepr
    if report.skipped and isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    text = getattr(report, "longreprtext", "") or str(longrepr or "")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E ")]
    return "\n".join((errors or lines)[-6:])[:2000]


class _Recorder:
    def __init__(self, config):
        self.config = config
        self.records: dict[str, dict] = {}
        self.done = 0

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and not report.passed):
            props = dict(report.user_properties)
            plan = getattr(self.config, "_fl_plan", {}).get(report.nodeid, {})
            record = {
                "nodeid": report.nodeid,
                **plan,
                "outcome": report.outcome,
                "duration_s": report.duration,
                "case": props.get(CASE_KEY),
                "result": props.get(RESULT_KEY),
            }
            if not report.passed:
                record["reason"] = _reason(report)
            self.records[report.nodeid] = record
            self.done += 1
            self._progress(record)
            self._write(finished=False)
        elif report.when == "teardown" and report.failed:
            record = self.records.setdefault(report.nodeid, {"nodeid": report.nodeid})
            record.update(outcome="failed", reason=_reason(report))
            self._write(finished=False)

    def _progress(self, record):
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        if terminal is None:
            return
        total = len(getattr(self.config, "_fl_plan", {})) or "?"
        case = record.get("case") or {}
        label = (
            f"{case.get('op')} {case.get('device')} {case.get('case')} [{case.get('provider')}]"
            if case
            else record.get("id", record["nodeid"])
        )
        if record["outcome"] == "passed" and record.get("result"):
            detail = fmt_time(record["result"]["min_s"])
        elif record["outcome"] == "passed":
            detail = "passed (nothing measured)"
        else:
            reason = record.get("reason", "").splitlines()[0] if record.get("reason") else ""
            detail = f"{record['outcome']}: {reason}"
        terminal.write_line(f"{PROGRESS_PREFIX}[{self.done}/{total}] {label}: {detail}")

    def _write(self, finished: bool, exitstatus: int | None = None):
        """Rewritten after every case, so an interrupted run still leaves what it measured."""
        path = self.config.getoption("--fl-record")
        if not path:
            return
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "records": list(self.records.values()),
                    "finished": finished,
                    "exitstatus": exitstatus,
                    "planned": len(getattr(self.config, "_fl_plan", {})),
                },
                f,
                indent=1,
                default=str,
            )
        os.replace(tmp, path)

    def pytest_sessionfinish(self, session, exitstatus):
        self._write(finished=True, exitstatus=int(exitstatus))


def pytest_configure(config):
    config.pluginmanager.register(_Recorder(config), "fastlatent-bench-recorder")
