"""The data layer: loading, validating, normalising and mixing conversations (`delia/data.py`)."""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest
from conftest import conversation, diverse_rows, downstream_rows, write_jsonl
from datasets import Dataset, DatasetDict, Features, List, Value

import delia
from delia import DataFormatError, DSFTConfig, load_conversations, mix_datasets, plan_mixture

FEATURES = Features(
    {
        "prompt": List({"role": Value("string"), "content": Value("string")}),
        "completion": List({"role": Value("string"), "content": Value("string")}),
        "source": Value("string"),
    }
)
ARROW_NOISE = ("pyarrow", "Arrow", "JSON parse error", "Traceback", "straddling", "DatasetGenerationError", "pandas")


def rows_of(dataset: Dataset) -> list[dict]:
    return dataset.to_list()


def whole(row: dict) -> tuple:
    """A mixed row's conversation (prompt + completion) as a hashable value."""
    return tuple((m["role"], m["content"]) for m in row["prompt"] + row["completion"])


def as_key(row: dict) -> tuple:
    return tuple((m["role"], m["content"]) for m in row["messages"])


def diverse_keys(mixed: Dataset) -> list[tuple]:
    return [whole(row) for row in rows_of(mixed) if row["source"] == "diverse"]


def user_warnings(record: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, UserWarning)]


def assert_clean(error: BaseException) -> str:
    """The message carries no pyarrow / datasets noise and no chained traceback."""
    message = str(error)
    for noise in ARROW_NOISE:
        assert noise not in message, f"{noise!r} leaked into: {message}"
    assert error.__cause__ is None
    assert "\n" not in message
    return message


def at(path: Path, line: int) -> str:
    """Regex for the start of an error naming `path, line N` (exact line: not a prefix of a larger number)."""
    return re.escape(f"{path}, line {line}:")


@pytest.fixture
def down() -> Dataset:
    return Dataset.from_list(downstream_rows(8))


@pytest.fixture
def cache() -> Dataset:
    return Dataset.from_list(diverse_rows(40))


# ----------------------------------------------------------------------------------------------------------------------
# 1. Mixing counts and semantics
# ----------------------------------------------------------------------------------------------------------------------


def test_ratio_zero_gives_the_downstream_rows_unchanged_in_order(down, cache):
    mixed = mix_datasets(down, cache, ratio=0, seed=0)
    assert mixed.column_names == ["prompt", "completion"]  # no source column: nothing was mixed
    assert [whole(r) for r in rows_of(mixed)] == [as_key(r) for r in downstream_rows(8)]
    assert plan_mixture(8, 40, 0, seed=0).resolved_sampling == "none"
    assert len(plan_mixture(8, 40, 0, seed=0).draw()) == 0


def test_no_diverse_dataset_gives_the_downstream_rows_unchanged(down):
    mixed = mix_datasets(down, None, ratio=100, seed=0)
    assert [whole(r) for r in rows_of(mixed)] == [as_key(r) for r in downstream_rows(8)]
    untouched = mix_datasets(down, None, ratio=100, seed=0, final_reply_only=False)
    assert untouched.to_list() == down.to_list()


@pytest.mark.parametrize(
    ("downstream", "ratio", "expected"),
    [(8, 2.5, 20), (8, 0.0625, 1), (8, 0.0624, 0), (5, 0.5, 3), (1, 260, 260), (3, 1.0, 3), (7, 0.3, 2)],
)
def test_plan_rounds_ratio_times_rows_half_up(downstream, ratio, expected):
    plan = plan_mixture(downstream, 10_000, ratio, seed=0)
    assert plan.diverse_rows == expected
    assert plan.downstream_rows == downstream and plan.cache_rows == 10_000
    assert plan.resolved_sampling == ("none" if expected == 0 else "without_replacement")
    assert len(plan.draw()) == expected


def test_fractional_ratio_mixes_rounded_count(down, cache):
    mixed = mix_datasets(down, cache, ratio=2.5, seed=0)
    assert Counter(mixed["source"]) == {"downstream": 8, "diverse": 20}
    half = mix_datasets(down, cache, ratio=0.0625, seed=0)
    assert Counter(half["source"]) == {"downstream": 8, "diverse": 1}


