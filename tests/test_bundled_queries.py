"""The bundled query set (reproduce_self_sample/query_cache.jsonl): loads, is large enough, unique and varied."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from delia import load_conversations
from delia.data.queries import load_queries

QUERY_FILE = Path(__file__).resolve().parent.parent / "reproduce_self_sample" / "query_cache.jsonl"

# Task types and words whose presence in a query (lower-cased) marks that type; a crude check that the set is spread.
TASK_KEYWORDS = {
    "creative writing": ("poem", "story", "slogan", "haiku", "limerick", "tagline"),
    "coding": ("python", "javascript", "sql", "function", "bug"),
    "math": ("solve", "probability", "calculate", "what is 1", "fraction", "derivative"),
    "advice": ("how can i", "how do i", "tips", "should i"),
    "classification": ("classify", "sentiment", "spam", "categorise", "label"),
    "extraction": ("extract", "list every", "pull out", "find all"),
    "summarisation": ("summarise", "summary", "tl;dr"),
    "rewriting": ("rewrite", "make this", "fix the", "correct the", "paraphrase", "shorten"),
    "brainstorming": ("brainstorm", "ideas", "suggest"),
    "explain to a child": ("eli5", "five-year-old", "like i'm five", "child", "kid"),
    "comparison": ("compare", "difference between", " vs "),
    "open questions": ("why is", "what is the capital", "who wrote", "when did", "which planet", "how many bones"),
}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    with QUERY_FILE.open(encoding="utf-8") as handle:
        text = handle.read()
    assert text.endswith("\n"), "the last line must end with a newline"
    return [json.loads(line) for line in text.splitlines()]


def test_every_row_is_exactly_one_user_and_one_assistant_turn(rows):
    for number, row in enumerate(rows, start=1):
        assert set(row) == {"messages"}, f"line {number}: unexpected fields {sorted(row)}"
        roles = [message["role"] for message in row["messages"]]
        assert roles == ["user", "assistant"], f"line {number}: roles {roles}"
        for message in row["messages"]:
            assert set(message) == {"role", "content"}, f"line {number}: message fields {sorted(message)}"
            assert isinstance(message["content"], str) and message["content"].strip(), f"line {number}: empty"


def test_loads_with_delia():
    dataset = load_conversations(str(QUERY_FILE))  # validates every row
    queries = load_queries(str(QUERY_FILE))  # the reference template needs a reference for each query
    assert len(queries) == len(dataset)  # no row was dropped as a duplicate
    assert len(queries) >= 200
    assert all(query.reference and query.reference.strip() for query in queries)


def test_queries_are_unique(rows):
    normalised = Counter(" ".join(row["messages"][0]["content"].lower().split()) for row in rows)
    repeated = [query for query, count in normalised.items() if count > 1]
    assert not repeated, f"repeated queries: {repeated[:5]}"
    assert len(normalised) >= 200


def test_references_are_not_copies_of_queries(rows):
    for row in rows:
        query, reference = (message["content"].strip() for message in row["messages"])
        assert query != reference, f"reference repeats the query: {query[:60]!r}"


def test_task_types_are_spread(rows):
    queries = [row["messages"][0]["content"].lower() for row in rows]
    hits = {
        task: sum(any(word in query for word in words) for query in queries) for task, words in TASK_KEYWORDS.items()
    }
    covered = [task for task, count in hits.items() if count >= 5]
    assert len(covered) >= 10, f"too few task types with at least 5 queries: {hits}"
    # no single type dominates the set
    assert max(hits.values()) <= len(queries) // 3, f"one task type dominates: {hits}"


def test_lengths_vary(rows):
    lengths = sorted(len(row["messages"][0]["content"]) for row in rows)
    assert lengths[0] < 60, "expected some one-line queries"
    assert lengths[-1] > 300, "expected some queries with a passage or code to work on"
    assert sum(length > 200 for length in lengths) >= 20
