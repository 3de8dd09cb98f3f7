"""Mixing the diverse cache into the downstream rows, and `prepare_datasets`, the one entry point of the trainer.

With no diverse rows to mix (no cache, or ratio 0) the downstream and eval datasets reach SFTTrainer as given: same
rows, same order, same columns, streaming included; the one change is DELIA's final-reply split of conversations
(`final_reply_only`). With a cache, `round(ratio x rows)` cache rows are drawn by index with a seed, rewritten in the
downstream rows' form and schema, tagged with a `source` column, and interleaved: downstream rows keep their order and
diverse rows take seeded positions between them. No Python lists of rows; the same result on every process.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, IterableDataset, IterableDatasetDict, Value, concatenate_datasets

from ..config import check_diverse_ratio, check_diverse_sampling
from . import forms
from .conform import conform
from .reading import DataFormatError, DatasetOrigin, read_dataset
from .rules import validate_conversations

logger = logging.getLogger(__name__)

FORM_COLUMNS = ("messages", "conversations", "prompt", "completion", "input_ids")
"""Columns SFTTrainer reads a row's form from, before a `text` column."""

SOURCES = ("downstream", "diverse")
"""Values of the `source` column, in the order of the `source_ids` the trainer uses."""


# ----------------------------------------------------------------------------------------------------------------------
# The plan: how many cache rows, drawn how
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixturePlan:
    """How many diverse rows a mixture takes from the cache, and how they are drawn."""

    downstream_rows: int
    cache_rows: int
    diverse_rows: int
    ratio: float
    seed: int
    sampling: str  # as asked: auto | without_replacement | with_replacement
    resolved_sampling: str  # as done: none | without_replacement | with_replacement | every_row_then_with_replacement

    def draw(self) -> np.ndarray:
        """Cache row indices of the diverse rows, in the (seeded, random) order they enter the mixture."""
        rng = np.random.default_rng(self.seed)
        if self.resolved_sampling == "none":
            return np.empty(0, dtype=np.int64)
        if self.resolved_sampling == "without_replacement":
            return rng.choice(self.cache_rows, size=self.diverse_rows, replace=False).astype(np.int64)
        if self.resolved_sampling == "with_replacement":
            return rng.integers(0, self.cache_rows, size=self.diverse_rows, dtype=np.int64)
        extra = rng.integers(0, self.cache_rows, size=self.diverse_rows - self.cache_rows, dtype=np.int64)
        return rng.permutation(np.concatenate((np.arange(self.cache_rows, dtype=np.int64), extra)))

    def order(self) -> np.ndarray:
        """Mixture order over [downstream rows..., diverse rows...]: downstream order kept, diverse at seeded places."""
        total = self.downstream_rows + self.diverse_rows
        rng = np.random.default_rng([self.seed, 1])  # a stream of its own: the draw does not move the positions
        is_diverse = np.zeros(total, dtype=bool)
        is_diverse[rng.choice(total, size=self.diverse_rows, replace=False)] = True
        order = np.empty(total, dtype=np.int64)
        order[~is_diverse] = np.arange(self.downstream_rows)
        order[is_diverse] = self.downstream_rows + np.arange(self.diverse_rows)
        return order


def diverse_row_count(ratio: float, downstream_rows: int) -> int:
    """round(ratio x downstream rows), halves rounding up."""
    return int(math.floor(ratio * downstream_rows + 0.5))