def test_columns_sources_and_prompt_completion_split(down, cache):
    mixed = mix_datasets(down, cache, ratio=1.5, seed=3)
    assert mixed.column_names == ["prompt", "completion", "source"]
    assert mixed.features == FEATURES
    assert Counter(mixed["source"]) == {"downstream": 8, "diverse": 12}
    originals = {as_key(r): r["messages"] for r in downstream_rows(8)}
    cache_keys = {as_key(r) for r in diverse_rows(40)}
    seen = []
    for row in rows_of(mixed):
        assert len(row["completion"]) == 1
        assert row["completion"][0]["role"] == "assistant"
        assert [m["role"] for m in row["prompt"]] == ["user"]
        key = whole(row)
        if row["source"] == "downstream":
            messages = originals[key]
            assert row["prompt"] == messages[:-1]
            assert row["completion"] == [messages[-1]]
            seen.append(key)
        else:
            assert key in cache_keys
    assert sorted(seen) == sorted(originals)  # every downstream row exactly once


def test_leading_system_message_stays_in_prompt(cache):
    rows = [conversation(f"question {i}", f"answer {i}", system="Be terse.") for i in range(4)]
    rows.append(
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "one"},
                {"role": "user", "content": "second"},
                {"role": "assistant", "content": "two"},
            ]
        }
    )
    mixed = mix_datasets(Dataset.from_list(rows), cache, ratio=1, seed=0)
    downstream = [r for r in rows_of(mixed) if r["source"] == "downstream"]
    assert len(downstream) == 5
    for row in downstream:
        assert row["prompt"][0]["role"] == "system"
        assert row["completion"][0]["role"] == "assistant"
    multi = next(r for r in downstream if r["prompt"][0]["content"] == "Be kind.")
    assert [m["content"] for m in multi["prompt"]] == ["Be kind.", "first", "one", "second"]
    assert multi["completion"] == [{"role": "assistant", "content": "two"}]


def test_auto_with_small_cache_uses_every_row_then_replacement_and_warns_once(down):
    small = Dataset.from_list(diverse_rows(15))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        mixed = mix_datasets(down, small, ratio=2.5, seed=0, sampling="auto")
    found = user_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    text = str(found[0].message)
    assert "has 15 rows" in text and "asks for 20" in text and "5 drawn with replacement" in text
    assert "ratio 2.5 x 8 downstream" in text
    counts = Counter(diverse_keys(mixed))
    assert sum(counts.values()) == 20
    assert set(counts) == {as_key(r) for r in diverse_rows(15)}  # every cache row at least once
    assert Counter(mixed["source"])["downstream"] == 8
    for seed in range(5):
        plan = plan_mixture(8, 15, 2.5, seed=seed)
        assert plan.resolved_sampling == "every_row_then_with_replacement"
        drawn = Counter(plan.draw().tolist())
        assert set(drawn) == set(range(15)) and sum(drawn.values()) == 20


def test_auto_with_large_cache_does_not_warn(down, cache):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        mixed = mix_datasets(down, cache, ratio=2.5, seed=0, sampling="auto")
    assert user_warnings(record) == []
    keys = diverse_keys(mixed)
    assert len(keys) == 20 and len(set(keys)) == 20


def test_without_replacement_too_small_cache_raises_with_counts(down):
    small = Dataset.from_list(diverse_rows(5))
    with pytest.raises(ValueError, match=r"needs 20 diverse rows .*ratio 2\.5 x 8 downstream rows.*only 5"):
        mix_datasets(down, small, ratio=2.5, seed=0, sampling="without_replacement")
    with pytest.raises(ValueError, match=r"needs 20 diverse rows.*only 5"):
        plan_mixture(8, 5, 2.5, seed=0, sampling="without_replacement")


