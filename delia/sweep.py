"""`delia sweep`: one training run per diverse ratio (and seed), each evaluated, then one table and one figure per metric.

Every run trains from the same base model on the same downstream rows with `DSFTTrainer` (LoRA + `<sep>`, set up
by `delia.train.build_trainer`, so every `delia train` option applies), at its own `diverse_ratio`; ratio 0 is plain
instruction tuning. The budget is the same number of optimizer steps for every ratio (`--budget steps`, with
`--max_steps`) or one epoch over each mixture (`--budget epoch`, as in the paper: larger ratios train longer). Each
run is evaluated with `delia eval`'s measures in memory, right after training; the base model is evaluated once too
(`--include_base`), as the reference for forgetting.

Resumable: a run whose `eval_report.json` exists is not trained again (its settings must match). The sweep writes
`sweep.md` and `sweep.csv` (mean ± std over seeds per ratio) and `sweep_<metric>.png` into `--output_dir`.

    delia sweep --model_name_or_path MODEL --train_dataset train.jsonl --diverse_dataset cache.jsonl \
        --ratios 0 20 67 260 --budget steps --max_steps 200 --seeds 0 1 2 --output_dir runs/sweep
    delia sweep --config reproduce_checkpoint/recipe.yaml --ratios 0 20 67 260 --budget epoch --output_dir runs/sweep
"""

from __future__ import annotations

import copy
import csv
import gc
import io
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .bundled import DEFAULT_EVAL_DATASET
from .config import DSFTConfig, check_diverse_ratio
from .evaluation.eval_data import EvalData, load_eval_data
from .evaluation.evaluate import EvalArguments, evaluate_model, write_report
from .evaluation.report import read_report
from .io import replace_atomically
from .progress import label_training_bar
from .run_files import EVAL_REPORT_FILE, SWEEP_CSV_FILE, SWEEP_TABLE_FILE
from .runtime import start_run_folder

BUDGETS = ("steps", "epoch")
#: The metrics of the table and the figures: (summary key, label, kind).
METRICS = (
    ("parse_rate", "parse rate", "rate"),
    ("accuracy", "accuracy", "rate"),
    ("f1_yes", "F1 (yes)", "score"),
    ("dict_rate_follow", "dict rate, follow", "rate"),
    ("dict_rate_do_not", "dict rate, DO-NOT", "rate"),
    ("sensitivity", "sensitivity", "points"),
    ("general_nll", "general NLL/token", "nll"),
    ("probe_score", "<sep> probe", "score"),
)


class SweepInputError(ValueError):
    """A run of the sweep could not be set up (bad data, model or options): reported in one line."""


@dataclass
class SweepArguments:
    """Which runs the sweep trains; training settings are `delia train`'s, evaluation settings `delia eval`'s."""

    ratios: list[float] = field(metadata={"help": "diverse ratios, e.g. 0 20 67 260 (0: plain instruction tuning)"})
    seeds: list[int] | None = field(default=None, metadata={"help": "one run per seed and ratio (none given: --seed)"})
    budget: str = field(
        default="steps",
        metadata={"help": "steps: --max_steps optimizer steps for every ratio; epoch: one epoch over each mixture"},
    )
    include_base: bool = field(default=True, metadata={"help": "also evaluate the base model (row 'base')"})
    probe: bool = field(default=True, metadata={"help": "probe each trained run (delia probe's <sep> scores)"})
    figure_formats: list[str] = field(
        default_factory=lambda: ["png"],
        metadata={"help": "file formats of the sweep_<metric> figures, e.g. png svg (svg: text, fit for a README)"},
    )

    def __post_init__(self):
        if self.budget not in BUDGETS:
            raise ValueError(f"--budget must be one of {', '.join(BUDGETS)}; got {self.budget!r}")
        if not self.ratios:
            raise ValueError("--ratios needs at least one diverse ratio, e.g. --ratios 0 20 67 260")
        self.ratios = [check_diverse_ratio(ratio) for ratio in self.ratios]
        for name, values in (("ratios", self.ratios), ("seeds", self.seeds or [])):
            repeated = sorted({value for value in values if values.count(value) > 1})
            if repeated:  # one run counted twice would bias the mean and shrink the std
                raise ValueError(f"--{name} lists {', '.join(f'{v:g}' for v in repeated)} more than once")
        import matplotlib.figure

        writable = matplotlib.figure.Figure().canvas.get_supported_filetypes()
        for file_format in self.figure_formats:
            if file_format not in writable:
                raise ValueError(f"--figure_formats: {file_format!r} is not one of {', '.join(sorted(writable))}")


