"""`delia eval`: measure what DELIA claims on a model, an adapter or a run folder, and compare runs.

For every eval row the model answers the prompt as given (told to follow the `<sep>` format) and, for the contrast,
the same prompt with its instruction swapped for each DO-NOT instruction; all greedy by default, batched through
`delia.generation`. The report (`eval_report.json` in the run folder, written atomically, next to
`eval_generations.jsonl` with every answer) holds:

- format adherence (parse rate), label accuracy, balanced accuracy (mean recall over yes and no) and macro-F1 beside
  it (on a mostly-'no' set accuracy can be the majority share), precision / recall / F1 for 'yes', the confusion
  matrix, and which labels the model gave at all;
- the same per instruction phrasing, and for phrasings seen in training vs unseen (given the training set);
- the `<sep>` contrast: dict rate when told to follow and when told not to, instruction sensitivity, a verdict;
- retained general ability: mean NLL per token of reference answers to held-out general queries.

    delia eval runs/sep                                    # a run folder of `delia train` / `delia demo`
    delia eval meta-llama/Llama-2-7b-chat-hf --output runs/base --eval-dataset reproduce_checkpoint/eval_dataset.jsonl
    delia eval --compare runs/base runs/sep                # the reports side by side, as a markdown table
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..bundled import DEFAULT_EVAL_DATASET, DEFAULT_GENERAL_QUERIES
from ..io import check_writable_folder, read_json_or_none, replace_atomically, write_json_atomically
from ..run_files import EVAL_GENERATIONS_FILE, EVAL_REPORT_FILE, MIXTURE_FILE
from .contrast import DO_NOT_INSTRUCTIONS, MIN_FOLLOW_RATE, replace_instruction, summarise_contrast
from .eval_config import EvalArguments, argument_parser  # noqa: F401 (EvalArguments: importable from here)
from .eval_data import EvalData, EvalRow, load_eval_data
from .metrics import Answer, read_answer, score_answers
from .report import compare_reports, format_report

# ----------------------------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------------------------


def _group_scores(rows: Sequence[EvalRow], answers: Sequence[Answer], keys: Sequence[Any]) -> dict[Any, Any]:
    """Label scores per key (in first-seen order)."""
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return {
        key: score_answers([rows[i].label for i in indices], [answers[i] for i in indices])
        for key, indices in groups.items()
    }


def _autocast(model: Any, bf16_generation: bool | None) -> tuple[Any, bool]:
    """(context, used): bf16 autocast for generation on a CPU when asked, or by default where bf16 is native."""
    import torch

    from ..cpu import native_bf16

    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    on_cpu = parameter is None or parameter.device.type == "cpu"
    used = bool(on_cpu and (native_bf16() if bf16_generation is None else bf16_generation))
    return (torch.autocast("cpu", dtype=torch.bfloat16) if used else contextlib.nullcontext()), used


def _answer_jobs(
    model: Any,
    tokenizer: Any,
    jobs: list[tuple],
    sampling: Any,
    batch_size: int,
    bf16_generation: bool | None,
    cpu_threads: int | None,
) -> tuple[list[Any], bool]:
    """Every job's reply in one pass of the generation loop, and whether bf16 autocast was used."""
    from ..generation.loop import answer_all
    from ..generation.transformers_backend import TransformersBackend

    backend = TransformersBackend(model, tokenizer, batch_size=batch_size, cpu_threads=cpu_threads)
    autocast, used = _autocast(model, bf16_generation)
    with autocast:
        replies = answer_all(backend, [job[3] for job in jobs], sampling, where=lambda index: jobs[index][0].where)
    return replies, used


def _phrasing_scores(rows: list[EvalRow], follow: list[Answer], seen: set[str] | None) -> tuple[list, dict | None]:
    """Scores per instruction phrasing, and for phrasings seen in training vs unseen (given the training set)."""
    by_phrasing = _group_scores(rows, follow, [row.instruction for row in rows])
    phrasings = [
        {"instruction": text, "seen": None if seen is None else text in seen, **scored.as_dict()}
        for text, scored in by_phrasing.items()
    ]
    seen_unseen = None
    if seen is not None:
        split = _group_scores(rows, follow, ["seen" if row.instruction in seen else "unseen" for row in rows])
        seen_unseen = {key: split[key].as_dict() if key in split else None for key in ("seen", "unseen")}
    return phrasings, seen_unseen


