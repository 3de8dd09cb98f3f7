"""build_cache: prompts (golden strings), decoding, durability (SIGKILL, truncated tail), sharding, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import conversation, write_jsonl

from delia import DataFormatError
from delia.build_cache import build_cache
from delia.cli import main as cli_main
from delia.data.queries import load_queries, query_id
from delia.generation.base import SamplingConfig, request_seed
from delia.generation.prompts import PromptRenderer, build_conversation
from delia.generation.transformers_backend import TransformersBackend
from delia.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_model

SYSTEM = "Be brief."


def queries(count: int) -> list[dict]:
    return [
        conversation(f"Question {i}: name a colour of the sea.", f"Reference {i}: blue or grey.") for i in range(count)
    ]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), "chatml")


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------------

GOLDEN = {
    (
        "llama2",
        "reference",
    ): "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST] Four. </s><s>[INST] What is 2+2? [/INST]",
    ("llama2", "plain"): "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST]",
    ("chatml", "reference"): (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nFour.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    ),
    ("chatml", "plain"): (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    ),
}


@pytest.mark.parametrize(("chat_template", "template"), list(GOLDEN))
def test_prompts_match_golden_strings(chat_template, template):
    renderer = PromptRenderer(build_tiny_tokenizer(chat_template))
    messages = build_conversation("What is 2+2?", "Four.", template, SYSTEM)
    assert renderer.render(messages) == GOLDEN[(chat_template, template)]


def test_template_without_system_role_gets_the_system_text_folded():
    tokenizer = build_tiny_tokenizer("chatml")
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<turn>{{ m['role'] }}\n{{ m['content'] }}</turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<turn>assistant\n{% endif %}"
    )
    renderer = PromptRenderer(tokenizer)
    prompt = renderer.render(build_conversation("Hi?", None, "plain", SYSTEM))
    assert prompt == "<turn>user\nBe brief.\n\nHi?</turn>\n<turn>assistant\n"
    assert renderer.fold_system is True


def test_only_new_tokens_are_decoded_and_left_padding_is_harmless():
    tokenizer = build_tiny_tokenizer("llama2")
    model = build_tiny_model(tokenizer).eval()
    backend = TransformersBackend(model, tokenizer, batch_size=2)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    short = build_conversation("Hi", None, "plain", None)
    long = build_conversation("Write a short poem about the sea and the gulls over the harbour", None, "plain", None)
    together = backend.generate([short, long], greedy)
    for messages, reply in zip([short, long], together, strict=True):
        ids = backend.prepare([messages], ["0"])[0].token_ids
        with torch.no_grad():
            full = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist()
        new = full[len(ids) :]
        assert reply.text == tokenizer.decode(new, skip_special_tokens=True)  # the prompt is not in the reply
        assert reply.num_tokens == len(new) and reply.finish_reason in {"stop", "length"}


# ----------------------------------------------------------------------------------------------------------------------
# Runs: the original call, resume, repair, refusal to overwrite
# ----------------------------------------------------------------------------------------------------------------------


def test_original_call_signature_and_output_format(tiny_model_dir, tmp_path):
    query_file = write_jsonl(tmp_path / "query_cache.jsonl", queries(10), trailing_newline=False)
    output = tmp_path / "self_sample_cache.jsonl"
    returned = build_cache(str(tiny_model_dir), str(query_file), str(output))  # the original three positionals
    assert os.fspath(returned) == str(returned) == returned.path == str(output)  # stands for the path, as before
    rows = rows_of(output)
    meta = json.loads(Path(f"{output}.meta.json").read_text())
    assert returned.counts() == meta["counts"] and returned.backend == meta["backend"] == "transformers"
    assert meta["counts"]["written"] == len(rows) and meta["counts"]["queries"] == 10
    assert meta["counts"]["written"] + meta["counts"]["dropped_degenerate"] == 10
    assert meta["template"] == "reference" and meta["sampling"]["max_new_tokens"] == 512 and meta["versions"]["torch"]
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant" and assistant["content"].strip()
        assert row["id"] == query_id(user["content"])


def test_resume_skips_done_rows_and_refuses_to_overwrite(tiny_model_dir, tmp_path):
    query_file = write_jsonl(tmp_path / "q.jsonl", queries(12))
    output = tmp_path / "cache.jsonl"
    options = {"max_new_tokens": 4, "batch_size": 4, "keep_degenerate": True, "progress": False}
    build_cache(tiny_model_dir, query_file, output, limit=5, **options)
    first = output.read_text()
    build_cache(tiny_model_dir, query_file, output, **options)
    assert output.read_text().startswith(first)  # appended, nothing rewritten
    ids = [row["id"] for row in rows_of(output)]
    assert len(ids) == len(set(ids)) == 12
    assert json.loads(Path(f"{output}.meta.json").read_text())["counts"]["skipped_already_done"] == 5
    with pytest.raises(FileExistsError, match="overwrite"):
        build_cache(tiny_model_dir, query_file, output, resume=False, **options)
    assert len(rows_of(output)) == 12
    build_cache(tiny_model_dir, query_file, output, resume=False, overwrite=True, limit=3, **options)
    assert len(rows_of(output)) == 3


def test_truncated_last_line_is_repaired_and_kept(tiny_model_dir, tmp_path):
    query_file = write_jsonl(tmp_path / "q.jsonl", queries(6))
    output = tmp_path / "cache.jsonl"
    options = {"max_new_tokens": 4, "keep_degenerate": True, "progress": False}
    build_cache(tiny_model_dir, query_file, output, limit=3, **options)
    good = output.read_bytes()
    fragment = b'{"messages": [{"role": "user", "content": "Question 3'
    output.write_bytes(good + fragment)  # what a kill in the middle of a write leaves
    build_cache(tiny_model_dir, query_file, output, **options)
    assert output.read_bytes().startswith(good)
    assert Path(f"{output}.partial").read_bytes() == fragment + b"\n"  # moved aside, not lost
    ids = [row["id"] for row in rows_of(output)]
    assert len(ids) == len(set(ids)) == 6

    # a complete last row that only lacks its newline is kept as it is, not answered again
    complete = output.read_bytes().rstrip(b"\n")
    output.write_bytes(complete)
    build_cache(tiny_model_dir, query_file, output, **options)
    assert output.read_bytes() == complete + b"\n"


def test_one_process_resumes_what_a_killed_two_process_run_left(tiny_model_dir, tmp_path):
    """Shards from an earlier run (a partial last line in one) are repaired, skipped, and merged into the output."""
    query_file = write_jsonl(tmp_path / "q.jsonl", queries(6))
    output = tmp_path / "cache.jsonl"
    options = {"max_new_tokens": 4, "keep_degenerate": True, "progress": False}
    build_cache(tiny_model_dir, query_file, output, limit=2, **options)
    first_two = rows_of(output)
    output.unlink()
    shard = tmp_path / "cache.jsonl.shard-00001-of-00002"  # rank 1 of 2 had answered two queries, then was killed
    fragment = b'{"messages": [{"role": "user", "content": "Quest'
    shard.write_bytes("".join(json.dumps(row) + "\n" for row in first_two).encode() + fragment)
    build_cache(tiny_model_dir, query_file, output, **options)
    rows = rows_of(output)
    assert [row["id"] for row in rows] == [query_id(q["messages"][0]["content"]) for q in queries(6)]
    assert rows[:2] == first_two  # the shard's rows were kept, not answered again
    assert not shard.exists() and Path(f"{shard}.partial").read_bytes() == fragment + b"\n"


def test_merging_keeps_rows_without_an_id(tmp_path):
    from delia.cache_writer import merge_shards

    output = tmp_path / "cache.jsonl"
    write_jsonl(output, [{"id": "b", "n": 1}, {"n": 2}, {"n": 3}])
    write_jsonl(tmp_path / "cache.jsonl.shard-00000-of-00001", [{"id": "a", "n": 4}, {"id": "b", "n": 5}])
    assert merge_shards(str(output), {"a": 0, "b": 1}) == 4
    assert [row["n"] for row in rows_of(output)] == [4, 1, 2, 3]


def test_json_sidecar_is_synced_then_replaced_in_one_step(tmp_path, monkeypatch):
    from delia.io import write_json_atomically

    synced: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd))[1])
    path = tmp_path / "cache.jsonl.meta.json"
    write_json_atomically(str(path), {"rows": 1})
    assert json.loads(path.read_text()) == {"rows": 1} and len(synced) == 1  # on disk before it replaces the old one
    with pytest.raises(TypeError):
        write_json_atomically(str(path), {"rows": object()})  # fails midway
    assert json.loads(path.read_text()) == {"rows": 1}  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == [path.name]  # and no temporary file is left behind


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("kill_after_rows", [1, 30, 90])
def test_sigkill_at_any_point_then_restart_answers_every_query_once(tiny_model_dir, tmp_path, kill_after_rows):
    query_file = write_jsonl(tmp_path / "q.jsonl", queries(120))
    output = tmp_path / "cache.jsonl"
    command = [sys.executable, "-m", "delia.build_cache", str(tiny_model_dir), str(query_file), str(output)]
    command += ["--batch-size", "1", "--max-new-tokens", "16", "--keep-degenerate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _count_lines(output) < kill_after_rows and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    written_before = _count_lines(output)
    assert written_before >= kill_after_rows and written_before < 120  # killed mid-run

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert finished.returncode == 0, finished.stderr[-2000:]
    rows = rows_of(output)  # every line is valid JSON
    ids = [row["id"] for row in rows]
    assert sorted(ids) == sorted(query_id(q["messages"][0]["content"]) for q in queries(120))
    assert len(ids) == len(set(ids))


# ----------------------------------------------------------------------------------------------------------------------
# Two processes
# ----------------------------------------------------------------------------------------------------------------------


def test_two_processes_shard_and_merge_in_query_order(tiny_model_dir, tmp_path):
    query_file = write_jsonl(tmp_path / "q.jsonl", queries(17))
    output = tmp_path / "cache.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "delia.build_cache", str(tiny_model_dir), str(query_file), str(output)]
    command += ["--max-new-tokens", "4", "--batch-size", "4", "--keep-degenerate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [query_id(q["messages"][0]["content"]) for q in queries(17)]
    assert [row["id"] for row in rows_of(output)] == expected  # merged, in query order, each once
    assert not list(tmp_path.glob("cache.jsonl.shard-*"))
    meta = json.loads(Path(f"{output}.meta.json").read_text())
    assert meta["counts"]["processes"] == 2 and meta["counts"]["written"] == 17


# ----------------------------------------------------------------------------------------------------------------------
# Queries from fields, and bad input
# ----------------------------------------------------------------------------------------------------------------------


def test_alpaca_style_fields_and_duplicates(tmp_path):
    rows = [
        {"instruction": "Translate to French", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a prime", "input": "", "output": "7"},
        {"instruction": "Name a prime", "input": "", "output": "11"},
    ]
    loaded = load_queries(write_jsonl(tmp_path / "alpaca.jsonl", rows))
    assert [q.query for q in loaded] == ["Translate to French\n\nGood morning", "Name a prime"]
    assert [q.reference for q in loaded] == ["Bonjour", "7"]
    custom = [{"q": "Why is the sky blue?", "a": "Scattering."}]
    loaded = load_queries(write_jsonl(tmp_path / "custom.jsonl", custom), query_field="q", reference_field="a")
    assert loaded[0].query == "Why is the sky blue?" and loaded[0].reference == "Scattering."


def test_bad_inputs_get_clear_errors_and_nothing_is_lost(tiny_model_dir, tmp_path):
    good = write_jsonl(tmp_path / "q.jsonl", queries(3))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        build_cache(tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "out.jsonl")
    missing_field = write_jsonl(tmp_path / "fields.jsonl", [{"q": "a", "a": "b"}, {"q": "", "a": "c"}])
    with pytest.raises(DataFormatError, match=r"fields.jsonl, line 2: field 'q' is missing or empty"):
        build_cache(tiny_model_dir, missing_field, tmp_path / "out.jsonl", query_field="q", reference_field="a")
    bad_row = write_jsonl(tmp_path / "bad.jsonl", [*queries(2), {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl, line 3"):
        build_cache(tiny_model_dir, bad_row, tmp_path / "out.jsonl")
    with pytest.raises(OSError, match="could not load model"):
        build_cache(tmp_path / "no-model", good, tmp_path / "out.jsonl")
    with pytest.raises(ValueError, match="max_new_tokens"):
        build_cache(tiny_model_dir, good, tmp_path / "out.jsonl", max_new_tokens=0)
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_text()


def test_a_row_the_chat_template_cannot_render_is_named(tmp_path):
    tokenizer = build_tiny_tokenizer("chatml")
    tokenizer.chat_template = (
        "{% for m in messages %}{% if 'FORBIDDEN' in m['content'] %}{{ raise_exception('no such word') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    model_dir = save_tiny_model(tmp_path / "model", tokenizer=tokenizer)
    rows = [*queries(3), conversation("This one says FORBIDDEN.", "ok")]
    query_file = write_jsonl(tmp_path / "q.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"q.jsonl, line 4: the chat template failed to render .*no such word"):
        build_cache(model_dir, query_file, tmp_path / "out.jsonl", system_prompt=None, progress=False)


def test_cli_reports_bad_input_in_one_line(tiny_model_dir, tmp_path, capsys):
    code = cli_main(["build-cache", str(tiny_model_dir), str(tmp_path / "nope.jsonl"), str(tmp_path / "o.jsonl")])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("delia build-cache: error:") and "nope.jsonl" in error and "\n" not in error


def test_cli_prints_the_summary_from_the_result(tiny_model_dir, tmp_path, capsys, monkeypatch):
    query_file = write_jsonl(tmp_path / "q.jsonl", queries(3))
    output = tmp_path / "o.jsonl"
    arguments = ["build-cache", str(tiny_model_dir), str(query_file), str(output), "--max-new-tokens", "3"]
    module = sys.modules["delia.build_cache"]  # (`delia.build_cache` is also the function's name)
    monkeypatch.setattr(module, "write_json_atomically", lambda path, payload: None)  # no meta.json to read back
    assert cli_main([*arguments, "--limit", "2", "--keep-degenerate"]) == 0
    assert capsys.readouterr().out.startswith(f"{output}: 2 rows written, 0 skipped as already done, 0 dropped")


def test_backend_options_in_one_object_or_as_keywords(tiny_model_dir, tmp_path):
    from delia.generation.factory import BackendOptions

    query_file = write_jsonl(tmp_path / "q.jsonl", queries(3))
    options = BackendOptions("transformers", batch_size=2)
    result = build_cache(tiny_model_dir, query_file, tmp_path / "a.jsonl", backend=options, max_new_tokens=3)
    meta = json.loads((tmp_path / "a.jsonl.meta.json").read_text())
    assert result.backend == meta["backend"] == "transformers" and meta["batch_size"] == 2
    build_cache(tiny_model_dir, query_file, tmp_path / "b.jsonl", backend=options, batch_size=1, max_new_tokens=3)
    assert json.loads((tmp_path / "b.jsonl.meta.json").read_text())["batch_size"] == 1  # a keyword given wins
    with pytest.raises(TypeError, match="unexpected keyword argument 'batchsize'"):
        build_cache(tiny_model_dir, query_file, tmp_path / "c.jsonl", batchsize=2)
    with pytest.raises(ValueError, match="concurrency must be a positive integer, got 0"):
        build_cache(tiny_model_dir, query_file, tmp_path / "c.jsonl", concurrency=0)
    with pytest.raises(ValueError, match="backend must be one of auto, transformers, vllm, openai; got 'tgi'"):
        build_cache(tiny_model_dir, query_file, tmp_path / "c.jsonl", backend="tgi")
    assert not (tmp_path / "c.jsonl").exists()


def test_sampled_batches_get_their_own_seeds_and_repeat_exactly(tiny_model_dir, tmp_path, monkeypatch):
    seeds: list[int] = []
    manual_seed = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda seed: (seeds.append(seed), manual_seed(seed))[1])
    query_file = write_jsonl(tmp_path / "q.jsonl", queries(6))
    options = {"batch_size": 2, "max_new_tokens": 4, "keep_degenerate": True, "progress": False}
    build_cache(tiny_model_dir, query_file, tmp_path / "a.jsonl", **options)
    ids = [row["id"] for row in rows_of(tmp_path / "a.jsonl")]  # in the order they were answered
    assert seeds == [request_seed(0, ids[0]), request_seed(0, ids[2]), request_seed(0, ids[4])]  # the batch's first
    assert len(set(seeds)) == 3  # every batch its own
    first_run, seeds[:] = list(seeds), []
    build_cache(tiny_model_dir, query_file, tmp_path / "b.jsonl", **options)
    assert seeds == first_run  # the same batches get the same seeds on a rerun
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()  # so the replies repeat
    build_cache(tiny_model_dir, query_file, tmp_path / "c.jsonl", **{**options, "seed": 1})
    assert (tmp_path / "c.jsonl").read_bytes() != (tmp_path / "a.jsonl").read_bytes()  # and another seed differs


def test_a_resumed_run_samples_each_query_as_a_fresh_run_does(tiny_model_dir, tmp_path):
    """A request's seed comes from its query id, not from its place in the run."""
    query_file = write_jsonl(tmp_path / "q.jsonl", queries(6))
    options = {"batch_size": 1, "max_new_tokens": 6, "keep_degenerate": True, "progress": False}
    build_cache(tiny_model_dir, query_file, tmp_path / "fresh.jsonl", **options)
    build_cache(tiny_model_dir, query_file, tmp_path / "resumed.jsonl", limit=2, **options)
    build_cache(tiny_model_dir, query_file, tmp_path / "resumed.jsonl", **options)
    fresh, resumed = rows_of(tmp_path / "fresh.jsonl"), rows_of(tmp_path / "resumed.jsonl")
    assert len(fresh) == 6 and sorted(fresh, key=lambda row: row["id"]) == sorted(resumed, key=lambda row: row["id"])


