"""Queries the base model writes itself (Magpie): the chat template up to where a user's words begin, continued.

An instruction-tuned model given only the start of a user turn (`<|im_start|>user\\n` after the template's own system
prompt, if it adds one) writes a plausible user request and ends the turn; sampled at temperature 1.0 and top_p 0.99,
each request seeded from the run's seed and its number (`query-<n>`), it writes a different one each time. Each
candidate is cut at the end of the user turn, filtered (`delia.data.query_filter`: no empty, unfinished, short,
degenerate or duplicate ones), and the kept ones are appended, one flushed batch at a time, to the queries file
`<output>.queries.jsonl`:

    {"query": "Write a haiku about autumn.", "id": "<query_id>", "attempt": 17}

which `load_queries(path, query_field="query", need_reference=False)` reads (CLI: `--query-field query --template
plain`). Resumable: a restart reads the kept queries back (so no query is kept twice) and goes on from the attempt
after the last one recorded in `<output>.queries.meta.json`. At most `tries` candidates per query asked for are drawn;
a model that keeps none of them stops with the counts of what was dropped and why.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from ..data.queries import query_id
from ..data.query_filter import QueryFilter, describe_dropped
from ..io import append_jsonl, iter_jsonl, read_json_or_none, repair_tail, write_json_atomically
from ..runtime import process_state
from .base import Backend, SamplingConfig
from .factory import BackendOptions, make_backend

PLACEHOLDER = "DELIA-USER-TURN-7f3a"  # stands for the user's words while the template is rendered
QUERY_TEMPERATURE, QUERY_TOP_P = 1.0, 0.99  # Magpie's sampling: the model's own distribution, barely truncated
DEFAULT_TRIES = 4  # candidates drawn per query asked for, at most


def queries_path(output: str) -> str:
    """The file of the queries generated for the cache `output`."""
    return f"{output}.queries.jsonl"


def meta_path(path: str) -> str:
    """The meta file beside the queries file `path`: what generated it, the attempts made, the drops by reason."""
    return f"{path[: -len('.jsonl')]}.meta.json"


def kept_queries(path: str) -> int:
    """How many queries the queries file holds (a partial last line, left by a kill, not counted)."""
    return sum(1 for _ in iter_jsonl(path, skip_partial_tail=True)) if os.path.exists(path) else 0


@dataclass(frozen=True)
class UserTurn:
    """Where a user's words begin in a model's chat template (`prefix`) and the text that ends them (`end`)."""

    prefix: str
    end: str


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def user_turn(tokenizer: Any, model: str) -> UserTurn:
    """The start and end of a user turn in `tokenizer`'s chat template; a ValueError naming `model` if it has none.

    The template renders a user message alone (its own default system prompt kept) and, to find where the turn
    ends, a user message followed by a reply: the prefix is the text before the user's words, the end the first line
    of the text between them and the reply (just the special token, when it starts with one).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model}: the tokenizer has no chat template, so there is no user turn to continue")
    user = [{"role": "user", "content": PLACEHOLDER}]
    try:
        rendered = _render(tokenizer, user)
    except Exception as error:  # jinja's TemplateError, or raise_exception in the template
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{model}: the chat template cannot render a user message on its own ({reason}), so there is no user "
            "turn to continue"
        ) from None
    if PLACEHOLDER not in rendered:
        raise ValueError(
            f"{model}: the chat template leaves out the user's message, so there is no user turn to continue"
        )
    prefix, _, after = rendered.partition(PLACEHOLDER)
    if not prefix.strip():
        raise ValueError(
            f"{model}: the chat template puts nothing before a user's words (no user-turn marker), so there is no "
            "user turn to continue"
        )
    with contextlib.suppress(Exception):  # a template that ends each turn only by starting the next
        after = _render(tokenizer, [*user, {"role": "assistant", "content": "DELIA-REPLY"}]).partition(PLACEHOLDER)[2]
        after = after.partition("DELIA-REPLY")[0]
    end = after.strip().splitlines()[0] if after.strip() else ""
    special = sorted(getattr(tokenizer, "all_special_tokens", []), key=len, reverse=True)
    end = next((token for token in special if token and end.startswith(token)), end)
    if not end:
        raise ValueError(
            f"{model}: the chat template marks no end of a user turn (nothing follows the user's words), so a "
            "generated query could not be told from what follows it"
        )
    return UserTurn(prefix, end)


