"""`delia plot RUN_DIR [RUN_DIR ...]`: a run's curves against step, several runs on one figure.

Writes up to three PNGs: `loss.png` (the training loss, per source `loss_downstream` / `loss_diverse` where the run
logged it, else its total `loss`, as for plain SFT at ratio 0; and the eval loss), `token_loss.png` (tracked-token
losses, from `token_loss.jsonl` or the log history; one panel per token) and `eval_metrics.png` (every other numeric
`eval_*` metric, one panel each; counts and timings such as eval_num_tokens and eval_runtime are left out). Each
run's curves are labelled with its folder name.

A run folder is read from `log_history.json` (written by `delia demo`), else `trainer_state.json` (written by
`delia train`), else the last `checkpoint-*/trainer_state.json` (any Trainer run with checkpoints). A folder with none
of these but run folders below it (a `delia sweep` output or `delia demo --real`'s folder: `ratio-*/seed-*/`) stands
for every run in it.
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
TRAIN_TOTAL_KEY = "loss"
#: Logged eval values that are counts or timings, not measures of the model: no panel of their own.
NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "num_tokens", "epoch")
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


def _log_file(folder: Path) -> Path | None:
    """Where a run folder's log history is: log_history.json, trainer_state.json or the last checkpoint's state."""
    checkpoints = sorted(
        (path for path in folder.glob("checkpoint-*/trainer_state.json") if path.parent.name[11:].isdigit()),
        key=lambda path: int(path.parent.name[11:]),
    )
    for path in [folder / "log_history.json", folder / "trainer_state.json", *checkpoints[-1:]]:
        if path.is_file():
            return path
    return None


def read_log_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The Trainer's log history of a run folder (see the module docstring for where it is looked for)."""
    folder = Path(run_dir)
    if not folder.exists():
        raise FileNotFoundError(f"{run_dir}: no such folder (expected a run folder of delia train / delia demo)")
    if not folder.is_dir():
        raise ValueError(f"{run_dir}: not a folder (expected a run folder of delia train / delia demo)")
    path = _log_file(folder)
    if path is None:
        raise ValueError(
            f"{run_dir}: no log_history.json, trainer_state.json or checkpoint-*/trainer_state.json "
            "(expected a run folder of delia train / delia demo)"
        )
    data = _read_json(path)
    history = data.get("log_history") if isinstance(data, dict) else data
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise ValueError(f"{path}: expected a list of log entries (the Trainer's log_history)")
    return history


def _natural(path: Path) -> list[Any]:
    """Sort key: ratio-2 before ratio-10, seed-1 before seed-2 (numbers compared as numbers)."""
    return [
        (0, float(part)) if re.fullmatch(r"\d+(?:\.\d+)?", part) else (1, part)
        for part in re.split(r"(\d+(?:\.\d+)?)", path.as_posix())
        if part
    ]


def runs_in(folder: str | os.PathLike) -> list[Path]:
    """The run folders a folder stands for: itself when it holds a log history, else the run folders one or two
    levels below it that do (a sweep's or `delia demo --real`'s `ratio-*/seed-*/`), in ratio then seed order."""
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(
            f"{folder}: no such folder (expected a run folder of delia train / delia demo, or a sweep's)"
        )
    if not root.is_dir():
        raise ValueError(f"{folder}: not a folder (expected a run folder of delia train / delia demo, or a sweep's)")
    if _log_file(root) is not None:
        return [root]
    below = [path for path in [*root.glob("*/"), *root.glob("*/*/")] if path.is_dir() and _log_file(path)]
    below = [path for path in below if not any(parent in below for parent in path.parents)]
    if not below:
        raise ValueError(
            f"{folder}: no log_history.json, trainer_state.json or checkpoint-*/trainer_state.json, in it or in "
            "run folders below it (expected a run folder of delia train / delia demo, or a sweep's output_dir)"
        )
    return sorted(below, key=lambda path: _natural(path.relative_to(root)))