def test_seed_rule():
    seeds = {request_seed(seed, request_id) for seed in range(3) for request_id in ("0", "1", "0123456789abcdef")}
    assert len(seeds) == 9 and all(0 <= seed < 2**31 for seed in seeds)
    assert request_seed(0, "1") == request_seed(0, "1")  # no process-dependent hashing


def test_each_prompt_is_rendered_and_tokenized_once(tiny_model_dir, tmp_path, monkeypatch):
    """The token ids that sort the prompts are the ones generation starts from: no second rendering or tokenizing."""
    from transformers import PreTrainedTokenizerBase

    rendered: list[str] = []
    render = PromptRenderer.render
    monkeypatch.setattr(
        PromptRenderer,
        "render",
        lambda self, messages, index=0: (rendered.append(messages[-1]["content"]), render(self, messages, index))[1],
    )
    tokenizer_calls: list[int] = []
    tokenize = PreTrainedTokenizerBase.__call__
    monkeypatch.setattr(
        PreTrainedTokenizerBase,
        "__call__",
        lambda self, text, **options: (tokenizer_calls.append(len(text)), tokenize(self, text, **options))[1],
    )
    query_file = write_jsonl(tmp_path / "q.jsonl", queries(5))
    build_cache(tiny_model_dir, query_file, tmp_path / "out.jsonl", batch_size=2, max_new_tokens=3, progress=False)
    assert sorted(rendered) == sorted(q["messages"][0]["content"] for q in queries(5))  # once each
    assert tokenizer_calls == [5]  # one call for all five prompts, sorting and generation included


