"""Queries the model writes itself (`build_cache(..., generate_queries=N)`, Magpie): the user-turn prefix, the filters,
the queries file, resuming after SIGKILL with no duplicate query, the server backend's completions endpoint, bad input,
and 16 queries from SmolLM2 (real_model)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REAL_MODEL, write_jsonl

from delia.build_cache import build_cache
from delia.build_cache import main as build_cache_main
from delia.data.queries import load_queries, query_id
from delia.data.query_filter import QueryFilter, describe_dropped
from delia.generation.base import request_seed
from delia.generation.magpie import user_turn
from delia.tiny import build_tiny_model, build_tiny_tokenizer

# ----------------------------------------------------------------------------------------------------------------------
# A tiny model that writes short queries: its generation config favours the end of the turn and bans the tokens that
# decode to anything but ASCII letters, digits, spaces and punctuation (a random model otherwise rarely ends a turn)
# ----------------------------------------------------------------------------------------------------------------------


def writer_model(folder: Path, end_bias: float = 1.5) -> Path:
    from transformers import GenerationConfig

    tokenizer = build_tiny_tokenizer("chatml")
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    printable = re.compile(r"[A-Za-z0-9 ,.?!']+")
    banned = [
        index
        for token, index in tokenizer.get_vocab().items()
        if index != tokenizer.eos_token_id and not printable.fullmatch(tokenizer.decode([index]))
    ]
    config = GenerationConfig.from_pretrained(folder)
    config.suppress_tokens = sorted(banned)
    config.sequence_bias = [[[tokenizer.eos_token_id], end_bias]]
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def writer(tmp_path_factory) -> Path:
    return writer_model(tmp_path_factory.mktemp("writer"))


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def word_trigrams(text: str) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))}


def assert_distinct(queries: list[str]) -> None:
    """No two queries the same once normalised, and no pair of word-trigram Jaccard 0.7 or more."""
    normalised = [" ".join(re.findall(r"\w+", query.lower())) for query in queries]
    assert len(set(normalised)) == len(normalised)
    shingles = [word_trigrams(query) for query in queries]
    for i, first in enumerate(shingles):
        for second in shingles[:i]:
            assert len(first & second) / len(first | second) < 0.7


# ----------------------------------------------------------------------------------------------------------------------
# The user-turn prefix, and templates with no user turn to continue
# ----------------------------------------------------------------------------------------------------------------------


def test_user_turn_prefix_and_end_from_the_chat_template():
    chatml = user_turn(build_tiny_tokenizer("chatml"), "tiny")
    assert (chatml.prefix, chatml.end) == ("<|im_start|>user\n", "<|im_end|>")
    llama2 = user_turn(build_tiny_tokenizer("llama2"), "tiny")
    assert (llama2.prefix, llama2.end) == ("<s>[INST] ", "[/INST]")
    with_system = build_tiny_tokenizer("chatml")  # a template that adds its own system prompt keeps it
    with_system.chat_template = "<|im_start|>system\nBe kind.<|im_end|>\n" + with_system.chat_template
    assert user_turn(with_system, "tiny").prefix == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n"


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "puts nothing before a user's words"),
        (
            "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}",
            "leaves out",
        ),
        ("USER: {% for m in messages %}{{ m['content'] }}{% endfor %}", "marks no end of a user turn"),
        ("{{ raise_exception('only system prompts') }}", "cannot render a user message"),
    ],
)
def test_a_template_with_no_user_turn_to_continue_is_one_line_naming_the_model(tmp_path, template, why):
    tokenizer = build_tiny_tokenizer("chatml")
    tokenizer.chat_template = template
    model = build_tiny_model(tokenizer)
    with pytest.raises(ValueError, match=why) as error:
        build_cache(model, None, tmp_path / "cache.jsonl", tokenizer=tokenizer, generate_queries=4, progress=False)
    assert str(error.value).startswith("LlamaForCausalLM: ") and "\n" not in str(error.value)


def test_the_transformers_backend_continues_a_raw_prefix_and_stops_at_a_stop_text():
    from delia.generation.base import SamplingConfig
    from delia.generation.transformers_backend import TransformersBackend

    tokenizer = build_tiny_tokenizer("llama2")  # its end of turn, "[/INST]", is text, not a token
    backend = TransformersBackend(build_tiny_model(tokenizer), tokenizer, batch_size=8)
    prompts = backend.prepare_text(["<s>[INST] "] * 8, [f"query-{n}" for n in range(8)])
    assert prompts[0].token_ids == tokenizer("<s>[INST] ", add_special_tokens=False)["input_ids"]
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0, top_p=0.99, stop=("e",))  # a letter it often writes
    replies = list(backend.stream(prompts, sampling))
    assert all("e" not in reply.text for reply in replies)
    assert any(reply.finish_reason == "stop" and reply.num_tokens < 40 for reply in replies)
    assert all(reply.num_tokens == 40 for reply in replies if reply.finish_reason == "length")


# ----------------------------------------------------------------------------------------------------------------------
# The filters
# ----------------------------------------------------------------------------------------------------------------------


def test_filter_drops_duplicates_near_duplicates_and_degenerate_queries():
    keep = QueryFilter()
    offered = {
        "Write a short poem about the sea.": None,
        "write a SHORT poem about the sea!": "duplicate",
        "Can you write a short poem about the sea?": "near duplicate",
        "What is the capital of France?": None,
        "What is the capital of Peru?": None,  # a different question, though it shares most words
        "Hi there": "too short",
        "   ": "empty",
        "Explain the \ufffd symbol in maths.": "broken characters",
        "the cat the cat the cat the cat sat": "repetitive",
        "Help!!!!!!!!!!!! please me now": "repetitive",
        "1234 5678 == 9999 ++ -- ** x": "mostly not letters",
        "x " * 1200: "too long",
    }
    for text, reason in offered.items():
        assert keep.offer(text) == reason, text
    assert keep.offer("An unfinished but fine question about the weather", finished=False) == "unfinished"
    assert keep.offer("Tell me about whales, please.") is None
    assert sum(keep.dropped.values()) == 10 and keep.dropped["repetitive"] == 2
    assert describe_dropped(keep.dropped).startswith("2 repetitive, ")


def test_near_duplicates_are_found_among_thousands():
    keep = QueryFilter()
    topics = [f"{a} {b}" for a in ("red", "green", "blue", "black", "white") for b in ("cats", "ships", "stars")]
    kept = 0
    for number in range(2000):
        kept += (
            keep.offer(f"Question {number}: what do you know about {topics[number % 15]} and the item {number}?")
            is None
        )
    assert kept == 2000  # each differs in its number (trigram Jaccard below 0.7)
    assert keep.offer("question 1234: What do you know about green ships and the item 1234") == "duplicate"
    assert keep.offer("Question 1234 what do you know about green ships and the item 1234 today") == "near duplicate"


# ----------------------------------------------------------------------------------------------------------------------
# Generation on the tiny model: the queries file, the cache, resuming
# ----------------------------------------------------------------------------------------------------------------------


def test_generated_queries_are_written_then_answered(writer, tmp_path):
    output = tmp_path / "cache.jsonl"
    result = build_cache(str(writer), None, output, generate_queries=12, max_new_tokens=4, keep_degenerate=True)
    queries_file = tmp_path / "cache.jsonl.queries.jsonl"
    written = rows_of(queries_file)
    assert len(written) == 12
    for row in written:
        assert set(row) == {"query", "id", "attempt"} and row["id"] == query_id(row["query"])
        assert row["query"] == row["query"].strip() and "<|im_" not in row["query"] and len(row["query"].split()) >= 3
    assert [row["attempt"] for row in written] == sorted(row["attempt"] for row in written)
    assert_distinct([row["query"] for row in written])
    # the queries file reads back as a query file, and the cache answers each query once, with the plain template
    loaded = load_queries(str(queries_file), query_field="query", need_reference=False)
    assert [query.query for query in loaded] == [row["query"] for row in written]
    cache = rows_of(output)
    assert sorted(row["id"] for row in cache) == sorted(row["id"] for row in written)
    assert {row["messages"][0]["content"] for row in cache} == {row["query"] for row in written}
    meta = json.loads((tmp_path / "cache.jsonl.meta.json").read_text())
    assert meta["template"] == "plain" and meta["queries"] == str(queries_file) and meta["generate_queries"] == 12
    generated = meta["counts"]["generated_queries"]
    assert generated["kept"] == 12 and generated["attempts"] == 12 + sum(generated["dropped"].values())
    queries_meta = json.loads((tmp_path / "cache.jsonl.queries.meta.json").read_text())
    assert queries_meta["end_of_turn"] == "<|im_end|>" and queries_meta["prefix"] == "<|im_start|>user\n"
    assert queries_meta["sampling"]["temperature"] == 1.0 and queries_meta["sampling"]["top_p"] == 0.99
    assert result.summary().startswith("12 of 12 queries generated (")


def test_the_same_seed_writes_the_same_queries_and_a_larger_count_extends_them(writer, tmp_path):
    quick = dict(max_new_tokens=2, keep_degenerate=True, progress=False)
    first = build_cache(str(writer), None, tmp_path / "a.jsonl", generate_queries=8, **quick)
    assert first.generated_queries["kept"] == 8
    build_cache(str(writer), None, tmp_path / "b.jsonl", generate_queries=8, **quick)
    a, b = rows_of(tmp_path / "a.jsonl.queries.jsonl"), rows_of(tmp_path / "b.jsonl.queries.jsonl")
    assert a == b
    more = build_cache(str(writer), None, tmp_path / "a.jsonl", generate_queries=20, **quick)
    extended = rows_of(tmp_path / "a.jsonl.queries.jsonl")
    assert extended[:8] == a and len(extended) == 20 and more.skipped_already_done == 8 and more.written == 20 - 8
    assert_distinct([row["query"] for row in extended])
    again = build_cache(str(writer), None, tmp_path / "a.jsonl", generate_queries=20, **quick)
    assert again.written == 0 and again.generated_queries["kept"] == 20 and again.generated_queries["tokens"] == 0
    assert len(rows_of(tmp_path / "a.jsonl")) == 20


def test_a_model_with_no_usable_query_stops_after_a_bounded_number_of_tries(writer, tmp_path):
    output = tmp_path / "cache.jsonl"
    with pytest.raises(ValueError) as error:  # one token per query: every candidate is empty or unfinished
        build_cache(
            str(writer), None, output, generate_queries=10, query_max_new_tokens=1, query_tries=3, progress=False
        )
    message = str(error.value)
    assert "wrote no usable query: 30 candidates tried, all dropped (" in message and "unfinished" in message
    counts = re.findall(r"(\d+) (empty|unfinished)", message)
    assert sum(int(count) for count, _ in counts) == 30
    assert not output.exists()


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("kill_after_queries", [1, 40])
def test_sigkill_while_generating_then_restart_keeps_every_query_once(writer, tmp_path, kill_after_queries):
    output = tmp_path / "cache.jsonl"
    queries_file = tmp_path / "cache.jsonl.queries.jsonl"
    command = [sys.executable, "-m", "delia.build_cache", str(writer), str(output), "--generate_queries", "150"]
    command += ["--batch-size", "1", "--max-new-tokens", "2", "--keep-degenerate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _count_lines(queries_file) < kill_after_queries and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    before = _count_lines(queries_file)
    assert kill_after_queries <= before < 150 and not output.exists()  # killed while generating

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    written = rows_of(queries_file)
    assert len(written) == 150 and len({row["id"] for row in written}) == 150
    assert_distinct([row["query"] for row in written])
    attempts = [row["attempt"] for row in written]
    assert attempts == sorted(attempts) and len(set(attempts)) == 150  # no candidate number used twice
    cache_ids = [row["id"] for row in rows_of(output)]
    assert sorted(cache_ids) == sorted(row["id"] for row in written)


# ----------------------------------------------------------------------------------------------------------------------
# The server backend: the raw prefix goes to /v1/completions
# ----------------------------------------------------------------------------------------------------------------------


def test_server_backend_generates_through_the_completions_endpoint(writer, tmp_path):
    from test_openai_backend import Stub, completion

    words = ["whales", "volcanoes", "bread", "chess", "rivers", "comets", "violins", "deserts"]

    def respond(number: int, body: dict) -> tuple[int, dict]:
        if "prompt" in body:  # a text completion: the n-th query, then one repeated
            subject = words[number - 1] if number <= len(words) else words[0]
            return 200, {"choices": [{"index": 0, "text": f"Tell me about {subject} please.", "finish_reason": "stop"}]}
        return 200, completion("An answer.")

    server = Stub(respond)
    try:
        output = tmp_path / "cache.jsonl"
        result = build_cache(
            str(writer), None, output, generate_queries=6, base_urls=[server.url], concurrency=1, progress=False
        )
    finally:
        server.close()
    text_requests = [body for path, body in server.requests if path == "/v1/completions"]
    assert len(text_requests) >= 6
    first = text_requests[0]
    assert first["prompt"] == "<|im_start|>user\n" and first["stop"] == ["<|im_end|>"] and "messages" not in first
    assert first["temperature"] == 1.0 and first["top_p"] == 0.99 and first["seed"] == request_seed(0, "query-0")
    assert [row["query"] for row in rows_of(tmp_path / "cache.jsonl.queries.jsonl")] == [
        f"Tell me about {subject} please." for subject in words[:6]
    ]
    assert result.written == 6 and result.backend == "openai"


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-3", "ten", "2.5"])
def test_a_bad_count_is_one_line_naming_the_option(tmp_path, capsys, value):
    try:  # argparse refuses a non-number (SystemExit 2), build_cache a number below 1 (status 2)
        status = build_cache_main(["some-model", str(tmp_path / "cache.jsonl"), "--generate_queries", value])
    except SystemExit as exit_info:
        status = exit_info.code
    error = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in error and "generate_queries" in error and value in error
    assert not (tmp_path / "cache.jsonl").exists()


@pytest.mark.parametrize("value", [0, -1, True, "8"])
def test_a_bad_count_in_python_names_the_option(tmp_path, value):
    with pytest.raises(ValueError, match="generate_queries must be a positive integer"):
        build_cache("some-model", None, tmp_path / "cache.jsonl", generate_queries=value)


def test_a_query_file_and_generate_queries_together_are_refused(tmp_path, capsys):
    queries = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "Hi?"}]}])
    status = build_cache_main(["some-model", str(queries), str(tmp_path / "c.jsonl"), "--generate_queries", "5"])
    error = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in error and "either a query file or generate_queries" in error
    assert build_cache_main(["some-model", str(tmp_path / "c.jsonl")]) == 2
    assert "no queries: give a query file" in capsys.readouterr().err
    assert build_cache_main(["some-model"]) == 2
    assert "missing OUTPUT" in capsys.readouterr().err
    assert not (tmp_path / "c.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_writes_16_distinct_queries(offline_cache, tmp_path):
    from delia.models import resolve_model

    output = tmp_path / "cache.jsonl"
    result = build_cache(
        resolve_model(REAL_MODEL), None, output, generate_queries=16, max_new_tokens=16, dtype="bfloat16", batch_size=16
    )
    queries = [row["query"] for row in rows_of(tmp_path / "cache.jsonl.queries.jsonl")]
    assert len(queries) == 16
    assert_distinct(queries)
    for query in queries:
        assert 3 <= len(query.split()) and len(query) <= 2000
        assert "<|im_" not in query and "\ufffd" not in query and not query.lower().startswith(("user\n", "assistant"))
    generated = result.generated_queries
    assert generated["kept"] == 16 and generated["attempts"] <= 4 * 16
    assert result.written + result.dropped_degenerate == 16 and result.written > 0