def expand_runs(folders: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """{label: run folder} for every run the folders stand for (see `runs_in`); errors before anything is read.

    A run found below a given folder is labelled by its path there ("ratio-0/seed-0", the seed left out when every
    run has the same one; ratio 0 marked as plain SFT), prefixed with the folder's name when several are given.
    """
    found = [(folder, runs_in(folder)) for folder in folders]
    tops = run_labels(folders)
    runs: dict[str, Path] = {}
    for top, (folder, paths) in zip(tops, found, strict=True):
        if paths == [Path(folder)]:
            runs[top] = paths[0]
            continue
        relative = [path.relative_to(folder).as_posix() for path in paths]
        seeds = {part for name in relative for part in name.split("/") if part.startswith("seed-")}
        for name, path in zip(relative, paths, strict=True):
            label = name.rsplit("/seed-", 1)[0] if len(seeds) == 1 else name
            label = label.replace("ratio-0/", "ratio-0 (SFT)/") if label != "ratio-0" else "ratio-0 (SFT)"
            runs[f"{top}: {label}" if len(folders) > 1 else label] = path
    return runs


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
    """Numeric eval_* keys other than the eval losses, the token losses, counts and timings, in first-seen order."""
    from ..token_loss import METRIC_NAME

    keys: dict[str, None] = {}
    for history in histories.values():
        for entry in history:
            for key, value in entry.items():
                if (
                    key.startswith("eval_")
                    and key != EVAL_LOSS_KEY
                    and f"{METRIC_NAME}/" not in key
                    and not key.startswith(f"{EVAL_LOSS_KEY}_")  # eval_loss_downstream: eval_loss, in loss.png
                    and not key.endswith(NOT_METRICS)
                    and isinstance(value, int | float)
                    and not isinstance(value, bool)
                ):
                    keys[key] = None
    return list(keys)


def run_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Each folder's name (a sweep's seed-N with its ratio-R/), or its full path when two share a name."""
    folders = [Path(os.fspath(path).rstrip("/")) for path in paths]
    names = [
        f"{folder.parent.name}/{folder.name}" if re.fullmatch(r"seed-\d+", folder.name) else folder.name or str(folder)
        for folder in folders
    ]
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


#: How each kind of loss curve is drawn, and what the legend says of it.
LOSS_STYLES = {
    "downstream (train)": ("-", "train: downstream rows"),
    "train": ("-", "train (plain SFT: downstream rows only)"),
    "diverse (train)": (":", "train: diverse rows"),
    "eval": ("o--", "eval"),
}


def _loss_series(history: Sequence[Mapping[str, Any]]) -> list[tuple[str, Points]]:
    """(name, points) of a run's loss curves: per source when it logged them, else its total loss; then eval."""
    per_source = [(name, series(history, key)) for key, name in TRAIN_LOSS_KEYS.items()]
    curves = [curve for curve in per_source if curve[1]] or [("train", series(history, TRAIN_TOTAL_KEY))]
    return [*curves, ("eval", series(history, EVAL_LOSS_KEY))]


def _loss_legends(figure: Any, axes: Any, runs: Sequence[str], drawn: set[str]) -> None:
    """Legends that never hide a curve: with several runs, colour = run and line style = loss, beside the axes."""
    from matplotlib.lines import Line2D

    kinds = [(style, text) for name, (style, text) in LOSS_STYLES.items() if name in drawn]
    if {"train", "downstream (train)"} <= drawn:  # one solid line each: what plain SFT and DELIA both learn from
        kinds = [("-", "train: downstream rows (plain SFT: all)")] + kinds[2:]
    styles = [
        Line2D([], [], color="0.3", linestyle=style.lstrip("o"), marker="o" * style.startswith("o"))
        for style, _ in kinds
    ]
    texts = [text for _, text in kinds]
    if len(runs) <= 1:
        if styles:
            axes.legend(styles, texts, fontsize="small", loc="best")
        return
    colours = [Line2D([], [], color=f"C{index % 10}", linewidth=3) for index in range(len(runs))]
    figure.legend(colours, runs, title="run", loc="outside right upper", fontsize="small")
    if styles:
        figure.legend(styles, texts, title="curve", loc="outside right lower", fontsize="small")


