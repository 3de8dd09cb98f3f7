"""What `delia eval` reads: the eval conversations (a `<sep>` answer each), the training phrasings, the held-out general
queries; loaded and checked once, before any model is loaded, with errors that name the file and line."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..bundled import DEFAULT_EVAL_DATASET, DEFAULT_GENERAL_QUERIES
from ..data import DataFormatError, DatasetOrigin, read_dataset, validate_conversations
from ..data.forms import conversation_of, last_user_turn
from ..data.rules import any_format_row_problem
from .contrast import split_instruction
from .metrics import reference_label
from .retention import held_out_queries


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


def load_eval_rows(source: Any, *, limit: int | None = None, label: str = "eval dataset") -> list[EvalRow]:
    """Eval conversations whose final reply is a `<sep>` dict with a yes/no 'hallucination'; errors name file and line."""
    dataset, origin = read_dataset(source, label, row_problem=any_format_row_problem)
    validate_conversations(dataset, origin)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    rows = []
    for index, row in enumerate(dataset):
        messages = conversation_of(row)
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
        instructions.add(split_instruction(last_user_turn(row))[1])
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
