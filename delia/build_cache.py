"""build_cache: the base model answers a broad set of general queries itself; its answers are DELIA's diverse data.

    build_cache("meta-llama/Llama-2-7b-chat-hf", "query_cache.jsonl", "self_sample_cache.jsonl")

Reads queries (a JSONL of {"messages": [user, assistant]} rows, rows with query/reference fields, a saved dataset or a
hub dataset), or with `generate_queries=N` has the model write N queries itself first (Magpie,
`delia.generation.magpie`: kept in `<output>.queries.jsonl`, answered with the plain template), builds the `reference`
or `plain` prompt for each, generates with one of three backends (transformers in-process, vLLM in-process, any
OpenAI-compatible server over HTTP), and appends one row per query:

    {"messages": [{"role": "user", "content": query}, {"role": "assistant", "content": reply}], "id": ..., ...}

Resumable: rows are flushed per batch and a restart skips ids already written, so a run killed at any point and
restarted ends with every query answered once. Under `accelerate launch -m delia.build_cache ...` each process answers
its share of the queries into its own shard, and the main process merges the shards in query order at the end.
A sidecar `<output>.meta.json` records the model, template, sampling, seed, library versions and counts; the returned
`CacheResult` holds the same counts and stands for the output path.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .build_cache_config import BuildCacheArguments, argument_parser
from .cache_writer import CacheWriter, done_ids, merge_shards, shard_path, shard_paths
from .data.queries import Query, load_queries, repeat_queries
from .generation.base import Backend, Conversation, Generation, SamplingConfig
from .generation.factory import BackendOptions, make_backend
from .generation.loop import answer
from .generation.magpie import QueryGeneration, meta_path, queries_for_cache, queries_path
from .generation.prompts import build_conversation
from .io import check_output_file, repair_tail, write_json_atomically
from .run_files import cache_meta_file
from .runtime import leave_process_group, process_state

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
    tokens: int  # generated, kept or not (answers only: generated_queries counts the queries' own)
    seconds: float  # answering (after any query generation, which generated_queries times)
    processes: int
    invalid_replies_retried: int = 0  # 200 replies that were no chat completion, retried (openai backend)
    generated_queries: dict[str, Any] | None = None  # with generate_queries: asked, kept, attempts, dropped by reason

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
        generated = QueryGeneration(**self.generated_queries).summary() + "; " if self.generated_queries else ""
        return (
            f"{generated}{self.path}: {self.written} rows written, {self.skipped_already_done} skipped as already "
            f"done, {self.dropped_degenerate} dropped as empty or broken, {self.tokens} tokens "
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


def _resume_or_reset(output: str, resume: bool, overwrite: bool, state: Any, generated: bool = False) -> list[str]:
    """Phase 1: start the output over (resume=False, overwrite=True) or repair what an earlier kill left.

    `generated`: the generated queries file and its meta file are part of the output. Returns where partial last
    lines were moved to (they are kept, not deleted).
    """
    own = [queries_path(output), meta_path(queries_path(output))] if generated else []
    existing = [path for path in [output, *shard_paths(output), *own] if os.path.exists(path)]
    if existing and not resume:
        if not overwrite:
            raise FileExistsError(
                f"{existing[0]} already exists and resume=False: pass overwrite=True (CLI: --overwrite) to start over, "
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
    on_batch: Callable[[int, int, float], None] | None = None,
) -> _Tally:
    """Phase 3: answer every query and append its row to `target`, `batch_size` replies per flushed, fsynced write.

    Rows go to the file in answer order (longest prompt first if `sort_by_length`, or as they come back from a
    backend with `stream_unordered`: resume keys on ids, not on order); the replies that came back before an error
    are written before it is raised.
    """
    tally, rows, unwritten = _Tally(), [], 0
    invalid_before = getattr(engine, "invalid_replies_retried", 0)  # the query generation's, if it used this engine
    started = time.perf_counter()
    ids = [query.id for query in queries]
    where = lambda index: queries[index].where  # noqa: E731
    with (
        CacheWriter(target) as writer,
        contextlib.closing(
            answer(engine, conversations, ids, sampling, where=where, sort_by_length=sort_by_length)
        ) as replies,  # the backend is stopped on an error too
        tqdm(total=len(queries), desc="self-sampling", unit="reply", disable=not progress, dynamic_ncols=True) as bar,
    ):
        try:
            for index, reply in replies:
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
                    seconds = time.perf_counter() - started
                    bar.set_postfix_str(f"{tally.tokens / max(seconds, 1e-9):.0f} tokens/s", refresh=False)
                    bar.update(batch_size)
                    if on_batch is not None:
                        on_batch(bar.n, len(queries), seconds)
        finally:
            if rows:
                tally.written += writer.write(rows)
            bar.update(unwritten)
            tally.invalid_replies_retried = getattr(engine, "invalid_replies_retried", 0) - invalid_before
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
    generated: QueryGeneration | None = None,
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
        generated_queries=generated.counts() if generated else None,
        **totals,
    )
    if state.is_main_process:
        # this run's shards, or an earlier run's left by a kill (the ids in them were skipped above): fold them in
        merge_shards(output, {query.id: index for index, query in enumerate(all_queries)})
        meta = {**described, "repaired_partial_lines_saved_to": repaired, "counts": result.counts()}
        write_json_atomically(cache_meta_file(output), {**meta, "versions": _versions()})
    state.wait_for_everyone()
    return result


def _options(options: dict[str, Any]) -> tuple[BuildCacheArguments, BackendOptions]:
    """build_cache's keywords as BuildCacheArguments; `backend` may be a BackendOptions, whose settings a keyword given
    beside it overrides, and `backend_options=` adds constructor arguments (e.g. `{"max_retries": 2}` for openai)."""
    backend = options.pop("backend", "auto")
    extra = dict(options.pop("backend_options", None) or {})
    if isinstance(backend, BackendOptions):
        given = {key: value for key, value in asdict(backend).items() if key not in ("name", "extra")}
        options = {**given, **options}
        extra = {**backend.extra, **extra}
        backend = backend.name
    known = {setting.name for setting in fields(BuildCacheArguments)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"build_cache() got an unexpected keyword argument {unknown[0]!r}")
    arguments = BuildCacheArguments(backend=backend, **options)
    return arguments, arguments.backend_options(extra)


def _check_query_source(queries: Any, generate: int | None) -> None:
    """One query source: a query file (or dataset), or `generate_queries`; a clear line for neither or both."""
    if queries is not None and generate is not None:
        raise ValueError(
            "give either a query file or generate_queries (CLI: --generate_queries N with MODEL OUTPUT only), not "
            "both; to add generated queries to your own, generate them into a cache of their own first"
        )
    if queries is None and generate is None:
        raise ValueError("no queries: give a query file (CLI: MODEL QUERIES OUTPUT) or generate_queries=N")


def _load(queries: Any, arguments: BuildCacheArguments) -> list[Query]:
    """The queries to answer: read, cut to `limit` (generated ones to the number asked for), repeated per sample."""
    generated = arguments.generate_queries is not None
    loaded = load_queries(
        queries,
        query_field="query" if generated else arguments.query_field,
        reference_field=None if generated else arguments.reference_field,
        input_field=None if generated else arguments.input_field,
        split=arguments.split,
        need_reference=arguments.template == "reference",
    )[: arguments.generate_queries][: arguments.limit]
    return repeat_queries(loaded, arguments.samples_per_query)


def build_cache(
    model: Any,
    queries: Any = None,
    output: str | os.PathLike | None = None,
    *,
    tokenizer: Any = None,
    progress: bool = True,
    on_batch: Callable[[int, int, float], None] | None = None,
    **options: Any,
) -> CacheResult:
    """Self-sample one reply per query (`samples_per_query` each) into the JSONL `output` (appending, resumable).

    `model`: a model folder or hub name (transformers / vLLM), the served model name (openai), or a loaded model with
    `tokenizer=`. `queries`: a query file or dataset, or None with `generate_queries=N` (the model writes N queries
    first, `delia.generation.magpie`, into `<output>.queries.jsonl`, answered with the plain template). `options`: the
    fields of `BuildCacheArguments` (see there); `backend` may also be a `BackendOptions`, and `backend_options=`
    passes more constructor arguments (e.g. `{"max_retries": 2}` for openai, engine arguments for vLLM). Each request
    is seeded from `seed` and its query's id (`request_seed`); the k-th extra sample of a query has id `<id>-<k>`.
    The result stands for the output path (`os.fspath`, `str`). `progress` shows a bar (replies, ETA, tokens/s);
    `on_batch(done, total, seconds)` hears of each written batch.
    """
    arguments, backend = _options(options)
    if output is None:
        raise TypeError("build_cache() needs output, the JSONL cache to write")
    output = os.fspath(output)
    _check_query_source(queries, arguments.generate_queries)
    check_output_file(output, "the output cache", inputs=(queries,))  # before the model loads
    state = process_state()
    started = time.perf_counter()
    generating = arguments.generate_queries is not None
    all_queries = [] if generating else _load(queries, arguments)  # a bad query file: an error before any change
    described = {  # how the rows were made, for the meta file
        "model": _name(model),
        "queries": queries_path(output) if generating else _name(queries),
        **arguments.record(),
        "backend": backend.resolve(model),
    }

    repaired = _resume_or_reset(output, arguments.resume, arguments.overwrite, state, generated=generating)
    generated, engine = None, None
    try:
        if generating:
            generated, engine = queries_for_cache(
                model,
                queries_path(output),
                backend,
                tokenizer=tokenizer,
                count=arguments.generate_queries,
                max_new_tokens=arguments.query_max_new_tokens,
                seed=arguments.seed,
                tries=arguments.query_tries,
                progress=progress and state.is_main_process,
            )
            all_queries = _load(queries_path(output), arguments)
            started = time.perf_counter()  # `seconds` and tokens/s are the answering's (the generation's: its own)
        pending = _pending_queries(all_queries, output, state)
        mine = pending[state.process_index :: state.num_processes]
        tally = _Tally()
        if mine:  # with nothing left to answer here, the model is not even loaded
            target = shard_path(output, state.process_index, state.num_processes) if state.num_processes > 1 else output
            engine = engine or make_backend(backend, model, tokenizer=tokenizer, seed=arguments.seed)
            tally = _answer(
                engine,
                mine,
                _conversations(mine, arguments),
                target,
                sampling=arguments.sampling(),
                batch_size=backend.batch_size,
                sort_by_length=arguments.sort_by_length,
                keep_degenerate=arguments.keep_degenerate,
                progress=progress and state.is_main_process,
                on_batch=on_batch if state.is_main_process else None,
            )
    finally:
        if engine is not None:
            engine.close()
    return _finalise(output, all_queries, pending, tally, described, repaired, started, state, generated)


def _conversations(queries: list[Query], arguments: BuildCacheArguments) -> list[Conversation]:
    """Each query's conversation, in the `reference` or `plain` template after the system prompt."""
    return [
        build_conversation(query.query, query.reference, arguments.template, arguments.system_prompt)
        for query in queries
    ]