def test_without_replacement_never_repeats_a_row(down, cache):
    for seed in range(3):
        mixed = mix_datasets(down, cache, ratio=5, seed=seed, sampling="without_replacement")  # 40 of 40
        keys = diverse_keys(mixed)
        assert len(keys) == 40 and len(set(keys)) == 40
    plan = plan_mixture(8, 40, 4.0, seed=1, sampling="without_replacement")
    indices = plan.draw().tolist()
    assert len(indices) == 32 == len(set(indices)) and all(0 <= i < 40 for i in indices)


def test_with_replacement_allows_duplicates_without_warning(down):
    small = Dataset.from_list(diverse_rows(3))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        mixed = mix_datasets(down, small, ratio=2.5, seed=0, sampling="with_replacement")
    assert user_warnings(record) == []
    keys = diverse_keys(mixed)
    assert len(keys) == 20
    assert set(keys) <= {as_key(r) for r in diverse_rows(3)}
    assert max(Counter(keys).values()) > 1
    assert plan_mixture(8, 3, 2.5, seed=0, sampling="with_replacement").resolved_sampling == "with_replacement"
    assert plan_mixture(8, 100, 2.5, seed=0, sampling="with_replacement").resolved_sampling == "with_replacement"


def test_plan_with_empty_cache_or_bad_sampling_raises():
    with pytest.raises(ValueError, match=r"empty.*ratio 2\.5.*20 diverse rows"):
        plan_mixture(8, 0, 2.5, seed=0)
    with pytest.raises(ValueError, match=r"diverse_sampling must be one of.*'sometimes'"):
        plan_mixture(8, 40, 1.0, seed=0, sampling="sometimes")


def test_mix_rejects_bad_ratio_and_sampling(down, cache):
    with pytest.raises(ValueError, match=r"-1"):
        mix_datasets(down, cache, ratio=-1, seed=0)
    with pytest.raises(ValueError, match=r"'sometimes'"):
        mix_datasets(down, cache, ratio=1, seed=0, sampling="sometimes")


# ----------------------------------------------------------------------------------------------------------------------
# 2. Determinism
# ----------------------------------------------------------------------------------------------------------------------


def test_same_seed_same_rows_in_same_order(down, cache):
    first = rows_of(mix_datasets(down, cache, ratio=1.5, seed=7))
    second = rows_of(mix_datasets(Dataset.from_list(downstream_rows(8)), cache, ratio=1.5, seed=7))
    assert first == second
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = Dataset.from_list(diverse_rows(5))
        assert rows_of(mix_datasets(down, small, ratio=3, seed=2)) == rows_of(
            mix_datasets(down, small, ratio=3, seed=2)
        )
    assert plan_mixture(8, 40, 1.5, 7).draw().tolist() == plan_mixture(8, 40, 1.5, 7).draw().tolist()


def test_different_seed_changes_selection_and_places_but_keeps_downstream_order(down, cache):
    first = mix_datasets(down, cache, ratio=1, seed=0)
    second = mix_datasets(down, cache, ratio=1, seed=1)
    assert rows_of(first) != rows_of(second)
    assert set(diverse_keys(first)) != set(diverse_keys(second))  # 8 of 40 drawn: a different selection
    assert first["source"] != second["source"]  # diverse rows at other places
    for mixed in (first, second):  # the downstream rows keep the order they were given in
        assert [whole(r) for r in rows_of(mixed) if r["source"] == "downstream"] == [
            as_key(r) for r in downstream_rows(8)
        ]


# ----------------------------------------------------------------------------------------------------------------------
# 3. Normalisation
# ----------------------------------------------------------------------------------------------------------------------