def test_generation_leaves_the_callers_rng_and_training_mode_alone():
    """Probing a model mid-training (as examples/train_dsft.py does) must not reseed the run or leave dropout off."""
    tokenizer = build_tiny_tokenizer("chatml")
    model = build_tiny_model(tokenizer).train()
    backend = TransformersBackend(model, tokenizer, batch_size=2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    backend.generate([[{"role": "user", "content": "Hi"}]], SamplingConfig(max_new_tokens=3, temperature=0.7))
    assert torch.equal(torch.rand(3), expected) and model.training


def test_several_samples_per_query_are_distinct_rows_and_resume_from_one(tiny_model_dir, tmp_path):
    """samples_per_query: k rows per query (ids <id>, <id>-1, ...), sampled apart; a one-sample cache is reused."""
    query_file = write_jsonl(tmp_path / "q.jsonl", queries(4))
    options = {"batch_size": 1, "max_new_tokens": 8, "keep_degenerate": True, "progress": False}
    output = tmp_path / "cache.jsonl"
    build_cache(tiny_model_dir, query_file, output, **options)
    first = output.read_text()
    result = build_cache(tiny_model_dir, query_file, output, samples_per_query=3, **options)
    assert output.read_text().startswith(first) and result.skipped_already_done == 4 and result.queries == 12
    rows = rows_of(output)
    base_ids = [query_id(row["messages"][0]["content"]) for row in rows[:4]]
    assert sorted(row["id"] for row in rows) == sorted(f"{i}{suffix}" for i in base_ids for suffix in ("", "-1", "-2"))
    replies = {}
    for row in rows:
        replies.setdefault(row["messages"][0]["content"], set()).add(row["messages"][1]["content"])
    assert len(replies) == 4 and all(len(texts) > 1 for texts in replies.values())  # sampled, not copied
    with pytest.raises(ValueError, match="samples_per_query must be a positive integer, got 0"):
        build_cache(tiny_model_dir, query_file, output, samples_per_query=0, **options)
