"""`delia eval`: measure what DELIA claims on a model, an adapter or a run folder, and compare runs.

For every eval row the model answers the prompt as given (told to follow the `<sep>` format) and, for the contrast,
the same prompt with its instruction swapped for each DO-NOT instruction; all greedy by default, batched through
`delia.generation`. The report (`eval_report.json` in the run folder, written atomically, next to
`eval_generations.jsonl` with every answer) holds:

- format adherence (parse rate), label accuracy, precision / recall / F1 for 'yes', the confusion matrix;
- the same per instruction phrasing, and for phrasings seen in training vs unseen (given the training set);
- the `<sep>` contrast: dict rate when told to follow and when told not to, instruction sensitivity, a verdict;
- retained general ability: mean NLL per token of reference answers to held-out general queries.

    delia eval runs/sep                                    # a run folder of `delia train` / `delia demo`
    delia eval meta-llama/Llama-2-7b-chat-hf --output runs/base --eval-dataset reproduce_checkpoint/eval_dataset.jsonl
    delia eval --compare runs/base runs/sep                # the reports side by side, as a markdown table
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from ..data import DataFormatError, DatasetOrigin, read_dataset, validate_conversations
from ..data.rules import any_format_row_problem
from .contrast import DO_NOT_INSTRUCTIONS, MIN_FOLLOW_RATE, replace_instruction, split_instruction, summarise_contrast
from .metrics import Answer, read_answer, reference_label, score_answers

REPORT_FILE = "eval_report.json"
GENERATIONS_FILE = "eval_generations.jsonl"
DEMO_DATA = files("delia") / "demo_data"
#: The default eval set: shipped in the package (the first 16 rows of reproduce_checkpoint/eval_dataset.jsonl).
DEFAULT_EVAL_DATASET = str(DEMO_DATA / "eval.jsonl")
#: The default general queries: shipped in the package (the first 128 rows of reproduce_self_sample/query_cache.jsonl).
DEFAULT_GENERAL_QUERIES = str(DEMO_DATA / "queries.jsonl")

EVAL_DATASET_HELP = (
    "eval conversations in the <sep> format (the default: the 16 bundled rows; from a clone, "
    "reproduce_checkpoint/eval_dataset.jsonl has all 30)"
)

#: The rows of the comparison table: (summary key, label).
SUMMARY_ROWS = (
    ("parse_rate", "parse rate"),
    ("accuracy", "accuracy"),
    ("f1_yes", "F1 (yes)"),
    ("dict_rate_follow", "dict rate, follow"),
    ("dict_rate_do_not", "dict rate, DO-NOT"),
    ("sensitivity", "sensitivity"),
    ("format_learned", "format learned"),
    ("general_nll", "general NLL/token"),
    ("general_n", "general queries"),
    ("n", "n"),
)


# ----------------------------------------------------------------------------------------------------------------------
# Eval rows
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalRow:
    """One eval conversation: the prompt (messages up to the final user turn), its instruction and reference label."""

    prompt: list[dict[str, str]]
    instruction: str
    label: str
    index: int
    origin: DatasetOrigin

    @property
    def where(self) -> str:
        """File and line (looked up only when needed: it reads the file)."""
        return self.origin.where(self.index)


def _conversation(row: dict) -> list[dict[str, str]]:
    """A row's messages, from `messages` or from prompt + completion (strings or message lists)."""
    if "messages" in row and row["messages"] is not None:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    prompt, completion = row["prompt"], row["completion"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    return [{"role": m["role"], "content": m["content"]} for m in prompt + completion]


def load_eval_rows(source: Any, *, limit: int | None = None, label: str = "eval dataset") -> list[EvalRow]:
    """Eval conversations whose final reply is a `<sep>` dict with a yes/no 'hallucination'; errors name file and line."""
    dataset, origin = read_dataset(source, label, row_problem=any_format_row_problem)
    validate_conversations(dataset, origin)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    rows = []
    for index, row in enumerate(dataset):
        messages = _conversation(row)
        reference = reference_label(messages[-1]["content"])
        if reference is None:
            raise DataFormatError(
                f"{origin.where(index)}: the final assistant reply is not a <sep> answer; expected a dict such as "
                "{'thought': '...', 'hallucination': 'yes'} with 'hallucination' yes or no"
            )
        prompt = messages[:-1]
        rows.append(EvalRow(prompt, split_instruction(prompt[-1]["content"])[1], reference, index, origin))
    if not rows:
        raise DataFormatError(f"{origin.label}: no rows; expected at least one conversation")
    return rows


def training_instructions(source: Any) -> set[str]:
    """The instruction sentences of a training set's final user turns (to tell seen phrasings from unseen ones)."""
    dataset, origin = read_dataset(source, "train dataset", row_problem=any_format_row_problem)
    validate_conversations(dataset, origin)
    instructions = set()
    for row in dataset:
        users = [m for m in _conversation(row) if m["role"] == "user"]
        instructions.add(split_instruction(users[-1]["content"])[1])
    return instructions


def _describe(source: Any) -> str | None:
    return None if source is None else os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)