def _name(source: Any) -> str:
    """A model or query source as the meta file records it: its path or name, else its type."""
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


# ----------------------------------------------------------------------------------------------------------------------
# Command line: `delia build-cache MODEL [QUERIES] OUTPUT [options]` and `accelerate launch -m delia.build_cache ...`
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`delia build-cache` / `python -m delia.build_cache`: bad input is one clear line and exit status 2."""
    from .generation.openai_backend import ServerRequestError

    try:  # bad input, a server that refuses the request, a backend that is not installed: one line, rows kept
        arguments, positionals = argument_parser().parse_args_into_dataclasses(argv)
        queries, output = positionals.queries, positionals.output
        if output is None:  # MODEL OUTPUT: the queries are generated (or missing: build_cache says so)
            queries, output = None, queries
        if output is None:
            raise ValueError(
                "missing OUTPUT: delia build-cache MODEL QUERIES OUTPUT, or MODEL OUTPUT --generate_queries N"
            )
        result = build_cache(positionals.model, queries, output, **asdict(arguments))
    except (ValueError, OSError, ImportError, ServerRequestError) as error:
        print(f"delia build-cache: error: {error}", file=sys.stderr)
        return 2
    if process_state().is_main_process:
        print(result.summary())
    leave_process_group()  # a clean exit under torchrun / accelerate launch
    return 0


if __name__ == "__main__":
    sys.exit(main())
