"""Training metrics: one JSON object per line in ``metrics.jsonl`` and PNG plots of the curves."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from fastlatent.training.checkpoint import atomic_write_bytes

# Keys that describe a record rather than a curve worth plotting.
NOT_PLOTTED = frozenset({"step", "epoch", "time", "kind"})


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All complete records of a ``metrics.jsonl`` (a torn last line from a killed writer is dropped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a partial line can only be the last one written before a kill
    return records


class MetricsLogger:
    """Appends records to ``out_dir/metrics.jsonl`` and draws ``out_dir/metrics.png``.

    Args:
        out_dir: folder of the run.
        resume_step: when resuming from a checkpoint at this step, records after it (written by the run
            that was killed after the checkpoint) are dropped, so the file continues exactly where the
            checkpoint stopped. ``None``: start a fresh file.
    """

    def __init__(self, out_dir: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.plot_path = Path(out_dir) / "metrics.png"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.records: list[dict] = []
        else:
            self.records = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        # Rewrite atomically: the kept records, with any torn or stale tail removed.
        payload = "".join(json.dumps(r) + "\n" for r in self.records).encode()
        atomic_write_bytes(self.path, lambda f: f.write(payload))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        record = {k: _plain(v) for k, v in record.items()}
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def plot(self) -> None:
        plot_metrics(self.records, self.plot_path)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the information as a string
    return value


def plot_metrics(records: Iterable[dict], path: str | os.PathLike, title: str | None = None) -> None:
    """One panel per numeric key against ``step``, written atomically as a PNG (matplotlib, Agg backend).

    Training records and evaluation records (``"kind": "eval"``, from callbacks) are drawn in the same
    panels as separate lines. Positive curves spanning more than two decades get a log y axis.
    """
    # A bare Figure renders with Agg and never touches pyplot's global backend or a display. Imported here:
    # matplotlib takes ~0.8 s to import, paid only by runs that plot.
    from matplotlib.figure import Figure

    records = list(records)
    series: dict[str, dict[str, tuple[list, list]]] = {}
    for record in records:
        kind = record.get("kind", "train")
        step = record.get("step")
        if step is None:
            continue
        for key, value in record.items():
            if key in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            xs, ys = series.setdefault(key, {}).setdefault(kind, ([], []))
            xs.append(step)
            ys.append(value)
    if not series:
        return
    first = ("loss", "disc_loss")
    keys = sorted(series, key=lambda k: (first.index(k) if k in first else len(first), k))
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    # Fixed margins: a layout engine (constrained/tight) costs an extra draw, several times the plot itself.
    height = 2.6 * rows + 0.4
    fig = Figure(figsize=(4.2 * cols, height), dpi=90)
    fig.subplots_adjust(
        left=0.08 if cols > 1 else 0.15,
        right=0.98,
        bottom=0.5 / height,
        top=1 - 0.45 / height,
        wspace=0.28,
        hspace=0.55,
    )
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        all_values = []
        for kind, (xs, ys) in series[key].items():
            if len(xs) >= 50:  # noisy per-step curves: faint raw values under a smoothed line
                (line,) = ax.plot(xs, ys, linewidth=0.6, alpha=0.3)
                ax.plot(xs, _smooth(ys), label=kind, color=line.get_color(), linewidth=1.2)
            else:
                ax.plot(xs, ys, label=kind, marker="o", markersize=3, linewidth=1)
            all_values.extend(ys)
        positive = [v for v in all_values if math.isfinite(v)]
        if positive and min(positive) > 0 and max(positive) / min(positive) > 100:
            ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(series[key]) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, lambda f: f.write(buffer.getvalue()))


def _smooth(values: list[float], span: int = 20) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing), skipping non-finite values."""
    alpha = 2.0 / (span + 1)
    out, average, weight = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            average = (1 - alpha) * average + alpha * v
            weight = (1 - alpha) * weight + alpha
        out.append(average / weight if weight > 0 else float("nan"))
    return out