def test_downstream_columns_and_message_keys_survive_mixing(tmp_path):
    named = []
    for row in downstream_rows(4):
        messages = [dict(m, name="alice" if m["role"] == "user" else "bot") for m in row["messages"]]
        named.append({"messages": messages, "id": len(named)})
    down_path = write_jsonl(tmp_path / "named.jsonl", named)
    cache_path = write_jsonl(tmp_path / "plain.jsonl", diverse_rows(10))
    mixed = mix_datasets(down_path, cache_path, ratio=1, seed=0)
    assert mixed.column_names == ["prompt", "completion", "id", "source"]
    for row in rows_of(mixed):
        names = {m["name"] for m in row["prompt"] + row["completion"]}
        if row["source"] == "downstream":
            assert names == {"alice", "bot"} and row["id"] in range(4)
        else:  # the cache lacks them: empty, not dropped rows
            assert names == {None} and row["id"] is None
    # The other way round, keys only the cache has are dropped: the downstream schema wins.
    reverse = mix_datasets(cache_path, down_path, ratio=0.4, seed=0)
    assert reverse.features == FEATURES


def test_eval_rows_get_the_training_rows_treatment(tmp_path):
    path = write_jsonl(tmp_path / "eval.jsonl", downstream_rows(3))
    prepared = delia.prepare_datasets(
        Dataset.from_list(downstream_rows(4)), Dataset.from_list(diverse_rows(8)), {"a": path, "b": path}, ratio=1
    )
    for name in ("a", "b"):
        assert prepared.eval_dataset[name].features == FEATURES
        assert prepared.eval_dataset[name]["source"] == ["downstream"] * 3
        assert [whole(r) for r in rows_of(prepared.eval_dataset[name])] == [as_key(r) for r in downstream_rows(3)]
    plain = delia.prepare_datasets(Dataset.from_list(downstream_rows(4)), None, path, final_reply_only=False)
    assert plain.eval_dataset.column_names == ["messages"] and not plain.mixed


# ----------------------------------------------------------------------------------------------------------------------
# 4. Loading
# ----------------------------------------------------------------------------------------------------------------------


def test_jsonl_without_trailing_newline_and_dict_like_content_loads_unchanged(tmp_path):
    reply = "{'thought': \"It's fine\", 'hallucination': 'no'}"
    rows = downstream_rows(3) + [conversation("Is 2+2=4 a hallucination?", reply)]
    path = write_jsonl(tmp_path / "down.jsonl", rows, trailing_newline=False)
    assert not path.read_bytes().endswith(b"\n")
    loaded = load_conversations(path)
    assert len(loaded) == 4
    assert loaded["messages"] == [r["messages"] for r in rows]
    assert loaded[3]["messages"][1]["content"] == reply
    mixed = mix_datasets(path, Dataset.from_list(diverse_rows(10)), ratio=1, seed=0)
    completions = [r["completion"][0]["content"] for r in rows_of(mixed) if r["source"] == "downstream"]
    assert reply in completions
    assert sorted(completions) == sorted(r["messages"][-1]["content"] for r in rows)


def test_loads_folder_saved_with_save_to_disk(tmp_path):
    Dataset.from_list(downstream_rows(5)).save_to_disk(str(tmp_path / "down_saved"))
    DatasetDict({"train": Dataset.from_list(diverse_rows(12))}).save_to_disk(str(tmp_path / "cache_saved"))
    loaded = load_conversations(tmp_path / "down_saved")
    assert loaded["messages"] == [r["messages"] for r in downstream_rows(5)]
    cache = load_conversations(str(tmp_path / "cache_saved"))  # a DatasetDict: its train split
    assert cache["messages"] == [r["messages"] for r in diverse_rows(12)]
    mixed = mix_datasets(tmp_path / "down_saved", tmp_path / "cache_saved", ratio=2, seed=0)
    assert Counter(mixed["source"]) == {"downstream": 5, "diverse": 10}
    with pytest.raises(ValueError, match=r"no split 'validation'"):
        load_conversations(tmp_path / "cache_saved", split="validation")


def test_loads_in_memory_dataset_as_is(down):
    loaded = load_conversations(down)
    assert loaded["messages"] == [r["messages"] for r in downstream_rows(8)]
    assert load_conversations(DatasetDict({"train": down}))["messages"] == loaded["messages"]


