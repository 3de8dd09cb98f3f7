"""build_cache: the base model answers a broad set of general queries itself; its answers are DELIA's diverse data.

    build_cache("meta-llama/Llama-2-7b-chat-hf", "query_cache.jsonl", "self_sample_cache.jsonl")

Reads queries (a JSONL of {"messages": [user, assistant]} rows, rows with query/reference fields, a saved dataset or a
hub dataset), builds the `reference` or `plain` prompt for each, generates with one of three backends (transformers
in-process, vLLM in-process, any OpenAI-compatible server over HTTP), and appends one row per query:

    {"messages": [{"role": "user", "content": query}, {"role": "assistant", "content": reply}], "id": ..., ...}

Resumable: rows are flushed per batch and a restart skips ids already written, so a run killed at any point and
restarted ends with every query answered once. Under `accelerate launch -m delia.build_cache ...` each process answers
its share of the queries into its own shard, and the main process merges the shards in query order at the end.
A sidecar `<output>.meta.json` records the model, template, sampling, seed, library versions and counts; the returned
`CacheResult` holds the same counts and stands for the output path.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .cache_writer import (
    CacheWriter,
    done_ids,
    merge_shards,
    repair_tail,
    shard_path,
    shard_paths,
    write_json_atomically,
)
from .data import DataFormatError, DatasetOrigin, read_dataset, validate_conversations
from .generation.base import Backend, Conversation, Generation, SamplingConfig
from .generation.prompts import DEFAULT_SYSTEM_PROMPT, TEMPLATES, PromptRenderError, build_conversation
from .runtime import leave_process_group, process_state

BACKENDS = ("auto", "transformers", "vllm", "openai")


@dataclass(frozen=True)
class Query:
    """One query to answer: its id (see query_id), text, reference answer, and where it was read."""

    id: str
    query: str
    reference: str | None
    row: int
    origin: DatasetOrigin  # names the file, for error messages

    @property
    def where(self) -> str:
        """File and line (or dataset and row), looked up only when an error needs it."""
        return self.origin.where(self.row)


def query_id(query: str) -> str:
    """A stable id for a query: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(query.encode("utf-8")).hexdigest()[:16]