def for_server(turn: UserTurn, tokenizer: Any) -> UserTurn:
    """The prefix without its leading BOS text when the tokenizer adds BOS itself (as a server tokenizing it would)."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not turn.prefix.startswith(bos):
        return turn
    with contextlib.suppress(Exception):
        if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
            return UserTurn(turn.prefix[len(bos) :], turn.end)
    return turn


def template_tokenizer(engine: Backend, model: Any, tokenizer: Any = None) -> Any:
    """The tokenizer whose chat template gives the prefix: `tokenizer`, the backend's, or (openai) one loaded here."""
    if tokenizer is not None:
        return tokenizer
    if getattr(engine, "tokenizer", None) is not None:
        return engine.tokenizer
    from transformers import AutoTokenizer

    from ..models import resolve_model

    try:  # the served name is often a hub name or a folder whose tokenizer is at hand
        return AutoTokenizer.from_pretrained(resolve_model(model))
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{model}: generating queries through a server needs the model's chat template here, and its tokenizer "
            f"could not be loaded ({reason}); pass tokenizer= to build_cache, or serve a folder or hub name"
        ) from None


def user_turn_of(engine: Backend, model: Any, tokenizer: Any = None) -> UserTurn:
    """The user turn to continue for `engine` (serving `model`): from the template of `tokenizer`, the backend's or
    one loaded here; without its BOS text when vLLM or a server tokenizes the prefix (and adds its own)."""
    found = template_tokenizer(engine, model, tokenizer)
    turn = user_turn(found, str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__)
    return turn if engine.name == "transformers" else for_server(turn, found)


