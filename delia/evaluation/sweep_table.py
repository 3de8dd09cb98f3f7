"""The sweep's table and figures: one row per arm (mean ± std over seeds), `sweep.md`, `sweep.csv`, `sweep_<metric>`,
and with the base model `sweep_frontier` (format rate against the change in general NLL).

Reads only the runs' reports (written by `delia sweep`), so a table can be rebuilt from finished run folders. A report
written before a metric existed shows n/a in that column.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections.abc import Sequence
from functools import partial
from typing import Any

from ..io import replace_atomically
from ..run_files import SWEEP_CSV_FILE, SWEEP_TABLE_FILE

#: The metrics of the table and the figures: (summary key, label, kind).
METRICS = (
    ("parse_rate", "parse rate", "rate"),
    ("accuracy", "accuracy", "rate"),
    ("balanced_accuracy", "balanced accuracy", "rate"),
    ("macro_f1", "macro-F1", "score"),
    ("f1_yes", "F1 (yes)", "score"),
    ("dict_rate_follow", "dict rate, follow", "rate"),
    ("dict_rate_do_not", "dict rate, DO-NOT", "rate"),
    ("sensitivity", "sensitivity", "points"),
    ("general_nll", "general NLL/token", "nll"),
    ("probe_score", "<sep> probe", "score"),
)
#: The training budget each run's report records (mean over seeds in the table): key, column title. Row-visits are the
#: downstream rows times the epochs the trainer went through (its state's `epoch`), so arms trained for the same steps
#: at different ratios, or for different epochs, can be compared on how often they saw the task's rows.
TRAINING_COLUMNS = {"steps": "steps", "epochs": "epochs", "downstream_row_visits": "downstream row-visits"}


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values that exist (std None for fewer than two)."""
    present = [value for value in values if value is not None and not math.isnan(value)]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


def _metric(run: dict[str, Any], key: str) -> float | None:
    """A run's value of a table metric: its eval summary's, or for `probe_score` its probe's summary score (the mean
    over the upper half of the blocks, as `delia probe` prints it)."""
    if key != "probe_score":
        return run["summary"].get(key)
    from .probe import summary_score

    layers = (run.get("probe") or {}).get("layers") or []
    return summary_score([layer["score"] for layer in layers])[0] if layers else None


def summarise(reports: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per arm (and the base): runs, format learned in how many, the training budget, mean and std of every
    metric. `steps`, `epochs` and `downstream_row_visits` are the means of what each run's trainer recorded (None for
    the base, and for reports written before a key existed)."""
    rows = []
    for name, runs in reports.items():
        training = [run.get("training") or {} for run in runs]
        row: dict[str, Any] = {
            "run": name,
            "runs": len(runs),
            "format_learned": sum(bool(run["summary"].get("format_learned")) for run in runs),
        }
        for key in TRAINING_COLUMNS:
            row[key] = _mean_std([record.get(key) for record in training])[0]
        for key, _, _ in METRICS:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([_metric(run, key) for run in runs])
        rows.append(row)
    return rows


def _cell(kind: str, mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    if kind == "rate":
        text = f"{mean:.1%}" if std is None else f"{mean:.1%} ± {std * 100:.1f}"
    elif kind == "points":
        text = f"{mean * 100:+.1f} pts" if std is None else f"{mean * 100:+.1f} ± {std * 100:.1f} pts"
    elif kind == "nll":
        text = f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"
    else:
        text = f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"
    return text


def _count(value: float | None) -> str:
    """A training column's cell: '' where not recorded, whole numbers without decimals, others to one decimal."""
    if value is None:
        return ""
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.1f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep as a markdown table: one row per arm, mean ± std over seeds. The probe's column is left out when no run
    was probed (`--probe false`, as in `delia demo --real`), rather than shown as n/a throughout."""
    probed = any(row.get("probe_score_mean") is not None for row in rows)
    metrics = [metric for metric in METRICS if probed or metric[0] != "probe_score"]
    header = ["run", "runs", *TRAINING_COLUMNS.values(), "format learned"] + [label for _, label, _ in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["run"], str(row["runs"]), *(_count(row.get(key)) for key in TRAINING_COLUMNS)]
        cells.append(f"{row['format_learned']}/{row['runs']}")
        cells += [_cell(kind, row[f"{key}_mean"], row[f"{key}_std"]) for key, _, kind in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return buffer.getvalue()


def _write_figure(figure: Any, path: str, file_format: str) -> str:
    """Write `figure` to `path` atomically (a kill never leaves half an image), close it, and return the path."""
    import matplotlib.pyplot as plt

    try:
        replace_atomically(path, partial(figure.savefig, format=file_format, dpi=110), binary=True)
    finally:
        plt.close(figure)
    return path


def plot_metrics(
    rows: Sequence[dict[str, Any]], folder: str, file_format: str = "png", metrics: Sequence[str] | None = None
) -> list[str]:
    """One bar chart per metric (a bar per arm, error bars over seeds), each written atomically; the paths.

    `file_format` is any matplotlib can write (`svg` gives text files for a README); `metrics` picks summary keys.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    paths = []
    for key, label, kind in METRICS:
        if metrics is not None and key not in metrics:
            continue
        means, stds = [row[f"{key}_mean"] for row in rows], [row[f"{key}_std"] for row in rows]
        if all(mean is None for mean in means):
            continue
        figure, axes = plt.subplots(figsize=(1.4 * len(rows) + 2.5, 3.5))  # n/a: no bar, but its label
        heights = [0.0 if mean is None else mean for mean in means]
        bars = axes.bar(range(len(rows)), heights, yerr=[std or 0.0 for std in stds], capsize=4, color="tab:blue")
        # each value as the table writes it, so that a zero or a missing value is read, not guessed from no bar
        axes.bar_label(bars, [_cell(kind, *pair) for pair in zip(means, stds, strict=True)], padding=4, fontsize=8)
        axes.margins(y=0.2)  # room for the labels under the title
        if kind in ("rate", "points"):  # fractions, shown as the table's percentages
            axes.yaxis.set_major_formatter(PercentFormatter(1.0))
        axes.set_xticks(range(len(rows)), [row["run"] for row in rows])
        axes.set_ylabel(label)
        axes.set_title(f"{label} by run")
        figure.tight_layout()
        paths.append(_write_figure(figure, os.path.join(folder, f"sweep_{key}.{file_format}"), file_format))
    return paths


