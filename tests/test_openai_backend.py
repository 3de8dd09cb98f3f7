"""OpenAIBackend against a real `transformers serve` (tiny local model) and against tiny stub servers."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from delia.data.queries import query_id
from delia.generation.base import Generation, SamplingConfig, request_seed
from delia.generation.openai_backend import OpenAIBackend, ServerRequestError, ServerUnreachableError
from delia.tiny import save_tiny_model

SAMPLING = SamplingConfig(max_new_tokens=8, temperature=0.7, top_p=0.95, seed=3)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def completion(text: str, finish_reason: str = "stop", tokens: int | None = 2) -> dict:
    usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens} if tokens else None
    message = {"role": "assistant", "content": text}
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": usage,
    }


# ---------------------------------------------------------------------------------------------------------------------
# A real server: `transformers serve` on the tiny model


@pytest.fixture
def transformers_server(tmp_path):
    """Serve the tiny ChatML model with `transformers serve`; yields (base_url, model name, startup seconds)."""
    for module in ("fastapi", "uvicorn", "openai"):  # what `pip install "transformers[serving]"` brings
        pytest.importorskip(module)
    model_dir = save_tiny_model(tmp_path / "tiny-chatml", "chatml")

    port = free_port()
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp_path / "serve.log", "wb")  # closed in the finaliser
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        start, base_url = time.monotonic(), f"http://127.0.0.1:{port}"
        while True:  # the model is preloaded before uvicorn starts, so /health answering means ready
            if server.poll() is not None:
                pytest.fail(f"transformers serve exited with {server.returncode}:\n{read_log(tmp_path)}")
            if time.monotonic() - start > 120:
                pytest.fail(f"transformers serve not ready after 120 s:\n{read_log(tmp_path)}")
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        yield base_url, str(model_dir), time.monotonic() - start
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def read_log(tmp_path) -> str:
    return (tmp_path / "serve.log").read_text(errors="replace")[-4000:]


def test_transformers_serve(transformers_server):
    base_url, model_name, startup = transformers_server
    backend = OpenAIBackend(model_name, base_url + "/v1", concurrency=3, timeout=60, max_retries=1)
    replies = backend.generate(
        [chat("Write a short poem about the sea."), chat("What is 12 times 7?"), chat("Hi")], SAMPLING
    )
    backend.close()
    assert len(replies) == 3, f"server took {startup:.1f} s to start"
    for reply in replies:
        assert isinstance(reply, Generation) and isinstance(reply.text, str)
        assert 1 <= reply.num_tokens <= 8
        assert reply.finish_reason in {"stop", "length"}


# ---------------------------------------------------------------------------------------------------------------------
# Stub servers: http.server in a thread, answering with `respond(number_of_the_request, request_body)`


class Stub:
    """A local HTTP server; `respond(n, body) -> (status, json_body)` decides each answer; `requests` records them.

    `max_in_flight` is the most requests it was ever answering at once.
    """

    def __init__(self, respond: Callable[[int, dict], tuple[int, dict]]):
        self.requests: list[tuple[str, dict]] = []
        self.in_flight = self.max_in_flight = 0
        lock, stub = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    stub.requests.append((self.path, body))
                    number = len(stub.requests)
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    status, answer = respond(number, body)
                finally:
                    with lock:  # before the reply goes out: the client's next request can come straight after it
                        stub.in_flight -= 1
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep the test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    """stub(respond) starts a Stub; all are shut down after the test."""
    started: list[Stub] = []

    def start(respond: Callable[[int, dict], tuple[int, dict]]) -> Stub:
        started.append(Stub(respond))
        return started[-1]

    yield start
    for server in started:
        server.close()


def echo(number: int, body: dict) -> tuple[int, dict]:
    return 200, completion(body["messages"][-1]["content"])


def test_retries_on_503_then_succeeds(stub):
    server = stub(lambda n, body: (503, {"error": "loading"}) if n <= 2 else echo(n, body))
    backend = OpenAIBackend("tiny", server.url, max_retries=3, backoff=0.01)
    [reply] = backend.generate([chat("hello")], SAMPLING)
    assert reply == Generation(text="hello", num_tokens=2, finish_reason="stop")
    assert len(server.requests) == 3
    path, body = server.requests[-1]
    assert path == "/v1/chat/completions"
    assert body == {
        "model": "tiny",
        "messages": chat("hello"),
        "max_tokens": 8,
        "temperature": 0.7,
        "top_p": 0.95,
        "seed": request_seed(3, "0"),  # the run's seed and the request's id (its position, in a plain generate call)
        "n": 1,
    }


def test_client_error_is_raised_at_once(stub):
    error = {"error": {"message": "temperature must be non-negative", "type": "invalid_request_error"}}
    server = stub(lambda n, body: (400, error))
    backend = OpenAIBackend("tiny", server.url, max_retries=3, backoff=0.01)
    with pytest.raises(ServerRequestError) as raised:
        backend.generate([chat("hello")], SAMPLING)
    assert len(server.requests) == 1
    message = str(raised.value)
    assert "400" in message and "temperature must be non-negative" in message and server.url in message


def test_unreachable_server(stub):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    backend = OpenAIBackend("tiny", url, max_retries=2, backoff=0.01, timeout=5)
    start = time.monotonic()
    with pytest.raises(ServerUnreachableError) as raised:
        backend.generate([chat("hello")], SAMPLING)
    assert time.monotonic() - start < 5
    assert isinstance(raised.value, ConnectionError)
    assert url in str(raised.value) and "3 attempt" in str(raised.value)


def test_requests_spread_over_servers(stub):
    first, second = stub(echo), stub(echo)
    backend = OpenAIBackend("tiny", [first.url + "/", second.url + "/v1"], concurrency=2)
    replies = backend.generate([chat(str(i)) for i in range(6)], SAMPLING)
    assert [reply.text for reply in replies] == [str(i) for i in range(6)]
    assert len(first.requests) == 3 and len(second.requests) == 3
    assert {path for path, _ in first.requests + second.requests} == {"/v1/chat/completions"}


def test_a_slow_reply_holds_back_the_order_not_the_sending(stub):
    more_arrived = threading.Event()
    held: list[bool] = []

    def first_waits(number: int, body: dict) -> tuple[int, dict]:
        if number >= 6:
            more_arrived.set()
        if body["messages"][-1]["content"] == "0":
            held.append(more_arrived.wait(10))  # answered only once five later requests have come in
        return echo(number, body)

    server = stub(first_waits)
    replies = OpenAIBackend("tiny", server.url, concurrency=2).generate([chat(str(i)) for i in range(8)], SAMPLING)
    assert [reply.text for reply in replies] == [str(i) for i in range(8)]  # yielded in order all the same
    assert held == [True] and server.max_in_flight == 2


def test_a_failure_behind_a_slow_reply_still_yields_every_reply_before_it(stub):
    """Request 3 fails while request 0 is still being answered: 0, 1 and 2 come out, then the error."""
    failed = threading.Event()

    def slow_first_then_refuse_third(number: int, body: dict) -> tuple[int, dict]:
        text = body["messages"][-1]["content"]
        if text == "0":
            failed.wait(10)  # answered only after request 3 was refused
        if text == "3":
            failed.set()
            return 400, {"error": {"message": "refused"}}
        return echo(number, body)

    server = stub(slow_first_then_refuse_third)
    backend = OpenAIBackend("tiny", server.url, concurrency=4)
    prompts = backend.prepare([chat(str(i)) for i in range(8)], [str(i) for i in range(8)])
    seen = []
    with pytest.raises(ServerRequestError, match="refused"):
        for reply in backend.stream(prompts, SAMPLING):
            seen.append(reply.text)
    assert seen == ["0", "1", "2"] and failed.is_set()


def test_replies_keep_input_order(stub):
    answered: list[str] = []

    def slow_first(number: int, body: dict) -> tuple[int, dict]:
        text = body["messages"][-1]["content"]
        if text == "0":
            time.sleep(0.5)
        answered.append(text)
        return 200, completion(text, finish_reason="length" if text == "1" else "stop", tokens=None)

    server = stub(slow_first)
    replies = OpenAIBackend("tiny", server.url, concurrency=4).generate([chat(str(i)) for i in range(4)], SAMPLING)
    assert [reply.text for reply in replies] == ["0", "1", "2", "3"]
    assert [reply.finish_reason for reply in replies] == ["stop", "length", "stop", "stop"]
    assert [reply.num_tokens for reply in replies] == [1, 1, 1, 1]  # no usage: counted from the text
    assert answered[-1] == "0"  # the first request was answered last
    seeds = {body["messages"][-1]["content"]: body["seed"] for _, body in server.requests}
    assert seeds == {str(i): request_seed(3, str(i)) for i in range(4)}


# ---------------------------------------------------------------------------------------------------------------------
# build_cache through the HTTP backend


def test_build_cache_through_transformers_serve(transformers_server, tmp_path):
    from conftest import conversation, write_jsonl

    from delia import build_cache

    base_url, model_name, _ = transformers_server
    rows = [conversation(f"Question {i}: name a bird.", f"Reference {i}: a gull.") for i in range(5)]
    output = tmp_path / "cache.jsonl"
    build_cache(
        model_name,
        write_jsonl(tmp_path / "q.jsonl", rows),
        output,
        base_urls=[base_url],
        max_new_tokens=6,
        keep_degenerate=True,
        progress=False,
    )
    written = [json.loads(line) for line in output.read_text().splitlines()]
    meta = json.loads((tmp_path / "cache.jsonl.meta.json").read_text())
    assert len(written) == 5 and meta["backend"] == "openai"
    assert {row["messages"][0]["content"] for row in written} == {row["messages"][0]["content"] for row in rows}


def test_server_dying_mid_run_keeps_the_rows_written_so_far(stub, tmp_path):
    from conftest import conversation, write_jsonl

    from delia import build_cache

    server = stub(lambda n, body: echo(n, body) if n <= 4 else (503, {"error": "gone"}))
    rows = [conversation(f"Question {i}", f"Reference {i}") for i in range(10)]
    output = tmp_path / "cache.jsonl"
    with pytest.raises(ServerUnreachableError, match="after 2 attempt"):
        build_cache(
            "tiny",
            write_jsonl(tmp_path / "q.jsonl", rows),
            output,
            base_urls=server.url,
            batch_size=2,
            concurrency=1,
            sort_by_length=False,
            progress=False,
            backend_options={"max_retries": 1, "backoff": 0.01},
        )
    kept = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["messages"][0]["content"] for row in kept] == [f"Question {i}" for i in range(4)]


def latency_by_query(count: int, low: float, high: float, seed: int = 0) -> dict[str, float]:
    """A seeded reply latency for each of the queries "Question 0", "Question 1", ..."""
    rng = random.Random(seed)
    return {f"Question {i}": rng.uniform(low, high) for i in range(count)}


def test_requests_stay_in_flight_across_batches(stub, tmp_path):
    """batch_size only sets how many replies each write holds: `concurrency` requests stay in flight throughout."""
    from conftest import conversation, write_jsonl

    from delia import build_cache

    latency = latency_by_query(40, 0.005, 0.05)

    def slow_echo(number: int, body: dict) -> tuple[int, dict]:
        time.sleep(latency[body["messages"][-1]["content"]])
        return echo(number, body)

    server = stub(slow_echo)
    rows = [conversation(f"Question {i}", f"Reference {i}") for i in range(40)]
    output = tmp_path / "cache.jsonl"
    options = {"base_urls": server.url, "concurrency": 6, "batch_size": 2, "progress": False}
    result = build_cache("tiny", write_jsonl(tmp_path / "q.jsonl", rows), output, sort_by_length=False, **options)
    assert server.max_in_flight == 6  # reaches `concurrency`, never more, with 2 rows per batch
    written = [json.loads(line)["messages"][0]["content"] for line in output.read_text().splitlines()]
    assert sorted(written) == sorted(latency) and result.written == 40  # each once, in the order they came back
    assert written != [f"Question {i}" for i in range(40)]  # the latencies are shuffled: not the query order

    # per-request seeds: the same whatever the batch boundaries and the answer order
    first = {body["messages"][-1]["content"]: body["seed"] for _, body in server.requests}
    server.requests.clear()
    build_cache("tiny", tmp_path / "q.jsonl", tmp_path / "other.jsonl", **{**options, "batch_size": 5})
    assert {body["messages"][-1]["content"]: body["seed"] for _, body in server.requests} == first
    assert first == {query: request_seed(0, query_id(query)) for query in latency}


def test_a_failed_request_ends_the_run_and_a_rerun_answers_the_rest_once(stub, tmp_path):
    from conftest import conversation, write_jsonl

    from delia import build_cache

    latency = latency_by_query(30, 0.005, 0.05)
    broken = [True]

    def fails_once(number: int, body: dict) -> tuple[int, dict]:
        query = body["messages"][-1]["content"]
        time.sleep(latency[query])
        if broken[0] and query == "Question 13":
            return 400, {"error": {"message": "this one is refused"}}
        return echo(number, body)

    server = stub(fails_once)
    query_file = write_jsonl(tmp_path / "q.jsonl", [conversation(f"Question {i}", f"Ref {i}") for i in range(30)])
    output = tmp_path / "cache.jsonl"
    options = {"base_urls": server.url, "concurrency": 4, "batch_size": 3, "sort_by_length": False, "progress": False}
    with pytest.raises(ServerRequestError, match="this one is refused"):
        build_cache("tiny", query_file, output, **options)
    kept = [json.loads(line)["messages"][0]["content"] for line in output.read_text().splitlines()]
    assert 0 < len(kept) == len(set(kept)) < 30 and "Question 13" not in kept  # the replies back before it, once
    broken[0] = False
    result = build_cache("tiny", query_file, output, **options)
    rows = [json.loads(line)["messages"][0]["content"] for line in output.read_text().splitlines()]
    assert sorted(rows) == sorted(latency) and len(rows) == 30  # each once
    assert result.skipped_already_done == len(kept) and result.written == 30 - len(kept)


@pytest.mark.parametrize("kill_after_rows", [1, 40])
def test_sigkill_mid_run_then_restart_answers_every_query_once(stub, tmp_path, kill_after_rows):
    """Killed with requests in flight and replies waiting in the reorder buffer: the restart answers the rest once."""
    from conftest import conversation, write_jsonl

    latency = latency_by_query(200, 0.02, 0.1)

    def slow_echo(number: int, body: dict) -> tuple[int, dict]:
        time.sleep(latency[body["messages"][-1]["content"]])
        return echo(number, body)

    server = stub(slow_echo)
    rows = [conversation(f"Question {i}", f"Reference {i}") for i in range(200)]
    query_file = write_jsonl(tmp_path / "q.jsonl", rows)
    output = tmp_path / "cache.jsonl"
    command = [sys.executable, "-m", "delia.build_cache", "tiny", str(query_file), str(output), "--backend", "openai"]
    command += ["--base-url", server.url, "--concurrency", "8", "--batch-size", "3"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while lines_in(output) < kill_after_rows and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    written_before = lines_in(output)
    assert kill_after_rows <= written_before < 200  # killed mid-run

    finished = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert finished.returncode == 0, finished.stderr[-2000:]
    queries = [json.loads(line)["messages"][0]["content"] for line in output.read_text().splitlines()]
    assert sorted(queries) == sorted(latency) and len(queries) == len(set(queries))  # every query, each once
    assert f"{200 - written_before} rows written, {written_before} skipped as already done" in finished.stdout


def lines_in(path) -> int:
    """Complete lines written so far (0 before the file exists)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0
