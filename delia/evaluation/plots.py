"""`delia plot RUN_DIR [RUN_DIR ...]`: a run's curves against step, several runs on one figure.

Writes up to three PNGs: `loss.png` (per-source training loss `loss_downstream` / `loss_diverse` and the eval loss),
`token_loss.png` (tracked-token losses, from `token_loss.jsonl` or the log history; one panel per token) and
`eval_metrics.png` (every other numeric `eval_*` key, one panel each; the timing keys eval_runtime,
eval_samples_per_second and eval_steps_per_second are left out). Each run's curves are labelled with its folder name.

A run folder is read from `log_history.json` (written by `delia demo`), else `trainer_state.json` (written by
`delia train`), else the last `checkpoint-*/trainer_state.json` (any Trainer run with checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..run_files import TOKEN_LOSS_FILE

TRAIN_LOSS_KEYS = {"loss_downstream": "downstream (train)", "loss_diverse": "diverse (train)"}
EVAL_LOSS_KEY = "eval_loss"
TIMING_KEYS = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
Points = list[tuple[float, float]]


# ----------------------------------------------------------------------------------------------------------------------
# Reading run folders
# ----------------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def read_log_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The Trainer's log history of a run folder (see the module docstring for where it is looked for)."""
    folder = Path(run_dir)
    if not folder.exists():
        raise FileNotFoundError(f"{run_dir}: no such folder (expected a run folder of delia train / delia demo)")
    if not folder.is_dir():
        raise ValueError(f"{run_dir}: not a folder (expected a run folder of delia train / delia demo)")
    checkpoints = sorted(
        (path for path in folder.glob("checkpoint-*/trainer_state.json") if path.parent.name[11:].isdigit()),
        key=lambda path: int(path.parent.name[11:]),
    )
    for path in [folder / "log_history.json", folder / "trainer_state.json", *checkpoints[-1:]]:
        if path.is_file():
            data = _read_json(path)
            history = data.get("log_history") if isinstance(data, dict) else data
            if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
                raise ValueError(f"{path}: expected a list of log entries (the Trainer's log_history)")
            return history
    raise ValueError(
        f"{run_dir}: no log_history.json, trainer_state.json or checkpoint-*/trainer_state.json "
        "(expected a run folder of delia train / delia demo)"
    )


def series(history: Sequence[Mapping[str, Any]], key: str) -> Points:
    """(step, value) for every log entry with a finite number under `key`."""
    return [
        (entry["step"], float(entry[key]))
        for entry in history
        if isinstance(entry.get(key), int | float)
        and not isinstance(entry.get(key), bool)
        and math.isfinite(entry[key])
        and "step" in entry
    ]


def read_token_losses(run_dir: str | os.PathLike, history: Sequence[Mapping[str, Any]]) -> dict[str, Points]:
    """{token: (step, mean NLL)} from the run's token_loss.jsonl, else from its `*token_loss/<token>` log keys.

    Eval sets other than the default one (`eval_<name>_token_loss/...`) are named `<name>: <token>`.
    """
    from ..token_loss import METRIC_NAME, read_records  # here: token_loss imports torch, `delia plot --help` does not

    path = Path(run_dir) / TOKEN_LOSS_FILE
    curves: dict[str, Points] = {}
    if path.is_file():
        for record in read_records(path):
            prefix = record.get("prefix", "eval")
            for token, stats in record["tokens"].items():
                if isinstance(stats, dict) and isinstance(stats.get("mean"), (int, float)):
                    name = token if prefix == "eval" else f"{prefix.removeprefix('eval_')}: {token}"
                    curves.setdefault(name, []).append((record["step"], stats["mean"]))
        return curves
    pattern = re.compile(rf"^eval_(?:(.+)_)?{METRIC_NAME}/(.+)$")
    keys = {key for entry in history for key in entry if pattern.match(key)}
    for key in sorted(keys):
        eval_set, token = pattern.match(key).groups()
        curves[token if eval_set is None else f"{eval_set}: {token}"] = series(history, key)
    return curves


