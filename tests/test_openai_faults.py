"""OpenAIBackend and build_cache against a real fault-injecting server on 127.0.0.1 (bounded in time).

The faults a proxy or a load balancer mid-restart produces: 5xx, 429 with Retry-After, a dropped connection, and a
200 reply that is not a chat completion (an HTML error page, a body cut short without Content-Length, JSON without
`choices` or without `message`, an empty body); and a server that accepts connections and never answers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import conversation, write_jsonl

from delia import build_cache
from delia.cache_writer import CacheWriter
from delia.generation.base import Generation, SamplingConfig
from delia.generation.openai_backend import OpenAIBackend, ServerRequestError, ServerUnreachableError

SAMPLING = SamplingConfig(max_new_tokens=8, seed=3)
HTML = b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>"
INVALID_200 = ("html", "cut", "no_choices", "no_message", "empty")  # 200 replies that are no chat completion
TRANSIENT = ("503", "429", "drop", "html", "cut", "no_choices")  # the benchmark's kinds


def completion(text: str) -> bytes:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    return json.dumps({"object": "chat.completion", "choices": [choice], "usage": usage}).encode()


class FaultServer(ThreadingHTTPServer):
    """Answers each POST as `plan(text, attempt)` says: "ok" (echo the last message) or a fault kind.

    `attempt` counts the earlier requests with the same last message. `arrivals` records (text, attempt, time) and
    `peaks` the requests in flight as each arrived; `wait_in_flight(n, timeout)` (for a plan) blocks until n requests
    were being answered at once, at the caller's arrival or after it.
    """

    daemon_threads = True

    def __init__(self, plan: Callable[[str, int], str]):
        super().__init__(("127.0.0.1", 0), FaultHandler)
        self.plan = plan
        self.changed = threading.Condition()
        self.in_flight = 0
        self.arrivals: list[tuple[str, int, float]] = []
        self.peaks: list[int] = []
        self.handling = threading.local()  # the index in `peaks` of the request this thread answers
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def wait_in_flight(self, count: int, timeout: float) -> bool:
        with self.changed:
            start = self.handling.index
            return self.changed.wait_for(lambda: max(self.peaks[start:]) >= count, timeout)

    def attempts(self, text: str) -> int:
        return sum(arrival[0] == text for arrival in self.arrivals)


class FaultHandler(BaseHTTPRequestHandler):
    server: FaultServer

    def do_POST(self) -> None:
        text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
        with self.server.changed:
            attempt = self.server.attempts(text)
            self.server.arrivals.append((text, attempt, time.monotonic()))
            self.server.in_flight += 1
            self.server.peaks.append(self.server.in_flight)
            self.server.handling.index = len(self.server.peaks) - 1
            self.server.changed.notify_all()
        try:
            kind = self.server.plan(text, attempt)
        finally:
            with self.server.changed:
                self.server.in_flight -= 1
        if kind == "drop":
            return  # the connection closes with no reply at all
        status, body, length = {
            "ok": (200, completion(text), True),
            "503": (503, b'{"error": {"message": "upstream restarting"}}', True),
            "429": (429, b'{"error": {"message": "slow down"}}', True),
            "401": (401, b'{"error": {"message": "invalid api key"}}', True),
            "html": (200, HTML, True),
            "cut": (200, completion(text)[:40], False),  # no Content-Length: the body ends where the connection does
            "no_choices": (200, b'{"object": "error", "message": "no healthy upstream"}', True),
            "no_message": (200, b'{"choices": [{"index": 0, "finish_reason": "stop"}]}', True),
            "empty": (200, b"", True),
        }[kind]
        self.send_response(status)
        self.send_header("Content-Type", "text/html" if kind == "html" else "application/json")
        if kind == "429":
            self.send_header("Retry-After", "1")
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fault_server():
    """fault_server(plan) starts a FaultServer; all are shut down after the test."""
    started: list[FaultServer] = []

    def start(plan: Callable[[str, int], str]) -> FaultServer:
        started.append(FaultServer(plan))
        return started[-1]

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def chats(count: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": str(index)}] for index in range(count)]


@pytest.mark.parametrize("kind", INVALID_200)
def test_a_200_that_is_no_chat_completion_is_retried(fault_server, kind):
    server = fault_server(lambda text, attempt: kind if attempt == 0 else "ok")
    backend = OpenAIBackend("tiny", server.url, max_retries=2, backoff=0.01)
    [reply] = backend.generate(chats(1), SAMPLING)
    assert reply == Generation(text="0", num_tokens=2, finish_reason="stop")
    assert server.attempts("0") == 2 and backend.invalid_replies_retried == 1 and backend.retries == 1


def test_a_200_that_is_never_a_chat_completion_fails_quoting_the_body(fault_server):
    server = fault_server(lambda text, attempt: "html")
    backend = OpenAIBackend("tiny", server.url, max_retries=2, backoff=0.01)
    with pytest.raises(ServerRequestError) as raised:
        backend.generate(chats(1), SAMPLING)
    message = str(raised.value)
    assert server.attempts("0") == 3 and "3 attempt(s)" in message and server.url in message
    assert "<html><head><title>502 Bad Gateway</title>" in message


def test_an_invalid_200_among_other_faults_ends_as_unreachable_with_the_last_error(fault_server):
    server = fault_server(lambda text, attempt: ["503", "no_choices", "503"][attempt])
    backend = OpenAIBackend("tiny", server.url, max_retries=2, backoff=0.01)
    with pytest.raises(ServerUnreachableError, match=r"after 3 attempt\(s\); last error: HTTP 503"):
        backend.generate(chats(1), SAMPLING)
    assert backend.invalid_replies_retried == 1


def test_every_transient_fault_is_retried_and_replies_keep_their_order(fault_server):
    kinds = dict(zip(map(str, range(len(TRANSIENT))), TRANSIENT, strict=True))
    server = fault_server(lambda text, attempt: kinds.get(text, "ok") if attempt == 0 else "ok")
    backend = OpenAIBackend("tiny", server.url, concurrency=3, max_retries=2, backoff=0.01)
    replies = backend.generate(chats(10), SAMPLING)
    assert [reply.text for reply in replies] == [str(index) for index in range(10)]
    assert backend.retries == 6 and backend.invalid_replies_retried == 3  # html, cut, no_choices
    slow = [time for text, _, time in server.arrivals if kinds.get(text) == "429"]
    assert slow[1] - slow[0] >= 1.0  # Retry-After: 1 honoured


def test_a_request_waiting_on_its_backoff_holds_no_slot(fault_server):
    """While request 0 waits 2 s to retry a 503, `concurrency` other requests are in flight at once, twice over."""
    full: list[bool] = []

    def plan(text: str, attempt: int) -> str:
        if text == "0" and attempt == 0:
            return "503"
        if text in {"1", "2", "3", "5", "6", "7", "8"}:
            full.append(server.wait_in_flight(4, timeout=1.5))  # held until 4 are in flight (or 1.5 s)
        return "ok"

    server = fault_server(plan)
    backend = OpenAIBackend("tiny", server.url, concurrency=4, max_retries=1, backoff=2.0)
    prompts = backend.prepare(chats(13), [str(index) for index in range(13)])
    positions = [position for position, _ in backend.stream_unordered(prompts, SAMPLING)]
    assert full == [True] * 7  # the old loop slept in a worker: 3 in flight, each wait timed out
    assert sorted(positions) == list(range(13)) and positions[-1] == 0  # 0 came back last, after its backoff
    retry = next(time for text, attempt, time in server.arrivals if text == "0" and attempt == 1)
    assert all(time < retry for text, _, time in server.arrivals if text != "0")


def test_a_silent_server_errors_after_every_attempt_timed_out():
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        backend = OpenAIBackend("tiny", url, timeout=0.3, max_retries=2, backoff=0.05)
        start = time.monotonic()
        with pytest.raises(ServerUnreachableError, match=r"after 3 attempt\(s\); last error: .*timed out"):
            backend.generate(chats(1), SAMPLING)
        elapsed = time.monotonic() - start
    assert 3 * 0.3 <= elapsed <= backend.time_to_error() + 2.0


def test_the_default_time_to_error_of_a_silent_server_is_about_two_minutes():
    backend = OpenAIBackend("tiny", "http://127.0.0.1:9")
    assert (backend.timeout, backend.max_retries, backend.backoff) == (30.0, 3, 1.0)
    assert 110 <= backend.time_to_error() <= 135
    assert OpenAIBackend("tiny", "http://127.0.0.1:9", timeout=5, max_retries=1).time_to_error() < 12


def build(server: FaultServer, tmp_path, count: int, **options) -> tuple:
    """build_cache of `count` queries against `server`; returns the result and the queries written, in file order."""
    query_file = write_jsonl(tmp_path / "q.jsonl", [conversation(f"Question {i}", f"Ref {i}") for i in range(count)])
    output = tmp_path / "cache.jsonl"
    settings = {"base_urls": server.url, "batch_size": 3, "sort_by_length": False, "progress": False, **options}
    result = build_cache("tiny", query_file, output, **settings)
    return result, [json.loads(line)["messages"][0]["content"] for line in output.read_text().splitlines()]


def test_build_cache_under_faults_writes_every_row_once_and_counts_invalid_replies(fault_server, tmp_path):
    def plan(text: str, attempt: int) -> str:
        number = int(text.split()[-1])
        return TRANSIENT[number % len(TRANSIENT)] if attempt == 0 and number % 3 == 0 else "ok"

    server = fault_server(plan)
    options = {"concurrency": 4, "backend_options": {"backoff": 0.01}}
    result, written = build(server, tmp_path, 30, **options)
    assert sorted(written) == sorted(f"Question {i}" for i in range(30)) and result.written == 30
    injected = [TRANSIENT[n % len(TRANSIENT)] for n in range(0, 30, 3)]
    assert result.invalid_replies_retried == sum(kind in INVALID_200 for kind in injected) == 5
    meta = json.loads((tmp_path / "cache.jsonl.meta.json").read_text())
    assert meta["counts"]["invalid_replies_retried"] == 5 and "5 invalid server replies retried" in result.summary()


def test_the_command_line_rides_out_faults(fault_server, tmp_path):
    """`delia build-cache --base-url` with every first attempt faulting (each kind in turn): every row, exit status 0."""
    server = fault_server(lambda text, attempt: TRANSIENT[int(text.split()[-1]) % 6] if attempt == 0 else "ok")
    query_file = write_jsonl(tmp_path / "q.jsonl", [conversation(f"Question {i}", f"R {i}") for i in range(24)])
    output = tmp_path / "cache.jsonl"
    command = [sys.executable, "-m", "delia.build_cache", "tiny", str(query_file), str(output), "--backend", "openai"]
    finished = subprocess.run([*command, "--base-url", server.url], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "24 rows written" in finished.stdout and "12 invalid server replies retried" in finished.stdout
    assert len(set(output.read_text().splitlines())) == 24


def test_no_cache_file_when_every_request_is_refused(fault_server, tmp_path):
    server = fault_server(lambda text, attempt: "401")
    with pytest.raises(ServerRequestError, match="HTTP 401"):
        build(server, tmp_path, 5, concurrency=2)
    assert server.arrivals and not (tmp_path / "cache.jsonl").exists()
    assert not (tmp_path / "cache.jsonl.meta.json").exists()


def test_the_cache_file_appears_with_its_first_row_or_when_the_writer_finishes(tmp_path):
    with pytest.raises(RuntimeError), CacheWriter(str(tmp_path / "failed.jsonl")) as writer:
        assert writer.write([]) == 0
        raise RuntimeError("the backend failed")
    assert not (tmp_path / "failed.jsonl").exists()
    with CacheWriter(str(tmp_path / "finished.jsonl")):
        pass
    assert (tmp_path / "finished.jsonl").read_text() == ""  # a finished run that kept no row still has its output
    with pytest.raises(RuntimeError), CacheWriter(str(tmp_path / "partial.jsonl")) as writer:
        writer.write([{"id": "a"}])
        raise RuntimeError("the backend failed")
    assert (tmp_path / "partial.jsonl").read_text() == '{"id": "a"}\n'


def test_the_fault_benchmark_prints_its_ratio_last():
    """benchmarks/openai_backend.py --faults, small (seeded faults: the same every run): same rows, ratio last."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "openai_backend.py"
    command = [sys.executable, str(script), "--faults", "--fault-rate", "0.1", "--queries", "40", "--rounds", "1"]
    finished = subprocess.run([*command, "--backoff", "0.05"], capture_output=True, text=True, timeout=180)
    assert finished.returncode == 0, finished.stderr[-2000:]
    lines = finished.stdout.strip().splitlines()
    assert "same rows in every run: yes" in finished.stdout and "backoff 0.05 s" in lines[0]
    assert lines[-1].startswith("faults_vs_clean=") and 0 < float(lines[-1].split("=")[1]) < 5
