"""Parity with TRL: without diverse data, `DSFTTrainer` is `SFTTrainer`.

Each case runs TRL's `SFTTrainer` and delia's `DSFTTrainer` side by side on one of the dataset forms and options that
TRL 1.x documents for `SFTTrainer` (its docstrings, `sft_trainer.md` and `dataset_formats.md`), with the same seed,
the same config values and a fresh tiny model built from the same seed, and checks that:

- the prepared training datasets have the same rows in the same order, with identical token columns (`input_ids`,
  `labels`, and `completion_mask` / `assistant_masks` / `seq_lengths` where SFTTrainer keeps them);
- the losses logged at each of 3 optimizer steps agree to 1e-5 (relative);
- where an eval dataset is given, the prepared eval datasets and `evaluate()`'s losses agree too.

The one documented difference: for conversational `messages` rows DSFTTrainer puts the loss on the final assistant
reply only (`final_reply_only=True`, DELIA's recipe). Those cases run DSFTTrainer with `final_reply_only=False`;
`test_final_reply_only_default_equals_sft_on_prompt_completion` checks the default against SFTTrainer run on the same
rows split by hand into prompt (all but the last message) and completion (the last message).

These tests are the specification of that parity; they are meant to fail until DSFTTrainer meets it.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from datasets import Dataset, Features, IterableDataset, Json, List, Value
from trl import SFTConfig, SFTTrainer

from delia import DSFTConfig, DSFTTrainer
from delia.tiny import CHATML_TEMPLATE, build_tiny_model, build_tiny_tokenizer, save_tiny_model

# ----------------------------------------------------------------------------------------------------------------------
# Rows (all text written for these tests)
# ----------------------------------------------------------------------------------------------------------------------

PAIRS = [
    ("Name a colour the sea can take.", "Grey on a cloudy day, green near the rocks."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Give one tip for keeping bread fresh.", "Keep it wrapped in a cloth in a cool place."),
    ("What do bees make?", "Bees make honey and wax."),
    ("Suggest a name for a small grey cat.", "Pebble would suit a small grey cat."),
    ("Why do leaves fall in autumn?", "Trees drop them to save water through the cold months."),
    ("What is 9 plus 6?", "9 plus 6 is 15."),
    ("Tell me a quiet hobby.", "Drawing with a pencil is a quiet hobby."),
    ("Which season has the longest days?", "Summer has the longest days."),
    ("How should I water a cactus?", "Water it rarely, and let the soil dry out first."),
    ("What is a harbour for?", "A harbour gives boats a calm place to stay."),
    ("Describe rain in three words.", "Wet, grey, soft."),
]

SYSTEM_PROMPTS = ["Answer briefly.", "You are a patient teacher."]

# Longer prompts, so that `max_length` truncation leaves nothing of the completion for some rows.
LONG_PROMPTS = [
    "Read this note and then tell me the day: the bakery on the corner opens early, the market closes at noon, "
    "the library is shut for repairs, and the swimming pool reopens after the holiday. Which day is it?",
    "Here is a list of chores: sweep the kitchen, water the plants, fold the laundry, clean the windows, feed the "
    "cat, and take out the bins. Which chore should come first?",
]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def text_rows() -> list[dict]:
    return [{"text": f"{question} {answer}"} for question, answer in PAIRS]


def standard_prompt_completion_rows() -> list[dict]:
    return [{"prompt": question, "completion": " " + answer} for question, answer in PAIRS]


def conversational_prompt_completion_rows() -> list[dict]:
    rows = []
    for i, (question, answer) in enumerate(PAIRS):
        prompt = ([system(SYSTEM_PROMPTS[i % 2])] if i % 3 == 0 else []) + [user(question)]
        rows.append({"prompt": prompt, "completion": [assistant(answer)]})
    return rows


def messages_rows(turns: int = 1, with_system: bool = False) -> list[dict]:
    """`turns` user/assistant exchanges per row, taken in order from PAIRS (wrapping), optionally after a system."""
    rows = []
    for i in range(len(PAIRS)):
        messages = [system(SYSTEM_PROMPTS[i % 2])] if with_system else []
        for turn in range(turns):
            question, answer = PAIRS[(i + 5 * turn) % len(PAIRS)]
            messages += [user(question), assistant(answer)]
        rows.append({"messages": messages})
    return rows


def sharegpt_rows() -> list[dict]:
    """TRL's `conversations` column with `from` / `value` keys (converted to `messages` by SFTTrainer)."""
    rows = []
    for row in messages_rows(turns=2):
        rows.append({"conversations": [{"from": m["role"], "value": m["content"]} for m in row["messages"]]})
    return rows