def eval_metric_keys(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """Numeric eval_* keys other than eval_loss, the token losses and the timings, in first-seen order."""
    from ..token_loss import METRIC_NAME

    keys: dict[str, None] = {}
    for history in histories.values():
        for entry in history:
            for key, value in entry.items():
                if (
                    key.startswith("eval_")
                    and key != EVAL_LOSS_KEY
                    and f"{METRIC_NAME}/" not in key
                    and key not in TIMING_KEYS
                    and isinstance(value, int | float)
                    and not isinstance(value, bool)
                ):
                    keys[key] = None
    return list(keys)


def run_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Each folder's name, or its full path when two share a name."""
    names = [Path(os.fspath(path).rstrip("/")).name or os.fspath(path) for path in paths]
    return [name if names.count(name) == 1 else os.fspath(path) for name, path in zip(names, paths, strict=True)]


# ----------------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------------


def save_figure(figure: Any, path: str | os.PathLike) -> None:
    """Write a PNG next to its destination, then move it into place, so a kill never leaves half an image."""
    from ..io import replace_atomically

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    replace_atomically(path, lambda out: figure.savefig(out, format="png", dpi=120), binary=True)


def _panels(count: int, title: str):
    from matplotlib.figure import Figure

    columns = min(3, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[count:]:
        extra.set_visible(False)
    figure.suptitle(title)
    return figure, axes[:count]


def plot_loss(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike | None = None):
    """loss_downstream, loss_diverse and eval_loss against step, every run on one axes (colour = run)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    axes = figure.subplots()
    for index, (run, history) in enumerate(histories.items()):
        colour = f"C{index % 10}"
        for key, name, style in (
            *((key, name, "-") for key, name in TRAIN_LOSS_KEYS.items()),
            (EVAL_LOSS_KEY, "eval", "o:"),
        ):
            style = "--" if key == "loss_diverse" else style
            points = series(history, key)
            if points:
                axes.plot(*zip(*points, strict=True), style, color=colour, label=f"{run}: {name}", markersize=4)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("mean NLL per token")
    axes.set_title("DELIA: loss per source")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    if path is not None:
        save_figure(figure, path)
    return figure


def plot_curves(
    curves: Mapping[str, Mapping[str, Points]], title: str, ylabel: str, path: str | os.PathLike | None = None
):
    """One panel per curve name ({run: {name: points}}), one line per run in each; None when there is nothing."""
    names = list(dict.fromkeys(name for per_run in curves.values() for name in per_run))
    if not names:
        return None
    figure, panels = _panels(len(names), title)
    for axes, name in zip(panels, names, strict=True):
        for index, (run, per_run) in enumerate(curves.items()):
            if per_run.get(name):
                axes.plot(*zip(*per_run[name], strict=True), "o-", color=f"C{index % 10}", label=run, markersize=3)
        axes.set_title(name, fontsize="medium")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(ylabel)
        axes.legend(fontsize="small")
    if path is not None:
        save_figure(figure, path)
    return figure


def plot_runs(run_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read every run (all errors before anything is written), write the PNGs; return {file name: Figure}.

    `output_dir` defaults to the run folder for one run, and to `plots/` for several.
    """
    if not run_dirs:
        raise ValueError("give at least one run folder")
    labels = run_labels(run_dirs)
    histories = {label: read_log_history(path) for label, path in zip(labels, run_dirs, strict=True)}
    token_losses = {
        label: read_token_losses(path, histories[label]) for label, path in zip(labels, run_dirs, strict=True)
    }
    output = Path(output_dir if output_dir is not None else run_dirs[0] if len(run_dirs) == 1 else "plots")
    keys = eval_metric_keys(histories)
    metrics = {label: {key: series(history, key) for key in keys} for label, history in histories.items()}
    figures = {
        "loss.png": plot_loss(histories),
        "token_loss.png": plot_curves(token_losses, "tracked-token loss (eval)", "mean NLL"),
        "eval_metrics.png": plot_curves(metrics, "eval metrics", "value"),
    }
    figures = {name: figure for name, figure in figures.items() if figure is not None}
    for name, figure in figures.items():
        save_figure(figure, output / name)
    return figures


@dataclass
class PlotArguments:
    """`delia plot`'s options (the run folders are named apart)."""

    output: str | None = field(
        default=None, metadata={"help": "folder for the PNGs (default: the run folder; plots/ for several)"}
    )


def main(argv: list[str] | None = None) -> int:
    from ..command_line import command_parser

    parser = command_parser(PlotArguments, "delia plot", __doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (delia train / delia demo output_dir)")
    options, positionals = parser.parse_args_into_dataclasses(argv)
    try:
        figures = plot_runs(positionals.runs, options.output)
    except (ValueError, OSError) as error:
        print(f"delia plot: error: {error}", file=sys.stderr)
        return 2
    runs = positionals.runs
    output = Path(options.output or (runs[0] if len(runs) == 1 else "plots"))
    print("wrote " + ", ".join(str(output / name) for name in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