def ratio_name(ratio: float) -> str:
    """The folder and row name of a ratio: ratio-0, ratio-2.5, ratio-260."""
    return f"ratio-{ratio:g}"


def run_folder(output_dir: str, ratio: float, seed: int) -> str:
    return os.path.join(output_dir, ratio_name(ratio), f"seed-{seed}")


def _settings(model_args: Any, args: DSFTConfig, ratio: float | None, seed: int | None, budget: str) -> dict[str, Any]:
    """What makes two runs the same run: a finished one is reused only when these match."""
    return {
        "model": model_args.model_name_or_path,
        "train_dataset": model_args.train_dataset,
        "diverse_dataset": args.diverse_dataset if ratio else None,
        "ratio": ratio,
        "seed": seed,
        "budget": budget if ratio is not None else None,
        "max_steps": args.max_steps if budget == "steps" and ratio is not None else None,
    }


def _finished(folder: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The report of a finished run with these settings; None if it has none; an error if it was trained otherwise."""
    if not os.path.isfile(os.path.join(folder, EVAL_REPORT_FILE)):
        return None
    try:
        report = read_report(folder)
    except (ValueError, OSError) as error:
        raise SweepInputError(f"{error}; remove {folder} to train that run again") from None
    recorded = report.get("sweep")
    if recorded != settings:
        raise SweepInputError(
            f"{folder} holds a finished run with other settings ({recorded}, now {settings}); remove that folder "
            "or choose another --output_dir"
        )
    return report


def _probe(model: Any, tokenizer: Any, folder: str) -> dict[str, Any]:
    """`delia probe` on the trained model in memory: per-layer <sep>-vs-explicit scores and <sep>'s nearest tokens."""
    from .evaluation.probe import load_prompts, probe_model

    probed = probe_model(tokenizer, model, load_prompts(limit=16), label=os.path.basename(folder), path=folder)
    return probed.as_json()


def _release(*objects: Any) -> None:
    """Free a finished run's model before the next one loads."""
    import torch

    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_and_evaluate(
    model_args: Any,
    args: DSFTConfig,
    ratio: float,
    seed: int,
    budget: str,
    data: EvalData,
    generation_options: dict[str, Any],
    probe: bool = True,
    phases: Any = None,
) -> dict[str, Any]:
    """Train one run of the sweep into its folder, evaluate it, write its report; return the report (`phases`: see
    `run_sweep`)."""
    from .train import build_trainer

    folder = run_folder(args.output_dir, ratio, seed)
    settings = _settings(model_args, args, ratio, seed, budget)
    run_args = copy.copy(args)  # the caller's config is never changed
    run_args.output_dir, run_args.diverse_ratio, run_args.seed, run_args.diverse_seed = folder, ratio, seed, seed
    if budget == "epoch":
        run_args.max_steps, run_args.num_train_epochs = -1, 1
    started = time.perf_counter()
    try:  # bad input: one line; a failure while training keeps its traceback
        trainer = build_trainer(model_args, run_args)
    except (ValueError, OSError) as error:
        raise SweepInputError(f"{ratio_name(ratio)}, seed {seed}: {error}") from None
    if phases is not None:  # a named bar; the first optimizer step's time: how long this run's training will take
        heard = partial(phases.first_batch, f"{ratio_name(ratio)}/seed-{seed}", unit="steps", what="its training")
        label_training_bar(trainer, f"training {ratio_name(ratio)}", heard)
    train_seconds = trainer.train().metrics.get("train_runtime")
    trainer.save_model()
    trainer.save_state()  # trainer_state.json: the log history, for `delia plot`
    # Without the autocast wrapper accelerate put on forward for mixed precision: evaluated as the base model is
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    model.config.use_cache = True  # gradient checkpointing turned the KV cache off; generation wants it
    report, generations = evaluate_model(model, trainer.processing_class, data, seed=seed, **generation_options)
    probed = _probe(model, trainer.processing_class, folder) if probe else None
    report = {
        "target": folder,
        "model": {"kind": "trained", "base_model": model_args.model_name_or_path},
        "sweep": settings,
        "training": {
            "steps": trainer.state.global_step,
            "rows": {source: stats.get("rows") for source, stats in trainer.mixture["sources"].items()},
            "train_seconds": train_seconds,  # the optimizer steps alone
            "seconds": round(time.perf_counter() - started, 1),  # loading, training, evaluation and probe
        },
        "probe": probed,
        **report,
    }
    write_report(folder, report, generations)
    _release(trainer, model)
    return report


def evaluate_base(
    model_args: Any, args: DSFTConfig, data: EvalData, generation_options: dict[str, Any], seed: int
) -> dict[str, Any]:
    """Evaluate the base model once (row 'base' of the table), into output_dir/base; reused when already there."""
    import torch

    from .modeling import load_for_inference, resolve_quantization

    folder = os.path.join(args.output_dir, "base")
    settings = _settings(model_args, args, None, None, "")
    report = _finished(folder, settings)
    if report is not None:
        return report
    try:
        quantization = resolve_quantization(model_args.quantization, torch.cuda.is_available())
        tokenizer, model, _ = load_for_inference(  # in the precision the trained runs are evaluated in
            model_args.model_name_or_path,
            quantization=quantization,
            attn_implementation=model_args.attn_implementation,
            dtype=model_args.torch_dtype,
            trust_remote_code=args.trust_remote_code,
        )
    except (ValueError, OSError) as error:
        raise SweepInputError(f"base model: {error}") from None
    report, generations = evaluate_model(model, tokenizer, data, seed=seed, **generation_options)
    report = {
        "target": folder,
        "model": {"kind": "model", "path": model_args.model_name_or_path},
        "sweep": settings,
        **report,
    }
    write_report(folder, report, generations)
    _release(model)
    return report


# ----------------------------------------------------------------------------------------------------------------------
# The table and the figures
# ----------------------------------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values that exist (std None for fewer than two)."""
    present = [value for value in values if value is not None and not math.isnan(value)]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


def _metric(run: dict[str, Any], key: str) -> float | None:
    """A run's value of a table metric: its eval summary's, or for `probe_score` its probe's mean over layers."""
    if key != "probe_score":
        return run["summary"].get(key)
    layers = (run.get("probe") or {}).get("layers") or []
    return statistics.fmean(layer["score"] for layer in layers) if layers else None


def summarise(reports: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per ratio (and the base): runs, format learned in how many, mean and std of every metric."""
    rows = []
    for name, runs in reports.items():
        row: dict[str, Any] = {
            "run": name,
            "runs": len(runs),
            "format_learned": sum(bool(run["summary"].get("format_learned")) for run in runs),
            "steps": _mean_std([run.get("training", {}).get("steps") for run in runs])[0],
        }
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


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep as a markdown table: one row per ratio, mean ± std over seeds."""
    header = ["run", "runs", "steps", "format learned"] + [label for _, label, _ in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        steps = "" if row["steps"] is None else f"{row['steps']:g}"
        cells = [row["run"], str(row["runs"]), steps, f"{row['format_learned']}/{row['runs']}"]
        cells += [_cell(kind, row[f"{key}_mean"], row[f"{key}_std"]) for key, _, kind in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return buffer.getvalue()


def plot_metrics(
    rows: Sequence[dict[str, Any]], folder: str, file_format: str = "png", metrics: Sequence[str] | None = None
) -> list[str]:
    """One bar chart per metric (a bar per ratio, error bars over seeds), each written atomically; the paths.

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
        axes.set_title(f"{label} by diverse ratio")
        figure.tight_layout()
        path = os.path.join(folder, f"sweep_{key}.{file_format}")
        try:
            replace_atomically(path, partial(figure.savefig, format=file_format, dpi=110), binary=True)
        finally:
            plt.close(figure)
        paths.append(path)
    return paths


def write_tables(rows: Sequence[dict[str, Any]], folder: str) -> str:
    """sweep.md and sweep.csv, each written atomically; returns the markdown."""
    table = markdown_table(rows)
    replace_atomically(os.path.join(folder, SWEEP_TABLE_FILE), lambda out: out.write(table + "\n"))
    replace_atomically(os.path.join(folder, SWEEP_CSV_FILE), lambda out: out.write(_csv_text(rows)))
    return table


# ----------------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------------


def run_sweep(
    sweep: SweepArguments, eval_args: EvalArguments, model_args: Any, args: DSFTConfig, phases: Any = None
) -> list[dict[str, Any]]:
    """Train and evaluate every (ratio, seed) not finished yet, then write the tables and figures; the table rows.

    `phases` (`delia.progress.Phases`, keyed "base" and "ratio-R/seed-S") prints a header before each."""
    if sweep.budget == "steps" and args.max_steps <= 0:
        raise SweepInputError("--budget steps needs --max_steps > 0 (the same optimizer steps for every ratio)")
    if any(sweep.ratios) and not args.diverse_dataset:
        raise SweepInputError("ratios above 0 need a diverse cache: pass --diverse_dataset")
    seeds = sweep.seeds or [args.seed]
    exclude = eval_args.exclude_cache
    if exclude is None:
        exclude = [args.diverse_dataset] if args.diverse_dataset else []
    try:
        start_run_folder(args.output_dir)
        data = load_eval_data(  # read and checked once, before any training
            model_args.eval_dataset or DEFAULT_EVAL_DATASET,
            train_dataset=model_args.train_dataset,  # to tell seen phrasings from unseen ones
            exclude_caches=exclude,
            **eval_args.data_options(),
        )
    except (ValueError, OSError) as error:
        raise SweepInputError(str(error)) from None
    generation = {**eval_args.generation_options(), "cpu_threads": args.cpu_threads}  # training's thread setting
    reports: dict[str, list[dict[str, Any]]] = {}
    announce = phases.start if phases is not None else lambda key: None
    if sweep.include_base:
        announce("base")
        reports["base"] = [evaluate_base(model_args, args, data, generation, seeds[0])]
    for ratio in sweep.ratios:
        for seed in seeds:
            folder = run_folder(args.output_dir, ratio, seed)
            report = _finished(folder, _settings(model_args, args, ratio, seed, sweep.budget))
            if report is None:
                announce(f"{ratio_name(ratio)}/seed-{seed}")
                report = train_and_evaluate(
                    model_args, args, ratio, seed, sweep.budget, data, generation, sweep.probe, phases
                )
            reports.setdefault(ratio_name(ratio), []).append(report)
    rows = summarise(reports)
    write_tables(rows, args.output_dir)
    for file_format in sweep.figure_formats:
        plot_metrics(rows, args.output_dir, file_format=file_format)
    return rows


def parse_arguments(argv: list[str] | None = None) -> tuple[SweepArguments, EvalArguments, Any, DSFTConfig]:
    """`delia sweep`'s options (and a YAML recipe's, with --config): the sweep's, eval's, the model's, training's."""
    from .command_line import command_parser, parse_with_recipe
    from .train import ModelArguments

    parser = command_parser((SweepArguments, EvalArguments, ModelArguments, DSFTConfig), "delia sweep", recipes=True)
    return parse_with_recipe(parser, argv)


def main(argv: list[str] | None = None) -> int:
    import yaml

    from .runtime import leave_process_group

    try:
        sweep, eval_args, model_args, args = parse_arguments(argv)
    except (ValueError, OSError, yaml.YAMLError) as error:
        print(f"delia sweep: error: {error}", file=sys.stderr)
        return 2
    try:  # bad input: one clear line; a failure while training keeps its traceback
        rows = run_sweep(sweep, eval_args, model_args, args)
    except SweepInputError as error:
        print(f"delia sweep: error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    print(
        f"\nsweep folder: {args.output_dir} ({SWEEP_TABLE_FILE}, {SWEEP_CSV_FILE}, sweep_<metric> figures, one folder per run)"
    )
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