def plan_mixture(downstream_rows: int, cache_rows: int, ratio: float, seed: int, sampling: str = "auto") -> MixturePlan:
    """Decide the diverse row count and the sampling mode; raise if the cache cannot supply them."""
    ratio, sampling = check_diverse_ratio(ratio), check_diverse_sampling(sampling)
    wanted = diverse_row_count(ratio, downstream_rows)
    if wanted == 0:
        resolved = "none"
    elif cache_rows == 0:
        raise ValueError(f"the diverse cache is empty, but ratio {ratio:g} asks for {wanted} diverse rows")
    elif sampling == "with_replacement":
        resolved = "with_replacement"
    elif wanted <= cache_rows:
        resolved = "without_replacement"
    elif sampling == "without_replacement":
        raise ValueError(
            f"diverse_sampling='without_replacement' needs {wanted} diverse rows (ratio {ratio:g} x "
            f"{downstream_rows} downstream rows), but the cache has only {cache_rows}; use a larger cache, a "
            "smaller diverse_ratio, or diverse_sampling='auto' / 'with_replacement'"
        )
    else:
        resolved = "every_row_then_with_replacement"
    return MixturePlan(downstream_rows, cache_rows, wanted, ratio, int(seed), sampling, resolved)


# ----------------------------------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """What `prepare_datasets` hands to SFTTrainer, and how it got there."""

    train_dataset: Dataset | IterableDataset
    eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None
    plan: MixturePlan
    formatting_func: Callable[[dict], str] | None  # None once applied here (it is, when a cache is mixed in)
    split_final_reply: bool  # conversations were split on their final reply
    diverse_description: str | None = None
    notes: list[str] = field(default_factory=list)
    unshuffled: Dataset | None = None  # mixed rows before the interleave: train_dataset = unshuffled.select(order)
    order: np.ndarray | None = None  # the plan's interleave order, computed once (mixing and fingerprint share it)

    @property
    def mixed(self) -> bool:
        return self.plan.diverse_rows > 0


def _describe(source: Any) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"<in-memory {type(source).__name__}>"


def _read(source: Any, label: str) -> tuple[Dataset | IterableDataset, DatasetOrigin]:
    """A streaming dataset as it is; anything else through `read_dataset`."""
    if isinstance(source, IterableDatasetDict):
        source = source["train"]
    if isinstance(source, IterableDataset):
        return source, DatasetOrigin(label)
    return read_dataset(source, label)


def _should_split(form: str, final_reply_only: bool, assistant_only_loss: bool) -> bool:
    # assistant_only_loss is SFTTrainer's own masking of conversations; it needs them whole
    return final_reply_only and not assistant_only_loss and form in (forms.MESSAGES, forms.FROM_VALUE)