def test_blank_lines_are_skipped_and_counted_in_line_numbers(tmp_path):
    good = [json.dumps(r) for r in downstream_rows(3)]
    path = tmp_path / "blanks.jsonl"
    path.write_text("\n" + good[0] + "\n\n   \n" + good[1] + "\n\t\n" + good[2] + "\n\n", encoding="utf-8")
    assert load_conversations(path)["messages"] == [r["messages"] for r in downstream_rows(3)]

    bad = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    path.write_text("\n" + good[0] + "\n\n   \n" + good[1] + "\n" + bad + "\n" + good[2] + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=at(path, 6) + r" field 'messages'\[1\]\.role: expected 'assistant'"):
        load_conversations(path)


def test_json_array_file_names_rows_by_index_not_wrong_lines(tmp_path):
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(downstream_rows(2) + [bad]), encoding="utf-8")  # one line holding three rows
    with pytest.raises(DataFormatError, match=re.escape(f"{path}, row 2:") + r" field 'messages'\[1\]\.role") as info:
        load_conversations(path)
    assert "line" not in str(info.value)
    path.write_text(json.dumps(downstream_rows(4), indent=2), encoding="utf-8")
    assert len(load_conversations(path)) == 4


# ----------------------------------------------------------------------------------------------------------------------
# 5. Bad input
# ----------------------------------------------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good_lines(count: int = 2) -> list[str]:
    return [json.dumps(r) for r in downstream_rows(count)]


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "broken.jsonl", good_lines(2) + ['{"messages": [{"role": "user", "content": "x"}'])
    with pytest.raises(
        DataFormatError, match=at(path, 3) + r" malformed JSON .*expected one JSON object per line"
    ) as e:
        load_conversations(path)
    assert_clean(e.value)


def test_malformed_json_in_the_middle(tmp_path):
    path = write_lines(tmp_path / "broken.jsonl", good_lines(2) + ["{not json}"] + good_lines(3))
    with pytest.raises(DataFormatError, match=at(path, 3) + r" malformed JSON") as e:
        load_conversations(path)
    assert_clean(e.value)


def test_row_missing_messages(tmp_path):
    path = write_lines(tmp_path / "missing.jsonl", good_lines(3) + [json.dumps({"text": "hello"})] + good_lines(1))
    with pytest.raises(DataFormatError, match=at(path, 4) + r" missing field 'messages': expected") as e:
        load_conversations(path)
    assert_clean(e.value)
    only = write_lines(tmp_path / "only.jsonl", [json.dumps({"text": "hello"})])
    with pytest.raises(DataFormatError, match=at(only, 1) + r" missing field 'messages'.*fields found: 'text'") as e:
        load_conversations(only)
    assert_clean(e.value)