def truncation_rows() -> list[dict]:
    """Conversational prompt/completion rows; with the llama2 template and max_length=64, the prompts of rows 0, 3, 7
    and 9 fill max_length (SFTTrainer then drops them), the others lose the end of their completion."""
    rows = conversational_prompt_completion_rows()[:10]
    rows[3] = {"prompt": [user(LONG_PROMPTS[0])], "completion": [assistant("It is a weekday.")]}
    rows[7] = {"prompt": [user(LONG_PROMPTS[1])], "completion": [assistant("Feed the cat first.")]}
    return rows


def diverse_rows() -> list[dict]:
    return [
        {
            "messages": [
                user(f"Write note {i} about the harbour."),
                assistant("Boats rest there at night. " * (1 + i % 3)),
            ]
        }
        for i in range(10)
    ]


# Tool calling: a ChatML template that lists the row's `tools` and renders a per-row `style` template argument.
TOOL_SCHEMAS = [
    {
        "type": "function",
        "function": {
            "name": "get_tide",
            "description": "Time of the next high tide at a port.",
            "parameters": {
                "type": "object",
                "properties": {"port": {"type": "string", "description": "The port."}},
                "required": ["port"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "count_boats",
            "description": "How many boats are in a harbour.",
            "parameters": {
                "type": "object",
                "properties": {
                    "harbour": {"type": "string", "description": "The harbour."},
                    "kind": {"type": "string", "description": "Sail or motor."},
                },
                "required": ["harbour"],
            },
        },
    },
]

TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nTools:' }}"
    "{% for tool in tools %}{{ ' ' + tool['function']['name'] }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% if style is defined and style %}{{ '<|im_start|>system\\nStyle: ' + style + '<|im_end|>\\n' }}{% endif %}"
    + CHATML_TEMPLATE
)


def tool_rows() -> Dataset:
    rows = []
    for i, row in enumerate(messages_rows(turns=1)):
        rows.append(
            {
                "messages": row["messages"],
                "tools": TOOL_SCHEMAS[: i % 3],  # none, one or two tools
                "chat_template_kwargs": {"style": ["brief", "warm", ""][i % 3]},
            }
        )
    features = Features(
        {
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "tools": List(Json()),
            "chat_template_kwargs": {"style": Value("string")},
        }
    )
    return Dataset.from_list(rows, features=features)


def qa_columns() -> Dataset:
    return Dataset.from_list([{"question": q, "answer": a, "row_id": i} for i, (q, a) in enumerate(PAIRS)])


def format_qa(example: dict) -> str:
    return f"Question: {example['question']}\nAnswer: {example['answer']}"


def pretokenized_rows(tokenizer, with_completion_mask: bool) -> Dataset:
    rows = []
    for question, answer in PAIRS:
        prompt_ids = tokenizer(question)["input_ids"]
        completion_ids = tokenizer(" " + answer)["input_ids"] + [tokenizer.eos_token_id]
        row = {"input_ids": prompt_ids + completion_ids}
        if with_completion_mask:
            row["completion_mask"] = [0] * len(prompt_ids) + [1] * len(completion_ids)
        rows.append(row)
    return Dataset.from_list(rows)


def to_prompt_completion(rows: list[dict]) -> list[dict]:
    """messages -> conversational prompt/completion: prompt = messages[:-1], completion = [messages[-1]]."""
    return [{"prompt": row["messages"][:-1], "completion": row["messages"][-1:]} for row in rows]


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers, models, configs
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Any]:
    """Built once per module; every trainer gets its own deep copy (SFTTrainer sets the pad token on it)."""
    chatml = build_tiny_tokenizer("chatml")
    tools = copy.deepcopy(chatml)
    tools.chat_template = TOOLS_TEMPLATE
    return {"llama2": build_tiny_tokenizer("llama2"), "chatml": chatml, "tools": tools}


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory, tokenizers) -> str:
    """A tiny model and its tokenizer saved as from the hub, for `model=<path>`."""
    folder = tmp_path_factory.mktemp("tiny-model")
    save_tiny_model(folder, tokenizer=copy.deepcopy(tokenizers["llama2"]), tie_word_embeddings=True, seed=0)
    return str(folder)


