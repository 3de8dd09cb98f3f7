"""`delia sweep`: one training run per arm (a diverse ratio, and with `--arms` its own epochs) and seed, each evaluated,
then one table and one figure per metric.

Every run trains from the same base model on the same downstream rows with `DSFTTrainer` (LoRA + `<sep>`, set up
by `delia.train.build_trainer`, so every `delia train` option applies), at its own `diverse_ratio`; ratio 0 is plain
instruction tuning. With `--ratios`, the budget is the same for every ratio: the same optimizer steps
(`--budget steps`, with `--max_steps`) or one epoch over each mixture (`--budget epoch`: larger ratios train longer).
With `--arms RATIO:EPOCHS ...` each arm trains its own number of epochs over its mixture, so one sweep holds the
paper's regime (DELIA: ONE epoch over a large mixture, each downstream row seen once) beside plain SFT over the same
rows for several epochs:

    delia sweep --config recipe.yaml --arms 0:1 0:3 0:10 30:1 100:1 --output_dir runs/regime

Each run is evaluated with `delia eval`'s measures in memory, right after training; the base model is evaluated once
too (`--include_base`), as the reference for forgetting. The table gives each arm's optimizer steps, epochs and
downstream row-visits (downstream rows x epochs the trainer went through), beside accuracy, balanced accuracy and
macro-F1 (accuracy alone can be the majority label's share), the contrast, the general NLL and the probe.

Resumable: a run whose `eval_report.json` exists is not trained again (its settings, an arm's epochs included, must
match). The sweep writes `sweep.md` and `sweep.csv` (mean ± std over seeds per arm) and `sweep_<metric>.png` into
`--output_dir`; run folders are `ratio-R/seed-S` (`--ratios`) or `ratio-R-epochs-E/seed-S` (`--arms`).

    delia sweep --model_name_or_path MODEL --train_dataset train.jsonl --diverse_dataset cache.jsonl \
        --ratios 0 20 67 260 --budget steps --max_steps 200 --seeds 0 1 2 --output_dir runs/sweep
    delia sweep --config reproduce_checkpoint/recipe.yaml --ratios 0 20 67 260 --budget epoch --output_dir runs/sweep
"""

from __future__ import annotations

import copy
import gc
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .bundled import DEFAULT_EVAL_DATASET
from .config import DSFTConfig, check_diverse_ratio
from .evaluation.eval_data import EvalData, load_eval_data
from .evaluation.evaluate import EvalArguments, evaluate_model, write_report
from .evaluation.report import read_report
from .evaluation.sweep_table import METRICS, markdown_table, plot_frontier, plot_metrics, summarise, write_tables
from .progress import label_training_bar
from .run_files import EVAL_REPORT_FILE, SWEEP_CSV_FILE, SWEEP_TABLE_FILE
from .runtime import start_run_folder

__all__ = ["METRICS", "Arm", "SweepArguments", "markdown_table", "plot_metrics", "run_sweep", "summarise"]

BUDGETS = ("steps", "epoch")


class SweepInputError(ValueError):
    """A run of the sweep could not be set up (bad data, model or options): reported in one line."""


@dataclass(frozen=True)
class Arm:
    """One arm of the sweep: a diverse ratio and, from `--arms`, its own epochs (None: the sweep's `--budget`)."""

    ratio: float
    epochs: float | None = None

    @property
    def name(self) -> str:
        """Its folder and table row: ratio-30 (`--ratios`), ratio-0-epochs-3 (`--arms`)."""
        return ratio_name(self.ratio) if self.epochs is None else f"{ratio_name(self.ratio)}-epochs-{self.epochs:g}"