@pytest.mark.parametrize(
    ("messages", "field", "expected"),
    [
        (
            [("assistant", "x"), ("user", "y")],
            r"'messages'\[0\]\.role",
            r"expected 'system' or 'user', got 'assistant'",
        ),
        (
            [("user", "x"), ("user", "y"), ("assistant", "z")],
            r"'messages'\[1\]\.role",
            r"expected 'assistant', got 'user'",
        ),
        (
            [("system", "s"), ("user", "x"), ("assistant", "y"), ("assistant", "z")],
            r"'messages'\[3\]\.role",
            r"expected 'user', got 'assistant'",
        ),
        ([("user", "x"), ("system", "y")], r"'messages'\[1\]\.role", r"expected 'assistant', got 'system'"),
        ([("user", ""), ("assistant", "y")], r"'messages'\[0\]\.content", r"expected a non-empty string, got an empty"),
        ([("user", "x"), ("assistant", " \n\t ")], r"'messages'\[1\]\.content", r"expected a non-empty string"),
        ([("user", "x"), ("assistant", 42)], r"'messages'\[1\]\.content", r"expected a non-empty string, got int"),
        ([("user", "x"), ("assistant", None)], r"'messages'\[1\]\.content", r"expected a non-empty string, got null"),
        (
            [("user", "x"), ("assistant", "y"), ("user", "z")],
            r"'messages'",
            r"expected the last message to be the assistant's reply, got role 'user'",
        ),
        ([("user", "x")], r"'messages'", r"expected at least a user message and an assistant reply, got 1 message"),
        ([("system", "s"), ("user", "x")], r"'messages'", r"expected at least a user message and an assistant reply"),
        ([], r"'messages'", r"expected at least a user message and an assistant reply, got 0 message"),
    ],
    ids=[
        "assistant-first",
        "two-users",
        "two-assistants-after-system",
        "system-later",
        "empty-content",
        "whitespace-content",
        "number-content",
        "null-content",
        "ends-with-user",
        "single-message",
        "system-and-user-only",
        "no-messages",
    ],
)
def test_bad_conversation_names_file_line_and_field(tmp_path, messages, field, expected):
    row = {"messages": [{"role": role, "content": content} for role, content in messages]}
    path = write_lines(tmp_path / "bad.jsonl", good_lines(3) + [json.dumps(row)] + good_lines(2))
    with pytest.raises(DataFormatError, match=at(path, 4) + rf" field {field}: {expected}") as e:
        load_conversations(path)
    assert_clean(e.value)
    if any(not isinstance(content, (str, type(None))) for _, content in messages):
        return  # datasets cannot hold a number among strings in memory
    # The same row in memory is named by its row index.
    good = [json.loads(line) for line in good_lines(3)]
    with pytest.raises(DataFormatError, match=rf"^mine, row 3: field {field}: {expected}"):
        delia.validate_conversations(Dataset.from_list(good + [row]), "mine")


def test_non_string_content_among_good_lines(tmp_path):
    row = {"messages": [{"role": "user", "content": 12345}, {"role": "assistant", "content": "fine"}]}
    path = write_lines(tmp_path / "number.jsonl", good_lines(4) + [json.dumps(row)] + good_lines(4))
    with pytest.raises(
        DataFormatError, match=at(path, 5) + r" field 'messages'\[0\]\.content: expected a non-empty"
    ) as e:
        load_conversations(path)
    assert "int" in assert_clean(e.value)


def test_messages_not_a_list_or_row_not_an_object(tmp_path):
    path = write_lines(tmp_path / "string.jsonl", good_lines(2) + [json.dumps({"messages": "hello"})])
    with pytest.raises(DataFormatError, match=at(path, 3) + r" field 'messages': expected a list .*got str") as e:
        load_conversations(path)
    assert_clean(e.value)
    path = write_lines(tmp_path / "array.jsonl", good_lines(1) + ["[1, 2]"])
    with pytest.raises(DataFormatError, match=at(path, 2) + r" expected a JSON object .*got array") as e:
        load_conversations(path)
    assert_clean(e.value)


def test_empty_file_and_blank_file(tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n   \n\t\n\n")):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(
            DataFormatError, match=re.escape(str(path)) + r": the file is empty; expected one JSON"
        ) as e:
            load_conversations(path)
        assert_clean(e.value)


def test_unknown_path(tmp_path, monkeypatch, down):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"'\./foo\.jsonl' not found \(no such file or folder\): expected a JSONL file"
    ) as e:
        load_conversations("./foo.jsonl")
    assert_clean(e.value)
    with pytest.raises(FileNotFoundError, match=r"^diverse dataset '\./foo\.jsonl' not found"):
        mix_datasets(down, "./foo.jsonl", ratio=1, seed=0)
    with pytest.raises(FileNotFoundError, match=re.escape(repr(str(tmp_path / "nope.jsonl")))):
        load_conversations(tmp_path / "nope.jsonl")


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    folder = tmp_path / "plain_folder"
    folder.mkdir()
    write_jsonl(folder / "rows.jsonl", downstream_rows(2))
    with pytest.raises(
        DataFormatError, match=re.escape(repr(str(folder))) + r": the folder is not a saved dataset"
    ) as e:
        load_conversations(folder)
    assert_clean(e.value)