@dataclass(frozen=True)
class EvalData:
    """Everything an evaluation reads, loaded and checked once, before any model is loaded."""

    rows: list[EvalRow]
    seen: set[str] | None  # the training set's instruction phrasings, when one was given
    general: list[Any] | None  # held-out general queries (delia.build_cache.Query), None to skip the general NLL
    excluded: int  # general queries dropped because a diverse cache holds them
    sources: dict[str, Any]


def load_eval_data(
    eval_dataset: Any = DEFAULT_EVAL_DATASET,
    *,
    train_dataset: Any = None,
    general_queries: Any = DEFAULT_GENERAL_QUERIES,
    exclude_caches: Sequence[Any] = (),
    limit: int | None = None,
) -> EvalData:
    """Read the eval set, the training phrasings and the held-out general queries; errors name file and line."""
    from .retention import held_out_queries

    rows = load_eval_rows(eval_dataset, limit=limit)
    seen = training_instructions(train_dataset) if train_dataset is not None else None
    general, excluded = held_out_queries(general_queries, exclude_caches) if general_queries is not None else (None, 0)
    sources = {
        "eval_dataset": _describe(eval_dataset),
        "train_dataset": _describe(train_dataset),
        "general_queries": _describe(general_queries),
        "excluded_caches": [_describe(cache) for cache in exclude_caches],
    }
    return EvalData(rows, seen, general, excluded, sources)


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------


def load_model_for_eval(
    target: str | os.PathLike,
    *,
    base_model: str | None = None,
    quantization: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[Any, Any, dict[str, Any]]:
    """(tokenizer, model, description) for a model folder / hub name, or a LoRA adapter folder on its base model.

    An adapter folder (adapter_config.json, as `delia train` writes with LoRA) is loaded on `base_model` (default:
    the base its config names) with the folder's own tokenizer; the tokens it added to the base (`<sep>`) get their
    rows as in training (`add_new_tokens`), then the adapter is applied.
    """
    from transformers import AutoTokenizer

    from ..modeling import add_new_tokens, load_tokenizer_and_model
    from ..runtime import default_device

    path = os.fspath(target)
    options = {
        "quantization": quantization,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "device": None if quantization else default_device(),
    }
    adapter_config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(adapter_config):
        tokenizer, model = load_tokenizer_and_model(path, **options)
        return tokenizer, model, {"kind": "model", "path": path}
    try:
        with open(adapter_config, encoding="utf-8") as handle:
            base = base_model or json.load(handle).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise DataFormatError(f"{adapter_config}: not a readable JSON adapter config ({error})") from None
    if not base:
        raise ValueError(f"{adapter_config} names no base model (base_model_name_or_path); pass --base-model")
    base_tokenizer, model = load_tokenizer_and_model(base, **options)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = base_tokenizer  # an adapter saved without its tokenizer
    base_vocab = base_tokenizer.get_vocab()
    added = sorted(tokenizer.get_added_vocab().items(), key=lambda item: item[1])
    new_tokens = [token for token, _ in added if token not in base_vocab]
    if new_tokens:
        ids = add_new_tokens(base_tokenizer, model, new_tokens)
        expected = tokenizer.convert_tokens_to_ids(new_tokens)
        if ids != expected:
            raise ValueError(
                f"{path}: the adapter's tokenizer has {new_tokens} at ids {expected}, but adding them to base model "
                f"{base!r} gives ids {ids}; pass the base model it was trained on (--base-model)"
            )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, path)
    return tokenizer, model, {"kind": "adapter", "path": path, "base_model": base, "new_tokens": new_tokens}