def _to_chatml(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """ShareGPT from/value conversations -> role/content `messages`, exactly as SFTTrainer converts them."""
    from trl.data_utils import maybe_convert_to_chatml

    kwargs = {} if isinstance(dataset, IterableDataset) else {"keep_in_memory": True}
    return dataset.map(maybe_convert_to_chatml, remove_columns=["conversations"], **kwargs)


def _prepare_one(
    dataset: Dataset | IterableDataset,
    origin: DatasetOrigin,
    form: str,
    split: bool,
    formatting_func: Callable[[dict], str] | None,
) -> Dataset | IterableDataset:
    """Apply what DELIA changes to one dataset: the formatting function (when mixing) and the final-reply split."""
    if formatting_func is not None:  # the row becomes its text; the columns it was made from would win in TRL
        kwargs = {} if isinstance(dataset, IterableDataset) else {"keep_in_memory": True}
        consumed = [name for name in FORM_COLUMNS if name in (dataset.column_names or [])]
        dataset = dataset.map(lambda row: {"text": formatting_func(row)}, remove_columns=consumed, **kwargs)
    if split:
        if form == forms.FROM_VALUE:
            dataset = _to_chatml(dataset)
        if isinstance(dataset, Dataset):
            forms.check_ends_with_assistant(dataset, origin)
        dataset = forms.split_final_reply(dataset)
    return dataset


def _tag_eval(dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """Eval rows count as downstream unless they carry their own `source` column (values other than SOURCES are
    left out of the per-source eval losses)."""
    if not isinstance(dataset, Dataset) or "source" in dataset.column_names:
        return dataset
    return dataset.add_column("source", pa.array(["downstream"]).take(np.zeros(len(dataset), dtype=np.int64)))


def prepare_datasets(
    train_dataset: Any,
    diverse_dataset: Any | None = None,
    eval_dataset: Any | None = None,
    *,
    ratio: float = 100.0,
    seed: int = 0,
    sampling: str = "auto",
    final_reply_only: bool = True,
    assistant_only_loss: bool = False,
    dataset_text_field: str = "text",
    formatting_func: Callable[[dict], str] | None = None,
) -> PreparedData:
    """Turn (downstream, diverse, eval, ratio, seed, sampling) into the training set, the eval set(s) and the plan.

    Sources are Datasets (IterableDatasets when nothing is mixed in), JSONL/JSON paths, saved folders or hub names.
    See the module docstring for what changes and what does not.
    """
    ratio = check_diverse_ratio(ratio)
    train, train_origin = _read(train_dataset, "train dataset")
    form = forms.detect_form(train, dataset_text_field, train_origin) if formatting_func is None else None
    rows = None if isinstance(train, IterableDataset) else len(train)
    wanted = 0 if diverse_dataset is None or rows is None else diverse_row_count(ratio, rows)
    if diverse_dataset is not None and rows is None and ratio > 0:
        raise DataFormatError(
            "train dataset: mixing draws diverse rows by index, so it must be a datasets.Dataset, not an "
            "IterableDataset (streaming); load it without streaming, or pass diverse_ratio=0"
        )
    if wanted == 0:  # plain SFT: hand the rows over as they are (formatting_func is SFTTrainer's to apply)
        split = form is not None and _should_split(form, final_reply_only, assistant_only_loss)
        plan = plan_mixture(rows or 0, 0, 0.0, seed, sampling)
        return PreparedData(
            _prepare_one(train, train_origin, form, split, None),
            _map_eval(eval_dataset, dataset_text_field, split, None, tag=False, formatted=formatting_func is not None),
            plan,
            formatting_func,
            split,
        )

    if isinstance(train, Dataset) and "source" in train.column_names:
        raise DataFormatError(
            f"{train_origin.label}: has a 'source' column, which DELIA uses to tag downstream and diverse rows; "
            "rename or remove it before mixing"
        )
    cache, cache_origin, cache_form = _read_cache(diverse_dataset, dataset_text_field)
    if formatting_func is not None:
        form = forms.LANGUAGE_MODELING  # what the formatting function makes of each downstream row
    split = _should_split(form, final_reply_only, assistant_only_loss)
    train = _prepare_one(train, train_origin, form, split, formatting_func)
    target_form = forms.CONVERSATIONAL_PROMPT_COMPLETION if split else form
    if target_form == forms.FROM_VALUE:
        train, target_form = _to_chatml(train), forms.MESSAGES

    plan = plan_mixture(len(train), len(cache), ratio, seed, sampling)
    _warn_if_rows_repeat(plan)
    drawn = _in_form(cache.select(plan.draw()), cache_form, target_form, dataset_text_field, train_origin, cache_origin)
    features = Features({**train.features, "source": Value("string")})
    parts = [
        conform(train, features, constants={"source": "downstream"}),
        conform(drawn, features, constants={"source": "diverse"}),
    ]
    unshuffled = concatenate_datasets(parts)
    order = plan.order()
    mixed = unshuffled.select(order)
    notes = [
        f"DELIA mixture: {plan.downstream_rows} downstream + {plan.diverse_rows} diverse rows (cache of "
        f"{plan.cache_rows}, sampling {plan.resolved_sampling}, seed {plan.seed})"
    ]
    return PreparedData(
        mixed,
        _map_eval(eval_dataset, dataset_text_field, split, formatting_func, tag=True),
        plan,
        None,
        split,
        _describe(diverse_dataset),
        notes,
        unshuffled,
        order,
    )


def _read_cache(source: Any, text_field: str) -> tuple[Dataset, DatasetOrigin, str]:
    """The diverse cache, its origin and form; ShareGPT rows become messages, conversations are validated."""
    cache, origin = read_dataset(source, "diverse dataset")
    text_field = text_field if text_field in cache.column_names else "text"
    form = forms.detect_form(cache, text_field, origin)
    if form == forms.FROM_VALUE:  # checked, drawn and split as messages, exactly as SFTTrainer converts them
        cache, form = _to_chatml(cache), forms.MESSAGES
    if form in (forms.MESSAGES, forms.CONVERSATIONAL_PROMPT_COMPLETION):
        validate_conversations(cache, origin)
    return cache, origin, form


def _warn_if_rows_repeat(plan: MixturePlan) -> None:
    if plan.resolved_sampling == "every_row_then_with_replacement":
        warnings.warn(
            f"The diverse cache has {plan.cache_rows} rows, but ratio {plan.ratio:g} x {plan.downstream_rows} "
            f"downstream rows asks for {plan.diverse_rows}: using every cache row once plus "
            f"{plan.diverse_rows - plan.cache_rows} drawn with replacement.",
            UserWarning,
            stacklevel=4,  # the caller of prepare_datasets' caller, as before this helper
        )


def _in_form(
    cache: Dataset, cache_form: str, target: str, text_field: str, down: DatasetOrigin, origin: DatasetOrigin
) -> Dataset:
    """The drawn cache rows rewritten in the downstream rows' form, or a clear error if that means nothing."""
    if cache_form == target:
        if target == forms.LANGUAGE_MODELING and text_field not in cache.column_names:
            cache = cache.rename_column("text", text_field)
        return cache
    if cache_form == forms.MESSAGES and target == forms.CONVERSATIONAL_PROMPT_COMPLETION:
        return forms.split_final_reply(cache)
    if cache_form == forms.CONVERSATIONAL_PROMPT_COMPLETION and target == forms.MESSAGES:
        return forms.join_prompt_completion(cache)
    raise DataFormatError(
        f"mismatched forms: the downstream rows ({down.label}) are {target}, but the diverse cache "
        f"({origin.label}) is {cache_form}; mix a cache of the same form (conversational rows with a "
        "conversational cache, language-modeling text with a cache of {'text': ...} rows, prompt/completion strings "
        "with prompt/completion strings, input_ids with input_ids)"
    )


def _map_eval(
    eval_dataset: Any,
    text_field: str,
    split: bool,
    formatting_func: Callable[[dict], str] | None,
    tag: bool,
    formatted: bool = False,
) -> Any:
    """Eval set(s) get the same treatment as the training rows (a dict of them, each).

    `formatted`: SFTTrainer will apply the user's formatting function to them, so their columns are the user's own.
    """
    if eval_dataset is None:
        return None
    if isinstance(eval_dataset, (dict, DatasetDict, IterableDatasetDict)):
        return {
            name: _map_eval(data, text_field, split, formatting_func, tag, formatted)
            for name, data in eval_dataset.items()
        }
    dataset, origin = _read(eval_dataset, "eval dataset")
    if formatted:
        return dataset
    form = forms.detect_form(dataset, text_field, origin) if formatting_func is None else forms.LANGUAGE_MODELING
    dataset = _prepare_one(dataset, origin, form, split and form in (forms.MESSAGES, forms.FROM_VALUE), formatting_func)
    return _tag_eval(dataset) if tag else dataset


def mix_datasets(
    downstream: Any,
    diverse: Any | None,
    ratio: float = 100.0,
    seed: int = 0,
    sampling: str = "auto",
    *,
    final_reply_only: bool = True,
) -> Dataset:
    """The mixed training rows `DSFTTrainer` would train on (see `prepare_datasets`), for inspection or reuse."""
    return prepare_datasets(
        downstream, diverse, ratio=ratio, seed=seed, sampling=sampling, final_reply_only=final_reply_only
    ).train_dataset