def test_mismatched_forms_between_downstream_and_diverse(tmp_path, down):
    standard = Dataset.from_list([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)])
    with pytest.raises(DataFormatError, match=r"mismatched forms") as e:
        mix_datasets(down, standard, ratio=1, seed=0)
    message = assert_clean(e.value)
    assert message.startswith(
        "mismatched forms: the downstream rows (train dataset) are conversational prompt/completion, "
        "but the diverse cache (diverse dataset) is prompt/completion strings; mix a cache of the same form"
    )
    down_path = write_jsonl(tmp_path / "down.jsonl", downstream_rows(4))
    std_path = write_jsonl(tmp_path / "std.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
    with pytest.raises(
        DataFormatError, match=re.escape(str(down_path)) + r"\) are conversational.*" + re.escape(str(std_path))
    ):
        mix_datasets(down_path, std_path, ratio=1, seed=0)
    # Standard rows mix with standard rows.
    standard_mix = mix_datasets(standard, standard, ratio=1, seed=0)
    assert standard_mix.features["prompt"] == Value("string")
    assert Counter(standard_mix["source"]) == {"downstream": 6, "diverse": 6}


def test_bad_row_in_diverse_cache_names_its_file(tmp_path, down):
    bad = {"messages": [{"role": "user", "content": "x"}]}
    cache_path = write_lines(tmp_path / "cache.jsonl", [json.dumps(r) for r in diverse_rows(5)] + [json.dumps(bad)])
    with pytest.raises(DataFormatError, match=at(cache_path, 6) + r" field 'messages': expected at least"):
        mix_datasets(down, cache_path, ratio=1, seed=0)


def test_bad_row_beyond_first_validation_batch_reports_its_line(tmp_path):
    good = json.dumps(conversation("hi", "hello"))
    system = json.dumps(conversation("hi", "hello", system="sys"))
    bad = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]})
    path = tmp_path / "big.jsonl"
    body = "\n".join([good] * 35_000 + [system] * 35_000)
    path.write_text("\n\n" + body + "\n" + bad + "\n" + good + "\n", encoding="utf-8")  # bad: row 70000, line 70003
    with pytest.raises(
        DataFormatError, match=at(path, 70_003) + r" field 'messages'\[1\]\.role: expected 'assistant'"
    ) as e:
        load_conversations(path)
    assert_clean(e.value)
    path.write_text(body + "\n" + good + "\n", encoding="utf-8")
    assert len(load_conversations(path)) == 70_001  # the fast check accepts a good file past the first batch


# ----------------------------------------------------------------------------------------------------------------------
# 6. DSFTConfig validation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (-1.0, "-1.0"),
        (-0.5, "-0.5"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        ("lots", "'lots'"),
        (True, "True"),
        (None, "None"),
    ],
)
def test_config_rejects_bad_diverse_ratio(tmp_path, value, shown):
    with pytest.raises(ValueError, match=r"diverse_ratio must be a finite number >= 0, got " + re.escape(shown)):
        DSFTConfig(output_dir=str(tmp_path), report_to="none", diverse_ratio=value)


def test_config_rejects_bad_diverse_sampling(tmp_path):
    with pytest.raises(
        ValueError, match=r"diverse_sampling must be one of auto, without_replacement, with_replacement"
    ):
        DSFTConfig(output_dir=str(tmp_path), report_to="none", diverse_sampling="sometimes")


def test_config_defaults_and_diverse_seed(tmp_path):
    config = DSFTConfig(output_dir=str(tmp_path), report_to="none", seed=123)
    assert config.diverse_seed == 123
    assert config.diverse_ratio == 100.0 and config.diverse_sampling == "auto"
    config = DSFTConfig(output_dir=str(tmp_path), report_to="none", seed=123, diverse_seed=7, diverse_ratio=0)
    assert config.diverse_seed == 7 and config.diverse_ratio == 0.0
    config = DSFTConfig(
        output_dir=str(tmp_path), report_to="none", diverse_ratio=2.5, diverse_sampling="with_replacement"
    )
    assert config.diverse_ratio == 2.5 and config.diverse_sampling == "with_replacement"