def _generate(backend: Any, conversations: list[list[dict[str, str]]], sampling: Any, rows: list[EvalRow]) -> list[Any]:
    """One reply per conversation (made from `rows`, one each), in order; longest prompts first, so batches pad little."""
    from ..generation import PromptRenderError

    try:
        prompts = backend.prepare(conversations, [str(index) for index in range(len(conversations))])
    except PromptRenderError as error:
        raise ValueError(f"{rows[error.index].where}: {error}") from None
    order = sorted(range(len(prompts)), key=lambda index: -prompts[index].length)
    replies: list[Any] = [None] * len(prompts)
    for index, reply in zip(order, backend.stream([prompts[i] for i in order], sampling), strict=True):
        replies[index] = reply
    return replies


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
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate a loaded model on `data` (see `load_eval_data`); returns (report, one record per answer).

    `bf16_generation` (None: on a CPU that computes bf16 natively) generates the answers under bf16 autocast, about
    1.8x faster there; greedy answers can then differ from float32 ones where two tokens nearly tie. The general NLL
    is always computed in the model's own precision.
    """
    import contextlib

    import torch

    from ..cpu import native_bf16
    from ..generation import SamplingConfig
    from ..generation.transformers_backend import TransformersBackend
    from .retention import answer_nll

    started = time.perf_counter()
    rows, seen = data.rows, data.seen
    do_not_instructions = [text.strip() for text in do_not_instructions if text.strip()]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    # Every answer in one engine call: the prompts as given, then each row with each DO-NOT instruction
    jobs = [(row, "follow", row.instruction, row.prompt) for row in rows]
    jobs += [
        (row, "do_not", instruction, replace_instruction(row.prompt, instruction))
        for instruction in do_not_instructions
        for row in rows
    ]
    backend = TransformersBackend(model, tokenizer, batch_size=batch_size)
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    on_cpu = parameter is None or parameter.device.type == "cpu"
    if bf16_generation is None:
        bf16_generation = on_cpu and native_bf16()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16_generation and on_cpu else contextlib.nullcontext()
    with autocast:
        replies = _generate(backend, [job[3] for job in jobs], sampling, [job[0] for job in jobs])
    answers = [read_answer(reply.text) for reply in replies]
    follow, do_not = answers[: len(rows)], answers[len(rows) :]

    scores = score_answers([row.label for row in rows], follow)
    by_phrasing = _group_scores(rows, follow, [row.instruction for row in rows])
    phrasings = [
        {"instruction": text, "seen": None if seen is None else text in seen, **scored.as_dict()}
        for text, scored in by_phrasing.items()
    ]
    seen_unseen = None
    if seen is not None:
        split = _group_scores(rows, follow, ["seen" if row.instruction in seen else "unseen" for row in rows])
        seen_unseen = {key: split[key].as_dict() if key in split else None for key in ("seen", "unseen")}

    contrast = summarise_contrast(
        follow, do_not, [reply.text for reply in replies], do_not_instructions, min_follow_rate
    )
    general = None
    if data.general is not None:
        pairs = [(query.query, query.reference) for query in data.general]
        general = {
            "queries": data.sources["general_queries"],
            "excluded_caches": data.sources["excluded_caches"],
            "excluded": data.excluded,
            **answer_nll(model, tokenizer, pairs, batch_size=batch_size),
        }

    report = {
        "eval_dataset": data.sources["eval_dataset"],
        "train_dataset": data.sources["train_dataset"],
        "sampling": {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "bf16_autocast": bool(bf16_generation and on_cpu),
        },
        "summary": {
            "n": len(rows),
            "parse_rate": scores.parse_rate,
            "accuracy": scores.accuracy,
            "f1_yes": scores.f1_yes,
            "dict_rate_follow": contrast["dict_rate_follow"],
            "dict_rate_do_not": contrast["dict_rate_do_not"],
            "sensitivity": contrast["sensitivity"],
            "format_learned": contrast["format_learned"],
            "general_nll": general["nll_per_token"] if general else None,
            "general_n": general["n"] if general else None,
        },
        "follow": scores.as_dict(),
        "by_phrasing": phrasings,
        "seen_unseen": seen_unseen,
        "contrast": contrast,
        "general": general,
        "truncated_answers": sum(reply.finish_reason == "length" for reply in replies),
        "seconds": round(time.perf_counter() - started, 1),
    }
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
    from ..io import replace_atomically, write_json_atomically

    os.makedirs(folder, exist_ok=True)
    replace_atomically(
        os.path.join(folder, GENERATIONS_FILE),
        lambda out: out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in generations),
    )
    path = os.path.join(folder, REPORT_FILE)
    write_json_atomically(path, report)
    return path


def _mixture_cache(folder: str) -> str | None:
    """The diverse cache a run folder's delia_mixture.json names, when it is a file that still exists."""
    from ..runtime import MIXTURE_FILE

    try:
        with open(os.path.join(folder, MIXTURE_FILE), encoding="utf-8") as handle:
            cache = json.load(handle).get("diverse_dataset")
    except (OSError, ValueError, AttributeError):
        return None
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
    tokenizer, model, description = load_model_for_eval(
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
# Printing and comparing
# ----------------------------------------------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _cell(key: str, value: Any) -> str:
    """A summary value as a table cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if key == "sensitivity":
        return f"{value * 100:+.1f} pts"
    if key == "f1_yes":
        return f"{value:.3f}"
    if key == "general_nll":
        return f"{value:.4f}"
    if isinstance(value, float):
        return _percent(value)
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """The report as a printed table."""
    scores, contrast, general = report["follow"], report["contrast"], report["general"]
    confusion = scores["confusion"]
    lines = [
        f"delia eval: {report.get('target', 'model')} ({report.get('model', {}).get('kind', 'model')}), "
        f"{scores['n']} eval rows from {report['eval_dataset']}, {report['seconds']} s",
        f"  format (parse rate)   {_percent(scores['parse_rate']):>7}  ({scores['in_format']}/{scores['n']})",
        f"  accuracy              {_percent(scores['accuracy']):>7}  ({scores['correct']}/{scores['n']}; "
        f"{_percent(scores['accuracy_labelled'])} of the answers with a yes/no label)",
        f"  F1 (yes)              {_cell('f1_yes', scores['f1_yes']):>7}  (precision "
        f"{_cell('f1_yes', scores['precision_yes'])}, recall {_cell('f1_yes', scores['recall_yes'])})",
        "  confusion (rows: reference; columns: predicted)",
        f"  {'':>10}{'yes':>8}{'no':>8}{'unparsed':>10}",
    ]
    for reference in ("yes", "no"):
        row = confusion[reference]
        lines.append(f"  {reference:>10}{row['yes']:>8}{row['no']:>8}{row['unparsed']:>10}")
    lines += [
        "  <sep> contrast        follow  DO-NOT",
        f"  dict rate             {_percent(contrast['dict_rate_follow']):>6}  {_percent(contrast['dict_rate_do_not']):>6}"
        f"   (not dict when told not to: {_percent(contrast['not_dict_rate_do_not'])})",
        f"  opens with '{{'        {_percent(contrast['opens_dict_rate_follow']):>6}  "
        f"{_percent(contrast['opens_dict_rate_do_not']):>6}   (parsable or not: a trace of the surface being learned)",
        f"  sensitivity           {_cell('sensitivity', contrast['sensitivity'])}",
        f"  verdict: {contrast['verdict']}",
    ]
    if general:
        lines.append(
            f"  general NLL/token     {_cell('general_nll', general['nll_per_token'])}  ({general['n']} held-out "
            f"queries of {general['queries']}, {general['excluded']} excluded, {general['tokens']} tokens)"
        )
    if report.get("seen_unseen"):
        for key, scored in report["seen_unseen"].items():
            if scored:
                lines.append(
                    f"  {key + ' phrasings':<22}{_percent(scored['accuracy']):>7} accuracy, "
                    f"{_percent(scored['parse_rate'])} format, n={scored['n']}"
                )
    lines.append(f"  {'by phrasing':<70}{'n':>4}{'format':>8}{'accuracy':>10}  seen")
    for phrasing in report["by_phrasing"]:
        text = phrasing["instruction"]
        text = text if len(text) <= 68 else text[:65] + "..."
        seen = "" if phrasing["seen"] is None else ("seen" if phrasing["seen"] else "unseen")
        lines.append(
            f"  {text:<70}{phrasing['n']:>4}{_percent(phrasing['parse_rate']):>8}{_percent(phrasing['accuracy']):>10}"
            f"  {seen}"
        )
    return "\n".join(lines)


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """A report from its file or from the folder that holds eval_report.json; errors name the path."""
    path = os.fspath(path)
    file = os.path.join(path, REPORT_FILE) if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as handle:
            report = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file!r} not found; expected an eval report (run `delia eval` on it first)") from None
    except ValueError as error:
        raise DataFormatError(f"{file}: not a JSON eval report ({error})") from None
    if not isinstance(report, dict) or not isinstance(report.get("summary"), dict):
        raise DataFormatError(f"{file}: no 'summary' object; expected a report written by `delia eval`")
    return report


def compare_reports(paths: Sequence[str | os.PathLike], names: Sequence[str] | None = None) -> str:
    """The reports' summaries side by side: a markdown table with one column per run."""
    summaries = [read_report(path)["summary"] for path in paths]
    names = list(names) if names is not None else [_run_name(path) for path in paths]
    lines = ["| metric | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for key, label in SUMMARY_ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(key, summary.get(key)) for summary in summaries) + " |")
    if len({summary.get("general_n") for summary in summaries if summary.get("general_n")}) > 1:
        lines.append(
            "\nnote: the general NLLs are over different held-out queries (a run's own cache is left out of its "
            "set); evaluate the others with --exclude_cache naming that cache to compare them"
        )
    return "\n".join(lines)


def _run_name(path: str | os.PathLike) -> str:
    """A column title for a run: its folder's path (the report's folder for a report file)."""
    path = os.path.normpath(os.fspath(path))
    return os.path.dirname(path) if path.endswith(REPORT_FILE) else path


# ----------------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalArguments:
    """How `delia eval` and `delia sweep` evaluate; each command names the model and the eval set itself."""

    general_queries: str = field(
        default=DEFAULT_GENERAL_QUERIES,
        metadata={
            "help": "general queries with reference answers, for the general NLL (the default: the 128 bundled ones)"
        },
    )
    no_general: bool = field(default=False, metadata={"help": "skip the general NLL"})
    exclude_cache: list[str] | None = field(
        default=None,
        metadata={
            "help": "diverse caches whose queries are not held out (none given: the run's own cache, when its "
            "delia_mixture.json names one)"
        },
    )
    do_not: list[str] | None = field(
        default=None,
        metadata={"help": "instructions saying not to use the <sep> format (none given: three built-in ones)"},
    )
    max_new_tokens: int = field(default=256, metadata={"help": "tokens generated per answer at most"})
    temperature: float = field(default=0.0, metadata={"help": "0 means greedy (the default)"})
    generation_batch_size: int = field(default=16, metadata={"help": "prompts per generate call"})
    min_follow_rate: float = field(
        default=MIN_FOLLOW_RATE, metadata={"help": "below this dict rate the format counts as not learned"}
    )
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N eval rows"})
    bf16_generation: bool | None = field(
        default=None,
        metadata={"help": "generate under bf16 autocast (unset: on a CPU with native bf16; ~1.8x faster there)"},
    )

    def __post_init__(self):
        for name in ("max_new_tokens", "generation_batch_size", "limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature!r}")
        if not 0 <= self.min_follow_rate <= 1:
            raise ValueError(f"--min_follow_rate must be between 0 and 1, got {self.min_follow_rate!r}")

    def data_options(self) -> dict[str, Any]:
        """The keyword arguments of `load_eval_data` these settle (not the eval set and the excluded caches)."""
        return {"general_queries": None if self.no_general else self.general_queries, "limit": self.limit}

    def generation_options(self) -> dict[str, Any]:
        """The keyword arguments of `evaluate_model` these settle."""
        return {
            "do_not_instructions": self.do_not or DO_NOT_INSTRUCTIONS,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "batch_size": self.generation_batch_size,
            "min_follow_rate": self.min_follow_rate,
            "bf16_generation": self.bf16_generation,
        }


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    from ..runtime import quiet_progress_bars

    parser = HfArgumentParser(EvalArguments, prog="delia eval", description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", help="a run folder, an adapter folder, a model folder or a hub name")
    parser.add_argument("--compare", nargs="+", metavar="RUN", help="print these runs' reports side by side")
    parser.add_argument("--output", default=None, help="folder for the report (none given: the target folder)")
    parser.add_argument("--eval_dataset", "--eval-dataset", default=DEFAULT_EVAL_DATASET, help=EVAL_DATASET_HELP)
    parser.add_argument("--train_dataset", "--train-dataset", default=None, help="training rows: seen vs unseen")
    parser.add_argument(
        "--base_model", "--base-model", default=None, help="an adapter's base (none given: its config's)"
    )
    parser.add_argument("--quantization", default="none", help="none (default), 8bit, 4bit or auto")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (used when --temperature > 0)")
    parser.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true")
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
    report = evaluation.run(seed=options.seed, **eval_args.generation_options())
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
