"""Message columns stored as datasets' `Json` type (datasets >= 4.7, `on_mixed_types="use_json"`): DELIA reads them as
SFTTrainer does, in validation, form detection, the final-reply split, mixing (either side), streaming and queries."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from conftest import diverse_rows, downstream_rows, write_jsonl
from datasets import Dataset, Features, Json, List, Value

from delia.data import DataFormatError, forms, mix_datasets, prepare_datasets, validate_conversations
from delia.data.conform import conform
from delia.data.json_type import from_python, holds_json, is_json, to_python
from delia.data.queries import load_queries

LAYOUTS = {
    "Json()": Json(),  # each row's messages one JSON text
    "List(Json())": List(Json()),  # one JSON text per message (TRL's tool-calling datasets)
    "content Json": List({"role": Value("string"), "content": Json()}),  # mixed content types across rows
}


def as_json(rows: list[dict], layout: str) -> Dataset:
    return Dataset.from_list(rows, features=Features({"messages": LAYOUTS[layout]}))


def tool_call(i: int) -> dict:
    """A tool-calling conversation whose argument objects differ in keys: datasets stores it as List(Json())."""
    calls = [
        {"type": "function", "function": {"name": "light", "arguments": {"room": "hall", "on": True}}},
        {"type": "function", "function": {"name": "music", "arguments": {"playlist": f"p{i}"}}},
    ]
    return {
        "messages": [
            {"role": "user", "content": f"Lights on and music {i}, please."},
            {"role": "assistant", "tool_calls": calls},
            {"role": "tool", "name": "light", "content": "The lights are on."},
            {"role": "assistant", "content": f"Done {i}."},
        ]
    }


def decoded(dataset) -> list[dict]:
    return [json.loads(json.dumps(row)) for row in dataset]  # plain Python values, whatever the Arrow layout


# ----------------------------------------------------------------------------------------------------------------------
# The layouts, and reading them
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_holds_json_and_is_not_a_plain_message_list(layout):
    column_type = as_json(downstream_rows(2), layout).data.schema.field("messages").type
    assert holds_json(column_type)
    assert not forms.is_message_list(column_type, plain=True)
    assert forms.is_message_list(column_type) == (layout == "content Json")  # roles still readable by Arrow
    plain = Dataset.from_list(downstream_rows(2)).data.schema.field("messages").type
    assert forms.is_message_list(plain, plain=True) and not holds_json(plain)


def test_a_jsonl_file_with_mixed_types_is_read_as_json_and_prepared(tmp_path):
    """datasets' JSON loader stores mixed types as Json by default: such a file trains as SFTTrainer reads it."""
    path = write_jsonl(tmp_path / "tools.jsonl", [tool_call(i) for i in range(3)])
    prepared = prepare_datasets(str(path))
    assert prepared.split_final_reply and holds_json(prepared.train_dataset.data.schema.field("prompt").type)
    assert prepared.train_dataset[1]["completion"] == [{"role": "assistant", "content": "Done 1."}]
    assert prepared.train_dataset[1]["prompt"] == tool_call(1)["messages"][:-1]


def test_json_values_go_in_and_out_of_arrow():
    column_type = LAYOUTS["content Json"]
    values = [[{"role": "user", "content": "a"}, {"role": "assistant", "content": [1, "x"]}], None]
    array = from_python(values, Features({"m": column_type}).arrow_schema.field("m").type)
    assert is_json(array.type.value_type.field("content").type) and to_python(array) == values
    with pytest.raises(TypeError):
        from_python(["not a list"], pa.list_(pa.json_()))


# ----------------------------------------------------------------------------------------------------------------------
# Validation and the final-reply split
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_validation_reads_json_messages_and_names_the_bad_row(layout):
    rows = diverse_rows(5)
    assert validate_conversations(as_json(rows, layout), "cache") == "messages"
    bad = [*rows[:3], {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "r"}]}]
    with pytest.raises(DataFormatError, match=r"^cache, row 3: field 'messages'\[1\]\.role: expected 'assistant'"):
        validate_conversations(as_json(bad, layout), "cache")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_final_reply_split_of_json_messages_matches_the_plain_one(layout):
    rows = downstream_rows(4)
    expected = decoded(prepare_datasets(Dataset.from_list(rows)).train_dataset)
    prepared = prepare_datasets(as_json(rows, layout))
    assert decoded(prepared.train_dataset) == expected
    assert holds_json(prepared.train_dataset.data.schema.field("prompt").type)  # the column's type is kept


@pytest.mark.parametrize("layout", LAYOUTS)
def test_json_conversation_that_does_not_end_with_a_reply_is_named(layout):
    rows = [*downstream_rows(2), {"messages": [{"role": "user", "content": "q"}]}]
    with pytest.raises(DataFormatError, match=r"row 2: field 'messages'\[0\]\.role: expected the conversation to end"):
        prepare_datasets(as_json(rows, layout))


# ----------------------------------------------------------------------------------------------------------------------
# Mixing: a Json column downstream, or in the diverse cache
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixing_with_json_downstream_rows_matches_plain_mixing(layout):
    down, cache = downstream_rows(6), Dataset.from_list(diverse_rows(10))
    expected = decoded(mix_datasets(Dataset.from_list(down), cache, ratio=1.0, seed=3))
    mixed = mix_datasets(as_json(down, layout), cache, ratio=1.0, seed=3)
    assert decoded(mixed) == expected
    assert mixed.features["prompt"] == LAYOUTS[layout] or layout == "Json()"  # Json(): prompt and completion Json
    assert sum(row["source"] == "diverse" for row in mixed) == 6


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixing_a_json_diverse_cache_matches_plain_mixing(layout, tmp_path):
    down, cache = Dataset.from_list(downstream_rows(6)), diverse_rows(10)
    expected = decoded(mix_datasets(down, Dataset.from_list(cache), ratio=1.5, seed=1))
    assert decoded(mix_datasets(down, as_json(cache, layout), ratio=1.5, seed=1)) == expected
    saved = tmp_path / "cache"
    as_json(cache, layout).save_to_disk(str(saved))  # as a saved folder, too
    assert decoded(mix_datasets(down, str(saved), ratio=1.5, seed=1)) == expected