def test_config_is_sane_without_an_accelerator(tmp_path, monkeypatch):
    """TRL's bf16 default and pinned memory assume a GPU: on a CPU-only machine, bf16 only where the CPU has it
    natively (then with use_cpu, which transformers requires), no pinning; with an accelerator they stay."""
    import delia.config

    monkeypatch.setattr(delia.config, "has_accelerator", lambda: False)
    monkeypatch.setattr(delia.config, "native_bf16", lambda: False)
    config = DSFTConfig(output_dir=str(tmp_path), report_to="none")
    assert config.bf16 is False and config.dataloader_pin_memory is False
    monkeypatch.setattr(delia.config, "native_bf16", lambda: True)
    config = DSFTConfig(output_dir=str(tmp_path), report_to="none")
    assert config.bf16 is True and config.use_cpu is True and config.dataloader_pin_memory is False
    monkeypatch.setattr(delia.config, "has_accelerator", lambda: True)
    config = DSFTConfig(output_dir=str(tmp_path), report_to="none", bf16=False)
    assert config.dataloader_pin_memory is True


def test_arrow_split_matches_the_row_by_row_split():
    """The vectorised messages -> prompt/completion split gives exactly what the plain Python split gives."""
    from delia.data.forms import split_final_reply, split_rows

    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
                {"role": "user", "content": "e"},
                {"role": "assistant", "content": "f"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "t"},
                {"role": "user", "content": "g"},
                {"role": "assistant", "content": "h"},
            ]
        },
    ]
    dataset = Dataset.from_list(rows * 5).select([14, 3, 7, 0, 1])  # an index mapping, as after a draw
    dataset = dataset.add_column("id", list(range(5)))
    fast = split_final_reply(dataset)
    slow = split_rows(dataset[:])
    assert fast.to_dict() == slow
    assert fast.column_names == ["prompt", "completion", "id"]
    streamed = split_final_reply(dataset.to_iterable_dataset())
    assert list(streamed) == fast.to_list()


def test_arrow_rules_and_python_reference_agree_on_random_rows():
    """The fast check flags exactly the rows the Python reference rejects, over seeded random (mostly bad) rows."""
    import random

    from delia.data.rules import bad_message_rows, row_problem

    rng = random.Random(0)
    roles = ["system", "user", "assistant", "tool"]
    contents = ["text", "", "  ", "more text"]
    rows = []
    for _ in range(2000):
        length = rng.randint(0, 5)
        rows.append({"messages": [{"role": rng.choice(roles), "content": rng.choice(contents)} for _ in range(length)]})
    dataset = Dataset.from_list(rows)
    fast = set(bad_message_rows(dataset.data.column("messages")).tolist())
    slow = {index for index, row in enumerate(rows) if row_problem(row, "messages") is not None}
    assert 0 < len(slow) < len(rows)  # both kinds present, so the comparison means something
    assert fast == slow


def test_trainer_keyword_overrides_do_not_change_the_callers_config(make_tokenizer, make_model, make_config, tmp_path):
    from delia import DSFTTrainer

    tokenizer = make_tokenizer("chatml")
    config = make_config(max_steps=1)
    cache_path = write_jsonl(tmp_path / "cache.jsonl", diverse_rows(10))
    trainer = DSFTTrainer(
        make_model(tokenizer),
        args=config,
        train_dataset=Dataset.from_list(downstream_rows(4)),
        processing_class=tokenizer,
        diverse_dataset=str(cache_path),
        diverse_ratio=2,
    )
    assert (trainer.args.diverse_dataset, trainer.args.diverse_ratio) == (str(cache_path), 2.0)
    assert (config.diverse_dataset, config.diverse_ratio) == (None, 100.0)
    assert trainer.mixture["sources"]["diverse"]["rows"] == 8
    with pytest.raises(ValueError, match=r"diverse_ratio must be a finite number >= 0, got -1"):
        DSFTTrainer(
            make_model(tokenizer),
            args=config,
            train_dataset=Dataset.from_list(downstream_rows(4)),
            processing_class=tokenizer,
            diverse_ratio=-1,
        )
