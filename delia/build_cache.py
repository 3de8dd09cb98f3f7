"""build_cache: the base model answers a broad set of general queries itself; its answers are DELIA's diverse data.

    build_cache("meta-llama/Llama-2-7b-chat-hf", "query_cache.jsonl", "self_sample_cache.jsonl")

Reads queries (a JSONL of {"messages": [user, assistant]} rows, rows with query/reference fields, a saved dataset or a
hub dataset), builds the `reference` or `plain` prompt for each, generates with one of three backends (transformers
in-process, vLLM in-process, any OpenAI-compatible server over HTTP), and appends one row per query:

    {"messages": [{"role": "user", "content": query}, {"role": "assistant", "content": reply}], "id": ..., ...}

Resumable: rows are flushed per batch and a restart skips ids already written, so a run killed at any point and
restarted ends with every query answered once. Under `accelerate launch -m delia.build_cache ...` each process answers
its share of the queries into its own shard, and the main process merges the shards in query order at the end.
A sidecar `<output>.meta.json` records the model, template, sampling, seed, library versions and counts.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
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
from .generation.base import Generation, SamplingConfig
from .generation.prompts import DEFAULT_SYSTEM_PROMPT, TEMPLATES, PromptRenderError, build_conversation
from .runtime import leave_process_group, process_state

BACKENDS = ("auto", "transformers", "vllm", "openai")


@dataclass(frozen=True)
class Query:
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


def make_backend(
    backend: str,
    model: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = 32,
    base_urls: str | list[str] | None = None,
    concurrency: int = 8,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    seed: int = 0,
    backend_options: dict[str, Any] | None = None,
) -> Any:
    """The backend for `backend` ("auto": openai when base_urls are given, vLLM on CUDA if installed, else transformers)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        if base_urls:
            backend = "openai"
        elif (
            isinstance(model, (str, os.PathLike))  # a loaded model stays in-process with transformers
            and torch.cuda.is_available()
            and importlib.util.find_spec("vllm") is not None
        ):
            backend = "vllm"
        else:
            backend = "transformers"
    if backend == "openai":
        from .generation.openai_backend import OpenAIBackend

        if not base_urls:
            raise ValueError("backend='openai' needs base_urls (CLI: --base-url), e.g. http://127.0.0.1:8000/v1")
        return OpenAIBackend(str(model), base_urls, concurrency=concurrency, **(backend_options or {}))
    if backend == "vllm":
        from .generation.vllm_backend import VLLMBackend

        return VLLMBackend(
            model,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            seed=seed,
            **(backend_options or {}),
        )
    from .generation.transformers_backend import TransformersBackend, load_model_and_tokenizer

    if isinstance(model, (str, os.PathLike)):
        state = process_state()
        model, tokenizer = load_model_and_tokenizer(
            model, dtype=dtype, trust_remote_code=trust_remote_code, device=str(state.device)
        )
    elif tokenizer is None:
        raise ValueError("pass tokenizer= together with an already loaded model")
    return TransformersBackend(model, tokenizer, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def degenerate_reason(generation: Generation) -> str | None:
    """Why a reply is unusable: "empty" (nothing but whitespace) or "cut mid-token" (ends in a broken character)."""
    if not generation.text.strip():
        return "empty"
    if generation.text.endswith("\ufffd"):
        return "cut mid-token"
    return None


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("delia", "torch", "transformers", "datasets", "accelerate", "vllm"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _order_by_prompt_length(backend: Any, queries: list[Query], conversations: list[list[dict]]) -> list[int]:
    """Longest prompt first (out-of-memory shows up at once, and each batch pads little)."""
    if hasattr(backend, "prompt_ids"):
        try:
            lengths = [len(ids) for ids in backend.prompt_ids(conversations)]
        except PromptRenderError as error:
            raise DataFormatError(f"{queries[error.index].where}: {error}") from None
    else:
        lengths = [sum(len(m["content"]) for m in messages) for messages in conversations]
    return sorted(range(len(queries)), key=lambda index: -lengths[index])


def _start_engine(
    backend: str,
    model: Any,
    mine: list[Query],
    template: str,
    system_prompt: str | None,
    sort_by_length: bool,
    **backend_options: Any,
) -> tuple[Any, list[list[dict]], list[int]]:
    """The backend, the conversation of each query, and the order to answer them in."""
    engine = make_backend(backend, model, **backend_options)
    conversations = [build_conversation(q.query, q.reference, template, system_prompt) for q in mine]
    order = _order_by_prompt_length(engine, mine, conversations) if sort_by_length else list(range(len(mine)))
    return engine, conversations, order


def build_cache(
    model: Any,
    queries: Any,
    output: str | os.PathLike,
    *,
    template: str = "reference",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    backend: str = "auto",
    batch_size: int = 32,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int = 0,
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
    base_urls: str | list[str] | None = None,
    concurrency: int = 8,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    min_new_tokens: int | None = None,
    backend_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> str:
    """Self-sample one reply per query into the JSONL `output` (appending, resumable); return the output path.

    `model` is a model folder or hub name (transformers / vLLM backends), the served model name (openai backend), or
    a loaded model together with `tokenizer=`. `backend_options` go to the backend's constructor (for example
    `{"max_retries": 2, "timeout": 30}` for openai, engine arguments for vLLM). See the module docstring for the formats, and `<output>.meta.json` for
    what a run did.
    """
    sampling = SamplingConfig(max_new_tokens, temperature, top_p, seed, min_new_tokens)
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {template!r}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    output = os.fspath(output)
    state = process_state()
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

    started = time.perf_counter()
    all_queries = load_queries(
        queries,
        query_field=query_field,
        reference_field=reference_field,
        input_field=input_field,
        split=split,
        need_reference=template == "reference",
    )[:limit]
    sharded = state.num_processes > 1
    target = shard_path(output, state.process_index, state.num_processes) if sharded else output
    repaired = []
    if state.is_main_process:  # a partial line left by a kill, in any file of any earlier run, is moved aside first
        repaired = [saved for path in [output, *shard_paths(output)] if (saved := repair_tail(path))]
    state.wait_for_everyone()
    already = done_ids([output, *shard_paths(output)])
    state.wait_for_everyone()  # every process has read the shards before any process appends to its own
    pending = [query for query in all_queries if query.id not in already]
    mine = pending[state.process_index :: state.num_processes]

    if not mine:  # nothing left to answer here: skip loading the model
        engine = None
        conversations, order = [], []
    else:
        engine, conversations, order = _start_engine(
            backend,
            model,
            mine,
            template,
            system_prompt,
            sort_by_length,
            tokenizer=tokenizer,
            batch_size=batch_size,
            base_urls=base_urls,
            concurrency=concurrency,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            seed=seed,
            backend_options=backend_options,
        )

    counts = {"written": 0, "dropped_degenerate": 0, "kept_degenerate": 0, "hit_max_new_tokens": 0, "tokens": 0}
    bar = tqdm(total=len(mine), unit="row", disable=not progress or not state.is_main_process, desc="self-sampling")
    writer = CacheWriter(target)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            # Each batch gets its own seed, from its first query's id: independent streams, reproducible runs
            batch_sampling = replace(sampling, seed=(seed + int(mine[batch[0]].id, 16)) % 2**31)
            try:
                replies = engine.generate([conversations[i] for i in batch], batch_sampling)
            except PromptRenderError as error:
                raise DataFormatError(f"{mine[batch[error.index]].where}: {error}") from None
            rows = []
            for index, reply in zip(batch, replies, strict=True):
                counts["tokens"] += reply.num_tokens
                counts["hit_max_new_tokens"] += reply.finish_reason == "length"
                if degenerate_reason(reply) is not None:
                    if not keep_degenerate:
                        counts["dropped_degenerate"] += 1
                        continue
                    counts["kept_degenerate"] += 1
                query = mine[index]
                rows.append(
                    {
                        "messages": [
                            {"role": "user", "content": query.query},
                            {"role": "assistant", "content": reply.text},
                        ],
                        "id": query.id,
                        "finish_reason": reply.finish_reason,
                        "num_tokens": reply.num_tokens,
                    }
                )
            counts["written"] += writer.write(rows)
            bar.update(len(batch))
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(tokens_per_s=f"{counts['tokens'] / elapsed:.0f}")
    finally:
        bar.close()
        writer.close()
        if engine is not None:
            engine.close()

    per_process = gather_object([counts]) if sharded else [counts]
    totals = {key: sum(part[key] for part in per_process) for key in counts}
    state.wait_for_everyone()
    if state.is_main_process:
        # this run's shards, or an earlier run's left by a kill (the ids in them were skipped above): fold them in
        merge_shards(output, {query.id: index for index, query in enumerate(all_queries)})
        totals.update(
            queries=len(all_queries),
            skipped_already_done=len(all_queries) - len(pending),
            seconds=round(time.perf_counter() - started, 3),
            processes=state.num_processes,
        )
        write_json_atomically(
            f"{output}.meta.json",
            {
                "model": str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
                "backend": engine.name if engine is not None else backend,
                "queries": str(queries) if isinstance(queries, (str, os.PathLike)) else type(queries).__name__,
                "template": template,
                "system_prompt": system_prompt,
                "sampling": asdict(sampling),
                "seed": seed,
                "batch_size": batch_size,
                "sort_by_length": sort_by_length,
                "keep_degenerate": keep_degenerate,
                "repaired_partial_lines_saved_to": repaired,
                "counts": totals,
                "versions": _versions(),
            },
        )
    state.wait_for_everyone()
    return output


# ----------------------------------------------------------------------------------------------------------------------
# Command line: `delia build-cache ...` and `accelerate launch -m delia.build_cache ...`
# ----------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", help="model folder or hub name (the served model name with --backend openai)")
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run build_cache from parsed arguments and print the summary; return the counts."""
    import json

    options = {key: value for key, value in vars(args).items() if key not in ("model", "queries", "output", "command")}
    options["system_prompt"] = options["system_prompt"] or None
    output = build_cache(args.model, args.queries, args.output, **options)
    if not process_state().is_main_process:
        return {}
    with open(f"{output}.meta.json", encoding="utf-8") as handle:
        counts = json.load(handle)["counts"]
    seconds = max(counts["seconds"], 1e-9)
    print(
        f"{output}: {counts['written']} rows written, {counts['skipped_already_done']} skipped as already done, "
        f"{counts['dropped_degenerate']} dropped as empty or broken, {counts['tokens']} tokens "
        f"({counts['tokens'] / seconds:.1f} tokens/s) in {counts['seconds']:.1f} s"
    )
    return counts


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
