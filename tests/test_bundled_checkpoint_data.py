"""The bundled hallucination-judgement data in `reproduce_checkpoint/` (train and held-out eval JSONL files)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from delia import load_conversations

DATA_DIR = Path(__file__).resolve().parent.parent / "reproduce_checkpoint"
TRAIN = DATA_DIR / "train_dataset.jsonl"
EVAL = DATA_DIR / "eval_dataset.jsonl"
DEMO_EVAL = DATA_DIR.parent / "delia" / "demo_data" / "eval.jsonl"
FIELD_LABELS = ("'relatives' : ", "'user_query' : ", "'chatgpt_response' : ")


def rows(path: Path) -> list[tuple[str, str]]:
    """(user content, assistant content) for every row, loaded and validated by `delia.load_conversations`."""
    dataset = load_conversations(path)
    pairs = []
    for messages in dataset["messages"]:
        assert [m["role"] for m in messages] == ["user", "assistant"]
        pairs.append((messages[0]["content"], messages[1]["content"]))
    return pairs


def verdict(assistant: str) -> dict:
    parsed = ast.literal_eval(assistant)
    assert isinstance(parsed, dict), assistant
    return parsed


def phrasing(user: str) -> str:
    """The instruction: the last paragraph of the user content, after the final blank-line gap."""
    return user.rsplit("\n\n\n", 1)[-1].strip()


def query(user: str) -> str:
    return user.split("\n'user_query' : ", 1)[1].split("\n'chatgpt_response' : ", 1)[0].strip()


@pytest.fixture(scope="module")
def train() -> list[tuple[str, str]]:
    return rows(TRAIN)


@pytest.fixture(scope="module")
def evaluation() -> list[tuple[str, str]]:
    return rows(EVAL)


def test_files_end_with_newline():
    for path in (TRAIN, EVAL):
        assert path.read_bytes().endswith(b"\n"), path


def test_row_counts(train, evaluation):
    assert len(train) >= 100
    assert len(evaluation) >= 20


@pytest.mark.parametrize("split", ["train", "evaluation"])
def test_assistant_is_a_thought_and_label_dict(split, request):
    for _, assistant in request.getfixturevalue(split):
        parsed = verdict(assistant)
        assert set(parsed) == {"thought", "hallucination"}, assistant
        assert parsed["hallucination"] in {"yes", "no"}, assistant
        assert isinstance(parsed["thought"], str) and parsed["thought"].strip(), assistant
        assert assistant == repr(parsed), assistant


def test_yes_share(train, evaluation):
    train_yes = sum(verdict(a)["hallucination"] == "yes" for _, a in train) / len(train)
    assert 0.10 <= train_yes <= 0.20, train_yes
    eval_yes = sum(verdict(a)["hallucination"] == "yes" for _, a in evaluation)
    assert 0 < eval_yes < len(evaluation)


def labels(pairs: list[tuple[str, str]]) -> list[str]:
    return [verdict(assistant)["hallucination"] for _, assistant in pairs]


def test_eval_sets_are_balanced_between_yes_and_no(evaluation):
    """Half 'yes', half 'no', so a model that answers one label only scores 50% accuracy, not the majority's share;
    the demo's default eval set is the first 16 rows of the reproduction's and balanced as well."""
    assert labels(evaluation).count("yes") == labels(evaluation).count("no") == len(evaluation) // 2
    demo = rows(DEMO_EVAL)
    assert demo == evaluation[: len(demo)] and len(demo) == 16
    assert labels(demo).count("yes") == labels(demo).count("no") == 8


@pytest.mark.parametrize("split", ["train", "evaluation"])
def test_user_layout(split, request):
    for user, _ in request.getfixturevalue(split):
        assert "<sep>" in user
        assert user.startswith("\n'relatives' : ")
        positions = [user.find("\n" + label) for label in FIELD_LABELS]
        assert all(p >= 0 for p in positions) and positions == sorted(positions), user
        assert "<sep>" in phrasing(user)
        assert query(user)


def test_instruction_phrasings(train, evaluation):
    train_phrasings = {phrasing(u) for u, _ in train}
    eval_phrasings = {phrasing(u) for u, _ in evaluation}
    assert len(train_phrasings) >= 40
    assert len(eval_phrasings) >= 10
    assert not eval_phrasings & train_phrasings


def test_eval_queries_are_held_out(train, evaluation):
    train_queries = {query(u).casefold() for u, _ in train}
    eval_queries = [query(u).casefold() for u, _ in evaluation]
    assert not set(eval_queries) & train_queries
    assert len(set(train_queries)) == len(train)
    assert len(set(eval_queries)) == len(eval_queries)