def repeat_queries(queries: list[Query], samples_per_query: int) -> list[Query]:
    """Each query `samples_per_query` times, sample k > 0 with id `<id>-<k>`: its own row, seed and resume entry.

    Sample 0 keeps the query's plain id, so a cache of one reply per query is the first part of a larger one. With
    a few hundred queries, several samples each give the several thousand diverse rows DELIA mixes in.
    """
    if isinstance(samples_per_query, bool) or not isinstance(samples_per_query, int) or samples_per_query < 1:
        raise ValueError(f"samples_per_query must be a positive integer, got {samples_per_query!r}")
    if samples_per_query == 1:
        return queries
    return [
        query if sample == 0 else replace(query, id=f"{query.id}-{sample}")
        for query in queries
        for sample in range(samples_per_query)
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------------------------------------------------


def _text(value: Any, origin: DatasetOrigin, row: int, field: str, required: bool) -> str | None:
    """`value` if it is a non-empty string; None if it is empty and optional; else an error naming file and line."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataFormatError(
                f"{origin.where(row)}: field {field!r} is missing or empty; expected a non-empty string"
            )
        return None
    if not isinstance(value, str):
        raise DataFormatError(f"{origin.where(row)}: field {field!r}: expected a string, got {type(value).__name__}")
    return value


def load_queries(
    source: Any,
    *,
    query_field: str | None = None,
    reference_field: str | None = None,
    input_field: str | None = None,
    split: str = "train",
    need_reference: bool = True,
) -> list[Query]:
    """Queries (and reference answers) from conversations or from named fields; duplicates keep their first row.

    Without `query_field`: a `messages` column gives the first user turn and the assistant reply after it; an
    Alpaca-style `instruction` column gives instruction (+ `input`) and `output`.
    """
    dataset, origin = read_dataset(source, "query file", split)
    columns = dataset.column_names
    if query_field is None and "messages" in columns:
        validate_conversations(dataset, origin)
        pairs = []
        for messages in dataset["messages"]:
            turns = [m for m in messages if m["role"] != "system"]
            pairs.append((turns[0]["content"], turns[1]["content"]))
    else:
        if query_field is None and "instruction" in columns:
            query_field = "instruction"
            input_field = input_field or ("input" if "input" in columns else None)
            reference_field = reference_field or ("output" if "output" in columns else None)
        if query_field is None or query_field not in columns:
            raise DataFormatError(
                f"{origin.where(0)}: no query field {query_field or 'messages'!r} (fields: {', '.join(columns)}); "
                "pass query_field= / reference_field= (CLI: --query-field / --reference-field)"
            )
        for name in (reference_field, input_field):
            if name is not None and name not in columns:
                raise DataFormatError(f"{origin.label}: no field {name!r} (fields: {', '.join(columns)})")
        queries = dataset[query_field]
        references = dataset[reference_field] if reference_field else [None] * len(queries)
        inputs = dataset[input_field] if input_field else [None] * len(queries)
        pairs = []
        for row, (query, reference, extra) in enumerate(zip(queries, references, inputs, strict=True)):
            query = _text(query, origin, row, query_field, required=True)
            extra = _text(extra, origin, row, input_field, required=False) if input_field else None
            reference = _text(reference, origin, row, reference_field, need_reference) if reference_field else None
            pairs.append((f"{query}\n\n{extra}" if extra else query, reference))
    if need_reference and query_field is not None and reference_field is None:
        raise DataFormatError(
            f"{origin.label}: the 'reference' template needs reference answers; pass reference_field= "
            "(CLI: --reference-field) or use template='plain'"
        )
    seen: dict[str, Query] = {}
    for row, (query, reference) in enumerate(pairs):
        identifier = query_id(query)
        seen.setdefault(identifier, Query(identifier, query, reference, row, origin))
    return list(seen.values())


# ----------------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendOptions:
    """Which backend answers the queries and how it is set up: all that `make_backend` needs besides the model."""

    name: str = "auto"  # "auto": openai when base_urls are given, vLLM on CUDA if installed, else transformers
    base_urls: str | list[str] | None = None  # OpenAI-compatible servers (openai)
    concurrency: int = 8  # requests in flight (openai)
    batch_size: int = 32  # prompts per generate call (transformers, vLLM); replies per durable write (all)
    tensor_parallel_size: int = 1  # GPUs per model (vLLM)
    dtype: str = "auto"  # when a model is loaded by name (transformers, vLLM)
    trust_remote_code: bool = False  # likewise
    extra: dict[str, Any] = field(default_factory=dict)  # more constructor arguments, e.g. {"max_retries": 2}

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.name!r}")
        for setting in ("concurrency", "batch_size", "tensor_parallel_size"):
            value = getattr(self, setting)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{setting} must be a positive integer, got {value!r}")

    @classmethod
    def from_keywords(cls, backend: str | BackendOptions, keywords: dict[str, Any]) -> BackendOptions:
        """`backend` (a name or BackendOptions) with build_cache's backend keywords on top: a keyword given wins."""
        settings = dict(keywords)
        if "backend_options" in settings:  # the keyword's name for `extra`
            settings["extra"] = dict(settings.pop("backend_options") or {})
        unknown = sorted(set(settings) - {setting.name for setting in fields(cls) if setting.name != "name"})
        if unknown:
            raise TypeError(f"build_cache() got an unexpected keyword argument {unknown[0]!r}")
        base = backend if isinstance(backend, BackendOptions) else cls(name=backend)
        return replace(base, **settings)

    def resolve(self, model: Any) -> str:
        """The backend that will run: `name`, or for "auto" the one picked for `model` on this machine."""
        if self.name != "auto":
            return self.name
        if self.base_urls:
            return "openai"
        if (
            isinstance(model, (str, os.PathLike))  # a loaded model stays in-process with transformers
            and torch.cuda.is_available()
            and importlib.util.find_spec("vllm") is not None
        ):
            return "vllm"
        return "transformers"


def make_backend(options: BackendOptions, model: Any, *, tokenizer: Any = None, seed: int = 0) -> Backend:
    """The backend `options` ask for, serving `model` (vLLM also gets `seed` as its engine's seed)."""
    backend = options.resolve(model)
    if backend == "openai":
        from .generation.openai_backend import OpenAIBackend

        if not options.base_urls:
            raise ValueError("backend='openai' needs base_urls (CLI: --base-url), e.g. http://127.0.0.1:8000/v1")
        return OpenAIBackend(str(model), options.base_urls, concurrency=options.concurrency, **options.extra)
    if backend == "vllm":
        from .generation.vllm_backend import VLLMBackend

        return VLLMBackend(
            model,
            batch_size=options.batch_size,
            tensor_parallel_size=options.tensor_parallel_size,
            dtype=options.dtype,
            trust_remote_code=options.trust_remote_code,
            seed=seed,
            **options.extra,
        )
    from .generation.transformers_backend import TransformersBackend
    from .modeling import load_tokenizer_and_model

    if isinstance(model, (str, os.PathLike)):  # the one model loader, unquantized, on this process's device
        tokenizer, model = load_tokenizer_and_model(
            model,
            dtype=options.dtype,
            trust_remote_code=options.trust_remote_code,
            device=str(process_state().device),
        )
    elif tokenizer is None:
        raise ValueError("pass tokenizer= together with an already loaded model")
    return TransformersBackend(model, tokenizer, batch_size=options.batch_size)


# ----------------------------------------------------------------------------------------------------------------------
# The run, in four phases: resume or reset the output; pick this process's pending queries; answer them (generate and
# write); finalise (merge the shards, write the meta file)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _Tally:
    """What one process did with its replies."""

    written: int = 0
    dropped_degenerate: int = 0
    kept_degenerate: int = 0
    hit_max_new_tokens: int = 0
    tokens: int = 0
    invalid_replies_retried: int = 0  # 200 replies that were no chat completion, retried (openai)


@dataclass(frozen=True)
class CacheResult:
    """What a build_cache run did (the counts of `<output>.meta.json`); it also stands for the output path."""

    path: str
    backend: str  # the backend that ran ("auto" resolved)
    queries: int  # after deduplication and `limit`, times `samples_per_query`
    skipped_already_done: int  # answered by an earlier run
    written: int
    dropped_degenerate: int
    kept_degenerate: int
    hit_max_new_tokens: int
    tokens: int  # generated, kept or not
    seconds: float
    processes: int
    invalid_replies_retried: int = 0  # 200 replies that were no chat completion, retried (openai backend)

    def __fspath__(self) -> str:
        """The output path, so `open(result)` and `load_conversations(result)` work as with the path itself."""
        return self.path

    def __str__(self) -> str:
        """The output path."""
        return self.path

    def counts(self) -> dict[str, Any]:
        """The counts, as `<output>.meta.json` records them."""
        return {key: value for key, value in asdict(self).items() if key not in ("path", "backend")}

    def summary(self) -> str:
        """One line for people: rows written and skipped, tokens, speed."""
        seconds = max(self.seconds, 1e-9)
        invalid = self.invalid_replies_retried
        return (
            f"{self.path}: {self.written} rows written, {self.skipped_already_done} skipped as already done, "
            f"{self.dropped_degenerate} dropped as empty or broken, {self.tokens} tokens "
            f"({self.tokens / seconds:.1f} tokens/s) in {self.seconds:.1f} s"
            + (f", {invalid} invalid server replies retried" if invalid else "")
        )


def degenerate_reason(generation: Generation) -> str | None:
    """Why a reply is unusable: "empty" (nothing but whitespace) or "cut mid-token" (ends in a broken character)."""
    if not generation.text.strip():
        return "empty"
    if generation.text.endswith("\ufffd"):
        return "cut mid-token"
    return None


def _versions() -> dict[str, str]:
    """The versions of Python and of the libraries that shape the replies, for the meta file."""
    versions = {"python": platform.python_version()}
    for package in ("delia-trl", "torch", "transformers", "datasets", "accelerate", "vllm"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _resume_or_reset(output: str, resume: bool, overwrite: bool, state: Any) -> list[str]:
    """Phase 1: start the output over (resume=False, overwrite=True) or repair what an earlier kill left.

    Returns where partial last lines were moved to (they are kept, not deleted).
    """
    existing = [path for path in [output, *shard_paths(output)] if os.path.exists(path)]
    if existing and not resume:
        if not overwrite:
            raise FileExistsError(
                f"{output} already exists and resume=False: pass overwrite=True (CLI: --overwrite) to start over, "
                "or resume=True to continue it"
            )
        state.wait_for_everyone()
        if state.is_main_process:
            for path in existing:
                os.remove(path)
    state.wait_for_everyone()
    repaired = []
    if state.is_main_process:  # a partial line left by a kill, in any file of any earlier run, is moved aside first
        repaired = [saved for path in [output, *shard_paths(output)] if (saved := repair_tail(path))]
    state.wait_for_everyone()
    return repaired


def _pending_queries(all_queries: list[Query], output: str, state: Any) -> list[Query]:
    """Phase 2: the queries no file of this output (nor any shard) answers yet, in query order."""
    already = done_ids([output, *shard_paths(output)])
    state.wait_for_everyone()  # every process has read the shards before any process appends to its own
    return [query for query in all_queries if query.id not in already]


def _answer(
    engine: Backend,
    queries: list[Query],
    conversations: list[Conversation],
    target: str,
    *,
    sampling: SamplingConfig,
    batch_size: int,
    sort_by_length: bool,
    keep_degenerate: bool,
    progress: bool,
) -> _Tally:
    """Phase 3: answer every query and append its row to `target`, `batch_size` replies per flushed, fsynced write.

    Prompts are prepared once (rendered, tokenized) and answered longest first if `sort_by_length` (out-of-memory
    shows up at once, and each batch pads little). Rows go to the file in that order, or as they come back with a
    backend that has `stream_unordered` (openai: a retry holds nothing back; resume keys on ids, not on order); the
    replies that came back before an error are written before it is raised.
    """
    try:
        prompts = engine.prepare(conversations, [query.id for query in queries])
    except PromptRenderError as error:
        raise DataFormatError(f"{queries[error.index].where}: {error}") from None
    order = list(range(len(queries)))
    if sort_by_length:
        order.sort(key=lambda index: -prompts[index].length)
    tally, rows, unwritten = _Tally(), [], 0
    started = time.perf_counter()
    in_answer_order = [prompts[index] for index in order]
    unordered = getattr(engine, "stream_unordered", None)  # (position in in_answer_order, reply) pairs
    stream = (unordered or engine.stream)(in_answer_order, sampling)
    with (
        CacheWriter(target) as writer,
        contextlib.closing(stream) as replies,  # stopped on an error too
        tqdm(total=len(queries), unit="row", disable=not progress) as bar,
    ):
        try:
            answered = 0
            for position, reply in replies if unordered else enumerate(replies):
                index, answered = order[position], answered + 1
                tally.tokens += reply.num_tokens
                tally.hit_max_new_tokens += reply.finish_reason == "length"
                degenerate = degenerate_reason(reply) is not None
                tally.kept_degenerate += degenerate and keep_degenerate
                tally.dropped_degenerate += degenerate and not keep_degenerate
                if keep_degenerate or not degenerate:
                    rows.append(_row(queries[index], reply))
                unwritten += 1
                if unwritten == batch_size:
                    batch, rows, unwritten = rows, [], 0  # taken first: a failed write is never written twice
                    tally.written += writer.write(batch)
                    bar.update(batch_size)
                    bar.set_postfix(tokens_per_s=f"{tally.tokens / max(time.perf_counter() - started, 1e-9):.0f}")
            if answered != len(queries):  # what zip(strict=True) checked when replies came in order
                raise RuntimeError(f"the {engine.name} backend answered {answered} of {len(queries)} prompts")
        finally:
            if rows:
                tally.written += writer.write(rows)
            bar.update(unwritten)
            tally.invalid_replies_retried = getattr(engine, "invalid_replies_retried", 0)
    return tally


def _row(query: Query, reply: Generation) -> dict[str, Any]:
    """The cache row of one answered query."""
    return {
        "messages": [{"role": "user", "content": query.query}, {"role": "assistant", "content": reply.text}],
        "id": query.id,
        "finish_reason": reply.finish_reason,
        "num_tokens": reply.num_tokens,
    }


def _finalise(
    output: str,
    all_queries: list[Query],
    pending: list[Query],
    tally: _Tally,
    described: dict[str, Any],
    repaired: list[str],
    started: float,
    state: Any,
) -> CacheResult:
    """Phase 4: add up every process's counts, merge the shards in query order, write `<output>.meta.json`."""
    parts = gather_object([tally]) if state.num_processes > 1 else [tally]
    totals = {name: sum(getattr(part, name) for part in parts) for name in asdict(tally)}
    state.wait_for_everyone()
    result = CacheResult(
        path=output,
        backend=described["backend"],
        queries=len(all_queries),
        skipped_already_done=len(all_queries) - len(pending),
        seconds=round(time.perf_counter() - started, 3),
        processes=state.num_processes,
        **totals,
    )
    if state.is_main_process:
        # this run's shards, or an earlier run's left by a kill (the ids in them were skipped above): fold them in
        merge_shards(output, {query.id: index for index, query in enumerate(all_queries)})
        meta = {**described, "repaired_partial_lines_saved_to": repaired, "counts": result.counts()}
        write_json_atomically(f"{output}.meta.json", {**meta, "versions": _versions()})
    state.wait_for_everyone()
    return result


def build_cache(
    model: Any,
    queries: Any,
    output: str | os.PathLike,
    *,
    template: str = "reference",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    backend: str | BackendOptions = "auto",
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int = 0,
    samples_per_query: int = 1,
    min_new_tokens: int | None = None,
    resume: bool = True,
    overwrite: bool = False,
    limit: int | None = None,
    keep_degenerate: bool = False,
    sort_by_length: bool = True,
    query_field: str | None = None,
    reference_field: str | None = None,
    input_field: str | None = None,
    split: str = "train",
    tokenizer: Any = None,
    progress: bool = True,
    **backend_keywords: Any,
) -> CacheResult:
    """Self-sample one reply per query (`samples_per_query` each) into the JSONL `output` (appending, resumable).

    `model` is a model folder or hub name (transformers / vLLM backends), the served model name (openai backend), or
    a loaded model together with `tokenizer=`. `backend` is a backend name or a `BackendOptions`; its fields can also
    be given as keywords (`batch_size=`, `base_urls=`, `concurrency=`, `tensor_parallel_size=`, `dtype=`,
    `trust_remote_code=`, and `backend_options=` for `extra`: more constructor arguments, for example
    `{"max_retries": 2, "timeout": 30}` for openai, engine arguments for vLLM), which override it. Each request is
    seeded from `seed` and its query's id (`delia.generation.request_seed`); the k-th extra sample of a query has id
    `<id>-<k>`. The result stands for the output path
    (`os.fspath`, `str`); see the module docstring for the formats, and `<output>.meta.json` for what a run did.
    """
    options = BackendOptions.from_keywords(backend, backend_keywords)
    sampling = SamplingConfig(max_new_tokens, temperature, top_p, seed, min_new_tokens)
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {template!r}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    output = os.fspath(output)
    state = process_state()
    started = time.perf_counter()
    all_queries = load_queries(
        queries,
        query_field=query_field,
        reference_field=reference_field,
        input_field=input_field,
        split=split,
        need_reference=template == "reference",
    )[:limit]
    all_queries = repeat_queries(all_queries, samples_per_query)
    described = {  # how the rows were made, for the meta file
        "model": str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
        "backend": options.resolve(model),
        "queries": str(queries) if isinstance(queries, (str, os.PathLike)) else type(queries).__name__,
        "template": template,
        "system_prompt": system_prompt,
        "sampling": asdict(sampling),
        "seed": seed,
        "samples_per_query": samples_per_query,
        "batch_size": options.batch_size,
        "sort_by_length": sort_by_length,
        "keep_degenerate": keep_degenerate,
    }

    repaired = _resume_or_reset(output, resume, overwrite, state)
    pending = _pending_queries(all_queries, output, state)
    mine = pending[state.process_index :: state.num_processes]
    tally = _Tally()
    if mine:  # with nothing left to answer here, the model is not even loaded
        target = shard_path(output, state.process_index, state.num_processes) if state.num_processes > 1 else output
        engine = make_backend(options, model, tokenizer=tokenizer, seed=seed)
        try:
            tally = _answer(
                engine,
                mine,
                [build_conversation(query.query, query.reference, template, system_prompt) for query in mine],
                target,
                sampling=sampling,
                batch_size=options.batch_size,
                sort_by_length=sort_by_length,
                keep_degenerate=keep_degenerate,
                progress=progress and state.is_main_process,
            )
        finally:
            engine.close()
    return _finalise(output, all_queries, pending, tally, described, repaired, started, state)


# ----------------------------------------------------------------------------------------------------------------------
# Command line: `delia build-cache ...` and `accelerate launch -m delia.build_cache ...`
# ----------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `delia build-cache` arguments: the build_cache keywords, spelled --like-this."""
    parser.add_argument(
        "model",
        help="model folder, hub name or short name such as smollm2-135m-instruct (the served model name with --backend openai)",
    )
    parser.add_argument(
        "queries", help="JSONL of {messages: [user, assistant]}, rows with fields, saved or hub dataset"
    )
    parser.add_argument("output", help="the JSONL cache to append to")
    parser.add_argument("--template", choices=TEMPLATES, default="reference")
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="'' for none")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--base-url", action="append", dest="base_urls", help="OpenAI-compatible server (repeatable)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (openai backend)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--samples-per-query", type=int, default=1, help="replies sampled per query (each its own row and seed)"
    )
    parser.add_argument("--limit", type=int, default=None, help="answer only the first N queries")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="refuse an existing output")
    parser.add_argument("--overwrite", action="store_true", help="with --no-resume: start the output over")
    parser.add_argument("--keep-degenerate", action="store_true", help="keep empty / broken replies")
    parser.add_argument("--no-sort", dest="sort_by_length", action="store_false", help="keep the query order")
    parser.add_argument("--query-field", default=None)
    parser.add_argument("--reference-field", default=None)
    parser.add_argument("--input-field", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM backend")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser


def run(args: argparse.Namespace) -> CacheResult:
    """Run build_cache from parsed arguments and print the summary line (main process); return the result."""
    settings = {key: value for key, value in vars(args).items() if key not in ("model", "queries", "output", "command")}
    settings["system_prompt"] = settings["system_prompt"] or None
    result = build_cache(args.model, args.queries, args.output, **settings)
    if process_state().is_main_process:
        print(result.summary())
    return result


def main(argv: list[str] | None = None) -> int:
    """`delia build-cache` / `python -m delia.build_cache`: bad input is one clear line and exit status 2."""
    parser = add_arguments(argparse.ArgumentParser(prog="delia build-cache", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    from .generation.openai_backend import ServerRequestError

    try:  # bad input, a server that refuses the request, a backend that is not installed: one line, rows kept
        run(args)
    except (ValueError, OSError, ImportError, ServerRequestError) as error:
        print(f"delia build-cache: error: {error}", file=sys.stderr)
        return 2
    leave_process_group()  # a clean exit under torchrun / accelerate launch
    return 0


if __name__ == "__main__":
    sys.exit(main())