def plot_loss(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike | None = None):
    """Training loss (per source, else total) and eval loss against step, every run on one axes (colour = run).

    Each line is labelled `<run>: <curve>` (the legends show colours and styles apart)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(9 if len(histories) > 1 else 7, 4.5), layout="constrained")
    axes = figure.subplots()
    drawn: set[str] = set()
    for index, (run, history) in enumerate(histories.items()):
        for name, points in _loss_series(history):
            if points:
                drawn.add(name)
                style = LOSS_STYLES[name][0]
                axes.plot(*zip(*points, strict=True), style, color=f"C{index % 10}", label=f"{run}: {name}", ms=4)
    axes.set_xlabel("optimizer step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("mean NLL per token")
    only = f": {next(iter(histories))}" if len(histories) == 1 else ""
    axes.set_title(f"Training and eval loss{only}")
    _loss_legends(figure, axes, list(histories), drawn)
    if path is not None:
        save_figure(figure, path)
    return figure


def plot_curves(
    curves: Mapping[str, Mapping[str, Points]], title: str, ylabel: str, path: str | os.PathLike | None = None
):
    """One panel per curve name ({run: {name: points}}), one line per run in each (colour = run, as in loss.png);
    None when there is nothing."""
    from matplotlib.ticker import MaxNLocator

    names = list(dict.fromkeys(name for per_run in curves.values() for name in per_run))
    if not names:
        return None
    drawn = [run for run, per_run in curves.items() if any(per_run.values())]
    figure, panels = _panels(len(names), f"{title}: {drawn[0]}" if len(drawn) == 1 else title)
    for axes, name in zip(panels, names, strict=True):
        for index, (run, per_run) in enumerate(curves.items()):
            if per_run.get(name):
                axes.plot(*zip(*per_run[name], strict=True), "o-", color=f"C{index % 10}", label=run, markersize=3)
        axes.set_title(name, fontsize="medium")
        axes.set_xlabel("optimizer step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(ylabel)
        if len(drawn) > 1:  # one run is named in the title
            axes.legend(fontsize="small")
    if path is not None:
        save_figure(figure, path)
    return figure


def plot_runs(run_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read every run (all errors before anything is written), write the PNGs; return {file name: Figure}.

    A folder of runs (a sweep's, `delia demo --real`'s) stands for every run in it (`expand_runs`). `output_dir`
    defaults to the folder given when there is one, and to `plots/` for several.
    """
    if not run_dirs:
        raise ValueError("give at least one run folder")
    runs = expand_runs(run_dirs)
    histories = {label: read_log_history(path) for label, path in runs.items()}
    token_losses = {label: read_token_losses(path, histories[label]) for label, path in runs.items()}
    output = Path(output_dir if output_dir is not None else default_output(run_dirs))
    keys = eval_metric_keys(histories)
    metrics = {label: {_title(key): series(history, key) for key in keys} for label, history in histories.items()}
    figures = {
        "loss.png": plot_loss(histories),
        "token_loss.png": plot_curves(token_losses, "Tracked-token loss on the eval rows", "mean NLL"),
        "eval_metrics.png": plot_curves(metrics, "Eval metrics (TRL's, on the eval rows)", ""),
    }
    figures = {name: figure for name, figure in figures.items() if figure is not None}
    for name, figure in figures.items():
        save_figure(figure, output / name)
    return figures


def _title(key: str) -> str:
    """An eval metric's panel title: eval_mean_token_accuracy -> mean token accuracy."""
    return key.removeprefix("eval_").replace("_", " ")


def default_output(run_dirs: Sequence[str | os.PathLike]) -> str:
    """Where `delia plot` writes without --output: the folder given, or plots/ for several."""
    return os.fspath(run_dirs[0]) if len(run_dirs) == 1 else "plots"


@dataclass
class PlotArguments:
    """`delia plot`'s options (the run folders are named apart)."""

    output: str | None = field(
        default=None, metadata={"help": "folder for the PNGs (default: the run folder; plots/ for several)"}
    )


def main(argv: list[str] | None = None) -> int:
    from ..command_line import command_parser

    parser = command_parser(PlotArguments, "delia plot", __doc__.splitlines()[0])
    parser.add_argument(
        "runs",
        nargs="+",
        help="run folders (delia train / delia demo output_dir), or a folder of runs (a sweep's output_dir, "
        "delia demo --real's)",
    )
    options, positionals = parser.parse_args_into_dataclasses(argv)
    try:
        figures = plot_runs(positionals.runs, options.output)
    except (ValueError, OSError) as error:
        print(f"delia plot: error: {error}", file=sys.stderr)
        return 2
    runs = positionals.runs
    output = Path(options.output or default_output(runs))
    print("wrote " + ", ".join(str(output / name) for name in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