def _general_nll(
    model: Any, tokenizer: Any, data: EvalData, batch_size: int, cpu_threads: int | None
) -> dict[str, Any] | None:
    """Retained general ability: the NLL per token of reference answers to the held-out general queries."""
    from .retention import answer_nll

    if data.general is None:
        return None
    pairs = [(query.query, query.reference) for query in data.general]
    return {
        "queries": data.sources["general_queries"],
        "excluded_caches": data.sources["excluded_caches"],
        "excluded": data.excluded,
        **answer_nll(model, tokenizer, pairs, batch_size=batch_size, cpu_threads=cpu_threads),
    }


def _summary(n: int, scores: Any, contrast: dict[str, Any], general: dict[str, Any] | None) -> dict[str, Any]:
    """The report's headline numbers (the rows of `delia eval --compare` and of the sweep table)."""
    return {
        "n": n,
        "parse_rate": scores.parse_rate,
        "accuracy": scores.accuracy,
        "balanced_accuracy": scores.balanced_accuracy,
        "macro_f1": scores.macro_f1,
        "f1_yes": scores.f1_yes,
        "answered_labels": scores.answered_labels,
        "dict_rate_follow": contrast["dict_rate_follow"],
        "dict_rate_do_not": contrast["dict_rate_do_not"],
        "sensitivity": contrast["sensitivity"],
        "format_learned": contrast["format_learned"],
        "general_nll": general["nll_per_token"] if general else None,
        "general_n": general["n"] if general else None,
    }