COMMON_OPTIONS = {
    "max_steps": 3,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 2,
    "logging_steps": 1,
    "report_to": "none",
    "save_strategy": "no",
    "learning_rate": 1e-3,
    "seed": 0,
    "dataloader_num_workers": 0,
    "dataloader_pin_memory": False,
    "bf16": False,
    # transformers 5 renamed `gradient_checkpointing` (deprecated, warns) to `activation_checkpointing`
    "activation_checkpointing": False,
    "use_cpu": True,
    "disable_tqdm": True,
}

# Columns of a prepared dataset that decide what the model sees and where the loss falls.
TOKEN_COLUMNS = ("input_ids", "labels", "completion_mask", "assistant_masks", "seq_lengths", "position_ids")
ITERABLE_ROWS_COMPARED = 8


def dsft_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(DSFTConfig)}


def require_final_reply_only_field() -> dataclasses.Field:
    for f in dataclasses.fields(DSFTConfig):
        if f.name == "final_reply_only":
            return f
    pytest.fail("DSFTConfig has no final_reply_only field (a bool, default True, is expected)")


def make_dsft_config(final_reply_only: bool | None, **options) -> DSFTConfig:
    """A DSFTConfig with `options`; `final_reply_only` is written only if not None, and only if the field exists."""
    if final_reply_only is not None:
        require_final_reply_only_field()
        options["final_reply_only"] = final_reply_only
    return DSFTConfig(**options)


def assert_same_config(sft_args: SFTConfig, dsft_args: DSFTConfig) -> None:
    """Every SFTConfig field has the same value in both configs (but the output folders)."""
    sft, dsft = sft_args.to_dict(), dsft_args.to_dict()
    differing = {
        key: (sft[key], dsft.get(key))
        for key in sft
        if key not in ("output_dir", "logging_dir") and sft[key] != dsft.get(key)
    }
    assert not differing, f"SFTConfig fields differ between the two configs (SFT, DSFT): {differing}"


# ----------------------------------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------------------------------


def token_rows(dataset: Dataset | IterableDataset) -> tuple[list[str], dict[str, list]]:
    """The token columns of a prepared dataset, as lists (the first rows of an IterableDataset)."""
    if isinstance(dataset, IterableDataset):
        rows = list(itertools.islice(iter(dataset), ITERABLE_ROWS_COMPARED))
        columns = list(rows[0]) if rows else []
        return columns, {c: [row[c] for row in rows] for c in columns if c in TOKEN_COLUMNS}
    columns = dataset.column_names
    present = [c for c in TOKEN_COLUMNS if c in columns]
    return columns, dataset.select_columns(present).to_dict() if present else {}


def assert_same_prepared(sft_dataset, dsft_dataset, what: str) -> None:
    assert isinstance(dsft_dataset, type(sft_dataset)) or isinstance(sft_dataset, type(dsft_dataset)), (
        f"{what}: SFTTrainer prepared a {type(sft_dataset).__name__}, DSFTTrainer a {type(dsft_dataset).__name__}"
    )
    sft_columns, sft = token_rows(sft_dataset)
    dsft_columns, dsft = token_rows(dsft_dataset)
    assert "input_ids" in sft, f"{what}: SFTTrainer's prepared dataset has no input_ids ({sft_columns})"
    sft_rows, dsft_rows = len(sft["input_ids"]), len(dsft.get("input_ids", []))
    assert sft_rows == dsft_rows, f"{what}: SFTTrainer prepared {sft_rows} rows, DSFTTrainer {dsft_rows}"
    for column, sft_values in sft.items():
        assert column in dsft, (
            f"{what}: DSFTTrainer's prepared dataset has no {column!r} column (has {dsft_columns}; SFT's {sft_columns})"
        )
        dsft_values = dsft[column]
        if sft_values == dsft_values:
            continue
        if column == "input_ids" and sorted(map(tuple, sft_values)) == sorted(map(tuple, dsft_values)):
            order = [sft_values.index(value) for value in dsft_values]
            pytest.fail(f"{what}: same rows in another order (DSFT's rows are SFT's rows {order})")
        row = next(i for i, (a, b) in enumerate(zip(sft_values, dsft_values, strict=True)) if a != b)
        pytest.fail(
            f"{what}: {column!r} differs first at row {row}: {describe_difference(sft_values[row], dsft_values[row])}"
        )