def test_tool_calling_rows_keep_their_tool_calls_when_a_plain_cache_is_mixed_in():
    down = Dataset.from_list([tool_call(i) for i in range(4)], on_mixed_types="use_json")
    assert down.features["messages"] == List(Json())
    mixed = mix_datasets(down, Dataset.from_list(diverse_rows(10)), ratio=1.0)
    rows = list(mixed)
    tools = [row for row in rows if row["source"] == "downstream"]
    assert [row["prompt"] for row in tools] == [tool_call(i)["messages"][:-1] for i in range(4)]
    diverse = [row for row in rows if row["source"] == "diverse"]
    assert len(diverse) == 4 and all(list(m) == ["role", "content"] for row in diverse for m in row["prompt"])


def test_a_json_value_that_does_not_fit_the_downstream_type_is_named_by_column():
    down = Dataset.from_dict({"text": ["a"], "meta": ["x"]})
    cache = Dataset.from_dict(
        {"text": ["b"], "meta": [[1, 2]]}, features=Features({"text": Value("string"), "meta": Json()})
    )
    with pytest.raises(DataFormatError, match=r"column 'meta': a diverse row's value \(stored as Json\) does not fit"):
        conform(cache, down.features)
    assert conform(down, cache.features)["meta"] == ["x"]  # anything becomes JSON text


# ----------------------------------------------------------------------------------------------------------------------
# Streaming, queries
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_streaming_json_messages_are_split_as_the_plain_ones(layout):
    rows = downstream_rows(4)
    expected = decoded(prepare_datasets(Dataset.from_list(rows).to_iterable_dataset()).train_dataset)
    streamed = prepare_datasets(as_json(rows, layout).to_iterable_dataset())
    assert decoded(streamed.train_dataset) == expected
    assert streamed.split_final_reply


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_queries_reads_json_conversations(layout, tmp_path):
    rows = [diverse_rows(3)[0], *diverse_rows(3)]  # a duplicate query keeps its first row
    rows[1]["messages"].insert(0, {"role": "system", "content": "Be brief."})
    expected = [(q.id, q.query, q.reference, q.row) for q in load_queries(Dataset.from_list(rows))]
    queries = load_queries(as_json(rows, layout))
    assert [(q.id, q.query, q.reference, q.row) for q in queries] == expected and len(expected) == 3


def test_load_queries_reads_prompt_completion_rows_too():
    rows = [{"prompt": "What is 2 + 2?", "completion": "4"}, {"prompt": "Name a sea.", "completion": "The North Sea."}]
    queries = load_queries(Dataset.from_list(rows))
    assert [(q.query, q.reference) for q in queries] == [("What is 2 + 2?", "4"), ("Name a sea.", "The North Sea.")]


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def test_dsft_trainer_trains_on_json_messages_as_on_plain_ones(make_tokenizer, make_model, make_config):
    """The issue's case: SFTTrainer trains on a Json messages column; DSFTTrainer refused it. Same tokens as plain."""
    from delia import DSFTTrainer

    tokenizer = make_tokenizer("chatml")

    def trainer(downstream: Dataset) -> DSFTTrainer:
        return DSFTTrainer(
            model=make_model(tokenizer),
            args=make_config(max_steps=1),
            processing_class=tokenizer,
            train_dataset=downstream,
            diverse_dataset=Dataset.from_list(diverse_rows(12)),
            diverse_ratio=1.0,
        )

    rows = downstream_rows(6)
    json_trainer = trainer(as_json(rows, "List(Json())"))
    json_trainer.train()
    plain = trainer(Dataset.from_list(rows)).train_dataset
    assert json_trainer.train_dataset["source"].count("diverse") == 6
    assert json_trainer.train_dataset["input_ids"] == plain["input_ids"]
    assert json_trainer.train_dataset["labels"] == plain["labels"]


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and self-sampling read Json conversations too
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_rows_from_json_messages_match_the_plain_ones(layout, tmp_path):
    from delia.evaluation.eval_data import load_eval_data

    rows = downstream_rows(6)
    as_json(rows, layout).save_to_disk(str(tmp_path / "eval"))
    got = load_eval_data(str(tmp_path / "eval"), train_dataset=str(tmp_path / "eval"), general_queries=None)
    want = load_eval_data(write_jsonl(tmp_path / "eval.jsonl", rows), general_queries=None)
    assert [(row.prompt, row.instruction, row.label) for row in got.rows] == [
        (row.prompt, row.instruction, row.label) for row in want.rows
    ]
    assert got.seen == {row.instruction for row in want.rows}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_build_cache_answers_json_conversations(layout, tmp_path, tiny_model_dir):
    from delia.build_cache import build_cache

    rows = diverse_rows(4)
    as_json(rows, layout).save_to_disk(str(tmp_path / "queries"))
    output = tmp_path / "cache.jsonl"
    result = build_cache(tiny_model_dir, str(tmp_path / "queries"), output, max_new_tokens=3, progress=False)
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert result.written == len(written) <= 4 and result.queries == 4
    assert {row["messages"][0]["content"] for row in written} <= {row["messages"][0]["content"] for row in rows}
