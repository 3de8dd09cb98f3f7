"""The one row-form reader (`delia/data/forms.py`): what a row is, and its messages, whatever its form."""

from __future__ import annotations

import pytest
from datasets import Dataset

from delia.data import DataFormatError, forms
from delia.data.rules import any_format_row_problem

USER, REPLY = {"role": "user", "content": "Name a sea."}, {"role": "assistant", "content": "The North Sea."}
SYSTEM = {"role": "system", "content": "Be brief."}
ROWS = {
    forms.MESSAGES: {"messages": [SYSTEM, USER, REPLY]},
    forms.FROM_VALUE: {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "user", "value": "Name a sea."},
            {"from": "assistant", "value": "The North Sea."},
        ]
    },  # fmt: skip
    forms.CONVERSATIONAL_PROMPT_COMPLETION: {"prompt": [SYSTEM, USER], "completion": [REPLY]},
    forms.PROMPT_COMPLETION: {"prompt": "Name a sea.", "completion": "The North Sea."},
}


@pytest.mark.parametrize("form", ROWS)
def test_row_form_agrees_with_detect_form(form):
    row = ROWS[form]
    assert forms.row_form(row) == form == forms.detect_form(Dataset.from_list([row]))
    assert forms.detect_form(Dataset.from_list([row]).to_iterable_dataset()) == form


@pytest.mark.parametrize("form", ROWS)
def test_conversation_and_user_turns_whatever_the_form(form):
    row = ROWS[form]
    expected = [USER, REPLY] if form == forms.PROMPT_COMPLETION else [SYSTEM, USER, REPLY]
    assert forms.conversation_of(row) == expected
    assert forms.user_turns(row) == ["Name a sea."]
    assert forms.first_user_turn(row) == forms.last_user_turn(row) == "Name a sea."


def test_sftrainers_order_decides_a_row_with_several_forms():
    both = {"messages": [USER, REPLY], "prompt": [USER], "completion": [{"role": "assistant", "content": "other"}]}
    assert (
        forms.row_form(both) == forms.CONVERSATIONAL_PROMPT_COMPLETION == forms.detect_form(Dataset.from_list([both]))
    )
    assert forms.conversation_of(both)[-1]["content"] == "other"
    nulls = {"messages": [USER, REPLY], "prompt": None, "completion": None}  # a row of a dataset mixing forms
    assert forms.row_form(nulls) == forms.MESSAGES and forms.conversation_of(nulls) == [USER, REPLY]
    assert forms.row_form({"input_ids": [1], "messages": [USER]}) == forms.TOKENIZED
    assert forms.row_form({"text": "x"}) == forms.LANGUAGE_MODELING and forms.row_form({"other": 1}) is None


def test_first_and_last_user_turns_of_a_longer_conversation():
    row = {"messages": [USER, REPLY, {"role": "user", "content": "And another?"}, REPLY]}
    assert forms.user_turns(row) == ["Name a sea.", "And another?"]
    assert (forms.first_user_turn(row), forms.last_user_turn(row)) == ("Name a sea.", "And another?")
    assert forms.conversation_of({"messages": [{**USER, "name": "x", "tool_calls": None}]}) == [USER]


def test_rows_that_are_no_conversation_say_so():
    with pytest.raises(DataFormatError, match=r"expected a conversation: .* \(fields found: 'text'\)"):
        forms.conversation_of({"text": "x", "id": None})
    with pytest.raises(DataFormatError, match="with a user message, found none"):
        forms.first_user_turn({"messages": [SYSTEM]})


def test_closest_form_names_what_a_broken_row_lacks():
    assert forms.closest_form({"prompt": "q"}) == forms.PROMPT_COMPLETION
    assert forms.closest_form({"prompt": [USER]}) == forms.CONVERSATIONAL_PROMPT_COMPLETION
    assert forms.closest_form({"prompt": "q", "messages": [USER]}) == forms.MESSAGES
    assert forms.closest_form({"text": "x"}) == forms.MESSAGES
    assert any_format_row_problem({"prompt": "q"}).startswith("field 'completion': expected a non-empty string")
    assert any_format_row_problem({"text": "x"}).startswith("missing field 'messages'")