def describe_difference(expected: Any, got: Any) -> str:
    """Where two rows of a column part, with a few values of context (rows can be a few hundred tokens long)."""
    if not isinstance(expected, list) or not isinstance(got, list):
        return f"SFT {expected!r} != DSFT {got!r}"
    at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), min(len(expected), len(got)))
    start = max(0, at - 3)
    return (
        f"lengths SFT {len(expected)} / DSFT {len(got)}, first difference at position {at}: "
        f"SFT [...{expected[start : at + 6]}...] != DSFT [...{got[start : at + 6]}...]"
    )


def logged_losses(trainer) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def assert_same_losses(sft_trainer, dsft_trainer) -> None:
    sft, dsft = logged_losses(sft_trainer), logged_losses(dsft_trainer)
    assert [step for step, _ in sft] == [1, 2, 3], f"SFTTrainer logged {sft}"
    assert [step for step, _ in dsft] == [1, 2, 3], f"DSFTTrainer logged losses at steps {[s for s, _ in dsft]}"
    for (step, expected), (_, got) in zip(sft, dsft, strict=True):
        assert math.isclose(expected, got, rel_tol=1e-5), f"loss at step {step}: SFT {expected!r} != DSFT {got!r}"


def assert_same_eval(sft_trainer, dsft_trainer) -> None:
    sft_eval, dsft_eval = sft_trainer.eval_dataset, dsft_trainer.eval_dataset
    if isinstance(sft_eval, dict):
        assert isinstance(dsft_eval, dict) and sorted(dsft_eval) == sorted(sft_eval), (
            f"eval datasets: SFT has {sorted(sft_eval)}, DSFT has {sorted(dsft_eval) if isinstance(dsft_eval, dict) else type(dsft_eval).__name__}"
        )
        for name in sft_eval:
            assert_same_prepared(sft_eval[name], dsft_eval[name], f"eval dataset {name!r}")
    else:
        assert_same_prepared(sft_eval, dsft_eval, "eval dataset")
    sft_metrics, dsft_metrics = sft_trainer.evaluate(), dsft_trainer.evaluate()
    loss_keys = [key for key in sft_metrics if key.endswith("_loss")]
    assert loss_keys, f"SFTTrainer.evaluate() returned no loss: {sft_metrics}"
    for key in loss_keys:
        assert key in dsft_metrics, f"DSFTTrainer.evaluate() has no {key!r}: {sorted(dsft_metrics)}"
        assert math.isclose(sft_metrics[key], dsft_metrics[key], rel_tol=1e-5), (
            f"{key}: SFT {sft_metrics[key]!r} != DSFT {dsft_metrics[key]!r}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One documented SFTTrainer usage pattern.

    `train` / `eval` build a fresh dataset (called once per trainer) from the case's tokenizer; `kwargs` builds fresh
    trainer arguments shared by both trainers (formatting_func, peft_config...); `dsft_kwargs` adds DSFTTrainer-only
    ones. `messages` marks conversational `messages`-style rows: DSFTTrainer gets `final_reply_only=False` there.
    """

    id: str
    train: Callable[[Any], Dataset | IterableDataset]
    template: str = "llama2"
    options: dict = field(default_factory=dict)
    messages: bool = False
    eval: Callable[[Any], Any] | None = None
    kwargs: Callable[[], dict] = dict
    dsft_kwargs: Callable[[], dict] = dict
    model_from_path: bool = False
    sft_rows: int | None = None  # rows SFTTrainer's prepared dataset must have (guards what the case exercises)


def rows(build: Callable[[], list[dict]]) -> Callable[[Any], Dataset]:
    return lambda tokenizer: Dataset.from_list(build())


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


CASES = [
    # 1. language modeling
    Case("lm_text", rows(text_rows)),
    # 2. dataset_text_field naming another column (an extra column alongside)
    Case(
        "dataset_text_field",
        rows(lambda: [{"body": row["text"], "row_id": i} for i, row in enumerate(text_rows())]),
        options={"dataset_text_field": "body"},
    ),
    # 3. standard prompt/completion; 8. completion_only_loss default (None: completion only), False and True
    Case("prompt_completion_standard", rows(standard_prompt_completion_rows)),
    Case(
        "prompt_completion_standard_full_loss",
        rows(standard_prompt_completion_rows),
        options={"completion_only_loss": False},
    ),
    Case(
        "prompt_completion_standard_completion_only",
        rows(standard_prompt_completion_rows),
        options={"completion_only_loss": True},
    ),
    # 4. conversational prompt/completion (some prompts with a system message)
    Case("prompt_completion_conversational", rows(conversational_prompt_completion_rows)),
    Case(
        "prompt_completion_conversational_full_loss",
        rows(conversational_prompt_completion_rows),
        template="chatml",
        options={"completion_only_loss": False},
    ),
    # 5. conversational messages: single / multi turn, with / without a system message
    Case("messages_single_turn", rows(lambda: messages_rows(1)), messages=True),
    Case("messages_single_turn_system", rows(lambda: messages_rows(1, True)), template="chatml", messages=True),
    Case("messages_multi_turn", rows(lambda: messages_rows(3)), template="chatml", messages=True),
    Case("messages_multi_turn_system", rows(lambda: messages_rows(2, True)), messages=True),
    # 6. ShareGPT-style `conversations` with from/value keys
    Case("sharegpt_conversations", rows(sharegpt_rows), template="chatml", messages=True),
    # 7. assistant_only_loss with the ChatML template ({% generation %} markers)
    Case(
        "assistant_only_loss_messages",
        rows(lambda: messages_rows(2, True)),
        template="chatml",
        options={"assistant_only_loss": True},
        messages=True,
    ),
    Case(
        "assistant_only_loss_prompt_completion",
        rows(conversational_prompt_completion_rows),
        template="chatml",
        options={"assistant_only_loss": True},
    ),
    # 9. formatting_func on plain columns
    Case("formatting_func", lambda tokenizer: qa_columns(), kwargs=lambda: {"formatting_func": format_qa}),
    # 10. pre-tokenized rows
    Case("pretokenized_input_ids", lambda tokenizer: pretokenized_rows(tokenizer, with_completion_mask=False)),
    Case(
        "pretokenized_completion_mask",
        lambda tokenizer: pretokenized_rows(tokenizer, with_completion_mask=True),
        options={"completion_only_loss": True},
    ),
    # 11. packing (BFD, which turns padding-free on) and padding-free without packing (needs max_length=None)
    Case("packing_text", rows(text_rows), options={"packing": True, "max_length": 96}),
    Case(
        "packing_messages_wrapped",
        rows(lambda: messages_rows(2)),
        template="chatml",
        options={"packing": True, "packing_strategy": "wrapped", "max_length": 32},
        messages=True,
    ),
    Case(
        "packing_prompt_completion_bfd_split",
        rows(conversational_prompt_completion_rows),
        options={"packing": True, "packing_strategy": "bfd_split", "max_length": 64},
    ),
    Case(
        "padding_free",
        rows(lambda: messages_rows(1, True)),
        template="chatml",
        options={"padding_free": True, "max_length": None},
        messages=True,
    ),
    # 12. max_length truncation (rows whose prompt fills max_length are dropped by SFTTrainer)
    Case("max_length_truncation", rows(truncation_rows), options={"max_length": 64}, sft_rows=6),
    Case(
        "max_length_truncation_messages",
        rows(lambda: messages_rows(2, True)),
        options={"max_length": 20},
        messages=True,
    ),
    # 13. per-row `chat_template_kwargs` and `tools` columns on messages rows
    Case("chat_template_kwargs_and_tools", lambda tokenizer: tool_rows(), template="tools", messages=True),
    # 14. sequential sampling: the row order is kept
    Case(
        "sequential_sampling",
        rows(lambda: messages_rows(2)),
        options={"train_sampling_strategy": "sequential"},
        messages=True,
    ),
    # shuffle_dataset: SFTTrainer shuffles the prepared dataset with `seed`
    Case("shuffle_dataset", rows(standard_prompt_completion_rows), options={"shuffle_dataset": True}),
    # 15. an IterableDataset (streaming) with max_steps
    Case(
        "iterable_dataset",
        lambda tokenizer: Dataset.from_list(messages_rows(2)).to_iterable_dataset(),
        template="chatml",
        messages=True,
    ),
    # 16. eval datasets: one, and a dict of two
    Case(
        "eval_dataset",
        rows(lambda: messages_rows(1)),
        messages=True,
        eval=lambda tokenizer: Dataset.from_list(messages_rows(2, True)[:6]),
    ),
    Case(
        "eval_dataset_dict",
        rows(standard_prompt_completion_rows),
        eval=lambda tokenizer: {
            "texts": Dataset.from_list(text_rows()[:5]),
            "pairs": Dataset.from_list(standard_prompt_completion_rows()[5:11]),
        },
    ),
    # 17. a diverse dataset with diverse_ratio=0 is plain SFT
    Case(
        "diverse_ratio_zero",
        rows(lambda: messages_rows(2, True)),
        template="chatml",
        messages=True,
        dsft_kwargs=lambda: {"diverse_dataset": Dataset.from_list(diverse_rows()), "diverse_ratio": 0},
    ),
    # 18. model given as a path to a saved model (tokenizer loaded from it), and a LoRA adapter via peft_config
    Case("model_path", rows(lambda: messages_rows(1)), messages=True, model_from_path=True),
    Case("peft_lora", rows(conversational_prompt_completion_rows), kwargs=lambda: {"peft_config": lora_config()}),
]


def build_trainer(trainer_class, case: Case, args, tokenizers, saved_model_dir, extra: dict):
    tokenizer = copy.deepcopy(tokenizers[case.template])
    if case.model_from_path:
        model, processing_class = saved_model_dir, None
    else:
        model, processing_class = build_tiny_model(tokenizer, tie_word_embeddings=True, seed=0), tokenizer
    return trainer_class(
        model=model,
        args=args,
        train_dataset=case.train(tokenizer),
        eval_dataset=case.eval(tokenizer) if case.eval else None,
        processing_class=processing_class,
        **case.kwargs(),
        **extra,
    )


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_dsft_without_diverse_data_equals_sft(case: Case, tokenizers, saved_model_dir, tmp_path):
    options = {**COMMON_OPTIONS, **case.options}
    sft_args = SFTConfig(output_dir=str(tmp_path / "sft"), **options)
    dsft_args = make_dsft_config(False if case.messages else None, output_dir=str(tmp_path / "dsft"), **options)
    assert_same_config(sft_args, dsft_args)

    sft = build_trainer(SFTTrainer, case, sft_args, tokenizers, saved_model_dir, {})
    sft.train()
    dsft = build_trainer(DSFTTrainer, case, dsft_args, tokenizers, saved_model_dir, case.dsft_kwargs())
    dsft.train()

    if case.sft_rows is not None:
        assert len(sft.train_dataset) == case.sft_rows, "the case no longer exercises what it is meant to"
    assert_same_prepared(sft.train_dataset, dsft.train_dataset, "train dataset")
    assert_same_losses(sft, dsft)
    if case.eval is not None:
        assert_same_eval(sft, dsft)


@pytest.mark.parametrize("template", ["llama2", "chatml"])
def test_final_reply_only_default_equals_sft_on_prompt_completion(template, tokenizers, tmp_path):
    """DELIA's recipe: with the default final_reply_only=True, the loss falls on the last assistant reply only."""
    final_reply_only = require_final_reply_only_field()
    assert final_reply_only.default is True, f"final_reply_only defaults to {final_reply_only.default!r}, not True"
    conversations = messages_rows(2, with_system=True)
    for i in range(0, len(conversations), 3):  # some rows without the system message, some with a single turn
        conversations[i] = {"messages": conversations[i]["messages"][1:]}
        conversations[i + 1] = {"messages": conversations[i + 1]["messages"][:3]}

    sft_args = SFTConfig(output_dir=str(tmp_path / "sft"), **COMMON_OPTIONS)
    dsft_args = DSFTConfig(output_dir=str(tmp_path / "dsft"), **COMMON_OPTIONS)
    assert dsft_args.final_reply_only is True
    assert_same_config(sft_args, dsft_args)

    def trainer(trainer_class, args, dataset_rows):
        tokenizer = copy.deepcopy(tokenizers[template])
        return trainer_class(
            model=build_tiny_model(tokenizer, tie_word_embeddings=True, seed=0),
            args=args,
            train_dataset=Dataset.from_list(dataset_rows),
            processing_class=tokenizer,
        )

    sft = trainer(SFTTrainer, sft_args, to_prompt_completion(conversations))
    sft.train()
    dsft = trainer(DSFTTrainer, dsft_args, conversations)
    dsft.train()

    assert_same_prepared(sft.train_dataset, dsft.train_dataset, "train dataset")
    assert_same_losses(sft, dsft)


def test_cases_are_documented_forms():
    """Guards the spec itself: unique ids, and the tool rows really carry per-row tools and template kwargs."""
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    dataset = tool_rows()
    assert {len(tools) for tools in dataset["tools"]} == {0, 1, 2}
    assert json.dumps(dataset[1]["tools"][0], sort_keys=True) == json.dumps(TOOL_SCHEMAS[0], sort_keys=True)
