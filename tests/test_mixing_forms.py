"""Mixing works in every dataset form where it means something, keeps the user's columns, and refuses mismatches."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import diverse_rows, downstream_rows
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from delia import DataFormatError, DSFTTrainer, mix_datasets

QUESTIONS = [f"What is {i} plus {i}?" for i in range(6)]
ANSWERS = [f"It is {2 * i}." for i in range(6)]


def text_cache(count: int = 12, field: str = "text") -> Dataset:
    return Dataset.from_list([{field: f"The waves came in {i} times before noon."} for i in range(count)])


def train_briefly(make_tokenizer, make_model, make_config, template="chatml", config=None, **kwargs) -> DSFTTrainer:
    tokenizer = make_tokenizer(template)
    trainer = DSFTTrainer(
        model=make_model(tokenizer),
        args=make_config(max_steps=1, **(config or {})),
        processing_class=tokenizer,
        **kwargs,
    )
    trainer.train()
    return trainer


def sources(trainer: DSFTTrainer) -> Counter:
    return Counter(trainer.train_dataset["source"])


@pytest.mark.parametrize("field", ["text", "body"])
def test_language_modeling_text_mixes_with_a_text_cache(make_tokenizer, make_model, make_config, field):
    downstream = Dataset.from_list([{field: f"{q} {a}"} for q, a in zip(QUESTIONS, ANSWERS, strict=True)])
    trainer = train_briefly(
        make_tokenizer,
        make_model,
        make_config,
        config={"dataset_text_field": field},
        train_dataset=downstream,
        diverse_dataset=text_cache(),
        diverse_ratio=1,
    )
    assert sources(trainer) == {"downstream": 6, "diverse": 6}
    assert all(label != -100 for row in trainer.train_dataset for label in row["labels"])  # whole text trains


def test_prompt_completion_strings_mix_with_the_same_form(make_tokenizer, make_model, make_config):
    rows = [{"prompt": q, "completion": " " + a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    cache = [{"prompt": f"Tell me fact {i}.", "completion": f" Fact {i} is true."} for i in range(10)]
    trainer = train_briefly(
        make_tokenizer,
        make_model,
        make_config,
        train_dataset=Dataset.from_list(rows),
        diverse_dataset=Dataset.from_list(cache),
        diverse_ratio=1.5,
    )
    assert sources(trainer) == {"downstream": 6, "diverse": 9}


def test_conversational_prompt_completion_takes_a_messages_cache(make_tokenizer, make_model, make_config):
    rows = [
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        for q, a in zip(QUESTIONS, ANSWERS, strict=True)
    ]
    mixed = mix_datasets(Dataset.from_list(rows), Dataset.from_list(diverse_rows(10)), ratio=1)
    assert mixed.column_names == ["prompt", "completion", "source"]
    diverse = [row for row in mixed if row["source"] == "diverse"]
    assert len(diverse) == 6 and all(row["completion"][0]["role"] == "assistant" for row in diverse)


def test_messages_kept_whole_take_a_prompt_completion_cache(make_tokenizer, make_model, make_config):
    cache = [
        {"prompt": [{"role": "user", "content": f"q{i}"}], "completion": [{"role": "assistant", "content": f"a{i}"}]}
        for i in range(10)
    ]
    mixed = mix_datasets(
        Dataset.from_list(downstream_rows(4)), Dataset.from_list(cache), ratio=1, final_reply_only=False
    )
    assert mixed.column_names == ["messages", "source"]
    diverse = [row["messages"] for row in mixed if row["source"] == "diverse"]
    assert len(diverse) == 4 and all([m["role"] for m in messages] == ["user", "assistant"] for messages in diverse)


def test_sharegpt_conversations_mix_with_a_messages_cache(make_tokenizer, make_model, make_config):
    rows = [
        {"conversations": [{"from": "user", "value": q}, {"from": "assistant", "value": a}]}
        for q, a in zip(QUESTIONS, ANSWERS, strict=True)
    ]
    trainer = train_briefly(
        make_tokenizer,
        make_model,
        make_config,
        train_dataset=Dataset.from_list(rows),
        diverse_dataset=Dataset.from_list(diverse_rows(10)),
        diverse_ratio=1,
    )
    assert sources(trainer) == {"downstream": 6, "diverse": 6}
    downstream = [row for row in trainer.train_dataset if row["source"] == "downstream"]
    assert [row["completion"][0]["content"] for row in downstream] == ANSWERS  # order kept, final reply split off


def test_formatting_func_is_applied_to_the_downstream_rows_before_mixing(make_tokenizer, make_model, make_config):
    rows = Dataset.from_list([{"question": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)])

    def formatting_func(row: dict) -> str:
        return f"Question: {row['question']}\nAnswer: {row['answer']}"

    trainer = train_briefly(
        make_tokenizer,
        make_model,
        make_config,
        train_dataset=rows,
        diverse_dataset=text_cache(),
        diverse_ratio=1,
        formatting_func=formatting_func,
    )
    assert sources(trainer) == {"downstream": 6, "diverse": 6}
    tokenizer = trainer.processing_class
    texts = [tokenizer.decode(row["input_ids"]) for row in trainer.train_dataset if row["source"] == "downstream"]
    assert texts[0].startswith("Question: What is 0 plus 0?\nAnswer: It is 0.")
    with pytest.raises(DataFormatError, match=r"mismatched forms: .* language modeling text, but the diverse cache"):
        DSFTTrainer(
            model=make_model(tokenizer),
            args=make_config(),
            processing_class=tokenizer,
            train_dataset=rows,
            diverse_dataset=Dataset.from_list(diverse_rows(10)),
            diverse_ratio=1,
            formatting_func=formatting_func,
        )


def test_per_row_template_arguments_and_tools_survive_mixing(make_tokenizer, make_model, make_config, tmp_path):
    """Downstream rows tokenise exactly as SFTTrainer tokenises them (their `chat_template_kwargs` and `tools` used);
    cache rows, which lack both, get empty values and still tokenise."""
    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = (
        "{% if tools %}{{ '<|im_start|>system\\nTools: ' + (tools | map(attribute='name') | join(', ')) + '<|im_end|>\\n' }}"
        "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' and style %}{{ '(' + style + ') ' }}{% endif %}"
        "{{ message['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    rows = [
        {
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "chat_template_kwargs": {"style": "brief" if i % 2 else "plain"},
            "tools": [{"name": "calculator", "description": "adds numbers"}],
        }
        for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS, strict=True))
    ]
    downstream = Dataset.from_list(rows)
    config = {"output_dir": str(tmp_path / "run"), "max_steps": 1, "final_reply_only": False}
    mixed = DSFTTrainer(
        model=make_model(tokenizer),
        args=make_config(**config),
        processing_class=tokenizer,
        train_dataset=downstream,
        diverse_dataset=Dataset.from_list(diverse_rows(10)),
        diverse_ratio=1,
    )
    plain = SFTTrainer(
        model=make_model(tokenizer),
        args=SFTConfig(str(tmp_path / "sft"), max_steps=1, report_to="none", bf16=False, use_cpu=True),
        processing_class=tokenizer,
        train_dataset=downstream,
    )
    mixed_rows = mixed.train_dataset.to_list()
    ours = [row["input_ids"] for row in mixed_rows if row["source"] == "downstream"]
    assert ours == plain.train_dataset["input_ids"]
    assert "(brief)" in tokenizer.decode(ours[1]) and "Tools: calculator" in tokenizer.decode(ours[0])
    theirs = [tokenizer.decode(row["input_ids"]) for row in mixed_rows if row["source"] == "diverse"]
    assert len(theirs) == 6 and not any("Tools:" in text or "(" in text.split("assistant")[-1][:3] for text in theirs)
    mixed.train()


def test_pre_tokenized_rows_mix_only_with_pre_tokenized_rows():
    tokenized = Dataset.from_list([{"input_ids": [1, 2, 3 + i]} for i in range(4)])
    cache = Dataset.from_list([{"input_ids": [5, 6, i]} for i in range(8)])
    mixed = mix_datasets(tokenized, cache, ratio=2)
    assert Counter(mixed["source"]) == {"downstream": 4, "diverse": 8}
    with pytest.raises(DataFormatError, match=r"pre-tokenized input_ids, but the diverse cache .* conversations"):
        mix_datasets(tokenized, Dataset.from_list(diverse_rows(8)), ratio=1)


def test_streaming_downstream_rows_cannot_be_mixed_but_pass_through_at_ratio_zero():
    streaming = Dataset.from_list(downstream_rows(4)).to_iterable_dataset()
    with pytest.raises(DataFormatError, match=r"must be a datasets.Dataset, not an IterableDataset"):
        mix_datasets(streaming, Dataset.from_list(diverse_rows(8)), ratio=1)
    passed = mix_datasets(streaming, Dataset.from_list(diverse_rows(8)), ratio=0, final_reply_only=False)
    assert list(passed) == downstream_rows(4)


def test_a_dataset_of_no_known_form_is_named():
    with pytest.raises(DataFormatError, match=r"train dataset: no column SFTTrainer can train on \(fields found: 'q'"):
        mix_datasets(Dataset.from_list([{"q": "x"}]), None)


def test_review_cases_indices_mapping_clashing_types_source_column_and_sharegpt_cache(tmp_path):
    """Rows picked through an index mapping are checked as picked; a cache column of another type is left empty with a
    warning; a downstream `source` column is refused; a ShareGPT cache is checked like a messages cache."""
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "no reply"}]}
    rows = downstream_rows(3) + [bad]
    with pytest.raises(DataFormatError, match=r"row 1: field 'messages'\[1\]\.role: expected the conversation to end"):
        mix_datasets(Dataset.from_list(rows).select([0, 3]), None)
    assert len(mix_datasets(Dataset.from_list(list(reversed(rows))).select([1, 3]), None)) == 2

    with_ids = Dataset.from_list([dict(row, id=i) for i, row in enumerate(downstream_rows(4))])
    cache = Dataset.from_list([dict(row, id=f"b{i}") for i, row in enumerate(diverse_rows(8))])
    with pytest.warns(UserWarning, match=r"left empty in the cache rows: 'id'"):
        mixed = mix_datasets(with_ids, cache, ratio=1)
    assert sorted(r["id"] for r in mixed if r["source"] == "downstream") == [0, 1, 2, 3]
    assert [r["id"] for r in mixed if r["source"] == "diverse"] == [None] * 4

    with pytest.raises(DataFormatError, match=r"has a 'source' column, which DELIA uses"):
        mix_datasets(Dataset.from_list([dict(r, source="web") for r in downstream_rows(2)]), cache, ratio=1)

    sharegpt = Dataset.from_list([{"conversations": [{"from": "user", "value": "only a question"}]}] * 4)
    with pytest.raises(DataFormatError, match=r"diverse dataset, row 0: field 'messages'"):
        mix_datasets(Dataset.from_list(downstream_rows(2)), sharegpt, ratio=1)


def test_formatting_func_with_an_eval_set_of_custom_columns_is_left_to_sftrainer():
    from delia import prepare_datasets

    rows = Dataset.from_list([{"q": q, "ans": a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)])
    prepared = prepare_datasets(rows, None, rows, formatting_func=lambda row: row["q"] + row["ans"])
    assert prepared.eval_dataset is rows and prepared.formatting_func is not None