@dataclass
class QueryGeneration:
    """What the query generation did, over every run that wrote the queries file."""

    asked: int
    kept: int
    attempts: int
    dropped: dict[str, int]
    tokens: int  # generated by this run, kept or not
    seconds: float  # this run's

    @classmethod
    def recorded(cls, path: str) -> QueryGeneration | None:
        """What the meta file of the queries file `path` records (no tokens or time of this run), or None."""
        meta = read_json_or_none(meta_path(path))
        if not meta:
            return None
        return cls(meta["asked"], min(meta["kept"], meta["asked"]), meta["attempts"], meta["dropped"], 0, 0.0)

    def counts(self) -> dict[str, Any]:
        """The counts, as the cache's meta file records them."""
        return {**asdict(self), "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        """One line: kept of asked, candidates tried, dropped by reason."""
        return (
            f"{self.kept} of {self.asked} queries generated ({self.attempts} candidates tried; dropped: "
            f"{describe_dropped(self.dropped)})"
        )


class _QueriesFile:
    """The queries file and its meta file: kept queries appended durably, the attempt count and drops beside them."""

    def __init__(self, path: str, described: dict[str, Any]):
        self.path, self.meta_path, self.described = path, meta_path(path), described
        repair_tail(path)  # a kill mid-append leaves a partial line: moved aside, the rest kept
        self.rows = [row for _, row in iter_jsonl(path)] if os.path.exists(path) else []
        meta = read_json_or_none(self.meta_path) or {}
        last = max((int(row.get("attempt", -1)) for row in self.rows), default=-1)
        self.attempts = max(int(meta.get("attempts", 0)), last + 1)
        self.dropped = Counter(meta.get("dropped", {}))

    def append(self, rows: list[dict[str, Any]], attempts: int, dropped: Counter) -> list[dict[str, Any]]:
        """Append `rows` (flushed, fsynced), then record the attempts made and the drops (atomically); returns a new
        empty list for the next batch."""
        if rows:
            append_jsonl(self.path, rows)
            self.rows += rows
        self.attempts, self.dropped = attempts, Counter(dropped)
        record = {**self.described, "kept": len(self.rows), "attempts": attempts, "dropped": dict(dropped)}
        write_json_atomically(self.meta_path, record)
        return []


def generate_queries(
    engine: Backend,
    turn: UserTurn,
    count: int,
    path: str,
    *,
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 32,
    tries: int = DEFAULT_TRIES,
    progress: bool = False,
    model: str = "the model",
) -> QueryGeneration:
    """Have `engine` continue `turn.prefix` until `count` queries are kept in `path` (see the module docstring)."""
    from tqdm.auto import tqdm

    sampling = {"temperature": QUERY_TEMPERATURE, "top_p": QUERY_TOP_P, "max_new_tokens": max_new_tokens, "seed": seed}
    described = {"model": model, "asked": count, "prefix": turn.prefix, "end_of_turn": turn.end, "sampling": sampling}
    store = _QueriesFile(path, described)
    keep = QueryFilter(dropped=Counter(store.dropped))
    for row in store.rows:
        keep.add(row["query"])
    sampling = SamplingConfig(max_new_tokens, QUERY_TEMPERATURE, QUERY_TOP_P, seed, stop=(turn.end,))
    budget, tokens, started = tries * count, 0, time.perf_counter()
    with tqdm(total=count, initial=min(len(store.rows), count), unit="query", disable=not progress) as bar:
        while len(store.rows) < count and store.attempts < budget:
            first = store.attempts
            size = min(budget - first, max(batch_size, math.ceil(1.25 * (count - len(store.rows)))))
            prompts = engine.prepare_text([turn.prefix] * size, [f"query-{first + offset}" for offset in range(size)])
            rows: list[dict[str, Any]] = []
            tried = first
            try:
                with contextlib.closing(engine.stream(prompts, sampling)) as replies:
                    for reply in replies:
                        tokens += reply.num_tokens
                        text = reply.text.split(turn.end)[0].strip()
                        if keep.offer(text, finished=reply.finish_reason == "stop") is None:
                            rows.append({"query": text, "id": query_id(text), "attempt": tried})
                        tried += 1
                        if len(store.rows) + len(rows) >= count or (tried - first) % batch_size == 0:
                            bar.update(len(rows))
                            rows = store.append(rows, tried, keep.dropped)
                        if len(store.rows) >= count:
                            break
            finally:  # what came back before an error is kept too
                store.append(rows, tried, keep.dropped)
    result = QueryGeneration(
        count, min(len(store.rows), count), store.attempts, dict(keep.dropped), tokens, time.perf_counter() - started
    )
    if result.kept == 0:
        raise ValueError(
            f"{model} wrote no usable query: {result.attempts} candidates tried, all "
            f"dropped ({describe_dropped(result.dropped)}); see {meta_path(path)}"
        )
    if result.kept < count:
        warnings.warn(f"{path}: only {result.summary()}; the cache answers these", stacklevel=2)
    return result


def queries_for_cache(
    model: Any,
    path: str,
    backend: BackendOptions,
    *,
    count: int,
    tokenizer: Any = None,
    max_new_tokens: int = 128,
    seed: int = 0,
    tries: int = DEFAULT_TRIES,
    progress: bool = False,
) -> tuple[QueryGeneration | None, Backend | None]:
    """build_cache's phase 0: `model` writes `count` queries into `path`, unless it holds them already; returns what
    was done (or what the meta file records of an earlier run) and the engine, still open to answer them (or None)."""
    if kept_queries(path) >= count:
        return QueryGeneration.recorded(path), None
    if process_state().num_processes > 1:
        raise ValueError(
            f"generate_queries runs in one process: run it once without accelerate launch (it writes {path}), then "
            "again with it to answer the queries"
        )
    engine = make_backend(backend, model, tokenizer=tokenizer, seed=seed)
    try:
        generated = generate_queries(
            engine,
            user_turn_of(engine, model, tokenizer),
            count,
            path,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=backend.batch_size,
            tries=tries,
            progress=progress,
            model=str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
        )
    except BaseException:
        engine.close()
        raise
    return generated, engine