def evaluate_model(
    model: Any,
    tokenizer: Any,
    data: EvalData,
    *,
    do_not_instructions: Sequence[str] = DO_NOT_INSTRUCTIONS,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    min_follow_rate: float = MIN_FOLLOW_RATE,
    bf16_generation: bool | None = None,
    cpu_threads: int | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate a loaded model on `data` (see `load_eval_data`); returns (report, one record per answer).

    `bf16_generation` (None: on a CPU that computes bf16 natively) generates the answers under bf16 autocast, about
    1.8x faster there; greedy answers can then differ from float32 ones where two tokens nearly tie. The general NLL
    is always computed in the model's own precision. `cpu_threads` is delia's thread policy on a CPU (None: the cores
    other programs leave free, looked up before each batch; 0: torch's own setting).
    """
    from ..generation import SamplingConfig

    started = time.perf_counter()
    rows = data.rows
    do_not_instructions = [text.strip() for text in do_not_instructions if text.strip()]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    # Every answer in one pass: the prompts as given, then each row with each DO-NOT instruction
    jobs = [(row, "follow", row.instruction, row.prompt) for row in rows]
    jobs += [
        (row, "do_not", instruction, replace_instruction(row.prompt, instruction))
        for instruction in do_not_instructions
        for row in rows
    ]
    replies, bf16_used = _answer_jobs(model, tokenizer, jobs, sampling, batch_size, bf16_generation, cpu_threads)
    answers = [read_answer(reply.text) for reply in replies]
    follow, do_not = answers[: len(rows)], answers[len(rows) :]

    scores = score_answers([row.label for row in rows], follow)
    phrasings, seen_unseen = _phrasing_scores(rows, follow, data.seen)
    texts = [reply.text for reply in replies]
    contrast = summarise_contrast(follow, do_not, texts, do_not_instructions, min_follow_rate)
    general = _general_nll(model, tokenizer, data, batch_size, cpu_threads)
    report = {
        "eval_dataset": data.sources["eval_dataset"],
        "train_dataset": data.sources["train_dataset"],
        "sampling": {**{k: getattr(sampling, k) for k in ("max_new_tokens", "temperature", "top_p", "seed")},
                     "bf16_autocast": bf16_used},
        "summary": _summary(len(rows), scores, contrast, general),
        "follow": scores.as_dict(),
        "by_phrasing": phrasings,
        "seen_unseen": seen_unseen,
        "contrast": contrast,
        "general": general,
        "truncated_answers": sum(reply.finish_reason == "length" for reply in replies),
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    generations = [
        {
            "row": row.index,  # 0-based, in the eval dataset
            "kind": kind,
            "instruction": instruction,
            "reference": row.label,
            "answer": reply.text,
            "finish_reason": reply.finish_reason,
            "in_format": answer.in_format,
            "label": answer.label,
        }
        for (row, kind, instruction, _), reply, answer in zip(jobs, replies, answers, strict=True)
    ]
    return report, generations


def write_report(folder: str | os.PathLike, report: dict[str, Any], generations: Sequence[dict[str, Any]]) -> str:
    """Write eval_report.json and eval_generations.jsonl into `folder`, each atomically; returns the report's path."""
    os.makedirs(folder, exist_ok=True)
    replace_atomically(
        os.path.join(folder, EVAL_GENERATIONS_FILE),
        lambda out: out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in generations),
    )
    path = os.path.join(folder, EVAL_REPORT_FILE)
    write_json_atomically(path, report)
    return path


def _mixture_cache(folder: str) -> str | None:
    """The diverse cache a run folder's delia_mixture.json names, when it is a file that still exists."""
    record = read_json_or_none(os.path.join(folder, MIXTURE_FILE))
    cache = record.get("diverse_dataset") if isinstance(record, dict) else None
    return cache if isinstance(cache, str) and os.path.isfile(cache) else None


@dataclass
class Evaluation:
    """An evaluation set up: where its report goes, its data, the loaded model; `run` measures and writes."""

    target: str
    folder: str
    data: EvalData
    tokenizer: Any
    model: Any
    description: dict[str, Any]

    def run(self, **options: Any) -> dict[str, Any]:
        """Evaluate (options go to `evaluate_model`), write the report and the answers, return the report."""
        report, generations = evaluate_model(self.model, self.tokenizer, self.data, **options)
        report = {"target": self.target, "model": self.description, **report}
        write_report(self.folder, report, generations)
        return report


def prepare_evaluation(
    target: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    eval_dataset: Any = DEFAULT_EVAL_DATASET,
    train_dataset: Any = None,
    general_queries: Any = DEFAULT_GENERAL_QUERIES,
    exclude_caches: Sequence[Any] | None = None,
    limit: int | None = None,
    base_model: str | None = None,
    quantization: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> Evaluation:
    """Check the options, read the data, load the model: everything a bad input can fail, before any generation.

    The report goes to `output` (default: `target` when it is a folder). `general_queries=None` skips the general
    NLL; `exclude_caches=None` holds out the queries of the diverse cache the run's delia_mixture.json names, if any.
    """
    target = os.fspath(target)
    folder = os.fspath(output) if output is not None else (target if os.path.isdir(target) else None)
    if folder is None:
        raise ValueError(f"{target!r} is not a local folder; pass an output folder for the report (--output)")
    check_writable_folder(folder, "the report folder (--output)")  # before any answer is generated
    if exclude_caches is None:
        cache = _mixture_cache(target) if os.path.isdir(target) else None
        exclude_caches = [cache] if cache else []
    data = load_eval_data(
        eval_dataset,
        train_dataset=train_dataset,
        general_queries=general_queries,
        exclude_caches=exclude_caches,
        limit=limit,
    )
    from ..modeling import load_for_inference

    tokenizer, model, description = load_for_inference(
        target, base_model=base_model, quantization=quantization, dtype=dtype, trust_remote_code=trust_remote_code
    )
    return Evaluation(target, folder, data, tokenizer, model, description)


def evaluate(target: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Evaluate a model folder or hub name, an adapter folder or a run folder; write and return the report.

    Options are `prepare_evaluation`'s (data, model loading, output folder) and `evaluate_model`'s (generation).
    """
    names = inspect.signature(prepare_evaluation).parameters
    setup = {key: value for key, value in options.items() if key in names}
    return prepare_evaluation(target, **setup).run(**{k: v for k, v in options.items() if k not in names})


# ----------------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from ..runtime import quiet_progress_bars

    parser = argument_parser()
    try:
        eval_args, options = parser.parse_args_into_dataclasses(argv)
        if options.compare:
            print(compare_reports(([options.target] if options.target else []) + options.compare))
            return 0
        if not options.target:
            raise ValueError("give a run, adapter or model folder (or hub name) to evaluate, or --compare RUN ...")
        with quiet_progress_bars():
            evaluation = prepare_evaluation(
                options.target,
                output=options.output,
                eval_dataset=options.eval_dataset,
                train_dataset=options.train_dataset,
                exclude_caches=eval_args.exclude_cache,
                base_model=options.base_model,
                quantization=None if options.quantization == "none" else options.quantization,
                dtype=options.dtype,
                trust_remote_code=options.trust_remote_code,
                **eval_args.data_options(),
            )
    except (ValueError, OSError) as error:  # bad input: one clear line; a failure while generating keeps its traceback
        print(f"delia eval: error: {error}", file=sys.stderr)
        return 2
    report = evaluation.run(seed=options.seed, cpu_threads=options.cpu_threads, **eval_args.generation_options())
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