def frontier_points(rows: Sequence[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(arm, change in general NLL from the base model's, format rate when told to follow) for each arm that has both;
    empty without a base row that has a general NLL (`--include_base`)."""
    base = next((row for row in rows if row["run"] == "base"), None)
    if base is None or base["general_nll_mean"] is None:
        return []
    return [
        (row["run"], row["general_nll_mean"] - base["general_nll_mean"], row["dict_rate_follow_mean"])
        for row in rows
        if row is not base and row["general_nll_mean"] is not None and row["dict_rate_follow_mean"] is not None
    ]


def plot_frontier(rows: Sequence[dict[str, Any]], folder: str, file_format: str = "png") -> str | None:
    """The trade-off frontier: format rate against the change in general NLL, one point per arm (left and up
    is better: the format learned, the general behaviour kept), as `sweep_frontier.<format>`; None without a base."""
    points = frontier_points(rows)
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    figure, axes = plt.subplots(figsize=(8.2, 4.6))
    for index, (name, change, rate) in enumerate(points):  # a marker per arm, named in the legend: close points stay
        plain = name == "ratio-0" or name.startswith("ratio-0-")  # ratio-0-epochs-3, not ratio-0.5
        marker = "osD^vPX*<>ph"[index % 12]
        axes.scatter(change, rate, color="tab:orange" if plain else "tab:blue", marker=marker, s=45, label=name)
    axes.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")  # the base model's general NLL
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.set_ylim(-0.12, 1.12)
    axes.margins(x=0.1)
    axes.set_xlabel("change in general NLL/token from the base model (left: general behaviour kept)")
    axes.set_ylabel("dict rate, follow (format learned)")
    axes.set_title("format against general NLL, one point per arm (orange: plain SFT)")
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    figure.tight_layout()
    return _write_figure(figure, os.path.join(folder, f"sweep_frontier.{file_format}"), file_format)


def write_tables(rows: Sequence[dict[str, Any]], folder: str) -> str:
    """sweep.md and sweep.csv, each written atomically; returns the markdown."""
    table = markdown_table(rows)
    replace_atomically(os.path.join(folder, SWEEP_TABLE_FILE), lambda out: out.write(table + "\n"))
    replace_atomically(os.path.join(folder, SWEEP_CSV_FILE), lambda out: out.write(_csv_text(rows)))
    return table
