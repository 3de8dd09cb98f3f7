"""OpenAIBackend against a real `transformers serve` (tiny local model) and against tiny stub servers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from delia.generation.base import Generation, SamplingConfig
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
    """A local HTTP server; `respond(n, body) -> (status, json_body)` decides each answer; `requests` records them."""

    def __init__(self, respond: Callable[[int, dict], tuple[int, dict]]):
        self.requests: list[tuple[str, dict]] = []
        lock, stub = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    stub.requests.append((self.path, body))
                    number = len(stub.requests)
                status, answer = respond(number, body)
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
        "seed": 3,
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
    assert sorted(body["seed"] for _, body in server.requests) == [3, 4, 5, 6]


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