def parse_arm(text: str) -> Arm:
    """An arm from `RATIO:EPOCHS` (0:3 is plain SFT over 3 epochs; 30:1 DELIA at ratio 30 over one epoch)."""
    ratio, sep, epochs = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        value = float(epochs)
        ratio = check_diverse_ratio(float(ratio))
    except ValueError:
        raise ValueError(
            f"--arms: {text!r} is not RATIO:EPOCHS with RATIO >= 0 (e.g. 0:3 for plain SFT over 3 epochs, 30:1 for "
            "DELIA at ratio 30 over one epoch)"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--arms: {text!r} has {epochs!r} epochs; expected a number above 0")
    return Arm(ratio, value)


@dataclass
class SweepArguments:
    """Which runs the sweep trains; training settings are `delia train`'s, evaluation settings `delia eval`'s."""

    ratios: list[float] | None = field(
        default=None, metadata={"help": "diverse ratios, e.g. 0 20 67 260 (0: plain instruction tuning), at --budget"}
    )
    arms: list[str] | None = field(
        default=None,
        metadata={
            "help": "instead of --ratios: RATIO:EPOCHS per arm, each trained that many epochs over its mixture, "
            "e.g. 0:1 0:3 0:10 30:1 100:1 (plain SFT over 1, 3 and 10 epochs; DELIA over one; --max_steps does "
            "not apply)"
        },
    )
    seeds: list[int] | None = field(default=None, metadata={"help": "one run per seed and arm (none given: --seed)"})
    budget: str | None = field(
        default=None,
        metadata={
            "help": "with --ratios, steps (the default): --max_steps optimizer steps for every ratio; epoch: one "
            "epoch over each mixture. With --arms: epoch (each arm's own epochs)"
        },
    )
    include_base: bool = field(default=True, metadata={"help": "also evaluate the base model (row 'base')"})
    probe: bool = field(default=True, metadata={"help": "probe each trained run (delia probe's <sep> scores)"})
    figure_formats: list[str] = field(
        default_factory=lambda: ["png"],
        metadata={"help": "file formats of the sweep_<metric> figures, e.g. png svg (svg: text, fit for a README)"},
    )

    def __post_init__(self):
        if self.ratios and self.arms:
            raise ValueError(
                "give --ratios (one budget for all) or --arms (RATIO:EPOCHS each), not both (a recipe's ratios: "
                "counts: use one without it)"
            )
        if not self.ratios and not self.arms:
            raise ValueError("give --ratios, e.g. --ratios 0 20 67 260, or --arms RATIO:EPOCHS ..., e.g. 0:1 0:3 30:1")
        if self.arms and self.budget not in (None, "epoch"):
            raise ValueError(
                f"--arms gives each arm its epochs; --budget {self.budget} does not apply (leave it out, in a recipe too)"
            )
        self.budget = self.budget or ("epoch" if self.arms else "steps")
        if self.budget not in BUDGETS:
            raise ValueError(f"--budget must be one of {', '.join(BUDGETS)}; got {self.budget!r}")
        if self.ratios:
            self.ratios = [check_diverse_ratio(ratio) for ratio in self.ratios]
        arms = [f"{arm.ratio:g}" if arm.epochs is None else f"{arm.ratio:g}:{arm.epochs:g}" for arm in self.plan()]
        for name, values in (("ratios" if self.ratios else "arms", arms), ("seeds", self.seeds or [])):
            repeated = sorted({str(value) for value in values if values.count(value) > 1})
            if repeated:  # one run counted twice would bias the mean and shrink the std
                raise ValueError(f"--{name} lists {', '.join(repeated)} more than once")
        import matplotlib.figure

        writable = matplotlib.figure.Figure().canvas.get_supported_filetypes()
        for file_format in self.figure_formats:
            if file_format not in writable:
                raise ValueError(f"--figure_formats: {file_format!r} is not one of {', '.join(sorted(writable))}")

    def plan(self) -> list[Arm]:
        """The arms, in the order given: one per ratio (at --budget), or one per `--arms` entry."""
        return [parse_arm(text) for text in self.arms] if self.arms else [Arm(ratio) for ratio in self.ratios]


def ratio_name(ratio: float) -> str:
    """The folder and row name of a ratio: ratio-0, ratio-2.5, ratio-260."""
    return f"ratio-{ratio:g}"


def run_folder(output_dir: str, ratio: float | Arm, seed: int) -> str:
    """A run's folder: output_dir/<arm name>/seed-<seed> (a bare ratio is an arm at the sweep's --budget)."""
    arm = ratio if isinstance(ratio, Arm) else Arm(ratio)
    return os.path.join(output_dir, arm.name, f"seed-{seed}")


def _settings(model_args: Any, args: DSFTConfig, arm: Arm | None, seed: int | None, budget: str) -> dict[str, Any]:
    """What makes two runs the same run: a finished one is reused only when these match. An arm of `--arms` adds its
    epochs (the keys of a `--ratios` run are unchanged, so sweep folders written before `--arms` still resume)."""
    ratio = None if arm is None else arm.ratio
    settings = {
        "model": model_args.model_name_or_path,
        "train_dataset": model_args.train_dataset,
        "diverse_dataset": args.diverse_dataset if ratio else None,
        "ratio": ratio,
        "seed": seed,
        "budget": budget if ratio is not None else None,
        "max_steps": args.max_steps if budget == "steps" and ratio is not None else None,
    }
    if arm is not None and arm.epochs is not None:
        settings.update(budget="epoch", max_steps=None, epochs=arm.epochs)
    return settings


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


def training_record(trainer: Any) -> dict[str, Any]:
    """What a run trained on, from the trainer's state and mixture record: optimizer steps, epochs gone through, rows
    per source, and downstream row-visits (downstream rows x epochs; the sampler shuffles, so part of an epoch sees
    about that share of the rows)."""
    rows = {source: stats.get("rows") for source, stats in trainer.mixture["sources"].items()}
    epochs = trainer.state.epoch
    downstream = rows.get("downstream")
    visits = None if epochs is None or downstream is None else round(downstream * epochs, 1)
    return {"steps": trainer.state.global_step, "epochs": epochs, "rows": rows, "downstream_row_visits": visits}


def train_and_evaluate(
    model_args: Any,
    args: DSFTConfig,
    arm: Arm | float,
    seed: int,
    budget: str,
    data: EvalData,
    generation_options: dict[str, Any],
    probe: bool = True,
    phases: Any = None,
) -> dict[str, Any]:
    """Train one run of the sweep (an arm, or a ratio at `budget`) into its folder, evaluate it, write its report;
    return the report (`phases`: see `run_sweep`)."""
    from .train import build_trainer

    arm = arm if isinstance(arm, Arm) else Arm(arm)
    folder = run_folder(args.output_dir, arm, seed)
    settings = _settings(model_args, args, arm, seed, budget)
    run_args = copy.copy(args)  # the caller's config is never changed
    run_args.output_dir, run_args.diverse_ratio, run_args.seed, run_args.diverse_seed = folder, arm.ratio, seed, seed
    if arm.epochs is not None or budget == "epoch":
        run_args.max_steps, run_args.num_train_epochs = -1, arm.epochs or 1
    started = time.perf_counter()
    try:  # bad input: one line; a failure while training keeps its traceback
        trainer = build_trainer(model_args, run_args)
    except (ValueError, OSError) as error:
        raise SweepInputError(f"{arm.name}, seed {seed}: {error}") from None
    if phases is not None:  # a named bar; the first optimizer step's time: how long this run's training will take
        heard = partial(phases.first_batch, f"{arm.name}/seed-{seed}", unit="steps", what="its training")
        label_training_bar(trainer, f"training {arm.name}", heard)
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
            **training_record(trainer),
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
# The sweep
# ----------------------------------------------------------------------------------------------------------------------


def run_sweep(
    sweep: SweepArguments, eval_args: EvalArguments, model_args: Any, args: DSFTConfig, phases: Any = None
) -> list[dict[str, Any]]:
    """Train and evaluate every (arm, seed) not finished yet, then write the tables and figures; the table rows.

    `phases` (`delia.progress.Phases`, keyed "base" and "<arm>/seed-S", e.g. "ratio-2/seed-0") prints a header before
    each."""
    arms = sweep.plan()
    if sweep.budget == "steps" and args.max_steps <= 0:
        raise SweepInputError("--budget steps needs --max_steps > 0 (the same optimizer steps for every ratio)")
    if any(arm.ratio for arm in arms) and not args.diverse_dataset:
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
    for arm in arms:
        for seed in seeds:
            folder = run_folder(args.output_dir, arm, seed)
            report = _finished(folder, _settings(model_args, args, arm, seed, sweep.budget))
            if report is None:
                announce(f"{arm.name}/seed-{seed}")
                report = train_and_evaluate(
                    model_args, args, arm, seed, sweep.budget, data, generation, sweep.probe, phases
                )
            reports.setdefault(arm.name, []).append(report)
    rows = summarise(reports)
    write_tables(rows, args.output_dir)
    for file_format in sweep.figure_formats:
        plot_metrics(rows, args.output_dir, file_format=file_format)
        plot_frontier(rows, args.output_dir, file_format=file_format)
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
